"""Checkpoint files never run code: a planted pickle payload in a torch_dist `.metadata` file (read by
torch's reader with plain pickle.load) or in a byte item (read with torch.load(weights_only=False))
is refused with an error naming the file, on every entry point that reads a checkpoint.

Without `checkpointing/safe_unpickle.py` the payload runs (the marker file appears) and the commands
succeed as if nothing happened."""

import io
import pickle
import shutil
from pathlib import Path

import pytest
import torch

from tests.cli_helpers import cli


class Payload:
    """Unpickling this creates `marker`: what a crafted checkpoint would do with os.system."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').write('ran')",)


def _poisoned_copy(quickstart_run, tmp_path) -> tuple[Path, Path, Path]:
    """(save folder copy, its iteration folder, marker path) with the payload as `.metadata`."""
    out, _ = quickstart_run
    ckpts = shutil.copytree(out / "checkpoints", tmp_path / "checkpoints")
    iteration = next(ckpts.glob("iter_*"))
    marker = tmp_path / "marker"
    real = pickle.loads((iteration / ".metadata").read_bytes())  # a real one still unpickles plainly
    assert type(real).__name__ == "Metadata"
    (iteration / ".metadata").write_bytes(pickle.dumps(Payload(marker)))
    return ckpts, iteration, marker


def _refused(proc, marker: Path, iteration: Path) -> None:
    assert not marker.exists(), "the checkpoint ran code"
    assert proc.returncode != 0
    assert str(iteration / ".metadata") in proc.stdout + proc.stderr


def test_generate_and_export_refuse_a_planted_metadata_payload(quickstart_run, tmp_path):
    ckpts, iteration, marker = _poisoned_copy(quickstart_run, tmp_path)
    _refused(cli("generate", str(ckpts), "--prompt", "def f(", "--max-new-tokens", "2", check=False),
             marker, iteration)
    _refused(cli("export", str(ckpts), str(tmp_path / "exported"), check=False), marker, iteration)
    assert not (tmp_path / "exported").exists()


def test_pretrain_resume_refuses_a_planted_metadata_payload(quickstart_run, tmp_path):
    """megatron.training's own --load path (inside `pretrain`), not only our loaders."""
    out, _ = quickstart_run
    ckpts, iteration, marker = _poisoned_copy(quickstart_run, tmp_path)
    data = out / "data"
    proc = cli("pretrain", "tiny-cpu-stag", f"data.data_path=[{data / 'stdlib_text_document'}]",
               f"data.tokenizer_model={data / 'stdlib.model'}", f"checkpoint.save={tmp_path / 'new'}",
               f"checkpoint.load={ckpts}", "training.train_iters=102", check=False)
    _refused(proc, marker, iteration)


def test_byte_items_are_loaded_without_code(tmp_path):
    """Megatron's ShardedObjects (RNG state, optimizer groups, args) come back through
    DefaultLoadPlanner.load_bytes: plain data loads, a payload is refused by name."""
    import argparse

    import numpy as np
    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
    from torch.distributed.checkpoint.metadata import MetadataIndex
    from torch.distributed.checkpoint.planner import LoadItemType, ReadItem

    from megatron_stag.checkpointing import safe_unpickle

    safe_unpickle.install()
    item = ReadItem(type=LoadItemType.BYTE_IO, dest_index=MetadataIndex("rng_state"), dest_offsets=torch.Size(),
                    storage_index=MetadataIndex("rng_state"), storage_offsets=torch.Size(), lengths=torch.Size())
    planner = DefaultLoadPlanner(flatten_state_dict=False)
    planner.state_dict = {}
    state = {"random": np.random.get_state(), "torch": torch.get_rng_state(), "args": argparse.Namespace(lr=0.1)}
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    planner.load_bytes(item, buf)
    assert planner.state_dict["rng_state"]["args"].lr == 0.1
    assert np.array_equal(planner.state_dict["rng_state"]["random"][1], state["random"][1])

    marker = tmp_path / "marker"
    buf = io.BytesIO()
    torch.save({"x": Payload(marker)}, buf)
    buf.seek(0)
    with pytest.raises(safe_unpickle.UnsafeCheckpointError, match="'rng_state'"):
        planner.load_bytes(item, buf)
    assert not marker.exists()


def test_metadata_unpickler_admits_only_checkpoint_types(tmp_path):
    from megatron_stag.checkpointing import safe_unpickle

    with pytest.raises(safe_unpickle.UnsafeCheckpointError, match="x/.metadata.*builtins.exec"):
        safe_unpickle.load_metadata(io.BytesIO(pickle.dumps(Payload(tmp_path / "m"))), "x/.metadata")
    assert not (tmp_path / "m").exists()
    assert safe_unpickle.load_metadata(io.BytesIO(pickle.dumps({"a": torch.Size([2]), "b": torch.bfloat16})),
                                       "ok") == {"a": torch.Size([2]), "b": torch.bfloat16}


def test_an_incomplete_checkpoint_is_one_line(quickstart_run, tmp_path):
    """Issue 15: a checkpoint with a shard file gone failed deep in torch's reader."""
    out, _ = quickstart_run
    ckpts = shutil.copytree(out / "checkpoints", tmp_path / "checkpoints")
    shard = sorted(next(ckpts.glob("iter_*")).glob("*.distcp"))[0]
    shard.unlink()
    for args in (("export", str(ckpts), str(tmp_path / "pkg")), ("generate", str(ckpts), "--prompt", "x")):
        proc = cli(*args, check=False)
        assert proc.returncode != 0 and f"{shard.name} is missing" in proc.stderr, proc.stderr[-2000:]
        assert "Traceback" not in proc.stderr
