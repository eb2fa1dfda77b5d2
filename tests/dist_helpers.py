"""Spawning a few CPU ranks (gloo) for parallel-equivalence tests."""

from __future__ import annotations

import multiprocessing
import os
import warnings

import torch.multiprocessing as mp

from megatron_stag.platform.distributed import free_port


def _entry(rank, world, port, fn, args):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank), OMP_NUM_THREADS="1")
    fn(rank, world, *args)


# Ranks fork from one forkserver that imported these once per test session, rather than each rank
# importing torch and megatron-core afresh (5-10 s a rank on a 2-core CI machine; the default
# parallel-equivalence cases 290 -> 80 s). The imports only define modules: no device, process group or
# compile worker exists before the fork (numpy's BLAS pool re-forms in the child).
PRELOAD = ["torch", "megatron.core.models.gpt", "megatron.core.distributed", "megatron.core.optimizer",
           "megatron.core.pipeline_parallel", "megatron.core.dist_checkpointing", "megatron_stag.models.stagformer_model",
           "megatron_stag.serving.engine", "tests.parallel_workers"]
multiprocessing.set_forkserver_preload(PRELOAD)


def run_ranks(fn, world: int, *args) -> None:
    """Run fn(rank, world, *args) in `world` new processes (forked from the forkserver); raises if any
    rank fails.

    A rank that raises fails the test at once. A rank killed by a signal gets the group one more try on
    a new port: seen once in CI, a gloo rank aborted natively ("terminate called without an active
    exception") three seconds after start, during set-up, and passed on a dozen reruns."""
    for attempt in (1, 2):
        try:
            mp.start_processes(_entry, args=(world, free_port(), fn, args), nprocs=world, join=True,
                               start_method="forkserver")
            return
        except mp.ProcessExitedException as crash:
            if crash.signal_name is None or attempt == 2:  # a plain non-zero exit fails like any other
                raise
            warnings.warn(f"rank {crash.error_index} died by signal {crash.signal_name}; running the ranks again")
