"""`megatron-stag generate`: a megatron checkpoint or an exported package -> staggered generation.

One engine (`engine.StaggeredGenerator`) for every layout. The model is the serving model
(`model.StagLM`): loaded from an exported package, or converted in memory from a megatron checkpoint of
any TP/PP layout. On a GPU it decodes in bf16 with the compiled, CUDA-graphed step unless told
otherwise. Ranks come from the launcher (torchrun, srun, `deepspeed --num_gpus N`):
1 rank: every section here; world == --tp: every section on each rank, tensor-parallel over all;
world == sections x --tp: one section per tensor-parallel group, decoding concurrently.
`--engine deepspeed` hands the same model to `deepspeed.init_inference` (AutoTP shards it for --tp);
the engine drives it the same way.
"""

from __future__ import annotations

import json
import os
import pickle
import sys
from pathlib import Path

import torch

from megatron_stag.platform.files import check_output, write_atomic
from megatron_stag.serving.convert import DTYPES


def plan_ranks(world: int, sections: int, tp: int, recurrent: bool):
    """This launch's layout: None (all sections per rank) or one section per TP group."""
    if world == tp:
        return None
    if recurrent:
        raise SystemExit("--recurrent runs both passes of the shared weights on one rank: launch "
                         f"{tp} rank(s) (world size == --tp), not {world}.")
    if world != sections * tp:
        raise SystemExit(f"{world} ranks do not fit the model: launch {tp} (all {sections} sections per "
                         f"rank, --tp {tp}) or {sections * tp} ranks (one section per group of --tp {tp}).")
    return "sections"


def prepare_prompts(ns, prompts: list[str], tok_dir: Path, vocab_size: int, context: int):
    """(tokenizer, prompt ids, sampling params, end tokens), every check done before a model is built. The
    tokenizer is `--tokenizer`, else the model's (`prompt_tokenizer`); a row stops at a token that ends
    its text (`prompt_tokenizer.end_ids`) or at a stop string."""
    from megatron_stag.serving.prompt_tokenizer import end_ids, load_prompt_tokenizer
    from megatron_stag.serving.sampling import SamplingParams

    try:
        tok = load_prompt_tokenizer(tok_dir, ns.tokenizer)
    except (FileNotFoundError, ValueError) as err:
        raise SystemExit(str(err)) from None
    if tok.vocab_size > vocab_size:
        raise SystemExit(f"tokenizer {ns.tokenizer or tok_dir} has {tok.vocab_size} pieces but the model was "
                         f"trained with vocab_size={vocab_size}: use the checkpoint's own tokenizer.")
    ids = [tok.tokenize(p) for p in prompts]
    for p, i in zip(prompts, ids):
        if len(i) + ns.max_new_tokens > context:
            raise SystemExit(f"prompt {p[:40]!r}... has {len(i)} tokens; with --max-new-tokens "
                             f"{ns.max_new_tokens} it exceeds the context of {context}.")
    ends = end_ids(tok_dir, tok)

    def stop(generated: list[int]) -> bool:  # an end token, or a whole stop string anywhere in the completion
        return generated[-1] in ends or any(s in tok.detokenize(generated) for s in ns.stop)
    params = SamplingParams(max_new_tokens=ns.max_new_tokens, temperature=ns.temperature,
                            top_k=ns.top_k, top_p=ns.top_p, seed=ns.seed, stop=stop)
    return tok, ids, params, ends


def check_options(ns, nothing: str = "nothing was generated") -> None:
    """Sampling flags, stop strings and the output path, checked before anything loads."""
    from megatron_stag.serving.sampling import SamplingParams

    try:
        SamplingParams(max_new_tokens=ns.max_new_tokens, temperature=ns.temperature, top_k=ns.top_k,
                       top_p=ns.top_p, seed=ns.seed)
    except ValueError as err:
        flag = str(err).split("=")[0].replace("_", "-")
        raise SystemExit(f"--{flag}: {err}") from None
    if ns.batch_size < 1:
        raise SystemExit(f"--batch-size {ns.batch_size}: give at least 1.")
    if any(not s for s in ns.stop):
        raise SystemExit("--stop '': give a non-empty stop string.")
    try:
        check_output(ns.output, ns.overwrite)
    except OSError as err:
        raise SystemExit(f"{err} ({nothing}).") from None


def check_request(ns, prompts: list[str], world: int | None, nothing: str = "nothing was generated"):
    """(model description, rank layout, tokenizer, prompt ids, sampling params, end tokens): every
    check on the options, the checkpoint, the layout over `world` ranks and the prompts, before the
    engine (Triton, dynamo: seconds of imports) and DeepSpeed are imported. `generate` runs it in each
    rank; `submit-generate` before submitting, with `world` None: it sizes the job to fit the model."""
    from megatron_stag.serving.convert import ExportError, describe
    from megatron_stag.serving.deepspeed import check_tensor_parallel
    from megatron_stag.serving.model import check_recurrent

    check_options(ns, nothing)
    try:
        cfg, tok_dir = describe(Path(ns.checkpoint))
        check_tensor_parallel(cfg, ns.tp)
        if ns.recurrent:
            check_recurrent(cfg)
    except (ExportError, FileNotFoundError, ValueError, pickle.UnpicklingError) as err:
        raise SystemExit(str(err)) from None
    if ns.tp > 1 and ns.engine != "deepspeed":
        raise SystemExit(f"--tp {ns.tp}: tensor parallelism is DeepSpeed's AutoTP here; add --engine deepspeed.")
    layout = plan_ranks(world, cfg.sections, ns.tp, ns.recurrent) if world is not None else None
    return (cfg, layout, *prepare_prompts(ns, prompts, tok_dir, cfg.vocab_size, cfg.max_sequence_length))


def report(ns, tok, prompts: list[str], result, ends: set[int]) -> int:
    """Tokens/s on stderr; completions as text on stdout or JSONL in --output, each with why it ended:
    "eos" (an end token, kept in `tokens`, not in the text), "stop" (a stop string) or "length"."""
    n_tokens = sum(len(t) for t in result.tokens)
    print(f"{n_tokens} tokens in {result.seconds:.2f}s ({n_tokens / result.seconds:.1f} tokens/s)",
          file=sys.stderr)
    records = []
    for p, t in zip(prompts, result.tokens):
        text = tok.detokenize(t)
        finish = "eos" if t[-1] in ends else "stop" if any(s in text for s in ns.stop) else "length"
        records.append(dict(prompt=p, completion=_until_stop(text, ns.stop), tokens=t, finish_reason=finish))
    if ns.output:
        write_atomic(Path(ns.output), "".join(json.dumps(r) + "\n" for r in records))
    else:
        for r in records:
            print(r["prompt"] + r["completion"])
    return 0


def _start_comm(deepspeed: bool):
    """The communicator the engine uses between ranks (after the launcher set RANK/WORLD_SIZE)."""
    if deepspeed:
        import deepspeed.comm as dist

        from megatron_stag.serving.deepspeed import init_comm

        init_comm()
        return dist
    import torch.distributed as dist

    if not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return dist


def _until_stop(text: str, stops: list[str]) -> str:
    """The completion up to and including the first stop string."""
    ends = [text.index(s) + len(s) for s in stops if s in text]
    return text[:min(ends)] if ends else text


def generate_from_checkpoint(ns, prompts: list[str]) -> int:
    """Bad input fails at once (`check_request`), before the engine and DeepSpeed are imported."""
    from megatron_stag.serving.convert import load_serving_model
    from megatron_stag.serving.sampling import cache_slots

    deepspeed = ns.engine == "deepspeed"
    world = int(os.environ.get("WORLD_SIZE", "1"))
    cfg, layout, tok, ids, params, ends = check_request(ns, prompts, world)
    from megatron_stag.serving.engine import CacheMemoryError, SectionPlacement, StaggeredGenerator

    comm = _start_comm(deepspeed) if world > 1 else None
    device = f"cuda:{torch.cuda.current_device()}" if torch.cuda.is_available() else "cpu"
    dtype = DTYPES[ns.dtype] if ns.dtype != "auto" else (torch.bfloat16 if device != "cpu" else torch.float32)
    model = load_serving_model(Path(ns.checkpoint), device=device, dtype=torch.float32 if deepspeed else dtype)
    placement, group = None, None
    if layout == "sections":
        placement = SectionPlacement(cfg.sections, ns.tp, comm.get_rank())
        placement.check(world)
        model.keep_sections([placement.section])
    if deepspeed:
        from megatron_stag.serving.deepspeed import init_deepspeed_engine, section_groups

        if ns.tp > 1:
            group = section_groups(cfg.sections if layout else 1, ns.tp)
        model = init_deepspeed_engine(model, dtype=dtype, tp=ns.tp, group=group).module
    rows = min(len(ids), ns.batch_size)
    try:
        gen = StaggeredGenerator(model, max_len=cache_slots(ids, params), batch=rows, placement=placement,
                                 comm=comm, recurrent=ns.recurrent, cuda_graph=not ns.eager, compile=not ns.eager,
                                 deterministic=ns.deterministic)
    except CacheMemoryError as err:
        raise SystemExit(f"--batch-size {rows}, --max-new-tokens {ns.max_new_tokens}: {err}") from None
    except ValueError as err:  # options the engine cannot honour for this model (--deterministic, --recurrent)
        raise SystemExit(str(err)) from None
    result = gen.generate(ids, params, progress=world == 1)
    if comm is not None and comm.get_rank() != (placement.sampler if placement else 0):
        return 0  # the sampling rank reports
    return report(ns, tok, prompts, result, ends)
