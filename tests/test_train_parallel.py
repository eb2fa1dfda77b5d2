"""The multi-GPU training benchmark (`benchmarks/train_parallel.py`) on 2 CPU ranks (gloo): every model
of a layout runs through `pretrain` in that layout, and each row's figures are its own run's log and
model's."""

import json
import re
import statistics
import subprocess
import sys
from unittest import mock

import pytest

from megatron_stag.benchmarks import train_parallel
from megatron_stag.benchmarks.train_throughput import step_flops
from megatron_stag.models.model_args import ModelArgs


def test_train_parallel_times_each_model_in_the_layout(quickstart_run, tmp_path):
    data = quickstart_run[0] / "data"
    out, work = tmp_path / "rows.json", tmp_path / "work"
    proc = subprocess.run([sys.executable, "-m", "megatron_stag.benchmarks.train_parallel", "--layouts", "pp",
                           "--recipes", "tiny-cpu-gpt,tiny-cpu-stag", "--iters", "9", "--log-interval", "3",
                           "--global-batch", "8", "--micro-batch", "4", "--data", str(data / "stdlib_text_document"),
                           "--tokenizer", str(data / "stdlib.model"), "--work", str(work), "--out", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    assert [(r["recipe"], r["layout"]) for r in rows] == [("tiny-cpu-gpt", "PP=2"), ("tiny-cpu-stag", "PP=2")]
    for r in rows:
        run = work / "PP=2" / r["recipe"]
        assert re.search(r"pipeline_model_parallel_size \.+ 2\n", (run / "megatron_arguments.txt").read_text())
        assert len(r["logged_ms"]) == 2  # iterations 6 and 9: the first logged interval (warm-up) is left out
        assert r["ms_per_iteration"] == statistics.median(r["logged_ms"])
        assert r["tokens_per_s"] == pytest.approx(8 * 128 / (r["ms_per_iteration"] / 1e3))
        assert r["tflops_per_iteration"] == step_flops(ModelArgs.load(run / "model_args.json"), 8, 128) / 1e12
        assert r["tflops_per_s"] == pytest.approx(r["tflops_per_iteration"] / (r["ms_per_iteration"] / 1e3))
        assert "mfu" not in r  # no bf16 peak on a CPU
    assert ModelArgs.load(work / "PP=2" / "tiny-cpu-stag" / "model_args.json").stag_sections == 2
    assert rows[1]["tflops_per_iteration"] > rows[0]["tflops_per_iteration"]  # its cross-attention counts
    assert rows[0]["vs_baseline"] == 1.0
    assert rows[1]["vs_baseline"] == pytest.approx(rows[1]["tflops_per_s"] / rows[0]["tflops_per_s"])


@pytest.mark.parametrize("args,message", [
    (["--layouts", "pp,dp"], "--layouts pp,dp: unknown dp"),
    (["--data", "d"], "--data and --tokenizer go together"),
    (["--iters", "10"], "--iters 10: at least 3 x --log-interval (15)"),
    (["--recipes", "tiny-cpu-gpt,tiny-cpu-stagg"], "--recipes tiny-cpu-gpt,tiny-cpu-stagg: recipe 'tiny-cpu-stagg' not found"),
])
def test_train_parallel_names_bad_options_before_any_run(tmp_path, args, message):
    with pytest.raises(SystemExit, match=re.escape(message)):
        train_parallel.main(args + ["--work", str(tmp_path / "work"), "--out", str(tmp_path / "o.json")])
    assert not (tmp_path / "work").exists()


def test_train_parallel_refuses_more_gpus_than_the_machine_has(tmp_path):
    with mock.patch("torch.cuda.is_available", return_value=True), \
            mock.patch("torch.cuda.device_count", return_value=1), \
            pytest.raises(SystemExit, match=re.escape("--gpus 2: this machine has 1 GPU(s).")):
        train_parallel.main(["--gpus", "2", "--work", str(tmp_path / "work"), "--out", str(tmp_path / "o.json")])
    assert not (tmp_path / "work").exists()
