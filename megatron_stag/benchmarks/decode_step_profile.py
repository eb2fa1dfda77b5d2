"""Where a decode step's time goes: kernels per step and the top kernels by GPU time.

    python -m megatron_stag.benchmarks.decode_step_profile --sections 2 --batch 1

Runs eager steps (no CUDA graph, so every kernel is attributed) of a 24-layer, hidden-2048 model
under torch.profiler and prints the table; decode steps are launch-bound when the kernel count times
a few microseconds approaches the step time.
"""

from __future__ import annotations

import argparse

import torch
from torch.profiler import ProfilerActivity, profile

from megatron_stag.models.model_args import ModelArgs


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sections", type=int, default=2)
    parser.add_argument("--window", type=int, default=None)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--steps", type=int, default=10)
    ns = parser.parse_args(argv)

    from megatron_stag.inference.staggered_generation import StaggeredGenerator
    from megatron_stag.platform.distributed import initialize

    initialize()
    a = ModelArgs(vocab_size=32768, max_sequence_length=1024, num_layers=24, hidden_size=2048,
                  num_attention_heads=16, position_embedding_type="rope", stag_sections=ns.sections,
                  stag_cross_window=ns.window)
    model = a.build(a.config(dtype=torch.bfloat16)).cuda().eval()
    gen = StaggeredGenerator(model, 1024, ns.batch)
    tokens = torch.zeros(ns.batch, dtype=torch.long, device="cuda")
    positions = torch.full((ns.batch,), 512, device="cuda")
    for _ in range(3):
        gen.step(tokens, positions)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(ns.steps):
            gen.step(tokens, positions)
        torch.cuda.synchronize()
    events = [e for e in prof.key_averages() if e.device_type.name == "CUDA"]
    kernels = sum(e.count for e in events) / ns.steps
    total = sum(e.self_device_time_total for e in events) / ns.steps / 1e3
    print(f"kernels per step: {kernels:.0f}; GPU busy per step: {total:.3f} ms")
    print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=25, max_name_column_width=70))


if __name__ == "__main__":
    main()
