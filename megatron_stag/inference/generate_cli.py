"""`megatron-stag generate`: checkpoint + sentencepiece tokenizer -> staggered generation."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from megatron_stag.checkpointing.checkpoint_io import load_model_weights, resolve_checkpoint
from megatron_stag.models.model_args import ModelArgs


def generate_from_checkpoint(ns, prompts: list[str]) -> int:
    from megatron_stag.data.tokenizer import load_tokenizer
    from megatron_stag.inference.sampling import SamplingParams
    from megatron_stag.inference.staggered_generation import StaggeredGenerator
    from megatron_stag.platform.distributed import initialize

    try:
        weights, run_dir = resolve_checkpoint(ns.checkpoint)
    except (FileNotFoundError, ValueError) as err:
        raise SystemExit(str(err)) from None
    ckpt = ns.checkpoint  # load_model_weights resolves it the same way
    args = ModelArgs.load(run_dir / "model_args.json")
    tok_path = Path(ns.tokenizer) if ns.tokenizer else run_dir / "tokenizer.model"
    try:
        tok = load_tokenizer(tok_path)
    except FileNotFoundError as err:
        raise SystemExit(str(err)) from None
    if tok.vocab_size > args.vocab_size:
        raise SystemExit(f"tokenizer {tok_path} has {tok.vocab_size} pieces but the model was trained "
                         f"with vocab_size={args.vocab_size}: use the checkpoint's own tokenizer.")
    ids = [tok.tokenize(p) for p in prompts]
    for p, i in zip(prompts, ids):
        if len(i) + ns.max_new_tokens > args.max_sequence_length:
            raise SystemExit(f"prompt {p[:40]!r}... has {len(i)} tokens; with --max-new-tokens "
                             f"{ns.max_new_tokens} it exceeds the context of {args.max_sequence_length}.")
    stop_ids = tuple(t for s in ns.stop for t in tok.tokenize(s)[-1:])
    params = SamplingParams(max_new_tokens=ns.max_new_tokens, temperature=ns.temperature,
                            top_k=ns.top_k, top_p=ns.top_p, seed=ns.seed, stop_ids=stop_ids)
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:  # under torchrun: one section per pipeline rank, all decoding at once
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
