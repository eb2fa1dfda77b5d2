"""Process-group setup shared by tests, demos and entry points (NCCL on GPUs, gloo on CPU)."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

from megatron_stag.platform import cpu


LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def launched() -> bool:
    """Whether a launcher (torchrun, srun with exported variables, our test spawner) set us up."""
    return all(v in os.environ for v in LAUNCHER_VARS)


def free_port() -> int:
    """A TCP port that is free right now on this host."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def initialize(tp: int = 1, pp: int = 1, seed: int = 1234, ep: int = 1) -> None:
    """Start torch.distributed (from the launcher's env vars, or as a lone process on a free port,
    leaving the environment untouched for child processes) and megatron's parallel groups."""
    cpu.activate()
    if not dist.is_initialized():
        backend, bound = "gloo", {}
        if torch.cuda.is_available():  # NCCL bound to this rank's GPU (its barriers then name no guess)
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
            backend, bound = "nccl", dict(device_id=torch.device("cuda", torch.cuda.current_device()))
        if launched():
            dist.init_process_group(backend, **bound)
        else:
            dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{free_port()}",
                                    rank=0, world_size=1, **bound)
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    if not _initialized_as(tp, pp, ep):
        _destroy_model_parallel()
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp, expert_model_parallel_size=ep)
    model_parallel_cuda_manual_seed(seed)


def _initialized_as(tp: int, pp: int, ep: int) -> bool:
    """megatron's groups exist already with these sizes (a process that exports, imports or
    benchmarks several models in turn keeps them, and the models built on them stay usable)."""
    from megatron.core import parallel_state

    return parallel_state.model_parallel_is_initialized() and (tp, pp, ep) == (
        parallel_state.get_tensor_model_parallel_world_size(),
        parallel_state.get_pipeline_model_parallel_world_size(),
        parallel_state.get_expert_model_parallel_world_size())


def _destroy_model_parallel() -> None:
    """megatron's `destroy_model_parallel` forgets the groups it made but leaves most of them alive in
    torch's registry, each gloo group with three threads that keep polling (a test session that
    re-made them at every in-process export held 524 groups, whose 1,572 threads took two thirds of
    a core). The groups megatron lists as its own are destroyed here first."""
    from megatron.core import parallel_state

    live = dist.distributed_c10d._world.pg_map
    for group in getattr(parallel_state, "_global_process_group_list", None) or []:
        if group is not None and group in live:
            dist.destroy_process_group(group)
    parallel_state.destroy_model_parallel()


def shutdown() -> None:
    _destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
