"""Core attention on torch's scaled_dot_product_attention: the local backend's fast path.

Drop-in for megatron's `DotProductAttention` (same constructor and forward signature, [s, b, np, hn]
in, [s, b, np*hn] out). megatron's local attention materialises the s x s scores and a mask in fp32;
SDPA dispatches to flash / memory-efficient kernels when the mask is plain causal, and to the
memory-efficient kernel with a boolean mask for sliding windows. Used for self-attention and for the
staggered cross-attention (whose keys are shifted so the stagger is an ordinary causal mask).
"""

from __future__ import annotations

import contextlib
import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from megatron.core import tensor_parallel
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.utils import is_layer_window_attention
from megatron.core.utils import divide


def banded_causal_mask(sq: int, sk: int, window: Optional[int], device) -> Tensor:
    """Boolean keep-mask [sq, sk] for queries at the last sq of sk positions (bottom-right causal).

    `window` is the number of earlier positions a query may see besides itself (megatron's
    window_size[0]); None means unbounded.
    """
    q_pos = torch.arange(sk - sq, sk, device=device)[:, None]
    k_pos = torch.arange(sk, device=device)[None, :]
    keep = k_pos <= q_pos
    if window is not None:
        keep &= k_pos >= q_pos - window
    return keep


class SDPAttention(MegatronModule):
    """megatron core-attention interface backed by `F.scaled_dot_product_attention`."""

    def __init__(
        self,
        config: TransformerConfig,
        layer_number: int,
        attn_mask_type: AttnMaskType,
        attention_type: str,
        attention_dropout: Optional[float] = None,
        softmax_scale: Optional[float] = None,
        cp_comm_type: Optional[str] = None,
        pg_collection: Optional[ProcessGroupCollection] = None,
    ):
        super().__init__(config=config)
        if config.context_parallel_size != 1:
            raise ValueError(
                "SDPAttention does not implement context parallelism: set "
                "context_parallel_size=1 or use the Transformer Engine spec."
            )
        if pg_collection is None:
            pg_collection = ProcessGroupCollection.use_mpu_process_groups(required_pgs=["tp"])
        tp = pg_collection.tp.size()
        self.layer_number = max(1, layer_number)
        self.attn_mask_type = attn_mask_type
        self.attention_type = attention_type
        self.heads_per_partition = divide(config.num_attention_heads, tp)
        self.groups_per_partition = max(1, divide(config.num_query_groups, tp)) if (
            config.num_query_groups >= tp) else 1
        head_dim = config.kv_channels
        self.softmax_scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(head_dim)
        self.dropout_p = config.attention_dropout if attention_dropout is None else attention_dropout
        use_window = is_layer_window_attention(
            config.window_size, config.window_attn_skip_freq, layer_number)
        if use_window and config.window_size[1] not in (0, -1):
            raise ValueError(
                f"window_size={config.window_size}: causal attention looks only backwards; set the "
                f"right window to 0."
            )
        self.window = config.window_size[0] if use_window and config.window_size[0] >= 0 else None
        # StagFormer's cross-attention with stag_null_entry='first': key 0 (the null entry) is for
        # query 0 only
        self.null_first_only = getattr(config, "null_entry_first_only", False)
        self._mask_cache: dict = {}

    def _keep_mask(self, sq: int, sk: int, device) -> Optional[Tensor]:
        if sq == sk and self.window is None and not self.null_first_only:
            return None  # SDPA's is_causal fast path
        key = (sq, sk, device)
        if key not in self._mask_cache:
            keep = banded_causal_mask(sq, sk, self.window, device)
            if self.null_first_only:
                keep[:, 0] &= torch.arange(sk - sq, sk, device=device) == 0
            self._mask_cache = {key: keep}
        return self._mask_cache[key]

    def forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        attention_mask: Optional[Tensor],
        attn_mask_type: Optional[AttnMaskType] = None,
        attention_bias: Optional[Tensor] = None,
        packed_seq_params=None,
    ) -> Tensor:
        if packed_seq_params is not None or attention_bias is not None:
            raise ValueError("SDPAttention supports neither packed sequences nor attention bias.")
        mask_type = attn_mask_type or self.attn_mask_type
        sq, b, np_, hn = query.shape
        sk = key.shape[0]
        # [s, b, n, d] -> [b, n, s, d]
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        is_causal = False
        mask = None
        if mask_type == AttnMaskType.causal:
            mask = self._keep_mask(sq, sk, query.device)
            is_causal = mask is None
        elif attention_mask is not None:
            mask = ~attention_mask  # megatron: True = masked out; SDPA: True = attend
        dropout_p = self.dropout_p if self.training else 0.0
        rng = (tensor_parallel.get_cuda_rng_tracker().fork()
               if dropout_p > 0 and not self.config.sequence_parallel else contextlib.nullcontext())
        with rng:
            out = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, dropout_p=dropout_p, is_causal=is_causal,
                scale=self.softmax_scale, enable_gqa=k.shape[1] != q.shape[1],
            )
        # [b, n, s, d] -> [s, b, n*d]
        return out.permute(2, 0, 1, 3).reshape(sq, b, np_ * hn)
