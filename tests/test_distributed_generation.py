"""One section per rank (gloo, 2 and 3 ranks, the engine on torch.distributed, no DeepSpeed) decodes
exactly what one process decodes: same tokens, same step logits."""

import pytest
import torch

from tests.dist_helpers import run_ranks
from tests.model_factory import MAX_LEN, tiny_model

PROMPTS = [[3, 1, 4, 1, 5, 9, 2], [6, 5, 3], [5, 8, 9, 7, 9]]
PARAMS = dict(max_new_tokens=10, temperature=0.9, top_k=16, seed=4)

CASES = {
    "p2": dict(),
    "p2-shared-window2": dict(stag_shared_weights=True, stag_cross_window=2),
    "p3-combine": dict(stag_sections=3, num_layers=6, stag_output="combine"),
    "p2-altup-gemma3n": dict(altup_blocks=2, altup_form="gemma3n", altup_schedule="fixed",
                             altup_embedding="projected", altup_output="projected"),
}


def native_decode(rank, world, package, prompts, params_kw, out_dir):
    """This rank's section of the package, decoding with the engine over torch.distributed (gloo)."""
    import os

    import torch.distributed as dist

    from megatron_stag.serving.engine import SectionPlacement, StaggeredGenerator
    from megatron_stag.serving.model import load_plain_model
    from megatron_stag.serving.sampling import SamplingParams

    dist.init_process_group("gloo")
    model = load_plain_model(package)
    place = SectionPlacement(model.cfg.sections, 1, rank)
    model.keep_sections([place.section])
    gen = StaggeredGenerator(model, max_len=MAX_LEN, batch=len(prompts), placement=place, comm=dist)
    result = gen.generate(prompts, SamplingParams(**params_kw), keep_logits=True)
    torch.save({"tokens": result.tokens, "logits": result.step_logits}, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()


@pytest.mark.parametrize("case", list(CASES))
def test_one_section_per_rank_equals_single_process(tmp_path, case, megatron_world):
    from safetensors.torch import save_model

    from megatron_stag.serving.convert import to_plain_model
    from megatron_stag.serving.engine import StaggeredGenerator
    from megatron_stag.serving.sampling import SamplingParams

    plain = to_plain_model(tiny_model(**CASES[case]), None)
    package = tmp_path / "pkg"
    package.mkdir()
    plain.cfg.save(package / "config.json")
    save_model(plain, str(package / "model.safetensors"))
    world = plain.cfg.sections
    run_ranks(native_decode, world, str(package), PROMPTS, PARAMS, str(tmp_path))
    ref = StaggeredGenerator(plain, MAX_LEN, len(PROMPTS)).generate(PROMPTS, SamplingParams(**PARAMS), keep_logits=True)
    for rank in range(world):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        assert got["tokens"] == ref.tokens
    last = torch.load(tmp_path / f"rank{world - 1}.pt")
    torch.testing.assert_close(last["logits"], ref.step_logits, atol=1e-5, rtol=1e-5)
