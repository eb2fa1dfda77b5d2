"""Hugging Face transformers face of the serving model: `StagConfig` and `StagForCausalLM`.

The module is the serving model `model.StagLM` itself behind transformers' interfaces, not a copy:
`megatron-stag export --format hf` writes this file and `model.py` beside the weights, and `config.json`
names them in `auto_map`, so `AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)` loads
the model where transformers is installed and megatron_stag is not. Only torch, safetensors and
transformers are imported here and in `model.py`.

Cache: `StagCache`, a cache of our own (the engine's whole per-section caches: self-attention K/V and
the cross-attention entries), returned as `past_key_values`; `generate()` passes it back and feeds only
the new tokens. Batches may be left- or right-padded through `attention_mask`.
"""

from __future__ import annotations

from dataclasses import MISSING, asdict, fields
from typing import Optional

import torch
from torch import Tensor
from transformers import GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from .model import HF_MODEL_TYPE, PlainConfig, StagLM


class StagConfig(PretrainedConfig):
    """The serving model's `PlainConfig` fields, plus transformers' standard names for the same sizes."""

    model_type = HF_MODEL_TYPE

    def __init__(self, **kwargs):
        plain = {f.name: kwargs.pop(f.name) for f in fields(PlainConfig) if f.name in kwargs}
        for key, value in plain.items():
            setattr(self, key, value)
        kwargs.setdefault("tie_word_embeddings", plain.get("tie_embeddings", True))
        super().__init__(**kwargs)

    @classmethod
    def from_plain(cls, cfg: PlainConfig, **kwargs) -> "StagConfig":
        return cls(**asdict(cfg), num_hidden_layers=sum(cfg.section_layers),
                   max_position_embeddings=cfg.max_sequence_length, **kwargs)

    def plain(self) -> PlainConfig:
        """The serving model's config; a field added since the folder was written takes its default."""
        required = [f.name for f in fields(PlainConfig) if f.default is MISSING and f.default_factory is MISSING]
        missing = [n for n in required if not hasattr(self, n)]
        if missing:
            raise ValueError(f"config.json lacks {missing}: it was not written by `megatron-stag export --format hf`.")
        return PlainConfig(**{f.name: getattr(self, f.name) for f in fields(PlainConfig) if hasattr(self, f.name)})


class StagCache:
    """Decode state of one batch: every section's whole cache and how many columns it holds.

    The caches hold the columns used so far rounded up to a power of two (at least 16, at most the
    context) and grow, copied, as a generation passes that: sized to the context they would cost every
    forward its memory and its attention over every slot (Llama 3's 131072 positions would not fit)."""

    def __init__(self, model: StagLM, batch: int):
        self.model, self.batch = model, batch
        self.caches: Optional[dict] = None
        self.length = 0

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.length

    def reserve(self, columns: int) -> None:
        """Room for `columns` columns in every cache, the ones held kept."""
        have = 0 if self.caches is None else self.caches[next(iter(self.caches))].kv[0].shape[3]
        if columns <= have:
            return
        size = min(max(16, 1 << (columns - 1).bit_length()), self.model.cfg.max_sequence_length)
        grown = self.model.new_caches(self.batch, size)
        for k, cache in (self.caches or {}).items():  # self-attention slot t, cross-attention slot j: the same index
            for old, new in zip(cache.kv, grown[k].kv):
                new[..., :have, :].copy_(old)
            if cache.cross is not None:
                grown[k].cross[..., :have + 1, :].copy_(cache.cross)
        self.caches = grown

    def reorder_cache(self, beam_idx: Tensor) -> None:
        for cache in (self.caches or {}).values():
            cache.kv = [kv.index_select(1, beam_idx) for kv in cache.kv]
            if cache.cross is not None:
                cache.cross = cache.cross.index_select(2, beam_idx)


class StagForCausalLM(PreTrainedModel, GenerationMixin):
    config_class = StagConfig
    base_model_prefix = "model"
    _no_split_modules = ["DecoderLayer"]

    def __init__(self, config: StagConfig):
        super().__init__(config)
        self.model = StagLM(config.plain())
        self.post_init()

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # the model brings its own cache (StagCache)

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def get_output_embeddings(self):
        return self.model.lm_head

    def _init_weights(self, module) -> None:
        """Weights come from the checkpoint; the module defaults of `StagLM` stand otherwise."""

    def forward(self, input_ids: Tensor, attention_mask: Optional[Tensor] = None,
                past_key_values: Optional[StagCache] = None, use_cache: Optional[bool] = None,
                labels: Optional[Tensor] = None, **kwargs) -> CausalLMOutputWithPast:
        """Logits of input_ids [b, n], the columns after those `past_key_values` holds; attention_mask
        [b, past + n] covers them all. labels [b, n]: next-token loss (shifted here, -100 ignored)."""
        cache = past_key_values if isinstance(past_key_values, StagCache) else None
        if cache is None:
            cache = StagCache(self.model, input_ids.shape[0])
        start, n = cache.length, input_ids.shape[1]
        if start + n > self.config.max_sequence_length:
            raise ValueError(f"{start + n} tokens exceed the model's context of {self.config.max_sequence_length}.")
        cache.reserve(start + n)
        logits = self.model.extend(input_ids, cache.caches, start, attention_mask)
        cache.length = start + n
        loss = None
        if labels is not None:
            loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(),
                                                     ignore_index=-100)
        return CausalLMOutputWithPast(loss=loss, logits=logits,
                                      past_key_values=cache if use_cache is not False else None)

    def prepare_inputs_for_generation(self, input_ids: Tensor, past_key_values: Optional[StagCache] = None,
                                      attention_mask: Optional[Tensor] = None, **kwargs) -> dict:
        if isinstance(past_key_values, StagCache):
            input_ids = input_ids[:, past_key_values.length:]
        return dict(input_ids=input_ids, past_key_values=past_key_values, attention_mask=attention_mask,
                    use_cache=True)


if __name__.startswith("megatron_stag."):  # the package's copy, not one shipped in an exported folder
    # importing this module registers model_type 'stagformer' with the Auto classes, so an export loads
    # without trust_remote_code where megatron_stag is installed (not done on `import megatron_stag`:
    # transformers' Auto classes add ~5 s to every command's start)
    from transformers import AutoConfig, AutoModelForCausalLM

    AutoConfig.register(HF_MODEL_TYPE, StagConfig, exist_ok=True)
    AutoModelForCausalLM.register(StagConfig, StagForCausalLM, exist_ok=True)
