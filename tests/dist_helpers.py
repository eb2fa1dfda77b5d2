"""Spawning a few CPU ranks (gloo) for parallel-equivalence tests."""

from __future__ import annotations

import os
import warnings

import torch.multiprocessing as mp

from megatron_stag.platform.distributed import free_port


def _entry(rank, world, port, fn, args):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank), OMP_NUM_THREADS="1")
    fn(rank, world, *args)


def run_ranks(fn, world: int, *args) -> None:
    """Run fn(rank, world, *args) in `world` fresh processes; raises if any rank fails.

    A rank that raises fails the test at once. A rank killed by a signal gets the group one more try on
    a new port: seen once in CI, a gloo rank aborted natively ("terminate called without an active
    exception") three seconds after start, during set-up, and passed on a dozen reruns."""
    for attempt in (1, 2):
        try:
            mp.start_processes(_entry, args=(world, free_port(), fn, args), nprocs=world, join=True,
                               start_method="spawn")
            return
        except mp.ProcessExitedException as crash:
            if crash.signal_name is None or attempt == 2:  # a plain non-zero exit fails like any other
                raise
            warnings.warn(f"rank {crash.error_index} died by signal {crash.signal_name}; running the ranks again")
