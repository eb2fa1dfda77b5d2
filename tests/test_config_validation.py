"""Bad StagFormer settings fail early, by name, with the fix; placement is a pure function."""

import re

import pytest

from megatron_stag.config.section_layout import (
    LayoutError, StagePiece, section_layer_counts, stage_pieces, stream_slots)
from megatron_stag.config.stagformer_config import StagConfigError, StagFormerConfig


def make(**kw):
    base = dict(num_layers=4, hidden_size=32, num_attention_heads=4, stag_sections=2)
    base.update(kw)
    return StagFormerConfig(**base)


@pytest.mark.parametrize("kw, field", [
    (dict(num_layers=5), "num_layers=5 is not divisible by stag_sections=2"),
    (dict(stag_sections=0), "stag_sections=0"),
    (dict(stag_section_layers=[1, 2]), "sums to 3 but num_layers=4"),
    (dict(stag_section_layers=[4]), "has 1 entries but stag_sections=2"),
    (dict(stag_cross_window=0), "stag_cross_window=0"),
    (dict(stag_cross_window=2.5), "stag_cross_window=2.5"),
    (dict(stag_shared_weights=True, stag_section_layers=[1, 3]), "is uneven"),
    (dict(stag_shared_weights=True, stag_sections=1), "needs stag_sections >= 2"),
    (dict(stag_output="mean"), "stag_output='mean'"),
    (dict(stag_output="combine", stag_sections=1), "needs stag_sections >= 2"),
    (dict(tensor_model_parallel_size=3), "num_attention_heads=4 is not divisible by"),
    (dict(pipeline_model_parallel_size=3), "not aligned with stag_sections=2"),
    (dict(pipeline_model_parallel_size=8), "cannot split evenly"),
    (dict(stag_sections=4, pipeline_model_parallel_size=3), "not aligned with stag_sections=4"),
])
def test_bad_configs_name_the_field(kw, field):
    with pytest.raises(StagConfigError, match=re.escape(field)):
        make(**kw)


def test_errors_come_before_megatrons_own_checks():
    """Our validation runs first: a StagFormer error is reported even when megatron would also fail."""
    with pytest.raises(StagConfigError):
        make(stag_cross_window=0, num_attention_heads=3, tensor_model_parallel_size=2)


def test_valid_layouts():
    assert make(stag_section_layers=[1, 3]).section_layers == [1, 3]
    import torch

    assert make(pipeline_model_parallel_size=4, pipeline_dtype=torch.float32).section_layers == [2, 2]
    make(stag_sections=4, num_layers=8, pipeline_model_parallel_size=2, pipeline_dtype=torch.float32)


def test_stage_pieces_pp_multiple_of_sections():
    # p=2 sections of 4 layers on PP=4: each section spans 2 stages.
    assert stage_pieces([4, 4], 4, 0) == [StagePiece(0, 0, 2, 4, 0)]
    assert stage_pieces([4, 4], 4, 3) == [StagePiece(1, 2, 2, 4, 1)]
    # p=4 on PP=2: whole sections per stage.
    assert [p.section for p in stage_pieces([1, 1, 1, 1], 2, 1)] == [2, 3]
    with pytest.raises(LayoutError):
        stage_pieces([3, 3], 4, 0)


def test_stream_slots():
    # PP=2, p=2: stage 0 sends [e, t0]; stage 1 receives the same.
    s0, s1 = stage_pieces([2, 2], 2, 0), stage_pieces([2, 2], 2, 1)
    assert stream_slots(s0, False, receiving=False) == 2
    assert stream_slots(s1, False, receiving=True) == 2
    # PP=4, p=2: mid-section stages carry h as well; combine keeps every finished output.
    pieces = [stage_pieces([2, 2], 4, r) for r in range(4)]
    assert [stream_slots(p, False, receiving=False) for p in pieces[:3]] == [2, 2, 3]
    assert stream_slots(pieces[3], True, receiving=True) == 3
    assert section_layer_counts(6, 3) == [2, 2, 2]


def test_model_descriptions_on_disk_fail_by_name(tmp_path):
    """Issue 15: a corrupt model_args.json or an exported config.json with bad values was a traceback
    deep in model construction; now one error names the file and the field."""
    import json
    from dataclasses import asdict

    from megatron_stag.models.model_args import ModelArgs
    from megatron_stag.serving.model import PlainConfig

    bad = tmp_path / "model_args.json"
    bad.write_text('{"vocab_size": 64,')
    with pytest.raises(ValueError, match="model_args.json is not valid JSON"):
        ModelArgs.load(bad)
    good = PlainConfig(vocab_size=64, max_sequence_length=32, hidden_size=32, ffn_hidden_size=128,
                       num_attention_heads=4, num_query_groups=4, head_dim=8, section_layers=[2, 2])
    for change, message in ((dict(num_attention_heads=-4), "num_attention_heads=-4 must be a whole number"),
                            (dict(num_query_groups=0), "num_query_groups=0"),
                            (dict(section_layers=[]), "section_layers=\\[\\] must list"),
                            (dict(hidden_size="32"), "hidden_size='32'"),
                            (dict(num_query_groups=3), "num_query_groups=3 must divide"),
                            (dict(surprise=1), "unknown fields \\['surprise'\\]")):
        path = tmp_path / "config.json"
        path.write_text(json.dumps({**asdict(good), **change}))
        with pytest.raises(ValueError, match=f"config.json: .*{message}" if "unknown" not in message else message):
            PlainConfig.load(path)


def test_an_even_split_written_out_is_the_same_model():
    """An import records its layer split ([2, 2]); a recipe leaves an even one to its default (None).
    Comparing run files, the two are one model, and any other difference is named."""
    from megatron_stag.models.model_args import ModelArgs

    fresh = ModelArgs(vocab_size=64, max_sequence_length=32, num_layers=4, hidden_size=32, num_attention_heads=4,
                      stag_sections=2)
    imported = ModelArgs(**{**fresh.__dict__, "stag_section_layers": [2, 2]})
    assert fresh.differences(imported) == imported.differences(fresh) == []
    uneven = ModelArgs(**{**fresh.__dict__, "stag_section_layers": [1, 3], "hidden_size": 64})
    assert fresh.differences(uneven) == ["hidden_size 64 -> 32", "stag_section_layers [1, 3] -> [2, 2]"]
