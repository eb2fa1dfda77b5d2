"""A compact pretraining loop for one process (CPU or one GPU): the quickstart's trainer.

Multi-rank pretraining goes through megatron's own schedules (see tests/parallel_workers.py for the
pipeline path); this loop keeps the quickstart readable top to bottom: batches -> forward -> loss ->
AdamW step -> Megatron-style iteration log (loss, tokens/s, ETA) -> periodic validation and atomic
checkpoints.
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from megatron_stag.checkpointing.checkpoint_io import save_checkpoint


@dataclass
class TrainSettings:
    iterations: int = 300
    lr: float = 3e-3
    min_lr: float = 3e-4
    warmup: int = 30
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    log_interval: int = 20
    eval_interval: int = 100
    eval_batches: int = 4
    save_interval: int = 0  # 0: save only at the end


def lr_at(step: int, s: TrainSettings) -> float:
    if step < s.warmup:
        return s.lr * (step + 1) / s.warmup
    progress = (step - s.warmup) / max(1, s.iterations - s.warmup)
    return s.min_lr + 0.5 * (s.lr - s.min_lr) * (1 + math.cos(math.pi * min(1.0, progress)))


def _positions(ids):
    return torch.arange(ids.shape[1], device=ids.device)[None].expand(ids.shape[0], -1)


@torch.no_grad()
def evaluate(model, batches, n: int) -> float:
    model.eval()
    losses = []
    for _ in range(n):
        ids, labels = next(batches)
        losses.append(model(ids, _positions(ids), None, labels=labels).mean().item())
    model.train()
    return sum(losses) / len(losses)


def train(model, args, train_batches, valid_batches, s: TrainSettings, out_dir: Path,
          tokenizer_model: Optional[Path] = None) -> list[dict]:
    """Train; returns the log records (also printed). Saves out_dir/iter_XXXXXXX checkpoints."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": s.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=s.lr, betas=(0.9, 0.95))
    model.train()
    records, start, window_tokens, window_start = [], time.perf_counter(), 0, time.perf_counter()
    for step in range(s.iterations):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, s)
        ids, labels = next(train_batches)
        loss = model(ids, _positions(ids), None, labels=labels).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(params, s.grad_clip)
        opt.step()
        window_tokens += ids.numel()
        it = step + 1
        if it % s.log_interval == 0 or it == s.iterations:
            now = time.perf_counter()
            tps = window_tokens / (now - window_start)
            eta = (now - start) / it * (s.iterations - it)
            rec = dict(iteration=it, loss=loss.item(), lr=lr_at(step, s), grad_norm=float(grad_norm),
                       tokens_per_s=tps, elapsed_s=now - start)
            print(f" iteration {it:6d}/{s.iterations} | lm loss {rec['loss']:.4f} | lr {rec['lr']:.2e}"
                  f" | grad norm {rec['grad_norm']:.3f} | tokens/s {tps:8.0f} | elapsed {now - start:6.1f}s"
                  f" | ETA {eta:6.1f}s", file=sys.stderr, flush=True)
            records.append(rec)
            window_tokens, window_start = 0, now
        if valid_batches is not None and (it % s.eval_interval == 0 or it == s.iterations):
            vloss = evaluate(model, valid_batches, s.eval_batches)
            print(f" validation at iteration {it} | lm loss {vloss:.4f} | ppl {math.exp(vloss):.2f}",
                  file=sys.stderr, flush=True)
            records.append(dict(iteration=it, valid_loss=vloss))
        if (s.save_interval and it % s.save_interval == 0) or it == s.iterations:
            save_checkpoint(model, args, Path(out_dir) / f"iter_{it:07d}",
                            dict(iteration=it, consumed_samples=it * ids.shape[0]), tokenizer_model)
    return records
