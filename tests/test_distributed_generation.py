"""One section per rank (gloo, 2 and 3 ranks) decodes exactly what one process decodes."""


import pytest
import torch

from tests.dist_helpers import run_ranks
from tests.parallel_workers import VOCAB, save_single_rank_model, staggered_decode

PROMPTS = [[3, 1, 4, 1, 5, 9, 2], [6, 5, 3], [5, 8, 9, 7, 9]]
PARAMS = dict(max_new_tokens=10, temperature=0.9, top_k=16, seed=4)

CASES = {
    "p2": dict(stag_sections=2),
    "p2-shared-window2": dict(stag_sections=2, stag_shared_weights=True, stag_cross_window=2),
    "p3-combine": dict(stag_sections=3, stag_output="combine"),
    "p2-altup-gemma3n": dict(stag_sections=2, altup_blocks=2, altup_form="gemma3n",
                             altup_schedule="fixed", altup_embedding="projected",
                             altup_output="projected"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_distributed_decode_equals_single_process(tmp_path, case, megatron_world):
    from megatron.core import dist_checkpointing

    from megatron_stag.config.stagformer_config import StagFormerConfig
    from megatron_stag.inference.sampling import SamplingParams
    from megatron_stag.inference.staggered_generation import StaggeredGenerator
    from megatron_stag.models.stagformer_model import StagFormerModel

    stag = CASES[case]
    run_ranks(save_single_rank_model, 1, stag, str(tmp_path))
    run_ranks(staggered_decode, stag["stag_sections"], 1, stag, PROMPTS, PARAMS, str(tmp_path))
    got = torch.load(tmp_path / "distributed.pt")

    p = stag["stag_sections"]
    cfg = StagFormerConfig(num_layers=2 * p, hidden_size=32, num_attention_heads=4,
                           use_cpu_initialization=True, hidden_dropout=0.0, attention_dropout=0.0,
                           **stag)
    model = StagFormerModel(cfg, vocab_size=VOCAB, max_sequence_length=32).eval()
    model.load_state_dict(dist_checkpointing.load(model.sharded_state_dict(), str(tmp_path / "ckpt")))
    ref = StaggeredGenerator(model, 32, len(PROMPTS)).generate(
        PROMPTS, SamplingParams(**PARAMS), keep_logits=True)
    assert got["tokens"] == ref.tokens
    torch.testing.assert_close(got["logits"], ref.step_logits, atol=1e-5, rtol=1e-5)
    if got["greedy"] is not None:
        greedy = StaggeredGenerator(model, 32, len(PROMPTS)).generate(
            PROMPTS, SamplingParams(max_new_tokens=6))
        assert [list(t) for t in zip(*got["greedy"])] == greedy.tokens
