"""Staggered generation on one process: caches -> prefill -> step -> sample.

Every decode step runs all sections on the same token i; section k's cross-attention reads entries
written by section k-1 at earlier steps, and only after every section has run are the step's outputs
stored as entry i+1 of the next section's cross cache. So the sections of a step are independent (they
could run concurrently; `distributed_generation.py` puts one section on each rank) and the logits equal
the teacher-forced forward's (tested).

Separate weights on CUDA: each section of a step runs on its own stream, captured as parallel
branches of the step's CUDA graph. Shared weights: the passes of a step go through the shared modules together (p*b rows, one read of
the weights); only attention (per-pass caches) and the per-pass cross-attention run separately.
On CUDA the step can be captured once as a CUDA graph and replayed (`cuda_graph=True`): shapes are
static and the step makes no host synchronisation; sampling runs outside the graph.

Recurrent mode (shared weights, p = 2): pass 1 is skipped after the prompt, and section 1's
cross-attention reads its *own* outputs of earlier steps. Entries for prompt positions come from pass
1 (the prompt is prefilled with both passes); entries for generated positions from pass 2.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

from megatron_stag.inference.sampling import SamplingParams, check_prompts, decode_loop
from megatron_stag.inference.section_decoder import SectionDecoder, _add_bias, altup_correct, altup_predict


@dataclass
class GenerationResult:
    tokens: list[list[int]]  # generated ids per prompt (up to and including a stop id)
    prompt_logits: Optional[list[Tensor]] = None  # per prompt [n, v]: logits at prompt positions
    step_logits: Optional[Tensor] = None  # [steps, b, v]: logits of every decode step
    seconds: float = 0.0


def check_decodable(model, recurrent: bool = False) -> None:
    cfg = model.config
    if model.pg_collection.pp.size() != 1:
        raise ValueError("StaggeredGenerator runs a whole model on one rank; use "
                         "distributed_generation for one section per rank.")
    if cfg.window_size is not None:
        raise ValueError("window_size (sliding self-attention) is not supported by the decoder.")
    if cfg.altup_sequence_stride > 1:
        raise ValueError("altup_sequence_stride > 1 (Sequence-AltUp) is not supported by the decoder: "
                         "a step would need each layer's anchor states; decode with the full forward.")
    if cfg.rotary_interleaved:
        raise ValueError("rotary_interleaved=True is not supported by the decoder.")
    if recurrent and not (cfg.stag_shared_weights and cfg.stag_sections == 2):
        raise ValueError("recurrent=True needs stag_shared_weights=True and stag_sections=2: it "
                         "feeds pass 2's outputs back into its own cross-attention.")


def output_logits(model, hidden: Tensor) -> Tensor:
    """Final projection [n, b, h] -> full-vocabulary logits [n, b, v] (gathered over TP)."""
    weight = model.shared_embedding_or_output_weight() if model.share_embeddings_and_output_weights else None
    logits, _ = model.output_layer(hidden, weight=weight)
    if model.parallel_output and model.pg_collection.tp.size() > 1:
        logits = gather_from_tensor_model_parallel_region(logits, group=model.pg_collection.tp)
    return logits


def rotary_table(model, max_len: int) -> Optional[Tensor]:
    return model.rotary_pos_emb(max_len) if model.position_embedding_type == "rope" else None


class StaggeredGenerator:
    """All sections of a StagFormerModel (built with PP=1) decoding on one device."""

    def __init__(self, model, max_len: int, batch: int, recurrent: bool = False,
                 cuda_graph: bool = False, batch_shared_passes: bool = True, compile: bool = False,
                 concurrent_sections: bool = True):
        check_decodable(model, recurrent)
        if model.position_embedding_type == "learned_absolute" and max_len > model.max_sequence_length:
            raise ValueError(f"max_len={max_len} exceeds the model's {model.max_sequence_length} "
                             f"learned positions: lower max_len.")
        self.model, self.recurrent, self.batch, self.max_len = model.eval(), recurrent, batch, max_len
        param = next(model.parameters())
        rope = rotary_table(model, max_len)
        self.decoders = [
            SectionDecoder(block, piece.section, model.config, batch, max_len, rope,
                           param.dtype, param.device)
            for piece, block in zip(model.pieces, model.blocks)
        ]
        self.device = param.device
        self.batch_shared = (batch_shared_passes and model.config.stag_shared_weights
                             and not recurrent and len(self.decoders) > 1)
        self.cuda_graph = cuda_graph and param.device.type == "cuda"
        self._graph = None
        self.concurrent_sections = concurrent_sections and self.cuda_graph
        self._streams = [torch.cuda.Stream() for _ in self.decoders] if self.concurrent_sections else []
        # torch.compile fuses the step's many small kernels (norms, rope, masks, bias adds).
        self._step_fn = torch.compile(self._step, dynamic=False) if compile else self._step

    def _embed(self, ids: Tensor, positions: Tensor) -> Tensor:
        return self.model.embed(ids, positions)  # [n, b, h] (K*h with AltUp)

    @torch.no_grad()
    def prefill(self, row: int, prompt: list[int]) -> Tensor:
        """Run every section over one prompt into row `row`; returns logits [n, v]."""
        n = len(prompt)
        ids = torch.tensor([prompt], device=self.device)
        positions = torch.arange(n, device=self.device)[None]
        rows = torch.tensor([row], device=self.device)
        e = self._embed(ids, positions)
        outs, previous = [], None
        for dec in self.decoders:
            previous = dec.forward(e, positions, rows, prefill_context=previous)
            outs.append(previous)
        for k in range(1, len(self.decoders)):  # entry n of section k = section k-1's output at n-1
            self.decoders[k].write_context(outs[k - 1][-1:], torch.tensor([n], device=self.device), rows)
        return output_logits(self.model, self.model.section_output(outs))[:, 0]

    def _shared_passes(self, e: Tensor, pos: Tensor, rows: Tensor) -> list[Tensor]:
        """Every pass of a shared-weight model through the shared modules at once (p*b rows)."""
        decs, b = self.decoders, e.shape[1]
        hs = [e] * len(decs)
        pos_all = pos.repeat(len(decs), 1)
        for d in decs:
            d.begin(pos)
        if decs[0].rotary is not None:  # the batched q/k carry p*b rows: repeat cos/sin per pass
            decs[0]._cos_sin = tuple(c.repeat(1, len(decs), 1, 1) for c in decs[0]._cos_sin)
        for i, owner in enumerate(decs[0].block.layers):
            x, prediction = altup_predict(owner, torch.cat(hs, dim=1))
            q, k, v = decs[0].qkv(owner, owner.input_layernorm(x), pos_all)
            core = torch.cat([d.attend_self(i, q[:, j * b:(j + 1) * b], k[:, j * b:(j + 1) * b],
                                            v[:, j * b:(j + 1) * b], pos, rows)
                              for j, d in enumerate(decs)], dim=1)
            xs = list((x + _add_bias(owner.self_attention.linear_proj(core))).split(b, dim=1))
            for j in range(1, len(decs)):
                layer = decs[j].block.layers[i]
                xs[j] = xs[j] + decs[j].cross_attention(i, layer, layer.pre_cross_attn_layernorm(xs[j]), pos, rows)
            x = torch.cat(xs, dim=1)
            x = x + _add_bias(owner.mlp(owner.pre_mlp_layernorm(x)))
            hs = list(altup_correct(owner, prediction, x).split(b, dim=1))
        return [d.block.final_layernorm(h) for d, h in zip(decs, hs)]

    def _run_sections(self, decoders, e: Tensor, pos: Tensor, rows: Tensor) -> list[Tensor]:
        """The sections of one step are independent: on CUDA each runs on its own stream (parallel
        branches once captured in a graph), so small decode kernels of different sections overlap."""
        if len(decoders) == 1 or not self.concurrent_sections:
            return [dec.forward(e, pos, rows) for dec in decoders]
        main = torch.cuda.current_stream()
        outs = []
        for dec, stream in zip(decoders, self._streams):
            stream.wait_stream(main)
            with torch.cuda.stream(stream):
                outs.append(dec.forward(e, pos, rows))
        for stream in self._streams[: len(decoders)]:
            main.wait_stream(stream)
        return outs

    def _step(self, tokens: Tensor, positions: Tensor) -> Tensor:
        rows = torch.arange(tokens.shape[0], device=self.device)
        pos = positions[:, None]
        e = self._embed(tokens[:, None], pos)
        if self.batch_shared:
            outs = self._shared_passes(e, pos, rows)
        else:
            active = self.decoders[1:] if self.recurrent else self.decoders
            outs = self._run_sections(active, e, pos, rows)
        if self.recurrent:
            self.decoders[1].write_step_context(outs[0], positions + 1)
        else:
            for k in range(1, len(self.decoders)):
                self.decoders[k].write_step_context(outs[k - 1], positions + 1)
        return output_logits(self.model, self.model.section_output(outs))[0]

    @torch.no_grad()
    def step(self, tokens: Tensor, positions: Tensor) -> Tensor:
        """Decode tokens [b] at positions [b] through every section; returns logits [b, v]."""
        if not self.cuda_graph:
            return self._step(tokens, positions)
        if self._graph is None or self._static[0].shape != tokens.shape:
            self._capture(tokens, positions)
        self._static[0].copy_(tokens)
        self._static[1].copy_(positions)
        self._graph.replay()
        return self._static[2].clone()  # the static buffer is overwritten by the next replay

    def _capture(self, tokens: Tensor, positions: Tensor) -> None:
        """Capture one step. Warm-up runs repeat the very step to be replayed: self-attention and
        full cross caches get the same values in the same slots; windowed (ring) cross caches are
        restored afterwards, since a repeated step would read the slot it just overwrote."""
        static_tokens, static_pos = tokens.clone(), positions.clone()
        ring = [t for d in self.decoders for t in d.ring_state()]
        saved = [t.clone() for t in ring]
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                self._step_fn(static_tokens, static_pos)
        torch.cuda.current_stream().wait_stream(side)
        for t, s in zip(ring, saved):
            t.copy_(s)
        self._graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self._graph):
            logits = self._step_fn(static_tokens, static_pos)
        self._static = (static_tokens, static_pos, logits)

    def generate(self, prompts: list[list[int]], params: SamplingParams,
                 keep_logits: bool = False, progress: bool = False) -> GenerationResult:
        check_prompts(prompts, params, self.max_len, self.batch)
        start = time.perf_counter()
        prompt_logits = [self.prefill(r, p) for r, p in enumerate(prompts)]
        positions = torch.tensor([len(p) for p in prompts], device=self.device)
        report = (lambda n: _progress(n, params.max_new_tokens, len(prompts), start)) if progress else None
        out, step_logits = decode_loop(torch.stack([l[-1] for l in prompt_logits]), self.step,
                                       positions, params, len(prompts), keep_logits=keep_logits,
                                       on_token=report)
        if progress:
            print(file=sys.stderr)
        return GenerationResult(out, prompt_logits if keep_logits else None,
                                torch.stack(step_logits) if step_logits else None,
                                time.perf_counter() - start)


def _progress(done: int, total: int, batch: int, start: float) -> None:
    rate = done * batch / max(time.perf_counter() - start, 1e-9)
    bar = "#" * int(30 * done / total)
    print(f"\rgenerating [{bar:<30}] {done}/{total} tokens, {rate:.1f} tok/s", end="", file=sys.stderr)
