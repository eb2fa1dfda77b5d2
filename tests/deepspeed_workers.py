"""Rank functions for the DeepSpeed tests (spawned processes; DeepSpeed's CPU accelerator + gloo)."""

from __future__ import annotations

import os

import torch


def engine_logits(rank, world, package, ids_path, out_dir):
    """DeepSpeed InferenceEngine with tp = world over the whole model: logits of the forward."""
    from megatron_stag.serving.deepspeed import init_comm, init_deepspeed_engine, section_groups
    from megatron_stag.serving.model import load_plain_model

    init_comm()
    model = load_plain_model(package)
    group = section_groups(1, world) if world > 1 else None
    engine = init_deepspeed_engine(model, tp=world, group=group)
    shards = {n: tuple(p.shape) for n, p in engine.module.named_parameters() if "layers.0.self_attn.q_proj" in n}
    with torch.no_grad():
        logits = engine.module(torch.load(ids_path))
    torch.save({"logits": logits, "shards": shards}, os.path.join(out_dir, f"rank{rank}.pt"))
    _finish()


def staggered_decode(rank, world, package, tp, prompts, params_kw, out_dir):
    """One section per TP group under DeepSpeed: tokens and (sampling rank) step logits."""
    import deepspeed.comm as dist

    from megatron_stag.serving.deepspeed import init_comm, init_deepspeed_engine, section_groups
    from megatron_stag.serving.engine import StaggeredGenerator, SectionPlacement
    from megatron_stag.serving.model import load_plain_model
    from megatron_stag.serving.sampling import SamplingParams

    init_comm()
    model = load_plain_model(package)
    place = SectionPlacement(model.cfg.sections, tp, dist.get_rank())
    place.check(world)
    model.keep_sections([place.section])
    group = section_groups(model.cfg.sections, tp) if tp > 1 else None
    engine = init_deepspeed_engine(model, tp=tp, group=group)
    gen = StaggeredGenerator(engine.module, max_len=model.cfg.max_sequence_length, batch=len(prompts),
                                  placement=place, comm=dist)
    result = gen.generate(prompts, SamplingParams(**params_kw), keep_logits=True)
    torch.save({"tokens": result.tokens, "step_logits": result.step_logits,
                "projects_next_entries": engine.module.next_entries is not None},
               os.path.join(out_dir, f"rank{rank}.pt"))
    _finish()


def _finish():
    """Leave together: a rank exiting while a peer still holds gloo connections can abort the peer."""
    import deepspeed.comm as dist

    dist.barrier()
    torch.distributed.destroy_process_group()
