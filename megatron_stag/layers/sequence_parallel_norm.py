"""Torch LayerNorm/RMSNorm that work under sequence parallelism (no TE or apex needed).

megatron's `WrappedTorchNorm` refuses `sequence_parallel` only because its parameters are not marked:
with SP each tensor-parallel rank normalises its own slice of the sequence, so the norm weights'
gradients are partial sums. Marking them `sequence_parallel` makes megatron's `finalize_model_grads`
all-reduce them over the TP group, exactly as it does for TE's and apex's norms.
"""

from __future__ import annotations

import torch


class SequenceParallelNorm:
    """Builder with megatron's norm constructor signature (used as a spec's layer norm)."""

    def __new__(cls, config, hidden_size: int, eps: float = 1e-5, **unused):
        if config.normalization == "LayerNorm":
            norm = torch.nn.LayerNorm(hidden_size, eps=eps)
        elif config.normalization == "RMSNorm":
            norm = torch.nn.RMSNorm(hidden_size, eps=eps)
        else:
            raise ValueError(f"normalization={config.normalization!r}: use LayerNorm or RMSNorm.")
        for p in norm.parameters():
            p.sequence_parallel = config.sequence_parallel
        return norm
