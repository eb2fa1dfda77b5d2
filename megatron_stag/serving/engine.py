"""The staggered decode engine: one loop for every entry point (`generate` on a megatron checkpoint
or an exported package, DeepSpeed, torchrun/srun one section per rank, Slurm, the benchmarks).

It drives the serving model `model.StagLM` (plain PyTorch; a megatron checkpoint is converted in
memory by `convert.py`, DeepSpeed may shard it): caches allocated once, prefill, then one step per
token. At step i every section runs token i; section k reads section k-1's entries <= i, all written at
earlier steps; after the step, section k-1's output becomes section k's entry i+1. So the logits equal
the teacher-forced forward's (tested against megatron's model) and the sections of a step are
independent: on one GPU they run on parallel CUDA streams, one section per rank they run at once.
On CUDA the step is compiled (torch.compile, one function per section so the streams stay parallel)
and replayed from one CUDA graph by default; steps whose attention is SDPA's read the caches' filled
slots in buckets (`SLOT_BUCKET`), a graph per bucket. Sampling is `sampling.decode_loop`.

Several ranks: rank r runs section r // tp as tensor-parallel rank r % tp of its section (the
sections' TP groups are what `deepspeed.init_deepspeed_engine` shards with). Rank (k, t) sends its
step output to (k+1, t) while (k+1, t) computes the same step, so the critical path per token is one
section plus a small send and the broadcast of the sampled token from the last section's rank 0.
With output 'last' what it sends is section k+1's new cross-attention entry already projected to
every layer's keys and values (`model.EntryProjections`, kept on rank k by `keep_sections`):
both ranks then read about the same weight bytes per step (prefill still sends outputs).
Communication goes through `comm`: `deepspeed.comm` under DeepSpeed, torch.distributed otherwise.

Recurrent mode (shared weights, p = 2, one rank): after the prompt only pass 2 runs, and its own
outputs become its cross-attention entries.
"""

from __future__ import annotations

import functools
import itertools
import math
import sys
import time
from dataclasses import dataclass, replace
from typing import Optional

import torch
from torch import Tensor

from megatron_stag.serving import decode_attention as _attention
from megatron_stag.serving import gemv as _gemv
from megatron_stag.serving import skinny_gemm
from megatron_stag.serving.model import Linear, StagLM, causal_keep, check_recurrent, shared_passes_step
from megatron_stag.serving.sampling import SamplingParams, check_prompts, decode_loop, sample


# SDPA reads every cache slot it is given, kept or not: its steps take the caches' first slots in whole
# buckets of this many, enough to hold every row's positions (one compiled step and one CUDA graph per
# bucket; the flash-decoding kernel reads only the kept slots and takes the whole caches). Long caches
# take larger buckets, so that a generator captures at most MAX_BUCKETS graphs.
SLOT_BUCKET = 64
MAX_BUCKETS = 16
# Prompts prefill together, padded to the longest of their group: at most PREFILL_TOKENS tokens (rows x
# that longest) per forward, which bounds its activations; a forward more is taken to cost what
# PREFILL_FORWARD_TOKENS tokens more compute do (an estimate for a 1B model on an H200: ~1.5 ms of
# launches for 24 eager layers against ~6 us of compute a token), so far apart lengths prefill apart.
PREFILL_TOKENS = 4096
PREFILL_FORWARD_TOKENS = 256


def prefill_groups(lengths: list[int]) -> list[list[int]]:
    """The prompts (by index) that prefill together: runs of the prompts in order of length, chosen to
    minimise forwards x PREFILL_FORWARD_TOKENS + padded tokens, each run at most PREFILL_TOKENS padded
    tokens (a longer prompt alone)."""
    order = sorted(range(len(lengths)), key=lambda r: lengths[r])
    cost, cut = [0] + [math.inf] * len(order), [0] * (len(order) + 1)  # of the first j; their last run's start
    for j in range(1, len(order) + 1):
        longest = lengths[order[j - 1]]
        for i in range(j - 1, -1, -1):  # the last run: prompts i..j-1, padded to the j-th's length
            if i < j - 1 and (j - i) * longest > PREFILL_TOKENS:
                break
            c = cost[i] + PREFILL_FORWARD_TOKENS + (j - i) * longest
            if c < cost[j]:
                cost[j], cut[j] = c, i
    groups, j = [], len(order)
    while j:
        groups.append(order[cut[j]:j])
        j = cut[j]
    return groups[::-1]


def _inputs(model, tokens: Tensor, positions: Tensor, slots: int):
    """A step's section input, positions [b, 1], rope tables, the self-attention mask over the caches'
    `slots` and next entries' positions (compiled into a kernel or two: eager, the embedding and rope
    tables are ~10 launches per step; the mask is made here once, not at the start of every section)."""
    pos = positions[:, None]
    return model.embed(tokens[:, None], pos), pos, model.rope(pos), causal_keep(pos, slots), positions + 1


def _logits(model, outs: list[Tensor], norm=None) -> Tensor:
    return model.logits(outs, norm)[:, 0]


def _advance_greedy(logits: Tensor, tokens: Tensor, positions: Tensor) -> None:
    """Greedy sampling and the step's advance in place, compiled (eager, a one-row argmax over 32k
    logits is one 12 µs kernel; compiled, `sampling.greedy` splits it over the vocabulary's groups)."""
    tokens.copy_(sample(logits, SamplingParams(), None))
    positions.add_(1)


def _run_section(section, cache, e: Tensor, pos: Tensor, rope, keep: Tensor, normed: bool = True) -> Tensor:
    """One section's decode step over every cache row (what each section compiles to)."""
    return section(e, pos, None, cache, rope, keep=keep, normed=normed)


def _write_entries(section, cache, entries: Tensor, first: Tensor) -> None:
    section.write_entries(cache, entries, first)


def _store_entries(section, cache, kv: Tensor, first: Tensor) -> None:
    section.store_entries(cache, kv, first)


@dataclass
class GenerationResult:
    tokens: list[list[int]]  # generated ids per prompt (up to and including a stop id)
    prompt_logits: Optional[list[Tensor]] = None  # per prompt [v]: logits at its last position
    step_logits: Optional[Tensor] = None  # [steps, b, v]: logits of every decode step
    seconds: float = 0.0


def _progress(done: int, total: int, batch: int, start: float) -> None:
    rate = done * batch / max(time.perf_counter() - start, 1e-9)
    bar = "#" * int(30 * done / total)
    print(f"\rgenerating [{bar:<30}] {done}/{total} tokens, {rate:.1f} tok/s", end="", file=sys.stderr)


def _free_memory(device: torch.device) -> Optional[int]:
    """Bytes free on a CUDA device (None elsewhere: host memory is not checked)."""
    return torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else None


class CacheMemoryError(ValueError):
    """The caches a generator was asked for do not fit in the device's free memory."""


def _check_cache_memory(model: StagLM, batch: int, max_len: int, slots: int, sections: list[int]) -> None:
    """Caches of `slots` (max_len, or one more) larger than the device's free memory fail here, with
    their size and the knobs that set it, instead of as an allocator error inside the first section's
    cache."""
    param = next(model.parameters())
    free = _free_memory(param.device)
    if free is None:
        return
    meta = torch.device("meta")
    need = 0
    for s in sections:
        cache = model.sections[s].new_cache(batch, slots, param.dtype, meta, bounded=True)
        need += sum(t.nbytes for t in cache.kv) + (cache.cross.nbytes if cache.cross is not None else 0)
    if need > free:
        raise CacheMemoryError(f"caches for batch={batch} rows of max_len={max_len} slots need "
                               f"{need / 2**30:.1f} GiB; {free / 2**30:.1f} GiB are free on {param.device}: "
                               f"decode fewer rows at once, or fewer new tokens.")


@dataclass(frozen=True)
class SectionPlacement:
    """Where sections run: rank = section * tp + tensor-parallel rank."""

    sections: int
    tp: int
    rank: int

    @property
    def section(self) -> int:
        return self.rank // self.tp

    def peer(self, section: int) -> int:
        """The rank of `section` with this rank's tensor-parallel index."""
        return section * self.tp + self.rank % self.tp

    @property
    def sampler(self) -> int:
        return (self.sections - 1) * self.tp

    def check(self, world: int) -> None:
        if world != self.sections * self.tp:
            raise ValueError(f"{world} ranks for {self.sections} sections x tp {self.tp}: one section per "
                             f"tensor-parallel group needs exactly {self.sections * self.tp} ranks.")


def distinct_streams(n: int) -> list[torch.cuda.Stream]:
    """n different CUDA streams. torch hands streams out round-robin from a pool of 32, and
    torch.cuda.graph captures on one of them by default: a section whose stream was the capture stream
    queued its step there before the next section's stream waited on it, so the graph ran the sections
    one after the other (StagFormer p=2 window 1, b=8: 1.95 against 1.46 ms/token; in about one
    generator of 16)."""
    streams: list[torch.cuda.Stream] = []
    for _ in range(4 * n + 32):
        stream = torch.cuda.Stream()
        if all(stream != s for s in streams):
            streams.append(stream)
        if len(streams) == n:
            return streams
    raise RuntimeError(f"{n} different CUDA streams: torch's pool has fewer (at most 32 sections per process).")


def compile_options(device: torch.device, compile: bool, deterministic: bool) -> dict:
    """Inductor's options for the step's compiled functions (none: run them eagerly). Programmatic
    dependent launch lets each compiled kernel start while the previous one drains (Hopper and later;
    on an H200 StagFormer p=2 1.44 -> 1.38 ms/token at b=1); combo kernels put independent pointwise
    kernels of a step into one launch (GPT b=1 1.308 -> 1.255; results/decode_combo_kernels_h200.json).
    Multi-kernel compiles a reduction of up to 16k features (the split-K sum + residual + norm over 2048,
    looped by default past 1024) both persistent and looped and keeps the faster at its first call (a
    warm-up, before capture): on an H100 GPT b=8 1.745 -> 1.637, b=32 2.783 -> 2.679 ms/token
    (results/decode_multi_kernel_ab_h100.json). That pick is timed and may differ from one process to
    the next, so deterministic decoding compiles without it."""
    if not compile or device.type != "cuda":
        return {}
    return {"triton.enable_pdl": True, "combo_kernels": True, **({} if deterministic else {"triton.multi_kernel": 1})}


class StaggeredGenerator:
    """Greedy or sampled generation from a StagLM (possibly DeepSpeed-sharded).

    `placement` None: every section on this process (which may still be one of a TP group, with
    `comm` given to share the sampled tokens); otherwise this rank's section only. `cuda_graph`,
    `compile` and `kernels` (one-row matmuls, with the norm before and the activation and residual add
    after them, on `serving.gemv`'s kernel; matmuls of 2-64 rows on `serving.skinny_gemm`'s; small-batch
    attention on `serving.decode_attention`'s) are
    the defaults, the fastest configuration, and apply on CUDA only (the kernels on Hopper and later);
    turn them off to debug or to compare. `deterministic` gives the same tokens and logits on every run
    at any batch size: every one-query attention goes to the decode attention kernel, where steps of
    more than `decode_attention.ROWS` kv heads would take SDPA, which picks cuDNN's attention on
    Hopper and later, not run-to-run deterministic (elsewhere SDPA's choice is, and it stays).
    """

    def __init__(self, model: StagLM, max_len: int, batch: int, placement: Optional[SectionPlacement] = None,
                 comm=None, recurrent: bool = False, cuda_graph: bool = True, compile: bool = True,
                 kernels: bool = True, deterministic: bool = False):
        cfg = model.cfg
        if recurrent:
            check_recurrent(cfg, one_rank=placement is None)
        if max_len > cfg.max_sequence_length and cfg.position_embedding == "learned_absolute":
            raise ValueError(f"max_len={max_len} exceeds the model's {cfg.max_sequence_length} positions.")
        # one section per rank: section k-1's rank sends section k its entries' keys and values
        self._upstream = placement is not None and model.entries_made_upstream()
        if self._upstream and placement.section + 1 < cfg.sections and model.next_entries is None:
            raise ValueError(f"section {placement.section} on its own rank projects section "
                             f"{placement.section + 1}'s cross-attention entries: call "
                             f"model.keep_sections([{placement.section}]) before DeepSpeed shards the model.")
        self.model, self.max_len, self.batch, self.recurrent = model.eval(), max_len, batch, recurrent
        model.fuse_projections()  # after DeepSpeed's sharding: each rank fuses its own shards
        # one-row matmuls, fused with their norm, activation and residual add, on the streaming GEMV
        # kernel (Hopper+): GPT b=1 on an H200 1.54 -> 1.30 ms/token (benchmarks/decode_engine.py);
        # small-batch attention on the flash-decoding kernel: 1.25 -> 1.17 (decode_attention.py); 2-64-row
        # matmuls on a split-K tensor-core GEMM: GPT b=8 1.68 -> 1.50, b=32 2.53 -> 2.32 (skinny_gemm.py)
        device = next(model.parameters()).device
        if deterministic and not kernels and _gemv.available(device):  # the GPUs where SDPA prefers cuDNN
            raise ValueError("deterministic decoding needs the engine's kernels on this GPU: SDPA would take "
                             "cuDNN's attention, which is not run-to-run deterministic.")
        kernels = kernels and _gemv.available(device)
        if kernels:
            attention, cached = _attention.attention, _attention.cached_attention
            if deterministic:
                attention, cached = (functools.partial(f, deterministic=True) for f in (attention, cached))
            model.use_kernels(skinny_gemm.linear, attention, cached)
        else:
            model.use_kernels()
        self.place, self.comm = placement, comm
        self.p = cfg.sections
        self.mine = list(range(self.p)) if placement is None else [placement.section]
        attn = model.sections[self.mine[0]].layers[0].self_attn
        # (query heads, kv heads, self-attention) of this rank's attentions (its shard, under tensor parallelism):
        # the self-attention's, and from the second section on the cross-attention's, whose every query head has its own
        heads, kv_heads = (attn.q_proj.weight.shape[0] // attn.head_dim, attn.k_proj.weight.shape[0] // attn.head_dim)
        steps = {(heads, kv_heads, True)} | {(heads, heads, False) for k in self.mine if k}
        if (deterministic and kernels and not _attention.takes_head_dim(attn.head_dim)
                and next(model.parameters()).dtype in (torch.bfloat16, torch.float16)):
            raise ValueError(f"deterministic decoding: the decode attention kernel takes heads of 16-256 (a "
                             f"power of two), not {attn.head_dim}, and SDPA would take cuDNN's attention, "
                             f"which is not run-to-run deterministic; decode in fp32 (--dtype fp32) instead.")
        self.bucket = None
        if not (kernels and all(_attention.takes(batch, h, kv, deterministic, cached) for h, kv, cached in steps)):
            self.bucket = SLOT_BUCKET * -(-max_len // (SLOT_BUCKET * MAX_BUCKETS))
        # where steps read slot buckets, the caches keep a slot past max_len that no step reads: no
        # bucket's mask or cache view is then a whole tensor, so one compiled section step serves every
        # bucket (at the whole width, dynamo specialised on the mask being contiguous and compiled again)
        self._slots = max_len + (self.bucket is not None)
        _check_cache_memory(model, batch, max_len, self._slots, self.mine)
        # shared weights, every pass here: a step runs all passes as one batch over the shared weights
        batched = cfg.shared_weights and placement is None and not recurrent
        self.caches = model.new_caches(batch, self._slots, self.mine, bounded=True, passes_together=batched)
        param = next(model.parameters())
        self.device, self.dtype, self.hidden = param.device, param.dtype, cfg.hidden_size
        self.combine = cfg.output == "combine"
        self.cuda_graph = cuda_graph and self.device.type == "cuda"
        self._graphs, self._graph_key = {}, None  # the step's CUDA graph per bucket of slots read
        self._pool = torch.cuda.graph_pool_handle() if self.cuda_graph else None  # shared by the graphs
        self._gen = torch.Generator(device=self.device)  # sampling's random numbers, seeded per generate
        # graphed steps run the sections of a step on parallel streams (branches of the graph);
        # `compile` fuses each section's step and cross-entry write (norms, rope, cache writes, bias
        # adds) with torch.compile, one compiled function per section so the streams stay parallel
        streams = distinct_streams(len(self.mine) + 1) if self.cuda_graph else [None]
        self._capture_stream = streams.pop()  # graphs are captured here, never on a section's stream
        self._streams = streams if len(streams) > 1 else []
        options = compile_options(self.device, compile, deterministic)
        wrap = (lambda fn: torch.compile(fn, dynamic=False, options=options)) if options else (lambda fn: fn)
        if options:  # the sections share one compiled function, which dynamo guards on the section and
            # compiles per batch shape: dynamo's default budget of 8 compilations per function becomes 8
            # per section (past it a section would run eager)
            torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 8 * self.p)
        # the section and its cache are arguments, not attributes of this generator: compiled code is
        # guarded on their shapes, so a later generator of the same model and shapes reuses it
        sections = {k: (model.sections[k], self.caches[k]) for k in self.mine}
        # the last section's final norm runs inside the head's matmul where its output feeds nothing
        # else (output 'last'; not recurrent, whose outputs are entries; not batched passes): one
        # kernel fewer per step (with the mask made once in `_inputs`, GPT b=1 0.905 -> 0.899 ms/token)
        fold = (cfg.output == "last" and not recurrent and not batched and self.p - 1 in self.mine
                and isinstance(model.lm_head, Linear))
        self._run = {k: functools.partial(wrap(_run_section), *sections[k], normed=not (fold and k == self.p - 1))
                     for k in self.mine}
        self._write = {k: functools.partial(wrap(_write_entries), *sections[k]) for k in self.mine if k}
        self._store = {k: functools.partial(wrap(_store_entries), *sections[k])
                       for k in self.mine if k and self._upstream}
        self._inputs = functools.partial(wrap(_inputs), model, slots=self._slots)
        self._logits = functools.partial(wrap(_logits), model, norm=model.sections[-1].norm if fold else None)
        self._advance_greedy = wrap(_advance_greedy)
        self._project = wrap(model.next_entries) if self._upstream and model.next_entries is not None else None
        self._shared = None
        if batched:
            self._shared = functools.partial(wrap(shared_passes_step), list(model.sections),
                                             [self.caches[k] for k in range(self.p)])

    # ------------------------------------------------------------------ helpers
    def slots(self, filled: Optional[int] = None) -> int:
        """The cache slots a step reads when no row has filled more than `filled` (None: any number)."""
        if self.bucket is None or filled is None:
            return self.max_len
        return min(self.max_len, -(-filled // self.bucket) * self.bucket)

    @property
    def _last(self) -> bool:
        return self.place is None or self.place.section == self.p - 1

    def _handed_on_width(self, k: int) -> int:
        """Per token, what section k-1's rank sends section k's rank at each step: its output, or (entries
        made upstream) every layer's key and value of the new entry, as many as section k's cache holds."""
        if not self._upstream:
            return self.hidden
        layers, _, _, heads, _, head_dim = self.caches[k].cross.shape
        return layers * 2 * heads * head_dim

    def _send(self, t: Tensor, section: int):
        return self.comm.isend(t.contiguous(), self.place.peer(section))

    def _recv(self, shape, section: int):
        buf = torch.empty(shape, dtype=self.dtype, device=self.device)
        return buf, self.comm.irecv(buf, self.place.peer(section))

    def _outputs_for_logits(self, mine: Tensor, prev: Optional[Tensor]) -> list[Tensor]:
        """On the last section's ranks: every section's output ('combine') or just its own."""
        if not self.combine:
            return [mine]
        outs = []
        for k in range(self.p - 2):
            buf, req = self._recv(mine.shape, k)
            req.wait()
            outs.append(buf)
        return outs + [prev, mine]

    def _send_for_logits(self, t: Tensor, k: int) -> None:
        if self.combine and k < self.p - 2:
            self._send(t, self.p - 1).wait()

    @property
    def _sampler(self) -> bool:
        """Whether this rank samples (others receive its tokens; without `comm` it is the only one)."""
        return self.comm is None or self.comm.get_rank() == (self.place.sampler if self.place else 0)

    def _broadcast(self, tokens: Tensor) -> Tensor:
        if self.comm is not None:
            self.comm.broadcast(tokens, self.place.sampler if self.place else 0)
        return tokens

    # ------------------------------------------------------------------ prefill
    @torch.no_grad()
    def prefill(self, prompts: list[list[int]]) -> Optional[Tensor]:
        """Every section over the prompts into cache rows 0..len(prompts)-1 -> the logits [n, V] at each
        prompt's last token where this rank samples (else None). Prompts of similar lengths run as one
        forward (`prefill_groups`), padded on the right: a row's positions and cache slots are its own
        prompt's, its tokens read no padding (causal attention), and what the padding writes lands in
        slots past the row's prompt, which every step writes before it reads them."""
        last = {}
        for rows in prefill_groups([len(p) for p in prompts]):
            logits = self._prefill_rows(rows, [prompts[r] for r in rows])
            if logits is not None:
                last.update(zip(rows, logits))
        return torch.stack([last[r] for r in range(len(prompts))]) if last else None

    def _prefill_rows(self, rows: list[int], prompts: list[list[int]]) -> Optional[Tensor]:
        """One prefill forward of `prompts` into cache rows `rows`: logits [len(rows), V] or None."""
        m, n, b = self.model, max(len(p) for p in prompts), len(prompts)
        ids = torch.tensor([p + [0] * (n - len(p)) for p in prompts], device=self.device)
        lengths = torch.tensor([len(p) for p in prompts], device=self.device)
        positions = torch.arange(n, device=self.device)[None].expand(b, -1)
        at_rows = torch.tensor(rows, device=self.device)
        e, rope = m.embed(ids, positions), m.rope(positions)
        keep = causal_keep(positions, n)  # the prompts' own slots: self-attention reads no others

        def run(k: int, entries: Optional[Tensor]) -> Tensor:
            return m.sections[k](e, positions, at_rows, self.caches[k], rope, entries, keep=keep)

        def logits(outs: list[Tensor]) -> Tensor:  # the head on each row's last token only
            return m.logits([out[torch.arange(b, device=self.device), lengths - 1][:, None] for out in outs])[:, 0]

        if self.place is None:
            outs = []
            for k in range(self.p):
                outs.append(run(k, self._prefill_entries(k, outs[-1], lengths, at_rows) if k else None))
            return logits(outs)
        k, prev, entries = self.place.section, None, None
        if k:
            prev, req = self._recv((b, n, self.hidden), k - 1)
            req.wait()
            entries = self._prefill_entries(k, prev, lengths, at_rows)
        out = run(k, entries)
        if not self._last:
            self._send(out, k + 1).wait()
            self._send_for_logits(out, k)
            return None
        return logits(self._outputs_for_logits(out, prev))

    def _prefill_entries(self, k: int, prev: Tensor, lengths: Tensor, rows: Tensor) -> Tensor:
        """Section k's entries 0..n of the prompts (the null entry, then section k-1's outputs at
        0..n-1; a row's own are its first length + 1): stored in its cache (a window's ring keeps each
        row's last ones) and returned whole for the prompts' own positions to read."""
        section = self.model.sections[k]
        kv = section.project(torch.cat([self.model.null_entry(prev), prev], 1))
        section.store_entries(self.caches[k], kv, torch.zeros_like(lengths), rows, counts=lengths + 1)
        return section.all_entries(kv)

    # ------------------------------------------------------------------ steps
    def _compute(self, tokens: Tensor, positions: Tensor, slots: int) -> tuple[list[Tensor], Optional[Tensor]]:
        """This process's sections on tokens [b] at positions [b] reading the caches' first `slots`:
        (outputs, logits or None)."""
        e, pos, rope, keep, entry = self._inputs(tokens, positions)
        if self.bucket is not None:
            keep = keep[..., :slots]  # the sections read as many cache slots as the mask covers
            torch._dynamo.maybe_mark_dynamic(keep, 3)  # one compiled section step for every bucket
        if self._shared is not None:
            outs = self._shared(e, pos, rope, keep)
            for k in range(1, self.p):  # section k-1's output becomes section k's entry at position + 1
                self._write[k](outs[k - 1], entry)
            return outs, self._logits(outs)
        active = [1] if self.recurrent else self.mine
        outs = self._run_sections(active, e, pos, rope, keep, entry)
        if self.place is None:
            return outs, self._logits(outs)
        if self._project is not None:  # what this rank hands on: the next section's entry keys and values
            return [self._project(outs[0])], None
        return outs, (self._logits(outs) if self._last and not self.combine else None)

    def _run_and_pass_on(self, k: int, e: Tensor, pos: Tensor, rope, keep: Tensor, entry: Tensor) -> Tensor:
        """Section k's step, then (all sections here) its output becomes the next section's entry
        `entry` (recurrent: its own). The next section reads entries <= this step's position only,
        so the write may overlap that section's step: on k's stream it leaves the critical path."""
        out = self._run[k](e, pos, rope, keep)
        if self.place is None:
            if self.recurrent:
                self._write[1](out, entry)
            elif k + 1 < self.p:
                self._write[k + 1](out, entry)
        return out

    def _run_sections(self, active: list[int], e: Tensor, pos: Tensor, rope, keep: Tensor, entry: Tensor
                      ) -> list[Tensor]:
        """The sections of a step are independent: on their own CUDA streams when graphed, each kernel
        with its whole grid and PDL (splitting the GEMV's grid between the streams, without PDL, was
        3-4% slower: StagFormer p=2 b=1 0.998 against 0.957 ms/token, window 1 0.937 against 0.907)."""
        if len(active) == 1 or not self._streams:
            return [self._run_and_pass_on(k, e, pos, rope, keep, entry) for k in active]
        main, outs = torch.cuda.current_stream(), []
        for k, stream in zip(active, self._streams):
            stream.wait_stream(main)
            with torch.cuda.stream(stream):
                outs.append(self._run_and_pass_on(k, e, pos, rope, keep, entry))
        for stream in self._streams[:len(active)]:
            main.wait_stream(stream)
        return outs

    def _token_step(self, tokens: Tensor, positions: Tensor, slots: int, params: SamplingParams) -> Optional[Tensor]:
        """Every section here on tokens [b], then sampling: tokens and positions advance in place
        (what one CUDA graph replays per token). Returns the logits."""
        logits = self._compute(tokens, positions, slots)[1]
        if params.temperature == 0:
            self._advance_greedy(logits, tokens, positions)
        else:
            tokens.copy_(sample(logits, params, self._gen))
            positions.add_(1)
        return logits

    def _capture(self, fn, tokens: Tensor, positions: Tensor, key, widths) -> None:
        """Capture fn(tokens, positions, slots) for each of `widths` (slots read) as a CUDA graph over
        static inputs, unless the graph for this batch, `key` (the sampling rule it holds) and width
        exists. The graphs share their inputs and memory pool: at most one replays at a time."""
        if self._graph_key != (tokens.shape, key):
            self._graphs, self._graph_key = {}, (tokens.shape, key)
            self._static = (tokens.clone(), positions.clone())
        for buf, given in zip(self._static, (tokens, positions)):
            if given is not buf:  # a graph captured now warms up on these inputs
                buf.copy_(given)
        for slots in widths:
            if slots in self._graphs:
                continue
            side = self._capture_stream
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                # warm-ups compile and initialise lazily; they write only cache slots that the step
                # writes again before it reads them (its own position, the next cross entry)
                for _ in range(2):
                    fn(self._static[0].clone(), self._static[1].clone(), slots)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            graph.register_generator_state(self._gen)
            with torch.cuda.graph(graph, pool=self._pool, stream=side):
                self._graphs[slots] = graph, fn(*self._static, slots)

    def _graphed(self, fn, tokens: Tensor, positions: Tensor, key, slots: int):
        """fn(tokens, positions, slots) replayed from its CUDA graph; passing the graphs' own input
        buffers back in (what a graphed step returns) copies nothing."""
        self._capture(fn, tokens, positions, key, [slots])
        graph, result = self._graphs[slots]
        graph.replay()
        return result

    @staticmethod
    def _rule(params: SamplingParams) -> tuple:
        return (params.temperature, params.top_k, params.top_p)

    @torch.no_grad()
    def step(self, tokens: Tensor, positions: Tensor, params: SamplingParams = SamplingParams(),
             filled: Optional[int] = None) -> tuple[Tensor, Tensor, Optional[Tensor]]:
        """One token step, sampling included: tokens [b] at positions [b] -> (next tokens, next
        positions, logits where this rank samples, else None), with no host sync. `filled`: a bound on
        every row's position + 1, where the caller knows one (`stepper`), so that the step reads only
        the cache slots that can hold them. Graphed, the returned tensors are the graph's buffers,
        which the next step overwrites: pass them back in."""
        slots = self.slots(filled)
        if self.place is None:
            if self.cuda_graph:
                logits = self._graphed(functools.partial(self._token_step, params=params), tokens, positions,
                                       self._rule(params), slots)
                tokens, positions = self._static[0], self._static[1]
            else:
                tokens, positions = tokens.clone(), positions.clone()
                logits = self._token_step(tokens, positions, slots, params)
            return self._broadcast(tokens), positions, logits
        k, b = self.place.section, tokens.shape[0]
        prev, req = self._recv((b, 1, self._handed_on_width(k)), k - 1) if k else (None, None)
        if self.cuda_graph:
            outs, logits = self._graphed(self._compute, tokens, positions, None, slots)
        else:
            outs, logits = self._compute(tokens, positions, slots)
        out = outs[0]
        send = self._send(out, k + 1) if not self._last else None
        self._send_for_logits(out, k)
        if req is not None:
            req.wait()
            (self._store if self._upstream else self._write)[k](prev, positions + 1)
        if send is not None:
            send.wait()
        if self._last and self.combine:
            logits = self.model.logits(self._outputs_for_logits(out, prev))[:, 0]
        sampled = sample(logits, params, self._gen) if self._sampler else torch.zeros_like(tokens)
        return self._broadcast(sampled), positions + 1, logits if self._sampler else None

    def stepper(self, params: SamplingParams, longest: int):
        """`step` as `decode_loop` calls it, from prompts of at most `longest` tokens: the n-th call's
        rows are at positions <= longest + n."""
        calls = itertools.count()
        return lambda tokens, positions: self.step(tokens, positions, params, filled=longest + next(calls) + 1)

    def widths(self, params: SamplingParams, longest: int) -> list[int]:
        """The slots `stepper`'s steps read (decode_loop's max_new_tokens - 1 of them), each once, in order."""
        return sorted({self.slots(longest + n + 1) for n in range(params.max_new_tokens - 1)})

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], params: SamplingParams, keep_logits: bool = False,
                 progress: bool = False) -> GenerationResult:
        """Collective when distributed: every rank calls it with the same prompts, which decode `batch`
        at a time. Kept logits need at most one batch of prompts."""
        check_prompts(prompts, params, self.max_len)
        if keep_logits and len(prompts) > self.batch:
            raise ValueError(f"keep_logits=True keeps one batch's logits: give at most {self.batch} prompts, "
                             f"not {len(prompts)}.")
        tokens, seconds = [], 0.0
        for first in range(0, len(prompts), self.batch):
            group = prompts[first:first + self.batch]
            if progress and len(prompts) > self.batch:
                print(f"prompts {first + 1}-{first + len(group)} of {len(prompts)}", file=sys.stderr)
            result = self._generate(group, params, keep_logits, progress)
            tokens += result.tokens
            seconds += result.seconds
        return replace(result, tokens=tokens, seconds=seconds)

    def _generate(self, prompts: list[list[int]], params: SamplingParams, keep_logits: bool,
                  progress: bool) -> GenerationResult:
        """At most `batch` prompts. The step runs over every cache row, so a full batch replays one
        compiled step and graph: the rows past the prompts run too, from position 0 of whatever their
        caches hold, without a prefill. Rows are independent, so they change no prompt's tokens; they
        count as stopped, and their tokens and logits are dropped."""
        start = time.perf_counter()
        n, rows = len(prompts), self.batch
        last = self.prefill(prompts)
        longest = max(len(p) for p in prompts)
        positions = torch.tensor([len(p) for p in prompts] + [0] * (rows - n), device=self.device)
        if self.cuda_graph and self.place is None:  # capture first: its warm-ups draw no numbers later
            self._capture(functools.partial(self._token_step, params=params),
                          torch.zeros(rows, dtype=torch.long, device=self.device), positions, self._rule(params),
                          self.widths(params, longest))
        self._gen.manual_seed(params.seed)
        first = torch.zeros(rows, dtype=torch.long, device=self.device)
        if self._sampler:
            first[:n] = sample(last, params, self._gen)
        report = (lambda done: _progress(done, params.max_new_tokens, n, start)) if progress else None
        out, kept = decode_loop(self._broadcast(first), self.stepper(params, longest), positions,
                                params, keep_logits=keep_logits and self._sampler, on_token=report, live=n)
        if progress:
            print(file=sys.stderr)
        return GenerationResult(out[:n], list(last) if keep_logits and self._sampler else None,
                                torch.stack(kept)[:, :n] if kept else None, time.perf_counter() - start)
