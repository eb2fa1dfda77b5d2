"""GPU-only checks (skipped on CPU machines; run on the device machines): the CPU adapter stays
inert, and CUDA-graph decode steps stay exact."""

from unittest import mock

import pytest
import torch

from tests.test_parallel_equivalence import CASES as PARALLEL_CASES

pytestmark = [pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU"),
              pytest.mark.usefixtures("megatron_world")]


def test_cpu_adapter_is_inert_with_cuda():
    from megatron_stag.platform import cpu

    assert cpu.activate() is False and not cpu.is_active()
    assert torch.empty(1, device="cuda").device.type == "cuda"


@pytest.mark.parametrize("variant", [dict(), dict(stag_shared_weights=True), dict(stag_cross_window=1),
                                     dict(position_embedding_type="rope"),
                                     dict(stag_sections=3, num_layers=6, stag_output="combine"),
                                     dict(altup_blocks=2), dict(stag_sections=1, altup_blocks=4,
                                                                altup_compile=True)])
def test_cuda_graph_decode_equals_forward(variant):
    """The engine's default step on CUDA (compiled, CUDA-graphed) on the converted model equals the
    megatron model's teacher-forced forward (fp32, TF32 off)."""
    from megatron_stag.serving.convert import to_plain_model
    from megatron_stag.serving.engine import StaggeredGenerator
    from megatron_stag.serving.sampling import SamplingParams
    from tests.model_factory import tiny_model

    torch.backends.cuda.matmul.allow_tf32 = False
    model = tiny_model(**variant).cuda()
    prompts = [[5, 9, 2, 33, 7], [1, 2, 3]]
    gen = StaggeredGenerator(to_plain_model(model, None, device="cuda"), max_len=24, batch=2)
    result = gen.generate(prompts, SamplingParams(max_new_tokens=10), keep_logits=True)
    for r, prompt in enumerate(prompts):
        full = prompt + result.tokens[r]
        with torch.no_grad():
            ref = model(torch.tensor([full], device="cuda"),
                        torch.arange(len(full), device="cuda")[None])[0]
        torch.testing.assert_close(result.step_logits[:, r], ref[len(prompt): len(full) - 1],
                                   atol=1e-4, rtol=0)


@pytest.mark.parametrize("kw", [dict(altup_blocks=2), dict(altup_blocks=3, recompute_granularity="full",
                                                            recompute_method="uniform", recompute_num_layers=1),
                                dict(altup_blocks=4, altup_form="gemma3n",
                                altup_schedule="fixed", altup_embedding="projected",
                                altup_output="projected", altup_coef_clip=0.2)])
def test_compiled_altup_equals_eager(kw):
    """altup_compile fuses predict/correct (Triton kernels for the standard form, torch.compile for
    Gemma 3n's): same loss and gradients as eager, also when megatron recomputes every layer in the
    backward (the fused path hands the stream's gradient between two autograd functions)."""
    from tests.model_factory import batch, tiny_model

    torch.backends.cuda.matmul.allow_tf32 = False
    ids, pos = (t.cuda() for t in batch())
    results = []
    for compiled in (False, True):
        model = tiny_model(stag_sections=1, altup_compile=compiled, **kw).cuda().train()
        loss = model(ids, pos, labels=ids).mean()
        loss.backward()
        results.append((loss.detach(), {n: p.grad for n, p in model.named_parameters()}))
    (l0, g0), (l1, g1) = results
    torch.testing.assert_close(l1, l0, atol=1e-5, rtol=1e-5)
    for name in g0:
        torch.testing.assert_close(g1[name], g0[name], atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.parametrize("variant,compile", [(dict(), False), (dict(), True),
                                             (dict(stag_sections=3, num_layers=6, stag_output="combine"), False),
                                             (dict(altup_blocks=2, position_embedding_type="rope"), True)])
def test_deepspeed_engine_graphed_decode_equals_forward(variant, compile):
    """The exported model under deepspeed.init_inference, decode steps replayed as CUDA graphs (sections
    on parallel streams, or the step torch.compile'd): logits equal the exported model's forward."""
    pytest.importorskip("deepspeed")
    from megatron_stag.serving.deepspeed import init_deepspeed_engine
    from megatron_stag.serving.engine import StaggeredGenerator
    from megatron_stag.serving.convert import to_plain_model
    from megatron_stag.serving.sampling import SamplingParams
    from tests.model_factory import tiny_model

    torch.backends.cuda.matmul.allow_tf32 = False
    plain = to_plain_model(tiny_model(**variant), None, device="cuda")
    engine = init_deepspeed_engine(plain)
    prompts = [[5, 9, 2, 33, 7], [1, 2, 3]]
    gen = StaggeredGenerator(engine.module, max_len=24, batch=2, cuda_graph=True, compile=compile)
    result = gen.generate(prompts, SamplingParams(max_new_tokens=10), keep_logits=True)
    for r, prompt in enumerate(prompts):
        full = prompt + result.tokens[r]
        with torch.no_grad():
            ref = engine.module(torch.tensor([full], device="cuda"))[0]
        torch.testing.assert_close(result.step_logits[:, r], ref[len(prompt): len(full) - 1], atol=1e-4, rtol=0)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_expert_parallel_altup_moe_matches_single_rank(tmp_path):
    """AltUp + MoE with expert parallelism 2 (NCCL; gloo has no reduce-scatter): loss and every
    gradient shard equal the EP=1 run's, from its checkpoint resharded onto EP=2."""
    from tests.dist_helpers import run_ranks
    from tests.parallel_workers import train_step
    from tests.test_parallel_equivalence import _compare

    moe = dict(stag_sections=1, altup_blocks=2, num_moe_experts=4, moe_router_topk=2, add_bias_linear=False)
    ref, par = tmp_path / "ref", tmp_path / "par"
    ref.mkdir(), par.mkdir()
    run_ranks(train_step, 1, 1, 1, moe, None, str(ref))
    run_ranks(train_step, 2, 1, 1, dict(moe, expert_model_parallel_size=2), str(ref / "ckpt"), str(par))
    _compare(str(ref), str(par))


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
@pytest.mark.parametrize("case", list(PARALLEL_CASES))
def test_parallel_matches_single_rank_on_nccl(tmp_path, case):
    """The CPU suite's TP/PP cases on two GPUs (the workers take CUDA and NCCL where there is a GPU):
    loss and every gradient shard equal the one-GPU run's, and the checkpoint reshards back."""
    from tests.test_parallel_equivalence import _run_case

    _run_case(tmp_path, *PARALLEL_CASES[case])


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
@pytest.mark.parametrize("tp", [1, 2])
def test_generate_on_two_gpus_under_deepspeed_equals_one_gpu(quickstart_run, tmp_path, tp):
    """`deepspeed --num_gpus 2 ... generate --engine deepspeed`, one section per GPU (tp 1) or both
    sections tensor-parallel over both GPUs (--tp 2, AutoTP), writes the one-GPU completions (greedy,
    fp32)."""
    import json
    import subprocess
    import sys

    from megatron_stag.platform.distributed import free_port
    from tests.cli_helpers import cli

    pytest.importorskip("deepspeed")
    ckpt = str(quickstart_run[0] / "checkpoints")
    args = ["--prompt", "def f(x):", "--prompt", "import os", "--max-new-tokens", "12", "--dtype", "fp32"]
    cli("generate", ckpt, *args, "--output", str(tmp_path / "one.jsonl"))
    proc = subprocess.run([sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port",
                           str(free_port()), "--module", "megatron_stag.cli", "generate", ckpt, "--engine",
                           "deepspeed", "--tp", str(tp), *args, "--output", str(tmp_path / "two.jsonl")],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    one, two = ([json.loads(line) for line in (tmp_path / f).read_text().splitlines()] for f in ("one.jsonl", "two.jsonl"))
    assert two == one


@pytest.mark.parametrize("k,schedule,dtype", [(2, (0, 1, 0), torch.float32), (2, (1, 0, 1), torch.bfloat16),
                                              (3, (2, 0, 1), torch.float32), (4, (1, 2, 3), torch.float32),
                                              (4, (3, 3, 3), torch.bfloat16), (8, (5, 6, 7), torch.float32)])
@pytest.mark.parametrize("loss", ["stream", "second layer's input only", "stream and another reader"])
def test_altup_triton_kernels_match_the_equations(k, schedule, dtype, loss):
    """layers/altup_triton.py's kernels: two layers, values and every gradient against the equations in
    plain torch; sizes not multiples of the tiles."""
    from tests.test_altup import check_fused_against_equations

    check_fused_against_equations(loss, k, schedule, s=37, b=3, d=200, device="cuda", dtype=dtype)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.bfloat16, 0.1)])
@pytest.mark.parametrize("variant", [dict(stag_cross_window=4), dict(stag_shared_weights=True)])
def test_default_step_equals_eager_step(dtype, tol, variant):
    """The fused (compiled, graphed) step against the eager step of the same serving model: the same
    greedy tokens; logits equal to fp32 rounding, or within bf16's (inductor reorders bf16 sums).
    Shared weights: the fused step runs the passes as one batch (`shared_passes_step`)."""
    from megatron_stag.serving.convert import to_plain_model
    from megatron_stag.serving.engine import StaggeredGenerator
    from megatron_stag.serving.sampling import SamplingParams
    from tests.model_factory import tiny_model

    torch.backends.cuda.matmul.allow_tf32 = False
    plain = to_plain_model(tiny_model(position_embedding_type="rope", **variant), None, device="cuda").to(dtype)
    prompts = [[5, 9, 2, 33, 7], [1, 2, 3]]
    params = SamplingParams(max_new_tokens=12)
    fast = StaggeredGenerator(plain, max_len=24, batch=2).generate(prompts, params, keep_logits=True)
    eager = StaggeredGenerator(plain, max_len=24, batch=2, cuda_graph=False, compile=False).generate(
        prompts, params, keep_logits=True)
    assert fast.tokens == eager.tokens
    assert (fast.step_logits.float() - eager.step_logits.float()).abs().max() <= tol


def test_bucketed_steps_equal_full_width_steps(monkeypatch):
    """Steps on SDPA read the caches in buckets (`engine.SLOT_BUCKET`), each its own CUDA graph over
    one compiled step per section (marked dynamic in the slots, the full width included): the same
    tokens and logits as steps reading every slot, sampled and with a second generate replaying the
    graphs."""
    from megatron_stag.serving import decode_attention, engine
    from megatron_stag.serving.convert import to_plain_model
    from megatron_stag.serving.sampling import SamplingParams
    from tests.model_factory import tiny_model

    torch.backends.cuda.matmul.allow_tf32 = False
    monkeypatch.setattr(engine, "SLOT_BUCKET", 8)
    monkeypatch.setattr(decode_attention, "ROWS", 0)  # SDPA for every step of this small batch
    plain = to_plain_model(tiny_model(position_embedding_type="rope"), None, device="cuda")
    prompts = [[5, 9, 2, 33, 7], [1, 2, 3]]
    params = SamplingParams(max_new_tokens=16, temperature=0.9, top_k=30, seed=4)

    def run(bucket):
        torch._dynamo.reset()
        torch._dynamo.utils.counters.clear()
        gen = engine.StaggeredGenerator(plain, max_len=24, batch=2)
        gen.bucket = bucket
        first = gen.generate(prompts, params, keep_logits=True)
        again = gen.generate(prompts, params, keep_logits=True)
        assert again.tokens == first.tokens and torch.equal(again.step_logits, first.step_logits)
        return first, sorted(gen._graphs), torch._dynamo.utils.counters["stats"]["unique_graphs"]

    full, full_graphs, full_traces = run(None)
    bucketed, graphs, traces = run(8)
    assert full_graphs == [24] and graphs == [8, 16, 24]
    assert traces <= full_traces  # one (dynamic) trace per section serves every bucket
    assert torch._dynamo.config.recompile_limit >= 8 * plain.cfg.sections  # sections share the function
    assert bucketed.tokens == full.tokens
    torch.testing.assert_close(bucketed.step_logits, full.step_logits, atol=1e-4, rtol=0)


def test_sections_never_run_on_the_capture_stream():
    """The sections of a graphed step run on streams of their own, neither of them the stream the
    graph is captured on, even where torch's round-robin stream pool would hand out the default
    capture stream next (on that stream a section ran before the next one's stream waited on it: the
    graph ran the sections in series)."""
    from megatron_stag.serving.convert import to_plain_model
    from megatron_stag.serving.engine import StaggeredGenerator
    from megatron_stag.serving.sampling import SamplingParams
    from tests.model_factory import tiny_model

    plain = to_plain_model(tiny_model(), None, device="cuda")
    assert plain.cfg.sections == 2
    if torch.cuda.graph.default_capture_stream is None:
        torch.cuda.graph.default_capture_stream = torch.cuda.Stream()
    for _ in range(32):  # the pool (32 streams) hands out its streams in turn: find the capture stream's
        if torch.cuda.Stream() == torch.cuda.graph.default_capture_stream:
            break
    for _ in range(31):  # ... and come round to it again: the next stream made is the capture stream
        torch.cuda.Stream()
    gen = StaggeredGenerator(plain, max_len=16, batch=1, compile=False)
    seen = []
    run_sections, run_one = gen._run_sections, gen._run_and_pass_on

    def sections(*args):
        if torch.cuda.is_current_stream_capturing():
            seen.append(("capture", torch.cuda.current_stream()))
        return run_sections(*args)

    def one(k, *args):
        if torch.cuda.is_current_stream_capturing():
            seen.append((k, torch.cuda.current_stream()))
        return run_one(k, *args)

    gen._run_sections, gen._run_and_pass_on = sections, one
    gen.generate([[5, 9, 2]], SamplingParams(max_new_tokens=4))
    assert [k for k, _ in seen] == ["capture", 0, 1]
    assert len({s for _, s in seen}) == 3, seen


def test_sampling_inside_the_graph_equals_eager_sampling():
    """Sampling runs inside the graphed step with the engine's seeded CUDA generator: the same tokens
    as the eager step (fp32), and again on a second generate that replays the same graph."""
    from megatron_stag.serving.convert import to_plain_model
    from megatron_stag.serving.engine import StaggeredGenerator
    from megatron_stag.serving.sampling import SamplingParams
    from tests.model_factory import tiny_model

    torch.backends.cuda.matmul.allow_tf32 = False
    plain = to_plain_model(tiny_model(), None, device="cuda")
    prompts = [[5, 9, 2, 33, 7], [1, 2, 3]]
    params = SamplingParams(max_new_tokens=12, temperature=0.9, top_k=30, top_p=0.95, seed=4)
    fast = StaggeredGenerator(plain, max_len=24, batch=2)
    first = fast.generate(prompts, params).tokens
    eager = StaggeredGenerator(plain, max_len=24, batch=2, cuda_graph=False, compile=False).generate(prompts, params)
    assert first == eager.tokens
    assert fast.generate(prompts, params).tokens == first
    assert fast.generate(prompts, SamplingParams(max_new_tokens=12, temperature=0.9, seed=5)).tokens != first


def test_deterministic_decoding_repeats_bitwise_at_any_batch():
    """`deterministic=True` (`generate --deterministic`): with more query heads per step than `ROWS`,
    where the default step takes SDPA (cuDNN, not run-to-run deterministic), every one-query attention
    runs on the decode attention kernel, and two generators give bitwise equal logits and tokens in
    bf16, within bf16 rounding of the default step's."""
    from megatron_stag.serving import decode_attention, gemv
    from megatron_stag.serving.convert import to_plain_model
    from megatron_stag.serving.engine import StaggeredGenerator
    from megatron_stag.serving.sampling import SamplingParams
    from tests.model_factory import tiny_model

    if not gemv.available(torch.device("cuda")):
        pytest.skip("the kernel needs Hopper or later")
    plain = to_plain_model(tiny_model(hidden_size=256, num_attention_heads=4, position_embedding_type="rope"),
                           None, device="cuda").to(torch.bfloat16)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 64, (n,), generator=g).tolist() for n in torch.randint(3, 12, (24,), generator=g).tolist()]
    params = SamplingParams(max_new_tokens=10)
    assert 24 * 4 > decode_attention.ROWS
    calls, kernel = [], decode_attention.decode_attention

    def counted(*args, **kwargs):
        calls.append(kwargs.get("new") is not None)
        return kernel(*args, **kwargs)

    with mock.patch.object(decode_attention, "decode_attention", counted):
        runs = [StaggeredGenerator(plain, max_len=24, batch=24, deterministic=True).generate(
            prompts, params, keep_logits=True) for _ in range(2)]
    assert set(calls) == {True, False}  # self-attention steps (rope and cache write inside) and cross
    assert runs[0].tokens == runs[1].tokens and torch.equal(runs[0].step_logits, runs[1].step_logits)
    default = StaggeredGenerator(plain, max_len=24, batch=24).generate(prompts, params, keep_logits=True)
    assert (default.step_logits[0].float() - runs[0].step_logits[0].float()).abs().max() <= 0.1
    with pytest.raises(ValueError, match="needs the engine's kernels"):
        StaggeredGenerator(plain, max_len=24, batch=24, deterministic=True, kernels=False)
    odd = to_plain_model(tiny_model(hidden_size=192, num_attention_heads=4), None, device="cuda")
    StaggeredGenerator(odd, max_len=24, batch=24, deterministic=True)  # fp32: SDPA's choice is deterministic
    with pytest.raises(ValueError, match="not 48"):
        StaggeredGenerator(odd.to(torch.bfloat16), max_len=24, batch=24, deterministic=True)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gemv_kernel_equals_f_linear(dtype):
    """The one-row kernel (`serving.gemv.linear`, what the engine routes one-row matmuls to) against
    F.linear: every shape a decode step has (K 256..8192, N not a multiple of the tile, a strided row,
    a bias), to half-precision rounding; more than one row stays F.linear's."""
    import torch.nn.functional as F

    from megatron_stag.serving import gemv

    assert gemv.available(torch.device("cuda")) == (torch.cuda.get_device_capability() >= (9, 0))
    if not gemv.available(torch.device("cuda")):
        pytest.skip("the kernel needs Hopper or later")
    g = torch.Generator(device="cuda").manual_seed(0)
    for n, k in ((6144, 2048), (2048, 8192), (1000, 256), (3, 512)):
        w = torch.randn(n, k, device="cuda", dtype=dtype, generator=g) / k ** 0.5
        b = torch.randn(n, device="cuda", dtype=dtype, generator=g)
        x = torch.randn(1, 1, 2 * k, device="cuda", dtype=dtype, generator=g)[..., :k]  # a strided view
        ref = F.linear(x.float(), w.float(), b.float())
        out = gemv.linear(x, w, b)
        assert out.shape == ref.shape and out.dtype == dtype
        torch.testing.assert_close(out.float(), ref, atol=2e-2, rtol=2e-2)
        compiled = torch.compile(gemv.linear, dynamic=False)(x, w, b)
        torch.testing.assert_close(compiled.float(), ref, atol=2e-2, rtol=2e-2)
    assert gemv._FITS  # the streaming grid was sized from a compiled kernel's residency
    two = torch.randn(2, 512, device="cuda", dtype=dtype)
    assert torch.equal(gemv.linear(two, w, b), F.linear(two, w, b))
    _fused_forms_match(gemv.linear, 1, dtype, g)


def _fused_forms_match(matmul, rows: int, dtype, g) -> None:
    """`matmul` (the engine's `linear`) with the norm before it (RMS, layer), GELU or SwiGLU and the
    residual add after it, against `model.linear` in fp32, for `rows` rows of width 2048."""
    from megatron_stag.serving.model import linear

    for norm in (torch.nn.RMSNorm(2048, eps=1e-5), torch.nn.LayerNorm(2048, eps=1e-5)):
        torch.nn.init.normal_(norm.weight)
        norm = norm.to("cuda", dtype).requires_grad_(False)
        for activation, n in ((None, 2048), ("gelu", 8192), ("swiglu", 2 * 8192)):
            w = torch.randn(n, 2048, device="cuda", dtype=dtype, generator=g) / 2048 ** 0.5
            x = torch.randn(rows, 1, 2048, device="cuda", dtype=dtype, generator=g)
            res = torch.randn(rows, 1, n // (2 if activation == "swiglu" else 1), device="cuda", dtype=dtype)
            ref = linear(x.float(), w.float(), None, norm.float(), activation, res.float())
            norm = norm.to(dtype)
            torch.testing.assert_close(matmul(x, w, None, norm, activation, res).float(), ref, atol=3e-2, rtol=2e-2)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_skinny_gemm_equals_f_linear(dtype):
    """The 2-64-row GEMM (`serving.skinny_gemm.linear`, what the engine routes those matmuls to) against
    F.linear in fp32: every matrix a GPT and a Llama-shaped step has, 2 to 64 rows, a strided input, a
    bias, compiled and replayed from a CUDA graph, to half-precision rounding; two calls are bitwise
    equal (the partial sums add in a fixed order); the norm before it, the residual after it, and GELU
    and SwiGLU, which the MLP's up projections (one K split) apply inside the kernel."""
    import torch.nn.functional as F

    from megatron_stag.serving import gemv, skinny_gemm

    if not gemv.available(torch.device("cuda")):
        pytest.skip("the kernel needs Hopper or later")
    g = torch.Generator(device="cuda").manual_seed(0)
    op = torch.compile(skinny_gemm.linear, dynamic=False)
    for n, k in ((6144, 2048), (2048, 2048), (8192, 2048), (2048, 8192), (3072, 2048), (16384, 2048)):
        w = torch.randn(n, k, device="cuda", dtype=dtype, generator=g) / k ** 0.5
        b = torch.randn(n, device="cuda", dtype=dtype, generator=g)
        for rows in (2, 8, 32, 64):
            x = torch.randn(rows, 1, 2 * k, device="cuda", dtype=dtype, generator=g)[..., :k]  # a strided view
            ref = F.linear(x.float(), w.float(), b.float())
            out = skinny_gemm.linear(x, w, b)
            assert out.shape == ref.shape and out.dtype == dtype
            torch.testing.assert_close(out.float(), ref, atol=2e-2, rtol=2e-2)
            assert torch.equal(skinny_gemm.linear(x, w, b), out)
        static = op(x, w, b)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static = op(x, w, b)
        for _ in range(2):
            x.normal_(generator=g)
            graph.replay()
            torch.testing.assert_close(static.float(), F.linear(x.float(), w.float(), b.float()), atol=2e-2, rtol=2e-2)
    _fused_forms_match(op, 8, dtype, g)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_decode_attention_kernel_equals_sdpa(dtype):
    """The decode attention kernel (`serving.decode_attention`) against SDPA in fp32: a causal cache
    with a different position per row, a cross-attention ring's scattered slots, GQA, slots not a
    multiple of the block, one split and many, compiled and replayed from a CUDA graph; a step's
    self-attention with its rotary embedding and cache write in the kernel (grouped queries on the
    grouped kernel, full heads on the per-head one), in the small steps' form and, above `ROWS` kv
    heads, the pipelined one; more than one query per row, or full heads above `ROWS` per step (unless
    deterministic; a self-attention step only up to `CACHED_ROWS`), stays SDPA's."""
    from megatron_stag.serving import decode_attention, gemv
    from megatron_stag.serving.model import attention as sdpa
    from megatron_stag.serving.model import cached_attention as reference_cached

    if not gemv.available(torch.device("cuda")):
        pytest.skip("the kernel needs Hopper or later")
    g = torch.Generator(device="cuda").manual_seed(0)
    op = torch.compile(torch.ops.megatron_stag.decode_attention, dynamic=False)
    for b, heads, kv_heads, slots, hd in ((1, 16, 16, 768, 128), (8, 16, 4, 769, 128), (64, 8, 8, 300, 64),
                                          (3, 4, 2, 5, 256), (8, 32, 8, 640, 64), (24, 8, 4, 300, 64),
                                          (32, 32, 8, 640, 64), (80, 4, 4, 1000, 128), (12, 8, 8, 200, 64)):
        qkv = torch.randn(b, 1, (heads + 2 * kv_heads) * hd, device="cuda", dtype=dtype, generator=g)
        q = qkv[..., :heads * hd].view(b, 1, heads, hd).transpose(1, 2)  # a strided view, as a step has
        kv = torch.randn(2, b, kv_heads, slots, hd, device="cuda", dtype=dtype, generator=g)
        pos = torch.randint(0, slots, (b,), device="cuda", generator=g)
        causal = (torch.arange(slots, device="cuda")[None] <= pos[:, None])[:, None, None]
        ring = torch.rand(b, 1, 1, slots, device="cuda", generator=g) < 0.2
        ring[..., 0] = True
        # a step's self-attention, rope and the cache write in the kernel (every form, deterministic routing)
        k, v = (qkv[..., (heads + i * kv_heads) * hd:(heads + (i + 1) * kv_heads) * hd]
                .view(b, 1, kv_heads, hd).transpose(1, 2) for i in (0, 1))
        angles = pos.float()[:, None] * torch.rand(hd // 4, device="cuda", generator=g)
        rope = tuple(f(torch.cat((angles, angles), -1))[:, None, None] for f in (torch.cos, torch.sin))
        ref_kv = kv.float()
        ref = reference_cached(q.float(), k.float(), v.float(), rope, ref_kv, None, pos[:, None], causal)
        with mock.patch.object(decode_attention, "reference_cached", None):  # the kernel, not its fallback
            out = decode_attention.cached_attention(q, k, v, rope, kv, None, pos[:, None], causal, deterministic=True)
        torch.testing.assert_close(out.float(), ref, atol=2e-2, rtol=2e-2)
        torch.testing.assert_close(kv.float(), ref_kv, atol=2e-2, rtol=2e-2)
        for keep in (causal, ring):
            ref = sdpa(q.float(), kv[0].float(), kv[1].float(), keep)
            out = decode_attention.decode_attention(q, kv[0], kv[1], keep)
            assert out.shape == ref.shape and out.dtype == dtype
            torch.testing.assert_close(out.float(), ref, atol=2e-2, rtol=2e-2)
            # the routing rule, without relying on two SDPA calls being bitwise equal (not guaranteed)
            with mock.patch.object(decode_attention, "reference", lambda *a: "sdpa"):
                routed = decode_attention.attention(q, kv[0], kv[1], keep)
            if not decode_attention.takes(b, heads, kv_heads):
                assert heads == kv_heads and b * kv_heads > decode_attention.ROWS and isinstance(routed, str)
            else:
                assert torch.equal(routed, out)
            # a self-attention step: full heads above CACHED_ROWS per step are the kernel's again
            with mock.patch.object(decode_attention, "reference_cached", lambda *a: "sdpa"):
                routed = decode_attention.cached_attention(q, k, v, rope, kv.clone(), None, pos[:, None], keep)
            on_kernel = heads != kv_heads or not decode_attention.ROWS < b * kv_heads <= decode_attention.CACHED_ROWS
            assert decode_attention.takes(b, heads, kv_heads, cached=True) == on_kernel
            assert isinstance(routed, str) != on_kernel
            static = op(q, kv[0], kv[1], keep)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                static = op(q, kv[0], kv[1], keep)
            for _ in range(3):
                kv.normal_(generator=g)
                graph.replay()
                torch.testing.assert_close(static.float(), sdpa(q.float(), kv[0].float(), kv[1].float(), keep),
                                           atol=2e-2, rtol=2e-2)
    two = torch.randn(1, 4, 2, 64, device="cuda", dtype=dtype)
    keys = torch.randn(1, 4, 10, 64, device="cuda", dtype=dtype)
    keep = torch.ones(1, 1, 2, 10, dtype=torch.bool, device="cuda")
    assert torch.equal(decode_attention.attention(two, keys, keys, keep), sdpa(two, keys, keys, keep))


@pytest.mark.parametrize("batch", [1, 3])
def test_gemv_step_equals_cublas_step(batch):
    """Decoding (one-row matmuls with their norms, activations and residual adds on the GEMV kernel,
    compiled and graphed with programmatic dependent launch) gives the tokens of the same engine with
    cuBLAS matmuls, and logits within bf16 rounding: GQA, a cross window; 3 rows on the 2-64-row GEMM."""
    from megatron_stag.serving import gemv
    from megatron_stag.serving.convert import to_plain_model
    from megatron_stag.serving.engine import StaggeredGenerator
    from megatron_stag.serving.sampling import SamplingParams
    from tests.model_factory import tiny_model

    if not gemv.available(torch.device("cuda")):
        pytest.skip("the kernel needs Hopper or later")
    plain = to_plain_model(tiny_model(hidden_size=256, num_attention_heads=4, num_query_groups=2,
                                      stag_cross_window=4, position_embedding_type="rope"),
                           None, device="cuda").to(torch.bfloat16)
    params = SamplingParams(max_new_tokens=12)
    prompts = [[5, 9, 2, 33, 7], [1, 2, 3], [8, 8, 8, 8]][:batch]
    runs = [StaggeredGenerator(plain, max_len=24, batch=batch, kernels=on).generate(prompts, params,
                                                                                  keep_logits=True)
            for on in (True, False)]
    assert runs[0].tokens == runs[1].tokens
    assert (runs[0].step_logits.float() - runs[1].step_logits.float()).abs().max() <= 0.1
