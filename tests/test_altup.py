"""AltUp invariants on one process: the baseline reduction, the equations (against plain-PyTorch
re-implementations written here), the schedule, Sequence-AltUp causality, MoE, and bad configs."""

import pytest
import torch

from megatron.core.transformer.transformer_layer import TransformerLayer

from tests.model_factory import assert_causal, batch, tiny_config, tiny_model

pytestmark = pytest.mark.usefixtures("megatron_world")


def _layer(layer, x):
    """The wrapped megatron layer itself (what AltUp calls L), without predict/correct."""
    return TransformerLayer.forward(layer, x, attention_mask=None)[0]


def _logits(model, h):
    return model.output_layer(h)[0].transpose(0, 1)


@pytest.mark.parametrize("k", [2, 4])
@pytest.mark.parametrize("sections", [1, 2])
def test_identity_init_recycled_equals_baseline(k, sections):
    """P = I, g = 1 and recycled embeddings: every block is the baseline's hidden state, so the
    model equals the baseline at step 0 for any K (catches a wrong init or stream bookkeeping)."""
    kw = dict(stag_sections=sections)
    altup = tiny_model(altup_identity=True, altup_blocks=k, altup_output="mean", **kw)
    base = tiny_model(**kw)
    base.load_state_dict({n.replace("final_layernorm.norm.", "final_layernorm."): v
                          for n, v in altup.state_dict().items() if ".altup." not in n})
    ids, pos = batch()
    with torch.no_grad():
        torch.testing.assert_close(altup(ids, pos), base(ids, pos), atol=1e-5, rtol=0)


def test_k1_adds_nothing():
    """altup_blocks = 1 is the plain model: same parameters, same outputs (megatron's GPT, tested
    bit for bit in test_stagformer_model)."""
    a, b = tiny_model(stag_sections=1, altup_blocks=1), tiny_model(stag_sections=1)
    assert a.state_dict().keys() == b.state_dict().keys()
    ids, pos = batch()
    with torch.no_grad():
        assert torch.equal(a(ids, pos), b(ids, pos))


@pytest.mark.parametrize("kw", [
    dict(altup_blocks=2),
    dict(altup_blocks=3, altup_embedding="widened", altup_output="learned"),
    dict(altup_blocks=4, altup_schedule="fixed", altup_fixed_block=2, altup_output="mean"),
])
def test_standard_equations(kw):
    """AltUp GPT == the paper's equations written out block by block (non-identity coefficients)."""
    model = tiny_model(stag_sections=1, **kw)
    cfg, ids, pos = model.config, *batch()
    k = cfg.altup_blocks
    with torch.no_grad():
        e = model.embedding(input_ids=ids, position_ids=pos)
        if cfg.altup_embedding == "widened":
            extra = model.altup_widening.extra_embeddings.weight[ids].transpose(0, 1)
            x = [e] + list(extra.chunk(k - 1, dim=-1))
        else:
            x = [e] * k
        for index, layer in enumerate(model.blocks[0].layers):
            j = index % k if cfg.altup_schedule == "alternating" else cfg.altup_fixed_block
            p, g = layer.altup.prediction, layer.altup.correction
            pred = [sum(p[i, m] * x[m] for m in range(k)) for i in range(k)]
            y = _layer(layer, x[j])  # the layer reads the old active block
            x = [pred[i] + g[i] * (y - pred[j]) for i in range(k)]
        head = model.blocks[0].final_layernorm
        if cfg.altup_output == "learned":
            out = torch.cat(x, -1) @ head.weight.t()
        else:
            out = sum(x) / (k if cfg.altup_output == "mean" else 1)
        ref = _logits(model, head.norm(out))
        torch.testing.assert_close(model(ids, pos), ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kw", [dict(altup_blocks=2), dict(altup_blocks=3, altup_embedding="widened",
                                                            altup_output="learned", stag_sections=2),
                                dict(altup_blocks=4, altup_schedule="fixed", altup_fixed_block=3)])
def test_fused_path_equals_two_steps(kw):
    """altup_compile's path (layers/altup_triton.py; on CPU its equations in torch) recomputes the
    prediction inside correct and hands the stream's gradient from correct's backward to predict's:
    logits, loss and every gradient equal the two-step predict/correct (catches a lost or doubled
    part of the stream's gradient)."""
    ids, pos = batch()
    results = []
    for fused in (False, True):
        model = tiny_model(altup_compile=fused, **kw).train()
        loss = model(ids, pos, labels=ids).mean()
        loss.backward()
        results.append((loss.detach(), {n: p.grad for n, p in model.named_parameters()}))
    (l0, g0), (l1, g1) = results
    torch.testing.assert_close(l1, l0, atol=1e-6, rtol=1e-6)
    assert g0.keys() == g1.keys()
    for name in g0:
        torch.testing.assert_close(g1[name], g0[name], atol=1e-6, rtol=1e-5, msg=name)


def check_fused_against_equations(loss, k=3, schedule=(0, 2, 1), s=5, b=2, d=8, device="cpu",
                                  dtype=torch.float32):
    """Two layers through layers/altup_triton.py: the second layer's input is the block the first
    correct wrote out, and the values and every gradient (stream, P, g of both layers) equal the
    equations' in plain torch (fp32), whichever way the loss reads the layers."""
    from megatron_stag.layers import altup_triton
    from megatron_stag.layers.altup_stream import written_block

    torch.manual_seed(0)
    cast = dict(device=device, dtype=dtype)
    init = [torch.randn(s, b, k * d)] + [t for _ in range(2) for t in (torch.eye(k) + 0.3 * torch.randn(k, k),
                                                                       1 + 0.3 * torch.randn(k))]
    init = [t.to(**cast) for t in init]
    w = [(torch.randn(d, d) / d ** 0.5).to(**cast) for _ in range(2)]
    up = torch.randn(s, b, k * d).to(**cast)

    def run(fused):
        stream, p1, g1, p2, g2 = (t.clone().requires_grad_() for t in init)
        h, ys = stream, []
        for p, g, a, nxt, wl in ((p1, g1, schedule[0], schedule[1], w[0]), (p2, g2, schedule[1], schedule[2], w[1])):
            if fused:
                x_in, state = altup_triton.predict(p, h, k, a)
                if h is not stream:
                    assert x_in is written_block(h, a), "the block the last correct wrote is the input"
            else:
                h = h.float()
                x_in = h.unflatten(-1, (k, d))[..., a, :]
            y = x_in + torch.tanh(x_in @ wl.to(x_in.dtype))
            ys.append(y)
            if fused:
                h = altup_triton.correct(g, state, y, a, nxt)
            else:
                pred = torch.einsum("ij,sbjd->sbid", p.float(), h.unflatten(-1, (k, d)))
                h = (pred + g.float()[:, None] * (y - pred[..., a, :])[..., None, :]).flatten(-2)
        h32, up32 = h.float(), up.float()
        value = {"stream": (h32 * up32).sum(), "second layer's input only": ys[1].float().pow(2).sum(),
                 "stream and another reader": (h32 * up32).sum() + h32.pow(2).sum() + ys[0].float().sum()}[loss]
        value.backward()
        return h.detach(), stream.grad, p1.grad, g1.grad, p2.grad, g2.grad

    # fp32: to rounding; bf16 (two layers of bf16 activations and grads against fp32): to 4% of the largest entry
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=4e-2, rtol=0)
    names = ("out", "d stream", "d P1", "d g1", "d P2", "d g2")
    for name, got, want in zip(names, run(True), run(False)):
        if want is None:
            assert got is None or not got.any(), name
            continue
        scale = want.float().abs().max().clamp(min=1).item()
        torch.testing.assert_close(got.float() / scale, want.float() / scale, **tol,
                                   msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("loss", ["stream", "second layer's input only", "stream and another reader"])
def test_fused_kernels_against_equations(loss):
    """The fused path's autograd structure on CPU (its torch equations); the kernels: test_gpu."""
    check_fused_against_equations(loss)


def _rms_norm(x, weight, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def _rescale(x, target):
    rms = lambda t: t.pow(2).mean(-1, keepdim=True).sqrt()  # noqa: E731
    return x * rms(target) / rms(x)


def test_gemma3n_equations():
    """Gemma 3n form == its equations: router m = tanh(W_r RMSNorm(x) / d), P = I + W_p m,
    the layer on the predicted block 0, g = 1 + W_c m(y); projected widening and collapse."""
    model = tiny_model(stag_sections=1, altup_blocks=4, altup_form="gemma3n", altup_schedule="fixed",
                       altup_embedding="projected", altup_output="projected", altup_coef_clip=0.2)
    cfg, ids, pos = model.config, *batch()
    k, d = 4, cfg.hidden_size
    with torch.no_grad():
        e = model.embedding(input_ids=ids, position_ids=pos)
        x = [e] + [_rescale(e @ w.t(), e) for w in model.altup_widening.projections]
        for layer in model.blocks[0].layers:
            a = layer.altup
            router = lambda t: torch.tanh(  # noqa: E731
                (_rms_norm(t, a.router_norm.weight, cfg.layernorm_epsilon) / d) @ a.router.t())
            wp, wc = a.prediction.clamp(-0.2, 0.2), a.correction.clamp(-0.2, 0.2)
            coef = (router(x[0]) @ wp.t()).unflatten(-1, (k, k))  # [s, b, K, K]
            pred = [x[i] + sum(coef[..., i, m, None] * x[m] for m in range(k)) for i in range(k)]
            y = _layer(layer, pred[0])
            g = 1 + router(y) @ wc.t()
            x = [pred[i] + g[..., i, None] * (y - pred[0]) for i in range(k)]
        head = model.blocks[0].final_layernorm
        blocks = [x[0]] + [_rescale(x[i + 1] @ w.t(), x[0]) for i, w in enumerate(head.projections)]
        ref = _logits(model, head.norm(sum(blocks) / k))
        torch.testing.assert_close(model(ids, pos), ref, atol=1e-5, rtol=1e-5)
    assert any((a.abs() > 0.2).any() for a in [layer.altup.prediction for layer in model.blocks[0].layers]), \
        "the clip must be active somewhere for this test to check it"


@pytest.mark.parametrize("sections,k,expected", [(1, 3, [0, 1, 2, 0]), (2, 2, [0, 1, 0, 0, 1, 0])])
def test_alternating_schedule(sections, k, expected):
    """Layer l of a section computes block l mod K: the tensor entering the layer's norm is exactly
    that block of the stream it received."""
    model = tiny_model(stag_sections=sections, num_layers=len(expected), altup_blocks=k,
                       altup_embedding="widened")  # distinct blocks from the first layer on
    seen = []
    for block in model.blocks:
        for layer in block.layers:
            def hook(mod, args, kwargs, layer=layer):
                stream = kwargs["hidden_states"].unflatten(-1, (k, -1))
                captured = {}
                handle = layer.input_layernorm.register_forward_pre_hook(
                    lambda m, a: captured.setdefault("x", a[0]))
                seen.append((stream, captured, handle))
            layer.register_forward_pre_hook(hook, with_kwargs=True)
    with torch.no_grad():
        model(*batch())
    active = []
    for stream, captured, handle in seen:
        handle.remove()
        active.append([j for j in range(k) if torch.equal(stream[..., j, :], captured["x"])])
    assert active == [[j] for j in expected]


def test_sequence_altup_equations_and_anchor_count():
    """One Sequence-AltUp layer == its equations; the wrapped layer runs on s/k anchor tokens."""
    model = tiny_model(stag_sections=1, altup_sequence_stride=3)
    layer = model.blocks[0].layers[1]  # offset 1: tokens 0 has no anchor
    s, b, d = 10, 2, model.config.hidden_size
    x = torch.randn(s, b, d, generator=torch.Generator().manual_seed(3))
    sizes = []
    handle = layer.input_layernorm.register_forward_pre_hook(lambda m, a: sizes.append(a[0].shape[0]))
    with torch.no_grad():
        got = layer(hidden_states=x, attention_mask=None)[0]
        handle.remove()
        alpha, beta, gamma = layer.sequence_altup
        anchors = [1, 4, 7]
        y = _layer(layer, x[anchors])
        ref = x.clone()
        for i in range(1, s):
            a = (i - 1) // 3
            pred = alpha * x[i] + beta * x[anchors[a]]
            ref[i] = pred + gamma * (y[a] - (alpha + beta) * x[anchors[a]])
    assert sizes == [3]
    torch.testing.assert_close(got, ref, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("kw", [dict(altup_sequence_stride=2), dict(altup_sequence_stride=3),
                                dict(altup_blocks=2, num_moe_experts=4, moe_router_topk=2,
                                     add_bias_linear=False)])
def test_causality(kw):
    """Changing token t leaves logits < t unchanged (Sequence-AltUp reads only anchors at or before
    a token; AltUp with MoE routes per token)."""
    model = tiny_model(stag_sections=1, **kw)
    for t in (4, 7):
        assert_causal(model, t)


def test_moe_gradients_reach_experts_and_coefficients():
    model = tiny_model(stag_sections=1, altup_blocks=2, num_moe_experts=4, moe_router_topk=2,
                       add_bias_linear=False).train()
    ids, pos = batch()
    model(ids, pos, labels=ids).mean().backward()
    names = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum()]
    assert not [n for n in names if "local_experts" not in n], names  # top-2 of 4 may skip an expert
    assert any("router" in n for n, _ in model.named_parameters())


@pytest.mark.parametrize("kw,field", [
    (dict(altup_blocks=0), "altup_blocks"),
    (dict(altup_blocks=2.0), "altup_blocks"),
    (dict(altup_sequence_stride=0), "altup_sequence_stride"),
    (dict(altup_blocks=2, altup_sequence_stride=2), "altup_sequence_stride"),
    (dict(altup_blocks=2, altup_schedule="random"), "altup_schedule"),
    (dict(altup_blocks=2, altup_fixed_block=2), "altup_fixed_block"),
    (dict(altup_blocks=4, altup_form="gemma3n"), "altup_form='gemma3n'"),
    (dict(altup_blocks=1, altup_form="gemma3n"), "altup_form='gemma3n'"),
    (dict(altup_blocks=2, altup_coef_clip=10.0), "altup_coef_clip"),
    (dict(altup_blocks=2, altup_embedding="projected"), "altup_embedding='projected'"),
    (dict(altup_output="mean"), "altup_blocks >= 2"),
    (dict(altup_sequence_stride=2, stag_sections=2), "altup_sequence_stride=2"),
    (dict(altup_sequence_stride=2, stag_sections=1, sequence_parallel=True,
          tensor_model_parallel_size=2), "sequence_parallel"),
    (dict(altup_blocks=2, num_moe_experts=4), "add_bias_linear"),
])
def test_bad_configs_name_the_field(kw, field):
    from megatron_stag.config.altup_config import AltUpConfigError
    from megatron_stag.config.stagformer_config import StagConfigError

    with pytest.raises((AltUpConfigError, StagConfigError), match=field.replace("(", r"\(")):
        tiny_config(**kw)


def test_altup_flags_round_trip():
    """Every altup_* config field has a flag and parses back into config keyword arguments."""
    import argparse

    from megatron_stag.config.cli_args import add_stagformer_args, stagformer_kwargs

    parser = add_stagformer_args(argparse.ArgumentParser())
    args = parser.parse_args(["--altup-blocks", "4", "--altup-form", "gemma3n", "--altup-schedule",
                              "fixed", "--altup-embedding", "projected", "--altup-output", "projected",
                              "--altup-coef-clip", "120", "--stag-sections", "2"])
    kw = stagformer_kwargs(args)
    cfg = tiny_config(**kw)
    assert (cfg.altup_blocks, cfg.altup_form, cfg.altup_coef_clip, cfg.stag_sections) == (4, "gemma3n", 120.0, 2)
    assert "altup_first_layer" not in kw
    with pytest.raises(SystemExit):
        parser.parse_args(["--altup-output", "median"])
