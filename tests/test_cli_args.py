"""The StagFormer flag surface: one flag per config field, parsed back into a valid config."""

import argparse

import pytest

from megatron_stag.config.cli_args import STAG_FIELDS, add_stagformer_args, stagformer_kwargs
from megatron_stag.config.stagformer_config import StagConfigError, StagFormerConfig


def test_flags_mirror_config_fields():
    """Pins the public flags (catches a field added without a flag, or a renamed flag)."""
    parser = add_stagformer_args(argparse.ArgumentParser())
    flags = {a.option_strings[0] for a in parser._actions if a.option_strings and a.dest != "help"}
    assert flags == {"--stag-sections", "--stag-section-layers", "--stag-shared-weights",
                     "--stag-cross-window", "--stag-output", "--stag-null-entry", "--altup-blocks", "--altup-schedule",
                     "--altup-fixed-block", "--altup-embedding", "--altup-output", "--altup-form",
                     "--altup-coef-clip", "--altup-sequence-stride", "--altup-compile"}
    assert {f.name for f in STAG_FIELDS} == {f[2:].replace("-", "_") for f in flags}


def test_flags_build_a_config():
    args = add_stagformer_args(argparse.ArgumentParser()).parse_args(
        "--stag-sections 2 --stag-section-layers 1 3 --stag-cross-window 4 --stag-output last".split())
    cfg = StagFormerConfig(num_layers=4, hidden_size=32, num_attention_heads=4, **stagformer_kwargs(args))
    assert (cfg.section_layers, cfg.stag_cross_window) == ([1, 3], 4)
    defaults = stagformer_kwargs(add_stagformer_args(argparse.ArgumentParser()).parse_args([]))
    assert defaults["stag_sections"] == 1 and defaults["stag_cross_window"] is None
    bad = add_stagformer_args(argparse.ArgumentParser()).parse_args(["--stag-cross-window", "0"])
    with pytest.raises(StagConfigError, match="stag_cross_window=0"):
        StagFormerConfig(num_layers=4, hidden_size=32, num_attention_heads=4, **stagformer_kwargs(bad))
