"""`megatron-stag generate`: checkpoint + sentencepiece tokenizer -> staggered generation.

Two engines share prompt handling, sampling and output: `megatron` (default) decodes a megatron
checkpoint with our engine; `deepspeed` decodes an exported package (`megatron-stag export`) under
DeepSpeed's InferenceEngine (`deepspeed_inference/`).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from megatron_stag.checkpointing.checkpoint_io import load_model_weights, resolve_checkpoint
from megatron_stag.models.model_args import ModelArgs


def prepare_prompts(ns, prompts: list[str], tok_path: Path, vocab_size: int, context: int):
    """(tokenizer, prompt ids, sampling params), with every check done before a model is built."""
    from megatron_stag.data.tokenizer import load_tokenizer
    from megatron_stag.inference.sampling import SamplingParams

    try:
        tok = load_tokenizer(tok_path)
    except FileNotFoundError as err:
        raise SystemExit(str(err)) from None
    if tok.vocab_size > vocab_size:
        raise SystemExit(f"tokenizer {tok_path} has {tok.vocab_size} pieces but the model was trained "
                         f"with vocab_size={vocab_size}: use the checkpoint's own tokenizer.")
    ids = [tok.tokenize(p) for p in prompts]
    for p, i in zip(prompts, ids):
        if len(i) + ns.max_new_tokens > context:
            raise SystemExit(f"prompt {p[:40]!r}... has {len(i)} tokens; with --max-new-tokens "
                             f"{ns.max_new_tokens} it exceeds the context of {context}.")
    stop_ids = tuple(t for s in ns.stop for t in tok.tokenize(s)[-1:])
    params = SamplingParams(max_new_tokens=ns.max_new_tokens, temperature=ns.temperature,
                            top_k=ns.top_k, top_p=ns.top_p, seed=ns.seed, stop_ids=stop_ids)
    return tok, ids, params


def report(ns, tok, prompts: list[str], result) -> int:
    """Tokens/s on stderr; completions as text on stdout or JSONL in --output."""
    n_tokens = sum(len(t) for t in result.tokens)
    print(f"{n_tokens} tokens in {result.seconds:.2f}s ({n_tokens / result.seconds:.1f} tokens/s)",
          file=sys.stderr)
    records = [dict(prompt=p, completion=tok.detokenize(t), tokens=t)
               for p, t in zip(prompts, result.tokens)]
    if ns.output:
        Path(ns.output).write_text("".join(json.dumps(r) + "\n" for r in records))
    else:
        for r in records:
            print(r["prompt"] + r["completion"])
    return 0


def generate_from_checkpoint(ns, prompts: list[str]) -> int:
    if getattr(ns, "engine", "megatron") == "deepspeed":
        from megatron_stag.deepspeed_inference.generate import generate_with_deepspeed

        return generate_with_deepspeed(ns, prompts)
    from megatron_stag.inference.staggered_generation import StaggeredGenerator
    from megatron_stag.platform.distributed import initialize

    try:
        weights, run_dir = resolve_checkpoint(ns.checkpoint)
    except (FileNotFoundError, ValueError) as err:
        raise SystemExit(str(err)) from None
    ckpt = ns.checkpoint  # load_model_weights resolves it the same way
    args = ModelArgs.load(run_dir / "model_args.json")
    tok_path = Path(ns.tokenizer) if ns.tokenizer else run_dir / "tokenizer.model"
    tok, ids, params = prepare_prompts(ns, prompts, tok_path, args.vocab_size, args.max_sequence_length)
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:  # under torchrun/srun: one section per pipeline rank, all decoding at once
        if world != args.stag_sections or ns.recurrent:
            raise SystemExit(f"{world} ranks: concurrent decoding puts one section on each rank, so "
                             f"run {args.stag_sections} ranks (--nproc_per_node {args.stag_sections}) "
                             f"and no --recurrent.")
        from megatron.core import parallel_state as ps

        from megatron_stag.inference.distributed_generation import DistributedStaggeredGenerator

        initialize(tp=1, pp=world, seed=ns.seed)
        model = args.build(args.config(pp=world), pre_process=True,
                           post_process=ps.is_pipeline_last_stage()).eval()
        load_model_weights(model, ckpt)
        gen = DistributedStaggeredGenerator(model, max_len=args.max_sequence_length, batch=len(ids))
        result = gen.generate(ids, params)
        if dist.get_rank() != world - 1:
            return 0  # the last section's rank reports
    else:
        initialize(tp=1, pp=1, seed=ns.seed)
        model = args.build(args.config()).eval()
        load_model_weights(model, ckpt)
        gen = StaggeredGenerator(model, max_len=args.max_sequence_length, batch=len(ids),
                                 recurrent=ns.recurrent, cuda_graph=True)
        result = gen.generate(ids, params, progress=True)
    return report(ns, tok, prompts, result)
