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


ALTUP_PARAMS = ("altup.", "sequence_altup", "final_layernorm.weight", "final_layernorm.projections",
                "altup_widening.projections")


def perturb_altup(model, seed: int = 1, scale: float = 0.3):
    """Move AltUp's coefficients off their identity init, so tests see real predict/correct maths
    (at init every block equals the baseline's hidden state, which would hide a wrong equation)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if any(key in name for key in ALTUP_PARAMS) and not name.endswith((".norm.weight", ".norm.bias")):
                param.add_(scale * torch.randn(param.shape, generator=g, dtype=param.dtype).to(param.device))
    return model


def tiny_model(seed: int = 0, altup_identity: bool = False, **overrides):
    """A tiny model; AltUp coefficients are perturbed unless `altup_identity`."""
    from megatron_stag.models.stagformer_model import StagFormerModel

    torch.manual_seed(seed)
    pos = overrides.pop("position_embedding_type", "learned_absolute")
    specs = overrides.pop("section_specs", None)
    model = StagFormerModel(tiny_config(**overrides), vocab_size=VOCAB, max_sequence_length=MAX_LEN,
                            section_specs=specs, position_embedding_type=pos)
    if not altup_identity and (model.config.altup_enabled or model.config.altup_sequence_stride > 1):
        perturb_altup(model, seed + 1)
    return model.eval()


def batch(b: int = 2, s: int = SEQ, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (b, s), generator=g)
    pos = torch.arange(s)[None].expand(b, -1)
    return ids, pos


def assert_causal(model, t: int) -> None:
    """Changing token t leaves the logits at positions < t unchanged and changes some at >= t."""
    ids, pos = batch()
    changed = ids.clone()
    changed[:, t] = (changed[:, t] + 1) % VOCAB
    with torch.no_grad():
        a, b = model(ids, pos), model(changed, pos)
    assert torch.equal(a[:, :t], b[:, :t])
    assert not torch.allclose(a[:, t:], b[:, t:])
