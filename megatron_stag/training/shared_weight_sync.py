"""Keep StagFormer's shared-weight copies identical across pipeline stages.

With `stag_shared_weights` and PP > 1 (e.g. PP = p, one section per stage), each stage holds its own
copy of the shared layers. megatron synchronises only the embedding between stages
(`distributed/finalize_model_grads.py`), so this module (a) makes the copies equal when the model is
built and (b) sums their gradients each step through `config.finalize_model_grads_func`.

Stage s holds slice s mod m of the shared layers (m = stages per section; m = 1 when a stage holds
whole sections). Slice j's copies live on the stages with s mod m == j; one collective over the
pipeline group per slice moves them (stages not holding the slice contribute zeros). The gradient sum
runs *before* megatron's data-parallel reduction: with the distributed optimizer the reduce-scatter
leaves only this rank's shard valid, and shard boundaries differ between stages. Summation commutes,
so the result equals the reduction of the summed gradient.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def _layout(model):
    pp = model.pg_collection.pp
    m = max(1, pp.size() // model.config.stag_sections)
    return pp, m, pp.rank() % m


def _comm_device(group):
    """NCCL moves only CUDA tensors (parameters may still be on the CPU at build time)."""
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _flat(tensors, device):
    return torch.cat([t.reshape(-1) for t in tensors]).to(device)


def _copy_back(flat, tensors):
    offset = 0
    for t in tensors:
        n = t.numel()
        t.copy_(flat[offset: offset + n].view_as(t).to(t.device))
        offset += n


def broadcast_shared_weights(model) -> None:
    """Copy stage j's section-0 slice onto every stage holding a copy of slice j."""
    pp, m, my_slice = _layout(model)
    params = [p.data for p in model.shared_weight_replicas()]
    if not params:
        return
    ranks = dist.get_process_group_ranks(pp)
    device = _comm_device(pp)
    with torch.no_grad():
        for j in range(m):
            buf = _flat(params, device)
            if my_slice != j:
                buf.zero_()
            dist.broadcast(buf, src=ranks[j], group=pp)
            if my_slice == j:
                _copy_back(buf, params)


def _grad(p):
    g = getattr(p, "main_grad", None)
    return g if g is not None else p.grad


def allreduce_shared_grads(model) -> None:
    """Sum the shared layers' gradients over the stages holding copies of the same slice."""
    pp, m, my_slice = _layout(model)
    if pp.size() == 1:
        return
    params = model.shared_weight_replicas()
    grads = [_grad(p) for p in params]
    if not grads or any(g is None for g in grads):
        return
    device = _comm_device(pp)
    for j in range(m):
        buf = _flat(grads, device)
        if my_slice != j:
            buf.zero_()
        dist.all_reduce(buf, group=pp)
        if my_slice == j:
            _copy_back(buf, grads)


def _unwrap(chunk):
    while hasattr(chunk, "module"):
        chunk = chunk.module
    return chunk


def make_finalize_model_grads(base=None):
    """`config.finalize_model_grads_func` that adds the shared-weight sum before megatron's own."""
    if base is None:
        from megatron.core.distributed.finalize_model_grads import finalize_model_grads as base

    def finalize(model_chunks, *args, **kwargs):
        for chunk in model_chunks:
            inner = _unwrap(chunk)
            if getattr(inner.config, "stag_shared_weights", False):
                ddp_config = getattr(chunk, "ddp_config", None)
                if ddp_config is not None and ddp_config.overlap_grad_reduce:
                    raise ValueError(
                        "stag_shared_weights with pipeline parallelism needs overlap_grad_reduce="
                        "False: the shared-weight gradient sum must precede the data-parallel "
                        "reduction."
                    )
                allreduce_shared_grads(inner)
        return base(model_chunks, *args, **kwargs)

    return finalize
