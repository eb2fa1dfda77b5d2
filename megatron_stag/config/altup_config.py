"""AltUpConfig: megatron's TransformerConfig plus the Alternating-Updates fields.

Paper: Baykal et al., "Alternating Updates for Efficient Transformers" (arXiv 2301.13310); the
input-dependent form is Gemma 3n's. Field names equal the command-line flags (`--altup-blocks` ->
`altup_blocks`). `altup_blocks = 1` and `altup_sequence_stride = 1` leave the model untouched
(megatron's GPT). Validation runs before megatron's `__post_init__`, so a bad setting is reported by
its own name before anything is built.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from megatron.core.transformer.transformer_config import TransformerConfig

ALTUP_FORMS = ("standard", "gemma3n")
ALTUP_SCHEDULES = ("alternating", "fixed")
ALTUP_EMBEDDINGS = ("recycled", "widened", "projected")
ALTUP_OUTPUTS = ("sum", "mean", "learned", "projected")


class AltUpConfigError(ValueError):
    """An invalid AltUp configuration; the message names the field, the value and the fix."""


@dataclass
class AltUpConfig(TransformerConfig):
    """TransformerConfig with AltUp's widened residual stream (K blocks of width hidden_size)."""

    altup_blocks: int = 1
    """K: blocks in the residual stream (1 = no AltUp)."""

    altup_schedule: str = "alternating"
    """'alternating': layer l computes block l mod K; 'fixed': always block altup_fixed_block."""

    altup_fixed_block: int = 0
    """The computed block under altup_schedule='fixed' (and the Gemma 3n form)."""

    altup_embedding: str = "recycled"
    """'recycled': the d-wide embedding copied into every block; 'widened': a V x K*d table (block 0
    is the ordinary, possibly tied, table); 'projected': Gemma 3n's learned d x d projections."""

    altup_output: str = "sum"
    """K*d -> d before the final norm: 'sum' or 'mean' of the blocks, 'learned' (K*d -> d linear),
    or 'projected' (Gemma 3n: blocks 1.. projected, rescaled to block 0's RMS, then averaged)."""

    altup_form: str = "standard"
    """'standard': learned scalar predict/correct coefficients (p = I, g = 1 at init);
    'gemma3n': coefficients from a router on the active block (input-dependent)."""

    altup_coef_clip: Optional[float] = None
    """Gemma 3n form: clip the coefficient weights to [-clip, clip] in the forward (Gemma uses 120)."""

    altup_sequence_stride: int = 1
    """Sequence-AltUp stride k: a layer runs on every k-th token (anchors), the others are predicted
    from their own input and their anchor at or before them (1 = off)."""

    altup_compile: bool = False
    """Fused predict and correct: the standard form runs layers/altup_triton.py (Triton kernels on CUDA,
    the same equations in torch on CPU: correct recomputes the prediction instead of storing it and
    writes the next layer's input); the Gemma 3n form uses torch.compile."""

    altup_first_layer: int = 0
    """Set by the model for the section piece it builds: index of the piece's first layer inside
    its section, so the alternating schedule counts layers across pipeline stages."""

    def __post_init__(self):
        self._validate_altup()
        super().__post_init__()

    @property
    def altup_enabled(self) -> bool:
        return self.altup_blocks > 1

    def _validate_altup(self) -> None:
        k = self.altup_blocks
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise AltUpConfigError(
                f"altup_blocks={k!r}: the number of stream blocks K must be an integer >= 1 "
                f"(1 = no AltUp, 2 or 4 are usual)."
            )
        stride = self.altup_sequence_stride
        if isinstance(stride, bool) or not isinstance(stride, int) or stride < 1:
            raise AltUpConfigError(
                f"altup_sequence_stride={stride!r}: the Sequence-AltUp stride must be an integer "
                f">= 1 (1 = off, 2 = the layer runs on every other token)."
            )
        for name, value, choices in (
            ("altup_schedule", self.altup_schedule, ALTUP_SCHEDULES),
            ("altup_embedding", self.altup_embedding, ALTUP_EMBEDDINGS),
            ("altup_output", self.altup_output, ALTUP_OUTPUTS),
            ("altup_form", self.altup_form, ALTUP_FORMS),
        ):
            if value not in choices:
                raise AltUpConfigError(f"{name}={value!r}: choose one of {', '.join(choices)}.")
        if stride > 1 and k > 1:
            raise AltUpConfigError(
                f"altup_sequence_stride={stride} with altup_blocks={k}: Sequence-AltUp alternates "
                f"along the sequence, not over stream blocks; use one of the two (set "
                f"--altup-blocks 1 or --altup-sequence-stride 1)."
            )
        if not 0 <= self.altup_fixed_block < k:
            raise AltUpConfigError(
                f"altup_fixed_block={self.altup_fixed_block} is outside the {k} stream blocks: "
                f"use 0..{k - 1}."
            )
        if self.altup_form == "gemma3n":
            if k < 2:
                raise AltUpConfigError("altup_form='gemma3n' needs altup_blocks >= 2 (Gemma 3n uses 4).")
            if self.altup_schedule != "fixed":
                raise AltUpConfigError(
                    "altup_form='gemma3n' always computes one fixed block (block 0 in Gemma 3n): set "
                    "altup_schedule='fixed' (--altup-schedule fixed)."
                )
        clip = self.altup_coef_clip
        if clip is not None:
            if self.altup_form != "gemma3n":
                raise AltUpConfigError(
                    "altup_coef_clip clips the router coefficient weights of altup_form='gemma3n'; "
                    "the standard form has none: drop --altup-coef-clip or set --altup-form gemma3n."
                )
            if not clip > 0:
                raise AltUpConfigError(f"altup_coef_clip={clip!r}: use a positive bound (Gemma: 120).")
        if k == 1 and (self.altup_embedding != "recycled" or self.altup_output != "sum"
                       or self.altup_form != "standard"):
            raise AltUpConfigError(
                "altup_embedding / altup_output / altup_form only apply with altup_blocks >= 2: "
                "set --altup-blocks or leave them at their defaults."
            )
        if (self.altup_embedding == "projected") != (self.altup_output == "projected"):
            raise AltUpConfigError(
                f"altup_embedding={self.altup_embedding!r} with altup_output={self.altup_output!r}: "
                f"Gemma 3n's learned projections widen and collapse together; set both to "
                f"'projected' or neither."
            )
        if stride > 1 and self.sequence_parallel:
            raise AltUpConfigError(
                "altup_sequence_stride > 1 with sequence_parallel: anchors would straddle the "
                "sequence shards; turn off --sequence-parallel for Sequence-AltUp."
            )

    def altup_active_block(self, layer_in_section: int) -> int:
        """The block layer `layer_in_section` (0-based, inside its section) computes."""
        if self.altup_schedule == "fixed":
            return self.altup_fixed_block
        return layer_in_section % self.altup_blocks
