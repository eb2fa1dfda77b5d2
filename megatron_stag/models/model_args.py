"""A model's complete description as plain data: saved beside every checkpoint as JSON, so loading
needs no pickle and no code from the checkpoint directory."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Optional

import torch


@dataclass
class ModelArgs:
    vocab_size: int
    max_sequence_length: int
    num_layers: int
    hidden_size: int
    num_attention_heads: int
    num_query_groups: Optional[int] = None
    ffn_hidden_size: Optional[int] = None
    normalization: str = "LayerNorm"
    swiglu: bool = False  # gated MLP with SiLU (megatron's --swiglu)
    position_embedding_type: str = "learned_absolute"
    share_embeddings_and_output_weights: bool = True
    stag_sections: int = 1
    stag_section_layers: Optional[list[int]] = None
    stag_shared_weights: bool = False
    stag_cross_window: Optional[int] = None
    stag_output: str = "last"
    stag_null_entry: str = "all"
    altup_blocks: int = 1
    altup_schedule: str = "alternating"
    altup_fixed_block: int = 0
    altup_embedding: str = "recycled"
    altup_output: str = "sum"
    altup_form: str = "standard"
    altup_coef_clip: Optional[float] = None
    altup_sequence_stride: int = 1
    num_moe_experts: Optional[int] = None
    moe_router_topk: int = 2
    moe_ffn_hidden_size: Optional[int] = None
    add_bias_linear: bool = True
    core_attention: str = "sdpa"
    # megatron's names (--rotary-base, --rotary-percent, --norm-epsilon): a run that changes them is
    # rebuilt with them by generate and export (older model_args.json files hold the defaults)
    rotary_base: int = 10000
    rotary_percent: float = 1.0
    layernorm_epsilon: float = 1e-5
    use_rope_scaling: bool = False  # Llama 3's frequency scaling (--use-rope-scaling, --rope-scaling-factor)
    rope_scaling_factor: float = 8.0
    kv_channels: Optional[int] = None  # the head size where it is not hidden_size / num_attention_heads (--kv-channels)

    @property
    def sections(self) -> int:
        """The serving model's (`serving.model.PlainConfig`) name for stag_sections."""
        return self.stag_sections

    @property
    def shared_weights(self) -> bool:
        """The serving model's name for stag_shared_weights."""
        return self.stag_shared_weights

    @property
    def output(self) -> str:
        """The serving model's name for stag_output."""
        return self.stag_output

    def differences(self, stored: "ModelArgs") -> list[str]:
        """"field stored -> this" for each setting in which the two describe different models (an even
        split of layers into sections, given as [2, 2] or left to its default None, is one model)."""
        from megatron_stag.config.section_layout import section_layer_counts

        def values(args: ModelArgs) -> dict:
            data = asdict(args)
            try:
                data["stag_section_layers"] = section_layer_counts(args.num_layers, args.stag_sections,
                                                                   args.stag_section_layers)
            except ValueError:
                pass  # an impossible split compares as written
            return data

        mine, theirs = values(self), values(stored)
        return [f"{k} {theirs[k]!r} -> {v!r}" for k, v in mine.items() if theirs[k] != v]

    def save(self, path: Path) -> None:
        from megatron_stag.platform.files import write_atomic

        write_atomic(Path(path), json.dumps(asdict(self), indent=2) + "\n")

    @classmethod
    def load(cls, path: Path) -> "ModelArgs":
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing: is this a megatron-stag checkpoint directory?")
        try:
            data = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ValueError(f"{path} is not valid JSON ({err}): restore it from the run, or use another "
                             f"checkpoint.") from None
        if not isinstance(data, dict):
            raise ValueError(f"{path} holds {type(data).__name__}, not a model description.")
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"{path}: unknown model fields {sorted(unknown)}.")
        return cls(**data)

    def config(self, tp: int = 1, pp: int = 1, dtype=torch.float32, **overrides):
        from megatron_stag.config.stagformer_config import StagFormerConfig

        kw = dict(
            num_layers=self.num_layers, hidden_size=self.hidden_size,
            num_attention_heads=self.num_attention_heads, num_query_groups=self.num_query_groups,
            ffn_hidden_size=self.ffn_hidden_size, normalization=self.normalization,
            layernorm_epsilon=self.layernorm_epsilon, kv_channels=self.kv_channels,
            stag_sections=self.stag_sections, stag_section_layers=self.stag_section_layers,
            stag_shared_weights=self.stag_shared_weights, stag_cross_window=self.stag_cross_window,
            stag_output=self.stag_output, stag_null_entry=self.stag_null_entry, tensor_model_parallel_size=tp,
            **{f.name: getattr(self, f.name) for f in fields(self)
               if f.name.startswith(("altup_", "moe_")) or f.name in ("num_moe_experts", "add_bias_linear")},
            pipeline_model_parallel_size=pp, params_dtype=dtype, bf16=dtype == torch.bfloat16,
            pipeline_dtype=dtype if pp > 1 else None, hidden_dropout=0.0, attention_dropout=0.0,
            use_cpu_initialization=not torch.cuda.is_available(),
        )
        if self.swiglu:
            import torch.nn.functional as F

            kw.update(gated_linear_unit=True, activation_func=F.silu, bias_activation_fusion=False)
        kw.update(overrides)
        return StagFormerConfig(**kw)

    def build(self, config, pre_process: bool = True, post_process: bool = True):
        from megatron_stag.models.stagformer_model import StagFormerModel
        from megatron_stag.specs.stagformer_specs import get_stagformer_section_specs

        model = StagFormerModel(
            config, vocab_size=self.vocab_size, max_sequence_length=self.max_sequence_length,
            section_specs=get_stagformer_section_specs(config, core_attention=self.core_attention),
            pre_process=pre_process, post_process=post_process,
            share_embeddings_and_output_weights=self.share_embeddings_and_output_weights,
            position_embedding_type=self.position_embedding_type, rotary_base=self.rotary_base,
            rotary_percent=self.rotary_percent, rope_scaling=self.use_rope_scaling,
            rope_scaling_factor=self.rope_scaling_factor,
        )
        # megatron's Float16Module casts the whole module (its torch norms are built in fp32).
        return model.to(config.params_dtype) if config.params_dtype != torch.float32 else model
