"""AltUp's predict and correct steps over a K-block residual stream [s, b, K*d].

Every transformer layer keeps width d; around it (arXiv 2301.13310, Algorithm 1):
  predict  x^_i = sum_j P_ij x_j                       (all blocks, cheap)
  compute  y = layer(x_{j*})                           (one block, the real layer)
  correct  x_i <- x^_i + g_i (y - x^_{j*})             (all blocks get the active block's innovation)

`AltUpCoefficients` learns P (K x K) and g (K) per layer, initialised to P = I, g = 1: with recycled
embeddings every block then equals the baseline's hidden state. `Gemma3nAltUpRouter` is Gemma 3n's
input-dependent form: P = I + reshape(W_p m(x^0)), g = 1 + W_c m(y), m = tanh(W_r RMSNorm(.) / d),
and the layer runs on the *predicted* active block.

Both are tiny replicated modules. Under sequence parallelism each TP rank sees a slice of the tokens,
so their gradients are partial: the parameters carry `sequence_parallel` and megatron's
finalize_model_grads sums them over the TP group.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from megatron.core.transformer.module import MegatronModule


def _mark(module: torch.nn.Module, config) -> None:
    for param in module.parameters():
        param.sequence_parallel = config.sequence_parallel


def _maybe_compile(module) -> None:
    """altup_compile: one fused kernel each for predict and correct (instance attributes, so a
    shared-weight alias of the module brings its compiled functions along)."""
    if module.config.altup_compile:
        module.predict = torch.compile(module.predict, dynamic=False)
        module.correct = torch.compile(module.correct, dynamic=False)


def _blocks(stream: Tensor, k: int) -> Tensor:
    return stream.unflatten(-1, (k, stream.shape[-1] // k))  # [..., K, d]


class AltUpCoefficients(MegatronModule):
    """Learned scalar predict (K x K) and correct (K) coefficients of one layer."""

    def __init__(self, config, active_block: int):
        super().__init__(config=config)
        k = config.altup_blocks
        self.num_blocks, self.active_block = k, active_block
        self.prediction = torch.nn.Parameter(torch.eye(k, dtype=config.params_dtype))
        self.correction = torch.nn.Parameter(torch.ones(k, dtype=config.params_dtype))
        _mark(self, config)
        _maybe_compile(self)

    def predict(self, stream: Tensor) -> tuple[Tensor, Tensor]:
        """stream [s, b, K*d] -> (the layer's input [s, b, d], prediction [s, b, K, d])."""
        x = _blocks(stream, self.num_blocks)
        return x[..., self.active_block, :], torch.matmul(self.prediction, x)

    def correct(self, prediction: Tensor, output: Tensor) -> Tensor:
        """prediction [s, b, K, d], layer output [s, b, d] -> new stream [s, b, K*d]."""
        innovation = output - prediction[..., self.active_block, :]
        return (prediction + self.correction[:, None] * innovation.unsqueeze(-2)).flatten(-2)


class Gemma3nAltUpRouter(MegatronModule):
    """Gemma 3n's AltUp: coefficients computed per token by a router on the active block."""

    def __init__(self, config, active_block: int):
        super().__init__(config=config)
        k, d = config.altup_blocks, config.hidden_size
        self.num_blocks, self.active_block, self.hidden = k, active_block, d
        self.clip = config.altup_coef_clip
        self.router_norm = torch.nn.RMSNorm(d, eps=config.layernorm_epsilon, dtype=config.params_dtype)
        self.router = torch.nn.Parameter(torch.empty(k, d, dtype=config.params_dtype))
        config.init_method(self.router)
        # zero coefficient weights: P = I and g = 1 at init, the standard form's identity start
        self.prediction = torch.nn.Parameter(torch.zeros(k * k, k, dtype=config.params_dtype))
        self.correction = torch.nn.Parameter(torch.zeros(k, k, dtype=config.params_dtype))
        _mark(self, config)
        _maybe_compile(self)

    def _weight(self, w: Tensor) -> Tensor:
        return w if self.clip is None else w.clamp(-self.clip, self.clip)

    def modalities(self, x: Tensor) -> Tensor:
        """m = tanh(W_r RMSNorm(x) / d) in fp32: [..., d] -> [..., K]."""
        routed = F.linear(self.router_norm(x) / self.hidden, self.router)
        return torch.tanh(routed.float()).to(x.dtype)

    def predict(self, stream: Tensor) -> tuple[Tensor, Tensor]:
        x = _blocks(stream, self.num_blocks)
        m = self.modalities(x[..., self.active_block, :])
        coefs = F.linear(m, self._weight(self.prediction)).unflatten(-1, (self.num_blocks, self.num_blocks))
        prediction = x + torch.matmul(coefs, x)
        return prediction[..., self.active_block, :], prediction

    def correct(self, prediction: Tensor, output: Tensor) -> Tensor:
        gains = 1.0 + F.linear(self.modalities(output), self._weight(self.correction))  # [s, b, K]
        innovation = output - prediction[..., self.active_block, :]
        return (prediction + gains.unsqueeze(-1) * innovation.unsqueeze(-2)).flatten(-2)
