"""Token sampling: greedy, temperature, top-k, top-p, seeded."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import Tensor


@dataclass
class SamplingParams:
    max_new_tokens: int = 32
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    seed: int = 0
    # a row stops (keeping the token) once stop(its generated ids) is true; the CLI matches stop strings
    # on the detokenized text, since a string's tokens in context need not be its tokens alone
    stop: Optional[Callable[[list[int]], bool]] = None

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


def append_tokens(out: list[list[int]], done: list[bool], tokens: Tensor, stop) -> None:
    """Add each unfinished row's new token; a row finishes once `stop` holds for it (keeping the token)."""
    for r, t in enumerate(tokens.tolist()):
        if not done[r]:
            out[r].append(t)
            done[r] = stop is not None and stop(out[r])


def check_prompts(prompts: list[list[int]], params: SamplingParams, max_len: int, batch: int) -> None:
    """Prompts fit the generator: non-empty, at most `batch` rows, prompt + new tokens <= max_len."""
    if not prompts or min(len(p) for p in prompts) < 1:
        raise ValueError("every prompt needs at least one token.")
    if len(prompts) > batch:
        raise ValueError(f"{len(prompts)} prompts exceed the generator's batch of {batch}.")
    longest = max(len(p) for p in prompts)
    if longest + params.max_new_tokens > max_len:
        raise ValueError(
            f"prompt ({longest} tokens) + max_new_tokens ({params.max_new_tokens}) exceeds the "
            f"context of {max_len}: shorten the prompt or lower max_new_tokens.")


def decode_loop(first_logits, step, positions: Tensor, params: SamplingParams, rows: int,
                samples_here: bool = True, broadcast=lambda t: t, keep_logits: bool = False,
                on_token=None):
    """The token loop shared by every generator: sample, append, stop, step.

    `step(tokens, positions)` returns the next logits (or None on ranks that do not sample);
    `broadcast` hands the sampled tokens to every rank. Returns (tokens per row, kept step logits).
    """
    gen = torch.Generator().manual_seed(params.seed)
    tokens = sample(first_logits, params, gen) if samples_here else torch.zeros(
        rows, dtype=torch.long, device=positions.device)
    tokens = broadcast(tokens)
    out, done = [[] for _ in range(rows)], [False] * rows
    append_tokens(out, done, tokens, params.stop)
    kept = []
    for i in range(params.max_new_tokens - 1):
        if all(done):
            break
        logits = step(tokens, positions)
        if samples_here:
            if keep_logits:
                kept.append(logits)
            tokens = sample(logits, params, gen)
        tokens, positions = broadcast(tokens), positions + 1
        append_tokens(out, done, tokens, params.stop)
        if on_token is not None:
            on_token(i + 2)
    return out, kept
