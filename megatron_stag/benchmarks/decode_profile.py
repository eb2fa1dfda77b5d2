"""Where `generate`'s decode step spends its time: each kernel's share of the graphed step's span.

    python -m megatron_stag.benchmarks.decode_profile --models gpt,stag --batches 1,8 \
        --out results/decode_step_profile_h200.json
    # the Llama 3.2 1B shape at b=32: cuDNN's attention (default), then every step on the grouped kernel
    python -m megatron_stag.benchmarks.decode_profile --models llama --batches 32
    python -m megatron_stag.benchmarks.decode_profile --models llama --batches 32 --deterministic

The step is the one `generate` replays (compiled sections, one CUDA graph per token step, sampling
inside, the engine's kernels), on `decode_engine`'s models (24 layers of hidden 2048; llama its 16), under
torch.profiler. With programmatic dependent launch a kernel starts while its predecessor drains and
then waits inside, so its own duration overstates what it costs. Each kernel is charged instead with
how far it moves the step's end: its end minus the latest end of the kernels before it
(`critical_path`). On one stream the charges add up to the step's span; with sections on parallel
streams a kernel hidden under another stream's is charged nothing.
"""

from __future__ import annotations

import argparse
import functools
import json
import tempfile
from collections import defaultdict
from pathlib import Path

import torch

from megatron_stag.benchmarks.decode_engine import _free, models, serving_model
from megatron_stag.benchmarks.hardware import run, write_result
from megatron_stag.models.model_args import ModelArgs

KINDS = (  # (substring of the kernel's name, kind), first match wins
    ("_gemv_", "GEMV (fused one-row matmul)"),  # _gemv_kernel and _gemv_stream_kernel
    ("_skinny_kernel", "GEMM (2-64-row split-K matmul)"),
    ("_head_kernel", "attention kernel"), ("_group_kernel", "attention kernel"),
    ("_combine_kernel", "attention kernel: combine"),
    ("splitKreduce", "cuBLAS matmul: split-K reduction"),
    ("fmha", "SDPA"), ("cudnn", "SDPA"), ("flash", "SDPA"),
    ("gemm", "cuBLAS matmul"), ("gemv", "cuBLAS matmul"), ("sm90_", "cuBLAS matmul"), ("cutlass", "cuBLAS matmul"),
    ("triton_", "compiled (inductor) kernels"),
)


def kind(name: str) -> str:
    low = name.lower()
    return next((k for sub, k in KINDS if sub.lower() in low), "other (eager torch kernels)")


def critical_path(kernels: list[dict]) -> list[tuple[str, float, float]]:
    """(name, duration, charge) per kernel of one step, in start order; kernels are trace events with
    'name', 'ts' and 'dur' (µs). A kernel's charge is its end minus the latest end before it (zero when
    it ends under an earlier kernel), so the charges add up to the span from the first start to the
    last end."""
    kernels = sorted(kernels, key=lambda e: e["ts"])
    if not kernels:
        return []
    out, latest = [], kernels[0]["ts"]
    for e in kernels:
        end = e["ts"] + e["dur"]
        out.append((e["name"], e["dur"], max(0.0, end - latest)))
        latest = max(latest, end)
    return out


def attribute(events: list[dict], steps: int) -> dict:
    """Per-kind charges (µs per step, kernels per step) over `steps` identical graph replays' kernels;
    the first replay is left out (its start may overlap the profiler's own start-up)."""
    kernels = sorted((e for e in events if e.get("cat") == "kernel"), key=lambda e: e["ts"])
    per = len(kernels) // steps
    if per == 0 or per * steps != len(kernels):
        raise RuntimeError(f"{len(kernels)} kernels over {steps} replays: the replays are not identical")
    charged, count, spans = defaultdict(float), defaultdict(int), []
    for s in range(1, steps):
        path = critical_path(kernels[s * per:(s + 1) * per])
        spans.append(sum(c for _, _, c in path))
        for name, _, charge in path:
            charged[kind(name)] += charge / (steps - 1)
            count[kind(name)] += 1
    first = critical_path(kernels[per:2 * per])
    return dict(kernels_per_step=per, span_us=sorted(spans)[len(spans) // 2],
                kinds={k: dict(us=round(charged[k], 2), kernels=count[k] // (steps - 1))
                       for k in sorted(charged, key=lambda k: -charged[k])},
                sequence=[[name[:80], round(dur, 2), round(charge, 2)] for name, dur, charge in first])


# decode_engine's one-GPU rows that --models names
PROFILED = {"gpt": "GPT baseline", "stag": "StagFormer p=2 separate", "shared": "StagFormer p=2 shared (",
            "llama": "Llama 3.2 1B shape"}


def profiled(base: ModelArgs) -> dict:
    """{--models name: ModelArgs}, the models of decode_engine's table of the same names."""
    rows = {name: a for name, a, recurrent in models(base, 1) if not recurrent}
    return {short: next(a for name, a in rows.items() if name.startswith(prefix)) for short, prefix in PROFILED.items()}


def profile_step(plain, batch: int, prompt: int, steps: int, deterministic: bool = False) -> dict:
    """`attribute` over `steps` replays of the engine's graphed token step at position `prompt`
    (`deterministic`: the engine's, as `generate --deterministic`)."""
    from torch.profiler import ProfilerActivity, profile

    from megatron_stag.serving.engine import StaggeredGenerator
    from megatron_stag.serving.sampling import SamplingParams

    gen = StaggeredGenerator(plain, prompt + 64, batch, deterministic=deterministic)
    prompts = torch.randint(0, plain.cfg.vocab_size, (batch, prompt), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        tokens = gen.prefill(prompts.tolist()).argmax(-1)
    positions = torch.full((batch,), prompt, device="cuda")
    step = functools.partial(gen.step, params=SamplingParams(max_new_tokens=64), filled=prompt + 1)
    for _ in range(3):  # compile, capture, warm up (every replay rewrites the same cache slots)
        step(tokens, positions)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            step(tokens, positions)
        torch.cuda.synchronize()
    with tempfile.TemporaryDirectory() as tmp:
        trace = Path(tmp) / "trace.json"
        prof.export_chrome_trace(str(trace))
        events = json.loads(trace.read_text())["traceEvents"]
    return attribute(events, steps)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="gpt,stag", help="comma-separated: gpt, stag, shared, llama (Llama "
                    "3.2 1B's shape, grouped-query attention)")
    ap.add_argument("--batches", default="1")
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--steps", type=int, default=6, help="graph replays profiled")
    ap.add_argument("--top", type=int, default=12, help="kinds printed per step")
    ap.add_argument("--deterministic", action="store_true", help="profile `generate --deterministic`'s step "
                    "(every attention on the engine's kernel, whatever the batch)")
    ap.add_argument("--out", default=None, help="JSON of every profiled step (kinds and one step's kernels)")
    ns = ap.parse_args(argv)
    if ns.steps < 2:
        ap.error("--steps: at least 2 (the first replay is left out)")
    base = ModelArgs(vocab_size=32768, max_sequence_length=ns.prompt + 64, num_layers=24, hidden_size=2048,
                     num_attention_heads=16, position_embedding_type="rope")
    variants = profiled(base)
    unknown = [m for m in ns.models.split(",") if m not in variants]
    if unknown:
        ap.error(f"--models: unknown {unknown}; choose from {sorted(variants)}")
    rows = []
    for name in ns.models.split(","):
        plain = serving_model(variants[name])
        for batch in (int(b) for b in ns.batches.split(",")):
            r = dict(model=name, batch=batch, deterministic=ns.deterministic,
                     **profile_step(plain, batch, ns.prompt, ns.steps, ns.deterministic))
            rows.append(r)
            print(f"\n== {name}, batch {batch}: {r['kernels_per_step']} kernels, span {r['span_us']:.1f} µs per step")
            for k, v in list(r["kinds"].items())[:ns.top]:
                print(f"{v['us']:9.1f} µs {v['kernels']:5d}x  {k}")
            torch.compiler.reset()
            _free()
        del plain
        _free()
    if ns.out:
        write_result(ns.out, dict(config=vars(ns), rows=rows))


if __name__ == "__main__":
    run(main)
