"""Megatron's model-config hook for our models: a `GPTModelConfig` subclass naming our builder.

`megatron.training` (0.19) builds models from `ModelConfig.builder`, a class path; GPTModelConfig
names `GPTModelBuilder`, which hard-codes `GPTModel`. `StagGPTModelConfig` keeps every GPT field
(vocab padding, sequence length, rope, tied embeddings, ...) around a `StagFormerConfig` and names
`StagFormerModelBuilder`, which builds a `StagFormerModel` (baseline GPT, StagFormer, AltUp or both,
from the config's fields). Megatron's own `build_distributed_models` then wraps it (Float16Module,
DDP / distributed optimizer) exactly as it would a GPTModel.

Used by `megatron-stag pretrain` and by a Megatron-LM checkout's `pretrain_gpt.py`
(`patches/megatron-lm-core_v0.19.0-pretrain_gpt.patch`): `stag_gpt_config_from_args(args)` in place
of `gpt_config_from_args(args)`, `add_megatron_stag_args` as the extra-args provider.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from megatron.training.models.gpt import GPTModelBuilder, GPTModelConfig


@dataclass
class StagGPTModelConfig(GPTModelConfig):
    builder: ClassVar[str] = "megatron_stag.training.megatron_builder.StagFormerModelBuilder"
    core_attention: str = "sdpa"
    """sdpa (torch scaled_dot_product_attention) or local (megatron's DotProductAttention)."""


class StagFormerModelBuilder(GPTModelBuilder):
    """GPTModelBuilder that builds a StagFormerModel from a StagGPTModelConfig."""

    def build_model(self, pg_collection, pre_process=None, post_process=None, vp_stage=None):
        from megatron.core.pipeline_parallel.utils import is_pp_first_stage, is_pp_last_stage
        from megatron.training.vocab_utils import calculate_padded_vocab_size

        from megatron_stag.models.stagformer_model import StagFormerModel
        from megatron_stag.specs.stagformer_specs import get_stagformer_section_specs
        from megatron_stag.training.shared_weight_sync import make_finalize_model_grads

        cfg = self._model_config
        config = cfg.transformer
        if vp_stage not in (None, 0):
            raise ValueError("StagFormerModel does not support virtual pipeline stages.")
        vocab = cfg.vocab_size
        if cfg.should_pad_vocab:
            vocab = calculate_padded_vocab_size(vocab, cfg.make_vocab_size_divisible_by,
                                                config.tensor_model_parallel_size)
        if pre_process is None:
            pre_process = is_pp_first_stage(pg_collection.pp)
        if post_process is None:
            post_process = is_pp_last_stage(pg_collection.pp)
        backend = "te" if config.transformer_impl == "transformer_engine" else "local"
        model = StagFormerModel(
            config, vocab_size=vocab, max_sequence_length=cfg.seq_length,
            section_specs=get_stagformer_section_specs(config, backend=backend,
                                                       core_attention=cfg.core_attention),
            pre_process=pre_process, post_process=post_process, parallel_output=cfg.parallel_output,
            share_embeddings_and_output_weights=cfg.share_embeddings_and_output_weights,
            position_embedding_type=cfg.position_embedding_type, rotary_percent=cfg.rotary_percent,
            rotary_base=cfg.rotary_base, rope_scaling=cfg.rope_scaling, rope_scaling_factor=cfg.rope_scaling_factor,
            fp16_lm_cross_entropy=cfg.fp16_lm_cross_entropy,
            pg_collection=pg_collection)
        # megatron keeps a finalize function the model's config already has: ours adds the
        # gradient sum of weights shared across pipeline stages before megatron's reductions
        config.finalize_model_grads_func = make_finalize_model_grads()
        return model


def add_megatron_stag_args(parser):
    """extra_args_provider: the --stag-*, --altup-* and --core-attention flags."""
    from megatron_stag.config.cli_args import add_stagformer_args
    from megatron_stag.config.recipe import add_plugin_args

    return add_plugin_args(add_stagformer_args(parser))


def stag_gpt_config_from_args(args) -> StagGPTModelConfig:
    """megatron's gpt_config_from_args with a StagFormerConfig inside and our builder named."""
    from megatron.training.argument_utils import core_transformer_config_from_args, gpt_config_from_args

    from megatron_stag.config.stagformer_config import StagFormerConfig

    transformer = core_transformer_config_from_args(args, config_class=StagFormerConfig)
    model_cfg = gpt_config_from_args(args, config=transformer, model_config_cls=StagGPTModelConfig)
    model_cfg.core_attention = getattr(args, "core_attention", "sdpa")
    return model_cfg
