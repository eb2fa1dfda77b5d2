"""The public entry points: `megatron-stag --help`, the quickstart (shortened; same code path as
`make quickstart`: prepare-data -> megatron pretrain -> staggered generation), and `megatron-stag
generate` with its error messages."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap

import pytest

from tests.cli_helpers import cli
from tests.dist_helpers import free_port


def test_help_lists_subcommands():
    out = cli("--help").stdout
    for sub in ("quickstart", "prepare-data", "pretrain", "generate", "plot", "export"):
        assert sub in out


def test_quickstart_trains_and_decodes_exactly(quickstart_run):
    out, proc = quickstart_run
    summary = json.loads((out / "summary.json").read_text())
    assert summary["final_loss"] < summary["first_loss"] - 0.3, summary
    assert summary["decode_vs_forward_max_abs_diff"] < 1e-4
    assert re.search(r"iteration\s+100/\s+100 \|", proc.stdout)  # Megatron's own iteration line
    assert "tokens/s" in proc.stdout and "ETA" in proc.stdout
    assert "validation loss at iteration" in proc.stdout
    for noise in ("No CUDA runtime is found", "one_logger", "UserWarning", "FutureWarning"):  # nothing to act on
        assert noise not in proc.stdout + proc.stderr, noise
    assert (out / "data" / "stdlib_text_document.bin").is_file()
    assert (out / "checkpoints" / "latest_checkpointed_iteration.txt").read_text().strip() == "100"
    recorded = json.loads((out / "checkpoints" / "model_args.json").read_text())  # megatron's names, so copied
    assert (recorded["rotary_base"], recorded["rotary_percent"], recorded["layernorm_epsilon"]) == (10000, 1.0, 1e-5)
    assert recorded["kv_channels"] is None  # hidden / heads: recorded as the default, so older runs resume


def test_generate_from_checkpoint(quickstart_run, tmp_path):
    out, _ = quickstart_run
    jsonl = tmp_path / "out.jsonl"
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("def f(x):\nclass A:\n")
    proc = cli("generate", str(out / "checkpoints"), "--prompt-file", str(prompts),
               "--max-new-tokens", "8", "--output", str(jsonl))
    rows = [json.loads(line) for line in jsonl.read_text().splitlines()]
    assert [r["prompt"] for r in rows] == ["def f(x):", "class A:"]
    assert all(len(r["tokens"]) == 8 for r in rows)
    assert "tokens/s" in proc.stderr


def test_generate_sizes_the_cache_and_groups_the_prompts(quickstart_run, monkeypatch, tmp_path):
    """`generate` makes the engine's caches as long as its longest prompt plus the new tokens, not the
    model's context (above a few rows a step's attention reads every slot of the cache), and decodes
    more prompts than --batch-size in groups, with the completions of one batch (`--deterministic`
    reaches the engine)."""
    from pathlib import Path

    from megatron_stag.cli import build_parser
    from megatron_stag.data.tokenizer import load_tokenizer
    from megatron_stag.serving import engine
    from megatron_stag.serving.convert import describe
    from megatron_stag.serving.generate_cli import generate_from_checkpoint

    made = []

    class Recorded(engine.StaggeredGenerator):
        def __init__(self, model, max_len, batch, **kwargs):
            made.append((max_len, batch, kwargs["deterministic"]))
            super().__init__(model, max_len, batch, **kwargs)

    monkeypatch.setattr(engine, "StaggeredGenerator", Recorded)
    ckpt = quickstart_run[0] / "checkpoints"
    prompts = ["def f(x):", "import os\nimport sys\n", "class A:", "x = [", "for i in"]
    completions = {}
    (tmp_path / "again.jsonl").write_text("an earlier run's\n")
    for size, name, extra in (("64", "64", []), ("2", "2", []), ("2", "again", ["--overwrite", "--deterministic"])):
        out = tmp_path / f"{name}.jsonl"
        ns = build_parser().parse_args(["generate", str(ckpt), "--prompt", "x", "--max-new-tokens", "5",
                                        "--batch-size", size, "--output", str(out), *extra])
        assert generate_from_checkpoint(ns, prompts) == 0
        completions[name] = [json.loads(line) for line in out.read_text().splitlines()]
    assert completions["2"] == completions["64"] == completions["again"]
    assert [r["prompt"] for r in completions["2"]] == prompts
    cfg, tok_dir = describe(Path(ckpt))
    tok = load_tokenizer(tok_dir / "tokenizer.model")
    slots = max(len(tok.tokenize(p)) for p in prompts) + 5
    assert made == [(slots, 5, False), (slots, 2, False), (slots, 2, True)] and slots < cfg.max_sequence_length


def test_generate_errors(quickstart_run, tmp_path):
    out, _ = quickstart_run
    missing = cli("generate", str(tmp_path / "nope"), "--prompt", "x", check=False)
    assert missing.returncode != 0 and "does not exist" in missing.stderr
    ckpt = next((out / "checkpoints").glob("iter_*"))
    broken = tmp_path / "run" / "iter_0000001"  # a save interrupted before Megatron finalised it
    shutil.copytree(ckpt, broken)
    shutil.copy(out / "checkpoints" / "model_args.json", broken.parent)
    (broken / "metadata.json").unlink()
    incomplete = cli("generate", str(broken), "--prompt", "x", check=False)
    assert "incomplete" in incomplete.stderr
    from megatron_stag.checkpointing.checkpoint_io import resolve_checkpoint

    with pytest.raises(FileNotFoundError, match="holds no complete checkpoint yet"):  # no tracker written
        resolve_checkpoint(broken.parent)
    not_ckpt = cli("generate", str(tmp_path), "--prompt", "x", check=False)
    assert "is not a checkpoint" in not_ckpt.stderr
    too_long = cli("generate", str(ckpt), "--prompt", "x = 1\n" * 200, check=False)
    assert "exceeds the context" in too_long.stderr
    no_tok = cli("generate", str(ckpt), "--prompt", "x", "--tokenizer", str(tmp_path / "t.model"),
                 check=False)
    assert "does not exist" in no_tok.stderr


def test_generate_one_section_per_rank_under_torchrun(quickstart_run, tmp_path):
    """`torchrun --nproc_per_node 2 ... generate` decodes with one section per rank and prints what
    the single-process command prints (greedy)."""
    out, _ = quickstart_run
    single = cli("generate", str(out / "checkpoints"), "--prompt", "def f(x):",
                 "--max-new-tokens", "12").stdout
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                           "--master_port", str(free_port()), "-m", "megatron_stag.cli", "generate",
                           str(out / "checkpoints"), "--prompt", "def f(x):", "--max-new-tokens", "12"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout == single


def test_export_and_generate_with_deepspeed(quickstart_run, tmp_path):
    """The one engine prints the same completions (greedy) from a megatron checkpoint (converted in
    memory) and from its export, with and without DeepSpeed around the model, in one process and with
    one section per rank under DeepSpeed's launcher."""
    pytest.importorskip("deepspeed")
    out, _ = quickstart_run
    package = tmp_path / "pkg"
    cli("export", str(out / "checkpoints"), str(package))
    assert sorted(p.name for p in package.iterdir()) == ["config.json", "model.safetensors", "tokenizer.model"]
    umask = os.umask(0)
    os.umask(umask)
    for path in (package, *package.iterdir()):  # issue 20: mkdtemp made the package 0700, unreadable by a team
        assert path.stat().st_mode & 0o777 == (0o777 if path.is_dir() else 0o666) & ~umask, path
    again = cli("export", str(out / "checkpoints"), str(package), check=False)
    assert again.returncode != 0 and "exists" in again.stderr
    args = ["--prompt", "def f(x):", "--prompt", "import os", "--max-new-tokens", "10"]

    def records(path):
        return [json.loads(line) for line in path.read_text().splitlines()]

    cli("generate", str(out / "checkpoints"), *args, "--output", str(tmp_path / "megatron.jsonl"))
    ds = cli("generate", str(package), "--engine", "deepspeed", *args, "--output", str(tmp_path / "ds.jsonl"))
    assert records(tmp_path / "ds.jsonl") == records(tmp_path / "megatron.jsonl")
    assert "Setting accelerator" not in ds.stdout + ds.stderr  # DeepSpeed's CPU notice: nothing to act on
    launcher = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port",
                str(free_port()), "--module", "megatron_stag.cli"]
    proc = subprocess.run(launcher + ["generate", str(package), "--engine", "deepspeed", *args,
                                      "--output", str(tmp_path / "ds2.jsonl")],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert records(tmp_path / "ds2.jsonl") == records(tmp_path / "megatron.jsonl")
    bad_tp = cli("generate", str(package), "--engine", "deepspeed", "--tp", "3", *args, check=False)
    assert bad_tp.returncode != 0 and "--tp 3 does not divide" in bad_tp.stderr
    cli("generate", str(package), *args, "--output", str(tmp_path / "native.jsonl"))
    assert records(tmp_path / "native.jsonl") == records(tmp_path / "megatron.jsonl")
    cli("generate", str(out / "checkpoints"), "--engine", "deepspeed", *args, "--output", str(tmp_path / "ds3.jsonl"))
    assert records(tmp_path / "ds3.jsonl") == records(tmp_path / "megatron.jsonl")
    tp_without_ds = cli("generate", str(out / "checkpoints"), "--tp", "2", *args, check=False)
    assert "add --engine deepspeed" in tp_without_ds.stderr


def test_generate_checks_its_options_before_loading(quickstart_run, tmp_path):
    """Issue 15: one line naming the option, before the model loads (no traceback, nothing lost)."""
    out, _ = quickstart_run
    ckpt = str(out / "checkpoints")
    cases = {
        "the folder": ["--prompt", "x", "--output", str(tmp_path / "missing" / "out.jsonl")],
        "prompt 2 is empty": ["--prompt", "x", "--prompt", ""],
        "--top-p: top_p=0.0": ["--prompt", "x", "--top-p", "0"],
        "--temperature": ["--prompt", "x", "--temperature", "-1"],
        "--batch-size 0": ["--prompt", "x", "--batch-size", "0"],
    }
    bad = tmp_path / "p.jsonl"
    bad.write_text('{"prompt": "ok"}\nnot json\n')
    cases[f"{bad}:2: expected a JSON object"] = ["--prompt-file", str(bad)]
    cases[f"--prompt-file {tmp_path} is a folder"] = ["--prompt-file", str(tmp_path)]
    cases[f"--prompt-file {bad}.txt does not exist"] = ["--prompt-file", f"{bad}.txt"]
    done = tmp_path / "done.jsonl"  # an earlier run's results are not replaced unless asked (--overwrite)
    done.write_text("kept\n")
    cases[f"--output {done} exists: write to a new file, or add --overwrite"] = ["--prompt", "x", "--output", str(done)]
    proc = cli("generate", ckpt, *cases["--top-p: top_p=0.0"], check=False)  # as a user sees it
    assert proc.returncode == 1 and proc.stderr.strip() == "--top-p: top_p=0.0: choose a probability in (0, 1]."
    # every case through the CLI's entry point in one process, which then must not have imported the
    # engine (Triton, dynamo) or DeepSpeed: the checks come before any heavy work
    check = textwrap.dedent("""
        import contextlib, io, json, sys
        from megatron_stag.cli import main
        out = []
        for args in json.loads(sys.argv[1]):
            err = io.StringIO()
            with contextlib.redirect_stdout(err), contextlib.redirect_stderr(err):
                try:
                    code = main(["generate", *args])
                except SystemExit as stop:
                    code = stop.code
            out.append([code if isinstance(code, int) else 1, err.getvalue() + str(code)])
        heavy = [m for m in ("megatron_stag.serving.engine", "deepspeed", "triton") if m in sys.modules]
        print(json.dumps([out, heavy]))
    """)
    run = subprocess.run([sys.executable, "-c", check, json.dumps([[ckpt, *args] for args in cases.values()])],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    results, heavy = json.loads(run.stdout.splitlines()[-1])
    for message, (code, text) in zip(cases, results):
        assert code != 0 and message in text, (message, text[-2000:])
        assert "Traceback" not in text and "generating" not in text
    assert heavy == []
    assert done.read_text() == "kept\n"


def test_stop_strings_match_whole(quickstart_run):
    """Issue 15: `--stop "foo bar"` once stopped at the last token of the string alone."""
    import argparse

    from megatron_stag.serving.generate_cli import _until_stop, prepare_prompts

    out, _ = quickstart_run
    ns = argparse.Namespace(tokenizer=None, max_new_tokens=4, temperature=0.0, top_k=0, top_p=1.0, seed=0,
                            stop=["foo bar", "\n\n"])
    tok, _, params, _ = prepare_prompts(ns, ["x"], out / "checkpoints", 10**6, 10**6)
    assert not params.stop(tok.tokenize("x = bar + 1\n"))
    assert params.stop(tok.tokenize("x = foo bar"))
    assert params.stop(tok.tokenize("a\n\nb")) and not params.stop(tok.tokenize("a\nb\n"))
    assert params.stop(tok.tokenize("x") + [tok.eod])  # the end of a document ends a completion
    assert _until_stop("a foo bar and more", ns.stop) == "a foo bar"


def test_runs_refuse_to_overwrite_another_models_files(quickstart_run, tmp_path):
    """Issue 15: pretrain into a save folder of another model rewrote model_args.json before failing;
    a quickstart re-run on other data replaced the checkpoint's tokenizer."""
    out, _ = quickstart_run
    save = shutil.copytree(out / "checkpoints", tmp_path / "ckpts")
    stored = (save / "model_args.json").read_bytes(), (save / "tokenizer.model").read_bytes()
    arguments = (save / "megatron_arguments.txt").read_bytes()
    data = out / "data"
    proc = cli("pretrain", "tiny-cpu-stag", f"data.data_path=[{data / 'stdlib_text_document'}]",
               f"data.tokenizer_model={data / 'stdlib.model'}", f"checkpoint.save={save}",
               "model.hidden_size=64", "training.train_iters=102", check=False)
    text = proc.stdout + proc.stderr
    assert proc.returncode == 1 and "hidden_size 128 -> 64" in text
    assert ((save / "model_args.json").read_bytes(), (save / "tokenizer.model").read_bytes()) == stored
    assert (save / "megatron_arguments.txt").read_bytes() == arguments  # "nothing was written"
    # the rank's message ends the output: torchrun's failure report (~30 lines) is one line
    assert text.rstrip().endswith("rank 0 exited with status 1")
    assert "Traceback" not in text and "ChildFailedError" not in text
    resumed = cli("pretrain", "tiny-cpu-stag", f"data.data_path=[{data / 'stdlib_text_document'}]",
                  f"data.tokenizer_model={data / 'stdlib.model'}", f"checkpoint.save={save}",
                  f"checkpoint.load={save}", "training.train_iters=100", "optimizer.lr_warmup_iters=10",
                  "optimizer.lr=0.5", check=False)  # megatron would assert deep in its checkpoint loading
    assert resumed.returncode != 0 and "another LR schedule (lr " in resumed.stdout + resumed.stderr
    assert "--override-opt_param-scheduler" in resumed.stdout + resumed.stderr
    again = cli("quickstart", "--out", str(out), "--corpus-mb", "2.5", check=False)
    assert again.returncode != 0 and "--corpus-mb" in again.stderr
    assert (out / "checkpoints" / "tokenizer.model").read_bytes() == stored[1]


def test_ctrl_c_stops_a_launched_job_without_tracebacks(tmp_path):
    """Ctrl-C on `pretrain` reaches every process of the job from the terminal. The launching command
    keeps logging until the ranks have stopped (it used to die in its read loop with a traceback and
    lose their last lines), torchrun's report is one line, and the status is the shell's 130."""
    log = tmp_path / "train.log"
    # one write per line: print() under PYTHONUNBUFFERED writes "ready", " ", "0", "\n" apart, and the
    # two ranks' pieces interleaved on the shared pipe ("readyready 0 1\n\n") when the machine was busy
    rank = ("import os, signal; signal.signal(signal.SIGINT, signal.SIG_DFL); "
            "os.write(1, f'ready {os.environ[\"RANK\"]}\\n'.encode()); signal.pause()")
    launch = ("import sys; from pathlib import Path; "
              "from megatron_stag.training.megatron_pretrain import _run_logged; "
              "sys.exit(_run_logged([sys.executable, '-m', 'megatron_stag.platform.torchrun', "
              f"'--nproc-per-node=2', '--no-python', sys.executable, '-c', {rank!r}], Path({str(log)!r})))")
    proc = subprocess.Popen([sys.executable, "-c", launch], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    ready = sorted(proc.stdout.readline() for _ in range(2))
    assert ready == ["ready 0\n", "ready 1\n"], (ready, proc.poll())
    os.killpg(proc.pid, signal.SIGINT)  # as the terminal sends it: to the whole foreground group
    rest, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, (rest, err)
    assert "Traceback" not in rest + err and "SIGINT" in rest.strip().splitlines()[-1]
    assert "SIGINT" in log.read_text() and log.read_text().count("ready") == 2


@pytest.mark.parametrize("option,value,message", [
    ("--iterations", "0", "argument --iterations: 0 is below 1"),  # was a RecipeError traceback
    ("--corpus-mb", "0", "argument --corpus-mb: 0 is not above 0"),
    ("--seed", "-1", "argument --seed: -1 is below 0"),
])
def test_quickstart_refuses_bad_options(option, value, message, tmp_path, capsys):
    from megatron_stag.cli import main

    with pytest.raises(SystemExit) as stop:
        main(["quickstart", "--out", str(tmp_path / "q"), option, value])
    assert stop.value.code == 2 and message in capsys.readouterr().err and not (tmp_path / "q").exists()


def test_quickstart_names_an_out_folder_it_cannot_make(tmp_path):
    from megatron_stag.cli import main

    (tmp_path / "file").write_text("")
    with pytest.raises(SystemExit, match=r"--out .*/file/q: cannot make the folder \(Not a directory\)"):
        main(["quickstart", "--out", str(tmp_path / "file" / "q")])


def test_ctrl_c_in_a_command_is_status_130(monkeypatch):
    from megatron_stag import cli as cli_module

    def interrupted(ns):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli_module, "_plot", interrupted)
    assert cli_module.main(["plot", "train.log"]) == 130


def test_quickstart_output_is_what_a_user_reads(quickstart_run):
    """Megatron's argument dump goes to the run's folder (one line names the file); known, harmless
    library warnings and megatron's INFO set-up chatter stay off the terminal."""
    out, proc = quickstart_run
    text = proc.stdout + proc.stderr
    assert "------------------------ arguments" not in text
    assert f"megatron arguments: {out / 'checkpoints' / 'megatron_arguments.txt'}" in text
    assert "micro_batch_size" in (out / "checkpoints" / "megatron_arguments.txt").read_text()
    for known in ("Transformer Engine and Apex are not installed", "Apex is not installed",
                  "MCore's async save is deprecated", "INFO:megatron", "CPU RNG state changed",
                  "memory (MB) | allocated: 0.00"):
        assert known not in text, known


def test_quiet_keeps_unknown_warnings(monkeypatch):
    import logging
    import warnings

    from megatron_stag.platform import quiet

    for name in ("PYTHONWARNINGS", "MEGATRON_LOGGING_LEVEL"):  # restored after the test
        monkeypatch.delenv(name, raising=False)
    for name in ("", "megatron"):
        monkeypatch.setattr(logging.getLogger(name), "level", logging.getLogger(name).level)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quiet.install()
        warnings.warn("Apex is not installed. Falling back to Torch Norm")
        warnings.warn("something a user should see")
    assert [str(w.message) for w in caught] == ["something a user should see"]
    assert not any("," in start or ":" in start for _, start in quiet.KNOWN_WARNINGS)  # PYTHONWARNINGS syntax


def test_quickstart_logs_to_tensorboard(quickstart_run):
    """logging.tensorboard_dir (the quickstart sets it): Megatron's loss scalars at every iteration and
    our tokens/s at every log interval, readable with TensorBoard's own event reader."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out, _ = quickstart_run
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    tags = events.Tags()["scalars"]
    assert {"lm loss", "lm loss validation", "learning-rate", "tokens-per-second"} <= set(tags), tags
    loss = [e.value for e in events.Scalars("lm loss")]
    assert len(loss) == 100 and loss[-1] < loss[0] - 1.0
    speed = events.Scalars("tokens-per-second")
    assert [e.step for e in speed] == list(range(10, 101, 10)) and all(e.value > 0 for e in speed)


def test_benchmark_entry_point_is_quiet_and_shuts_down():
    """`python -m megatron_stag.benchmarks.X` runs through `hardware.run`: the known library warnings
    are off as in `megatron-stag`'s commands, others stay, and the process group the benchmark started
    is shut down (no NCCL "destroy_process_group() was not called" at exit). In a child process: this
    one's session world must survive."""
    script = (
        "import warnings\n"
        "import torch.distributed as dist\n"
        "from megatron_stag.benchmarks.hardware import run\n"
        "from megatron_stag.platform.distributed import free_port\n"
        "def main():\n"
        "    dist.init_process_group('gloo', init_method=f'tcp://127.0.0.1:{free_port()}', rank=0, world_size=1)\n"
        "    warnings.warn('full scope is deprecated. Use empty cuda_graph_modules', UserWarning)\n"
        "    warnings.warn('a warning the user should see', UserWarning)\n"
        "run(main)\n"
        "print('initialized after:', dist.is_initialized())\n")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONWARNINGS", "RANK", "WORLD_SIZE")}
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env,
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))), timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "initialized after: False" in proc.stdout
    assert "a warning the user should see" in proc.stderr
    assert "full scope is deprecated" not in proc.stderr


def test_outputs_are_complete_or_absent(tmp_path):
    """`generate --output` and `eval --output` write through `write_atomic`: a write that fails part way
    (here: text that cannot be encoded, after a first part could be) leaves the file as it was and no
    temporary file; a finished one has a plain file's permissions."""
    from megatron_stag.platform.files import write_atomic

    out = tmp_path / "out.jsonl"
    out.write_text("old\n")
    with pytest.raises(UnicodeEncodeError):
        write_atomic(out, "x" * 100_000 + "\ud800")
    assert out.read_text() == "old\n" and list(tmp_path.iterdir()) == [out]
    write_atomic(out, "new\n")
    umask = os.umask(0)
    os.umask(umask)
    assert out.read_text() == "new\n" and out.stat().st_mode & 0o777 == 0o666 & ~umask
    assert list(tmp_path.iterdir()) == [out]
