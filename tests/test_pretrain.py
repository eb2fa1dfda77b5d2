"""`megatron-stag pretrain`: recipes (loading, inheritance, overrides, validation), Megatron's
training loop on 2 CPU ranks for every model family, kill-and-resume exactness, interrupted
checkpoints, and `megatron-stag plot`."""

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from megatron_stag.config.recipe import RecipeError, load_recipe, recipe_argv

REPO = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------- recipes
def test_every_packaged_recipe_is_valid():
    """Every recipe parses with Megatron's parser and builds a valid model config."""
    from megatron_stag.config.recipe import megatron_parser
    from megatron_stag.training.megatron_pretrain import check_model, check_schedule

    parser = megatron_parser()
    grid = [f"{size}-{variant}" for size in ("tiny-cpu", "125m", "350m", "1.3b")
            for variant in ("gpt", "stag", "stag-shared", "stag-window128", "altup", "stag-altup")]
    names = sorted(p.stem for p in (REPO / "recipes").glob("*-*.yaml"))
    assert set(grid) <= set(names) and "study-50m" in names
    for name in names:
        recipe = load_recipe(name)
        assert "--num-layers" in recipe_argv(recipe, parser)
        check_schedule(recipe)
        check_model(recipe)


def test_inheritance_and_overrides():
    recipe = load_recipe("tiny-cpu-stag-altup", ["training.train_iters=7", "lr=0.01", "stag_cross_window=2",
                                                 "model.altup_output=mean"])
    assert recipe.get("stag_sections") == 2 and recipe.get("altup_blocks") == 2  # own keys
    assert recipe.get("hidden_size") == 128  # inherited from tiny-cpu-gpt
    assert recipe.get("train_iters") == 7 and recipe.get("lr") == 0.01
    assert recipe.sections["model"]["stag_cross_window"] == 2  # a new key lands in its section
    argv = recipe_argv(recipe)
    assert argv[argv.index("--train-iters") + 1] == "7"
    assert argv[argv.index("--altup-output") + 1] == "mean"
    assert "--stag-cross-window" in argv
    big = load_recipe("1.3b-stag")
    assert big.get("pipeline_model_parallel_size") == 2 and big.get("stag_sections") == 2
    assert big.get("lr") == 3.0e-4  # from common.yaml, two levels up


def test_load_follows_an_overridden_save(tmp_path):
    """The recipes resume from the folder they save to; a run given only a new save folder used to load
    the recipe's default folder (another run's checkpoints) and continue from there."""
    recipe = load_recipe("tiny-cpu-stag")
    assert recipe.get("load") == recipe.get("save") == "runs/tiny-cpu-stag/checkpoints"
    assert load_recipe("tiny-cpu-stag", ["checkpoint.save=/runs/exp 2"]).get("load") == "/runs/exp 2"
    assert load_recipe("tiny-cpu-stag", ["save=/runs/b"]).get("load") == "/runs/b"
    finetune = load_recipe("tiny-cpu-stag", ["checkpoint.save=/runs/ft", "checkpoint.load=/ckpt"])
    assert (finetune.get("save"), finetune.get("load")) == ("/runs/ft", "/ckpt")
    (tmp_path / "apart.yaml").write_text("base: tiny-cpu-stag\ncheckpoint: {load: /pretrained}\n")
    assert load_recipe(tmp_path / "apart.yaml", ["checkpoint.save=/runs/c"]).get("load") == "/pretrained"


def test_switches_and_lists():
    argv = recipe_argv(load_recipe("125m-gpt"))
    assert "--swiglu" in argv and "--disable-bias-linear" in argv  # add_bias_linear: false
    i = argv.index("--data-path")
    assert argv[i + 1] == "data/corpus_text_document"
    off = recipe_argv(load_recipe("125m-gpt", ["swiglu=false"]))
    assert "--swiglu" not in off


@pytest.mark.parametrize("overrides,message", [
    (["model.num_layerz=4"], "unknown key 'num_layerz'.*did you mean num_layers"),
    (["modle.num_layers=4"], "unknown section 'modle'"),
    (["train_iters=many"], "train_iters='many' is not accepted"),
    (["swiglu=3"], "swiglu is a switch"),
    (["num_layers"], "write key=value"),
    (["altup_output=median"], "altup_output='median' is not accepted"),
    # megatron: "num_layers is missing" (0 read as unset), a negative tensor dimension, a bare assert,
    # a division by zero in a rank
    (["model.num_layers=0"], r"\[model\]: num_layers=0 is out of range: use a value of at least 1\.$"),
    (["model.ffn_hidden_size=-5"], "ffn_hidden_size=-5 is out of range"),
    (["training.micro_batch_size=0"], r"\[training\]: micro_batch_size=0 is out of range"),
    (["logging.log_interval=0"], "log_interval=0 is out of range"),
    (["optimizer.lr=-0.1"], r"lr=-0.1 is out of range: use a value of at least 0\.$"),
    (["hidden_dropout=1.5"], r"hidden_dropout=1.5 is out of range: use a value from 0 to 1\.$"),
])
def test_override_errors_name_the_key(overrides, message):
    with pytest.raises(RecipeError, match=message):
        recipe_argv(load_recipe("tiny-cpu-stag", overrides))


def test_bounds_name_megatron_arguments_and_allow_their_edges():
    """A misspelt key in BOUNDS would check nothing; the lowest and highest values are allowed."""
    from megatron_stag.config.recipe import BOUNDS, _actions, megatron_parser

    parser = megatron_parser()
    assert set(BOUNDS) <= set(_actions(parser))
    edges = ["model.num_layers=1", "optimizer.lr=0", "model.hidden_dropout=0", "model.attention_dropout=1",
             "logging.eval_iters=0", "model.ffn_hidden_size=null"]
    argv = recipe_argv(load_recipe("tiny-cpu-stag", edges), parser)
    assert argv[argv.index("--num-layers") + 1] == "1" and "--ffn-hidden-size" not in argv


def test_recipe_file_errors(tmp_path):
    (tmp_path / "a.yaml").write_text("base: b.yaml\nmodel: {num_layers: 2}\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\n")
    with pytest.raises(RecipeError, match="inheritance cycle"):
        load_recipe(tmp_path / "a.yaml")
    (tmp_path / "c.yaml").write_text("training: [1, 2]\n")
    with pytest.raises(RecipeError, match="section 'training' must be a mapping"):
        load_recipe(tmp_path / "c.yaml")
    with pytest.raises(RecipeError, match="not found.*packaged recipes: .*tiny-cpu-stag"):
        load_recipe("no-such-recipe")


def test_path_overrides_are_literal():
    """Issue 15: pretrain.sbatch passes checkpoint.save=$RUN/checkpoints; as YAML, ' #3' was a comment."""
    from megatron_stag.config.recipe import parse_override

    assert parse_override("checkpoint.save=/shared/runs/exp #3/ck: pt") == ("checkpoint.save", "/shared/runs/exp #3/ck: pt")
    assert parse_override("data.tokenizer_model=/a b/t #1.model")[1] == "/a b/t #1.model"
    assert parse_override("training.train_iters=100")[1] == 100  # other values are still YAML


def test_options_the_decoder_lacks_are_refused():
    """A megatron option that changes the model but that neither model_args.json nor the serving model
    carries (given in the recipe or after --) stops the run, naming it; every name is megatron's."""
    import argparse

    from megatron_stag.training.megatron_pretrain import UNRECORDED, check_decodable

    defaults = argparse.Namespace(**{name: False for name in UNRECORDED}, rotary_scaling_factor=1.0,
                                  add_bias_linear=False)
    check_decodable(defaults)
    check_decodable(argparse.Namespace(**{**vars(defaults), "add_bias_linear": True, "add_qkv_bias": True}))
    for name in UNRECORDED:
        with pytest.raises(SystemExit, match=f"--{name.replace('_', '-')}: megatron-stag's decoder"):
            check_decodable(argparse.Namespace(**{**vars(defaults), name: True}))
    with pytest.raises(SystemExit, match="--rotary-scaling-factor 8.0"):
        check_decodable(argparse.Namespace(**{**vars(defaults), "rotary_scaling_factor": 8.0}))
    from megatron_stag.config.recipe import megatron_parser

    flags = {flag for action in megatron_parser()._actions for flag in action.option_strings}
    assert {f"--{name.replace('_', '-')}" for name in UNRECORDED} <= flags
    # Llama 3's rope scaling is recorded (model_args.json takes megatron's argument names) and decoded
    check_decodable(argparse.Namespace(**{**vars(defaults), "use_rope_scaling": True}))
    from megatron_stag.models.model_args import ModelArgs

    dests = {action.dest for action in megatron_parser()._actions}
    assert {"use_rope_scaling", "rope_scaling_factor", "kv_channels"} <= dests & set(ModelArgs.__dataclass_fields__)


@pytest.mark.parametrize("overrides,message", [
    (["stag_sections=3"], "num_layers=4 is not divisible by stag_sections=3"),
    (["altup_blocks=0"], "altup_blocks=0"),
    (["tensor_model_parallel_size=3"], "num_attention_heads=4 is not divisible by tensor_model_parallel_size=3"),
    (["lr_warmup_iters=400"], "lr_warmup_iters=400 must be below"),
    (["global_batch_size=12"], "global_batch_size=12 is not a multiple"),
    # megatron: bare asserts in every rank
    (["nproc_per_node=2", "global_batch_size=6", "micro_batch_size=2"],
     r"global_batch_size=6 is not a multiple of micro_batch_size x data-parallel size = 2 x 2: .* multiple of 4\."),
    (["nproc_per_node=3", "tensor_model_parallel_size=2"],
     r"parallelism.nproc_per_node = 3 ranks is not a multiple of tensor x pipeline x context parallel = 2 x 1 x 1"),
    (["min_lr=0.1", "lr=0.01"], r"optimizer.min_lr=0.1 is above optimizer.lr=0.01"),
    (["max_position_embeddings=64", "seq_length=128"], r"model.max_position_embeddings=64 is below model.seq_length=128"),
    (["save_interval=null"], r"checkpoint.save_interval is not set: a run that saves \(checkpoint.save=runs/"),
    # megatron: a shape error in the first step
    (["group_query_attention=true", "num_query_groups=3"], "num_attention_heads=4 is not divisible by model.num_query_groups=3"),
    (["nproc_per_node=0"], "nproc_per_node=0"),
    (["hidden_size=130"], "hidden_size=130 is not divisible by model.num_attention_heads=4"),
    (["tokenizer_model=", "data_path=[/nonexistent/corpus_text_document]"], "data.data_path: dataset file /nonexistent"),
    (["tokenizer_model=/nonexistent/t.model"], "tokenizer_model=/nonexistent/t.model does not exist"),
    # megatron: the weight read as a dataset prefix ("0.5.bin"), a bare assert in every rank
    (["tokenizer_model=", "data_path=[/d/a_text_document, 0.5]"], r"'0.5' stands where a dataset prefix goes"),
    (["tokenizer_model=", "data_path=[/d/a, /d/b, 0.5, /d/c]"], "mixes weights and prefixes out of order"),
    (["tokenizer_model=", "data_path=[0, /d/a, 1, /d/b]"], r"data.data_path=\['0', '/d/a', '1', '/d/b'\]: weight 0 is not above 0"),
])
def test_launch_refuses_bad_settings_before_starting(overrides, message):
    from megatron_stag.training.megatron_pretrain import launch

    with pytest.raises(RecipeError, match=message):
        launch("tiny-cpu-stag", overrides, [])


def test_launch_checks_see_raw_megatron_flags(monkeypatch):
    """Flags after `--` win over the recipe in the run, so the checks judge their values: a raw
    --global-batch-size that is no multiple of the micro batch is refused, and a raw --save-interval
    answers a recipe without one (the launch then stops at the next check, the data)."""
    from megatron_stag.training import megatron_pretrain

    def launched(*args):
        raise AssertionError("the checks passed: a run started")

    monkeypatch.setattr(megatron_pretrain, "run", launched)
    monkeypatch.setattr(megatron_pretrain, "_run_logged", launched)
    # no data or tokenizer (the recipe's are a quickstart's, absent on a clean clone): the last check fails
    launch, missing = megatron_pretrain.launch, ["tokenizer_model=", "data_path=[/nonexistent/corpus_text_document]"]
    with pytest.raises(RecipeError, match="global_batch_size=7 is not a multiple of training.micro_batch_size=2"):
        launch("tiny-cpu-stag", ["micro_batch_size=2", *missing], ["--global-batch-size", "7"])
    with pytest.raises(RecipeError, match="data.data_path: dataset file /nonexistent"):
        launch("tiny-cpu-stag", ["save_interval=null", *missing], ["--save-interval", "5"])
    with pytest.raises(RecipeError, match="-- --num-layers four: "):
        launch("tiny-cpu-stag", missing, ["--num-layers", "four"])


def test_bad_recipe_from_the_command_line_is_one_clear_line():
    proc = subprocess.run([sys.executable, "-m", "megatron_stag.cli", "pretrain", "tiny-cpu-stag",
                           "stag_sections=3"], capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "recipe error: model settings: num_layers=4 is not divisible" in proc.stderr
    assert "Traceback" not in proc.stderr


# ---------------------------------------------------------------------------- training runs
def pretrain(recipe, corpus, save, *overrides, popen=False):
    prefix, model = corpus
    args = [sys.executable, "-m", "megatron_stag.cli", "pretrain", recipe,
            f"data.data_path=[{prefix}]", f"data.tokenizer_model={model}",
            f"checkpoint.save={save}", f"checkpoint.load={save}", "model.hidden_size=64",
            "model.seq_length=64", "model.max_position_embeddings=64", "training.micro_batch_size=4",
            "training.global_batch_size=8", "optimizer.lr_warmup_iters=2", "logging.log_interval=1",
            "logging.eval_interval=1000", "data.split=80,20,0", *overrides]
    if popen:
        return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True)
    proc = subprocess.run(args, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return proc


def losses(save):
    from megatron_stag.training.run_logs import read_log

    return read_log(Path(save) / "train.log").train


FAMILIES = {
    "gpt-tp2": ("tiny-cpu-gpt", ["tensor_model_parallel_size=2"]),
    "stag-pp2": ("tiny-cpu-stag", ["pipeline_model_parallel_size=2"]),
    "altup-dp2": ("tiny-cpu-altup", ["nproc_per_node=2"]),
    "stag-altup-pp2": ("tiny-cpu-stag-altup", ["pipeline_model_parallel_size=2"]),
}


@pytest.mark.parametrize("family", [pytest.param(f, marks=pytest.mark.slow) if f in ("stag-pp2", "altup-dp2")
                                    else f for f in FAMILIES])  # stag-altup-pp2 covers PP; the Slurm job DP
def test_short_pretrain_on_two_ranks(family, corpus, tmp_path):
    """Megatron's loop on 2 gloo ranks: the loss falls, a checkpoint and the run files appear."""
    recipe, layout = FAMILIES[family]
    save = tmp_path / "ckpt"
    proc = pretrain(recipe, corpus, save, "training.train_iters=24", "checkpoint.save_interval=24", *layout)
    loss = losses(save)
    assert max(loss) == 24
    assert sum(loss[i] for i in (22, 23, 24)) < sum(loss[i] for i in (1, 2, 3)) - 1.0, loss
    assert (save / "latest_checkpointed_iteration.txt").read_text().strip() == "24"
    assert (save / "model_args.json").is_file() and (save / "tokenizer.model").is_file()
    assert "tokens/s" in proc.stdout and "ETA" in proc.stdout


def test_kill_and_resume_is_exact(corpus, tmp_path):
    """A run killed after a checkpoint resumes from it on the same data and logs exactly the
    uninterrupted run's losses; an interrupted later save is never loaded.

    The killed run would train for 1000 iterations, so however late the kill lands (a busy machine can
    starve this test between seeing the checkpoint and killing the job) it lands during training; the
    iteration it resumes from is read from the tracker once the job is dead, and both runs then stop
    (exit_interval) six iterations later with the same LR schedule."""
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    common = ["training.train_iters=1000", "pipeline_model_parallel_size=2"]
    job = pretrain("tiny-cpu-stag", corpus, resumed, *common, "checkpoint.save_interval=8", popen=True)
    tracker = resumed / "latest_checkpointed_iteration.txt"
    deadline = time.time() + 300
    while not (tracker.is_file() and int(tracker.read_text().strip() or 0) >= 8):
        assert job.poll() is None and time.time() < deadline, job.stdout.read()[-3000:]
        time.sleep(0.2)
    os.killpg(job.pid, signal.SIGKILL)  # the whole job: launcher and both ranks
    job.wait()
    start = int(tracker.read_text())  # the job is dead: its last complete checkpoint
    # a later save that died half-way: an iteration folder without metadata, tracker not updated
    partial = resumed / f"iter_{start + 4:07d}"
    partial.mkdir(exist_ok=True)
    (partial / "__0_0.distcp").write_bytes(b"truncated")

    stop = f"training.exit_interval={start + 6}"
    pretrain("tiny-cpu-stag", corpus, straight, *common, "checkpoint.save_interval=1000", stop)
    proc = pretrain("tiny-cpu-stag", corpus, resumed, *common, "checkpoint.save_interval=1000", stop)
    assert re.search(rf"successfully loaded checkpoint from .* at iteration {start}\b", proc.stdout)
    from megatron_stag.training.run_logs import read_log

    a, b = read_log(straight), read_log(resumed)
    after = [i for i in a.train if i > start]
    assert after == list(range(start + 1, start + 7))
    # the training state is bit-identical: every grad norm after the resume equals the straight run's
    assert [b.grad_norm[i] for i in after] == [a.grad_norm[i] for i in after]
    # and so are the losses, except the second: Megatron does not reset its loss accumulator on a
    # run's first logged iteration, so that line shows the mean of the first two
    second = start + 2
    assert [b.train[i] for i in after if i != second] == [a.train[i] for i in after if i != second]
    assert b.train[second] == pytest.approx((a.train[second - 1] + a.train[second]) / 2, abs=2e-6)


def test_a_synchronous_save_starts_no_helper_process(megatron_world, tmp_path, monkeypatch):
    """megatron hands a save's write results over through a spawned `multiprocessing.Manager` (a fresh
    interpreter importing torch, seconds per job); after `write_results_in_process` a synchronous save
    starts no process, and what it wrote loads back equal."""
    import multiprocessing

    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    from megatron_stag.checkpointing.checkpoint_io import write_results_in_process
    from tests.model_factory import tiny_model

    monkeypatch.setattr(filesystem_async, "_results_queue", None)  # as at a process's first save
    write_results_in_process()
    model, back = tiny_model(seed=0), tiny_model(seed=1)
    before = set(multiprocessing.active_children())
    dist_checkpointing.save(model.sharded_state_dict(), str(tmp_path))
    assert set(multiprocessing.active_children()) == before
    back.load_state_dict(dist_checkpointing.load(back.sharded_state_dict(), str(tmp_path)))
    for key, value in model.state_dict().items():
        if torch.is_tensor(value):
            assert torch.equal(back.state_dict()[key], value), key


def test_plot_several_runs(tmp_path):
    log = ("iteration        1/       3 | lm loss: 5.0E+00 |\n iteration        2/       3 | lm loss: "
           "4.0E+00 |\n validation loss at iteration 2 | lm loss value: 4.5E+00 |\n")
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "train.log").write_text(log)
    out = tmp_path / "loss.png"
    proc = subprocess.run([sys.executable, "-m", "megatron_stag.cli", "plot", str(tmp_path / "a"),
                           str(tmp_path / "b" / "train.log"), "--label", "A", "--label", "B",
                           "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    first = out.read_bytes()
    again = subprocess.run([sys.executable, "-m", "megatron_stag.cli", "plot", str(tmp_path / "a"), "--out", str(out)],
                           capture_output=True, text=True, timeout=300)  # an existing plot is replaced only if asked
    assert again.returncode != 0 and "--out" in again.stderr and "--overwrite" in again.stderr
    assert out.read_bytes() == first
    assert [p.name for p in tmp_path.iterdir() if p.is_file()] == ["loss.png"]  # no temporary file left
    bad = subprocess.run([sys.executable, "-m", "megatron_stag.cli", "plot", str(tmp_path / "c")],
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode != 0 and "has no log" in bad.stderr


def test_plot_reads_a_slurm_run_directory(tmp_path):
    """Issue 20: a `submit` run directory has slurm-<job>.out (appended across requeues), no train.log."""
    from megatron_stag.training.run_logs import read_log

    run = tmp_path / "run"
    run.mkdir()
    (run / "slurm-17.out").write_text(" iteration        1/       4 | lm loss: 5.0E+00 |\n")
    (run / "slurm-23.out").write_text(" iteration        3/       4 | lm loss: 3.0E+00 |\n")
    os.utime(run / "slurm-17.out", (1, 1))  # the older job's log
    log = read_log(run)
    assert log.name == "run" and log.train == {1: 5.0, 3: 3.0}
