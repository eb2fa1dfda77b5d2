"""Training throughput and MFU: StagFormer p=2 (separate, shared) against the same-depth megatron
GPT baseline, in one process on one GPU (bf16, seq 2048); plus SDPA vs megatron's local attention.

    python -m megatron_stag.benchmarks.train_throughput --out results/train_throughput_h100.json

Each model is built from the same ModelArgs, trained for a few AdamW steps on random tokens and
timed with CUDA events (median step). FLOPs are counted analytically (forward = 2 x MACs, training =
3 x forward), including the cross-attention's projections and scores.
"""

from __future__ import annotations

import argparse
import functools
import gc
from dataclasses import replace

import torch

from megatron_stag.benchmarks.hardware import peak_tflops, run, write_result
from megatron_stag.models.model_args import ModelArgs


def step_flops(a: ModelArgs, batch: int, seq: int) -> float:
    """Training FLOPs of one step (3 x forward), attention scores counted over the full s x s.

    AltUp's predict/correct (O(K^2 d) per token) are not counted: they are the overhead measured."""
    d, s, v = a.hidden_size, seq, a.vocab_size
    ffn = a.ffn_hidden_size or 4 * d
    groups = a.num_query_groups or a.num_attention_heads
    kv = 2 * d * d * groups // a.num_attention_heads
    if a.num_moe_experts:  # routed experts: top-k of them per token, plus the router
        mlp = a.moe_router_topk * 2 * d * (a.moe_ffn_hidden_size or ffn) + d * a.num_moe_experts
    else:
        mlp = 2 * d * ffn
    layer = d * d + kv + d * d + mlp + 2 * s * d  # q, kv, out, MLP, scores + AV (MACs/token)
    layer /= a.altup_sequence_stride  # Sequence-AltUp: the layer runs on every k-th token
    cross = 4 * d * d + 2 * s * d
    passes = a.stag_sections
    per_section = a.num_layers // passes
    if a.stag_sections == 1:
        macs = a.num_layers * layer
    else:
        macs = a.num_layers * layer + (passes - 1) * per_section * cross
    macs += d * v  # logits
    return 3 * 2 * macs * batch * s


def kernel_ms_per_step(step, steps: int) -> float:
    """GPU kernel time of one step (sum over its kernels, torch.profiler): unlike the step's wall time,
    it does not move with other work on the machine, so small overheads compare reliably."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
    return sum(e.self_device_time_total for e in prof.key_averages()) / steps / 1e3


def _train_step(model, opt, tokens, pos, labels) -> None:
    loss = model(tokens, pos, None, labels=labels).float().mean()
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def measure(a: ModelArgs, batch: int, seq: int, steps: int, warmup: int, profile_steps: int = 0,
            **config_overrides) -> dict:
    """Median step time of `steps` timed steps after `warmup` (and MFU); with `profile_steps`, also the
    kernel time of a step (profiled after the timed steps; steps = 0 profiles only)."""
    model = a.build(a.config(dtype=torch.bfloat16, **config_overrides)).cuda().train()
    params = list(model.parameters())
    opt = torch.optim.AdamW(params, lr=1e-4, fused=True)
    ids = torch.randint(0, a.vocab_size, (batch, seq + 1), device="cuda")
    tokens, labels = ids[:, :-1], ids[:, 1:]
    pos = torch.arange(seq, device="cuda")[None].expand(batch, -1)
    step = functools.partial(_train_step, model, opt, tokens, pos, labels)
    times = []
    for i in range(warmup + steps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step()
        end.record()
        end.synchronize()
        if i >= warmup:
            times.append(start.elapsed_time(end) / 1e3)
    out = dict(params=sum(p.numel() for p in params), peak_mem_gb=torch.cuda.max_memory_allocated() / 1e9)
    if times:
        t = sorted(times)[len(times) // 2]
        flops = step_flops(a, batch, seq)
        out.update(step_s=t, tokens_per_s=batch * seq / t, tflops=flops / t / 1e12,
                   mfu=flops / t / 1e12 / peak_tflops())
    if profile_steps:
        out["kernel_ms"] = kernel_ms_per_step(step, profile_steps)
    del model, opt, params, step
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--hidden", type=int, default=1536)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--vocab", type=int, default=32768)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--out", default="results/train_throughput.json")
    ns = parser.parse_args(argv)

    from megatron_stag.platform.distributed import initialize

    initialize(tp=1, pp=1)
    base = ModelArgs(vocab_size=ns.vocab, max_sequence_length=ns.seq, num_layers=ns.layers,
                     hidden_size=ns.hidden, num_attention_heads=ns.heads,
                     position_embedding_type="rope")
    runs = {
        "baseline GPT (SDPA)": base,
        "StagFormer p=2 separate": replace(base, stag_sections=2),
        "StagFormer p=2 shared": replace(base, stag_sections=2, stag_shared_weights=True),
        "baseline GPT (megatron local attention)": replace(base, core_attention="local"),
    }
    rows = {name: measure(a, ns.batch, ns.seq, ns.steps, ns.warmup) for name, a in runs.items()}
    ref = rows["baseline GPT (SDPA)"]
    for name, r in rows.items():
        r["mfu_vs_baseline"] = r["mfu"] / ref["mfu"]
        r["step_time_vs_baseline"] = r["step_s"] / ref["step_s"]
    sdpa_speedup = rows["baseline GPT (megatron local attention)"]["step_s"] / ref["step_s"]
    print(f"{'model':42s} {'params':>8s} {'step ms':>8s} {'tok/s':>9s} {'MFU':>6s} {'MFU/base':>8s}")
    for name, r in rows.items():
        print(f"{name:42s} {r['params'] / 1e6:7.0f}M {r['step_s'] * 1e3:8.1f} {r['tokens_per_s']:9.0f}"
              f" {r['mfu']:6.3f} {r['mfu_vs_baseline']:8.3f}")
    print(f"SDPA core attention speedup over megatron local attention (step time): {sdpa_speedup:.2f}x")
    write_result(ns.out, dict(settings=vars(ns), peak_tflops=peak_tflops(), runs=rows,
                              sdpa_speedup_vs_local_attention=sdpa_speedup))


if __name__ == "__main__":
    run(main)
