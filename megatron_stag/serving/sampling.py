"""Token sampling: greedy, temperature, top-k, top-p, seeded."""

from __future__ import annotations

import math
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


ARGMAX_GROUPS = 256  # greedy over 32k logits, graphed step, H200: GPT b=1 0.909 -> 0.906 ms/token (1024 ties)


def greedy(logits: Tensor) -> Tensor:
    """argmax over the last dim of [b, v] in two reductions, the vocabulary's groups and then the
    groups: inductor reduces an argmax row on one program (7.5 µs over 32k logits at b=1), and split
    it runs on many. The first index of the maximum, as `torch.argmax`."""
    v = logits.shape[-1]
    groups = math.gcd(v, ARGMAX_GROUPS)
    if groups < 2:
        return logits.argmax(dim=-1)
    best, where = logits.unflatten(-1, (groups, v // groups)).max(dim=-1)
    group = best.argmax(dim=-1, keepdim=True)
    return (group * (v // groups) + where.gather(-1, group)).squeeze(-1)


def sample(logits: Tensor, params: SamplingParams, generator: torch.Generator) -> Tensor:
    """logits [b, v] -> token ids [b] on the logits' device, without a host sync, so a CUDA graph can
    hold it. A sampled token is the argmax of p / E with E ~ Exp(1) drawn from `generator` (the
    exponential race: distributed as multinomial(p), but one kernel chain with no host round trip)."""
    if params.temperature == 0:  # widening to fp32 is exact: the same argmax, one kernel fewer
        return greedy(logits)
    logits = logits.float()
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
    race = torch.empty_like(probs).exponential_(generator=generator)
    return (probs / race).argmax(dim=-1)  # split as `greedy`, this chain is slower (0.937 -> 0.939 ms)


def _append(out: list[list[int]], done: list[bool], tokens: list[list[int]], stop) -> None:
    """Add each unfinished row's new tokens [steps][rows]; a row finishes once `stop` holds for it
    (keeping that token)."""
    for step in tokens:
        for r, t in enumerate(step):
            if not done[r]:
                out[r].append(t)
                done[r] = stop is not None and stop(out[r])


def check_prompts(prompts: list[list[int]], params: SamplingParams, max_len: int) -> None:
    """Prompts fit the generator: some, non-empty, prompt + new tokens <= max_len."""
    if not prompts:
        raise ValueError("no prompts: give at least one.")
    if min(len(p) for p in prompts) < 1:
        raise ValueError("every prompt needs at least one token.")
    longest = max(len(p) for p in prompts)
    if longest + params.max_new_tokens > max_len:
        raise ValueError(
            f"prompt ({longest} tokens) + max_new_tokens ({params.max_new_tokens}) exceeds the "
            f"context of {max_len}: shorten the prompt or lower max_new_tokens.")


def cache_slots(prompts: list[list[int]], params: SamplingParams) -> int:
    """The cache slots a decode of these prompts fills: longest prompt + max_new_tokens, what a
    generator made for them needs. Sizing by the model's context instead costs every step where the
    context is longer: SDPA's attention (above `decode_attention.ROWS` kv heads) reads every slot,
    kept or not, and the flash-decoding kernel spreads its splits over every slot."""
    return max(len(p) for p in prompts) + params.max_new_tokens


def decode_loop(first: Tensor, step, positions: Tensor, params: SamplingParams, keep_logits: bool = False,
                on_token=None, check_every: int = 16, live: Optional[int] = None):
    """The token loop of every generator: step, record, and read tokens back to the host only where
    a stop rule needs them (every `check_every` steps) and at the end, so the GPU never waits on Python.

    `first` [rows]: the tokens sampled from the prompts' logits (on every rank). `step(tokens,
    positions)` runs one token step, sampling included, and returns (next tokens, next positions,
    logits or None). Rows run on after they stop (rows are independent, so this changes no row's
    tokens) until every row has stopped or the budget is spent; rows from `live` on count as stopped
    from the start (rows that only fill a batch). Returns (tokens per row, kept logits).
    """
    rows = first.shape[0]
    history = torch.empty(params.max_new_tokens, rows, dtype=torch.long, device=first.device)
    history[0].copy_(first)
    out, done, read, n, kept = [[] for _ in range(rows)], [r >= (live or rows) for r in range(rows)], 0, 1, []
    tokens = first
    while n < params.max_new_tokens:
        if params.stop is not None and n - read >= check_every:
            _append(out, done, history[read:n].tolist(), params.stop)
            read = n
            if all(done):
                break
        tokens, positions, logits = step(tokens, positions)
        if keep_logits and logits is not None:
            kept.append(logits.clone())
        history[n].copy_(tokens)
        n += 1
        if on_token is not None:
            on_token(n)
    _append(out, done, history[read:n].tolist(), params.stop)
    return out, kept
