"""Find and load megatron-stag checkpoints, never executing code.

A checkpoint is a `megatron-stag pretrain` save folder in Megatron's own layout: `<save>/iter_NNNNNNN/`
(torch_dist, any TP/PP layout) and `latest_checkpointed_iteration.txt`, which Megatron writes only
after a checkpoint is complete (so an interrupted save is never picked up), with our
`model_args.json` and `tokenizer.model` beside them; `megatron-stag import` writes the same layout with
a 'release' folder. Weights are loaded through megatron's dist_checkpointing, whose pickled parts
(`.metadata`, byte items) are read by `safe_unpickle`'s restricted unpicklers.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional


def write_results_in_process() -> None:
    """Synchronous torch_dist saves in this process hand their write results over in-process.

    megatron's writer threads run in the saving process, yet megatron passes their results through a
    `multiprocessing.Manager` queue that it starts with spawn at the first save: a fresh interpreter
    that imports torch to unpickle them (3-5 s of a small job's first save, then one more process to
    join at exit). Only `--async-save`, whose writer is another process, needs that queue; callers
    that save synchronously install a plain one."""
    import queue

    from megatron.core.dist_checkpointing.strategies import filesystem_async

    if filesystem_async._results_queue is None:
        filesystem_async._results_queue = queue.Queue()


MEGATRON_TRACKER = "latest_checkpointed_iteration.txt"


def megatron_latest(save_dir: Path) -> Optional[Path]:
    """The iteration folder Megatron's tracker names (None when there is no complete checkpoint);
    'release' is a converted model (`megatron-stag import`): weights only, loaded as iteration 0."""
    tracker = Path(save_dir) / MEGATRON_TRACKER
    if not tracker.is_file():
        return None
    text = tracker.read_text().strip()
    if text == "release":
        return Path(save_dir) / "release"
    if not text.isdigit():
        raise ValueError(f"{tracker} holds {text!r}, not an iteration number or 'release'.")
    return Path(save_dir) / f"iter_{int(text):07d}"


def resolve_checkpoint(path: Path) -> tuple[Path, Path]:
    """(weights folder, folder holding model_args.json and tokenizer.model) for a checkpoint path: a
    `megatron-stag pretrain` save folder (its latest complete iteration) or one of its iter_* folders."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} does not exist.")
    latest = megatron_latest(path)
    if latest is not None:
        return latest, path
    if path.name.startswith("iter_") and (path.parent / "model_args.json").is_file():
        if not (path / "metadata.json").is_file():
            raise ValueError(f"checkpoint {path} is incomplete (no metadata.json): it was interrupted "
                             f"while being written; use an earlier one.")
        return path, path.parent
    if (path / "model_args.json").is_file():
        raise FileNotFoundError(f"{path} holds no complete checkpoint yet (no {MEGATRON_TRACKER}, which "
                                f"Megatron writes once a save has finished): wait for the run's first "
                                f"checkpoint (checkpoint.save_interval), or pass an earlier save folder.")
    raise FileNotFoundError(f"{path} is not a checkpoint: expected a `megatron-stag pretrain` save folder "
                            f"(with model_args.json and {MEGATRON_TRACKER}) or one of its iter_* folders.")


def load_model_weights(model, directory: Path) -> None:
    """Load the model's shards from any checkpoint `resolve_checkpoint` accepts (tensors only)."""
    from megatron.core import dist_checkpointing

    from megatron_stag.checkpointing import safe_unpickle

    safe_unpickle.install()
    weights, _ = resolve_checkpoint(directory)
    safe_unpickle.check_metadata(weights)
    wanted = model.sharded_state_dict()
    loaded = dist_checkpointing.load(wanted, str(weights))
    # a training checkpoint also carries Megatron's common state (iteration, optimizer, ...)
    model.load_state_dict({key: loaded[key] for key in wanted})
