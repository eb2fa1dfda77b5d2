"""Per-token decode latency: StagFormer against the same-depth megatron GPT, same engine, same job.

    # one GPU: baseline, StagFormer separate / window 1 / shared (batched passes) / recurrent
    python -m megatron_stag.benchmarks.decode_latency --out results/decode_1gpu.json
    # two GPUs: baseline TP=2, baseline PP=2 (stages in sequence), StagFormer one section per GPU
    torchrun --nproc_per_node 2 -m megatron_stag.benchmarks.decode_latency --out results/decode_2gpu.json

Each row: prompt of `--prompt` random tokens, `--new` greedy tokens, batch 1/8/32; the decode loop
runs CUDA-graph steps with no host synchronisation and is timed end to end with CUDA events.
The weight-read floor is the weight bytes on the critical path of one step divided by the copy
bandwidth measured in the same run.
"""

from __future__ import annotations

import argparse
import gc
import os
from dataclasses import replace

import torch
import torch.distributed as dist

from megatron_stag.benchmarks.hardware import capture_cuda_graph, copy_bandwidth_gbs, write_result
from megatron_stag.models.model_args import ModelArgs


def _timed(loop, steps: int) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    if dist.is_initialized():
        dist.barrier()
    start.record()
    loop()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1e3 / steps


def _weight_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def _prompts(batch: int, length: int, vocab: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, vocab, (batch, length), generator=g).tolist()


def _free():
    gc.collect()
    torch.cuda.empty_cache()


def bench_single(a: ModelArgs, batch: int, ns, recurrent: bool = False, tp: int = 1,
                 concurrent: bool = True, **config_overrides) -> dict:
    from megatron_stag.inference.staggered_generation import StaggeredGenerator

    model = a.build(a.config(tp=tp, dtype=torch.bfloat16, **config_overrides)).cuda().eval()
    prompts = _prompts(batch, ns.prompt, a.vocab_size)
    gen = StaggeredGenerator(model, ns.prompt + ns.new, batch, recurrent=recurrent, cuda_graph=True,
                             compile=ns.compile, concurrent_sections=concurrent)
    with torch.no_grad():
        tokens = torch.stack([gen.prefill(r, p)[-1] for r, p in enumerate(prompts)]).argmax(-1)
    positions = torch.full((batch,), ns.prompt, device="cuda")
    gen.step(tokens, positions)  # capture (its warm-ups rewrite the same slots)

    def loop():
        t, pos = tokens, positions
        for _ in range(ns.new - 1):
            t = gen.step(t, pos).argmax(-1)
            pos = pos + 1

    per_token = _timed(loop, ns.new - 1)
    out = dict(per_token_ms=per_token * 1e3, tokens_per_s=batch / per_token,
               weight_bytes=_weight_bytes(model))
    return out


def bench_staggered_ranks(a: ModelArgs, batch: int, ns) -> dict:
    """StagFormer with section k on rank k (PP = p)."""
    from megatron.core import parallel_state as ps

    from megatron_stag.inference.distributed_generation import DistributedStaggeredGenerator

    model = a.build(a.config(pp=a.stag_sections, dtype=torch.bfloat16), pre_process=True,
                    post_process=ps.is_pipeline_last_stage()).cuda().eval()
    gen = DistributedStaggeredGenerator(model, ns.prompt + ns.new, batch)
    tokens = gen.prefill_greedy(_prompts(batch, ns.prompt, a.vocab_size))
    positions = torch.full((batch,), ns.prompt, device="cuda")
    gen.greedy_step(tokens, positions)  # capture

    def loop():
        t, pos = tokens, positions
        for _ in range(ns.new - 1):
            t = gen.greedy_step(t, pos)
            pos = pos + 1

    per_token = _timed(loop, ns.new - 1)
    # bytes this rank reads per step: its parameters, minus its own cross K/V projections (the
    # previous rank applies them), plus the next section's (applied here)
    read = _weight_bytes(model)
    if gen.decoder.section > 0:
        read -= sum(t.numel() * t.element_size() for t in (gen.decoder.kv_weight, gen.decoder.kv_bias)
                    if t is not None)
    if gen.next_kv is not None:
        read += sum(t.numel() * t.element_size() for t in gen.next_kv if t is not None)
    out = dict(per_token_ms=per_token * 1e3, tokens_per_s=batch / per_token,
               weight_bytes=_max_over_ranks(read))
    return out


def bench_pipeline_sequential(a: ModelArgs, batch: int, ns) -> dict:
    """Baseline PP=2 as megatron's engines run it: stage 1 waits for stage 0 on every token."""
    from megatron.core import parallel_state as ps

    from megatron_stag.inference.section_decoder import SectionDecoder
    from megatron_stag.inference.staggered_generation import output_logits, rotary_table

    pp = ps.get_pipeline_model_parallel_world_size()
    first, last = ps.is_pipeline_first_stage(), ps.is_pipeline_last_stage()
    model = a.build(a.config(pp=pp, dtype=torch.bfloat16), pre_process=first,
                    post_process=last).cuda().eval()
    max_len = ns.prompt + ns.new
    dec = SectionDecoder(model.blocks[0], 0, model.config, batch, max_len,
                         rotary_table(model, max_len), torch.bfloat16, torch.device("cuda"))
    group, ranks = ps.get_pipeline_model_parallel_group(), dist.get_process_group_ranks(
        ps.get_pipeline_model_parallel_group())
    me, d = ps.get_pipeline_model_parallel_rank(), a.hidden_size
    rows = torch.arange(batch, device="cuda")
    tok = torch.zeros(batch, dtype=torch.long, device="cuda")
    pos = torch.full((batch,), ns.prompt, device="cuda")
    h_in = torch.zeros((1, batch, d), dtype=torch.bfloat16, device="cuda")

    def compute():
        x = (model.embedding(input_ids=tok[:, None], position_ids=pos[:, None]) if first else h_in)
        h = dec.forward(x, pos[:, None], rows)
        return h, (output_logits(model, h)[0].argmax(-1) if last else tok)

    with torch.no_grad():  # prefill with random context: only the decode steps are timed
        for r, p in enumerate(_prompts(batch, ns.prompt, a.vocab_size)):
            ids = torch.tensor([p], device="cuda")
            positions = torch.arange(ns.prompt, device="cuda")[None]
            x = model.embedding(input_ids=ids, position_ids=positions) if first else torch.randn(
                (ns.prompt, 1, d), dtype=torch.bfloat16, device="cuda")
            dec.forward(x, positions, torch.tensor([r], device="cuda"))
        graph, (h_out, nxt) = capture_cuda_graph(compute)

    def loop():
        with torch.no_grad():
            for _ in range(ns.new - 1):
                if not first:
                    dist.recv(h_in, ranks[me - 1], group=group)
                graph.replay()
                if not last:
                    dist.send(h_out, ranks[me + 1], group=group)
                new = nxt.clone()
                dist.broadcast(new, ranks[-1], group=group)
                tok.copy_(new)
                pos.add_(1)

    per_token = _timed(loop, ns.new - 1)
    out = dict(per_token_ms=per_token * 1e3, tokens_per_s=batch / per_token,
               weight_bytes=_sum_over_ranks(_weight_bytes(model)))
    return out


def _max_over_ranks(x: int) -> int:
    t = torch.tensor([x], device="cuda")
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


def _sum_over_ranks(x: int) -> int:
    t = torch.tensor([x], device="cuda")
    dist.all_reduce(t)
    return int(t.item())


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--vocab", type=int, default=32768)
    parser.add_argument("--prompt", type=int, default=512)
    parser.add_argument("--new", type=int, default=512)
    parser.add_argument("--batches", default="1,8,32")
    parser.add_argument("--compile", action="store_true", help="torch.compile the decode step")
    parser.add_argument("--out", default="results/decode_latency.json")
    ns = parser.parse_args(argv)

    from megatron_stag.platform.distributed import initialize

    world = int(os.environ.get("WORLD_SIZE", "1"))
    base = ModelArgs(vocab_size=ns.vocab, max_sequence_length=ns.prompt + ns.new,
                     num_layers=ns.layers, hidden_size=ns.hidden, num_attention_heads=ns.heads,
                     position_embedding_type="rope")
    stag = replace(base, stag_sections=2)
    batches = [int(b) for b in ns.batches.split(",")]
    rows = []
    if world == 1:
        initialize(tp=1, pp=1)
        bw = copy_bandwidth_gbs()
        cases = [("baseline GPT", base, False), ("StagFormer p=2 separate", stag, False),
                 ("StagFormer p=2 separate, sections in sequence", stag, None),
                 ("StagFormer p=2 separate, window 1", replace(stag, stag_cross_window=1), False),
                 ("StagFormer p=2 shared (batched passes)", replace(stag, stag_shared_weights=True), False),
                 ("StagFormer p=2 shared, recurrent", replace(stag, stag_shared_weights=True), True)]
        for b in batches:
            for name, a, rec in cases:
                rows.append(dict(model=name, gpus=1, batch=b, **bench_single(
                    a, b, ns, bool(rec), concurrent=rec is not None)))
                _free()  # the model and its caches went out of scope with the call
                print(f"{name} batch {b}: {rows[-1]['per_token_ms']:.3f} ms/token", flush=True)
    else:
        cases = [("baseline GPT PP=2 (stages in sequence)", dict(tp=1, pp=2),
                  lambda b: bench_pipeline_sequential(base, b, ns)),
                 ("StagFormer p=2, one section per GPU", dict(tp=1, pp=2),
                  lambda b: bench_staggered_ranks(stag, b, ns)),
                 ("StagFormer p=2 window 1, one section per GPU", dict(tp=1, pp=2),
                  lambda b: bench_staggered_ranks(replace(stag, stag_cross_window=1), b, ns)),
                 ("baseline GPT TP=2", dict(tp=2, pp=1), lambda b: bench_single(base, b, ns, tp=2))]
        bw = None
        for name, layout, fn in cases:
            initialize(**layout)
            bw = bw or copy_bandwidth_gbs()
            for b in batches:
                r = fn(b)
                _free()
                if name.endswith("TP=2"):
                    r["weight_bytes"] = _max_over_ranks(r["weight_bytes"])
                rows.append(dict(model=name, gpus=world, batch=b, **r))
                if dist.get_rank() == 0:
                    print(f"{name} batch {b}: {r['per_token_ms']:.3f} ms/token", flush=True)
            report(rows, bw, ns)  # keep what is measured even if a later case fails
    report(rows, bw, ns)


def report(rows: list[dict], bw: float, ns) -> None:
    for r in rows:
        r["floor_ms"] = r["weight_bytes"] / (bw * 1e9) * 1e3
        r["vs_floor"] = r["per_token_ms"] / r["floor_ms"]
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(f"copy bandwidth {bw:.0f} GB/s")
        print(f"{'model':48s} {'batch':>5s} {'ms/token':>9s} {'tok/s':>9s} {'floor ms':>9s} {'x floor':>7s}")
        for r in rows:
            print(f"{r['model']:48s} {r['batch']:5d} {r['per_token_ms']:9.3f} {r['tokens_per_s']:9.0f}"
                  f" {r['floor_ms']:9.3f} {r['vs_floor']:7.2f}")
        write_result(ns.out, dict(settings=vars(ns), copy_bandwidth_gbs=bw, rows=rows))


if __name__ == "__main__":
    main()
