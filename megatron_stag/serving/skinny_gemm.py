"""The decode step's matmuls at 2-64 rows as a split-K tensor-core GEMM that leaves its partial sums
to the kernel after it.

At batch 8-32 a step still reads every weight once, and cuBLAS streams the 2048-wide matrices at
~0.55 of copy bandwidth (docs/decode-engine.md): each matmul pays a ramp-up, a tail and, for the
K=8192 down projection, a separate split-K reduction. This kernel computes y.T = W @ x.T, so the
weight fills the tensor cores' wide side (64 output features a program) and the rows the narrow one,
and gives a matrix about one program per SM: K is split where the output features alone would leave
SMs idle (the 2048-wide out and down projections: 32 row blocks x 4 splits). It writes fp32 partial
sums [splits, rows, N] and does nothing else: their sum, the bias, the activation, the residual add
and the next norm are pointwise over rows, so inductor fuses them into the kernel that follows (the
split-K reduction costs no launch, and the sum's order is fixed: the result is deterministic). It
launches with programmatic dependent launch and asks L2 for its first PREFETCH weight blocks before
it waits on the kernel before it.
In the engine, one process on one H200, cuBLAS against this kernel for every 2-64-row matmul
(results/decode_skinny_gemm_ab_h200.json): GPT b=8 1.678 -> 1.496 ms/token, b=32 2.527 -> 2.324,
the Llama 3.2 1B shape b=8 1.132 -> 1.006, b=32 1.283 -> 1.189. Forms and tile sizes were chosen on
chains of 24 layers' matmuls (results/skinny_gemm_sweep_h200.json): 64 x 128 tiles won every shape;
there 5 stages beat these 4 by 4-11% per shape, not yet timed in the engine."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from megatron_stag.serving import gemv
from megatron_stag.serving.gemv import _sms
from megatron_stag.serving.model import _around

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only torch: every matmul stays F.linear
    triton = None

BLOCK_N = 64  # output features per program: wgmma's M
BLOCK_K = 128
STAGES = 4
PREFETCH = 2  # K blocks each program asks L2 for before it waits on the kernel before it
ROWS = 64  # most rows a matmul may have to take this kernel


def splits(n: int, k: int, sms: int) -> int:
    """K splits of an [n, k] weight: the most (1, 2, 4 or 8) that keep the programs within the SMs and
    every split at least two K blocks."""
    s = 1
    while s < 8 and (n // BLOCK_N) * s * 2 <= sms and k % (2 * s * BLOCK_K) == 0 and k // (2 * s) >= 2 * BLOCK_K:
        s *= 2
    return s


def takes(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None) -> bool:
    """Whether the kernel takes x [..., K] @ weight.T (+ bias): half precision, 2 to ROWS rows (all
    dimensions but the last), whole blocks."""
    n, k = weight.shape
    return (2 <= x.numel() // x.shape[-1] <= ROWS and x.dtype in (torch.bfloat16, torch.float16)
            and weight.dtype == x.dtype and weight.is_contiguous() and n % BLOCK_N == 0 and k % (2 * BLOCK_K) == 0
            and (bias is None or bias.dtype == x.dtype))


if triton is not None:
    @triton.jit
    def _skinny_kernel(x_ptr, w_ptr, p_ptr, M, N, K, KS, x_stride, BM: tl.constexpr, BN: tl.constexpr,
                       BK: tl.constexpr, STAGES: tl.constexpr, PREFETCH: tl.constexpr, PDL: tl.constexpr):
        """Program (n, s): partial sums of output features [n*BN, (n+1)*BN) over K split s, for every row."""
        pid_n = tl.program_id(0)
        pid_k = tl.program_id(1)
        rn = pid_n * BN + tl.arange(0, BN)
        rm = tl.arange(0, BM)
        rk = tl.arange(0, BK)
        k0 = pid_k * KS
        w_ptrs = w_ptr + rn[:, None] * K + (k0 + rk)[None, :]
        x_ptrs = x_ptr + rm[None, :] * x_stride + (k0 + rk)[:, None]
        if PDL:  # the weights do not depend on the kernel before: ask L2 for the first blocks, then wait
            for b in tl.static_range(PREFETCH):
                lines = w_ptr + rn[:, None] * K + (k0 + b * BK + tl.arange(0, BK // 64) * 64)[None, :]
                tl.inline_asm_elementwise("prefetch.global.L2 [$1]; mov.u32 $0, 0;", "=r,l", [lines],
                                          dtype=tl.int32, is_pure=False, pack=1)
            tl.extra.cuda.gdc_wait()
            tl.extra.cuda.gdc_launch_dependents()
        acc = tl.zeros([BN, BM], tl.float32)
        for k in tl.range(0, KS, BK, num_stages=STAGES):
            w = tl.load(w_ptrs + k, eviction_policy="evict_first")
            x = tl.load(x_ptrs + k, mask=rm[None, :] < M, other=0.0)
            acc = tl.dot(w, x, acc)
        tl.store(p_ptr + (pid_k * M + rm[None, :]) * N + rn[:, None], acc, mask=rm[None, :] < M)


def skinny_mm(x: Tensor, weight: Tensor, pdl: bool = True) -> Tensor:
    """Partial sums of x [rows, K] @ weight.T over K splits: [splits, rows, N] fp32 (sum dim 0 for the
    product; `takes` says which shapes). `pdl` needs Hopper or later."""
    (m, k), n = x.shape, weight.shape[0]
    if x.stride(1) != 1:
        x = x.contiguous()
    s = splits(n, k, _sms(x.device))
    out = torch.empty(s, m, n, dtype=torch.float32, device=x.device)
    _skinny_kernel[(n // BLOCK_N, s)](
        x, weight, out, m, n, k, k // s, x.stride(0), BM=max(16, triton.next_power_of_2(m)), BN=BLOCK_N,
        BK=BLOCK_K, STAGES=STAGES, PREFETCH=PREFETCH, PDL=pdl, num_warps=4, num_stages=STAGES,
        **(dict(launch_pdl=True) if pdl else {}))
    return out


@torch.library.custom_op("megatron_stag::skinny_mm", mutates_args=())
def _skinny_op(x: Tensor, weight: Tensor) -> Tensor:
    return skinny_mm(x, weight, pdl=x.is_cuda)  # not on CPU tensors (Triton's interpreter, in the tests)


@_skinny_op.register_fake
def _(x, weight) -> Tensor:
    (m, k), n = x.shape, weight.shape[0]
    return x.new_empty(splits(n, k, _sms(x.device)), m, n, dtype=torch.float32)


def linear(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None, norm: Optional[nn.Module] = None,
           activation: Optional[str] = None, residual: Optional[Tensor] = None) -> Tensor:
    """`model.linear` as the engine runs it (call only where `gemv.available`): steps of 2 to ROWS rows
    through this kernel, with the partial sums' reduction, the bias and what surrounds the matmul left
    for inductor to fuse; one-row steps (and any other shape) to `gemv.linear`. The checks read shapes
    and dtypes only, so under torch.compile they resolve while tracing."""
    if not takes(x, weight, bias):
        return gemv.linear(x, weight, bias, norm, activation, residual)
    h = (x if norm is None else norm(x)).reshape(-1, x.shape[-1])
    y = torch.ops.megatron_stag.skinny_mm(h, weight).sum(0)
    y = (y if bias is None else y + bias.float()).to(x.dtype)
    return _around(y.view(*x.shape[:-1], weight.shape[0]), activation, residual)
