"""Save and load megatron-stag checkpoints: complete or absent, never executing code.

Layout of a checkpoint directory:
  model_args.json    the model description (plain JSON)
  tokenizer.model    the sentencepiece model, when there is one
  trainer.json       iteration and consumed samples (plain JSON)
  model/             megatron-core distributed checkpoint (torch_dist), any TP/PP layout
  COMPLETE           written last

Everything is written into `<dir>.tmp` and renamed onto `<dir>` at the end, so an interrupted
save never leaves a directory that looks like a checkpoint. `latest_checkpoint` picks only directories
that carry COMPLETE. Weights are loaded through megatron's dist_checkpointing, whose pickled parts
(`.metadata`, byte items) are read by `safe_unpickle`'s restricted unpicklers.

Runs of `megatron-stag pretrain` use Megatron's own layout instead: `<save>/iter_NNNNNNN/` (torch_dist)
and `latest_checkpointed_iteration.txt`, which Megatron writes only after a checkpoint is complete,
with our `model_args.json` and `tokenizer.model` in `<save>`. `resolve_checkpoint` accepts both.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Optional

import torch.distributed as dist

from megatron_stag.models.model_args import ModelArgs


def _rank0() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def save_checkpoint(model, args: ModelArgs, directory: Path, trainer_state: dict,
                    tokenizer_model: Optional[Path] = None) -> Path:
    """Collective over all ranks: writes the model's shards and metadata, then renames into place."""
    from megatron.core import dist_checkpointing

    directory = Path(directory)
    tmp = directory.with_name(f"{directory.name}.tmp")  # same path on every rank
    if _rank0():
        shutil.rmtree(tmp, ignore_errors=True)
        (tmp / "model").mkdir(parents=True)
    _barrier()
    dist_checkpointing.save(model.sharded_state_dict(), str(tmp / "model"))
    if _rank0():
        args.save(tmp / "model_args.json")
        (tmp / "trainer.json").write_text(json.dumps(trainer_state, indent=2) + "\n")
        if tokenizer_model is not None:
            shutil.copyfile(tokenizer_model, tmp / "tokenizer.model")
        (tmp / "COMPLETE").write_text("ok\n")
        if directory.exists():
            shutil.rmtree(directory)
        tmp.rename(directory)
    _barrier()
    return directory


def check_checkpoint(directory: Path) -> Path:
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"checkpoint {directory} does not exist.")
    if not (directory / "COMPLETE").is_file():
        raise ValueError(f"checkpoint {directory} is incomplete (no COMPLETE marker): it was "
                         f"interrupted while being written; use an earlier one.")
    return directory


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
    """(weights folder, folder holding model_args.json and tokenizer.model) for a checkpoint path:
    one of ours, a Megatron save folder (its latest complete iteration), or a Megatron iter_* folder."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} does not exist.")
    if (path / "model_args.json").is_file() and (path / "COMPLETE").is_file():
        return path / "model", path
    latest = megatron_latest(path)
    if latest is not None:
        return latest, path
    if path.name.startswith("iter_") and (path.parent / "model_args.json").is_file():
        if not (path / "metadata.json").is_file():
            raise ValueError(f"checkpoint {path} is incomplete (no metadata.json): it was interrupted "
                             f"while being written; use an earlier one.")
        return path, path.parent
    ours = latest_checkpoint(path)
    if ours is not None:
        return ours / "model", ours
    if (path / "model_args.json").is_file():
        check_checkpoint(path)  # ours, but without COMPLETE: explains the interrupted write
    raise FileNotFoundError(f"{path} is not a checkpoint: expected a megatron-stag checkpoint (with "
                            f"model_args.json), a `megatron-stag pretrain` save folder (with "
                            f"{MEGATRON_TRACKER}) or one of its iter_* folders.")


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


def latest_checkpoint(root: Path) -> Optional[Path]:
    """The newest complete `iter_*` checkpoint under root (interrupted writes are ignored)."""
    root = Path(root)
    if not root.is_dir():
        return None
    done = [d for d in root.glob("iter_*") if d.is_dir() and (d / "COMPLETE").is_file()]
    return max(done, key=lambda d: int(d.name.split("_")[1]), default=None)
