"""Reading a checkpoint never runs code from it.

torch's distributed-checkpoint reader (which megatron's torch_dist loading, ours and the one inside
`megatron.training.pretrain`, goes through) unpickles two things without restriction:
- the `.metadata` file, with plain `pickle.load` (`FileSystemReader.read_metadata`);
- byte items, i.e. megatron's ShardedObjects (RNG states, optimizer parameter groups, common state),
  with `torch.load(weights_only=False)` (`DefaultLoadPlanner.load_bytes`).
A crafted file could execute arbitrary code through either. `install()` replaces both with
restricted unpicklers: the metadata admits only the dataclasses torch writes there, the byte items
only what `torch.load(weights_only=True)` admits plus the few types megatron stores in them.
Anything else raises `UnsafeCheckpointError` naming the file or item. torch offers no hook for
its reader, so this is a method replacement, installed once per process by every path that loads
weights: `load_model_weights` (generate, export, quickstart) and each rank of `pretrain`.
"""

from __future__ import annotations

import argparse
import io
import pickle
from typing import Any

import torch


class UnsafeCheckpointError(pickle.UnpicklingError):
    """A checkpoint file asked the unpickler for something other than checkpoint data."""


_DCP_MODULES = ("torch.distributed.checkpoint.metadata", "torch.distributed.checkpoint.planner",
                "torch.distributed.checkpoint.filesystem")


def _metadata_types() -> set[tuple[str, str]]:
    """The plain-data classes torch's checkpoint modules define (dataclasses and enums: unpickling them
    sets fields or looks up a member, never calls code of the file's choosing), plus what they hold."""
    import dataclasses
    import enum
    import importlib

    allowed = set()
    for name in _DCP_MODULES:
        module = importlib.import_module(name)
        for attr, value in vars(module).items():
            if isinstance(value, type) and value.__module__ == name and (
                    dataclasses.is_dataclass(value) or issubclass(value, enum.Enum)):
                allowed.add((name, attr))
    allowed |= {("torch", "Size"), ("collections", "OrderedDict"), ("builtins", "set"),
                ("builtins", "frozenset"), ("builtins", "slice"), ("torch.serialization", "_get_layout"),
                ("pathlib", "PosixPath"), ("pathlib", "PurePosixPath"), ("pathlib._local", "PosixPath"),
                ("pathlib._local", "PurePosixPath")}
    return allowed


def _torch_constant(module: str, name: str) -> bool:
    """torch.float32, torch.strided, torch.contiguous_format: pickled as names in `torch`."""
    return module == "torch" and isinstance(getattr(torch, name, None),
                                            (torch.dtype, torch.layout, torch.memory_format))


class _MetadataUnpickler(pickle.Unpickler):
    allowed: set[tuple[str, str]] = set()

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in self.allowed or _torch_constant(module, name):
            return super().find_class(module, name)
        raise UnsafeCheckpointError(f"refuses {module}.{name}")


def load_metadata(stream, path) -> Any:
    """Unpickle a `.metadata` file, admitting only torch's checkpoint-metadata types."""
    if not _MetadataUnpickler.allowed:
        _MetadataUnpickler.allowed = _metadata_types()
    try:
        return _MetadataUnpickler(stream).load()
    except UnsafeCheckpointError as err:
        raise UnsafeCheckpointError(
            f"checkpoint metadata {path} is not plain checkpoint data (the unpickler {err}): it may "
            f"have been crafted to run code, so nothing was loaded. Use a checkpoint from a trusted "
            f"source, or re-save it.") from None


def check_metadata(checkpoint_dir) -> None:
    """Read a torch_dist folder's `.metadata` through the restricted unpickler, so an unsafe file is
    refused with one clear error before megatron's loading starts (which would wrap it in tracebacks),
    and check that every shard file it names is there."""
    from pathlib import Path

    path = Path(checkpoint_dir) / ".metadata"
    if not path.is_file():
        return
    with open(path, "rb") as stream:
        metadata = load_metadata(stream, path)
    shards = {info.relative_path for info in (getattr(metadata, "storage_data", None) or {}).values()}
    missing = sorted(name for name in shards if not (Path(checkpoint_dir) / name).is_file())
    if missing:
        raise FileNotFoundError(f"checkpoint {checkpoint_dir} is incomplete: {', '.join(missing)} "
                                f"{'is' if len(missing) == 1 else 'are'} missing; use an earlier checkpoint.")


def _byte_item_globals() -> list:
    """Types megatron stores in ShardedObjects beyond tensors and containers: numpy RNG states and
    arrays, and the training arguments (an argparse.Namespace)."""
    import numpy as np

    types = [argparse.Namespace, np.ndarray, np.dtype, type(np.dtype(np.uint32))]
    types += [type(np.dtype(t)) for t in (np.float32, np.float64, np.int64, np.int32, np.bool_)]
    for mod in ("numpy._core.multiarray", "numpy.core.multiarray"):
        try:
            types.append(__import__(mod, fromlist=["_reconstruct"])._reconstruct)
        except (ImportError, AttributeError):
            pass
    return types


def load_byte_item(value: io.BytesIO, key) -> Any:
    """torch.load(weights_only=True) of one byte item, with megatron's extra types admitted."""
    with torch.serialization.safe_globals(_byte_item_globals()):
        try:
            return torch.load(value, weights_only=True)
        except pickle.UnpicklingError as err:
            raise UnsafeCheckpointError(
                f"checkpoint item {key!r} is not plain checkpoint data, so nothing was loaded "
                f"({str(err).splitlines()[0]}). Use a checkpoint from a trusted source.") from None


def install() -> None:
    """Route torch's distributed-checkpoint reading through the restricted unpicklers (idempotent)."""
    from torch.distributed.checkpoint import default_planner, filesystem
    from torch.distributed.checkpoint.metadata import StorageMeta

    reader = filesystem.FileSystemReader
    if getattr(reader.read_metadata, "_megatron_stag_safe", False):
        return

    def read_metadata(self, *args, **kwargs):
        path = self._get_metadata_path(kwargs.get("rank"))
        with self.fs.create_stream(path, "rb") as stream:
            metadata = load_metadata(stream, path)
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata

    def load_bytes(self, read_item, value):
        obj = load_byte_item(value, read_item.dest_index.fqn)
        if self.flatten_state_dict:
            default_planner.set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
        else:
            self.state_dict[read_item.dest_index.fqn] = obj

    read_metadata._megatron_stag_safe = True
    reader.read_metadata = read_metadata
    default_planner.DefaultLoadPlanner.load_bytes = load_bytes
