"""Slurm jobs: resources derived from a recipe or a checkpoint, `sbatch` argv, and rank variables.

`megatron-stag submit` / `submit-generate` compute the job's shape here and call `sbatch` with an
argv list (no shell ever sees a recipe or command-line value); the batch scripts in `slurm/` start
one task per GPU (or per CPU rank) with `srun`, and every task maps Slurm's variables onto the
torch.distributed ones (`adopt_slurm_rank_env`). Checks run before anything is submitted: parallel
sizes against the requested nodes and GPUs, batch sizes against data parallelism, node-local paths
on multi-node jobs (the batch script checks visibility from every node again at run time).
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from megatron_stag.config.recipe import check_world, model_parallel_sizes
from megatron_stag.platform.shipped import shipped_dir

SLURM_DIR = shipped_dir("slurm")
NODE_LOCAL_PREFIXES = ("/tmp/", "/var/tmp/", "/dev/shm/", "/run/")
NODE_LOCAL_FS = ("tmpfs", "ramfs", "devtmpfs")


class SlurmError(ValueError):
    """A job that cannot run as asked; the message says which value to change."""


@dataclass
class JobShape:
    nodes: int
    tasks_per_node: int
    gpus_per_node: int  # 0: CPU ranks
    cpus_per_task: int = 1

    @property
    def world(self) -> int:
        return self.nodes * self.tasks_per_node


@dataclass
class JobOptions:
    """What `submit` turns into sbatch options (None: the cluster's or the script's default)."""

    job_name: str
    run_dir: Path
    partition: Optional[str] = None
    account: Optional[str] = None
    time: Optional[str] = None
    signal_seconds: int = 300  # warning before the time limit: checkpoint, then requeue
    container_image: Optional[str] = None
    container_mounts: Optional[str] = None
    extra_sbatch: list[str] = field(default_factory=list)


def time_limit_seconds(text: str) -> Optional[int]:
    """sbatch's --time in seconds, None for no limit (0, UNLIMITED, INFINITE). Its forms: minutes,
    minutes:seconds, hours:minutes:seconds, days-hours, days-hours:minutes, days-hours:minutes:seconds."""
    if text.strip().upper() in ("UNLIMITED", "INFINITE"):
        return None
    m = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", text.strip())
    if m is None:
        raise SlurmError(f"--time {text!r} is not a Slurm time limit: give minutes, MM:SS, HH:MM:SS, D-HH, "
                         f"D-HH:MM or D-HH:MM:SS.")
    days, a, b, c = (int(g) if g is not None else None for g in m.groups())
    if days is not None:
        seconds = days * 86400 + a * 3600 + (b or 0) * 60 + (c or 0)
    elif c is not None:
        seconds = a * 3600 + b * 60 + c
    else:
        seconds = a * 60 + (b or 0)
    return seconds or None


def check_warning_time(opts: JobOptions) -> None:
    """The time-limit warning (checkpoint, then requeue) must come some time after the job starts.
    Slurm sends it signal_seconds before the limit, up to 60 s early, and at once where the limit is
    shorter: the job would save and requeue as it starts, and so would every requeued run of it."""
    limit = time_limit_seconds(opts.time) if opts.time else None
    if limit is not None and opts.signal_seconds + 60 > limit:
        raise SlurmError(f"--signal-seconds {opts.signal_seconds} is not 60 s below --time {opts.time} ({limit} s): "
                         f"the checkpoint-and-requeue warning would come as the job starts, and again in every "
                         f"requeued run; give a longer --time or a smaller --signal-seconds.")


def adopt_slurm_rank_env(environ=os.environ) -> bool:
    """Inside an srun step started by our batch scripts (which export MASTER_ADDR/MASTER_PORT),
    set RANK, LOCAL_RANK and WORLD_SIZE from SLURM_PROCID, SLURM_LOCALID and SLURM_STEP_NUM_TASKS.
    Launchers that set RANK themselves (torchrun) are left alone. Returns whether it applied."""
    if "RANK" in environ or "SLURM_PROCID" not in environ or "SLURM_STEP_NUM_TASKS" not in environ:
        return False
    if "MASTER_ADDR" not in environ or "MASTER_PORT" not in environ:
        return False
    environ["RANK"] = environ["SLURM_PROCID"]
    environ["LOCAL_RANK"] = environ.get("SLURM_LOCALID", "0")
    environ["WORLD_SIZE"] = environ["SLURM_STEP_NUM_TASKS"]
    return True


# ---------------------------------------------------------------------------------- shapes
def pretrain_shape(recipe, nodes: Optional[int], gpus_per_node: Optional[int], cpu: bool) -> JobShape:
    """nodes x tasks for a recipe: one task per GPU (or per CPU rank with `cpu`)."""
    tp, pp, cp = model_parallel_sizes(recipe)
    model_parallel = tp * pp * cp
    per_node = gpus_per_node or int(recipe.get("nproc_per_node") or (model_parallel if cpu else 8))
    if per_node < 1:
        raise SlurmError(f"--gpus-per-node {per_node}: a node runs at least one task.")
    nodes = nodes or max(1, -(-model_parallel // per_node))
    shape = JobShape(nodes, per_node, 0 if cpu else per_node)
    if tp > per_node:
        raise SlurmError(f"parallelism.tensor_model_parallel_size={tp} exceeds the {per_node} tasks per node: "
                         f"tensor-parallel groups must stay inside a node (lower it or use bigger nodes).")
    check_world(recipe, shape.world, f"{nodes} node(s) x {per_node} tasks", "--nodes, --gpus-per-node")
    return shape


def generate_shape(sections: int, tp: int, nodes: Optional[int], gpus_per_node: Optional[int],
                   cpu: bool) -> JobShape:
    """One section per rank group of `tp` (sections x tp ranks in all)."""
    world = sections * tp
    per_node = gpus_per_node or world
    nodes = nodes or max(1, -(-world // per_node))
    if nodes * per_node != world:
        raise SlurmError(f"staggered generation runs one section per group of --tp {tp} ranks: {sections} "
                         f"sections need {world} tasks, but {nodes} node(s) x {per_node} = {nodes * per_node}; "
                         f"choose --nodes and --gpus-per-node with that product.")
    if tp > per_node:
        raise SlurmError(f"--tp {tp} exceeds the {per_node} tasks per node: keep each section on one node.")
    return JobShape(nodes, per_node, 0 if cpu else per_node)


def check_shared_paths(paths: list[Path], nodes: int) -> None:
    """Multi-node jobs need the run directory, data and tokenizer on a filesystem every node sees."""
    if nodes < 2:
        return
    mounts = _mount_types()
    for path in paths:
        resolved = Path(os.path.abspath(path))
        fs = _fs_type(resolved, mounts)
        prefix = next((p for p in NODE_LOCAL_PREFIXES if str(resolved).startswith(p)), None)
        if prefix or fs in NODE_LOCAL_FS:
            why = f"under {prefix}, which every node has its own of" if prefix else f"a {fs} filesystem"
            raise SlurmError(f"{path} is on a node-local filesystem ({why}); a {nodes}-node job needs it on "
                             f"a shared filesystem (NFS, Lustre, GPFS, ...): move it or pass a shared --run-dir.")


FINISHED_STATES = ("COMPLETED", "CANCELLED", "FAILED", "TIMEOUT", "NODE_FAIL", "PREEMPTED", "BOOT_FAIL",
                   "DEADLINE", "OUT_OF_MEMORY")  # as slurm/pretrain.sbatch's job_active (a test keeps them equal)


def check_run_dir_free(run_dir: Path, opts: "JobOptions") -> None:
    """The batch script lets one job train in a run directory at a time (its id in `.job`); a second
    job would stop as it starts. Say so now, unless the job is queued behind the holder (--dependency)."""
    owner_file = Path(run_dir) / ".job"
    if (not owner_file.is_file() or shutil.which("squeue") is None
            or any(o.startswith(("--dependency", "-d")) for o in opts.extra_sbatch)):
        return
    owner = owner_file.read_text().strip()
    state = subprocess.run(["squeue", "-h", "-j", owner, "-o", "%T"], capture_output=True, text=True).stdout.strip()
    if state and state not in FINISHED_STATES:
        raise SlurmError(f"job {owner} ({state.lower()}) is training in {run_dir}: add "
                         f"--sbatch=--dependency=afterany:{owner} to start after it, or use another --run-dir "
                         f"(nothing was submitted).")


def job_files(opts: "JobOptions") -> list[Path]:
    """What every node's tasks run besides the data: the interpreter (with megatron-stag installed
    beside it), unless a container image brings its own."""
    return [] if opts.container_image else [Path(job_environment(opts)["STAG_PYTHON"])]


def _mount_types() -> list[tuple[str, str]]:
    try:
        lines = Path("/proc/mounts").read_text().splitlines()
    except OSError:
        return []
    return sorted(((row.split()[1], row.split()[2]) for row in lines if len(row.split()) > 2),
                  key=lambda m: len(m[0]), reverse=True)


def _fs_type(path: Path, mounts) -> str:
    for mount, fs in mounts:
        if str(path) == mount or str(path).startswith(mount.rstrip("/") + "/"):
            return fs
    return ""


# ---------------------------------------------------------------------------------- sbatch
def sbatch_options(shape: JobShape, opts: JobOptions) -> list[str]:
    """The #SBATCH options of the job as sbatch command-line options (they override the script's)."""
    out = [f"--job-name={opts.job_name}", f"--nodes={shape.nodes}", f"--ntasks-per-node={shape.tasks_per_node}",
           f"--cpus-per-task={shape.cpus_per_task}", f"--output={opts.run_dir}/slurm-%j.out",
           f"--signal=B:USR1@{opts.signal_seconds}", "--requeue", "--open-mode=append", "--parsable"]
    if shape.gpus_per_node:
        out.append(f"--gpus-per-node={shape.gpus_per_node}")
    for name in ("partition", "account", "time"):
        if getattr(opts, name):
            out.append(f"--{name}={getattr(opts, name)}")
    return out + list(opts.extra_sbatch)


def job_environment(opts: JobOptions) -> dict[str, str]:
    """Variables the batch script reads (sbatch exports the submitting environment to the job)."""
    env = {"STAG_RUN_DIR": str(opts.run_dir), "STAG_SLURM_DIR": str(SLURM_DIR)}
    if opts.container_image:
        env["STAG_CONTAINER_IMAGE"] = opts.container_image
        if opts.container_mounts:
            env["STAG_CONTAINER_MOUNTS"] = opts.container_mounts
    else:
        env["STAG_PYTHON"] = os.environ.get("STAG_PYTHON", _python())
    return env


def _python() -> str:
    import sys

    return sys.executable


def sbatch_command(script: str, shape: JobShape, opts: JobOptions, args: list[str]) -> list[str]:
    return ["sbatch", *sbatch_options(shape, opts), str(SLURM_DIR / script), *args]


def submit(cmd: list[str], env: dict[str, str], dry_run: bool) -> Optional[str]:
    """Print (dry run) or run sbatch; returns the job id."""
    shown = " ".join(f"{k}={shlex.quote(v)}" for k, v in env.items()) + " " + shlex.join(cmd)
    if dry_run:
        print(shown)
        return None
    if shutil.which("sbatch") is None:
        raise SlurmError("sbatch was not found on PATH: submit from a machine with Slurm's client commands "
                         "(a login node), or print the command with --dry-run.")
    Path(env["STAG_RUN_DIR"]).mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(cmd, env={**os.environ, **env}, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SlurmError(f"sbatch failed ({proc.returncode}): {proc.stderr.strip()}")
    job = proc.stdout.strip().split(";")[0]
    print(f"submitted job {job}: log {env['STAG_RUN_DIR']}/slurm-{job}.out")
    return job
