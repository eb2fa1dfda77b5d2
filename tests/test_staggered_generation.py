"""Staggered decoding equals the teacher-forced forward (exact decoding), for every variant."""

import pytest
import torch

from megatron_stag.inference.sampling import SamplingParams
from megatron_stag.inference.staggered_generation import StaggeredGenerator
from tests.model_factory import tiny_model

pytestmark = pytest.mark.usefixtures("megatron_world")

# fp32; decode computes attention over cached keys with its own SDPA calls while the forward uses
# the full-sequence kernels: agreement to ~1e-6 is expected, 1e-4 still fails on any wrong entry.
ATOL = 1e-4

VARIANTS = {
    "p2-separate": dict(),
    "p2-shared": dict(stag_shared_weights=True),
    "p2-shared-rope": dict(stag_shared_weights=True, position_embedding_type="rope"),
    "p2-window1": dict(stag_cross_window=1),
    "p2-window4": dict(stag_cross_window=4),
    "p3-combine": dict(stag_sections=3, num_layers=6, stag_output="combine"),
    "p2-rope-gqa": dict(position_embedding_type="rope", num_query_groups=2),
    "p1-gpt": dict(stag_sections=1, num_layers=2),
    "p1-altup-k2": dict(stag_sections=1, altup_blocks=2),
    "p1-altup-gemma3n-rope": dict(stag_sections=1, altup_blocks=4, altup_form="gemma3n",
                                  altup_schedule="fixed", altup_embedding="projected",
                                  altup_output="projected", position_embedding_type="rope"),
    "p1-altup-moe": dict(stag_sections=1, altup_blocks=2, num_moe_experts=4, moe_router_topk=2,
                         add_bias_linear=False),
    "p2-altup-widened-learned": dict(altup_blocks=3, altup_embedding="widened", altup_output="learned"),
    "p2-shared-altup": dict(stag_shared_weights=True, altup_blocks=2),
}


def _teacher_forced(model, sequence):
    ids = torch.tensor([sequence])
    with torch.no_grad():
        return model(ids, torch.arange(len(sequence))[None])[0]


@pytest.mark.parametrize("name", list(VARIANTS))
def test_decode_logits_equal_forward(name):
    model = tiny_model(**VARIANTS[name])
    prompts = [[5, 9, 2, 33, 7], [1, 2, 3], [60, 61, 62, 63, 0, 1, 2]]  # mixed lengths in one batch
    params = SamplingParams(max_new_tokens=9, temperature=0.8, top_k=20, seed=3)
    gen = StaggeredGenerator(model, max_len=16, batch=len(prompts))
    result = gen.generate(prompts, params, keep_logits=True)
    for r, prompt in enumerate(prompts):
        full = prompt + result.tokens[r]
        ref = _teacher_forced(model, full)
        torch.testing.assert_close(result.prompt_logits[r], ref[: len(prompt)], atol=ATOL, rtol=0)
        steps = result.step_logits[:, r]  # logits at positions len(prompt) .. len(full) - 2
        torch.testing.assert_close(steps, ref[len(prompt): len(full) - 1], atol=ATOL, rtol=0)


def test_window_bounds_cross_cache():
    """The cross cache has W slots whatever the context length (bounded memory)."""
    model = tiny_model(stag_cross_window=4)
    small = StaggeredGenerator(model, max_len=16, batch=1)
    large = StaggeredGenerator(model, max_len=32, batch=1)
    assert small.decoders[1].ck[0].shape == large.decoders[1].ck[0].shape
    assert large.decoders[1].ck[0].shape[2] == 4
    full = StaggeredGenerator(tiny_model(), max_len=32, batch=1)
    assert full.decoders[1].ck[0].shape[2] == 32


def test_recurrent_mode():
    """Recurrent: equals the normal model on the prompt (and the step reading only prompt entries),
    differs afterwards, and is deterministic."""
    model = tiny_model(stag_shared_weights=True)
    prompt = [[3, 14, 15, 9, 26, 5]]
    params = SamplingParams(max_new_tokens=8)
    normal = StaggeredGenerator(model, 32, 1).generate(prompt, params, keep_logits=True)
    rec1 = StaggeredGenerator(model, 32, 1, recurrent=True).generate(prompt, params, keep_logits=True)
    rec2 = StaggeredGenerator(model, 32, 1, recurrent=True).generate(prompt, params, keep_logits=True)
    torch.testing.assert_close(rec1.prompt_logits[0], normal.prompt_logits[0])
    # Step 0 decodes position n, whose cross entries all come from the prompt (pass 1) in both modes.
    torch.testing.assert_close(rec1.step_logits[0], normal.step_logits[0])
    if rec1.tokens == normal.tokens:
        assert not torch.allclose(rec1.step_logits[1:], normal.step_logits[1:])
    assert rec1.tokens == rec2.tokens and torch.equal(rec1.step_logits, rec2.step_logits)
    with pytest.raises(ValueError, match="recurrent=True needs stag_shared_weights"):
        StaggeredGenerator(tiny_model(), 32, 1, recurrent=True)


def test_sampling_controls():
    model = tiny_model()
    gen = StaggeredGenerator(model, 32, 2)
    greedy = gen.generate([[1, 2, 3], [4, 5]], SamplingParams(max_new_tokens=6))
    again = StaggeredGenerator(model, 32, 2).generate([[1, 2, 3], [4, 5]], SamplingParams(max_new_tokens=6))
    assert greedy.tokens == again.tokens
    stop = greedy.tokens[0][2]
    stopped = StaggeredGenerator(model, 32, 2).generate(
        [[1, 2, 3], [4, 5]], SamplingParams(max_new_tokens=6, stop_ids=(stop,)))
    assert stopped.tokens[0][-1] == stop and len(stopped.tokens[0]) <= 3
    a = StaggeredGenerator(model, 32, 1).generate([[1]], SamplingParams(8, temperature=1.0, seed=1))
    b = StaggeredGenerator(model, 32, 1).generate([[1]], SamplingParams(8, temperature=1.0, seed=1))
    assert a.tokens == b.tokens
    with pytest.raises(ValueError, match="exceeds the context"):
        gen.generate([[1] * 30], SamplingParams(max_new_tokens=5))
    with pytest.raises(ValueError, match="at least one token"):
        gen.generate([[1], []], SamplingParams(max_new_tokens=2))
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0.0)
