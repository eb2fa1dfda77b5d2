"""Tiny StagFormer configs/models shared by the tests (fp32, no dropout: exact comparisons)."""

from __future__ import annotations

import torch

VOCAB = 64
SEQ = 12
MAX_LEN = 32  # learned position table; generation tests decode up to this


def tiny_config(**overrides):
    from megatron_stag.config.stagformer_config import StagFormerConfig

    kw = dict(num_layers=4, hidden_size=32, num_attention_heads=4, use_cpu_initialization=True,
              hidden_dropout=0.0, attention_dropout=0.0, stag_sections=2)
    kw.update(overrides)
    return StagFormerConfig(**kw)


def tiny_model(seed: int = 0, **overrides):
    from megatron_stag.models.stagformer_model import StagFormerModel

    torch.manual_seed(seed)
    pos = overrides.pop("position_embedding_type", "learned_absolute")
    specs = overrides.pop("section_specs", None)
    model = StagFormerModel(tiny_config(**overrides), vocab_size=VOCAB, max_sequence_length=MAX_LEN,
                            section_specs=specs, position_embedding_type=pos)
    return model.eval()


def batch(b: int = 2, s: int = SEQ, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (b, s), generator=g)
    pos = torch.arange(s)[None].expand(b, -1)
    return ids, pos
