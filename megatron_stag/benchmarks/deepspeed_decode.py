"""Decode latency: DeepSpeed's InferenceEngine on the exported model against our megatron engine.

    # one GPU: every section on the GPU (baseline GPT and StagFormer p=2)
    python -m megatron_stag.benchmarks.deepspeed_decode --out results/deepspeed_decode_h100.json
    # two GPUs: one section per GPU
    torchrun --nproc_per_node 2 -m megatron_stag.benchmarks.deepspeed_decode --out results/deepspeed_decode_2gpu.json

Same process, same model: a megatron StagFormerModel (bf16, random weights) is exported in memory
(`export.megatron_export.to_plain_model`) and wrapped by `deepspeed.init_inference`. Rows per batch:
our engine (CUDA-graph steps), the DeepSpeed engine as DeepSpeed runs it (eager steps), the
DeepSpeed engine with our CUDA-graph step, and with that step torch.compile'd first; beside them the
weight-read floor (this rank's weight bytes / copy bandwidth measured in the same run). Greedy steps are timed end to end with CUDA events.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import replace

import torch
import torch.distributed as dist

from megatron_stag.benchmarks.decode_latency import _free, _prompts, _timed
from megatron_stag.benchmarks.hardware import copy_bandwidth_gbs, write_result
from megatron_stag.models.model_args import ModelArgs


def _time_steps(step, tokens, positions, new: int) -> float:
    step(tokens, positions)  # warm-up / capture

    def loop():
        t, pos = tokens, positions
        for _ in range(new - 1):
            t = step(t, pos)
            pos = pos + 1

    return _timed(loop, new - 1)


def bench_ours(model, a: ModelArgs, batch: int, ns, distributed: bool) -> float:
    from megatron_stag.inference.distributed_generation import DistributedStaggeredGenerator
    from megatron_stag.inference.staggered_generation import StaggeredGenerator

    prompts = _prompts(batch, ns.prompt, a.vocab_size)
    positions = torch.full((batch,), ns.prompt, device="cuda")
    if distributed:
        gen = DistributedStaggeredGenerator(model, ns.prompt + ns.new, batch)
        tokens = gen.prefill_greedy(prompts)
        return _time_steps(gen.greedy_step, tokens, positions, ns.new)
    gen = StaggeredGenerator(model, ns.prompt + ns.new, batch, cuda_graph=True)
    with torch.no_grad():
        tokens = torch.stack([gen.prefill(r, p)[-1] for r, p in enumerate(prompts)]).argmax(-1)
    return _time_steps(lambda t, p: gen.step(t, p).argmax(-1), tokens, positions, ns.new)


def bench_deepspeed(plain, a: ModelArgs, batch: int, ns, cuda_graph: bool, placement,
                    compile: bool = False) -> float:
    import deepspeed.comm as ds_comm

    from megatron_stag.deepspeed_inference.staggered_decoding import PlainStaggeredGenerator

    gen = PlainStaggeredGenerator(plain, ns.prompt + ns.new, batch, placement=placement,
                                  comm=ds_comm if placement is not None else None, cuda_graph=cuda_graph,
                                  compile=compile)
    prompts = _prompts(batch, ns.prompt, a.vocab_size)
    with torch.no_grad():
        last = [gen.prefill(r, p) for r, p in enumerate(prompts)]
    sampler = placement is None or placement.rank == placement.sampler
    tokens = (torch.stack(last).argmax(-1) if sampler
              else torch.zeros(batch, dtype=torch.long, device="cuda"))
    tokens = gen._broadcast(tokens)

    def step(t, pos):
        logits = gen.step(t, pos)
        nxt = logits.argmax(-1) if logits is not None else torch.zeros_like(t)
        return gen._broadcast(nxt)

    positions = torch.full((batch,), ns.prompt, device="cuda")
    return _time_steps(step, tokens, positions, ns.new)


def weight_read_floor(model, bandwidth_gbs: float, placement=None) -> float:
    """Seconds to read the weights a decode step reads once (its lower bound at small batch), on the
    slowest rank: a rank whose entries come projected from the rank before (`EntryProjections`) does
    not read its own cross-attention k/v projections in a step."""
    skip = set()
    if placement is not None and placement.section > 0 and model.entries_made_upstream():
        skip = {p.data_ptr() for layer in model.sections[placement.section].layers
                for proj in (layer.cross_attn.k_proj, layer.cross_attn.v_proj) for p in proj.parameters()}
    seen, total = set(skip), 0
    for p in model.parameters():
        if p.data_ptr() not in seen:
            seen.add(p.data_ptr())
            total += p.numel() * p.element_size()
    if placement is not None:
        total_t = torch.tensor([total], device="cuda")
        dist.all_reduce(total_t, op=dist.ReduceOp.MAX)
        total = int(total_t.item())
    return total / (bandwidth_gbs * 1e9)


def run_model(a: ModelArgs, name: str, batches, ns, world: int) -> list[dict]:
    from megatron.core import parallel_state as ps

    from megatron_stag.deepspeed_inference.engine import init_deepspeed_engine
    from megatron_stag.deepspeed_inference.staggered_decoding import SectionPlacement
    from megatron_stag.export.megatron_export import to_plain_model
    from megatron_stag.platform.distributed import initialize

    distributed = world > 1
    rows = []
    bandwidth = copy_bandwidth_gbs()
    # the export needs the whole model (PP=1); with one section per GPU each rank keeps its own,
    # and our engine's PP=2 model is a second build (same shapes, its own random weights)
    initialize(tp=1, pp=1)
    model = a.build(a.config(dtype=torch.bfloat16)).cuda().eval()
    plain = to_plain_model(model, a, device="cuda")
    placement = None
    if distributed:
        placement = SectionPlacement(a.stag_sections, 1, dist.get_rank())
        plain.keep_sections([placement.section])
        del model
        _free()
        initialize(tp=1, pp=world)
        model = a.build(a.config(pp=world, dtype=torch.bfloat16), pre_process=True,
                        post_process=ps.is_pipeline_last_stage()).cuda().eval()
    engine = init_deepspeed_engine(plain, dtype=torch.bfloat16)
    for b in batches:
        ours = bench_ours(model, a, b, ns, distributed)
        _free()
        ds_eager = bench_deepspeed(engine.module, a, b, ns, False, placement)
        _free()
        ds_graph = bench_deepspeed(engine.module, a, b, ns, True, placement)
        _free()
        ds_compiled = bench_deepspeed(engine.module, a, b, ns, True, placement, compile=True)
        _free()
        floor = weight_read_floor(engine.module, bandwidth, placement)
        row = dict(model=name, layout=f"{world} GPU" + ("s, one section per GPU" if distributed else ""),
                   batch=b, ours_ms=ours * 1e3, deepspeed_eager_ms=ds_eager * 1e3,
                   deepspeed_graph_ms=ds_graph * 1e3, deepspeed_compiled_graph_ms=ds_compiled * 1e3,
                   floor_ms=floor * 1e3, deepspeed_eager_over_ours=ds_eager / ours,
                   deepspeed_graph_over_ours=ds_graph / ours, deepspeed_compiled_over_ours=ds_compiled / ours,
                   deepspeed_compiled_over_floor=ds_compiled / floor)
        rows.append(row)
        if not distributed or dist.get_rank() == world - 1:
            print(row, flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=24)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--vocab", type=int, default=32768)
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--batches", default="1,32")
    ap.add_argument("--models", default="gpt,stag", help="gpt and altup (1 GPU only) and/or stag")
    ap.add_argument("--out", required=True)
    ns = ap.parse_args()
    from megatron_stag.deepspeed_inference.engine import init_comm
    from megatron_stag.platform.distributed import initialize

    world = int(os.environ.get("WORLD_SIZE", "1"))
    initialize(tp=1, pp=1)
    if world > 1:
        init_comm()
    base = ModelArgs(vocab_size=ns.vocab, max_sequence_length=ns.prompt + ns.new, num_layers=ns.layers,
                     hidden_size=ns.hidden, num_attention_heads=ns.heads, position_embedding_type="rope")
    batches = [int(b) for b in ns.batches.split(",")]
    wanted = ns.models.split(",")
    models = [("StagFormer p=2", replace(base, stag_sections=2))] if "stag" in wanted else []
    if world == 1 and "altup" in wanted:
        models.insert(0, ("AltUp K=2 recycled", replace(base, altup_blocks=2)))
    if world == 1 and "gpt" in wanted:
        models.insert(0, ("GPT baseline", base))
    rows = [r for name, a in models for r in run_model(a, name, batches, ns, world)]
    if world == 1 or dist.get_rank() == world - 1:
        write_result(ns.out, dict(config=vars(ns), rows=rows,
                                  engines=dict(ours="megatron model, StaggeredGenerator / "
                                               "DistributedStaggeredGenerator, CUDA-graph steps",
                                               deepspeed_eager="deepspeed.init_inference(exported "
                                               "StagLM, bf16) + PlainStaggeredGenerator, eager steps",
                                               deepspeed_graph="the same engine, steps replayed as "
                                               "CUDA graphs by PlainStaggeredGenerator",
                                               deepspeed_compiled_graph="the same, the step "
                                               "torch.compile'd before capture")))


if __name__ == "__main__":
    main()
