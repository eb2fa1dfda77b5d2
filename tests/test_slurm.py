"""Slurm: job shapes and sbatch commands from recipes (unit), and real jobs on a one-node cluster
started on this machine (pretraining as a 2-task job, staggered generation with one section per task,
preemption -> checkpoint -> requeue -> resume)."""

import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from megatron_stag.config.recipe import load_recipe
from megatron_stag.platform import slurm
from tests.slurm_cluster import LocalCluster, ensure_installed

TINY = ["model.hidden_size=64", "model.seq_length=64", "model.max_position_embeddings=64",
        "training.micro_batch_size=4", "training.global_batch_size=8", "optimizer.lr_warmup_iters=2",
        "logging.log_interval=1", "logging.eval_interval=1000", "data.split=80,20,0",
        "parallelism.pipeline_model_parallel_size=2"]


def cli(*args, env=None, cwd=None, check=True):
    proc = subprocess.run([sys.executable, "-m", "megatron_stag.cli", *args], capture_output=True, text=True,
                          timeout=600, env=env, cwd=cwd)
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr[-3000:]}")
    return proc


# ---------------------------------------------------------------------------------- rendering
@pytest.mark.parametrize("overrides,nodes,gpus,expect", [
    (["parallelism.tensor_model_parallel_size=8", "parallelism.pipeline_model_parallel_size=2"], None, 8, (2, 8)),
    (["parallelism.tensor_model_parallel_size=2"], 4, 8, (4, 8)),
    ([], None, None, (1, 8)),
])
def test_pretrain_shape_from_recipe(overrides, nodes, gpus, expect):
    recipe = load_recipe("350m-stag", overrides + ["training.global_batch_size=512"])
    shape = slurm.pretrain_shape(recipe, nodes, gpus, cpu=False)
    assert (shape.nodes, shape.tasks_per_node) == expect and shape.gpus_per_node == shape.tasks_per_node


@pytest.mark.parametrize("overrides,nodes,gpus,message", [
    (["parallelism.tensor_model_parallel_size=4", "parallelism.pipeline_model_parallel_size=3"], 1, 8,
     "8 ranks is not a multiple of tensor x pipeline x context parallel = 4 x 3 x 1 = 12"),
    (["parallelism.tensor_model_parallel_size=16"], 2, 8,
     "tensor_model_parallel_size=16 exceeds the 8 tasks per node"),
    (["training.global_batch_size=100"], 2, 8,
     "global_batch_size=100 is not a multiple of micro_batch_size x data-parallel size = 4 x 16"),
])
def test_pretrain_shape_errors(overrides, nodes, gpus, message):
    """Slurm's own (a node's tasks) and the ranks' layout, checked as `pretrain` checks it (RecipeError)."""
    with pytest.raises(ValueError, match=re.escape(message)):
        slurm.pretrain_shape(load_recipe("350m-stag", overrides), nodes, gpus, cpu=False)


def test_generate_shape():
    assert slurm.generate_shape(2, 1, None, None, cpu=False).world == 2
    two_nodes = slurm.generate_shape(4, 2, 2, 4, cpu=False)
    assert (two_nodes.nodes, two_nodes.tasks_per_node) == (2, 4)
    with pytest.raises(slurm.SlurmError, match="2 sections need 2 tasks, but 1 node"):
        slurm.generate_shape(2, 1, 1, 4, cpu=False)


def test_sbatch_command_multinode_and_environment(tmp_path):
    opts = slurm.JobOptions(job_name="j", run_dir=tmp_path, partition="gpu", time="04:00:00",
                            container_image="nvcr.io/x:1", container_mounts="/data:/data",
                            extra_sbatch=["--exclusive"])
    cmd = slurm.sbatch_command("pretrain.sbatch", slurm.JobShape(4, 8, 8), opts, ["350m-stag", "lr=1e-4; rm -rf /"])
    assert cmd[0] == "sbatch" and cmd[-2:] == ["350m-stag", "lr=1e-4; rm -rf /"]  # argv, never a shell
    for option in ("--nodes=4", "--ntasks-per-node=8", "--gpus-per-node=8", "--partition=gpu",
                   "--time=04:00:00", "--signal=B:USR1@300", "--requeue", "--open-mode=append",
                   f"--output={tmp_path}/slurm-%j.out", "--exclusive"):
        assert option in cmd
    env = slurm.job_environment(opts)
    assert env["STAG_CONTAINER_IMAGE"] == "nvcr.io/x:1" and env["STAG_CONTAINER_MOUNTS"] == "/data:/data"
    assert "STAG_PYTHON" not in env  # the container's interpreter
    cpu = slurm.sbatch_command("pretrain.sbatch", slurm.JobShape(1, 2, 0), opts, [])
    assert not any(o.startswith("--gpus-per-node") for o in cpu)


def test_submit_dry_run_and_errors(tmp_path, capsys, monkeypatch):
    """In this process (each `megatron-stag submit` subprocess spent ~3 s importing megatron)."""
    from megatron_stag.cli import main

    monkeypatch.setattr("megatron_stag.platform.quiet.install", lambda: None)  # leaves the environment alone

    def submit(*args, env=None):
        for name, value in (env or {}).items():
            monkeypatch.setenv(name, value)
        try:
            code = main(["submit", *args])
        except SystemExit as err:
            code = err.code if isinstance(err.code, int) else (print(err.code, file=sys.stderr) or 1)
        out = capsys.readouterr()
        return code, out.out, out.err

    shared_data = ["data.data_path=[/shared/corpus_text_document]", "data.tokenizer_model=/shared/corpus.model"]
    shared_python = {"STAG_PYTHON": "/shared/venv/bin/python"}  # wherever this checkout is
    code, out, _ = submit("--dry-run", "--nodes", "2", "--run-dir", "/shared/run", "350m-stag", *shared_data,
                          "parallelism.tensor_model_parallel_size=2", "training.global_batch_size=512",
                          "--", "--log-timers-to-tensorboard", env=shared_python)
    assert code == 0
    assert "sbatch --job-name=stag-350m-stag --nodes=2 --ntasks-per-node=8" in out
    assert "STAG_RUN_DIR=/shared/run" in out
    assert out.rstrip().endswith("parallelism.tensor_model_parallel_size=2 "
                                 "training.global_batch_size=512 -- --log-timers-to-tensorboard")
    # job options after the recipe are the same job (they once reached the recipe as malformed overrides)
    assert submit("350m-stag", *shared_data, "--nodes", "2", "parallelism.tensor_model_parallel_size=2",
                  "--run-dir=/shared/run", "training.global_batch_size=512", "--dry-run", "--",
                  "--log-timers-to-tensorboard", env=shared_python) == (0, out, "")
    from megatron_stag.cli import hoist_job_options

    assert hoist_job_options(["submit-generate", "ck", "--prompt", "x", "--cpu", "--time", "1:00:00", "--tp", "2"]) \
        == ["submit-generate", "--cpu", "--time", "1:00:00", "ck", "--prompt", "x", "--tp", "2"]
    assert hoist_job_options(["submit", "r", "a=1", "--", "--nodes", "3"]) == ["submit", "r", "a=1", "--", "--nodes", "3"]
    assert hoist_job_options(["generate", "ck", "--nodes", "3"]) == ["generate", "ck", "--nodes", "3"]
    code, _, err = submit("--dry-run", "--nodes", "2", "--run-dir", "/dev/shm/run", "350m-stag", *shared_data,
                          "training.global_batch_size=512", env=shared_python)
    assert code != 0 and "node-local filesystem (under /dev/shm/" in err and "/dev/shm/run" in err
    code, _, err = submit("--dry-run", "--nodes", "2", "--run-dir", "/shared/run", "350m-stag", *shared_data,
                          "training.global_batch_size=512", env={"STAG_PYTHON": "/tmp/venv/bin/python"})
    assert code != 0 and "/tmp/venv/bin/python is on a node-local" in err  # issue 20: failed on the other node
    code, _, err = submit("--dry-run", "--nodes", "1", "--gpus-per-node", "4", "350m-stag",
                          "parallelism.tensor_model_parallel_size=8")
    assert "exceeds the 4 tasks per node" in err
    code, _, err = submit("--dry-run", "350m-stag", "training.nonsense=1")
    assert code != 0 and "nonsense" in err
    code, _, err = submit("--dry-run", "350m-stag", "data.data_path=[/shared/a_text_document, 0.5]")
    assert code != 0 and "'0.5' stands where a dataset prefix goes" in err  # the job would stop as it started
    code, _, err = submit("--dry-run", "350m-stag", *shared_data, "checkpoint.load=/shared/imported")
    assert code != 0 and "give checkpoint.pretrained_checkpoint=FOLDER" in err  # a requeue would restart from it
    code, _, err = submit("--dry-run", "--nodes", "2", "--run-dir", "/shared/run", "350m-stag", *shared_data,
                          "training.global_batch_size=512", "checkpoint.pretrained_checkpoint=/tmp/imported",
                          env=shared_python)
    assert code != 0 and "/tmp/imported" in err and "node-local" in err
    for flag, value, message in (("--nodes", "0", "0 is below 1"), ("--gpus-per-node", "0", "0 is below 1"),
                                 ("--nodes", "-2", "-2 is below 1"), ("--signal-seconds", "-5", "-5 is below 1"),
                                 ("--run-dir", "/shared/run%j", "contains '%'"),  # issue 15: were defaults or passed on
                                 ("--time", "00:05:00", "is not 60 s below --time 00:05:00 (300 s)")):  # a requeue loop
        code, _, err = submit("--dry-run", flag, value, "350m-stag", *shared_data)
        assert code != 0 and message in err and flag in err, err
    code, _, err = submit("--run-dir", str(tmp_path / "r"), "350m-stag", "training.global_batch_size=512",
                          env={"PATH": "/nonexistent"})
    assert code != 0 and "sbatch was not found on PATH" in err


def test_submit_generate_refuses_what_the_job_would(quickstart_run, tmp_path, capsys, monkeypatch):
    """Every check `generate` runs in the job's ranks runs before submitting (the job used to fail
    after its wait in the queue: no prompt, --max-new-tokens 0, a --tp that does not divide the heads,
    --tp without DeepSpeed, --recurrent on separate weights; --tp 0 was a ZeroDivisionError);
    --recurrent on shared weights asks for one group of --tp tasks (both passes on each rank)."""
    from megatron_stag.cli import main
    from megatron_stag.serving.convert import describe
    from megatron_stag.serving.model import PlainConfig

    monkeypatch.setattr("megatron_stag.platform.quiet.install", lambda: None)
    ckpt = quickstart_run[0] / "checkpoints"
    job = ["submit-generate", "--dry-run", "--cpu", "--run-dir", str(tmp_path / "run")]
    for args, message in ((["--prompt", "x", "--tp", "0"], "argument --tp: 0 is below 1"),
                          ([], "give at least one --prompt or a --prompt-file"),
                          (["--prompt", "x", "--max-new-tokens", "0"], "--max-new-tokens: max_new_tokens=0"),
                          (["--prompt", "x", "--engine", "deepspeed", "--tp", "3"], "--tp 3 does not divide"),
                          (["--prompt", "x", "--tp", "2"], "--tp 2: tensor parallelism is DeepSpeed's AutoTP here"),
                          (["--prompt", "x", "--recurrent"], "recurrent=True needs shared weights"),
                          (["--prompt", "x" * 2000], "exceeds the context of")):
        with pytest.raises(SystemExit) as stop:
            main([*job, str(ckpt), *args])
        assert message in str(stop.value.code) + capsys.readouterr().err, args
    assert main([*job, str(ckpt), "--prompt", "x"]) == 0 and "--ntasks-per-node=2 " in capsys.readouterr().out
    args = describe(ckpt)[0]  # a package's description alone: no weights are read before submitting
    shared = tmp_path / "shared"
    shared.mkdir()
    PlainConfig(vocab_size=args.vocab_size, max_sequence_length=args.max_sequence_length, hidden_size=64,
                ffn_hidden_size=256, num_attention_heads=4, num_query_groups=4, head_dim=16, section_layers=[2, 2],
                shared_weights=True).save(shared / "config.json")
    shutil.copyfile(ckpt / "tokenizer.model", shared / "tokenizer.model")
    assert main([*job, str(shared), "--prompt", "x", "--recurrent"]) == 0
    assert "--ntasks-per-node=1 " in capsys.readouterr().out
    assert not (tmp_path / "run").exists()


def test_time_limits_and_the_warning():
    """sbatch's --time forms in seconds; a warning (checkpoint, requeue) that would come as the job starts,
    and again in every requeued run, is refused before submitting."""
    from megatron_stag.platform.slurm import JobOptions, SlurmError, check_warning_time, time_limit_seconds

    forms = {"30": 1800, "30:15": 1815, "04:00:00": 14400, "2-12": 216000, "1-00:30": 88200,
             "1-02:03:04": 93784, "0": None, "UNLIMITED": None, "infinite": None}
    assert {text: time_limit_seconds(text) for text in forms} == forms
    for bad in ("4h", "1:2:3:4", "-5", "", "1-"):
        with pytest.raises(SlurmError, match="is not a Slurm time limit"):
            time_limit_seconds(bad)
    job = JobOptions(job_name="j", run_dir=Path("/shared/r"), time="10", signal_seconds=300)
    check_warning_time(job)  # the warning 5 minutes in
    check_warning_time(JobOptions(job_name="j", run_dir=Path("/r"), time="6", signal_seconds=300))  # 1 min in
    for limit, seconds in (("5", 300), ("00:05:59", 300), ("30", 1800)):
        with pytest.raises(SlurmError, match="give a longer --time or a smaller --signal-seconds"):
            check_warning_time(JobOptions(job_name="j", run_dir=Path("/r"), time=limit, signal_seconds=seconds))
    check_warning_time(JobOptions(job_name="j", run_dir=Path("/r"), time="UNLIMITED"))
    check_warning_time(JobOptions(job_name="j", run_dir=Path("/r")))  # the partition's limit: unknown here


def test_the_batch_script_and_submit_agree_on_finished_jobs():
    """`submit` and `pretrain.sbatch` each decide whether a run directory's holder has finished; the
    states they count as finished must be the same list."""
    script = (slurm.SLURM_DIR / "pretrain.sbatch").read_text()
    states = re.search(r"=~ \^\(([A-Z_|]+)\)\$", script).group(1).split("|")
    assert sorted(states) == sorted(slurm.FINISHED_STATES)


def test_rank_variables_from_slurm():
    env = {"SLURM_PROCID": "5", "SLURM_LOCALID": "1", "SLURM_STEP_NUM_TASKS": "8",
           "MASTER_ADDR": "node1", "MASTER_PORT": "23456"}
    assert slurm.adopt_slurm_rank_env(env)
    assert (env["RANK"], env["LOCAL_RANK"], env["WORLD_SIZE"]) == ("5", "1", "8")
    torchrun = {"RANK": "0", "SLURM_PROCID": "3", "SLURM_STEP_NUM_TASKS": "4", "MASTER_ADDR": "a", "MASTER_PORT": "1"}
    assert not slurm.adopt_slurm_rank_env(torchrun) and torchrun["RANK"] == "0"
    assert not slurm.adopt_slurm_rank_env({"SLURM_PROCID": "0", "SLURM_STEP_NUM_TASKS": "1"})  # salloc shell


# ---------------------------------------------------------------------------------- real cluster
@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    reason = ensure_installed()
    if reason:
        pytest.skip(reason)
    c = LocalCluster(tmp_path_factory.mktemp("slurm"))
    c.start()
    yield c
    c.stop()


@pytest.fixture(scope="module")
def data(corpus):
    """The shared corpus as recipe overrides."""
    prefix, model = corpus
    return [f"data.data_path=[{prefix}]", f"data.tokenizer_model={model}"]


def _node_state(cluster) -> str:
    return subprocess.run(["sinfo", "-h", "-o", "%T"], env=cluster.env, capture_output=True,
                          text=True).stdout.strip()


def submitted(proc) -> str:
    return re.search(r"submitted job (\d+)", proc.stdout).group(1)


def log_of(run: Path, job: str) -> str:
    path = run / f"slurm-{job}.out"
    return path.read_text() if path.exists() else ""


@pytest.fixture(scope="module")
def trained(cluster, data, tmp_path_factory):
    run = tmp_path_factory.mktemp("pretrain")
    (run / ".job").write_text("999999\n")  # the claim of a job that has left the queue (killed, say)
    proc = cli("submit", "--cpu", "--gpus-per-node", "2", "--run-dir", str(run), "tiny-cpu-stag", *data, *TINY,
               "training.train_iters=12", "checkpoint.save_interval=12", env=cluster.env)
    job = submitted(proc)
    state = cluster.wait(job)
    return run, job, state


def test_pretrain_job_on_two_tasks(cluster, trained):
    run, job, state = trained
    log = log_of(run, job)
    assert state == "COMPLETED", log[-4000:]
    assert "1 node(s) x 2 tasks" in log
    assert re.search(r"iteration\s+12/\s+12 \|", log)  # Megatron's own iteration line
    assert "tokens/s" in log
    assert (run / "checkpoints" / "latest_checkpointed_iteration.txt").read_text().strip() == "12"
    assert (run / "checkpoints" / "model_args.json").is_file()
    assert not (run / ".job").exists()  # it took over the stale claim and released it at the end


def test_a_second_job_in_a_busy_run_dir_refuses(cluster, data, tmp_path):
    """The same pretraining submitted twice into one run directory: `submit` refuses while the first
    job holds it, and a second job that starts anyway (here: held at submission, released once the
    first holds the folder) stops before training with a line naming the first. It would have resumed
    from the first's checkpoints and interleaved its own with them."""
    holder = subprocess.run(["sbatch", "--parsable", "--ntasks=1", f"--output={tmp_path / 'holder.out'}",
                             "--wrap", "sleep 600"], env=cluster.env, capture_output=True, text=True,
                            check=True).stdout.strip().split(";")[0]
    args = ["--cpu", "--gpus-per-node", "1", "--run-dir", str(tmp_path), "tiny-cpu-stag", *data, *TINY,
            "parallelism.pipeline_model_parallel_size=1", "training.train_iters=4"]
    try:
        (tmp_path / ".job").write_text(holder + "\n")
        refused = cli("submit", *args, env=cluster.env, check=False)
        assert refused.returncode != 0 and f"job {holder} (" in refused.stderr, refused.stderr
        assert f"--dependency=afterany:{holder}" in refused.stderr and "nothing was submitted" in refused.stderr
        (tmp_path / ".job").unlink()
        job = submitted(cli("submit", "--sbatch=--hold", *args, env=cluster.env))
        (tmp_path / ".job").write_text(holder + "\n")
        subprocess.run(["scontrol", "release", job], env=cluster.env, check=True)
        assert cluster.wait(job) == "FAILED", log_of(tmp_path, job)[-3000:]
        log = log_of(tmp_path, job)
        assert f"error: job {holder} is training in {tmp_path}" in log
        assert "iteration" not in log and not (tmp_path / "checkpoints").exists()
        assert (tmp_path / ".job").read_text().strip() == holder
    finally:
        subprocess.run(["scancel", holder], env=cluster.env)


def test_generation_job_one_section_per_task(cluster, trained, tmp_path):
    """One section per task; the time-limit warning (USR1 to the batch shell, as --signal=B:USR1@N
    sends) is logged and generation goes on to write its whole output (it used to kill the job)."""
    run, _, _ = trained
    ckpt = run / "checkpoints"
    args = ["--prompt", "def f(x):", "--prompt", "import os", "--max-new-tokens", "8"]
    proc = cli("submit-generate", "--cpu", "--run-dir", str(tmp_path), str(ckpt), *args,
               "--output", str(tmp_path / "slurm.jsonl"), env=cluster.env)
    job = submitted(proc)
    deadline = time.time() + 300
    while "2 tasks on 1 node(s)" not in log_of(tmp_path, job):  # printed once the traps are set
        assert time.time() < deadline and cluster.job_state(job) in ("PENDING", "RUNNING"), log_of(tmp_path, job)
        time.sleep(0.2)
    warned = subprocess.run(["scancel", "--batch", "--signal=USR1", job], env=cluster.env).returncode == 0
    assert cluster.wait(job) == "COMPLETED", log_of(tmp_path, job)[-4000:]
    if warned:  # the signal reached a running script (else the job had already finished)
        assert "time-limit warning: generation continues" in log_of(tmp_path, job)
    cli("generate", str(ckpt), *args, "--output", str(tmp_path / "local.jsonl"))
    assert (tmp_path / "slurm.jsonl").read_text() == (tmp_path / "local.jsonl").read_text()
    again = cli("submit-generate", "--cpu", "--run-dir", str(tmp_path), str(ckpt), *args,
                "--output", str(tmp_path / "slurm.jsonl"), env=cluster.env, check=False)
    assert again.returncode != 0 and "slurm.jsonl exists: write to a new file, or add --overwrite" in again.stderr
    assert "nothing was submitted" in again.stderr


def test_deepspeed_generation_job(cluster, trained, tmp_path):
    """The generation job with --engine deepspeed on an exported package: one section per task over
    deepspeed.comm, same output as the local megatron engine."""
    pytest.importorskip("deepspeed")
    run, _, _ = trained
    package = tmp_path / "pkg"
    cli("export", str(run / "checkpoints"), str(package))
    args = ["--prompt", "def f(x):", "--max-new-tokens", "8"]
    proc = cli("submit-generate", "--cpu", "--run-dir", str(tmp_path), str(package), "--engine", "deepspeed",
               *args, "--output", str(tmp_path / "slurm.jsonl"), env=cluster.env)
    job = submitted(proc)
    assert cluster.wait(job) == "COMPLETED", log_of(tmp_path, job)[-4000:]
    cli("generate", str(run / "checkpoints"), *args, "--output", str(tmp_path / "local.jsonl"))
    assert (tmp_path / "slurm.jsonl").read_text() == (tmp_path / "local.jsonl").read_text()


def test_preemption_checkpoints_requeues_and_resumes(cluster, data, tmp_path):
    """USR1 to the batch script (what --signal=B:USR1@N sends before the time limit): Megatron saves a
    checkpoint at the end of the current iteration, the job requeues itself, and the requeued job
    (same id, same log) resumes from that iteration and finishes."""
    proc = cli("submit", "--cpu", "--gpus-per-node", "2", "--run-dir", str(tmp_path), "tiny-cpu-stag", *data,
               *TINY, "training.train_iters=40", "checkpoint.save_interval=1000", env=cluster.env)
    job = submitted(proc)
    deadline = time.time() + 300
    while not re.search(r"iteration\s+5/\s+40 \|", log_of(tmp_path, job)):
        assert time.time() < deadline, log_of(tmp_path, job)[-3000:]
        assert cluster.job_state(job) in ("PENDING", "RUNNING"), log_of(tmp_path, job)[-3000:]
        time.sleep(0.5)
    subprocess.run(["scancel", "--batch", "--signal=USR1", job], env=cluster.env, check=True)
    while "requeueing job" not in log_of(tmp_path, job) or cluster.job_state(job) != "PENDING":
        assert time.time() < deadline, log_of(tmp_path, job)[-3000:]
        time.sleep(0.5)
    # Slurm holds a requeued job for a while (BeginTime); the administrator may release it early, once the
    # node has finished the old run (a restart in the same second as the kill gets a revoked credential)
    while _node_state(cluster) != "idle":
        assert time.time() < deadline
        time.sleep(0.5)
    time.sleep(3)
    subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], env=cluster.env, check=True)
    state = cluster.wait(job, timeout=400)
    log = log_of(tmp_path, job)
    assert state == "COMPLETED", log[-4000:]
    saved = int(re.search(r"saving checkpoint at iteration\s+(\d+)", log).group(1))
    assert 5 <= saved < 40
    assert "exiting program after receiving SIGTERM" in log
    assert "restart 1" in log
    after = log[log.index("restart 1"):]
    assert re.search(rf"loaded checkpoint.* at iteration {saved}\b", after), after[:3000]
    first = int(re.search(r"iteration\s+(\d+)/\s+40 \|", after).group(1))
    assert first == saved + 1
    assert (tmp_path / "checkpoints" / "latest_checkpointed_iteration.txt").read_text().strip() == "40"
