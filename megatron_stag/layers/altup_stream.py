"""Into and out of AltUp's K-block stream: the widening of the embedding and the final collapse.

Widening (`altup_embedding`), from the d-wide embedding e of megatron's LanguageModelEmbedding
(which stays the tied output table):
- recycled:  [e, e, ..., e]                            (Recycled-AltUp, no extra parameters);
- widened:   [e, E_1[t], ..., E_{K-1}[t]]              (a V x K*d table: block 0 is the usual one);
- projected: [e, r(W_1 e), ..., r(W_{K-1} e)]          (Gemma 3n; r rescales to e's RMS).
Collapse (`altup_output`), the block's final norm slot (so it sits where megatron's final layernorm
is, on the stage that ends the section): sum, mean, a learned K*d -> d map (initialised to the
mean), or Gemma 3n's projections back (rescaled to block 0's RMS) and mean; then the norm.
"""

from __future__ import annotations

import torch
from torch import Tensor

from megatron.core.tensor_parallel import VocabParallelEmbedding, scatter_to_sequence_parallel_region
from megatron.core.transformer.module import MegatronModule

_EPS = 1e-6
_WRITTEN_BLOCKS = "_altup_written_blocks"


def with_written_blocks(stream: Tensor, blocks: dict[int, Tensor]) -> Tensor:
    """Mark blocks of `stream` that also exist as their own contiguous [.., d] tensors (equal values,
    in the autograd graph), so the fused predict (layers/altup_triton.py) takes its layer input
    without a copy. The mark lives on this tensor object only: anything that makes a new tensor
    (a pipeline receive, a recompute's detach) drops it, and predict then copies."""
    setattr(stream, _WRITTEN_BLOCKS, blocks)
    return stream


def written_block(stream: Tensor, block: int) -> Tensor | None:
    return getattr(stream, _WRITTEN_BLOCKS, {}).get(block)


def _rms(x: Tensor) -> Tensor:
    return x.float().pow(2).mean(-1, keepdim=True).sqrt()


def _rescaled(x: Tensor, target_rms: Tensor) -> Tensor:
    return (x.float() * (target_rms / _rms(x).clamp(min=_EPS))).to(x.dtype)


def _projections(config, count: int) -> torch.nn.ParameterList:
    """count d x d matrices, each a replicated per-token map (partial grads under SP)."""
    d = config.hidden_size
    params = torch.nn.ParameterList()
    for _ in range(count):
        w = torch.nn.Parameter(torch.empty(d, d, dtype=config.params_dtype))
        config.init_method(w)
        w.sequence_parallel = config.sequence_parallel
        params.append(w)
    return params


class AltUpWidening(MegatronModule):
    """The d-wide embedding [s, b, d] -> the K-block stream [s, b, K*d]."""

    def __init__(self, config, vocab_size: int, tp_group=None):
        super().__init__(config=config)
        self.mode, self.num_blocks = config.altup_embedding, config.altup_blocks
        self.tp_group = tp_group
        if self.mode == "widened":
            self.extra_embeddings = VocabParallelEmbedding(
                vocab_size, (self.num_blocks - 1) * config.hidden_size, init_method=config.init_method,
                config=config, tp_group=tp_group)
        elif self.mode == "projected":
            self.projections = _projections(config, self.num_blocks - 1)

    def forward(self, e: Tensor, input_ids: Tensor) -> Tensor:
        if self.mode == "recycled":
            stream = e.repeat(*([1] * (e.dim() - 1)), self.num_blocks)
            return with_written_blocks(stream, dict.fromkeys(range(self.num_blocks), e))
        if self.mode == "widened":
            extra = self.extra_embeddings(input_ids).transpose(0, 1).contiguous()  # [s, b, (K-1)d]
            if self.config.sequence_parallel:
                extra = scatter_to_sequence_parallel_region(extra, group=self.tp_group)
            return with_written_blocks(torch.cat([e, extra.to(e.dtype)], dim=-1), {0: e})
        target = _rms(e)
        return torch.cat([e] + [_rescaled(e @ w.t(), target) for w in self.projections], dim=-1)


class AltUpCollapse(MegatronModule):
    """The block's final norm slot: K-block stream [s, b, K*d] -> d, then megatron's norm."""

    def __init__(self, config, hidden_size: int, eps: float, norm_class):
        super().__init__(config=config)
        self.mode, self.num_blocks = config.altup_output, config.altup_blocks
        self.norm = norm_class(config=config, hidden_size=hidden_size, eps=eps)
        k, d = self.num_blocks, hidden_size
        if self.mode == "learned":
            w = torch.eye(d, dtype=config.params_dtype).repeat(1, k) / k  # starts as the mean
            self.weight = torch.nn.Parameter(w)
            self.weight.sequence_parallel = config.sequence_parallel
        elif self.mode == "projected":
            self.projections = _projections(config, k - 1)

    def collapse(self, stream: Tensor) -> Tensor:
        if self.mode == "learned":
            return stream @ self.weight.t()
        x = stream.unflatten(-1, (self.num_blocks, stream.shape[-1] // self.num_blocks))
        if self.mode == "sum":
            return x.sum(-2)
        if self.mode == "mean":
            return x.mean(-2)
        base = x[..., 0, :]
        target = _rms(base)
        blocks = [base] + [_rescaled(x[..., i + 1, :] @ w.t(), target) for i, w in enumerate(self.projections)]
        return torch.stack(blocks, -2).mean(-2)

    def forward(self, stream: Tensor) -> Tensor:
        return self.norm(self.collapse(stream))


class AltUpCollapseNorm:
    """Builder with the (config, hidden_size, eps) signature of TransformerBlock's final-norm slot."""

    def __init__(self, norm_class):
        self.norm_class = norm_class

    def __call__(self, config, hidden_size: int, eps: float) -> AltUpCollapse:
        return AltUpCollapse(config, hidden_size, eps, self.norm_class)
