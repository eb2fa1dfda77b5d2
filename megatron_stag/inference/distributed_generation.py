"""Staggered generation with one section per pipeline rank: all sections decode step i at once.

Placement: section k on pipeline rank k (PP = p; tensor parallelism inside a section works through
megatron's parallel linears). Every rank holds the embedding table, because every section re-embeds
the tokens; only the last rank holds the output layer.

One decode step on rank k:
  1. post irecv for section k-1's output at this step (k > 0);
  2. run section k on token i (its cross-attention reads entries <= i, all received earlier);
  3. isend its output to rank k+1 (and, with `stag_output='combine'`, to the last rank);
  4. wait for the irecv and store it as cross entry i+1, ready for the next step;
  5. the last rank samples token i+1 and broadcasts it (with the stop flags) to every rank.
The critical path per token is therefore max(section time) + one small send + the broadcast, not
the sum over sections as in megatron's pipeline engines. The greedy fast path (`greedy_step`, CUDA
graphs) also balances the sections: rank k-1 sends section k's cross-attention K/V of its output
rather than the output itself, so section k never reads those projection weights. Prefill runs the sections over the prompt
one after another (no gain there, as in the paper).
"""

from __future__ import annotations

import time
from typing import Optional

import torch
import torch.distributed as dist

from megatron_stag.inference.sampling import SamplingParams, check_prompts, decode_loop
from megatron_stag.inference.section_decoder import SectionDecoder
from megatron_stag.inference.staggered_generation import GenerationResult, output_logits, rotary_table


class DistributedStaggeredGenerator:
    """This rank's section of a StagFormerModel built with PP = p and pre_process on every rank."""

    def __init__(self, model, max_len: int, batch: int):
        cfg = model.config
        pp = model.pg_collection.pp
        if pp.size() != cfg.stag_sections or len(model.pieces) != 1 or not model.pieces[0].starts_section:
            raise ValueError(
                f"one section per pipeline rank needs pipeline_model_parallel_size == stag_sections "
                f"({pp.size()} vs {cfg.stag_sections}).")
        if not model.pre_process:
            raise ValueError("build the decode model with pre_process=True on every rank: each "
                             "section embeds the tokens itself.")
        self.model, self.pp, self.max_len, self.batch = model.eval(), pp, max_len, batch
        self.k, self.p = pp.rank(), pp.size()
        self.ranks = dist.get_process_group_ranks(pp)
        self.last = self.k == self.p - 1
        self.combine = cfg.stag_output == "combine"
        param = next(model.parameters())
        self.device, self.dtype, self.hidden = param.device, param.dtype, cfg.hidden_size
        self.decoder = SectionDecoder(model.blocks[0], self.k, cfg, batch, max_len,
                                      rotary_table(model, max_len), param.dtype, param.device)
        self._share_next_kv_projection(cfg)

    def _share_next_kv_projection(self, cfg) -> None:
        """Balanced placement: section k-1's rank projects its output into section k's cross K/V.

        Those projections depend only on section k-1's output, so computing them where it is
        produced takes their weight reads off section k's critical path. Each rank hands its stacked
        linear_kv weights to the previous rank once, here.
        """
        reqs, self.next_kv = [], None
        if self.k > 0:
            w, b = self.decoder.kv_weight, self.decoder.kv_bias
            reqs += [dist.isend(t.contiguous(), self.ranks[self.k - 1], group=self.pp)
                     for t in ([w] if b is None else [w, b])]
        if not self.last:
            width = 2 * self.decoder.heads * self.decoder.head_dim
            n = cfg.section_layers[self.k + 1]
            w = torch.empty((n, width, self.hidden), dtype=self.dtype, device=self.device)
            b = torch.empty((n, width), dtype=self.dtype, device=self.device) if cfg.add_bias_linear else None
            reqs += [dist.irecv(t, self.ranks[self.k + 1], group=self.pp) for t in ([w] if b is None else [w, b])]
            self.next_kv = (w, b)
        for r in reqs:
            r.wait()

    def _send(self, t, k):
        return dist.isend(t.contiguous(), self.ranks[k], group=self.pp)

    def _recv(self, shape, k):
        buf = torch.empty(shape, dtype=self.dtype, device=self.device)
        return buf, dist.irecv(buf, self.ranks[k], group=self.pp)

    def _gather_for_output(self, mine, shape, received_prev):
        """Last rank: every section's output at the same positions (combine) or just its own."""
        if not self.combine:
            return [mine]
        outs = []
        for k in range(self.p - 1):
            if k == self.p - 2:
                outs.append(received_prev)
            else:
                buf, req = self._recv(shape, k)
                req.wait()
                outs.append(buf)
        return outs + [mine]

    def _send_for_output(self, t):
        if self.combine and self.k < self.p - 2:
            self._send(t, self.p - 1).wait()

    @torch.no_grad()
    def _prefill(self, row: int, prompt: list[int]) -> Optional[torch.Tensor]:
        n = len(prompt)
        ids = torch.tensor([prompt], device=self.device)
        positions = torch.arange(n, device=self.device)[None]
        rows = torch.tensor([row], device=self.device)
        e = self.model.embed(ids, positions)
        prev = None
        if self.k > 0:
            prev, req = self._recv((n, 1, self.hidden), self.k - 1)
            req.wait()
        t = self.decoder.forward(e, positions, rows, prefill_context=prev)
        if not self.last:
            self._send(t, self.k + 1).wait()
        self._send_for_output(t)
        if self.k > 0:
            self.decoder.write_context(prev[-1:], torch.tensor([n], device=self.device), rows)
        if self.last:
            outs = self._gather_for_output(t, (n, 1, self.hidden), prev)
            return output_logits(self.model, self.model.section_output(outs))[-1, 0]
        return None

    @torch.no_grad()
    def _step(self, tokens, positions) -> Optional[torch.Tensor]:
        b = tokens.shape[0]
        rows = torch.arange(b, device=self.device)
        pos = positions[:, None]
        prev, req = (self._recv((1, b, self.hidden), self.k - 1) if self.k > 0 else (None, None))
        e = self.model.embed(tokens[:, None], pos)
        t = self.decoder.forward(e, pos, rows)
        send = self._send(t, self.k + 1) if not self.last else None
        self._send_for_output(t)
        if req is not None:
            req.wait()
            self.decoder.write_step_context(prev, positions + 1)
        if send is not None:
            send.wait()
        if self.last:
            outs = self._gather_for_output(t, (1, b, self.hidden), prev)
            return output_logits(self.model, self.model.section_output(outs))[0]
        return None

    # ------------------------------------------------------------------ greedy fast path
    def _compute(self, tokens, positions):
        """The section's step; returns (message for the next rank, next tokens on the last rank).
        The message is the next section's cross K/V of this output (balanced placement)."""
        rows = torch.arange(tokens.shape[0], device=self.device)
        e = self.model.embed(tokens[:, None], positions[:, None])
        t = self.decoder.forward(e, positions[:, None], rows)
        if self.last:
            logits = output_logits(self.model, self.model.section_output([t]))[0]
            return t, logits.argmax(-1)
        return SectionDecoder.project_entries(t, *self.next_kv), torch.zeros_like(tokens)

    def _message_shape(self, b: int):
        return (len(self.decoder.block.layers), b, 2 * self.decoder.heads * self.decoder.head_dim)

    def _capture(self, tokens, positions) -> None:
        """Two CUDA graphs: the section step, and the write of the received cross entry."""
        b = tokens.shape[0]
        self._tok, self._pos = tokens.clone(), positions.clone()
        self._prev = torch.zeros(self._message_shape(b), dtype=self.dtype, device=self.device)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-ups repeat the same step: same slots, same values
            self._compute(self._tok, self._pos)
        torch.cuda.current_stream().wait_stream(side)
        self._g_step, self._g_write = torch.cuda.CUDAGraph(), torch.cuda.CUDAGraph()
        with torch.cuda.graph(self._g_step):
            self._t, self._next = self._compute(self._tok, self._pos)
        if self.k > 0:
            with torch.cuda.graph(self._g_write):
                self.decoder.store_entries(self._prev, self._pos + 1)

    @torch.no_grad()
    def greedy_step(self, tokens, positions, cuda_graph: bool = True):
        """One greedy step with no host synchronisation; returns the next tokens on every rank.

        With `cuda_graph` the section's compute replays a captured graph; the point-to-point
        messages and the broadcast run between replays.
        """
        if self.combine:
            raise ValueError("greedy_step does not implement stag_output='combine'; use generate().")
        if not (cuda_graph and self.device.type == "cuda"):
            t, nxt = self._compute(tokens, positions)
            prev = None
        else:
            if getattr(self, "_g_step", None) is None or self._tok.shape != tokens.shape:
                self._capture(tokens, positions)
            self._tok.copy_(tokens)
            self._pos.copy_(positions)
            self._g_step.replay()
            t, nxt, prev = self._t, self._next, self._prev
        send = self._send(t, self.k + 1) if not self.last else None
        if self.k > 0:
            if prev is None:
                buf, req = self._recv(self._message_shape(tokens.shape[0]), self.k - 1)
                req.wait()
                self.decoder.store_entries(buf, positions + 1)
            else:
                dist.irecv(prev, self.ranks[self.k - 1], group=self.pp).wait()
                self._g_write.replay()
        if send is not None:
            send.wait()
        return self._broadcast(nxt.clone())

    @torch.no_grad()
    def prefill_greedy(self, prompts: list[list[int]]):
        """Prefill every prompt; returns the first generated tokens on every rank."""
        last = [self._prefill(r, p) for r, p in enumerate(prompts)]
        tokens = torch.stack(last).argmax(-1) if self.last else torch.zeros(
            len(prompts), dtype=torch.long, device=self.device)
        return self._broadcast(tokens)

    def _broadcast(self, tensor: torch.Tensor) -> torch.Tensor:
        dist.broadcast(tensor, self.ranks[-1], group=self.pp)
        return tensor

    def generate(self, prompts: list[list[int]], params: SamplingParams,
                 keep_logits: bool = False) -> GenerationResult:
        """Collective over the pipeline group: every rank calls it with the same prompts."""
        check_prompts(prompts, params, self.max_len, self.batch)
        start = time.perf_counter()
        last_logits = [self._prefill(r, p) for r, p in enumerate(prompts)]
        positions = torch.tensor([len(p) for p in prompts], device=self.device)
        out, step_logits = decode_loop(torch.stack(last_logits) if self.last else None, self._step,
                                       positions, params, len(prompts), samples_here=self.last,
                                       broadcast=self._broadcast, keep_logits=keep_logits)
        return GenerationResult(out, None, torch.stack(step_logits) if step_logits else None,
                                time.perf_counter() - start)
