"""Can a hand-written batch-1 GEMV stream a decode step's weights at the copy bandwidth?

    python -m megatron_stag.benchmarks.gemv_chain --out results/gemv_chain_h200.json
    python -m megatron_stag.benchmarks.gemv_chain --batches 1 --configs 8192:4,2048:1,4096:1,4096:2,8192:2,8192:8,4096:4 \
        --out results/gemv_chain_sweep_h200.json

cuBLAS's GEMVs take ~0.99 of a GPT step's 1.41 ms at batch 1 on an H200 (docs/decode-engine.md),
streaming the weights at ~0.6 of copy bandwidth; the small matrices (2048x2048, 8 MB) are mostly
ramp-up and tail. This measures the matmuls of a 24-layer, hidden-2048 model's step as a dependent
chain (qkv -> out -> MLP up -> MLP down, layer after layer, distinct weights: 2.4 GB, far beyond L2),
replayed as one CUDA graph, with:
- cuBLAS (`F.linear`);
- the engine's Triton GEMV (`serving/gemv.py`), which loads a whole [rows, K] weight tile per program at once (every byte of the
  matrix in flight in one wave), for several tile sizes;
- the same with programmatic dependent launch: each kernel issues its weight loads *before* waiting
  on the previous kernel (`griddepcontrol.wait`) and lets the next one launch at once, so one matrix's
  ramp-up overlaps the previous one's tail; and a variant that waits first (to see what the prefetch
  itself is worth).
Each figure sits beside the floor: weight bytes / copy bandwidth measured in the same run.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from megatron_stag.benchmarks.hardware import copy_bandwidth_gbs, run, write_result
from megatron_stag.benchmarks.matmul_bandwidth import graphed_seconds
from megatron_stag.serving.gemv import gemv


def _layers(n: int, hidden: int, ffn: int, device) -> list[tuple[torch.Tensor, ...]]:
    def w(o, i):
        return torch.randn(o, i, device=device, dtype=torch.bfloat16) / i ** 0.5
    return [(w(3 * hidden, hidden), w(hidden, hidden), w(ffn, hidden), w(hidden, ffn)) for _ in range(n)]


def _chain(layers, x, linear):
    hidden = x.shape[1]
    for wqkv, wo, wup, wdown in layers:
        qkv = linear(x, wqkv)
        x = linear(linear(linear(qkv[:, :hidden], wo), wup), wdown)
    return x


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--ffn", type=int, default=8192)
    parser.add_argument("--batches", default="1,2,4,8", help="rows per matmul (where the kernel stops paying)")
    parser.add_argument("--replays", type=int, default=30)
    parser.add_argument("--configs", default="4096:4,8192:4,8192:8,16384:8,32768:8",
                        help="Triton GEMV forms: weight elements per program : warps, comma-separated (the "
                             "first, also timed waiting before its loads, is the engine's: gemv.TILE, gemv.WARPS)")
    parser.add_argument("--out", default="results/gemv_chain.json")
    ns = parser.parse_args(argv)
    copy = copy_bandwidth_gbs()
    layers = _layers(ns.layers, ns.hidden, ns.ffn, "cuda")
    weight_bytes = sum(w.numel() * 2 for layer in layers for w in layer)
    floor_ms = weight_bytes / (copy * 1e9) * 1e3
    forms = {"cuBLAS F.linear": lambda x, w: F.linear(x, w)}
    configs = [tuple(int(v) for v in c.split(":")) for c in ns.configs.split(",")]
    for tile, warps in configs:
        forms[f"triton tile {tile // 1024}k, {warps} warps"] = (
            lambda x, w, t=tile, nw=warps: gemv(x, w, tile=t, num_warps=nw, pdl=False))
        forms[f"triton tile {tile // 1024}k, {warps} warps, PDL + weight prefetch"] = (
            lambda x, w, t=tile, nw=warps: gemv(x, w, tile=t, num_warps=nw, pdl=True))
    tile, warps = configs[0]
    forms[f"triton tile {tile // 1024}k, {warps} warps, PDL, waits before loading"] = (
        lambda x, w: gemv(x, w, tile=tile, num_warps=warps, pdl=True, prefetch=False))
    print(f"copy bandwidth {copy:.0f} GB/s; {ns.layers} layers' matmuls, {weight_bytes / 1e9:.2f} GB, "
          f"floor {floor_ms:.3f} ms")
    rows = []
    for batch in (int(v) for v in ns.batches.split(",")):
        x = torch.randn(batch, ns.hidden, device="cuda", dtype=torch.bfloat16)
        ref = _chain(layers[:1], x, forms["cuBLAS F.linear"])
        for name, linear in forms.items():
            err = ((_chain(layers[:1], x, linear) - ref).abs().max() / ref.abs().max()).item()
            ms = graphed_seconds(lambda: _chain(layers, x, linear), ns.replays) * 1e3
            rows.append(dict(form=name, batch=batch, ms=ms, floor_ms=floor_ms, x_floor=ms / floor_ms,
                             bandwidth_vs_copy=floor_ms / ms, max_rel_err_one_layer=err))
            print(f"  batch {batch:2d} {name:55s} {ms:7.3f} ms  {ms / floor_ms:5.2f}x floor  err {err:.1e}",
                  flush=True)
    write_result(ns.out, dict(settings=vars(ns), copy_gbs=copy, weight_bytes=weight_bytes, rows=rows))


if __name__ == "__main__":
    run(main)
