"""Per-token decode latency of the one engine, every model side by side in one run, against its floor.

    # one GPU: GPT baseline, StagFormer p=2 separate / window 1 / shared / recurrent, AltUp K=2, and a
    # GPT in Llama 3.2 1B's shape (the published figure's model)
    python -m megatron_stag.benchmarks.decode_engine --out results/decode_engine_h200.json
    # two GPUs: the GPT baseline tensor-parallel over both (DeepSpeed AutoTP, the same engine), and
    # StagFormer p=2 separate / window 1 / shared with one section (pass) per GPU; on four, p=4 and
    # p=2 x TP=2 against GPT TP=4
    torchrun --nproc_per_node 2 -m megatron_stag.benchmarks.decode_engine --out results/decode_engine_2gpu_h200.json
    torchrun --nproc_per_node 4 -m megatron_stag.benchmarks.decode_engine --out results/decode_engine_4gpu_h200.json

Each model is a megatron StagFormerModel (bf16, random weights, 24 layers of hidden 2048, vocabulary
32k, rope) converted in memory to the serving model, exactly what `megatron-stag generate` decodes,
driven by `engine.StaggeredGenerator` with its defaults (compiled step, one CUDA graph per token step).
A row: `--prompt` random tokens per sequence, then `--new` greedy tokens through `generate`'s decode
loop (`sampling.decode_loop`: sampling inside the graphed step, no host synchronisation until the
end), timed with CUDA events; `--rounds` repeats of the timed loop, the median reported. Beside it, the
time to prefill the batch's prompts: prompts together (the engine's default) and one forward per prompt.

The floor is the bytes a step must read over the copy bandwidth measured in the same run:
`floor_weights_ms` the weights (once, however many sections share them; on the slowest rank with one
section per GPU; embedding rows and learned positions count as rows, not tables), `floor_ms` those
plus the self- and cross-attention caches the step reads (positions <= the step's, or the window),
at the mean position of the timed steps.
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import time
from dataclasses import replace

import torch
import torch.distributed as dist

from megatron_stag.benchmarks.hardware import copy_bandwidth_gbs, run, write_result
from megatron_stag.models.model_args import ModelArgs


def _free() -> None:
    gc.collect()
    torch.cuda.empty_cache()


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


def _max_over_ranks(x: float) -> float:
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return x
    t = torch.tensor([float(x)], device="cuda")
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.item()


def serving_model(a: ModelArgs):
    """The megatron model of `a` (bf16, random init), converted as `generate` converts a checkpoint."""
    from megatron_stag.platform.distributed import initialize
    from megatron_stag.serving.convert import to_plain_model

    initialize(tp=1, pp=1)
    model = a.build(a.config(dtype=torch.bfloat16)).cuda().eval()
    plain = to_plain_model(model, a, device="cuda").to(torch.bfloat16)
    del model
    _free()
    return plain


def step_bytes(plain, batch: int, position: float, sections, recurrent: bool) -> tuple[int, int]:
    """(weight bytes, cache bytes) one step reads on this rank, at `position` (a mean over steps)."""
    cfg, seen, weights = plain.cfg, set(), 0
    rows_only = {id(m.weight) for name in ("embed_tokens", "embed_positions", "altup_embed_tokens")
                 if (m := getattr(plain, name, None)) is not None and m.weight is not plain.lm_head.weight}
    skip = set()
    if plain.next_entries is None and sections != list(range(cfg.sections)) and sections[0] > 0 \
            and plain.entries_made_upstream():  # the rank before projects this section's entries
        skip = {id(p) for layer in plain.sections[sections[0]].layers
                for proj in (layer.cross_attn.k_proj, layer.cross_attn.v_proj) for p in proj.parameters()}
    for p in plain.parameters():
        if id(p) in seen or id(p) in skip:
            continue
        seen.add(id(p))
        weights += (batch * p.shape[-1] if id(p) in rows_only else p.numel()) * p.element_size()
    caches, elem = 0, next(plain.parameters()).element_size()
    for k in ([1] if recurrent else sections):
        attn = plain.sections[k].layers[0].self_attn
        kv_heads = attn.k_proj.weight.shape[0] // attn.head_dim
        layers = len(plain.sections[k].layers)
        caches += layers * 2 * batch * kv_heads * (position + 1) * attn.head_dim * elem
        if k:
            entries = position + 1 if cfg.cross_window is None else min(position + 1, cfg.cross_window)
            heads = plain.sections[k].layers[0].cross_attn.q_proj.weight.shape[0] // attn.head_dim
            caches += layers * 2 * batch * heads * entries * attn.head_dim * elem
    return weights, int(caches)


def bench(plain, batch: int, ns, recurrent: bool = False, placement=None, comm=None, kernels: bool = True,
          deterministic: bool = False, gemm: bool = True, kernel_attention: bool = False) -> dict:
    """ms per token of `generate`'s decode loop with the engine's defaults (greedy, sampled inside the
    graphed step, no host sync until the end; `kernels=False`: cuBLAS for every matmul, SDPA for
    attention; `deterministic`: the engine's, as `generate --deterministic`; `gemm=False`: 2-64-row
    matmuls on cuBLAS, not `serving.skinny_gemm`'s kernel; `kernel_attention`: the deterministic mode's
    routing, every one-query attention on the decode attention kernel, with the default compile options,
    so that the routing alone differs from the default), median of ns.rounds."""
    from megatron_stag.serving import engine, skinny_gemm
    from megatron_stag.serving.engine import StaggeredGenerator
    from megatron_stag.serving.sampling import SamplingParams, decode_loop

    default_rows, skinny_gemm.ROWS = skinny_gemm.ROWS, skinny_gemm.ROWS if gemm else 0  # read while compiling
    default_options = engine.compile_options
    if kernel_attention:  # the deterministic mode compiles without multi-kernel: here it keeps the default's
        engine.compile_options = lambda device, compile, _: default_options(device, compile, deterministic)
    try:
        gen = StaggeredGenerator(plain, ns.prompt + ns.new, batch, placement=placement, comm=comm, recurrent=recurrent,
                                 kernels=kernels, deterministic=deterministic or kernel_attention)
        g = torch.Generator().manual_seed(0)
        prompts = torch.randint(0, plain.cfg.vocab_size, (batch, ns.prompt), generator=g).tolist()
        with torch.no_grad():
            last = gen.prefill(prompts)
            prefill = dict(prefill_ms=_prefill_ms(gen, prompts, engine.PREFILL_TOKENS),
                           prefill_per_prompt_ms=_prefill_ms(gen, prompts, 0))
        first = last.argmax(-1) if gen._sampler else torch.zeros(batch, dtype=torch.long, device="cuda")
        first = gen._broadcast(first)
        start = torch.full((batch,), ns.prompt, device="cuda")
        params = SamplingParams(max_new_tokens=ns.new)
        def loop():  # every round rewrites the same cache slots
            decode_loop(first, gen.stepper(params, ns.prompt), start, params)

        loop()  # compile, and capture the step's graph for every bucket of cache slots it reads
        rounds = [_timed(loop, ns.new - 1) * 1e3 for _ in range(ns.rounds)]
        return dict(ms_per_token=statistics.median(rounds), rounds_ms=rounds, **prefill)
    finally:
        skinny_gemm.ROWS, engine.compile_options = default_rows, default_options


def _prefill_ms(gen, prompts: list[list[int]], budget: int) -> float:
    """ms to prefill the prompts (median of 3, after a warm-up) with `engine.PREFILL_TOKENS` = budget
    (0: one forward per prompt, the engine before prompts prefilled together)."""
    from megatron_stag.serving import engine

    default, engine.PREFILL_TOKENS = engine.PREFILL_TOKENS, budget
    try:
        gen.prefill(prompts)
        return statistics.median(_timed(lambda: gen.prefill(prompts), 1) * 1e3 for _ in range(3))
    finally:
        engine.PREFILL_TOKENS = default


# Llama 3.2 1B's shape (its config.json): the model behind the published 0.76-0.80 ms/token on one H200
# that the README quotes, decoded here by the same engine as every other row
LLAMA_3_2_1B = dict(num_layers=16, hidden_size=2048, num_attention_heads=32, num_query_groups=8,
                    ffn_hidden_size=8192, normalization="RMSNorm", swiglu=True, add_bias_linear=False,
                    vocab_size=128256, rotary_base=500000, share_embeddings_and_output_weights=True)


def models(base: ModelArgs, world: int) -> list[tuple[str, ModelArgs, bool]]:
    """(name, model, recurrent). With several GPUs (`world`): the GPT tensor-parallel over all of them,
    StagFormer p = world with one section (pass) per GPU, and from four GPUs p=2 with each section
    tensor-parallel over half of them (`layout`)."""
    stag = replace(base, stag_sections=2)
    # shared weights: the same depth as the others (num_layers counts every section's layers), so p=2
    # runs num_layers / 2 distinct layers twice
    shared = replace(stag, stag_shared_weights=True)
    if world > 1:
        p = replace(base, stag_sections=world)
        rows = [("GPT baseline", base, False), (f"StagFormer p={world} separate", p, False),
                (f"StagFormer p={world} window 1", replace(p, stag_cross_window=1), False),
                (f"StagFormer p={world} shared ({base.num_layers // world} layers, one pass per GPU)",
                 replace(p, stag_shared_weights=True), False)]
        if world >= 4 and world % 2 == 0:
            rows.append((f"StagFormer p=2 separate, TP={world // 2} per section", stag, False))
        return rows
    return [("GPT baseline", base, False), ("StagFormer p=2 separate", stag, False),
            ("StagFormer p=2 window 1", replace(stag, stag_cross_window=1), False),
            (f"StagFormer p=2 shared ({base.num_layers // 2} layers run twice)", shared, False),
            ("StagFormer p=2 shared, recurrent", shared, True),
            ("AltUp K=2 recycled", replace(base, altup_blocks=2), False),
            ("Llama 3.2 1B shape", replace(base, **LLAMA_3_2_1B), False)]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=24)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--vocab", type=int, default=32768)
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--new", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--batches", default="1,8,32")
    ap.add_argument("--models", default="", help="comma-separated substrings of model names (default: all)")
    ap.add_argument("--cublas-rows", action="store_true", help="also time every configuration with the "
                    "engine's kernels=False (cuBLAS for every matmul, SDPA for attention), in the same run")
    ap.add_argument("--deterministic-rows", action="store_true", help="also time every configuration with "
                    "the engine's deterministic=True (generate --deterministic), in the same run")
    ap.add_argument("--cublas-gemm-rows", action="store_true", help="also time every configuration with its "
                    "2-64-row matmuls on cuBLAS instead of serving.skinny_gemm's kernel, in the same run")
    ap.add_argument("--kernel-attention-rows", action="store_true", help="also time every configuration with "
                    "every one-query attention on the engine's decode attention kernel (by default full heads take cuDNN "
                    "above decode_attention.ROWS kv heads per step, self-attention only up to CACHED_ROWS), "
                    "compiled as by default, in the same run")
    ap.add_argument("--out", required=True)
    ns = ap.parse_args(argv)
    from megatron_stag.serving.engine import SectionPlacement

    torch.backends.cuda.matmul.allow_tf32 = True
    world = int(os.environ.get("WORLD_SIZE", "1"))
    bandwidth = copy_bandwidth_gbs()
    base = ModelArgs(vocab_size=ns.vocab, max_sequence_length=ns.prompt + ns.new, num_layers=ns.layers,
                     hidden_size=ns.hidden, num_attention_heads=ns.heads, position_embedding_type="rope")
    wanted = [w for w in ns.models.split(",") if w]
    rows, began = [], time.perf_counter()
    for name, a, recurrent in models(base, world):
        if wanted and not any(w in name for w in wanted):
            continue
        plain, placement, comm, sections, layout = serving_model(a), None, None, list(range(a.stag_sections)), "1 GPU"
        if world > 1:  # as `generate` runs it under torchrun / deepspeed with --tp world // sections
            comm, tp = dist, world // a.stag_sections
            if a.stag_sections > 1:
                placement = SectionPlacement(a.stag_sections, tp, dist.get_rank())
                plain.keep_sections([placement.section])  # before DeepSpeed shards the rest
                sections = [placement.section]
            if tp > 1:
                from megatron_stag.serving.deepspeed import init_comm, init_deepspeed_engine, section_groups

                init_comm()
                plain = init_deepspeed_engine(plain, torch.bfloat16, tp=tp,
                                              group=section_groups(a.stag_sections, tp)).module
            layout = f"{world} GPUs: " + ", ".join(
                (["one section per " + ("GPU" if tp == 1 else f"{tp} GPUs")] if a.stag_sections > 1 else [])
                + ([f"tensor-parallel over {tp} (DeepSpeed AutoTP)"] if tp > 1 else []))
        variants = [("", True, False, True, False)] \
            + [(", cuBLAS matmuls, SDPA", False, False, False, False)] * ns.cublas_rows \
            + [(", deterministic", True, True, True, False)] * ns.deterministic_rows \
            + [(", 2-64-row matmuls on cuBLAS", True, False, False, False)] * ns.cublas_gemm_rows \
            + [(", every attention on the kernel", True, False, True, True)] * ns.kernel_attention_rows
        for b, (suffix, kernels, deterministic, gemm, on_kernel) in [(int(x), v) for x in ns.batches.split(",")
                                                                     for v in variants]:
            r = bench(plain, b, ns, recurrent, placement, comm, kernels, deterministic, gemm, on_kernel)
            torch.compiler.reset()  # every configuration compiles afresh (dynamo's per-function cache is bounded)
            _free()
            weights, caches = step_bytes(plain, b, ns.prompt + (ns.new - 1) / 2, sections, recurrent)
            floor_w = _max_over_ranks(weights) / bandwidth / 1e6
            floor = _max_over_ranks(weights + caches) / bandwidth / 1e6
            row = dict(model=name + suffix,
                       layout=layout,
                       batch=b, ms_per_token=r["ms_per_token"], floor_ms=floor, floor_weights_ms=floor_w,
                       x_floor=r["ms_per_token"] / floor, x_floor_weights=r["ms_per_token"] / floor_w,
                       rounds_ms=r["rounds_ms"], weight_bytes=weights, cache_bytes=caches,
                       prefill_ms=r["prefill_ms"], prefill_per_prompt_ms=r["prefill_per_prompt_ms"])
            rows.append(row)
            if world == 1 or dist.get_rank() == world - 1:
                _write(ns, bandwidth, rows)  # after every row: a run cut short keeps what it measured
                print(f"{row['model']:62s} b={b:<3d} {row['ms_per_token']:7.3f} ms/token  floor {floor:6.3f} "
                      f"(weights {floor_w:6.3f})  x{row['x_floor']:.2f} / x{row['x_floor_weights']:.2f}  prefill "
                      f"{row['prefill_ms']:.1f} ms (one prompt per forward {row['prefill_per_prompt_ms']:.1f})  "
                      f"[{time.perf_counter() - began:.0f} s]",
                      flush=True)
        del plain
        _free()
    if world == 1 or dist.get_rank() == world - 1:
        _write(ns, bandwidth, rows)


def _write(ns, bandwidth: float, rows: list[dict]) -> None:
    gpt = {r["batch"]: r["ms_per_token"] for r in rows if r["model"] == "GPT baseline"}
    for r in rows:
        if r["batch"] in gpt:
            r["vs_gpt"] = r["ms_per_token"] / gpt[r["batch"]]
    write_result(ns.out, dict(config=vars(ns), copy_bandwidth_gbs=bandwidth, rows=rows,
                              engine="serving.engine.StaggeredGenerator defaults: torch.compile'd section "
                                     "steps, one CUDA graph per token step, bf16"))


if __name__ == "__main__":
    run(main)
