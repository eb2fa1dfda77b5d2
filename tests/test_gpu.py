"""GPU-only checks (skipped on CPU machines; run on the device machines): the CPU adapter stays
inert, and CUDA-graph decode steps stay exact."""

import pytest
import torch

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
    from megatron_stag.inference.sampling import SamplingParams
    from megatron_stag.inference.staggered_generation import StaggeredGenerator
    from tests.model_factory import tiny_model

    torch.backends.cuda.matmul.allow_tf32 = False
    model = tiny_model(**variant).cuda()
    prompts = [[5, 9, 2, 33, 7], [1, 2, 3]]
    gen = StaggeredGenerator(model, max_len=24, batch=2, cuda_graph=True)
    result = gen.generate(prompts, SamplingParams(max_new_tokens=10), keep_logits=True)
    for r, prompt in enumerate(prompts):
        full = prompt + result.tokens[r]
        with torch.no_grad():
            ref = model(torch.tensor([full], device="cuda"),
                        torch.arange(len(full), device="cuda")[None])[0]
        torch.testing.assert_close(result.step_logits[:, r], ref[len(prompt): len(full) - 1],
                                   atol=1e-4, rtol=0)


@pytest.mark.parametrize("kw", [dict(altup_blocks=2), dict(altup_blocks=4, altup_form="gemma3n",
                                altup_schedule="fixed", altup_embedding="projected",
                                altup_output="projected", altup_coef_clip=0.2)])
def test_compiled_altup_equals_eager(kw):
    """altup_compile fuses predict/correct (Triton kernels for the standard form, torch.compile for
    Gemma 3n's): same loss and gradients as eager."""
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
    from megatron_stag.deepspeed_inference.engine import init_deepspeed_engine
    from megatron_stag.deepspeed_inference.staggered_decoding import PlainStaggeredGenerator
    from megatron_stag.export.megatron_export import to_plain_model
    from megatron_stag.inference.sampling import SamplingParams
    from tests.model_factory import tiny_model

    torch.backends.cuda.matmul.allow_tf32 = False
    plain = to_plain_model(tiny_model(**variant), None, device="cuda")
    engine = init_deepspeed_engine(plain)
    prompts = [[5, 9, 2, 33, 7], [1, 2, 3]]
    gen = PlainStaggeredGenerator(engine.module, max_len=24, batch=2, cuda_graph=True, compile=compile)
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


@pytest.mark.parametrize("k,active,dtype", [(2, 0, torch.float32), (2, 1, torch.bfloat16), (3, 2, torch.float32),
                                            (4, 1, torch.float32), (4, 3, torch.bfloat16)])
def test_altup_triton_kernels_match_the_equations(k, active, dtype):
    """layers/altup_triton.py: predict -> a layer -> correct, values and every gradient (stream, P, g,
    the layer's input) against the equations in plain torch; sizes not multiples of the tiles."""
    from megatron_stag.layers import altup_triton

    torch.manual_seed(0)
    s, b, d = 37, 3, 200
    stream0 = torch.randn(s, b, k * d, device="cuda", dtype=dtype)
    p0 = (torch.eye(k) + 0.3 * torch.randn(k, k)).to("cuda", dtype)
    g0 = (1 + 0.3 * torch.randn(k)).to("cuda", dtype)
    w = torch.randn(d, d, device="cuda", dtype=dtype) / d ** 0.5
    up = torch.randn(s, b, k * d, device="cuda", dtype=dtype)

    def run(fused):
        stream, p, g = (t.clone().requires_grad_() for t in (stream0, p0, g0))
        if fused:
            x_in, pred = altup_triton.predict(p, stream, k, active)
        else:
            x = stream.float().unflatten(-1, (k, d))
            pred = torch.einsum("ij,sbjd->sbid", p.float(), x)
            x_in, pred = x[..., active, :].to(dtype), pred.to(dtype)
        y = x_in + torch.tanh(x_in @ w)
        if fused:
            out = altup_triton.correct(g, pred, y, active)
        else:
            innovation = y.float() - pred[..., active, :].float()
            out = (pred.float() + g.float()[:, None] * innovation[..., None, :]).flatten(-2).to(dtype)
        (out.float() * up.float()).sum().backward()
        return out, stream.grad, p.grad, g.grad

    tol = dict(atol=1e-4, rtol=1e-4) if dtype == torch.float32 else dict(atol=5e-2, rtol=2e-2)
    for name, got, want in zip(("out", "d stream", "d P", "d g"), run(True), run(False)):
        scale = want.float().abs().max().item() if name in ("d P", "d g") else 1.0
        torch.testing.assert_close(got.float() / scale, want.float() / scale, **tol, msg=name)
