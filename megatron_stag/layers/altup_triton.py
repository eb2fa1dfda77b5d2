"""AltUp's standard predict and correct, fused: one Triton kernel per layer forward, one backward.

Predict and correct are memory-bound: a layer's K*d stream is read and written around one d-wide
layer. Written as two steps (predict x -> x^ = P x, then correct x^ -> x'), the prediction x^ is
stored, read back and differentiated on its own: 24 passes of one block per layer at K = 2, 42 at
K = 4. Here correct recomputes the prediction from the stream in registers and also writes the next
layer's input block:

  correct   forward  x' = P x + g (y - (P x)_a),  n = x'[next]           reads K + 1,  writes K + 1
            backward G = dx' + [next] dn;  dy = g . G,  dx^ = G - [a] dy,
                     dx = P^T dx^,  dP = sum dx^ x^T,  dg = sum G (y - (P x)_a)    reads 2K + 2, writes K + 1
  predict   the layer's input is n from the layer before: no pass
(15 block passes per layer at K = 2, 25 at K = 4.) `a` is this layer's active block, `next` the next
layer's. n is a second output of the same autograd function, so its gradient reaches correct's
backward as its own tensor and is added inside the kernel (no full-size accumulation). The next
layer finds n on the stream tensor it receives (`altup_stream.written_block`; the recycled and widened
embeddings leave their d-wide blocks there too); where the stream arrives some other way (a pipeline
receive, megatron's recompute, which detaches its inputs) predict copies the block with plain torch.

The coefficient gradients are reduced per program into an fp32 buffer and summed by torch: exact
order, so runs are deterministic. Blocks are [N, K, d] with N = tokens (s*b, a sequence-parallel
slice under SP). CPU tensors take the same equations in torch (the autograd structure is then tested
without a GPU); the kernels address with 32-bit offsets (callers keep streams < 2^31 elements).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor

from megatron_stag.layers.altup_stream import with_written_blocks, written_block

_BLOCK_N, _BLOCK_D, _WARPS = 16, 128, 4
MAX_BLOCKS = 8
_BWD_COLUMNS = {1: 1024, 2: 1024, 4: 1024, 8: 256}  # KP -> backward tile width (fp32 K x K x width accumulators)
_PROGRAMS_PER_SM = 16


@triton.jit
def _mix_correct_fwd(x_ptr, y_ptr, p_ptr, g_ptr, out_ptr, next_ptr, N, D, K: tl.constexpr, KP: tl.constexpr,
                     ACTIVE: tl.constexpr, NEXT: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask = (rows < N)[:, None] & (cols < D)[None, :]
    ks = tl.arange(0, KP)
    base = rows[:, None] * (K * D) + cols[None, :]                       # [BN, BD], block 0
    pred = tl.zeros((BLOCK_N, KP, BLOCK_D), dtype=tl.float32)
    pred_a = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    for j in tl.static_range(K):
        xj = tl.load(x_ptr + base + j * D, mask=mask, other=0.0).to(tl.float32)
        pj = tl.load(p_ptr + ks * K + j, mask=ks < K, other=0.0).to(tl.float32)   # P[:, j]
        pred += pj[None, :, None] * xj[:, None, :]
        pred_a += tl.load(p_ptr + ACTIVE * K + j).to(tl.float32) * xj
    y = tl.load(y_ptr + rows[:, None] * D + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + ks, mask=ks < K, other=0.0).to(tl.float32)
    out = (pred + g[None, :, None] * (y - pred_a)[:, None, :]).to(out_ptr.dtype.element_ty)
    offs = base[:, None, :] + ks[None, :, None] * D
    mask3 = mask[:, None, :] & (ks < K)[None, :, None]
    tl.store(out_ptr + offs, out, mask=mask3)
    nxt = tl.sum(tl.where((ks == NEXT)[None, :, None], out.to(tl.float32), 0.0), axis=1)
    tl.store(next_ptr + rows[:, None] * D + cols[None, :], nxt.to(next_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _mix_correct_bwd(grad_ptr, dnext_ptr, x_ptr, y_ptr, p_ptr, g_ptr, dx_ptr, dy_ptr, part_ptr, N, D, ROWS,
                     K: tl.constexpr, KP: tl.constexpr, ACTIVE: tl.constexpr, NEXT: tl.constexpr,
                     HAS_NEXT: tl.constexpr, BLOCK_D: tl.constexpr):
    """A program walks ROWS rows of one wide column tile, one row per step. dP's and dg's partial sums
    stay elementwise in registers and are reduced once at the end: a reduction over several rows per
    step (a cross-warp exchange) measured 1.15x (K = 2) and 1.3x (K = 4) slower."""
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    ks = tl.arange(0, KP)
    kmask = ks < K
    pt = tl.load(p_ptr + ks[:, None] * K + ks[None, :], mask=kmask[:, None] & kmask[None, :],
                 other=0.0).to(tl.float32)                                           # P [i, j]
    pa = tl.load(p_ptr + ACTIVE * K + ks, mask=kmask, other=0.0).to(tl.float32)     # P [a, j]
    g = tl.load(g_ptr + ks, mask=kmask, other=0.0).to(tl.float32)
    is_active = (ks == ACTIVE).to(tl.float32)
    acc_p = tl.zeros((KP, KP, BLOCK_D), dtype=tl.float32)                           # [i, j, col]
    acc_g = tl.zeros((KP, BLOCK_D), dtype=tl.float32)
    cmask = cols < D
    mask2 = kmask[:, None] & cmask[None, :]
    for row in range(tl.program_id(0) * ROWS, tl.minimum(tl.program_id(0) * ROWS + ROWS, N)):
        offs = row * (K * D) + ks[:, None] * D + cols[None, :]                     # [k, col]
        grad = tl.load(grad_ptr + offs, mask=mask2, other=0.0).to(tl.float32)     # [i, col]
        if HAS_NEXT:
            dnext = tl.load(dnext_ptr + row * D + cols, mask=cmask, other=0.0).to(tl.float32)
            grad += (ks == NEXT).to(tl.float32)[:, None] * dnext[None, :]
        x = tl.load(x_ptr + offs, mask=mask2, other=0.0).to(tl.float32)            # [j, col]
        y = tl.load(y_ptr + row * D + cols, mask=cmask, other=0.0).to(tl.float32)
        innovation = y - tl.sum(pa[:, None] * x, axis=0)                           # y - (P x)_a
        dy = tl.sum(g[:, None] * grad, axis=0)
        tl.store(dy_ptr + row * D + cols, dy.to(dy_ptr.dtype.element_ty), mask=cmask)
        dpred = grad - is_active[:, None] * dy[None, :]                            # [i, col]
        dx = tl.sum(pt[:, :, None] * dpred[:, None, :], axis=0)                   # [j, col]
        tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=mask2)
        acc_p += dpred[:, None, :] * x[None, :, :]
        acc_g += grad * innovation[None, :]
    part = part_ptr + (tl.program_id(0) * tl.num_programs(1) + tl.program_id(1)) * (KP * KP + KP)
    tl.store(part + ks[:, None] * KP + ks[None, :], tl.sum(acc_p, axis=2))
    tl.store(part + KP * KP + ks, tl.sum(acc_g, axis=1))


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _backward_launch(n: int, d: int, kp: int, device) -> tuple[tuple[int, int], int, int]:
    """A few programs per SM, each over a run of rows; columns as wide as the registers allow."""
    block_d = min(_BWD_COLUMNS[kp], triton.next_power_of_2(d))
    tiles = triton.cdiv(d, block_d)
    chunks = max(1, _PROGRAMS_PER_SM * _sm_count(device.index) // tiles)
    rows = triton.cdiv(n, chunks)
    return (triton.cdiv(n, rows), tiles), rows, block_d


def _reference(x: Tensor, y: Tensor, p: Tensor, g: Tensor, active: int):
    """The kernels' prediction and innovation in torch (fp32), for CPU tensors: x [N, K, d], y [N, d]."""
    x, y, p, g = x.float(), y.float(), p.float(), g.float()
    pred = torch.einsum("ij,njd->nid", p, x)
    return pred, y - pred[:, active]


class _MixCorrect(torch.autograd.Function):
    @staticmethod
    def forward(ctx, output: Tensor, coefs: Tensor, gains: Tensor, stream: Tensor, k: int, active: int,
                next_block: int):
        x, y = stream.contiguous(), output.contiguous()
        d = y.shape[-1]
        n = y.numel() // d
        if x.is_cuda:
            out, nxt = torch.empty_like(x), torch.empty_like(y)
            grid = (triton.cdiv(n, _BLOCK_N), triton.cdiv(d, _BLOCK_D))
            _mix_correct_fwd[grid](x, y, coefs.contiguous(), gains.contiguous(), out, nxt, n, d, K=k,
                                   KP=triton.next_power_of_2(k), ACTIVE=active, NEXT=next_block,
                                   BLOCK_N=_BLOCK_N, BLOCK_D=_BLOCK_D, num_warps=_WARPS)
        else:
            pred, innovation = _reference(x.view(n, k, d), y.view(n, d), coefs, gains, active)
            out = (pred + gains.float()[:, None] * innovation[:, None]).to(x.dtype)
            nxt = out[:, next_block].reshape(y.shape)
            out = out.reshape(x.shape)
        ctx.save_for_backward(x, y, coefs, gains)
        ctx.k, ctx.active, ctx.next_block = k, active, next_block
        ctx.set_materialize_grads(False)
        return out, nxt

    @staticmethod
    def backward(ctx, grad: Tensor | None, dnext: Tensor | None):
        x, y, coefs, gains = ctx.saved_tensors
        k, active, next_block = ctx.k, ctx.active, ctx.next_block
        d = y.shape[-1]
        n = y.numel() // d
        grad = torch.zeros_like(x) if grad is None else grad.contiguous()
        if x.is_cuda:
            dx, dy = torch.empty_like(x), torch.empty_like(y)
            kp = triton.next_power_of_2(k)
            grid, rows, block_d = _backward_launch(n, d, kp, x.device)
            part = torch.empty(grid[0] * grid[1], kp * kp + kp, dtype=torch.float32, device=x.device)
            _mix_correct_bwd[grid](grad, grad if dnext is None else dnext.contiguous(), x, y, coefs.contiguous(),
                                   gains.contiguous(), dx, dy, part, n, d, rows, K=k, KP=kp, ACTIVE=active,
                                   NEXT=next_block, HAS_NEXT=dnext is not None, BLOCK_D=block_d, num_warps=_WARPS)
            part = part.sum(0)
            dp, dg = part[:kp * kp].view(kp, kp)[:k, :k], part[kp * kp:kp * kp + k]
        else:
            g3 = grad.view(n, k, d).to(torch.float32, copy=True)
            if dnext is not None:
                g3[:, next_block] += dnext.reshape(n, d).float()
            pred, innovation = _reference(x.view(n, k, d), y.view(n, d), coefs, gains, active)
            dy = torch.einsum("i,nid->nd", gains.float(), g3)
            dpred = g3.clone()
            dpred[:, active] -= dy
            dx = torch.einsum("ij,nid->njd", coefs.float(), dpred).to(x.dtype).reshape(x.shape)
            dp = torch.einsum("nid,njd->ij", dpred, x.view(n, k, d).float())
            dg = torch.einsum("nid,nd->i", g3, innovation)
            dy = dy.to(y.dtype).reshape(y.shape)
        return dy, dp.to(coefs.dtype), dg.to(gains.dtype), dx, None, None, None


@dataclass
class Predicted:
    """What `predict` hands to `correct`: the stream (correct recomputes the prediction from it)."""

    stream: Tensor
    coefs: Tensor


def predict(coefs: Tensor, stream: Tensor, k: int, active: int) -> tuple[Tensor, Predicted]:
    """stream [..., K*d] -> (x_active [..., d], the state `correct` needs)."""
    layer_input = written_block(stream, active)
    if layer_input is None:
        d = stream.shape[-1] // k
        layer_input = stream.narrow(-1, active * d, d).contiguous()
    return layer_input, Predicted(stream, coefs)


def correct(gains: Tensor, predicted: Predicted, output: Tensor, active: int, next_block: int) -> Tensor:
    """y [..., d] -> P x + g (y - (P x)_active) [..., K*d], as `altup_mixing._correct` after
    `altup_mixing._standard_predict`; the stream carries its block `next_block` for the next predict."""
    k = predicted.stream.shape[-1] // output.shape[-1]
    out, nxt = _MixCorrect.apply(output, predicted.coefs, gains, predicted.stream, k, active, next_block)
    return with_written_blocks(out, {next_block: nxt})
