"""AltUpTransformerLayer: any megatron TransformerLayer (dense or MoE) inside AltUp's predict/correct.

The layer receives and returns the K-block stream [s, b, K*d]; megatron's own TransformerLayer forward
runs on one d-wide block (`altup.predict` picks it, `altup.correct` spreads its innovation), so
attention, MLP/MoE, tensor/sequence parallelism and the KV cache are megatron's, unchanged. The
predict/correct module comes from the spec's `altup` slot (standard scalars or Gemma 3n's router).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Union

from megatron.core.transformer.spec_utils import ModuleSpec, build_module
from megatron.core.transformer.transformer_layer import TransformerLayer, TransformerLayerSubmodules


@dataclass
class AltUpLayerSubmodules(TransformerLayerSubmodules):
    altup: Union[ModuleSpec, type, None] = None


class AltUpTransformerLayer(TransformerLayer):
    """TransformerLayer on the active block of a K-block stream."""

    def __init__(self, config, submodules: AltUpLayerSubmodules, layer_number: int = 1, **kwargs):
        super().__init__(config=config, submodules=submodules, layer_number=layer_number, **kwargs)
        self.altup = build_module(submodules.altup, config=config,
                                  layer_in_section=config.altup_first_layer + layer_number - 1)

    def forward(self, hidden_states, *args, **kwargs):
        layer_input, prediction = self.altup.predict(hidden_states)
        output, context = super().forward(layer_input, *args, **kwargs)
        return self.altup.correct(prediction, output), context
