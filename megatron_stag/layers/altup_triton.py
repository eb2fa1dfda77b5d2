"""AltUp's standard predict and correct as Triton kernels: one pass over the K-block stream each,
forward and backward.

Predict and correct are memory-bound: a layer's K*d stream is read and written a few times around
one d-wide layer. torch.compile splits each step and its backward into several kernels (the active
block's copy, the mix, the innovation, the coefficient-gradient reductions: ~19 passes of one block
per layer at K = 2, measured on an H100). Here every step is one kernel that reads its inputs once:

  predict   forward  x -> (x_a, x^ = P x)                     reads K,      writes K + 1
            backward dx = P^T dx^ + [a] dx_a, dP = sum dx^ x^T reads 2K + 1, writes K
  correct   forward  x' = x^ + g (y - x^_a)                    reads K + 1,  writes K
            backward dx^ = G - [a] dy, dy = g . G, dg = sum G (y - x^_a)   reads K + 2, writes K + 1

The coefficient gradients are reduced per program into an fp32 buffer and summed by torch: exact
order, so runs are deterministic. Blocks are [N, K, d] with N = tokens (s*b, a sequence-parallel
slice under SP); the coefficients stay replicated modules as in `altup_mixing`.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl
from torch import Tensor

_BLOCK_N, _BLOCK_D, _WARPS = 16, 128, 4
_BWD_BLOCK_N = 16  # backward tiles hold K x K products per element: fewer rows per step
_PROGRAMS_PER_SM = 16


@triton.jit
def _tile(N, D, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    return rows, cols, (rows < N)[:, None] & (cols < D)[None, :]


@triton.jit
def _predict_fwd(x_ptr, p_ptr, xa_ptr, xhat_ptr, N, D, K: tl.constexpr, KP: tl.constexpr,
                 ACTIVE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    rows, cols, mask = _tile(N, D, BLOCK_N, BLOCK_D)
    ks = tl.arange(0, KP)
    base = rows[:, None] * (K * D) + cols[None, :]                       # [BN, BD], block 0
    acc = tl.zeros((BLOCK_N, KP, BLOCK_D), dtype=tl.float32)
    for j in tl.static_range(K):
        xj = tl.load(x_ptr + base + j * D, mask=mask)
        if j == ACTIVE:
            tl.store(xa_ptr + rows[:, None] * D + cols[None, :], xj, mask=mask)
        pj = tl.load(p_ptr + ks * K + j, mask=ks < K, other=0.0).to(tl.float32)   # P[:, j]
        acc += pj[None, :, None] * xj.to(tl.float32)[:, None, :]
    offs = base[:, None, :] + ks[None, :, None] * D
    mask3 = mask[:, None, :] & (ks < K)[None, :, None]
    tl.store(xhat_ptr + offs, acc.to(xhat_ptr.dtype.element_ty), mask=mask3)


@triton.jit
def _predict_bwd(dxhat_ptr, dxa_ptr, x_ptr, p_ptr, dx_ptr, dp_ptr, N, D, ROWS, K: tl.constexpr,
                 KP: tl.constexpr, ACTIVE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """A program walks ROWS rows of one column tile, keeping dP's partial sums in registers."""
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    ks = tl.arange(0, KP)
    kmask = ks < K
    pt = tl.load(p_ptr + ks[:, None] * K + ks[None, :], mask=kmask[:, None] & kmask[None, :],
                 other=0.0).to(tl.float32)                                           # P [i, j]
    acc = tl.zeros((KP, KP, BLOCK_D), dtype=tl.float32)                             # [i, j, col]
    for start in range(tl.program_id(0) * ROWS, tl.program_id(0) * ROWS + ROWS, BLOCK_N):
        rows = start + tl.arange(0, BLOCK_N)
        mask = (rows < N)[:, None] & (cols < D)[None, :]
        base = rows[:, None] * (K * D) + cols[None, :]
        offs = base[:, None, :] + ks[None, :, None] * D
        mask3 = mask[:, None, :] & kmask[None, :, None]
        g = tl.load(dxhat_ptr + offs, mask=mask3, other=0.0).to(tl.float32)        # [n, i, col]
        x = tl.load(x_ptr + offs, mask=mask3, other=0.0).to(tl.float32)            # [n, j, col]
        dxa = tl.load(dxa_ptr + rows[:, None] * D + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        dx = tl.sum(pt[None, :, :, None] * g[:, :, None, :], axis=1)              # [n, j, col]
        dx += (ks == ACTIVE).to(tl.float32)[None, :, None] * dxa[:, None, :]
        tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=mask3)
        acc += tl.sum(g[:, :, None, :] * x[:, None, :, :], axis=0)
    program = tl.program_id(0) * tl.num_programs(1) + tl.program_id(1)
    tl.store(dp_ptr + program * KP * KP + ks[:, None] * KP + ks[None, :], tl.sum(acc, axis=2))


@triton.jit
def _correct_fwd(xhat_ptr, y_ptr, g_ptr, out_ptr, N, D, K: tl.constexpr, KP: tl.constexpr,
                 ACTIVE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    rows, cols, mask = _tile(N, D, BLOCK_N, BLOCK_D)
    ks = tl.arange(0, KP)
    base = rows[:, None] * (K * D) + cols[None, :]
    offs = base[:, None, :] + ks[None, :, None] * D
    mask3 = mask[:, None, :] & (ks < K)[None, :, None]
    xhat = tl.load(xhat_ptr + offs, mask=mask3, other=0.0).to(tl.float32)
    xa = tl.load(xhat_ptr + base + ACTIVE * D, mask=mask, other=0.0).to(tl.float32)
    y = tl.load(y_ptr + rows[:, None] * D + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + ks, mask=ks < K, other=0.0).to(tl.float32)
    out = xhat + g[None, :, None] * (y - xa)[:, None, :]
    tl.store(out_ptr + offs, out.to(out_ptr.dtype.element_ty), mask=mask3)


@triton.jit
def _correct_bwd(grad_ptr, xhat_ptr, y_ptr, g_ptr, dxhat_ptr, dy_ptr, dg_ptr, N, D, ROWS, K: tl.constexpr,
                 KP: tl.constexpr, ACTIVE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """A program walks ROWS rows of one column tile, keeping dg's partial sums in registers."""
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    ks = tl.arange(0, KP)
    kmask = ks < K
    g = tl.load(g_ptr + ks, mask=kmask, other=0.0).to(tl.float32)
    acc = tl.zeros((KP, BLOCK_D), dtype=tl.float32)
    for start in range(tl.program_id(0) * ROWS, tl.program_id(0) * ROWS + ROWS, BLOCK_N):
        rows = start + tl.arange(0, BLOCK_N)
        mask = (rows < N)[:, None] & (cols < D)[None, :]
        base = rows[:, None] * (K * D) + cols[None, :]
        offs = base[:, None, :] + ks[None, :, None] * D
        mask3 = mask[:, None, :] & kmask[None, :, None]
        grad = tl.load(grad_ptr + offs, mask=mask3, other=0.0).to(tl.float32)
        xa = tl.load(xhat_ptr + base + ACTIVE * D, mask=mask, other=0.0).to(tl.float32)
        y = tl.load(y_ptr + rows[:, None] * D + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        dy = tl.sum(g[None, :, None] * grad, axis=1)
        tl.store(dy_ptr + rows[:, None] * D + cols[None, :], dy.to(dy_ptr.dtype.element_ty), mask=mask)
        dxhat = grad - (ks == ACTIVE).to(tl.float32)[None, :, None] * dy[:, None, :]
        tl.store(dxhat_ptr + offs, dxhat.to(dxhat_ptr.dtype.element_ty), mask=mask3)
        acc += tl.sum(grad * (y - xa)[:, None, :], axis=0)
    program = tl.program_id(0) * tl.num_programs(1) + tl.program_id(1)
    tl.store(dg_ptr + program * KP + ks, tl.sum(acc, axis=1))


def _grid(n: int, d: int) -> tuple[int, int]:
    return triton.cdiv(n, _BLOCK_N), triton.cdiv(d, _BLOCK_D)


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _reduction_grid(n: int, d: int, device) -> tuple[tuple[int, int], int]:
    """Backward kernels: a few programs per SM, each over a run of rows (a multiple of its tile)."""
    tiles = triton.cdiv(d, _BLOCK_D)
    chunks = max(1, _PROGRAMS_PER_SM * _sm_count(device.index) // tiles)
    rows = triton.cdiv(triton.cdiv(n, chunks), _BWD_BLOCK_N) * _BWD_BLOCK_N
    return (triton.cdiv(n, rows), tiles), rows


def _meta(k: int, active: int, block_n: int = _BLOCK_N) -> dict:
    return dict(K=k, KP=triton.next_power_of_2(k), ACTIVE=active, BLOCK_N=block_n, BLOCK_D=_BLOCK_D,
                num_warps=_WARPS)


class _Predict(torch.autograd.Function):
    @staticmethod
    def forward(ctx, stream: Tensor, coefs: Tensor, k: int, active: int):
        x = stream.contiguous()
        n, d = x.numel() // x.shape[-1], x.shape[-1] // k
        xa = x.new_empty(*x.shape[:-1], d)
        xhat = x.new_empty(*x.shape[:-1], k, d)
        _predict_fwd[_grid(n, d)](x, coefs.contiguous(), xa, xhat, n, d, **_meta(k, active))
        ctx.save_for_backward(x, coefs)
        ctx.k, ctx.active = k, active
        return xa, xhat

    @staticmethod
    def backward(ctx, dxa: Tensor, dxhat: Tensor):
        x, coefs = ctx.saved_tensors
        k, active = ctx.k, ctx.active
        n, d = x.numel() // x.shape[-1], x.shape[-1] // k
        dxa = torch.zeros_like(x[..., :d]) if dxa is None else dxa.contiguous()
        dxhat = torch.zeros_like(x) if dxhat is None else dxhat.contiguous()
        dx = torch.empty_like(x)
        grid, rows = _reduction_grid(n, d, x.device)
        kp = triton.next_power_of_2(k)
        dp = torch.empty(grid[0] * grid[1], kp, kp, dtype=torch.float32, device=x.device)
        _predict_bwd[grid](dxhat, dxa, x, coefs.contiguous(), dx, dp, n, d, rows, **_meta(k, active, _BWD_BLOCK_N))
        return dx, dp.sum(0)[:k, :k].to(coefs.dtype), None, None


class _Correct(torch.autograd.Function):
    @staticmethod
    def forward(ctx, prediction: Tensor, output: Tensor, gains: Tensor, active: int):
        xhat, y = prediction.contiguous(), output.contiguous()
        k, d = xhat.shape[-2], xhat.shape[-1]
        n = y.numel() // d
        out = xhat.new_empty(*xhat.shape[:-2], k * d)
        _correct_fwd[_grid(n, d)](xhat, y, gains.contiguous(), out, n, d, **_meta(k, active))
        ctx.save_for_backward(xhat, y, gains)
        ctx.active = active
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        xhat, y, gains = ctx.saved_tensors
        k, d = xhat.shape[-2], xhat.shape[-1]
        n = y.numel() // d
        grad = grad.contiguous()
        dxhat, dy = torch.empty_like(xhat), torch.empty_like(y)
        grid, rows = _reduction_grid(n, d, y.device)
        dg = torch.empty(grid[0] * grid[1], triton.next_power_of_2(k), dtype=torch.float32, device=y.device)
        _correct_bwd[grid](grad, xhat, y, gains.contiguous(), dxhat, dy, dg, n, d, rows, **_meta(k, ctx.active, _BWD_BLOCK_N))
        return dxhat, dy, dg.sum(0)[:k].to(gains.dtype), None


def predict(coefs: Tensor, stream: Tensor, k: int, active: int) -> tuple[Tensor, Tensor]:
    """stream [..., K*d] -> (x_active [..., d], P x [..., K, d]), as `altup_mixing._standard_predict`."""
    return _Predict.apply(stream, coefs, k, active)


def correct(gains: Tensor, prediction: Tensor, output: Tensor, active: int) -> Tensor:
    """x^ [..., K, d], y [..., d] -> x^ + g (y - x^_active) [..., K*d], as `altup_mixing._correct`."""
    return _Correct.apply(prediction, output, gains, active)
