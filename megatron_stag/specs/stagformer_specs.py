"""StagFormer layer specs: structure as data, the way megatron's `gpt_layer_specs.py` declares GPT.

A section-0 layer is megatron's GPT layer. A later section's layer is the same layer with the
cross-attention slots filled: `pre_cross_attn_layernorm` -> `StaggeredCrossAttention` ->
`cross_attn_bda`, run between self-attention and MLP (megatron's TransformerLayer order). With
`core_attention="local"` and one section the spec *is* `get_gpt_layer_local_spec()`; the default
`"sdpa"` swaps only the core attention for `SDPAttention`. MoE layers come from megatron's own MoE
spec (`num_moe_experts` in the config). AltUp (`altup_layer_spec`) wraps whichever layer spec results:
the layer class becomes `AltUpTransformerLayer` with its predict/correct module in the `altup` slot,
or `SequenceAltUpLayer` for Sequence-AltUp.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
from megatron.core.models.gpt.gpt_layer_specs import (
    get_gpt_layer_local_spec,
    get_gpt_layer_with_transformer_engine_spec,
)
from megatron.core.transformer.attention import CrossAttentionSubmodules
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.extensions.transformer_engine import HAVE_TE

from megatron_stag.layers.altup_layer import AltUpLayerSubmodules, AltUpTransformerLayer
from megatron_stag.layers.altup_mixing import AltUpCoefficients, Gemma3nAltUpRouter
from megatron_stag.layers.sdpa_attention import SDPAttention
from megatron_stag.layers.sequence_altup_layer import SequenceAltUpLayer
from megatron_stag.layers.sequence_parallel_norm import SequenceParallelNorm
from megatron_stag.layers.staggered_cross_attention import StaggeredCrossAttention

Backend = Literal["local", "te"]
CoreAttention = Literal["sdpa", "local"]


def _with_cross_attention(subs, norm, linear_q, linear_kv, core, linear_proj):
    """Fill TransformerLayer's cross-attention slots with the staggered cross-attention."""
    return dataclasses.replace(
        subs,
        pre_cross_attn_layernorm=norm,
        cross_attention=ModuleSpec(
            module=StaggeredCrossAttention,
            params={"attn_mask_type": AttnMaskType.causal},
            submodules=CrossAttentionSubmodules(
                linear_q=linear_q, linear_kv=linear_kv, core_attention=core, linear_proj=linear_proj),
        ),
        cross_attn_bda=get_bias_dropout_add,
    )


def default_backend() -> Backend:
    """Transformer Engine when it imports, otherwise megatron's local modules."""
    return "te" if HAVE_TE else "local"


def _local_layer_spec(normalization: str, core_attention: CoreAttention, cross: bool,
                      sequence_parallel: bool = False, num_experts: int | None = None,
                      moe_grouped_gemm: bool = False) -> ModuleSpec:
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
    from megatron.core.models.backends import LocalSpecProvider

    spec = get_gpt_layer_local_spec(num_experts=num_experts, moe_grouped_gemm=moe_grouped_gemm,
                                    normalization=normalization)
    subs = spec.submodules
    if sequence_parallel:  # megatron's torch norm refuses SP; ours marks its grads for the TP sum
        subs = dataclasses.replace(subs, input_layernorm=SequenceParallelNorm,
                                   pre_mlp_layernorm=SequenceParallelNorm)
    if core_attention == "sdpa":
        attn = subs.self_attention
        attn = dataclasses.replace(
            attn, submodules=dataclasses.replace(attn.submodules, core_attention=SDPAttention))
        subs = dataclasses.replace(subs, self_attention=attn)
    if cross:
        core = SDPAttention if core_attention == "sdpa" else LocalSpecProvider().core_attention()
        subs = _with_cross_attention(subs, subs.input_layernorm, ColumnParallelLinear,
                                     ColumnParallelLinear, core, RowParallelLinear)
    return dataclasses.replace(spec, submodules=subs)


def _te_layer_spec(normalization: str, cross: bool, num_experts: int | None = None,
                   moe_grouped_gemm: bool = False) -> ModuleSpec:
    if not HAVE_TE:
        raise ImportError(
            "backend='te' needs Transformer Engine (pip install transformer-engine[pytorch]); "
            "use backend='local' without it."
        )
    from megatron.core.extensions.transformer_engine import (
        TEColumnParallelLinear,
        TEDotProductAttention,
        TENorm,
        TERowParallelLinear,
    )

    spec = get_gpt_layer_with_transformer_engine_spec(num_experts=num_experts,
                                                      moe_grouped_gemm=moe_grouped_gemm)
    if not cross:
        return spec
    subs = _with_cross_attention(spec.submodules, TENorm, TEColumnParallelLinear,
                                 TEColumnParallelLinear, TEDotProductAttention, TERowParallelLinear)
    return dataclasses.replace(spec, submodules=subs)


def get_stagformer_layer_spec(
    cross_attention: bool,
    backend: Backend | None = None,
    normalization: str = "LayerNorm",
    core_attention: CoreAttention = "sdpa",
    sequence_parallel: bool = False,
    num_experts: int | None = None,
    moe_grouped_gemm: bool = False,
) -> ModuleSpec:
    """The layer spec of one StagFormer section (`cross_attention` for sections after the first)."""
    backend = backend or default_backend()
    if backend == "te":
        return _te_layer_spec(normalization, cross_attention, num_experts, moe_grouped_gemm)
    if backend != "local":
        raise ValueError(f"backend={backend!r}: choose 'local' or 'te'.")
    if core_attention not in ("sdpa", "local"):
        raise ValueError(f"core_attention={core_attention!r}: choose 'sdpa' or 'local'.")
    return _local_layer_spec(normalization, core_attention, cross_attention, sequence_parallel,
                             num_experts, moe_grouped_gemm)


def altup_layer_spec(spec: ModuleSpec, config) -> ModuleSpec:
    """Wrap any TransformerLayer spec (dense or MoE) in AltUp as `config` asks (unchanged if off)."""
    if config.altup_sequence_stride > 1:
        return dataclasses.replace(spec, module=SequenceAltUpLayer)
    if not config.altup_enabled:
        return spec
    subs = {f.name: getattr(spec.submodules, f.name) for f in dataclasses.fields(spec.submodules)}
    mixer = Gemma3nAltUpRouter if config.altup_form == "gemma3n" else AltUpCoefficients
    return dataclasses.replace(spec, module=AltUpTransformerLayer,
                               submodules=AltUpLayerSubmodules(**subs, altup=mixer))


def get_stagformer_section_specs(
    config, backend: Backend | None = None, core_attention: CoreAttention = "sdpa"
) -> list[ModuleSpec]:
    """One layer spec per section: section 0 without, later sections with cross-attention."""
    if getattr(config, "stag_null_entry", "all") == "first" and (
            core_attention != "sdpa" or (backend or default_backend()) != "local"):
        raise ValueError("stag_null_entry='first' masks the null entry in SDPAttention: use "
                         "core_attention='sdpa' with the local backend.")
    return [
        altup_layer_spec(
            get_stagformer_layer_spec(k > 0, backend, config.normalization, core_attention,
                                      config.sequence_parallel, config.num_moe_experts,
                                      config.moe_grouped_gemm),
            config)
        for k in range(config.stag_sections)
    ]
