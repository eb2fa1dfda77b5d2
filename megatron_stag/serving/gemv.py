"""The decode step's one-row matmuls as a Triton GEMV that streams weights near the copy bandwidth.

At batch 1 a decode step reads every weight once, and cuBLAS's GEMVs stream them at ~0.6 of copy
bandwidth on an H200 (the 2048-wide matrices are mostly ramp-up and tail). This kernel gives each
program a whole [rows, K] tile of the weight, so every byte of a matrix is requested in one wave, and
launches with programmatic dependent launch: a kernel issues its weight loads *before* it waits for the
previous kernel (only x depends on it) and lets the next one launch at once, so one matrix's ramp-up
overlaps the previous one's tail. On 24 layers' matmuls as a dependent chain (1xH200, one CUDA graph,
`benchmarks/gemv_chain.py`): cuBLAS 0.926 ms, this kernel 0.726 ms, floor 0.578 ms. At 8 rows it is
2x slower than cuBLAS (the per-row loop), so only one-row matmuls use it.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only torch: every matmul stays F.linear
    triton = None

TILE = 8192  # weight elements per program (the best of 2k..32k measured), 8 warps
WARPS = 8

if triton is not None:
    @triton.jit
    def _gemv_kernel(x_ptr, w_ptr, y_ptr, N, x_stride, K: tl.constexpr, B: tl.constexpr, BLOCK_N: tl.constexpr,
                     PDL: tl.constexpr, PREFETCH: tl.constexpr):
        rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        cols = tl.arange(0, K)
        if PDL and not PREFETCH:
            tl.extra.cuda.gdc_wait()
        w = tl.load(w_ptr + rows[:, None] * K + cols[None, :], mask=rows[:, None] < N, other=0.0)
        if PDL and PREFETCH:  # the weights do not depend on the previous kernel: only x waits for it
            tl.extra.cuda.gdc_wait()
        if PDL:
            tl.extra.cuda.gdc_launch_dependents()
        for b in tl.static_range(B):
            x = tl.load(x_ptr + b * x_stride + cols).to(tl.float32)
            y = tl.sum(w.to(tl.float32) * x[None, :], axis=1)
            tl.store(y_ptr + b * N + rows, y.to(y_ptr.dtype.element_ty), mask=rows < N)


def gemv(x: Tensor, w: Tensor, tile: int = TILE, num_warps: int = WARPS, pdl: bool = True,
         prefetch: bool = True) -> Tensor:
    """x [B, K] (rows may be strided) @ w[N, K].T -> [B, N]; K a power of two. `pdl` needs Hopper or later."""
    (b, k), n = x.shape, w.shape[0]
    if x.stride(1) != 1:
        x = x.contiguous()
    y = torch.empty(b, n, dtype=x.dtype, device=x.device)
    block_n = max(1, tile // k)
    extra = dict(launch_pdl=True) if pdl else {}
    _gemv_kernel[(triton.cdiv(n, block_n),)](x, w, y, n, x.stride(0), K=k, B=b, BLOCK_N=block_n, PDL=pdl,
                                             PREFETCH=prefetch, num_warps=num_warps, **extra)
    return y


@torch.library.custom_op("megatron_stag::gemv", mutates_args=())
def _gemv_op(x: Tensor, weight: Tensor) -> Tensor:
    return gemv(x, weight, pdl=x.is_cuda)  # not on CPU tensors (Triton's interpreter, in the tests)


@_gemv_op.register_fake
def _(x: Tensor, weight: Tensor) -> Tensor:
    return x.new_empty(x.shape[0], weight.shape[0])


def available(device: torch.device) -> bool:
    """Whether `linear` may route one-row matmuls on `device` to the kernel (Triton, Hopper or later)."""
    return triton is not None and device.type == "cuda" and torch.cuda.get_device_capability(device) >= (9, 0)


def linear(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    """F.linear, with one-row half-precision matmuls on the GEMV kernel (call only where `available`).
    The checks read shapes and dtypes only, so under torch.compile they resolve while tracing."""
    k = x.shape[-1]
    if (x.numel() != k or x.dtype not in (torch.bfloat16, torch.float16) or weight.dtype != x.dtype
            or weight.dim() != 2 or not weight.is_contiguous() or k & (k - 1) or not 256 <= k <= 16384):
        return F.linear(x, weight, bias)
    y = torch.ops.megatron_stag.gemv(x.reshape(1, k), weight).view(*x.shape[:-1], weight.shape[0])
    return y if bias is None else y + bias
