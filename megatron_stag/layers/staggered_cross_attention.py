"""Cross-section attention: section k at position i reads section k-1 at positions < i.

StagFormer (arXiv 2501.15665, section 3). Built on megatron's `CrossAttention` (linear_q on the
section's own stream, linear_kv on the previous section's output). The model hands it the previous
section's output *shifted right by one* with a zero "null" entry at position 0
(`shift_right_for_stagger`), so "k < i" becomes the ordinary causal mask "k' <= i" and every fast
causal kernel applies; position 0 attends only to the null entry (whose keys/values are the
linear_kv bias) instead of a fully masked row, which megatron's additive -10000 masks would turn into
a uniform average over the future. A bounded window W keeps shifted positions i-W+1..i, i.e.
original positions i-W..i-1. The null entry is then visible to every position (an attention sink);
`stag_null_entry='first'` hides it from positions > 0 (the paper's literal reading), through
SDPAttention's mask.

megatron's CrossAttention refuses grouped-query attention; the cross-attention always runs
multi-head (its own config copy sets num_query_groups = num_attention_heads), whatever the
self-attention uses.
"""

from __future__ import annotations

import copy
from typing import Optional

import torch
from torch import Tensor

from megatron.core.transformer.attention import CrossAttention, CrossAttentionSubmodules
from megatron.core.transformer.enums import AttnMaskType


def cross_attention_config(config):
    """Config copy for the cross-attention: multi-head, and the stagger window as a causal band."""
    cfg = copy.copy(config)
    cfg.num_query_groups = config.num_attention_heads
    window = getattr(config, "stag_cross_window", None)
    cfg.window_size = (window - 1, 0) if window is not None else None
    cfg.window_attn_skip_freq = None
    # read by SDPAttention on this copy only (the self-attention's config has no such attribute)
    cfg.null_entry_first_only = getattr(config, "stag_null_entry", "all") == "first"
    return cfg


def shift_right_for_stagger(context: Tensor) -> Tensor:
    """[s, b, h] -> [s, b, h]: position i holds the input's position i-1; position 0 is zero."""
    return torch.cat([torch.zeros_like(context[:1]), context[:-1]], dim=0)


class StaggeredCrossAttention(CrossAttention):
    """megatron CrossAttention with a causal (optionally windowed) mask over shifted keys."""

    def __init__(
        self,
        config,
        submodules: CrossAttentionSubmodules,
        layer_number: int,
        attn_mask_type: AttnMaskType = AttnMaskType.causal,
        cp_comm_type: Optional[str] = None,
        pg_collection=None,
        name: Optional[str] = None,
    ):
        super().__init__(
            config=cross_attention_config(config),
            submodules=submodules,
            layer_number=layer_number,
            attn_mask_type=AttnMaskType.causal,
            cp_comm_type=cp_comm_type,
            pg_collection=pg_collection,
            name=name,
        )
