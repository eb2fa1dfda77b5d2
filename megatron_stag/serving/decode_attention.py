"""The decode step's attention (one query per row) as a Triton flash-decoding kernel that reads only
the cache slots the step attends to.

A decode cache holds `max_len` slots and a step at position p reads p + 1 of them (or a window's).
SDPA with a boolean mask (cuDNN on an H200) streams every slot and, around each layer's call, runs
kernels of its own that convert the mask and lay out the query. Here each program takes a row's
query head (`_head_kernel`) or, where query heads share a kv head, the whole group (`_group_kernel`), and
a split of the slots (enough splits that a batch-1 step fills the GPU); it loads the mask's bytes for a
block of 64 slots and the keys and values of the kept slots only (a block with none kept costs its mask
bytes), and keeps a running softmax in fp32; a second small kernel combines the splits. The grouped
form multiplies a block with all the group's queries at once as the rows of a tensor-core product
(padded to 16), so it reads each kv head once where one program per query head read it G times: the
Llama 3.2 1B shape's 16 layers of attention at b=1, 0.103 -> 0.061 ms; in the engine, on an H100, its
b=1 step 0.990 -> 0.955 ms/token and, with its b=8 steps on the kernel instead of SDPA, 1.383 -> 1.352.
For full heads the grouped form multiplies one row and loses in the engine (GPT b=1 1.112 -> 1.122), so
they keep the fp32 per-head form (results/decode_attention_grouped_h100.json).
Both launch with programmatic dependent launch, like the GEMV (`serving/gemv.py`); the combine lets
the next kernel (the out-projection's GEMV) launch before it waits, so that kernel's weight loads are
in flight while the attention finishes (GPT b=1 0.942 -> 0.907 ms/token; letting every GEMV or the
split kernel do the same moved nothing, an L2 prefetch of the next weights from the split kernel
lost: 0.943 -> 0.979 for the out-projection's alone, as its bytes queued ahead of the cache reads).
The mask is any boolean [b, 1, 1, slots], so causal caches, cross-attention rings and windows all take
this path.
On an H200 it halves a b=1 step's attention (24 layers: 0.150 against SDPA's 0.331 ms; GPT 1.254 ->
1.165 ms/token). Steps of more than ROWS kv heads (batch x kv heads) take a large form whose loads
Triton pipelines (see ROWS below): there grouped queries stay on the kernel, while full heads take SDPA,
which picks cuDNN and is as fast, up to CACHED_ROWS; above it a self-attention step is the kernel's
again (GPT b=32 2.725 -> 2.659 ms/token on an H100) and a cross-attention step stays on cuDNN (`takes`;
docs/decode-engine.md). cuDNN's one-query attention is not run-to-run deterministic; its deterministic
memory-efficient kernel costs 25-36% of the step, and the engine's deterministic mode
(`attention(deterministic=True)`) keeps every step here instead (on an H100, with the default's compile
options, GPT b=8 1.658 against cuDNN's 1.648 ms/token; docs/decode-engine.md).

A step's self-attention (`cached_attention`) also applies the rotary embedding and writes the new key
and value into the cache, so no kernel sits between it and the q/k/v GEMV: each program loads its first
block of cached keys and values (slots <= the row's position, written by earlier steps) before it waits
for the GEMV, and uses the new key and value for the row's own slot. GPT b=1 1.019 -> 0.999 ms/token,
StagFormer p=2 1.041 -> 1.033, window 1 0.982 -> 0.950, AltUp 1.077 -> 1.057; at 4 rows even
(results/decode_step_ablations_h200.json)."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from megatron_stag.serving.model import attention as reference
from megatron_stag.serving.model import cached_attention as reference_cached

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only torch: attention stays on SDPA
    triton = None

BLOCK = 64  # slots per loop iteration
PROGRAMS = 256  # query heads x splits a small step aims for (about two per SM on an H200)
# small grouped-query steps: kv heads x splits, at most GROUP_SPLITS splits (the combine holds them all in
# registers). 16 layers of the Llama 3.2 1B shape's attention, 768 slots, on an H100: b=8 0.169 / 0.144 /
# 0.143 ms at 256 / 1024 / 4096 (results/decode_attention_grouped_h100.json)
GROUP_PROGRAMS = 4096
GROUP_SPLITS = 32
WARPS = 4
# Steps of more than ROWS kv heads (batch x kv heads) take the large form: a block's loads unconditional
# (masked by keep; in a full head's self-attention step by position) and pipelined LARGE_STAGES deep, the
# row's own slot outside the loop, which stops at the position, and LARGE_PROGRAMS heads (or kv heads) x
# splits. GPT b=32's 24 layers of self-attention (601 of 640 slots, 1xH100) 1.73 -> 1.51 ms against the small
# form, 1.20x their floor; 3 stages 2.06, 1024 programs 1.62. Grouped queries take the kernel at every size
# (the Llama shape's b=32 1.393 -> 1.377 in one process; results/decode_attention_large_h100.json). Full heads
# take SDPA (cuDNN) from ROWS up to CACHED_ROWS, and above it only the cross-attention does: with every
# attention on the kernel (2 warps) the engine lost every b=8 row (GPT 0.6%, StagFormer p=2 6.0%; one compile
# each, decode_full_head_routing_h100.json), and at b=32, in both orders and two processes on one H100
# (results/decode_full_head_routing_b32_h100.json), won GPT 2.4%, AltUp 3.1%, window 1 1.3%, shared 0.5%
# and lost StagFormer p=2 separate 0.9%, the one row with long cross-attention, whose large form loads
# its slots masked rather than stopping at the position. With its cross-attention on cuDNN that row is even
# (3.435 -> 3.432 ms). Steps between 256 and 512 rows, recurrent decoding and any H200 are not measured. `takes`
ROWS = 64
CACHED_ROWS = 256
LARGE_STAGES = 2
LARGE_PROGRAMS = 512
# a full head's large form on 2 warps: GPT b=32's 24 layers of self-attention 1.742 -> 1.521 ms (floor 1.348,
# 1xH100); the grouped form keeps 4 (0.337 ms on the Llama shape's 16 layers; 2 warps 0.367, 8 0.360, BLOCK 32
# or 128 0.36-0.42; results/decode_attention_large_block_warps_h100.json)
HEAD_LARGE_WARPS = 2

if triton is not None:
    @triton.jit
    def _rotated(ptr, cos_ptr, sin_ptr, d, ROT: tl.constexpr):
        """A head vector (fp32) with megatron's non-interleaved rotary embedding on its first ROT dims."""
        x = tl.load(ptr + d).to(tl.float32)
        if ROT:
            half: tl.constexpr = ROT // 2
            rot = d < ROT
            partner = tl.load(ptr + tl.where(d < half, d + half, d - half), mask=rot, other=0.0).to(tl.float32)
            cos = tl.load(cos_ptr + d, mask=rot, other=1.0)
            sin = tl.load(sin_ptr + d, mask=rot, other=0.0)
            x = x * cos + tl.where(d < half, -partner, partner) * sin
        return x

    @triton.jit
    def _kept(k_base, v_base, s, d, k_ss, v_ss, kept):
        """The keys and values of slots s where `kept` (the rest read as 0)."""
        return (tl.load(k_base + s[:, None] * k_ss + d[None, :], mask=kept[:, None], other=0.0),
                tl.load(v_base + s[:, None] * v_ss + d[None, :], mask=kept[:, None], other=0.0))

    @triton.jit
    def _near(k_base, v_base, s, d, pos, S, k_ss, v_ss):
        """The keys and values of slots s up to the row's position (the rest read as 0)."""
        return _kept(k_base, v_base, s, d, k_ss, v_ss, (s <= pos) & (s < S))

    @triton.jit
    def _mask(keep_row, keep_ss, s, S):
        """Which of slots s the row attends to (none past the cache)."""
        return tl.load(keep_row + s * keep_ss, mask=s < S, other=0) != 0

    @triton.jit
    def _own_slot(keep_row, keep_ss, pos, first, SPLIT, S):
        """Whether this split holds the row's position and the mask keeps it."""
        inside = (pos >= first) & (pos < first + SPLIT) & (pos < S)
        return inside & (tl.load(keep_row + pos * keep_ss, mask=inside, other=0) != 0)

    @triton.jit
    def _head_update(q, k, v, keep, m, total, acc):
        """The running softmax (max m, sum total, weighted values acc) after one block of kept slots, for
        one query (q scaled). A block with none kept leaves it as it was."""
        scores = tl.where(keep, tl.sum(k.to(tl.float32) * q[None, :], 1), float("-inf"))
        m_new = tl.maximum(m, tl.max(scores, 0))
        shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp(m - shift)
        p = tl.exp(scores - shift)
        return m_new, total * alpha + tl.sum(p, 0), acc * alpha + tl.sum(p[:, None] * v.to(tl.float32), 0)

    @triton.jit
    def _group_update(q, k, v, keep, m, total, acc, scale, IEEE: tl.constexpr):
        """`_head_update` for a group's queries as the rows of tensor-core products (fp32 ones with IEEE)."""
        if IEEE:
            scores = tl.dot(q, tl.trans(k.to(tl.float32)), input_precision="ieee")
        else:
            scores = tl.dot(q, tl.trans(k))
        scores = tl.where(keep[None, :], scores * scale, float("-inf"))
        m_new = tl.maximum(m, tl.max(scores, 1))
        shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp(m - shift)
        p = tl.exp(scores - shift[:, None])
        if IEEE:
            acc = acc * alpha[:, None] + tl.dot(p, v.to(tl.float32), input_precision="ieee")
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        return m_new, total * alpha + tl.sum(p, 1), acc

    @triton.jit
    def _head_kernel(q_ptr, k_ptr, v_ptr, keep_ptr, o_ptr, part_ptr, nk_ptr, nv_ptr, pos_ptr, cos_ptr, sin_ptr,
                      S, scale, q_sb, q_sh, k_sb, k_sh, k_ss, v_sb, v_sh, v_ss, keep_sb, keep_ss, nk_sb, nk_sh,
                      nv_sb, nv_sh, rope_sb, H: tl.constexpr, G: tl.constexpr, HD: tl.constexpr,
                      BLOCK: tl.constexpr, SPLIT: tl.constexpr, SPLITS: tl.constexpr, PDL: tl.constexpr,
                      WRITE: tl.constexpr, ROT: tl.constexpr, STAGES: tl.constexpr):
        """Program (row and query head, split), fp32 products: one head's keys are reused by nothing else,
        so tensor cores would multiply one row (the grouped kernel's form lost here: GPT b=1 1.112 -> 1.122
        ms/token on an H100). With WRITE, q and this step's key and value come unrotated (nk,
        nv): the program rotates them, the split holding the row's position stores them in the cache
        (one program per kv head), and every program uses them for that slot whatever the cache held."""
        bh = tl.program_id(0)
        split = tl.program_id(1)
        b = bh // H
        h = bh % H
        d = tl.arange(0, HD)
        first = split * SPLIT
        k_base = k_ptr + b * k_sb + (h // G) * k_sh
        v_base = v_ptr + b * v_sb + (h // G) * v_sh
        if WRITE:  # before the wait: earlier steps wrote positions and the cache's slots (a PDL kernel,
            # ours or inductor's, lets its dependents start only after its own wait, and the combine, which
            # does so before its wait, starts only after this kernel's: every kernel three back has ended here)
            pos = tl.load(pos_ptr + b)
            if not STAGES:
                k, v = _near(k_base, v_base, first + tl.arange(0, BLOCK), d, pos, S, k_ss, v_ss)
        if PDL:  # q (and this step's key and value, or slot) come from the previous kernel
            tl.extra.cuda.gdc_wait()
            tl.extra.cuda.gdc_launch_dependents()
        if WRITE:
            q = _rotated(q_ptr + b * q_sb + h * q_sh, cos_ptr + b * rope_sb, sin_ptr + b * rope_sb, d, ROT) * scale
            new_k = _rotated(nk_ptr + b * nk_sb + (h // G) * nk_sh, cos_ptr + b * rope_sb, sin_ptr + b * rope_sb, d, ROT)
            new_v = tl.load(nv_ptr + b * nv_sb + (h // G) * nv_sh + d).to(tl.float32)
            if (h % G == 0) & (pos >= first) & (pos < first + SPLIT) & (pos < S):  # never past the cache
                tl.store(k_base + pos * k_ss + d, new_k.to(k_ptr.dtype.element_ty))
                tl.store(v_base + pos * v_ss + d, new_v.to(v_ptr.dtype.element_ty))
            new_k, new_v = new_k.to(k_ptr.dtype.element_ty), new_v.to(v_ptr.dtype.element_ty)
        else:
            q = tl.load(q_ptr + b * q_sb + h * q_sh + d).to(tl.float32) * scale
        m = tl.max(tl.full([BLOCK], float("-inf"), tl.float32), 0)
        total = tl.sum(tl.zeros([BLOCK], tl.float32), 0)
        acc = tl.zeros([HD], tl.float32)
        if STAGES:  # every block's loads unconditional (masked), so Triton pipelines them STAGES deep
            stop = first + SPLIT
            if WRITE:  # the row's own slot starts the softmax and the blocks skip it: no select per block;
                # a self-attention cache's mask keeps no slot past the position, so the loop stops there
                stop = tl.minimum(stop, pos + 1).to(tl.int32)
                mine = _own_slot(keep_ptr + b * keep_sb, keep_ss, pos, first, SPLIT, S)
                m = tl.where(mine, tl.sum(new_k.to(tl.float32) * q, 0), m)
                total = tl.where(mine, 1.0, total)
                acc = tl.where(mine, new_v.to(tl.float32), acc)
            for start in tl.range(first, stop, BLOCK, num_stages=STAGES):
                s = start + tl.arange(0, BLOCK)
                keep = _mask(keep_ptr + b * keep_sb, keep_ss, s, S)
                if WRITE:  # loads by position, not by the mask's bytes, so they wait on no other load: GPT
                    # --deterministic b=8 1.760 -> 1.742, b=32 2.774 -> 2.737 ms/token on an H100; the grouped
                    # form lost 0.4% (results/decode_attention_loads_by_position_h100.json)
                    keep = keep & (s != pos)
                    k, v = _near(k_base, v_base, s, d, pos, S, k_ss, v_ss)
                    v = tl.where(keep[:, None], v, tl.zeros_like(v))
                else:
                    k, v = _kept(k_base, v_base, s, d, k_ss, v_ss, keep)
                m, total, acc = _head_update(q, k, v, keep, m, total, acc)
        else:
            for start in range(first, first + SPLIT, BLOCK):
                s = start + tl.arange(0, BLOCK)
                keep = _mask(keep_ptr + b * keep_sb, keep_ss, s, S)
                if WRITE:
                    if start > first:  # the first block was loaded before the wait
                        k, v = _near(k_base, v_base, s, d, pos, S, k_ss, v_ss)
                    own = (s == pos)[:, None]
                    k = tl.where(own, new_k[None, :], k)
                    # a slot the mask drops gives value 0 beside its -inf score, whatever it holds (NaN even)
                    v = tl.where(own, new_v[None, :], tl.where(keep[:, None], v, tl.zeros_like(v)))
                if tl.max(keep.to(tl.int32), 0) > 0:  # a block past the filled slots costs its mask bytes only
                    if not WRITE:
                        k, v = _kept(k_base, v_base, s, d, k_ss, v_ss, keep)
                    m, total, acc = _head_update(q, k, v, keep, m, total, acc)
        if SPLITS == 1:
            tl.store(o_ptr + b * H * HD + h * HD + d, (acc / total).to(o_ptr.dtype.element_ty))
        else:  # [acc, max, sum] per split; a split with no kept slot leaves max -inf, sum 0
            base = part_ptr + (bh * SPLITS + split) * (HD + 2)
            tl.store(base + d, acc)
            tl.store(base + HD, m)
            tl.store(base + HD + 1, total)

    @triton.jit
    def _rotated_rows(ptr, rows, row_stride, live, cos_ptr, sin_ptr, d, ROT: tl.constexpr):
        """Head vectors [rows, HD] (fp32) with megatron's non-interleaved rotary embedding on their first ROT
        dims; rows where `live` is false read as 0."""
        at = ptr + rows[:, None] * row_stride
        x = tl.load(at + d[None, :], mask=live[:, None], other=0.0).to(tl.float32)
        if ROT:
            half: tl.constexpr = ROT // 2
            rot = d < ROT
            partner = tl.load(at + tl.where(d < half, d + half, d - half)[None, :], mask=live[:, None] & rot[None, :],
                              other=0.0).to(tl.float32)
            cos = tl.load(cos_ptr + d, mask=rot, other=1.0)
            sin = tl.load(sin_ptr + d, mask=rot, other=0.0)
            x = x * cos[None, :] + tl.where((d < half)[None, :], -partner, partner) * sin[None, :]
        return x

    @triton.jit
    def _group_kernel(q_ptr, k_ptr, v_ptr, keep_ptr, o_ptr, part_ptr, nk_ptr, nv_ptr, pos_ptr, cos_ptr, sin_ptr,
                      S, scale, q_sb, q_sh, k_sb, k_sh, k_ss, v_sb, v_sh, v_ss, keep_sb, keep_ss, nk_sb, nk_sh,
                      nv_sb, nv_sh, rope_sb, KVH: tl.constexpr, G: tl.constexpr, GP: tl.constexpr,
                      HD: tl.constexpr, BLOCK: tl.constexpr, SPLIT: tl.constexpr, SPLITS: tl.constexpr,
                      PDL: tl.constexpr, WRITE: tl.constexpr, ROT: tl.constexpr, IEEE: tl.constexpr,
                      STAGES: tl.constexpr):
        """Program (row and kv head, split) of grouped-query attention: the group's G query heads as the
        rows of one tensor-core product (padded to GP), so the split's keys and values are read once for
        all of them (one program per query head read them G times). With WRITE,
        q and this step's key and value come unrotated (nk, nv): the program rotates them, the split
        holding the row's position stores them in the cache, and every split uses them for that slot
        whatever the cache held. IEEE: fp32 products (Triton's interpreter multiplies bf16 wrongly)."""
        bk = tl.program_id(0)
        split = tl.program_id(1)
        b = bk // KVH
        kh = bk % KVH
        g = tl.arange(0, GP)
        live = g < G
        d = tl.arange(0, HD)
        first = split * SPLIT
        k_base = k_ptr + b * k_sb + kh * k_sh
        v_base = v_ptr + b * v_sb + kh * v_sh
        if WRITE:  # before the wait: earlier steps wrote positions and the cache's slots (a PDL kernel,
            # ours or inductor's, lets its dependents start only after its own wait, and the combine, which
            # does so before its wait, starts only after this kernel's: every kernel three back has ended here)
            pos = tl.load(pos_ptr + b)
            if not STAGES:
                k, v = _near(k_base, v_base, first + tl.arange(0, BLOCK), d, pos, S, k_ss, v_ss)
        if PDL:  # q (and this step's key and value, or slot) come from the previous kernel
            tl.extra.cuda.gdc_wait()
            tl.extra.cuda.gdc_launch_dependents()
        heads = kh * G + g
        if WRITE:
            q = _rotated_rows(q_ptr + b * q_sb, heads, q_sh, live, cos_ptr + b * rope_sb, sin_ptr + b * rope_sb, d, ROT)
            new_k = _rotated(nk_ptr + b * nk_sb + kh * nk_sh, cos_ptr + b * rope_sb, sin_ptr + b * rope_sb, d,
                             ROT).to(k_ptr.dtype.element_ty)
            new_v = tl.load(nv_ptr + b * nv_sb + kh * nv_sh + d).to(v_ptr.dtype.element_ty)
            if (pos >= first) & (pos < first + SPLIT) & (pos < S):  # never past the cache
                tl.store(k_base + pos * k_ss + d, new_k)
                tl.store(v_base + pos * v_ss + d, new_v)
        else:
            q = tl.load(q_ptr + b * q_sb + heads[:, None] * q_sh + d[None, :], mask=live[:, None], other=0.0)
        q = q.to(tl.float32) if IEEE else q.to(k_ptr.dtype.element_ty)
        m = tl.full([GP], float("-inf"), tl.float32)
        total = tl.zeros([GP], tl.float32)
        acc = tl.zeros([GP, HD], tl.float32)
        if STAGES:  # every block's loads unconditional (masked by keep), so Triton pipelines them STAGES deep
            stop = first + SPLIT
            if WRITE:  # the row's own slot starts the softmax and the blocks skip it: no select per block;
                # a self-attention cache's mask keeps no slot past the position, so the loop stops there
                stop = tl.minimum(stop, pos + 1).to(tl.int32)
                mine = _own_slot(keep_ptr + b * keep_sb, keep_ss, pos, first, SPLIT, S)
                m = tl.where(mine, tl.sum(q.to(tl.float32) * new_k.to(tl.float32)[None, :], 1) * scale, m)
                total = tl.where(mine, 1.0, total)
                acc = tl.where(mine, new_v.to(tl.float32)[None, :] + acc, acc)
            for start in tl.range(first, stop, BLOCK, num_stages=STAGES):
                s = start + tl.arange(0, BLOCK)
                keep = _mask(keep_ptr + b * keep_sb, keep_ss, s, S)
                if WRITE:
                    keep = keep & (s != pos)
                k, v = _kept(k_base, v_base, s, d, k_ss, v_ss, keep)
                m, total, acc = _group_update(q, k, v, keep, m, total, acc, scale, IEEE)
        else:
            for start in range(first, first + SPLIT, BLOCK):
                s = start + tl.arange(0, BLOCK)
                keep = _mask(keep_ptr + b * keep_sb, keep_ss, s, S)
                if WRITE:
                    if start > first:  # the first block was loaded before the wait
                        k, v = _near(k_base, v_base, s, d, pos, S, k_ss, v_ss)
                    own = (s == pos)[:, None]
                    k = tl.where(own, new_k[None, :], k)
                    # a slot the mask drops gives value 0 beside its -inf score, whatever it holds (NaN even)
                    v = tl.where(own, new_v[None, :], tl.where(keep[:, None], v, tl.zeros_like(v)))
                if tl.max(keep.to(tl.int32), 0) > 0:  # a block past the filled slots costs its mask bytes only
                    if not WRITE:
                        k, v = _kept(k_base, v_base, s, d, k_ss, v_ss, keep)
                    m, total, acc = _group_update(q, k, v, keep, m, total, acc, scale, IEEE)
        bh = bk * G + g  # the query head's index over the batch: b * heads + kh * G + g
        if SPLITS == 1:
            tl.store(o_ptr + bh[:, None] * HD + d[None, :], (acc / total[:, None]).to(o_ptr.dtype.element_ty),
                     mask=live[:, None])
        else:  # [acc, max, sum] per split; a split with no kept slot leaves max -inf, sum 0
            base = part_ptr + (bh * SPLITS + split) * (HD + 2)
            tl.store(base[:, None] + d[None, :], acc, mask=live[:, None])
            tl.store(base + HD, m, mask=live)
            tl.store(base + HD + 1, total, mask=live)

    @triton.jit
    def _combine_kernel(part_ptr, o_ptr, HD: tl.constexpr, SPLITS: tl.constexpr, SPLITS_P2: tl.constexpr,
                        PDL: tl.constexpr):
        bh = tl.program_id(0)
        sp = tl.arange(0, SPLITS_P2)
        d = tl.arange(0, HD)
        if PDL:  # the out-projection may launch now: its weight loads then overlap the attention
            tl.extra.cuda.gdc_launch_dependents()
            tl.extra.cuda.gdc_wait()
        base = part_ptr + bh * SPLITS * (HD + 2) + sp * (HD + 2)
        ms = tl.load(base + HD, mask=sp < SPLITS, other=float("-inf"))
        weights = tl.exp(ms - tl.max(ms, 0))
        total = tl.sum(weights * tl.load(base + HD + 1, mask=sp < SPLITS, other=0.0), 0)
        acc = tl.load(base[:, None] + d[None, :], mask=(sp < SPLITS)[:, None], other=0.0)
        tl.store(o_ptr + bh * HD + d, (tl.sum(weights[:, None] * acc, 0) / total).to(o_ptr.dtype.element_ty))


def _splits(rows: int, slots: int, programs: int, most: Optional[int] = None) -> tuple[int, int]:
    """(slots per split, splits): splits of whole blocks (at most `most`), enough that `rows` programs'
    worth of heads x splits ~ `programs`."""
    blocks = triton.cdiv(slots, BLOCK)
    per = triton.cdiv(blocks, min(blocks, most or blocks, max(1, programs // rows)))
    return per * BLOCK, triton.cdiv(blocks, per)


def decode_attention(q: Tensor, keys: Tensor, values: Tensor, keep: Tensor, pdl: bool = True,
                     new: Optional[tuple[Tensor, Tensor, Tensor, Optional[Tensor], Optional[Tensor]]] = None
                     ) -> Tensor:
    """Attention of one query per row, q [b, heads, 1, hd], over keys and values [b, kv heads, slots, hd]
    (any strides with the last one 1), slots where keep [b, 1, 1, slots] (bool): [b, 1, heads * hd].
    With `new` = (k, v [b, kv heads, 1, hd], positions [b], cos, sin [b, rot] or None), q and k come
    unrotated: the step's rotary embedding is applied here and k, v are written into the cache at
    `positions` (< slots) first. `pdl` needs Hopper or later."""
    b, heads, _, hd = q.shape
    kv_heads, slots = keys.shape[1], keys.shape[2]
    group, large = heads // kv_heads, b * kv_heads > ROWS
    if large:
        split, splits = _splits(b * kv_heads, slots, LARGE_PROGRAMS)
    elif group > 1:
        split, splits = _splits(b * kv_heads, slots, GROUP_PROGRAMS, GROUP_SPLITS)
    else:
        split, splits = _splits(b * heads, slots, PROGRAMS)
    out = torch.empty(b, 1, heads * hd, dtype=q.dtype, device=q.device)
    part = torch.empty(b * heads * splits * (hd + 2), dtype=torch.float32, device=q.device) if splits > 1 else out
    extra = dict(launch_pdl=True) if pdl else {}
    nk, nv, pos, cos, sin = new if new is not None else (q, q, q, None, None)
    rot = cos.shape[-1] if cos is not None else 0
    args = (q, keys, values, keep, out, part, nk, nv, pos, cos if rot else q, sin if rot else q, slots, hd ** -0.5,
            q.stride(0), q.stride(1), keys.stride(0), keys.stride(1), keys.stride(2), values.stride(0),
            values.stride(1), values.stride(2), keep.stride(0), keep.stride(3), nk.stride(0), nk.stride(1),
            nv.stride(0), nv.stride(1), cos.stride(0) if rot else 0)
    shared = dict(HD=hd, BLOCK=BLOCK, SPLIT=split, SPLITS=splits, PDL=pdl, WRITE=new is not None, ROT=rot,
                  STAGES=LARGE_STAGES if large else 0, **extra)
    if group > 1:
        _group_kernel[(b * kv_heads, splits)](*args, KVH=kv_heads, G=group, GP=max(16, triton.next_power_of_2(group)),
                                              IEEE=not q.is_cuda, num_warps=WARPS, **shared)
    else:
        _head_kernel[(b * heads, splits)](*args, H=heads, G=1, num_warps=HEAD_LARGE_WARPS if large else WARPS,
                                          **shared)
    if splits > 1:
        _combine_kernel[(b * heads,)](part, out, HD=hd, SPLITS=splits, SPLITS_P2=triton.next_power_of_2(splits),
                                      PDL=pdl, num_warps=WARPS, **extra)
    return out


@torch.library.custom_op("megatron_stag::decode_attention", mutates_args=())
def _attention_op(q: Tensor, keys: Tensor, values: Tensor, keep: Tensor) -> Tensor:
    return decode_attention(q, keys, values, keep, pdl=q.is_cuda)  # not on CPU tensors (the interpreter)


@_attention_op.register_fake
def _(q, keys, values, keep) -> Tensor:
    return q.new_empty(q.shape[0], 1, q.shape[1] * q.shape[3])


@torch.library.custom_op("megatron_stag::cached_attention", mutates_args=("kv",))
def _cached_op(q: Tensor, k: Tensor, v: Tensor, kv: Tensor, positions: Tensor, cos: Optional[Tensor],
               sin: Optional[Tensor], keep: Tensor) -> Tensor:
    return decode_attention(q, kv[0], kv[1], keep, pdl=q.is_cuda, new=(k, v, positions, cos, sin))


@_cached_op.register_fake
def _(q, k, v, kv, positions, cos, sin, keep) -> Tensor:
    return q.new_empty(q.shape[0], 1, q.shape[1] * q.shape[3])


def takes_head_dim(hd: int) -> bool:
    """Whether the kernel handles heads of this size (a power of two, 16-256)."""
    return not hd & (hd - 1) and 16 <= hd <= 256


def takes(batch: int, heads: int, kv_heads: int, deterministic: bool = False, cached: bool = False) -> bool:
    """Whether a step of `batch` rows' one-query attention goes to the kernel rather than SDPA: grouped
    queries at any batch; full heads up to ROWS per step and, for a self-attention step (`cached`), above
    CACHED_ROWS (between them cuDNN's attention is as fast; see CACHED_ROWS); and every step when
    `deterministic` (cuDNN's one-query attention is not run-to-run deterministic)."""
    rows = batch * kv_heads
    return deterministic or heads != kv_heads or rows <= ROWS or (cached and rows > CACHED_ROWS)


def _fits(q: Tensor, keys: Tensor, values: Tensor, keep: Tensor, deterministic: bool, cached: bool = False) -> bool:
    """Whether the kernel takes this attention: one half-precision query per row, routed by `takes`. The
    checks read shapes, dtypes and strides only: under torch.compile they resolve while tracing."""
    b, heads, n, hd = q.shape
    return not (n != 1 or not takes(b, heads, keys.shape[1], deterministic, cached)
                or q.dtype not in (torch.bfloat16, torch.float16) or keys.dtype != q.dtype or values.dtype != q.dtype or not takes_head_dim(hd)
                or heads % keys.shape[1] or values.shape != keys.shape or keep.dtype != torch.bool
                or keep.shape != (b, 1, 1, keys.shape[2]) or q.stride(3) != 1 or keys.stride(3) != 1
                or values.stride(3) != 1)


def attention(q: Tensor, keys: Tensor, values: Tensor, keep: Tensor, deterministic: bool = False) -> Tensor:
    """`reference`'s signature, with one-query half-precision steps on the kernel where `takes` says
    (call only where `gemv.available`). `deterministic` puts every such step on it: SDPA's choice for
    full heads above ROWS (cuDNN on Hopper and later) is not run-to-run deterministic, while the
    kernel's splits combine in a fixed order."""
    if not _fits(q, keys, values, keep, deterministic):
        return reference(q, keys, values, keep)
    return torch.ops.megatron_stag.decode_attention(q, keys, values, keep)


def cached_attention(q: Tensor, k: Tensor, v: Tensor, rope: Optional[tuple[Tensor, Tensor]], kv: Tensor,
                     rows: Optional[Tensor], positions: Tensor, keep: Tensor, attention=attention,
                     deterministic: bool = False) -> Tensor:
    """`reference_cached`'s signature: a step of every row (one query each) in one kernel, rotary
    embedding and cache write included, so the kernel follows the q/k/v matmul directly and loads its
    cache slots before waiting for it (programmatic dependent launch). Other calls take the reference
    around `attention`; `deterministic` as for `attention`."""
    b, heads, n, hd = q.shape
    if (rows is not None or not _fits(q, kv[0], kv[1], keep, deterministic, cached=True) or k.shape != (b, kv.shape[2], 1, hd)
            or v.shape != k.shape or k.dtype != q.dtype or v.dtype != q.dtype or k.stride(3) != 1
            or v.stride(3) != 1 or positions.shape != (b, 1) or positions.dtype != torch.long
            or (rope is not None and (rope[0].shape != (b, 1, 1, rope[0].shape[-1]) or rope[0].shape[-1] % 2
                                      or rope[0].shape[-1] > hd or rope[0].dtype != torch.float32))):
        return reference_cached(q, k, v, rope, kv, rows, positions, keep, attention)
    cos, sin = (t.reshape(b, -1) for t in rope) if rope is not None else (None, None)
    return torch.ops.megatron_stag.cached_attention(q, k, v, kv, positions.reshape(b), cos, sin, keep)
