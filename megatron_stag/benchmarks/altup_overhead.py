"""AltUp's cost: training step time / MFU and decode latency against the same baseline, same job.

    python -m megatron_stag.benchmarks.altup_overhead --out results/altup_overhead_h100.json

Training (bf16, seq 2048, AdamW, median of timed steps): baseline GPT; AltUp K=2 and K=4 recycled,
eager and with predict/correct fused (`altup_compile`: the Triton kernels of layers/altup_triton.py
for the standard form, torch.compile for Gemma 3n's); K=4 widened; Gemma 3n form K=4;
Sequence-AltUp stride 2; megatron MoE and AltUp K=2 + the same MoE. Decode (1 GPU, CUDA-graph steps,
batch 1): baseline against AltUp K=2 / K=4 through the staggered decoding engine, eager steps and
whole-step torch.compile (which fuses each correct with the next predict).
Training configurations are measured in `--rounds` interleaved rounds: a ratio is the median over
rounds of step time / the same round's baseline step time (run-to-run drift on a shared machine is a
few percent, the size of the targets). Then each configuration's GPU kernel time per step is profiled
(`--profile-steps`): a figure other work on the machine does not move.
Targets (issue 4): recycled K=2 step time <= 1.05x baseline, K=4 <= 1.10x; decode <= 1.05x.
"""

from __future__ import annotations

import argparse
import statistics
from dataclasses import replace

import torch

from megatron_stag.benchmarks.hardware import peak_tflops, run, write_result
from megatron_stag.benchmarks.train_throughput import measure
from megatron_stag.models.model_args import ModelArgs


def training_runs(base: ModelArgs, moe_experts: int) -> dict[str, tuple[ModelArgs, dict]]:
    k2 = replace(base, altup_blocks=2)
    k4 = replace(base, altup_blocks=4)
    moe = replace(base, num_moe_experts=moe_experts, moe_router_topk=2,
                  moe_ffn_hidden_size=base.hidden_size, add_bias_linear=False)
    return {
        "baseline GPT": (base, {}),
        "AltUp K=2 recycled": (k2, {}),
        "AltUp K=2 recycled, fused predict/correct": (k2, dict(altup_compile=True)),
        "AltUp K=4 recycled": (k4, {}),
        "AltUp K=4 recycled, fused predict/correct": (k4, dict(altup_compile=True)),
        "AltUp K=4 widened, fused": (replace(k4, altup_embedding="widened"), dict(altup_compile=True)),
        "AltUp Gemma 3n form K=4, compiled": (
            replace(k4, altup_form="gemma3n", altup_schedule="fixed", altup_embedding="projected",
                    altup_output="projected", altup_coef_clip=120.0), dict(altup_compile=True)),
        "Sequence-AltUp stride 2": (replace(base, altup_sequence_stride=2), {}),
        f"MoE {moe_experts} experts top-2": (moe, {}),
        f"AltUp K=2 + MoE {moe_experts} experts, fused": (replace(moe, altup_blocks=2),
                                                             dict(altup_compile=True)),
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--vocab", type=int, default=32768)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=3,
                        help="measure every training configuration this many times, interleaved; report medians")
    parser.add_argument("--profile-steps", type=int, default=3,
                        help="after the rounds, each configuration's GPU kernel time per step (torch.profiler, "
                             "this many steps; 0 = skip)")
    parser.add_argument("--moe-experts", type=int, default=8)
    parser.add_argument("--prompt", type=int, default=512)
    parser.add_argument("--new", type=int, default=256)
    parser.add_argument("--out", default="results/altup_overhead.json")
    ns = parser.parse_args(argv)

    from megatron_stag.benchmarks.decode_engine import _free, bench, serving_model
    from megatron_stag.platform.distributed import initialize

    initialize(tp=1, pp=1)
    base = ModelArgs(vocab_size=ns.vocab, max_sequence_length=ns.seq, num_layers=ns.layers,
                     hidden_size=ns.hidden, num_attention_heads=ns.heads, position_embedding_type="rope")
    runs = training_runs(base, ns.moe_experts)
    moe_name = f"MoE {ns.moe_experts} experts top-2"
    rounds = []  # every configuration once per round; ratios against the same round's baseline
    for r in range(ns.rounds):
        measured = {}
        for name, (a, overrides) in runs.items():
            measured[name] = measure(a, ns.batch, ns.seq, ns.steps, ns.warmup, **overrides)
            print(f"round {r + 1}/{ns.rounds} {name:48s} {measured[name]['step_s'] * 1e3:8.1f} ms", flush=True)
        rounds.append(measured)
    kernels = {}  # profiled apart from the timed rounds: a profiler session can slow what runs after it
    if ns.profile_steps:
        for name, (a, overrides) in runs.items():
            kernels[name] = measure(a, ns.batch, ns.seq, 0, ns.warmup, ns.profile_steps, **overrides)["kernel_ms"]
    train = {}
    for name in runs:
        per_round = [m[name] for m in rounds]
        against = [m[moe_name if "MoE" in name else "baseline GPT"] for m in rounds]
        r = dict(sorted(per_round, key=lambda m: m["step_s"])[len(per_round) // 2])  # the median round
        r["step_s_rounds"] = [m["step_s"] for m in per_round]
        r["step_time_vs_baseline"] = statistics.median(m["step_s"] / b["step_s"] for m, b in zip(per_round, against))
        r["step_time_vs_baseline_rounds"] = [m["step_s"] / b["step_s"] for m, b in zip(per_round, against)]
        r["mfu_vs_baseline"] = statistics.median(m["mfu"] / b["mfu"] for m, b in zip(per_round, against))
        if kernels:
            r["kernel_ms"] = kernels[name]
            r["kernel_time_vs_baseline"] = kernels[name] / kernels[moe_name if "MoE" in name else "baseline GPT"]
        train[name] = r

    decode = {}
    for name, a in {"baseline GPT": base, "AltUp K=2 recycled": replace(base, altup_blocks=2),
                    "AltUp K=4 recycled": replace(base, altup_blocks=4)}.items():
        plain = serving_model(a)  # the one engine's default step, as `generate` decodes
        decode[name] = dict(per_token_ms=bench(plain, 1, ns)["ms_per_token"])
        del plain
        torch.compiler.reset()
        _free()
    for name, r in decode.items():
        r["per_token_vs_baseline"] = r["per_token_ms"] / decode["baseline GPT"]["per_token_ms"]

    print(f"\n{'training (1 GPU, bf16, seq %d, batch %d)' % (ns.seq, ns.batch):56s} {'params':>7s} "
          f"{'step ms':>8s} {'x base':>7s} {'MFU':>6s} {'kernel ms':>9s} {'x base':>7s}")
    for name, r in train.items():
        kernels = f" {r['kernel_ms']:9.1f} {r['kernel_time_vs_baseline']:7.3f}" if "kernel_ms" in r else ""
        print(f"{name:56s} {r['params'] / 1e6:6.0f}M {r['step_s'] * 1e3:8.1f} "
              f"{r['step_time_vs_baseline']:7.3f} {r['mfu']:6.3f}{kernels}")
    print(f"\n{'decode (batch 1, CUDA graphs)':56s} {'ms/token':>8s} {'x base':>7s}")
    for name, r in decode.items():
        print(f"{name:56s} {r['per_token_ms']:8.3f} {r['per_token_vs_baseline']:7.3f}")
    write_result(ns.out, dict(settings=vars(ns), peak_tflops=peak_tflops(), training=train, decode=decode))


if __name__ == "__main__":
    run(main)
