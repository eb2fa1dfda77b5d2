"""Training data through megatron's own dataset stack: GPTDataset over indexed datasets, weighted
blends and train/valid/test splits built by `BlendedMegatronDatasetBuilder`. The one place our entry
points build datasets (`megatron-stag pretrain`'s dataset provider calls it)."""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional, Sequence


def build_gpt_datasets(blend, blend_per_split, split: Optional[str], seq_len: int, tokenizer,
                       samples: Sequence[int], seed: int, cache: Optional[Path] = None,
                       on_this_rank: Callable[[], bool] = lambda: True, **config):
    """(train, valid, test) megatron GPTDatasets.

    `blend` is megatron's (prefixes, weights or None); `blend_per_split` one such pair per split.
    Missing, truncated or corrupt files, and a split that would get no document, fail first with a
    message naming the fix. `config` passes further GPTDatasetConfig fields (reset_position_ids, ...)."""
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

    from megatron_stag.data.token_dataset import check_indexed_dataset, check_split_documents

    def as_str(pair):
        return None if pair is None else ([str(p) for p in pair[0]], pair[1])

    blend = as_str(blend)
    blend_per_split = [as_str(p) for p in blend_per_split] if blend_per_split else None
    for pair in [blend] + list(blend_per_split or []):
        for prefix in (pair[0] if pair else []):
            check_indexed_dataset(prefix)
    config = GPTDatasetConfig(
        random_seed=seed, sequence_length=seq_len, blend=blend, blend_per_split=blend_per_split,
        split=split, tokenizer=tokenizer, path_to_cache=str(cache) if cache else None,
        **{"reset_position_ids": False, "reset_attention_mask": False, "eod_mask_loss": False,
           "mid_level_dataset_surplus": 0.005, **config})
    if blend and not blend_per_split:
        for prefix in blend[0]:
            check_split_documents(prefix, config.split_matrix, samples)
    return BlendedMegatronDatasetBuilder(GPTDataset, list(samples), on_this_rank, config).build()
