"""One StagFormer section at inference: its KV caches, prefill, and one-token steps.

StagFormer decoding (arXiv 2501.15665, section 3): at step i every section processes token i;
section k's cross-attention reads section k-1's outputs up to position i-1, which exist since the
previous step. This module runs one section's megatron `TransformerLayer`s incrementally with its own
caches, so the same code serves one process (all sections in turn) and one section per rank.

Caches, allocated once with fixed shapes (rows = batch):
- self-attention K/V per layer: [b, groups, max_len, head_dim], row r's token at position p in slot p;
- cross-attention K/V per layer (sections >= 1), keyed separately from self-attention:
  [b, heads, C, head_dim] holding the *shifted* context entries (entry j = previous section's output at
  j-1, entry 0 = the null entry). C = max_len for full cross-attention; C = W with a window, used as a
  ring (entry j in slot j mod W), so the cross cache stays bounded however long generation runs.

The layer maths follows megatron's `TransformerLayer` (pre-norm, bias-dropout-add in eval mode), and
reuses the layer's own modules (`get_query_key_value_tensors`, `linear_proj`, `mlp`) so weights and
tensor-parallel collectives are megatron's. AltUp layers carry the K-block stream between layers
(predict before, correct after: the same `altup` module the training forward uses); attention and
its caches see one d-wide block, so AltUp adds nothing to the KV cache.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from megatron_stag.layers.sdpa_attention import banded_causal_mask
from megatron_stag.layers.staggered_cross_attention import shift_right_for_stagger


def altup_predict(layer, stream: Tensor):
    """AltUp layers run on one block of the K-block stream: (layer input, prediction)."""
    altup = getattr(layer, "altup", None)
    return (stream, None) if altup is None else altup.predict(stream)


def altup_correct(layer, prediction, output: Tensor) -> Tensor:
    altup = getattr(layer, "altup", None)
    return output if altup is None else altup.correct(prediction, output)


def _add_bias(out_and_bias) -> Tensor:
    out, bias = out_and_bias
    return out if bias is None else out + bias


class SectionDecoder:
    """Incremental execution of one section (a TransformerBlock holding the whole section)."""

    def __init__(self, block, section: int, config, batch: int, max_len: int,
                 rotary: Optional[Tensor], dtype: torch.dtype, device):
        self.block, self.section, self.config = block, section, config
        self.max_len = max_len
        self.rotary = rotary  # [max_len, 1, 1, rot_dim] or None
        self.window = config.stag_cross_window
        attn = block.layers[0].self_attention
        self.groups = attn.num_query_groups_per_partition
        self.heads = attn.num_attention_heads_per_partition
        self.head_dim = attn.hidden_size_per_attention_head
        n = len(block.layers)
        kv_shape = (batch, self.groups, max_len, self.head_dim)
        self.k = [torch.zeros(kv_shape, dtype=dtype, device=device) for _ in range(n)]
        self.v = [torch.zeros(kv_shape, dtype=dtype, device=device) for _ in range(n)]
        self.cross_slots = self.window if self.window is not None else max_len
        self._self_keep = self._cross_keep = None
        if section > 0:
            # one tensor for all layers, so a step stores its new entry with a single index_put
            cshape = (n, batch, self.heads, self.cross_slots, self.head_dim)
            self.ck_all = torch.zeros(cshape, dtype=dtype, device=device)
            self.cv_all = torch.zeros(cshape, dtype=dtype, device=device)
            self.ck, self.cv = list(self.ck_all), list(self.cv_all)
            self.kv_weight, self.kv_bias = self._stack_kv_projections()

    # ------------------------------------------------------------------ cross-attention memory
    def _cross_kv(self, layer, entries: Tensor):
        """linear_kv of context entries [n, b, h] -> key, value [b, heads, n, head_dim]."""
        mixed, _ = layer.cross_attention.linear_kv(entries)
        mixed = mixed.view(*mixed.shape[:-1], self.heads, 2 * self.head_dim)
        key, value = mixed.split(self.head_dim, dim=-1)
        return key.permute(1, 2, 0, 3), value.permute(1, 2, 0, 3)

    def write_context(self, entries: Tensor, first_entry: Tensor, rows: Tensor) -> None:
        """Store context entries [n, b', h] as entries first_entry[r]..+n-1 of rows `rows`."""
        if self.section == 0:
            return
        for i, layer in enumerate(self.block.layers):
            self._store_kv(i, *self._cross_kv(layer, entries), first_entry, rows)

    def _store_kv(self, i: int, key: Tensor, value: Tensor, first_entry: Tensor, rows: Tensor) -> None:
        """Store layer i's projected entries [b', heads, n, d] from entry index first_entry[r] on."""
        n = key.shape[2]
        index = first_entry[:, None] + torch.arange(n, device=key.device)[None]  # [b', n]
        keep = index < self.max_len if self.window is None else torch.ones_like(index, dtype=torch.bool)
        slots = index % self.cross_slots
        if self.window is not None and n > self.cross_slots:  # only the newest W entries survive
            c = self.cross_slots
            key, value, slots, keep = key[:, :, -c:], value[:, :, -c:], slots[:, -c:], keep[:, -c:]
        for r_i, r in enumerate(rows.tolist()):
            s = slots[r_i][keep[r_i]]
            self.ck[i][r, :, s] = key[r_i][:, keep[r_i]]
            self.cv[i][r, :, s] = value[r_i][:, keep[r_i]]

    def ring_state(self) -> list[Tensor]:
        """The windowed cross caches: the only state a repeated step does not rewrite identically
        (a step writes slot (p+1) mod W, which the same step reads when W is small)."""
        return [*self.ck, *self.cv] if self.section > 0 and self.window is not None else []

    def _stack_kv_projections(self):
        """Re-home every layer's cross linear_kv weight into one [L, 2*heads*d, h] tensor (views,
        no copy kept), so a step projects its new entry for all layers with one batched GEMM."""
        linears = [layer.cross_attention.linear_kv for layer in self.block.layers]
        weight = torch.stack([l.weight.data for l in linears])
        for i, l in enumerate(linears):
            l.weight.data = weight[i]
        bias = None
        if linears[0].bias is not None:
            bias = torch.stack([l.bias.data for l in linears])
            for i, l in enumerate(linears):
                l.bias.data = bias[i]
        return weight, bias

    @staticmethod
    def project_entries(outputs: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
        """Cross-attention K/V of one new entry for every layer: [1, b, h] -> [L, b, 2*heads*d].

        Depends only on the previous section's output, so with one section per rank it runs on the
        previous section's rank (off this section's critical path)."""
        kv = torch.matmul(outputs[0].unsqueeze(0), weight.transpose(1, 2))
        return kv if bias is None else kv + bias[:, None, :]

    def store_entries(self, kv: Tensor, entry: Tensor) -> None:
        """Store projected entries [L, b, 2*heads*d] at entry indices [b]: static shapes.

        Without a window, an entry past the cache (only after the last position) is clamped onto
        the last slot, which no later step reads."""
        n, b = kv.shape[:2]
        key, value = kv.view(n, b, self.heads, 2 * self.head_dim).split(self.head_dim, dim=-1)
        slots = entry % self.cross_slots if self.window is not None else entry.clamp(max=self.max_len - 1)
        rows = torch.arange(b, device=kv.device)
        self.ck_all[:, rows, :, slots] = key.transpose(0, 1)  # indexed dims lead: [b, L, heads, d]
        self.cv_all[:, rows, :, slots] = value.transpose(0, 1)

    def write_step_context(self, outputs: Tensor, entry: Tensor) -> None:
        """Store the previous section's outputs [1, b, h] as entries `entry` [b] (one step)."""
        if self.section > 0:
            self.store_entries(self.project_entries(outputs, self.kv_weight, self.kv_bias), entry)

    # ------------------------------------------------------------------ layer maths
    def begin(self, positions: Tensor, prefill: bool = False) -> None:
        """Build the attention masks of this call once (they depend only on positions)."""
        self._self_keep = self.self_keep_mask(positions)
        self._cross_keep = self.cross_keep_mask(positions) if self.section > 0 and not prefill else None
        if self.rotary is not None:
            freqs = self.rotary[positions.transpose(0, 1)].squeeze(-2)  # [n, b, 1, rot]
            self._cos_sin = (torch.cos(freqs), torch.sin(freqs))

    def self_keep_mask(self, positions: Tensor) -> Tensor:
        """[b, 1, n, max_len]: query at position p sees cache slots <= p."""
        key_pos = torch.arange(self.max_len, device=positions.device)
        return (key_pos[None, None, :] <= positions[:, :, None])[:, None]

    def cross_keep_mask(self, positions: Tensor) -> Tensor:
        """[b, 1, n, C]: which cross slots the query at position p reads."""
        slot = torch.arange(self.cross_slots, device=positions.device)
        if self.window is None:
            keep = slot[None, None, :] <= positions[:, :, None]
        else:
            # slot s holds entry e with e mod W == s; the query at p reads entries p-W+1..p.
            entry = positions[:, :, None] - ((positions[:, :, None] - slot[None, None, :]) % self.window)
            keep = entry >= 0
        return keep[:, None]

    def _rope(self, t: Tensor, positions: Tensor) -> Tensor:
        """t [n, b, heads, d] at absolute positions [b, n]; megatron's (non-interleaved) rotary
        embedding with cos/sin gathered once per call in `begin` instead of once per layer."""
        if self.rotary is None:
            return t
        cos, sin = self._cos_sin
        rot = cos.shape[-1]
        x, rest = t[..., :rot], t[..., rot:]
        x1, x2 = x.chunk(2, dim=-1)
        x = x * cos.to(t.dtype) + torch.cat((-x2, x1), dim=-1) * sin.to(t.dtype)
        return torch.cat((x, rest), dim=-1) if rest.shape[-1] else x

    def qkv(self, layer, x: Tensor, positions: Tensor):
        q, k, v = layer.self_attention.get_query_key_value_tensors(x)[:3]  # [n, b, heads|groups, d]
        return self._rope(q, positions), self._rope(k, positions), v

    def attend_self(self, i: int, q, k, v, positions: Tensor, rows: Tensor) -> Tensor:
        """Write k/v at `positions` and attend over the cache; returns [n, b, heads*d] before the
        output projection. Static shapes (CUDA-graph safe) when `rows` covers the whole cache."""
        n, b = q.shape[:2]
        K, V = self.k[i], self.v[i]
        r_idx = rows[:, None].expand(-1, n)
        K[r_idx, :, positions] = k.permute(1, 0, 2, 3)  # [b, n, groups, d] into slots
        V[r_idx, :, positions] = v.permute(1, 0, 2, 3)
        keys, values = (K, V) if b == K.shape[0] and n == 1 else (K[rows], V[rows])
        keep = self._self_keep if self._self_keep is not None else self.self_keep_mask(positions)
        core = self.block.layers[i].self_attention.core_attention
        out = F.scaled_dot_product_attention(
            q.permute(1, 2, 0, 3), keys, values, attn_mask=keep,
            scale=getattr(core, "softmax_scale", None), enable_gqa=self.groups != self.heads)
        return out.permute(2, 0, 1, 3).reshape(n, b, -1)

    def _self_attention(self, i: int, layer, x: Tensor, positions: Tensor, rows: Tensor) -> Tensor:
        q, k, v = self.qkv(layer, x, positions)
        return _add_bias(layer.self_attention.linear_proj(self.attend_self(i, q, k, v, positions, rows)))

    def cross_attention(self, i: int, layer, x: Tensor, positions: Tensor, rows: Tensor) -> Tensor:
        cross = layer.cross_attention
        q, _ = cross.linear_q(x)
        n, b = x.shape[:2]
        q = q.view(n, b, self.heads, self.head_dim).permute(1, 2, 0, 3)
        keep = self._cross_keep if self._cross_keep is not None else self.cross_keep_mask(positions)
        full = rows.shape[0] == self.ck[i].shape[0]  # a step over the whole cache: no gather copy
        out = F.scaled_dot_product_attention(
            q, self.ck[i] if full else self.ck[i][rows], self.cv[i] if full else self.cv[i][rows],
            attn_mask=keep,
            scale=getattr(cross.core_attention, "softmax_scale", None))
        out = out.permute(2, 0, 1, 3).reshape(n, b, -1)
        return _add_bias(cross.linear_proj(out))

    def _prefill_cross_attention(self, i: int, layer, x: Tensor, entries: Tensor, rows: Tensor) -> Tensor:
        """Whole-prompt cross-attention over freshly projected entries, which are also cached."""
        cross = layer.cross_attention
        q, _ = cross.linear_q(x)
        n, b = x.shape[:2]
        q = q.view(n, b, self.heads, self.head_dim).permute(1, 2, 0, 3)
        key, value = self._cross_kv(layer, entries)
        self._store_kv(i, key, value, torch.zeros_like(rows), rows)
        w = None if self.window is None else self.window - 1
        mask = banded_causal_mask(n, n, w, x.device)
        out = F.scaled_dot_product_attention(q, key, value, attn_mask=mask,
                                             scale=getattr(cross.core_attention, "softmax_scale", None))
        return _add_bias(cross.linear_proj(out.permute(2, 0, 1, 3).reshape(n, b, -1)))

    def forward(self, e: Tensor, positions: Tensor, rows: Tensor,
                prefill_context: Optional[Tensor] = None) -> Tensor:
        """Run the section on embeddings e [n, b', h] at positions [b', n] of rows `rows`.

        Steps (n = 1) read the cross cache; a prefill (one row, positions 0..n-1) gets the previous
        section's outputs `prefill_context` [n, 1, h] and fills the cache. Returns the section's
        final normed output [n, b', h].
        """
        h = e
        entries = shift_right_for_stagger(prefill_context) if prefill_context is not None else None
        self.begin(positions, prefill=entries is not None)
        for i, layer in enumerate(self.block.layers):
            x, prediction = altup_predict(layer, h)
            x = x + self._self_attention(i, layer, layer.input_layernorm(x), positions, rows)
            if self.section > 0:
                c = layer.pre_cross_attn_layernorm(x)
                if entries is not None:
                    x = x + self._prefill_cross_attention(i, layer, c, entries, rows)
                else:
                    x = x + self.cross_attention(i, layer, c, positions, rows)
            x = x + _add_bias(layer.mlp(layer.pre_mlp_layernorm(x)))
            h = altup_correct(layer, prediction, x)
        norm = self.block.final_layernorm  # absent on a stage that ends mid-section
        return norm(h) if norm is not None else h
