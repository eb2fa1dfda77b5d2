"""StagFormer's and AltUp's command-line flags, derived from the config fields (one name each way).

`add_stagformer_args` has the shape of megatron.training's `extra_args_provider` (it takes and
returns an argparse parser), so a Megatron-LM `pretrain_gpt.py` or our own entry points get
`--stag-*` (sections, layers per section, shared weights, cross window, output) and `--altup-*`
(blocks, schedule, embedding, output, form, coefficient clip, sequence stride, compile);
`stagformer_kwargs(args)` turns parsed flags back into config keyword arguments.
"""

from __future__ import annotations

import argparse
import dataclasses

from megatron_stag.config.altup_config import (
    ALTUP_EMBEDDINGS,
    ALTUP_FORMS,
    ALTUP_OUTPUTS,
    ALTUP_SCHEDULES,
)
from megatron_stag.config.stagformer_config import NULL_ENTRY_MODES, OUTPUT_MODES, StagFormerConfig

INTERNAL_FIELDS = {"altup_first_layer"}  # set by the model per section piece, not by users
STAG_FIELDS = [f for f in dataclasses.fields(StagFormerConfig)
               if f.name.startswith(("stag_", "altup_")) and f.init and f.name not in INTERNAL_FIELDS]

HELP = {
    "stag_sections": "number of staggered sections p (1 = plain GPT)",
    "stag_section_layers": "explicit layers per section, e.g. 10 14 (default: even split)",
    "stag_shared_weights": "run the same layers in every section",
    "stag_cross_window": "cross-attention window W >= 1 (default: all earlier positions)",
    "stag_output": "logits from the last section or a learned mix of all sections",
    "stag_null_entry": "who sees the cross-attention's null entry: every position, or only position 0",
    "altup_blocks": "AltUp stream blocks K (1 = no AltUp)",
    "altup_schedule": "which block a layer computes: layer mod K, or a fixed block",
    "altup_fixed_block": "the block computed under --altup-schedule fixed",
    "altup_embedding": "stream widening: recycled, widened table, or Gemma 3n projections",
    "altup_output": "stream collapse before the final norm",
    "altup_form": "standard scalar coefficients or Gemma 3n's input-dependent router",
    "altup_coef_clip": "Gemma 3n form: clip coefficient weights to [-clip, clip]",
    "altup_sequence_stride": "Sequence-AltUp stride (1 = off)",
    "altup_compile": "fused AltUp predict/correct: Triton kernels for the standard form (its equations in "
                     "torch on CPU), torch.compile for Gemma 3n's",
}
CHOICES = {"stag_output": OUTPUT_MODES, "stag_null_entry": NULL_ENTRY_MODES, "altup_schedule": ALTUP_SCHEDULES,
           "altup_embedding": ALTUP_EMBEDDINGS, "altup_output": ALTUP_OUTPUTS, "altup_form": ALTUP_FORMS}
FLOATS = {"altup_coef_clip"}


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_stagformer_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    group = parser.add_argument_group("StagFormer and AltUp (megatron-stag)")
    for f in STAG_FIELDS:
        kw = dict(dest=f.name, default=f.default, help=HELP[f.name])
        if f.name == "stag_section_layers":
            kw.update(type=int, nargs="+")
        elif isinstance(f.default, bool):
            kw.update(action="store_true")
        elif f.name in CHOICES:
            kw.update(choices=CHOICES[f.name])
        else:
            kw.update(type=float if f.name in FLOATS else int)
        group.add_argument(_flag(f.name), **kw)
    return parser


def stagformer_kwargs(args: argparse.Namespace) -> dict:
    """The StagFormerConfig keyword arguments carried by parsed flags."""
    return {f.name: getattr(args, f.name) for f in STAG_FIELDS}
