"""StagFormer behind megatron.core.inference's text generation controller (sequential mode).

megatron's `TextGenerationController` drives static-batch generation through a model inference
wrapper: it pads the prompts into one batch, slides a context window [start, end) and samples
(greedy/top-k/top-p, log-probs, stop handling, detokenisation) from the window's logits. Its KV
cache (`StaticInferenceContext`, and the paged `DynamicInferenceContext` its non-legacy engine
switches to) assumes one decoder stack; StagFormer's sections and separately keyed cross caches do not
fit it. This wrapper therefore runs *sequential mode*: each call re-runs the teacher-forced forward
over [0, end) and returns the window's logits, which are exact by construction (O(n^2) compute: for
megatron tooling, evaluation and log-probs; fast decoding is `engine.py`).
"""

from __future__ import annotations

from typing import Any, Dict

from megatron.core.inference.model_inference_wrappers.gpt.gpt_inference_wrapper import GPTInferenceWrapper
from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region


class StagFormerSequentialInferenceWrapper(GPTInferenceWrapper):
    """A `GPTInferenceWrapper` whose every step is a full forward of the tokens so far."""

    def __init__(self, model, inference_context):
        if model.pg_collection.pp.size() != 1:
            raise ValueError("the sequential wrapper runs a PP=1 model; decode pipelines with "
                             "engine.StaggeredGenerator (one section per rank).")
        super().__init__(model, inference_context)

    def prep_inference_input(self, prompts_tokens) -> Dict[str, Any]:
        inputs = super().prep_inference_input(prompts_tokens)
        inputs["attention_mask"] = None  # the model builds its own causal and staggered masks
        return inputs

    def get_batch_for_context_window(self, inference_input: Dict[str, Any], context_start_position: int,
                                     context_end_position: int) -> Dict[str, Any]:
        end = context_end_position
        return {"tokens": inference_input["tokens"][:, :end],
                "position_ids": inference_input["position_ids"][:, :end],
                "attention_mask": None, "window_start": context_start_position}

    def _forward(self, inference_input):
        logits = self.model(inference_input["tokens"], inference_input["position_ids"], None)  # [b, s, v]
        if self.model.parallel_output and self.tp_size > 1:
            logits = gather_from_tensor_model_parallel_region(logits, group=self.tp_group)
        if self.inference_context.config.materialize_only_last_token_logits:
            return logits[:, -1:]
        return logits[:, inference_input["window_start"]:]
