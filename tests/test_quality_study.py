"""The quality study's verdicts and table: seed means, the seed spread, and step times compared only
between runs that shared the GPU alike (synthetic results; no training)."""

import json

from megatron_stag.benchmarks.quality_study import _report


def _run(loss, ms=100.0, sharing=1):
    return dict(params=10e6, layers=12, tokens=112e6, final_validation_loss=loss, final_validation_ppl=2.0 ** loss,
                median_iteration_ms=ms, runs_sharing_the_gpu=sharing)


def _budget(tmp_path, runs):
    out = tmp_path / "quality_budget"
    out.mkdir()
    _report(dict(recipe="study-budget", runs=runs), out)
    return json.loads((out / "quality_budget.json").read_text())["hypotheses"], (out / "quality_budget.md").read_text()


def test_verdicts_use_the_seed_mean_and_the_spread_of_the_pairs_that_ran(tmp_path):
    runs = {"baseline L=6": _run(1.30), "baseline L=12": _run(1.20), "baseline L=12 seed 2": _run(1.18),
            # seed 1 alone would be within 1.5% of L=12's mean (1.19); the seed mean (1.22) is not
            "StagFormer 2x6 separate": _run(1.20), "StagFormer 2x6 separate seed 2": _run(1.24),
            "StagFormer 2x6 window 1": _run(1.21),
            "StagFormer 2x6 null entry at position 0 only": _run(1.25)}  # 0.03 from the mean; spread 0.04
    verdicts, md = _budget(tmp_path, runs)
    v = {text.split(":")[0].split(" (")[0]: verdict for text, verdict in verdicts.items()}
    assert v["precondition"] == "held"
    assert v["StagFormer 2x6 within 1.5% of baseline L=12 and below L=6"] == "did not hold"
    assert v["window 1 within 1% of full cross-attention"] == "held"
    assert v["the null entry for position 0 only changes the loss by less than the seed spread"] == "held"
    assert v["StagFormer 2x6 shared below baseline L=6"] == "not run"
    assert v["AltUp K=2 below baseline L=12"] == "not run"
    assert "Seed spread (largest |seed 1 - seed 2| of the pairs that ran): 0.0400" in md


def test_step_time_is_compared_only_with_an_l12_run_that_shared_the_gpu_alike(tmp_path):
    runs = {"baseline L=12": _run(1.2, ms=200.0, sharing=3), "baseline L=12 seed 2": _run(1.2, ms=150.0, sharing=2),
            "StagFormer 2x6 separate": _run(1.3, ms=220.0, sharing=3),
            "StagFormer 2x6 window 1": _run(1.3, ms=180.0, sharing=2),
            "AltUp K=2 recycled (L=12)": _run(1.1, ms=90.0, sharing=1)}
    _, md = _budget(tmp_path, runs)
    cells = [[c.strip() for c in line.split("|")[1:-1]] for line in md.splitlines() if line.startswith("| ")]
    rows = {c[0]: c[-1] for c in cells}
    assert rows["StagFormer 2x6 separate"] == "1.10"
    assert rows["StagFormer 2x6 window 1"] == "1.20"
    assert rows["AltUp K=2 recycled (L=12)"] == ""  # it ran alone; no L=12 run did
