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


_COMPILED: dict = {}


def _maybe_compiled(fn, config):
    """altup_compile off the standard form's kernel path (Gemma 3n's form, streams of 2^31 elements or
    more, or more blocks than its tiles): torch.compile'd predict and correct.
    Compiled once per function (module-level, tensors in, tensors out), so every layer shares it."""
    if not config.altup_compile:
        return fn
    if fn not in _COMPILED:
        _COMPILED[fn] = torch.compile(fn, dynamic=False)
    return _COMPILED[fn]


def _mix(coefs: Tensor, x: Tensor) -> Tensor:
    """out_i = sum_j coefs[..., i, j] x_j for blocks x [..., K, d], as K broadcast multiply-adds.

    Written out because torch.matmul would run the per-token K x K product as thousands of tiny
    batched GEMMs (measured: ~40% of a training step at K = 2); torch.compile fuses this form."""
    return sum(coefs[..., :, j, None] * x[..., j, None, :] for j in range(x.shape[-2]))


def _blocks(stream: Tensor, k: int) -> Tensor:
    return stream.unflatten(-1, (k, stream.shape[-1] // k))  # [..., K, d]


def _standard_predict(coefs: Tensor, stream: Tensor, k: int, active: int) -> tuple[Tensor, Tensor]:
    x = _blocks(stream, k)
    return x[..., active, :].contiguous(), _mix(coefs, x)


def _input_dependent_predict(coefs: Tensor, stream: Tensor, k: int, active: int):
    """Gemma 3n: x^ = x + C x with per-token C [..., K, K]; the layer reads x^_active."""
    x = _blocks(stream, k)
    prediction = x + _mix(coefs, x)
    return prediction[..., active, :].contiguous(), prediction


def _correct(gains: Tensor, prediction: Tensor, output: Tensor, active: int) -> Tensor:
    """x_i = x^_i + g_i (y - x^_active); gains [K] or per token [..., K]."""
    innovation = output - prediction[..., active, :]
    return (prediction + gains.unsqueeze(-1) * innovation.unsqueeze(-2)).flatten(-2)


class AltUpCoefficients(MegatronModule):
    """Learned scalar predict (K x K) and correct (K) coefficients of one layer."""

    def __init__(self, config, layer_in_section: int):
        super().__init__(config=config)
        k = config.altup_blocks
        self.num_blocks, self.active_block = k, config.altup_active_block(layer_in_section)
        self.next_block = config.altup_active_block(layer_in_section + 1)  # the fused correct writes it out
        self.prediction = torch.nn.Parameter(torch.eye(k, dtype=config.params_dtype))
        self.correction = torch.nn.Parameter(torch.ones(k, dtype=config.params_dtype))
        _mark(self, config)
        self._kernels = None  # altup_compile's path: layers/altup_triton.py (Triton on CUDA, torch on CPU)
        if config.altup_compile:
            from megatron_stag.layers import altup_triton
            if k <= altup_triton.MAX_BLOCKS:  # more blocks than its tiles: torch.compile
                self._kernels = (altup_triton.predict, altup_triton.correct)
        self._predict = _maybe_compiled(_standard_predict, config)
        self._correct = _maybe_compiled(_correct, config)

    def predict(self, stream: Tensor):
        """stream [s, b, K*d] -> (the layer's input [s, b, d], prediction [s, b, K, d]; on the fused
        path the state from which `correct` recomputes the prediction instead of storing it). The
        kernels address the stream with 32-bit offsets: a stream of 2^31 elements or more takes
        torch.compile."""
        if self._kernels is not None and stream.numel() < 2 ** 31:
            return self._kernels[0](self.prediction, stream, self.num_blocks, self.active_block)
        return self._predict(self.prediction, stream, self.num_blocks, self.active_block)

    def correct(self, prediction, output: Tensor) -> Tensor:
        """prediction (from `predict`), layer output [s, b, d] -> new stream [s, b, K*d]."""
        if not isinstance(prediction, Tensor):
            return self._kernels[1](self.correction, prediction, output, self.active_block, self.next_block)
        return self._correct(self.correction, prediction, output, self.active_block)


class Gemma3nAltUpRouter(MegatronModule):
    """Gemma 3n's AltUp: coefficients computed per token by a router on the active block."""

    def __init__(self, config, layer_in_section: int):
        super().__init__(config=config)
        k, d = config.altup_blocks, config.hidden_size
        self.num_blocks, self.active_block, self.hidden = k, config.altup_active_block(layer_in_section), d
        self.clip = config.altup_coef_clip
        self.router_norm = torch.nn.RMSNorm(d, eps=config.layernorm_epsilon, dtype=config.params_dtype)
        self.router = torch.nn.Parameter(torch.empty(k, d, dtype=config.params_dtype))
        config.init_method(self.router)
        # zero coefficient weights: P = I and g = 1 at init, the standard form's identity start
        self.prediction = torch.nn.Parameter(torch.zeros(k * k, k, dtype=config.params_dtype))
        self.correction = torch.nn.Parameter(torch.zeros(k, k, dtype=config.params_dtype))
        _mark(self, config)
        self._predict = _maybe_compiled(_input_dependent_predict, config)
        self._correct = _maybe_compiled(_correct, config)

    def _weight(self, w: Tensor) -> Tensor:
        return w if self.clip is None else w.clamp(-self.clip, self.clip)

    def modalities(self, x: Tensor) -> Tensor:
        """m = tanh(W_r RMSNorm(x) / d) in fp32: [..., d] -> [..., K]."""
        routed = F.linear(self.router_norm(x) / self.hidden, self.router)
        return torch.tanh(routed.float()).to(x.dtype)

    def predict(self, stream: Tensor) -> tuple[Tensor, Tensor]:
        k = self.num_blocks
        m = self.modalities(_blocks(stream, k)[..., self.active_block, :])
        coefs = F.linear(m, self._weight(self.prediction)).unflatten(-1, (k, k))
        return self._predict(coefs, stream, k, self.active_block)

    def correct(self, prediction: Tensor, output: Tensor) -> Tensor:
        gains = 1.0 + F.linear(self.modalities(output), self._weight(self.correction))  # [s, b, K]
        return self._correct(gains, prediction, output, self.active_block)
