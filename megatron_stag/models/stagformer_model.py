"""StagFormerModel: p staggered sections on megatron-core (arXiv 2501.15665, sections 2-4).

Section 0 is an ordinary causal decoder over the token embeddings e. Section k >= 1 starts again from
e and, in every layer, cross-attends to section k-1's final (normed) outputs at positions < i (the
shifted causal cross-attention of `layers/staggered_cross_attention.py`). Logits come from the last
section, or from a learned mix of all sections' outputs (`stag_output='combine'`, for p > 2).

Extends megatron's `LanguageModule` (embedding, output layer, tied weights and their pipeline
synchronisation, loss) rather than `GPTModel`, whose single `decoder` block cannot hold sections.
With one section and megatron's local spec this is exactly megatron's GPT (tested).

Pipeline parallelism: megatron's schedules move one tensor between stages, so a stage sends
`cat([h (mid-section only), e, finished section outputs], -1)` (see `section_layout.stream_slots`);
its width changes along the pipeline, which is why `config.variable_seq_lengths` is set on pipelines.
Shared weights: the sections' layers on one stage are the same modules (aliased, one storage); copies
on other stages are synchronised at build time and their gradients summed
(`training/shared_weight_sync.py`).

AltUp (`altup_blocks = K > 1`): the embedding is widened into a K-block stream [s, b, K*d]
(`AltUpWidening`), every layer is an `AltUpTransformerLayer`, and each section's final norm slot
collapses the stream back to d (`AltUpCollapse`). On pipelines the stream slots h and e are K*d wide,
finished section outputs d wide. With one section this is an AltUp GPT.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from megatron.core.models.common.embeddings.language_model_embedding import LanguageModelEmbedding
from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
from megatron.core.models.common.language_module.language_module import LanguageModule
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.tensor_parallel import (
    ColumnParallelLinear,
    gather_from_sequence_parallel_region,
    scatter_to_sequence_parallel_region,
)
from megatron.core.transformer.enums import ModelType
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import (
    LayerNormImpl,
    TransformerBlock,
    TransformerBlockSubmodules,
)

from megatron_stag.config.section_layout import stage_pieces, stream_slots
from megatron_stag.config.stagformer_config import StagFormerConfig
from megatron_stag.layers.altup_stream import AltUpCollapseNorm, AltUpWidening
from megatron_stag.layers.sequence_parallel_norm import SequenceParallelNorm
from megatron_stag.layers.staggered_cross_attention import shift_right_for_stagger
from megatron_stag.models.section_pieces import SHARED_LAYER_MODULES, SectionPieces
from megatron_stag.specs.stagformer_specs import get_stagformer_section_specs


class StagFormerModel(LanguageModule):
    """Staggered-section language model. Inputs/outputs follow megatron's GPTModel."""

    def __init__(
        self,
        config: StagFormerConfig,
        vocab_size: int,
        max_sequence_length: int,
        section_specs: Optional[list[ModuleSpec]] = None,
        pre_process: bool = True,
        post_process: bool = True,
        parallel_output: bool = True,
        share_embeddings_and_output_weights: bool = False,
        position_embedding_type: str = "learned_absolute",
        rotary_percent: float = 1.0,
        rotary_base: int = 10000,
        rope_scaling: bool = False,
        rope_scaling_factor: float = 8.0,
        fp16_lm_cross_entropy: bool = False,
        pg_collection: Optional[ProcessGroupCollection] = None,
    ) -> None:
        if not isinstance(config, StagFormerConfig):
            raise TypeError("StagFormerModel needs a StagFormerConfig (megatron_stag.config).")
        super().__init__(config=config, pg_collection=pg_collection)
        self.vocab_size = vocab_size
        self.max_sequence_length = max_sequence_length
        self.pre_process = pre_process
        self.post_process = post_process
        self.parallel_output = parallel_output
        self.share_embeddings_and_output_weights = share_embeddings_and_output_weights
        self.fp16_lm_cross_entropy = fp16_lm_cross_entropy
        self.position_embedding_type = position_embedding_type
        self.model_type = ModelType.encoder_or_decoder
        self.input_tensor = None

        pp = self.pg_collection.pp
        self.pieces = stage_pieces(config.section_layers, pp.size(), pp.rank())
        if pp.size() > 1:
            config.variable_seq_lengths = True  # stage tensors change width along the pipeline
        specs = section_specs or get_stagformer_section_specs(config)
        if len(specs) != config.stag_sections:
            raise ValueError(
                f"section_specs has {len(specs)} entries for stag_sections={config.stag_sections}."
            )

        if pre_process:
            self.embedding = LanguageModelEmbedding(
                config=config,
                vocab_size=vocab_size,
                max_sequence_length=max_sequence_length,
                position_embedding_type=position_embedding_type,
                tp_group=self.pg_collection.tp,
            )
            if config.altup_enabled:
                self.altup_widening = AltUpWidening(config, vocab_size, tp_group=self.pg_collection.tp)
        self.rotary_base = rotary_base
        self.rope_scaling_factor = rope_scaling_factor if rope_scaling else None  # Llama 3's, as megatron's GPT
        if position_embedding_type == "rope":
            self.rotary_pos_emb = RotaryEmbedding(
                kv_channels=config.kv_channels,
                rotary_percent=rotary_percent,
                rotary_interleaved=config.rotary_interleaved,
                rotary_base=rotary_base,
                rope_scaling=rope_scaling,
                rope_scaling_factor=rope_scaling_factor,
                use_cpu_initialization=config.use_cpu_initialization,
                cp_group=self.pg_collection.cp,
            )
        self.blocks = SectionPieces(
            [self._build_piece(piece, specs[piece.section]) for piece in self.pieces],
            self.pieces,
            config.stag_shared_weights,
        )
        if config.stag_shared_weights:
            self._alias_shared_layers()

        if post_process:
            if config.stag_output == "combine":
                mix = torch.zeros(config.stag_sections, dtype=config.params_dtype)
                mix[-1] = 1.0  # start as "last section only"
                self.section_mix = torch.nn.Parameter(mix)
                # under SP each rank sees part of the sequence: partial grads, summed over TP
                self.section_mix.sequence_parallel = config.sequence_parallel
            self.output_layer = ColumnParallelLinear(
                config.hidden_size,
                vocab_size,
                config=config,
                init_method=config.init_method,
                bias=False,
                skip_bias_add=False,
                gather_output=not parallel_output,
                skip_weight_param_allocation=pre_process and share_embeddings_and_output_weights,
                tp_group=self.pg_collection.tp,
            )
        if pre_process or post_process:
            self.setup_embeddings_and_output_layer()
        if config.stag_shared_weights and pp.size() > 1:
            from megatron_stag.training.shared_weight_sync import broadcast_shared_weights

            broadcast_shared_weights(self)

    def _build_piece(self, piece, spec: ModuleSpec) -> TransformerBlock:
        norm = spec.submodules.input_layernorm
        if norm is not SequenceParallelNorm:
            norm = LayerNormImpl if norm.__name__ != "IdentityOp" else None
        if norm is None:
            from megatron.core.extensions.transformer_engine import TENorm

            norm = TENorm
        if self.config.altup_enabled:
            norm = AltUpCollapseNorm(norm)
        return TransformerBlock(
            config=self.config.section_config(piece.section_layers, piece.first_layer),
            spec=TransformerBlockSubmodules(layer_specs=[spec] * piece.num_layers, layer_norm=norm),
            post_layer_norm=True,
            pre_process=True,  # inputs are handed to the block explicitly, never via set_input_tensor
            post_process=piece.ends_section,
            pg_collection=self.pg_collection,
        )

    def _alias_shared_layers(self) -> None:
        """Make every later section's shared submodules the very modules of this stage's first copy."""
        owners = self.blocks[0].layers
        for piece, block in zip(self.pieces[1:], list(self.blocks)[1:]):
            for owner, layer in zip(owners, block.layers):
                for name in SHARED_LAYER_MODULES:
                    if hasattr(owner, name):
                        setattr(layer, name, getattr(owner, name))

    def shared_weight_replicas(self) -> list[torch.nn.Parameter]:
        """Parameters of this stage's shared layers (one copy of each), in layer order."""
        if not self.config.stag_shared_weights:
            return []
        params = []
        for layer in self.blocks[0].layers:
            for name in SHARED_LAYER_MODULES:
                if hasattr(layer, name):
                    params.extend(getattr(layer, name).parameters())
        return params

    def sharded_state_dict(self, prefix: str = "", sharded_offsets=(), metadata=None):
        """megatron's LanguageModule entries, with extra embedding copies marked as replicas.

        Decode models hold the embedding (and AltUp's widening) on every pipeline rank (each
        section re-embeds the tokens); only the first stage's copy is the main replica, so each
        shard is written once.
        """
        sd = super().sharded_state_dict(prefix, sharded_offsets, metadata)
        pp_rank = self.pg_collection.pp.rank()
        if self.pre_process and pp_rank > 0:
            for key, value in sd.items():
                if key.startswith((f"{prefix}embedding.", f"{prefix}altup_widening.")) and hasattr(value, "replica_id"):
                    value.replica_id = (pp_rank,) + tuple(value.replica_id[1:])
        return sd

    def load_state_dict(self, state_dict, strict: bool = True):
        """Accepts state dicts without the aliases of shared layers (distributed checkpoints)."""
        state_dict = dict(state_dict)
        for alias, owner in self.blocks.alias_prefixes("blocks.").items():
            for key in [k for k in state_dict if k.startswith(owner)]:
                state_dict.setdefault(alias + key[len(owner):], state_dict[key])
        return super().load_state_dict(state_dict, strict=strict)

    def set_input_tensor(self, input_tensor) -> None:
        if isinstance(input_tensor, list):
            if len(input_tensor) != 1:
                raise ValueError("StagFormerModel takes one stage tensor from the previous stage.")
            input_tensor = input_tensor[0]
        self.input_tensor = input_tensor

    # ------------------------------------------------------------------ forward
    def embed(self, input_ids: Tensor, position_ids: Tensor) -> Tensor:
        """Token ids [b, s] -> what every section starts from, [s, b, d] (or [s, b, K*d] with AltUp)."""
        e = self.embedding(input_ids=input_ids, position_ids=position_ids)
        return self.altup_widening(e, input_ids) if self.config.altup_enabled else e

    def _stage_inputs(self, input_ids, position_ids):
        """(h, e, finished outputs) at the start of this stage."""
        if self.pre_process:
            e = self.embed(input_ids, position_ids)
            return e, e, []
        n = stream_slots(self.pieces, self._combine, True)
        streams = 1 if self.pieces[0].starts_section else 2  # e, and h mid-section: K*d wide
        d = self.config.hidden_size
        widths = [d * self.config.altup_blocks] * streams + [d] * (n - streams)
        slots = self.input_tensor.split(widths, dim=-1)
        if self.pieces[0].starts_section:
            return None, slots[0], list(slots[1:])
        return slots[0], slots[1], list(slots[2:])

    @property
    def _combine(self) -> bool:
        return self.config.stag_output == "combine"

    def _shifted_context(self, t: Tensor) -> Tensor:
        """Section output -> the next section's cross-attention memory (shifted by one position).

        Under sequence parallelism t is split along the sequence over TP ranks: the shift crosses
        slice boundaries, so it runs on the gathered sequence (backward: each rank keeps its slice).
        """
        if not self.config.sequence_parallel:
            return shift_right_for_stagger(t)
        tp = self.pg_collection.tp
        full = gather_from_sequence_parallel_region(t, tensor_parallel_output_grad=False, group=tp)
        return scatter_to_sequence_parallel_region(shift_right_for_stagger(full), group=tp)

    def run_sections(self, input_ids, position_ids, attention_mask=None):
        """Run this stage's pieces. Returns (h, e, finished outputs) after the last piece."""
        h, e, outs = self._stage_inputs(input_ids, position_ids)
        rotary = None
        if self.position_embedding_type == "rope":
            sp = self.pg_collection.tp.size() if self.config.sequence_parallel else 1
            rotary = self.rotary_pos_emb(e.size(0) * sp)
        for piece, block in zip(self.pieces, self.blocks):
            if piece.starts_section:
                h = e
            context = self._shifted_context(outs[-1]) if piece.section > 0 else None
            h = block(h, attention_mask, context=context, rotary_pos_emb=rotary)
            if piece.ends_section:
                outs = outs + [h] if self._combine else [h]
        return h, e, outs

    def section_output(self, outs: list[Tensor]) -> Tensor:
        """The hidden state the output layer reads: last section, or the learned mix."""
        if self._combine:
            return sum(w * t for w, t in zip(self.section_mix, outs))
        return outs[-1]

    def forward(
        self,
        input_ids: Tensor,
        position_ids: Tensor,
        attention_mask: Optional[Tensor] = None,
        labels: Optional[Tensor] = None,
        loss_mask: Optional[Tensor] = None,
        decoder_input: Optional[Tensor] = None,
        packed_seq_params=None,
        **unused,
    ) -> Tensor:
        if packed_seq_params is not None or decoder_input is not None:
            raise ValueError("StagFormerModel supports neither packed sequences nor decoder_input.")
        h, e, outs = self.run_sections(input_ids, position_ids, attention_mask)
        if not self.post_process:
            mid = not self.pieces[-1].ends_section
            return torch.cat(([h] if mid else []) + [e] + outs, dim=-1)
        weight = self.shared_embedding_or_output_weight() if self.share_embeddings_and_output_weights else None
        logits, _ = self.output_layer(self.section_output(outs), weight=weight)
        if labels is None:
            return logits.transpose(0, 1).contiguous()  # [s, b, v] -> [b, s, v]
        return self.compute_language_model_loss(labels, logits)
