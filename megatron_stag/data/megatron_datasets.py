"""Training data through megatron's own dataset stack: GPTDataset over indexed datasets, weighted
blends and train/valid/test splits built by `BlendedMegatronDatasetBuilder`."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch


def build_gpt_datasets(prefixes: Sequence[Path], weights: Sequence[float] | None, split: str,
                       seq_len: int, tokenizer, samples: Sequence[int], seed: int, cache: Path):
    """(train, valid, test) megatron GPTDatasets; `weights` blends several prefixes."""
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

    from megatron_stag.data.token_dataset import check_indexed_dataset

    for prefix in prefixes:
        check_indexed_dataset(prefix)
    blend = ([str(p) for p in prefixes], list(weights) if weights else None)
    config = GPTDatasetConfig(
        random_seed=seed, sequence_length=seq_len, blend=blend, split=split, tokenizer=tokenizer,
        reset_position_ids=False, reset_attention_mask=False, eod_mask_loss=False,
        path_to_cache=str(cache), mid_level_dataset_surplus=0.005)
    return BlendedMegatronDatasetBuilder(GPTDataset, list(samples), lambda: True, config).build()


def batches(dataset, batch_size: int, seed: int = 0):
    """Endless (tokens, labels) batches from a megatron GPT dataset, in its own (seeded) order."""
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False, drop_last=True)
    while True:
        for item in loader:
            yield item["tokens"], item["labels"]
