"""The decode profiler's accounting (`benchmarks/decode_profile`): with programmatic dependent launch
kernels overlap, so each is charged with how far it moves the step's end, and the charges add up."""

import pytest

from megatron_stag.benchmarks.decode_profile import attribute, critical_path, kind


def _k(name, ts, dur):
    return dict(cat="kernel", name=name, ts=ts, dur=dur)


def test_overlapping_kernels_are_charged_their_share_of_the_span():
    # b starts while a drains (PDL) and ends 3 µs after it; c ends under b (another stream): charged 0
    path = critical_path([_k("b", 8.0, 5.0), _k("a", 0.0, 10.0), _k("c", 9.0, 2.0), _k("d", 14.0, 1.0)])
    assert [(n, c) for n, _, c in path] == [("a", 10.0), ("b", 3.0), ("c", 0.0), ("d", 2.0)]
    assert sum(c for _, _, c in path) == 15.0  # first start to last end


def test_attribute_groups_replays_and_kinds():
    step = [_k("_gemv_kernel", 0, 10), _k("_group_kernel", 9, 4), _k("triton_poi_fused_0", 12, 2),
            _k("void cutlass::Kernel2<sm90_xmma_gemm>", 13, 5)]
    events = [dict(e, ts=e["ts"] + 100 * r) for r in range(3) for e in step] + [dict(cat="cpu_op", name="x", ts=1)]
    r = attribute(events, 3)
    assert r["kernels_per_step"] == 4 and r["span_us"] == 18
    assert r["kinds"] == {"GEMV (fused one-row matmul)": dict(us=10.0, kernels=1),
                          "cuBLAS matmul": dict(us=4.0, kernels=1),
                          "attention kernel": dict(us=3.0, kernels=1),
                          "compiled (inductor) kernels": dict(us=1.0, kernels=1)}
    assert kind("_gemv_stream_kernel") == "GEMV (fused one-row matmul)"  # not cuBLAS's "gemv"
    assert kind("_head_kernel") == "attention kernel"
    assert kind("_skinny_kernel") == "GEMM (2-64-row split-K matmul)"  # not "other": no "triton_" in its name
    assert kind("cudnn_generated_fmha_kernel") == "SDPA" and kind("indexSelectSmallIndex") == "other (eager torch kernels)"
    with pytest.raises(RuntimeError, match="not identical"):
        attribute(events[:-2], 3)


def test_cli_profiles_the_llama_shape_and_the_deterministic_step(monkeypatch, capsys):
    """`--models llama` builds Llama 3.2 1B's shape (grouped-query attention) and `--deterministic` reaches
    the engine; an unknown model is refused naming the choices."""
    from megatron_stag.benchmarks import decode_profile

    built, profiled = [], []
    monkeypatch.setattr(decode_profile, "serving_model", lambda a: built.append(a) or object())
    monkeypatch.setattr(decode_profile, "profile_step", lambda plain, batch, prompt, steps, deterministic:
                        profiled.append((batch, deterministic)) or dict(kernels_per_step=1, span_us=1.0, kinds={}))
    decode_profile.main(["--models", "llama", "--batches", "32", "--deterministic"])
    assert [(a.num_layers, a.num_attention_heads, a.num_query_groups) for a in built] == [(16, 32, 8)]
    assert profiled == [(32, True)]
    with pytest.raises(SystemExit):
        decode_profile.main(["--models", "nope"])
    assert "'gpt', 'llama', 'shared', 'stag'" in capsys.readouterr().err


def test_decode_benchmarks_compare_models_of_the_baselines_depth():
    """Every StagFormer and AltUp row of `decode_engine` (one GPU and several) and `decode_profile`
    runs as many layers per token as the GPT baseline it is compared with: shared weights run
    num_layers / p distinct layers p times, not fewer (a shallower row would decode faster for that
    alone). The Llama row is its own published shape."""
    from megatron_stag.benchmarks import decode_engine, decode_profile
    from megatron_stag.config.stagformer_config import section_layer_counts
    from megatron_stag.models.model_args import ModelArgs

    base = ModelArgs(vocab_size=32768, max_sequence_length=768, num_layers=24, hidden_size=2048,
                     num_attention_heads=16, position_embedding_type="rope")

    def depth(a):
        return sum(section_layer_counts(a.num_layers, a.stag_sections, a.stag_section_layers))

    for world in (1, 2, 4):
        rows = [(n, a) for n, a, _ in decode_engine.models(base, world) if "Llama" not in n]
        assert {depth(a) for _, a in rows} == {24}, [(n, depth(a)) for n, a in rows]
        shared = [(n, a) for n, a in rows if a.stag_shared_weights]
        labelled = [(n, a) for n, a in shared if "layers" in n]  # the row's name says how many it runs
        assert labelled and all(f"({24 // a.stag_sections} layers" in n for n, a in labelled)
    profiled = decode_profile.profiled(base)
    assert {name: depth(a) for name, a in profiled.items()} == dict(gpt=24, stag=24, shared=24, llama=16)
    assert profiled["shared"].stag_shared_weights and profiled["stag"].stag_sections == 2


def test_kernel_attention_rows_change_the_routing_alone(monkeypatch):
    """`decode_engine --kernel-attention-rows` builds the engine with the deterministic mode's routing
    (every one-query attention on the kernel) but the default compile options (multi-kernel on), so its
    rows differ from the default by the routing alone; the engine's own options are restored after."""
    from argparse import Namespace

    import torch

    from megatron_stag.benchmarks import decode_engine
    from megatron_stag.serving import engine

    seen = []

    class Built(Exception):
        pass

    def generator(plain, max_len, batch, deterministic=False, **kw):
        seen.append((deterministic, engine.compile_options(torch.device("cuda"), True, deterministic)))
        raise Built

    monkeypatch.setattr(engine, "StaggeredGenerator", generator)
    default = engine.compile_options
    ns = Namespace(prompt=4, new=2, rounds=1)
    for flags in (dict(), dict(deterministic=True), dict(kernel_attention=True)):
        with pytest.raises(Built):
            decode_engine.bench(None, 1, ns, **flags)
        assert engine.compile_options is default
    (plain, plain_options), (det, det_options), (routed, routed_options) = seen
    assert (plain, det, routed) == (False, True, True)
    assert plain_options.get("triton.multi_kernel") and "triton.multi_kernel" not in det_options
    assert routed_options == plain_options
