"""The decode step's one-row matmuls as a Triton GEMV that streams weights near the copy bandwidth,
with what surrounds each matmul in a layer (the norm before it, bias, activation, residual add) fused.

At batch 1 a decode step reads every weight once, and cuBLAS's GEMVs stream them at ~0.6 of copy
bandwidth on an H200 (the 2048-wide matrices are mostly ramp-up and tail). This kernel gives each
program a whole [rows, K] tile of the weight, so every byte of a matrix is requested in one wave, and
launches with programmatic dependent launch: a kernel issues its weight loads *before* it waits for the
previous kernel (only x depends on it) and lets the next one launch at once, so one matrix's ramp-up
overlaps the previous one's tail. On 24 layers' matmuls as a dependent chain (1xH200, one CUDA graph,
`benchmarks/gemv_chain.py`): cuBLAS 0.926 ms, this kernel 0.726 ms, floor 0.578 ms. The overlap needs
GEMVs back to back, so the layer's other work moves into them: every program normalizes x itself (K
values, read anyway), and the epilogue adds bias and residual and applies gelu or swiglu (gate and up
rows in one program). A layer is then qkv, attention (rope and cache write inside), out + residual, norm + up +
activation, down + residual. Matrices of more row blocks than `STREAM_PER_SM` programs per SM (qkv, the
MLP, the head) use a streaming form: a fixed grid whose programs each take every grid-th block with the
next block's weights in flight while they reduce the current one (later waves of one-block programs
start cold) and normalize x once, not per block; its grid holds no more programs than the SMs keep
resident at once (`_resident`: the K=8192 down-projection's 3 per SM). Fused layers' chain 0.809 -> 0.731 ms (floor 0.569),
GPT b=1 1.095 -> 1.022 ms/token, StagFormer p=2 1.091 -> 1.040-1.042
(results/decode_step_ablations_h200.json). At 8 rows it is 2x slower than cuBLAS (the per-row loop),
and at 2 rows it slowed the shared model's batched step (0.752 against 0.691 ms/token), so only one-row
matmuls use it."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from megatron_stag.serving.model import linear as reference_linear

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only torch: every matmul stays F.linear
    triton = None

TILE = 4096  # weight elements per row block (engine b=1, 4k against 8k: GPT 0.977 / 1.006, AltUp 1.025 / 1.053 ms)
WARPS = 4  # 8 tie on a bare chain of matmuls; 4 keep the fused norm off the step (GPT b=1 1.164 -> 1.127 ms)
STREAM_PER_SM = 8  # programs per SM of the streaming form, at most (4: 0.759, 8: 0.731, 12+: per-block again; ms, chain)
NORMS = {None: 0, "RMSNorm": 1, "LayerNorm": 2}
ACTIVATIONS = {None: 0, "gelu": 1, "swiglu": 2}


_SMS: dict = {}


@torch.compiler.assume_constant_result  # a constant while tracing (dynamo warns of an lru_cache here)
def _sms(device: torch.device) -> int:
    """Streaming multiprocessors (CPU tensors, in Triton's interpreter: 2, so tests take several blocks)."""
    if device not in _SMS:
        _SMS[device] = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 2
    return _SMS[device]


_FITS: dict = {}  # (kernel, dtype, device, constexprs) -> programs an SM holds at once


def _resident(kernel, args: tuple, meta: dict, device: torch.device) -> int:
    """Programs per SM of the streaming grid: STREAM_PER_SM, or fewer where the compiled kernel's
    registers (or threads, or shared memory) let fewer be resident at once, since programs beyond that
    start in a later, cold wave. The down-projection's one-row blocks of K=8192 need 140 registers a
    thread: 3 programs fit on an SM, and 8 per SM ran in three waves (engine b=1, one process: GPT 0.976-0.981
    -> 0.948 ms/token, AltUp 1.026 -> 1.002, shared recurrent 0.409 -> 0.402)."""
    if device.type != "cuda":  # (Triton's interpreter has no compiled kernel)
        return STREAM_PER_SM
    key = (kernel, args[0].dtype, device, *sorted(meta.items()))
    if key not in _FITS:  # compile (or find) the kernel once per form, not on every launch
        _FITS[key] = _fit(kernel.warmup(*args, grid=(1,), **meta), device)
    return min(STREAM_PER_SM, _FITS[key])


def _fit(compiled, device: torch.device) -> int:
    """How many programs of a compiled Triton kernel an SM holds at once (CUDA's occupancy rules:
    registers allocated per warp in units of 256, the SM's threads, its shared memory)."""
    compiled._init_handles()  # loads the binary, which is when Triton learns its register count
    props = torch.cuda.get_device_properties(device)
    warps = compiled.metadata.num_warps
    regs = -(-compiled.n_regs * props.warp_size // 256) * 256 * warps
    return max(1, min(getattr(props, "regs_per_multiprocessor", 65536) // max(regs, 1),
                      props.max_threads_per_multi_processor // (warps * props.warp_size),
                      props.shared_memory_per_multiprocessor // (compiled.metadata.shared + 1024)))


def _outputs(weight: Tensor, activation: Optional[str]) -> int:
    """Output features of `weight`: its rows, or half of them for swiglu's [gate; up]."""
    return weight.shape[0] // (2 if activation == "swiglu" else 1)


if triton is not None:
    @triton.jit
    def _norm_params(nw_ptr, nb_ptr, K: tl.constexpr, NORM: tl.constexpr, NORM_BIAS: tl.constexpr):
        """The norm's weight and bias (fp32); they do not depend on the previous kernel."""
        cols = tl.arange(0, K)
        nw = tl.load(nw_ptr + cols).to(tl.float32) if NORM else tl.zeros([K], tl.float32)
        nb = tl.load(nb_ptr + cols).to(tl.float32) if NORM_BIAS else tl.zeros([K], tl.float32)
        return nw, nb

    @triton.jit
    def _normalized(x_ptr, nw, nb, eps, K: tl.constexpr, NORM: tl.constexpr, NORM_BIAS: tl.constexpr):
        """One row of x (fp32), RMS- or layer-normalized when NORM."""
        x = tl.load(x_ptr + tl.arange(0, K)).to(tl.float32)
        if NORM == 1:
            x = x * tl.rsqrt(tl.sum(x * x, axis=0) / K + eps) * nw
        if NORM == 2:
            x = x - tl.sum(x, axis=0) / K
            x = x * tl.rsqrt(tl.sum(x * x, axis=0) / K + eps) * nw
        if NORM_BIAS:
            x += nb
        return x

    @triton.jit
    def _store_rows(w, w_up, x, rows, y_ptr, bias_ptr, res_ptr, N, HAS_BIAS: tl.constexpr, ACT: tl.constexpr,
                    RESIDUAL: tl.constexpr):
        """y[rows] = activation(w @ x + bias) + residual; with swiglu, w_up holds the up rows."""
        y = tl.sum(w.to(tl.float32) * x[None, :], axis=1)
        if HAS_BIAS:
            y += tl.load(bias_ptr + rows, mask=rows < N, other=0.0).to(tl.float32)
        if ACT == 1:
            y = 0.5 * y * (1.0 + tl.math.erf(y * 0.7071067811865476))
        if ACT == 2:
            up = tl.sum(w_up.to(tl.float32) * x[None, :], axis=1)
            if HAS_BIAS:
                up += tl.load(bias_ptr + N + rows, mask=rows < N, other=0.0).to(tl.float32)
            y = y / (1.0 + tl.exp(-y)) * up
        if RESIDUAL:
            y += tl.load(res_ptr + rows, mask=rows < N, other=0.0).to(tl.float32)
        tl.store(y_ptr + rows, y.to(y_ptr.dtype.element_ty), mask=rows < N)

    @triton.jit
    def _weights(w_ptr, rows, N, K: tl.constexpr, ACT: tl.constexpr):
        """A block's weight rows and, with swiglu (rows N.. are the up projection's), its up rows."""
        cols = tl.arange(0, K)
        w = tl.load(w_ptr + rows[:, None] * K + cols[None, :], mask=rows[:, None] < N, other=0.0)
        w_up = tl.load(w_ptr + (rows[:, None] + N) * K + cols[None, :], mask=rows[:, None] < N,
                       other=0.0) if ACT == 2 else w
        return w, w_up

    @triton.jit
    def _gemv_kernel(x_ptr, w_ptr, y_ptr, bias_ptr, res_ptr, nw_ptr, nb_ptr, N, x_stride, eps,
                     K: tl.constexpr, B: tl.constexpr, BLOCK_N: tl.constexpr, PDL: tl.constexpr,
                     PREFETCH: tl.constexpr, NORM: tl.constexpr, NORM_BIAS: tl.constexpr, HAS_BIAS: tl.constexpr,
                     ACT: tl.constexpr, RESIDUAL: tl.constexpr):
        """One program per row block, for every row of x."""
        rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        if PDL and not PREFETCH:
            tl.extra.cuda.gdc_wait()
        w, w_up = _weights(w_ptr, rows, N, K, ACT)
        nw, nb = _norm_params(nw_ptr, nb_ptr, K, NORM, NORM_BIAS)
        if PDL and PREFETCH:  # the parameters do not depend on the previous kernel: only x waits for it
            tl.extra.cuda.gdc_wait()
        if PDL:
            tl.extra.cuda.gdc_launch_dependents()
        for b in tl.static_range(B):
            x = _normalized(x_ptr + b * x_stride, nw, nb, eps, K, NORM, NORM_BIAS)
            _store_rows(w, w_up, x, rows, y_ptr + b * N, bias_ptr, res_ptr + b * N, N, HAS_BIAS, ACT, RESIDUAL)

    @triton.jit
    def _gemv_stream_kernel(x_ptr, w_ptr, y_ptr, bias_ptr, res_ptr, nw_ptr, nb_ptr, N, BLOCKS, eps,
                            K: tl.constexpr, BLOCK_N: tl.constexpr, PDL: tl.constexpr, NORM: tl.constexpr,
                            NORM_BIAS: tl.constexpr, HAS_BIAS: tl.constexpr, ACT: tl.constexpr,
                            RESIDUAL: tl.constexpr):
        """One row, a fixed grid: program p takes row blocks p, p + grid, ...; the next block's weight
        loads are issued before this block's reduction, so each program keeps a tile in flight all along
        (the per-block kernel's later waves start cold), and the norm runs once per program."""
        pid = tl.program_id(0)
        grid = tl.num_programs(0)
        r = tl.arange(0, BLOCK_N)
        w, w_up = _weights(w_ptr, pid * BLOCK_N + r, N, K, ACT)
        nw, nb = _norm_params(nw_ptr, nb_ptr, K, NORM, NORM_BIAS)
        if PDL:
            tl.extra.cuda.gdc_wait()
            tl.extra.cuda.gdc_launch_dependents()
        x = _normalized(x_ptr, nw, nb, eps, K, NORM, NORM_BIAS)
        for blk in range(pid, BLOCKS, grid):
            w_next, up_next = _weights(w_ptr, (blk + grid) * BLOCK_N + r, N, K, ACT)
            _store_rows(w, w_up, x, blk * BLOCK_N + r, y_ptr, bias_ptr, res_ptr, N, HAS_BIAS, ACT, RESIDUAL)
            w, w_up = w_next, up_next


def gemv(x: Tensor, w: Tensor, bias: Optional[Tensor] = None, residual: Optional[Tensor] = None,
         norm_weight: Optional[Tensor] = None, norm_bias: Optional[Tensor] = None, eps: float = 0.0,
         norm: Optional[str] = None, activation: Optional[str] = None, tile: Optional[int] = None,
         num_warps: int = WARPS, pdl: bool = True, prefetch: bool = True) -> Tensor:
    """activation(norm(x) @ w.T + bias) + residual for x [B, K] (rows may be strided), K a power of two:
    [B, N], N = w's rows (half of them with 'swiglu': [gate; up]); `tile` weight elements per row block
    (default TILE). `pdl` needs Hopper or later."""
    (b, k), n = x.shape, _outputs(w, activation)
    tile = tile or TILE
    if x.stride(1) != 1:
        x = x.contiguous()
    y = torch.empty(b, n, dtype=x.dtype, device=x.device)
    block_n = max(1, tile // k // (w.shape[0] // n))
    blocks = triton.cdiv(n, block_n)
    if b == 1 and STREAM_PER_SM and blocks > STREAM_PER_SM * _sms(x.device):
        args = (x, w, y, bias if bias is not None else w, residual.contiguous() if residual is not None else w,
                norm_weight if norm_weight is not None else w, norm_bias if norm_bias is not None else w, n, blocks,
                eps)
        meta = dict(K=k, BLOCK_N=block_n, PDL=pdl, NORM=NORMS[norm], NORM_BIAS=norm_bias is not None,
                    HAS_BIAS=bias is not None, ACT=ACTIVATIONS[activation], RESIDUAL=residual is not None,
                    num_warps=num_warps, **(dict(launch_pdl=True) if pdl else {}))
        grid = max(1, _resident(_gemv_stream_kernel, args, meta, x.device) * _sms(x.device))
        _gemv_stream_kernel[(grid,)](*args, **meta)
        return y
    extra = dict(launch_pdl=True) if pdl else {}
    _gemv_kernel[(blocks,)](
        x, w, y, bias if bias is not None else w, residual.contiguous() if residual is not None else w,
        norm_weight if norm_weight is not None else w, norm_bias if norm_bias is not None else w, n, x.stride(0),
        eps, K=k, B=b, BLOCK_N=block_n, PDL=pdl, PREFETCH=prefetch, NORM=NORMS[norm], NORM_BIAS=norm_bias is not None,
        HAS_BIAS=bias is not None, ACT=ACTIVATIONS[activation], RESIDUAL=residual is not None, num_warps=num_warps,
        **extra)
    return y


@torch.library.custom_op("megatron_stag::gemv", mutates_args=())
def _gemv_op(x: Tensor, weight: Tensor, bias: Optional[Tensor], residual: Optional[Tensor],
             norm_weight: Optional[Tensor], norm_bias: Optional[Tensor], eps: float, norm: str,
             activation: str) -> Tensor:
    return gemv(x, weight, bias, residual, norm_weight, norm_bias, eps, norm or None, activation or None,
                pdl=x.is_cuda)  # not on CPU tensors (Triton's interpreter, in the tests)


@_gemv_op.register_fake
def _(x, weight, bias, residual, norm_weight, norm_bias, eps, norm, activation) -> Tensor:
    return x.new_empty(x.shape[0], _outputs(weight, activation or None))


def available(device: torch.device) -> bool:
    """Whether `linear` may route one-row matmuls on `device` to the kernel (Triton, Hopper or later)."""
    return triton is not None and device.type == "cuda" and torch.cuda.get_device_capability(device) >= (9, 0)


def linear(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None, norm: Optional[nn.Module] = None,
           activation: Optional[str] = None, residual: Optional[Tensor] = None) -> Tensor:
    """`model.linear` (norm, matmul, activation and residual add) with one-row half-precision steps in
    one kernel (call only where `available`). The checks read shapes, dtypes and module types only, so
    under torch.compile they resolve while tracing."""
    k, n = x.shape[-1], _outputs(weight, activation)
    kind = type(norm).__name__ if norm is not None else None
    if (x.numel() != k or x.dtype not in (torch.bfloat16, torch.float16) or weight.dtype != x.dtype
            or weight.dim() != 2 or not weight.is_contiguous() or k & (k - 1) or not 256 <= k <= 16384
            or kind not in NORMS or (norm is not None and (norm.weight is None or norm.eps is None))
            or any(t is not None and t.dtype != x.dtype for t in (bias, residual))
            or (residual is not None and residual.shape != (*x.shape[:-1], n))):
        return reference_linear(x, weight, bias, norm, activation, residual)
    y = torch.ops.megatron_stag.gemv(
        x.reshape(1, k), weight, bias, residual.reshape(1, n) if residual is not None else None,
        norm.weight if norm is not None else None, getattr(norm, "bias", None), float(getattr(norm, "eps", 0.0)),
        kind or "", activation or "")
    return y.view(*x.shape[:-1], n)
