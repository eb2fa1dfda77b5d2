"""Token sampling: greedy, temperature, top-k, top-p, seeded."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor


@dataclass
class SamplingParams:
    max_new_tokens: int = 32
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    seed: int = 0
    stop_ids: tuple[int, ...] = field(default_factory=tuple)

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens={self.max_new_tokens}: generate at least 1 token.")
        if self.temperature < 0:
            raise ValueError(f"temperature={self.temperature}: use 0 (greedy) or a positive value.")
        if self.top_k < 0:
            raise ValueError(f"top_k={self.top_k}: use 0 (off) or a positive count.")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p={self.top_p}: choose a probability in (0, 1].")


def sample(logits: Tensor, params: SamplingParams, generator: torch.Generator) -> Tensor:
    """logits [b, v] -> token ids [b]."""
    logits = logits.float()
    if params.temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits / params.temperature
    if params.top_k:
        kth = torch.topk(logits, min(params.top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        drop = cumulative - sorted_logits.softmax(dim=-1) > params.top_p  # keep the token crossing p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs.cpu(), 1, generator=generator).squeeze(-1).to(logits.device)


def append_tokens(out: list[list[int]], done: list[bool], tokens: Tensor, stop_ids) -> None:
    """Add each unfinished row's new token; a row finishes on a stop id (which it keeps)."""
    for r, t in enumerate(tokens.tolist()):
        if not done[r]:
            out[r].append(t)
            done[r] = t in stop_ids
