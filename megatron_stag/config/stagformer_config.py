"""StagFormerConfig: megatron's TransformerConfig plus the staggered-section fields.

Paper: Cutler et al., "StagFormer: Time Staggering Transformer Decoding" (arXiv 2501.15665), sections
2-4. Field names equal the command-line flags (`--stag-sections` -> `stag_sections`). Validation runs
before megatron's own `__post_init__`, so a bad StagFormer setting is reported by its own name before
any model, process group or tensor exists.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Optional

from megatron_stag.config.altup_config import AltUpConfig
from megatron_stag.config.section_layout import LayoutError, section_layer_counts, stage_pieces

OUTPUT_MODES = ("last", "combine")
NULL_ENTRY_MODES = ("all", "first")


class StagConfigError(ValueError):
    """An invalid StagFormer configuration; the message names the field, the value and the fix."""


@dataclass
class StagFormerConfig(AltUpConfig):
    """TransformerConfig with StagFormer's sections (and AltUp's stream, `AltUpConfig`).

    stag_sections = 1 is megatron's GPT. Section k >= 1 re-embeds the tokens and cross-attends to
    section k-1's final (normed) outputs at positions < i. With AltUp each section carries the
    K-block stream and the next section's cross-attention reads the *collapsed* (d-wide, normed)
    section output, so cross-attention and its cache are the same as without AltUp.
    """

    stag_sections: int = 1
    """Number of staggered sections p (1 = plain GPT)."""

    stag_section_layers: Optional[list[int]] = None
    """Explicit layers per section (e.g. [10, 14]); default: num_layers split evenly."""

    stag_shared_weights: bool = False
    """Run the same layers in every section (only the cross-attention weights are per section)."""

    stag_cross_window: Optional[int] = None
    """Cross-attention window W: section k at i sees section k-1 at i-W..i-1 (None = all < i)."""

    stag_output: str = "last"
    """'last': logits from the last section; 'combine': from a learned mix of all sections' outputs."""

    stag_null_entry: str = "all"
    """Who sees the cross-attention's null entry (the zero entry before position 0): 'all' positions
    (an attention sink in every softmax, what the causal mask over shifted entries gives) or only
    position 0 ('first', the paper's literal reading; needs core_attention='sdpa')."""

    section_layers: list[int] = field(init=False, default_factory=list)

    def __post_init__(self):
        self._validate_sections()
        self._validate_cross_window()
        self._validate_output()
        self._validate_tensor_parallel()
        self._validate_pipeline_alignment()
        if self.altup_sequence_stride > 1 and self.stag_sections > 1:
            raise StagConfigError(
                f"altup_sequence_stride={self.altup_sequence_stride} with stag_sections="
                f"{self.stag_sections}: Sequence-AltUp computes a layer on anchor tokens only, which "
                f"the staggered cross-attention (every position reads the previous section) does not "
                f"support; use --altup-blocks for AltUp inside StagFormer sections."
            )
        if self.num_moe_experts and self.add_bias_linear and not self.moe_grouped_gemm:
            raise StagConfigError(
                "num_moe_experts with add_bias_linear=True: megatron's sequential experts add the "
                "bias in place on a tensor-parallel output and fail in backward; set "
                "add_bias_linear=False (--disable-bias-linear), as MoE recipes do."
            )
        super().__post_init__()

    def _validate_sections(self) -> None:
        try:
            self.section_layers = section_layer_counts(
                self.num_layers, self.stag_sections, self.stag_section_layers
            )
        except LayoutError as err:
            raise StagConfigError(str(err)) from None
        if self.stag_shared_weights:
            if self.stag_sections < 2:
                raise StagConfigError(
                    "stag_shared_weights=True needs stag_sections >= 2: with one section there is "
                    "nothing to share; set --stag-sections 2 or drop --stag-shared-weights."
                )
            if len(set(self.section_layers)) != 1:
                raise StagConfigError(
                    f"stag_shared_weights=True runs the same layers in every section, but "
                    f"stag_section_layers={self.section_layers} is uneven: use an even split."
                )

    def _validate_cross_window(self) -> None:
        w = self.stag_cross_window
        if w is not None and (isinstance(w, bool) or not isinstance(w, int) or w < 1):
            raise StagConfigError(
                f"stag_cross_window={w!r}: the window counts earlier positions and must be an "
                f"integer >= 1 (1 = only the previous token), or unset for full cross-attention."
            )

    def _validate_output(self) -> None:
        if self.stag_output not in OUTPUT_MODES:
            raise StagConfigError(
                f"stag_output={self.stag_output!r}: choose one of {', '.join(OUTPUT_MODES)}."
            )
        if self.stag_null_entry not in NULL_ENTRY_MODES:
            raise StagConfigError(
                f"stag_null_entry={self.stag_null_entry!r}: choose one of {', '.join(NULL_ENTRY_MODES)}."
            )
        if self.stag_output == "combine" and self.stag_sections < 2:
            raise StagConfigError(
                "stag_output='combine' mixes the outputs of several sections: it needs "
                "stag_sections >= 2."
            )

    def _validate_tensor_parallel(self) -> None:
        tp = self.tensor_model_parallel_size
        if self.num_attention_heads % tp:
            raise StagConfigError(
                f"num_attention_heads={self.num_attention_heads} is not divisible by "
                f"tensor_model_parallel_size={tp}: choose a TP size that divides the heads."
            )
        groups = self.num_query_groups or self.num_attention_heads
        if groups % tp and tp % groups:
            raise StagConfigError(
                f"num_query_groups={groups} and tensor_model_parallel_size={tp}: one must divide "
                f"the other."
            )

    def _validate_pipeline_alignment(self) -> None:
        pp = self.pipeline_model_parallel_size
        if self.virtual_pipeline_model_parallel_size not in (None, 1) and self.stag_sections > 1:
            raise StagConfigError(
                "virtual_pipeline_model_parallel_size is not supported with stag_sections > 1: "
                "megatron's interleaved schedule ignores the variable-width stage tensor."
            )
        try:
            for rank in range(pp):
                stage_pieces(self.section_layers, pp, rank)
        except LayoutError as err:
            raise StagConfigError(str(err)) from None

    def section_config(self, section_layers: int, first_layer: int = 0) -> "StagFormerConfig":
        """A copy for building one section as its own TransformerBlock.

        megatron numbers layers from the pipeline offset of `config`; a section is numbered from 1
        inside itself (our checkpoint keys and caches add the section's offsets), so the copy has
        the section's layer count and no pipeline split of its own; `first_layer` (the piece's
        offset inside its section) keeps AltUp's alternating schedule global.
        """
        cfg = copy.copy(self)
        cfg.altup_first_layer = first_layer
        cfg.num_layers = section_layers
        cfg.pipeline_model_parallel_size = 1
        cfg.num_layers_in_first_pipeline_stage = None
        cfg.num_layers_in_last_pipeline_stage = None
        cfg.pipeline_model_parallel_layout = None
        return cfg
