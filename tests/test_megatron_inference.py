"""megatron.core.inference's TextGenerationController drives StagFormer through the sequential
wrapper: same greedy tokens as our staggered engine (mixed prompt lengths), log-probs equal to the
teacher-forced forward's."""

from collections import OrderedDict

import torch

from tests.model_factory import MAX_LEN, tiny_model


class _Tokenizer:
    """Ids as space-separated text: all the controller needs from a tokenizer here."""

    eod = 0
    vocab_size = 64

    def detokenize(self, ids, **kwargs):
        return " ".join(map(str, ids))

    def tokenize(self, text):
        return [int(t) for t in text.split()]

    def offsets(self, ids, text):
        return [0] * len(ids)


def test_text_generation_controller_matches_staggered_engine(megatron_world):
    from megatron.core.inference.contexts import StaticInferenceContext
    from megatron.core.inference.inference_request import InferenceRequest
    from megatron.core.inference.sampling_params import SamplingParams as McoreParams
    from megatron.core.inference.text_generation_controllers.text_generation_controller import (
        TextGenerationController)

    from megatron_stag.serving.megatron_controller import StagFormerSequentialInferenceWrapper
    from megatron_stag.serving.sampling import SamplingParams
    from megatron_stag.serving.convert import to_plain_model
    from megatron_stag.serving.engine import StaggeredGenerator

    model = tiny_model(stag_cross_window=2, position_embedding_type="rope")
    prompts = [[3, 5, 7, 9, 11], [2, 4, 6], [8, 1, 6, 6, 2, 9]]
    wrapper = StagFormerSequentialInferenceWrapper(model, StaticInferenceContext(max_batch_size=4,
                                                                                 max_sequence_length=MAX_LEN))
    controller = TextGenerationController(wrapper, _Tokenizer())
    requests = OrderedDict(
        (i, InferenceRequest(request_id=str(i), prompt=" ".join(map(str, p)), prompt_tokens=p,
                             sampling_params=McoreParams(num_tokens_to_generate=6, top_k=1,
                                                         return_log_probs=True)))
        for i, p in enumerate(prompts))
    wrapper.prep_model_for_inference()
    done = controller.generate_all_output_tokens_static_batch(requests)
    ours = StaggeredGenerator(to_plain_model(model, None), MAX_LEN, batch=3).generate(prompts, SamplingParams(max_new_tokens=6))
    for i, prompt in enumerate(prompts):
        tokens = done[i].generated_tokens.tolist()
        assert tokens == ours.tokens[i]
        seq = torch.tensor([prompt + tokens])
        with torch.no_grad():
            logp = model(seq, torch.arange(seq.shape[1])[None]).float().log_softmax(-1)[0]
        n = len(prompt)
        expected = logp[torch.arange(n - 1, n + 5), seq[0, n:n + 6]]
        assert torch.allclose(torch.tensor(done[i].generated_log_probs), expected, atol=1e-4)
