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
                                     dict(stag_sections=3, num_layers=6, stag_output="combine")])
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
