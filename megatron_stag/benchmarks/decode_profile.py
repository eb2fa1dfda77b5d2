"""Where a decode step's GPU time goes: kernels per step and the top kernels by GPU time.

    python -m megatron_stag.benchmarks.decode_profile --models gpt,stag --batch 1

The engine's compiled step (as `generate` runs it) without the CUDA graph, so torch.profiler
attributes every kernel; the same 24-layer, hidden-2048 models as `decode_engine`.
"""

from __future__ import annotations

import argparse
from dataclasses import replace

import torch
from torch.profiler import ProfilerActivity, profile

from megatron_stag.benchmarks.decode_engine import serving_model
from megatron_stag.models.model_args import ModelArgs


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="gpt,stag", help="gpt, stag, shared")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--top", type=int, default=15)
    ns = ap.parse_args(argv)
    from megatron_stag.serving.engine import StaggeredGenerator

    base = ModelArgs(vocab_size=32768, max_sequence_length=ns.prompt + 64, num_layers=24, hidden_size=2048,
                     num_attention_heads=16, position_embedding_type="rope")
    variants = {"gpt": base, "stag": replace(base, stag_sections=2),
                "shared": replace(base, num_layers=12, stag_sections=2, stag_shared_weights=True)}
    for name in ns.models.split(","):
        plain = serving_model(variants[name])
        gen = StaggeredGenerator(plain, ns.prompt + 64, ns.batch, cuda_graph=False)
        prompts = torch.randint(0, base.vocab_size, (ns.batch, ns.prompt)).tolist()
        with torch.no_grad():
            tokens = torch.stack([gen.prefill(r, p) for r, p in enumerate(prompts)]).argmax(-1)
        pos = torch.full((ns.batch,), ns.prompt, device="cuda")
        for _ in range(3):  # compile and warm up
            gen.step(tokens, pos)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(ns.steps):
                gen.step(tokens, pos)
            torch.cuda.synchronize()
        events = [e for e in prof.key_averages() if e.device_type.name == "CUDA"]
        total = sum(e.self_device_time_total for e in events) / ns.steps
        kernels = sum(e.count for e in events) / ns.steps
        print(f"\n== {name}, batch {ns.batch}: {kernels:.0f} kernels per step, {total / 1e3:.3f} ms GPU time per step")
        for e in sorted(events, key=lambda e: -e.self_device_time_total)[:ns.top]:
            print(f"{e.self_device_time_total / ns.steps / 1e3:8.3f} ms {e.count / ns.steps:6.1f}x  {e.key[:110]}")
        del gen, plain
        torch.compiler.reset()
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
