"""StagFormer's command-line flags, derived from StagFormerConfig's fields (one name each way).

`add_stagformer_args` has the shape of megatron.training's `extra_args_provider` (it takes and
returns an argparse parser), so a Megatron-LM `pretrain_gpt.py` or our own entry points get
`--stag-sections`, `--stag-section-layers`, `--stag-shared-weights`, `--stag-cross-window` and
`--stag-output`; `stagformer_kwargs(args)` turns parsed flags back into config keyword arguments.
"""

from __future__ import annotations

import argparse
import dataclasses

from megatron_stag.config.stagformer_config import OUTPUT_MODES, StagFormerConfig

STAG_FIELDS = [f for f in dataclasses.fields(StagFormerConfig) if f.name.startswith("stag_") and f.init]


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_stagformer_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    group = parser.add_argument_group("StagFormer (megatron-stag)")
    helps = {
        "stag_sections": "number of staggered sections p (1 = plain GPT)",
        "stag_section_layers": "explicit layers per section, e.g. 10 14 (default: even split)",
        "stag_shared_weights": "run the same layers in every section",
        "stag_cross_window": "cross-attention window W >= 1 (default: all earlier positions)",
        "stag_output": "logits from the last section or a learned mix of all sections",
    }
    for f in STAG_FIELDS:
        kw = dict(dest=f.name, default=f.default, help=helps[f.name])
        if f.name == "stag_section_layers":
            kw.update(type=int, nargs="+")
        elif f.name == "stag_shared_weights":
            kw.update(action="store_true")
        elif f.name == "stag_output":
            kw.update(choices=OUTPUT_MODES)
        else:
            kw.update(type=int)
        group.add_argument(_flag(f.name), **kw)
    return parser


def stagformer_kwargs(args: argparse.Namespace) -> dict:
    """The StagFormerConfig keyword arguments carried by parsed flags."""
    return {f.name: getattr(args, f.name) for f in STAG_FIELDS}
