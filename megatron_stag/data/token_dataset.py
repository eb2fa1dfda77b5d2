"""Megatron indexed datasets (.bin/.idx): written atomically, checked before use."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Iterable

import numpy as np
import torch


class DataError(ValueError):
    """Data that cannot train as given; the message names the file and the fix."""


def write_indexed_dataset(documents: Iterable[list[int]], prefix: Path, vocab_size: int,
                          total: int | None = None) -> Path:
    """Write documents (token lists, each ended by EOD by the caller) via megatron's builder.

    Written to a temporary prefix and renamed, so a dataset on disk is complete or absent.
    """
    from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder

    prefix = Path(prefix)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    tmp = prefix.with_name(prefix.name + ".tmp")
    builder = IndexedDatasetBuilder(f"{tmp}.bin", dtype=DType.optimal_dtype(vocab_size))
    start = time.perf_counter()
    for i, doc in enumerate(documents, 1):
        builder.add_document(torch.tensor(doc), [len(doc)])
        if i % 50 == 0 or i == total:
            _bar(i, total, start)
    builder.finalize(f"{tmp}.idx")
    print(file=sys.stderr)
    Path(f"{tmp}.bin").replace(f"{prefix}.bin")
    Path(f"{tmp}.idx").replace(f"{prefix}.idx")
    return prefix


def _bar(done: int, total: int | None, start: float) -> None:
    rate = done / max(time.perf_counter() - start, 1e-9)
    if total:
        fill = "#" * int(30 * done / total)
        print(f"\rtokenizing [{fill:<30}] {done}/{total} docs {rate:.0f} docs/s", end="", file=sys.stderr)
    else:
        print(f"\rtokenizing {done} docs {rate:.0f} docs/s", end="", file=sys.stderr)


def check_indexed_dataset(prefix: Path) -> None:
    """Fail clearly on a missing, truncated or corrupt .bin/.idx pair before training reads it."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    prefix = Path(prefix)
    for suffix in (".bin", ".idx"):
        if not Path(f"{prefix}{suffix}").is_file():
            raise FileNotFoundError(f"dataset file {prefix}{suffix} is missing: run "
                                    f"`megatron-stag prepare-data` first.")
    try:
        ds = IndexedDataset(str(prefix), mmap=True)
        expected = int(ds.sequence_lengths.sum()) * np.dtype(ds.index.dtype).itemsize
    except Exception as err:
        raise DataError(f"dataset index {prefix}.idx is corrupt ({err}): prepare the data again.") from None
    actual = Path(f"{prefix}.bin").stat().st_size
    if actual != expected:
        raise DataError(f"dataset {prefix}.bin has {actual} bytes but its index describes {expected}: "
                         f"the file is truncated or corrupt; prepare the data again.")


def check_split_documents(prefix: Path, split_matrix, samples) -> None:
    """Each split megatron will draw samples from must own at least one document.

    megatron's GPTDataset splits a dataset by document ([round(lo * n), round(hi * n))); a split with
    no document but a positive sample count makes its epoch loop spin forever (seen with small
    data and a 2% validation split), so say so up front."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    n = IndexedDataset(str(prefix), mmap=True).document_indices.shape[0] - 1
    for name, bounds, wanted in zip(("train", "valid", "test"), split_matrix, samples):
        if bounds is None or not wanted:
            continue
        if int(round(bounds[1] * n)) - int(round(bounds[0] * n)) < 1:
            raise DataError(
                f"{prefix}: {n} documents give the {name} split (fraction {bounds[1] - bounds[0]:.3f}) "
                f"no document, but {wanted} {name} samples are needed: use more data (more, smaller "
                f"documents) or a larger {name} share in data.split.")
