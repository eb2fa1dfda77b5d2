"""How close do decode-step matmuls get to the copy bandwidth? Weight bytes per second by shape.

    python -m megatron_stag.benchmarks.matmul_bandwidth --out results/matmul_bandwidth_h100.json

A decode step at batch 1 reads every weight once, so its floor is weight bytes / copy bandwidth.
This measures, for the ~1B decode benchmark's matrices (hidden 2048, MLP 8192, vocabulary 32k), the
bandwidth one F.linear reaches at batch 1 and 32 when its weight streams from HBM (enough copies to
defeat the L2 cache, replayed as one CUDA graph so launches do not count), in three forms:
- the weight [out, in] as nn.Linear stores it;
- the same values stored [in, out] (passed as a transposed view: cuBLAS's other GEMV variant);
- two such matrices as one batched matmul (what running two sections' layers in lock step could use);
- half the matrices on each of two CUDA streams (graph branches: how one GPU runs two sections now).
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from megatron_stag.benchmarks.hardware import capture_cuda_graph, copy_bandwidth_gbs, run, write_result
from megatron_stag.serving.engine import distinct_streams

# name -> (out, in): the ~1B model's matrices (24 layers, hidden 2048, p = 2 sections of 12)
SHAPES = {
    "attention out / cross q / cross out": (2048, 2048),
    "q, k, v fused": (6144, 2048),
    "MLP up": (8192, 2048),
    "MLP down": (2048, 8192),
    "cross k, v of 12 layers fused": (49152, 2048),
    "output head": (32768, 2048),
}


def graphed_seconds(fn, replays: int, stream=None) -> float:
    """Median time of one replay of `fn` captured as a CUDA graph (on `stream`: `capture_cuda_graph`)."""
    graph, _ = capture_cuda_graph(fn, stream)
    times = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    times.sort()
    return times[len(times) // 2]


def measure_shape(out_f: int, in_f: int, batch: int, stream_bytes: float, replays: int) -> dict:
    copies = max(4, int(stream_bytes // (out_f * in_f * 2)) // 2 * 2)
    weights = [torch.randn(out_f, in_f, device="cuda", dtype=torch.bfloat16) for _ in range(copies)]
    transposed = [w.t().contiguous().t() for w in weights]
    pairs = [torch.stack(weights[i:i + 2]) for i in range(0, copies, 2)]  # [2, out, in]
    x = torch.randn(batch, in_f, device="cuda", dtype=torch.bfloat16)
    x2 = torch.randn(2, batch, in_f, device="cuda", dtype=torch.bfloat16)
    total = copies * out_f * in_f * 2
    *streams, capture = distinct_streams(3)  # two streams' matmuls, none of them on the capture stream

    def two_streams():
        main = torch.cuda.current_stream()
        for i, stream in enumerate(streams):
            stream.wait_stream(main)
            with torch.cuda.stream(stream):
                for w in weights[i::2]:
                    F.linear(x, w)
        for stream in streams:
            main.wait_stream(stream)

    forms = {
        "[out, in]": lambda: [F.linear(x, w) for w in weights],
        "[in, out]": lambda: [F.linear(x, w) for w in transposed],
        "pairs as one bmm": lambda: [torch.bmm(x2, w.transpose(1, 2)) for w in pairs],
        "two streams": two_streams,
    }
    row = {name: total / graphed_seconds(fn, replays, capture) / 1e9 for name, fn in forms.items()}
    row["matrix MB"] = out_f * in_f * 2 / 1e6
    return row


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", default="1,32")
    parser.add_argument("--stream-mb", type=float, default=600.0, help="weight bytes per replay (>> L2)")
    parser.add_argument("--replays", type=int, default=20)
    parser.add_argument("--out", default="results/matmul_bandwidth.json")
    ns = parser.parse_args(argv)
    torch.backends.cuda.matmul.allow_tf32 = False
    copy = copy_bandwidth_gbs()
    rows = {}
    print(f"copy bandwidth {copy:.0f} GB/s; matmul weight bandwidth in GB/s (x copy):")
    for b in (int(v) for v in ns.batches.split(",")):
        for name, (out_f, in_f) in SHAPES.items():
            row = measure_shape(out_f, in_f, b, ns.stream_mb * 1e6, ns.replays)
            rows[f"{name} {out_f}x{in_f}, batch {b}"] = row
            torch.cuda.empty_cache()  # this shape's weight copies are gone: free them for the next
            print(f"  batch {b:3d} {name:38s} {out_f:6d}x{in_f:<5d} " + "  ".join(
                f"{k} {row[k]:6.0f} ({row[k] / copy:.2f})" for k in ("[out, in]", "[in, out]", "pairs as one bmm", "two streams")))
    write_result(ns.out, dict(settings=vars(ns), copy_gbs=copy, rows=rows))


if __name__ == "__main__":
    run(main)
