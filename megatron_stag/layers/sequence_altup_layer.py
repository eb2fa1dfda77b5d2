"""SequenceAltUpLayer: AltUp along the sequence, made causal for a decoder.

The paper's Sequence-AltUp runs the layer on every k-th token and predicts the rest; its exact
formulas are not given. Our causal form, per layer l with stride k and offset o = l mod k:
- anchors are the positions i = o, o+k, o+2k, ...; the anchor of token i is a(i), the last anchor at
  or before i (tokens before the first anchor have none and pass through unchanged);
- compute   y = layer(x[anchors])  (causal attention among anchors, rotary at their true positions);
- predict   x^_i = alpha x_i + beta x_a(i)            (alpha = 1, beta = 0 at init);
- correct   x_i <- x^_i + gamma (y_a(i) - x^_a(i))    (gamma = 1; an anchor becomes y at init).
A token reads only anchors at or before itself, so the layer is causal (tested). The offset rotates
with the layer index, so every token is an anchor in some layer. Cost: the layer runs on s/k tokens.
"""

from __future__ import annotations

import torch

from megatron.core.transformer.transformer_layer import TransformerLayer


class SequenceAltUpLayer(TransformerLayer):
    """A megatron TransformerLayer that computes only on its anchor tokens."""

    def __init__(self, config, submodules, layer_number: int = 1, **kwargs):
        super().__init__(config=config, submodules=submodules, layer_number=layer_number, **kwargs)
        self.stride = config.altup_sequence_stride
        self.offset = (config.altup_first_layer + layer_number - 1) % self.stride
        coefs = torch.tensor([1.0, 0.0, 1.0], dtype=config.params_dtype)  # alpha, beta, gamma
        self.sequence_altup = torch.nn.Parameter(coefs)

    def forward(self, hidden_states, attention_mask=None, *args, rotary_pos_emb=None, **kwargs):
        s, o, k = hidden_states.shape[0], self.offset, self.stride
        if s <= o:  # no anchor yet: nothing to compute
            return hidden_states, kwargs.get("context")
        anchors = slice(o, s, k)  # strided views, no gathers: anchors are every k-th token from o
        if attention_mask is not None:
            attention_mask = attention_mask[..., anchors, anchors]
        if rotary_pos_emb is not None:
            rotary_pos_emb = rotary_pos_emb[anchors]
        x_anchor = hidden_states[anchors]
        y, context = super().forward(x_anchor.contiguous(), attention_mask, *args,
                                     rotary_pos_emb=rotary_pos_emb, **kwargs)

        def per_token(t):  # anchor rows -> one row per token o.. (token i gets anchor (i-o)//k)
            n = t.shape[0]
            return t.unsqueeze(1).expand(n, k, *t.shape[1:]).reshape(n * k, *t.shape[1:])[: s - o]

        alpha, beta, gamma = self.sequence_altup
        x_a = per_token(x_anchor)
        prediction = alpha * hidden_states[o:] + beta * x_a
        corrected = prediction + gamma * (per_token(y) - (alpha + beta) * x_a)
        return torch.cat([hidden_states[:o], corrected]), context
