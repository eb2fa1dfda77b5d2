"""Megatron's training logs as data, and `megatron-stag plot`: loss curves of several runs in one PNG.

Reads the iteration lines (`iteration N/ M | ... | lm loss: X |`) and validation lines
(`validation loss at iteration N | lm loss value: X |`) that `megatron.training` prints and
`megatron-stag pretrain` keeps in `<save>/train.log`. A resumed run appends to the same log; the
latest value of an iteration wins, so curves continue where the checkpoint left off. (Megatron prints
the first iteration of a run without resetting its loss accumulator, so the next logged loss is the
mean over both: after a resume that one value is not the step's own loss.)
"""

from __future__ import annotations

import io
import re
from dataclasses import dataclass, field
from pathlib import Path

from megatron_stag.platform.files import write_atomic

TRAIN = re.compile(r"iteration\s+(\d+)/\s*\d+ \|.*?lm loss: ([0-9.E+-]+)")
GRAD_NORM = re.compile(r"iteration\s+(\d+)/\s*\d+ \|.*?grad norm: ([0-9.E+-]+)")
ITER_MS = re.compile(r"iteration\s+(\d+)/\s*\d+ \|.*?elapsed time per iteration \(ms\): ([0-9.]+)")
PARAMS = re.compile(r"number of parameters on \([^)]*\) model parallel rank \(([\d, ]+)\): (\d+)")
VALID = re.compile(r"validation loss at iteration (\d+)(?: on validation set)? \| lm loss value: ([0-9.E+-]+)")


@dataclass
class RunLog:
    name: str
    train: dict[int, float] = field(default_factory=dict)
    valid: dict[int, float] = field(default_factory=dict)
    grad_norm: dict[int, float] = field(default_factory=dict)
    iter_ms: dict[int, float] = field(default_factory=dict)
    params: int | None = None  # summed over the (tensor, pipeline) ranks megatron reports


def _log_files(path: Path) -> list[Path]:
    """A log file, a save folder's train.log (`pretrain`), or a Slurm run directory's slurm-<job>.out
    files (`submit`; a requeued job appends to its own, a resubmitted one starts another), oldest first."""
    if not path.is_dir():
        return [path] if path.is_file() else []
    if (path / "train.log").is_file():
        return [path / "train.log"]
    return sorted(path.glob("slurm-*.out"), key=lambda p: p.stat().st_mtime)


def read_log(path: Path, name: str | None = None) -> RunLog:
    path = Path(path)
    files = _log_files(path)
    if not files:
        raise FileNotFoundError(f"{path} has no log: pass a run's train.log, its save folder, or a Slurm "
                                f"run directory (with slurm-<job>.out).")
    text = "".join(f.read_text(encoding="utf-8", errors="replace") for f in files)
    path = files[-1]
    run = RunLog(name or (path.parent.name if path.name == "train.log" or path.name.startswith("slurm-")
                          else path.stem))
    run.train = {int(i): float(v) for i, v in TRAIN.findall(text)}
    run.valid = {int(i): float(v) for i, v in VALID.findall(text)}
    run.grad_norm = {int(i): float(v) for i, v in GRAD_NORM.findall(text)}
    run.iter_ms = {int(i): float(v) for i, v in ITER_MS.findall(text)}
    per_rank = {ranks: int(n) for ranks, n in PARAMS.findall(text)}
    run.params = sum(per_rank.values()) or None
    if not run.train:
        raise ValueError(f"{path} has no Megatron iteration lines with an lm loss.")
    return run


def plot_runs(runs: list[RunLog], out: Path, title: str = "loss") -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for i, run in enumerate(runs):
        color = f"C{i}"
        if run.train:
            steps = sorted(run.train)
            ax.plot(steps, [run.train[s] for s in steps], color=color, alpha=0.5, lw=1,
                    label=f"{run.name} (train)")
        if run.valid:
            steps = sorted(run.valid)
            ax.plot(steps, [run.valid[s] for s in steps], color=color, marker="o", lw=2,
                    label=f"{run.name} (validation)")
    ax.set_xlabel("iteration")
    ax.set_ylabel("lm loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    image = io.BytesIO()
    fig.savefig(image, dpi=120, format="png")
    plt.close(fig)
    write_atomic(out, image.getvalue())
    return out
