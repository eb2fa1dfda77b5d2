"""Export to plain PyTorch, DeepSpeed's InferenceEngine, and staggered decoding under DeepSpeed.

Reference everywhere: megatron's StagFormerModel forward (fp32). The exported model must give the same
logits for every variant; DeepSpeed's engine (tp 1 and 2, AutoTP by name) the exported model's;
staggered decoding (one rank, one section per rank, sections x TP) the teacher-forced logits.
No DeepSpeed op is compiled: the engine marks the CPU shared-memory op unavailable (gloo instead).
"""

import json
import os

import pytest
import torch
import torch.nn.functional as F

from tests.deepspeed_workers import engine_logits, staggered_decode
from tests.dist_helpers import run_ranks
from tests.model_factory import MAX_LEN, VOCAB, batch, tiny_model

pytest.importorskip("deepspeed")

TOL = 1e-5  # fp32; observed 0 (same kernels) for the export and ~1e-7 under TP=2

VARIANTS = {
    "gpt": dict(stag_sections=1),
    "stag": {},
    "shared": dict(stag_shared_weights=True),
    "window1": dict(stag_cross_window=1),
    "window4-rope": dict(stag_cross_window=4, position_embedding_type="rope"),
    "p3-combine": dict(stag_sections=3, num_layers=6, stag_output="combine"),
    "gqa-swiglu-rmsnorm-nobias": dict(num_query_groups=2, gated_linear_unit=True, activation_func=F.silu,
                                      bias_activation_fusion=False, normalization="RMSNorm",
                                      add_bias_linear=False),
    "altup2": dict(altup_blocks=2),
    "altup3-widened-learned": dict(altup_blocks=3, altup_embedding="widened", altup_output="learned"),
    "altup-gemma3n": dict(altup_blocks=2, altup_output="projected", altup_embedding="projected",
                          altup_form="gemma3n", altup_schedule="fixed", altup_coef_clip=0.5,
                          position_embedding_type="rope"),
    "stag-shared-altup": dict(altup_blocks=2, stag_shared_weights=True, altup_output="mean"),
}


def plain_of(megatron_world, **kw):
    from megatron_stag.serving.convert import to_plain_model

    model = tiny_model(**kw)
    return model, to_plain_model(model, None)


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_exported_logits_equal_megatron(megatron_world, name):
    model, plain = plain_of(megatron_world, **VARIANTS[name])
    ids, pos = batch()
    with torch.no_grad():
        ref, out = model(ids, pos), plain(ids)
    assert (ref - out).abs().max() <= TOL
    for module in plain.modules():  # torch modules (nn.Linear, norms, embeddings) and plain_model's
        assert type(module).__module__.startswith(("torch.", "megatron_stag.serving.model"))


def _decode_vs_forward(plain, prompts, gen, max_new=6):
    from megatron_stag.serving.sampling import SamplingParams

    result = gen.generate(prompts, SamplingParams(max_new_tokens=max_new), keep_logits=True)
    worst = 0.0
    for r, prompt in enumerate(prompts):
        seq = torch.tensor([prompt + result.tokens[r]])
        with torch.no_grad():
            ref = plain(seq)[0]
        n = len(prompt)
        worst = max(worst, (ref[n - 1] - result.prompt_logits[r]).abs().max().item())
        steps = result.step_logits[:, r]
        worst = max(worst, (ref[n:n + len(steps)] - steps).abs().max().item())
    return worst, result


PROMPTS = [[3, 5, 7, 9, 11], [2, 4], [8, 1, 6, 6, 2, 9, 13, 5]]  # mixed lengths in one batch


@pytest.mark.parametrize("name", ["stag", "shared", "window1", "window4-rope", "p3-combine", "altup-gemma3n",
                                  "gqa-swiglu-rmsnorm-nobias"])
def test_plain_staggered_decode_equals_forward(megatron_world, name):
    from megatron_stag.serving.engine import StaggeredGenerator

    _, plain = plain_of(megatron_world, **VARIANTS[name])
    worst, _ = _decode_vs_forward(plain, PROMPTS, StaggeredGenerator(plain, MAX_LEN, batch=3))
    assert worst <= TOL


def test_plain_recurrent_mode(megatron_world):
    from megatron_stag.serving.engine import StaggeredGenerator
    from megatron_stag.serving.sampling import SamplingParams

    _, plain = plain_of(megatron_world, stag_shared_weights=True)
    params = SamplingParams(max_new_tokens=8)

    def run(recurrent):
        gen = StaggeredGenerator(plain, MAX_LEN, batch=1, recurrent=recurrent)
        return gen.generate([PROMPTS[0]], params, keep_logits=True)

    normal, rec, again = run(False), run(True), run(True)
    assert torch.equal(normal.prompt_logits[0], rec.prompt_logits[0])  # the prompt: both passes
    assert not torch.allclose(normal.step_logits, rec.step_logits)  # afterwards: its own outputs
    assert torch.equal(rec.step_logits, again.step_logits) and rec.tokens == again.tokens
    with pytest.raises(ValueError, match="recurrent=True needs shared weights"):
        StaggeredGenerator(plain_of(megatron_world)[1], MAX_LEN, batch=1, recurrent=True)


def _package(plain, path):
    from safetensors.torch import save_model

    path.mkdir()
    plain.cfg.save(path / "config.json")
    save_model(plain, str(path / "model.safetensors"))
    return path


@pytest.mark.parametrize("name", ["stag", "altup-gemma3n"])
def test_deepspeed_engine_matches_exported_model_tp1_tp2(megatron_world, tmp_path, name):
    _, plain = plain_of(megatron_world, **VARIANTS[name])
    package = _package(plain, tmp_path / "pkg")
    ids, _ = batch()
    torch.save(ids, tmp_path / "ids.pt")
    with torch.no_grad():
        ref = plain(ids)
    for tp in (1, 2):
        out = tmp_path / f"tp{tp}"
        out.mkdir()
        run_ranks(engine_logits, tp, str(package), str(tmp_path / "ids.pt"), str(out))
        for r in range(tp):
            got = torch.load(out / f"rank{r}.pt")
            assert (got["logits"] - ref).abs().max() <= TOL
            q = plain.sections[0].layers[0].self_attn.q_proj.weight.shape
            assert got["shards"]["sections.0.layers.0.self_attn.q_proj.weight"] == (q[0] // tp, q[1])


@pytest.mark.parametrize("name,tp", [("stag", 1), ("p3", 1), ("p3-combine", 1), ("window4-rope", 2), ("gpt", 2)])
def test_deepspeed_one_section_per_rank_equals_single_rank(megatron_world, tmp_path, name, tp):
    """Ranks of sections before the last send the next section its entries' keys and values (output
    'last'; tp 2: split by heads like the receiving section's own) or their output ('combine'). 'gpt'
    tp 2: one section tensor-parallel over both ranks, the two-GPU baseline of `decode_engine`."""
    from megatron_stag.serving.engine import StaggeredGenerator
    from megatron_stag.serving.sampling import SamplingParams

    _, plain = plain_of(megatron_world, **dict(VARIANTS, p3=dict(stag_sections=3, num_layers=6))[name])
    package = _package(plain, tmp_path / "pkg")
    params = dict(max_new_tokens=6, temperature=0.8, top_k=20, seed=3)
    single = StaggeredGenerator(plain, MAX_LEN, batch=3).generate(
        PROMPTS, SamplingParams(**params), keep_logits=True)
    world = plain.cfg.sections * tp
    run_ranks(staggered_decode, world, str(package), tp, PROMPTS, params, str(tmp_path))
    sampler = torch.load(tmp_path / f"rank{(plain.cfg.sections - 1) * tp}.pt")
    assert (sampler["step_logits"] - single.step_logits).abs().max() <= TOL
    for r in range(world):
        got = torch.load(tmp_path / f"rank{r}.pt")
        assert got["tokens"] == single.tokens
        assert got["projects_next_entries"] == (plain.cfg.output == "last" and r // tp < plain.cfg.sections - 1)


def test_one_section_per_rank_needs_the_next_entry_projections(megatron_world):
    from megatron_stag.serving.engine import StaggeredGenerator, SectionPlacement

    _, plain = plain_of(megatron_world, **VARIANTS["stag"])
    with pytest.raises(ValueError, match=r"keep_sections\(\[0\]\)"):
        StaggeredGenerator(plain, MAX_LEN, batch=1, placement=SectionPlacement(2, 1, 0))


def test_export_refuses_unsupported_and_checks_tp(megatron_world):
    from megatron_stag.serving.deepspeed import check_tensor_parallel
    from megatron_stag.serving.convert import ExportError, check_exportable
    from megatron_stag.models.model_args import ModelArgs

    base = dict(vocab_size=VOCAB, max_sequence_length=MAX_LEN, num_layers=4, hidden_size=32,
                num_attention_heads=4)
    check_exportable(ModelArgs(**base, num_moe_experts=4))  # MoE exports (dense experts in the serving model)
    with pytest.raises(ExportError, match="moe_router_topk=5 exceeds num_moe_experts=4"):
        check_exportable(ModelArgs(**base, num_moe_experts=4, moe_router_topk=5))
    with pytest.raises(ExportError, match="altup_sequence_stride=2"):
        check_exportable(ModelArgs(**base, altup_blocks=2, altup_sequence_stride=2))
    _, plain = plain_of(megatron_world)
    with pytest.raises(ValueError, match="--tp 3 does not divide the model's num_attention_heads=4"):
        check_tensor_parallel(plain.cfg, 3)


def test_export_from_a_tp2_checkpoint(megatron_world, tmp_path):
    """A checkpoint saved at TP=2 exports (torch_dist reshards on load) to the TP=1 model's logits."""
    from megatron_stag.checkpointing.checkpoint_io import load_model_weights
    from megatron_stag.serving.convert import ExportError, export_checkpoint
    from megatron_stag.serving.model import load_plain_model
    from megatron_stag.models.model_args import ModelArgs
    from tests.parallel_workers import SEQ, train_step

    stag = dict(stag_sections=2, num_query_groups=2)
    run = tmp_path / "run"
    run_ranks(train_step, 2, 2, 1, stag, None, str(run))  # saves run/ckpt at TP=2
    (run / "ckpt").rename(run / "iter_0000001")  # a pretrain save folder's layout
    (run / "latest_checkpointed_iteration.txt").write_text("1")
    args = ModelArgs(vocab_size=VOCAB, max_sequence_length=SEQ, num_layers=4, hidden_size=32,
                     num_attention_heads=4, num_query_groups=2, stag_sections=2,
                     share_embeddings_and_output_weights=False)
    args.save(run / "model_args.json")
    package = export_checkpoint(run, tmp_path / "pkg")
    assert sorted(p.name for p in package.iterdir()) == ["config.json", "model.safetensors"]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".pkg")] == []  # no temporary left
    model = args.build(args.config()).eval()
    load_model_weights(model, run)
    ids, pos = batch(s=SEQ)
    with torch.no_grad():
        assert (model(ids, pos) - load_plain_model(package)(ids)).abs().max() <= TOL
    with pytest.raises(ExportError, match="exists"):
        export_checkpoint(run, package)
    assert json.loads((package / "config.json").read_text())["section_layers"] == [2, 2]
    assert os.path.getsize(package / "model.safetensors") > 0
