"""Spawning a few CPU ranks (gloo) for parallel-equivalence tests."""

from __future__ import annotations

import os

import torch.multiprocessing as mp

from megatron_stag.platform.distributed import free_port


def _entry(rank, world, port, fn, args):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank), OMP_NUM_THREADS="1")
    fn(rank, world, *args)


def run_ranks(fn, world: int, *args) -> None:
    """Run fn(rank, world, *args) in `world` fresh processes; raises if any rank fails."""
    mp.start_processes(_entry, args=(world, free_port(), fn, args), nprocs=world, join=True,
                       start_method="spawn")
