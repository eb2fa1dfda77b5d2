"""The decode step's matmuls at 2-64 rows as a split-K tensor-core GEMM that leaves its partial sums
to the kernel after it, or applies the MLP's activation itself.

At batch 8-32 a step still reads every weight once, and cuBLAS streams the 2048-wide matrices at
~0.55 of copy bandwidth (docs/decode-engine.md): each matmul pays a ramp-up, a tail and, for the
K=8192 down projection, a separate split-K reduction. This kernel computes y.T = W @ x.T, so the
weight fills the tensor cores' wide side (64 output features a program) and the rows the narrow one,
and gives a matrix about one program per SM: K is split where the output features alone would leave
SMs idle (the 2048-wide out and down projections: 32 row blocks x 4 splits). It writes fp32 partial
sums [splits, rows, N] and does nothing else: their sum, the bias, the residual add and the next norm
are pointwise over rows, so inductor fuses them into the kernel that follows (the split-K reduction
costs no launch, and the sum's order is fixed: the result is deterministic). The MLP's up projection
has one split (8192 features are 128 programs), so there the kernel adds the bias and applies GELU or
SwiGLU (a program takes the gate's 64 features and the up projection's same 64), and the compiled
activation kernel between the two MLP matmuls goes. It launches with programmatic dependent launch
and asks L2 for its first PREFETCH weight blocks before it waits on the kernel before it.
In the engine, one process on one H200, cuBLAS against this kernel for every 2-64-row matmul
(results/decode_skinny_gemm_ab_h200.json): GPT b=8 1.678 -> 1.496 ms/token, b=32 2.527 -> 2.324,
the Llama 3.2 1B shape b=8 1.132 -> 1.006, b=32 1.283 -> 1.189. Forms and tile sizes were chosen on
chains of 24 layers' matmuls (results/skinny_gemm_sweep_h200.json): 64 x 128 tiles won every shape,
5 stages beat 4 by 4-11% per shape. In the engine (one process on one H100,
results/decode_skinny_gemm_epilogue_ab_h100.json), 4 stages -> the activation in the kernel -> and 5
stages: GPT b=8 1.745 -> 1.730 -> 1.723 ms/token, b=32 2.753 -> 2.750 -> 2.710; the Llama shape b=8
1.211 -> 1.200 -> 1.196, b=32 1.447 -> 1.400 -> 1.400."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from megatron_stag.serving import gemv
from megatron_stag.serving.gemv import ACTIVATIONS, _outputs, _sms
from megatron_stag.serving.model import _around

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only torch: every matmul stays F.linear
    triton = None

BLOCK_N = 64  # output features per program: wgmma's M
BLOCK_K = 128
STAGES = 5  # K blocks in flight per program (fewer where shared memory is short: `_stages`)
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
    def _skinny_kernel(x_ptr, w_ptr, y_ptr, b_ptr, M, N, K, KS, x_stride, BM: tl.constexpr, BN: tl.constexpr,
                       BK: tl.constexpr, STAGES: tl.constexpr, PREFETCH: tl.constexpr, PDL: tl.constexpr,
                       ACT: tl.constexpr, HAS_BIAS: tl.constexpr):
        """Program (n, s): output features [n*BN, (n+1)*BN) for every row. ACT 0: fp32 partial sums over
        K split s. ACT 1 (gelu), 2 (swiglu: w's rows N.. are the up projection's): the whole of K, then
        activation(y + bias) in y's dtype, rounded where the unfused ops round."""
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
        up = tl.zeros([BN, BM], tl.float32)
        for k in tl.range(0, KS, BK, num_stages=STAGES):
            w = tl.load(w_ptrs + k, eviction_policy="evict_first")
            x = tl.load(x_ptrs + k, mask=rm[None, :] < M, other=0.0)
            acc = tl.dot(w, x, acc)
            if ACT == 2:
                up = tl.dot(tl.load(w_ptrs + N * K + k, eviction_policy="evict_first"), x, up)
        out = y_ptr + rm[None, :] * N + rn[:, None]
        if ACT == 0:
            tl.store(out + pid_k * M * N, acc, mask=rm[None, :] < M)
        else:
            dtype = y_ptr.dtype.element_ty
            if HAS_BIAS:
                acc += tl.load(b_ptr + rn).to(tl.float32)[:, None]
            y = acc.to(dtype).to(tl.float32)
            if ACT == 1:
                y = 0.5 * y * (1.0 + tl.math.erf(y * 0.7071067811865476))
            else:
                if HAS_BIAS:
                    up += tl.load(b_ptr + N + rn).to(tl.float32)[:, None]
                y = (y / (1.0 + tl.exp(-y))).to(dtype).to(tl.float32) * up.to(dtype).to(tl.float32)
            tl.store(out, y.to(dtype), mask=rm[None, :] < M)


def _stages(bm: int, act: int) -> int:
    """STAGES, or fewer where that many K blocks (weights, swiglu's up rows, x) would pass 200 KB of
    shared memory (an H100 or H200 program may have 227; the rest is left to Triton's own buffers)."""
    per_stage = 2 * BLOCK_K * (BLOCK_N * (2 if act == 2 else 1) + bm)
    return max(2, min(STAGES, 200 * 1024 // per_stage))


def skinny_mm(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None, activation: str = "",
              pdl: bool = True) -> Tensor:
    """x [rows, K] @ weight.T. No activation: partial sums over K splits, [splits, rows, N] fp32 (sum dim
    0, then add the bias, for the product); 'gelu' or 'swiglu' (weight [gate; up]): the activated
    product with its bias, [rows, N] (N/2 for swiglu) in x's dtype. `takes` says which shapes, `fused`
    when the activation goes in. `pdl` needs Hopper or later."""
    (m, k), act = x.shape, ACTIVATIONS[activation or None]
    n = _outputs(weight, activation or None)
    if x.stride(1) != 1:
        x = x.contiguous()
    s = splits(n, k, _sms(x.device)) if not act else 1
    out = (torch.empty(s, m, n, dtype=torch.float32, device=x.device) if not act else
           torch.empty(m, n, dtype=x.dtype, device=x.device))
    bm = max(16, triton.next_power_of_2(m))
    stages = _stages(bm, act)
    _skinny_kernel[(n // BLOCK_N, s)](
        x, weight, out, bias if bias is not None else weight, m, n, k, k // s, x.stride(0), BM=bm, BN=BLOCK_N,
        BK=BLOCK_K, STAGES=stages, PREFETCH=PREFETCH, PDL=pdl, ACT=act, HAS_BIAS=bias is not None, num_warps=4,
        num_stages=stages, **(dict(launch_pdl=True) if pdl else {}))
    return out


@torch.library.custom_op("megatron_stag::skinny_mm", mutates_args=())
def _skinny_op(x: Tensor, weight: Tensor, bias: Optional[Tensor], activation: str) -> Tensor:
    return skinny_mm(x, weight, bias, activation, pdl=x.is_cuda)  # not on CPU tensors (Triton's interpreter)


@_skinny_op.register_fake
def _(x, weight, bias, activation) -> Tensor:
    (m, k), n = x.shape, _outputs(weight, activation or None)
    if activation:
        return x.new_empty(m, n)
    return x.new_empty(splits(n, k, _sms(x.device)), m, n, dtype=torch.float32)


def fused(x: Tensor, weight: Tensor, activation: Optional[str]) -> bool:
    """Whether the activation (and the bias) go into the kernel: where the product takes one K split
    anyway (the MLP's up projections: their output features alone give each SM a program), so no
    partial sums are left to add up, and the compiled activation kernel between the MLP's two matmuls
    goes."""
    n = _outputs(weight, activation)
    return activation in ("gelu", "swiglu") and n % BLOCK_N == 0 and splits(n, x.shape[-1], _sms(x.device)) == 1


def linear(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None, norm: Optional[nn.Module] = None,
           activation: Optional[str] = None, residual: Optional[Tensor] = None) -> Tensor:
    """`model.linear` as the engine runs it (call only where `gemv.available`): steps of 2 to ROWS rows
    through this kernel, with the MLP's activation inside it (`fused`) or the partial sums' reduction,
    the bias and the activation left for inductor to fuse; one-row steps (and any other shape) to
    `gemv.linear`. The checks read shapes and dtypes only, so under torch.compile they resolve while
    tracing."""
    if not takes(x, weight, bias):
        return gemv.linear(x, weight, bias, norm, activation, residual)
    h = (x if norm is None else norm(x)).reshape(-1, x.shape[-1])
    if fused(h, weight, activation):
        y = torch.ops.megatron_stag.skinny_mm(h, weight, bias, activation)
        y = y.view(*x.shape[:-1], y.shape[-1])
        return y if residual is None else residual + y
    y = torch.ops.megatron_stag.skinny_mm(h, weight, None, "").sum(0)
    y = (y if bias is None else y + bias.float()).to(x.dtype)
    return _around(y.view(*x.shape[:-1], weight.shape[0]), activation, residual)
