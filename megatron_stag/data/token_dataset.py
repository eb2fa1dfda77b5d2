"""Token streams in megatron's indexed dataset format (.bin/.idx), and LM batches from them."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Iterable

import numpy as np
import torch


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


def load_token_stream(prefix: Path) -> np.ndarray:
    """All tokens of an indexed dataset as one array; corrupt or truncated files get a clear error."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    prefix = Path(prefix)
    for suffix in (".bin", ".idx"):
        if not Path(f"{prefix}{suffix}").is_file():
            raise FileNotFoundError(f"dataset file {prefix}{suffix} is missing: run data preparation.")
    try:
        ds = IndexedDataset(str(prefix), mmap=True)
        return np.concatenate([np.asarray(ds[i]) for i in range(len(ds))]).astype(np.int64)
    except Exception as err:
        raise ValueError(f"dataset {prefix} is corrupt or truncated ({err}): prepare it again.") from err


class RandomWindows:
    """Batches of random (input, label) windows from a token stream; seeded and resumable."""

    def __init__(self, tokens: np.ndarray, seq_len: int, batch: int, seed: int):
        if len(tokens) <= seq_len + 1:
            raise ValueError(f"{len(tokens)} tokens cannot fill one window of {seq_len + 1}.")
        self.tokens = torch.from_numpy(tokens)
        self.seq_len, self.batch = seq_len, batch
        self.generator = torch.Generator().manual_seed(seed)

    def __next__(self):
        starts = torch.randint(0, len(self.tokens) - self.seq_len - 1, (self.batch,),
                               generator=self.generator)
        windows = torch.stack([self.tokens[s: s + self.seq_len + 1] for s in starts.tolist()])
        return windows[:, :-1], windows[:, 1:]

    def __iter__(self):
        return self
