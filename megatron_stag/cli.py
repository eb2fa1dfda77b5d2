"""`megatron-stag` command line. Subcommands stay thin: they parse, validate, and call the package."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _quickstart(ns) -> int:
    from megatron_stag.training.quickstart import run_quickstart

    run_quickstart(Path(ns.out), iterations=ns.iterations, corpus_mb=ns.corpus_mb, seed=ns.seed)
    return 0


def _pretrain(ns) -> int:
    from megatron_stag.training.megatron_pretrain import main

    return main(ns.args)


def _plot(ns) -> int:
    from megatron_stag.training.run_logs import plot_runs, read_log

    labels = ns.label or []
    if labels and len(labels) != len(ns.logs):
        raise SystemExit(f"--label given {len(labels)} times for {len(ns.logs)} logs: one per log.")
    try:
        runs = [read_log(Path(p), labels[i] if labels else None) for i, p in enumerate(ns.logs)]
    except (FileNotFoundError, ValueError) as err:
        raise SystemExit(str(err)) from None
    print(f"wrote {plot_runs(runs, Path(ns.out), ns.title)}")
    return 0


def _prepare_data(ns) -> int:
    from megatron_stag.data.prepare import prepare_dataset

    prefix, model = prepare_dataset(ns.input, Path(ns.output_prefix), vocab_size=ns.vocab_size,
                                    tokenizer=Path(ns.tokenizer) if ns.tokenizer else None,
                                    workers=ns.workers, json_key=ns.json_key)
    print(f"wrote {prefix}.bin/.idx (tokenizer {model})")
    return 0


def _read_prompts(ns) -> list[str]:
    prompts = list(ns.prompt or [])
    if ns.prompt_file:
        path = Path(ns.prompt_file)
        if not path.is_file():
            raise SystemExit(f"--prompt-file {path} does not exist.")
        lines = path.read_text(encoding="utf-8").splitlines()
        for line in lines:
            if not line.strip():
                continue
            prompts.append(json.loads(line)["prompt"] if path.suffix == ".jsonl" else line)
    if not prompts:
        raise SystemExit("give at least one --prompt or a --prompt-file.")
    return prompts


def _generate(ns) -> int:
    from megatron_stag.inference.generate_cli import generate_from_checkpoint

    if ns.engine == "megatron" and (ns.tp != 1 or ns.dtype != "fp32" or ns.cuda_graph):
        raise SystemExit("--tp, --dtype and --cuda-graph choose the DeepSpeed engine's layout: add "
                         "--engine deepspeed (with an exported model), or drop them.")
    return generate_from_checkpoint(ns, _read_prompts(ns))


def _export(ns) -> int:
    import torch

    from megatron_stag.export.megatron_export import ExportError, export_checkpoint

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[ns.dtype]
    try:
        out = export_checkpoint(Path(ns.checkpoint), Path(ns.out), dtype=dtype,
                                tokenizer=Path(ns.tokenizer) if ns.tokenizer else None)
    except (ExportError, FileNotFoundError) as err:
        raise SystemExit(str(err)) from None
    print(f"wrote {out} (config.json, model.safetensors, tokenizer.model)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="megatron-stag", description="StagFormer on megatron-core: train, decode, benchmark.")
    # DeepSpeed's launcher prepends --local_rank=N (LOCAL_RANK is in the environment as well)
    parser.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command", required=True)

    q = sub.add_parser("quickstart", help="tiny StagFormer pretraining on local text + staggered generation")
    q.add_argument("--out", default="runs/quickstart")
    q.add_argument("--iterations", type=int, default=500)
    q.add_argument("--corpus-mb", type=float, default=4.0, help="MB of stdlib sources to use")
    q.add_argument("--seed", type=int, default=1234)
    q.set_defaults(func=_quickstart)

    t = sub.add_parser("pretrain", help="Megatron's training loop on a recipe (recipes/*.yaml)",
                       description="megatron-stag pretrain RECIPE [section.key=value ...] "
                                   "[-- --megatron-flag value ...]")
    t.add_argument("args", nargs=argparse.REMAINDER, help="RECIPE, overrides, then -- and Megatron flags")
    t.set_defaults(func=_pretrain)

    p = sub.add_parser("plot", help="loss curves of one or more runs (their train.log) as a PNG")
    p.add_argument("logs", nargs="+", help="train.log files or save folders holding one")
    p.add_argument("--out", default="loss.png")
    p.add_argument("--label", action="append", help="legend name per log (default: folder name)")
    p.add_argument("--title", default="lm loss")
    p.set_defaults(func=_plot)

    d = sub.add_parser("prepare-data", help="text/JSONL files or folders -> megatron indexed dataset")
    d.add_argument("--input", nargs="+", required=True, help="files or directories")
    d.add_argument("--output-prefix", required=True, help="writes <prefix>_text_document.bin/.idx")
    d.add_argument("--tokenizer", help="existing sentencepiece .model (default: train one)")
    d.add_argument("--vocab-size", type=int, default=16000)
    d.add_argument("--workers", type=int, default=2)
    d.add_argument("--json-key", default="text", help="field holding the text in .jsonl inputs")
    d.set_defaults(func=_prepare_data)

    g = sub.add_parser("generate", help="staggered generation from a checkpoint")
    g.add_argument("checkpoint", help="a checkpoint directory (iter_*) or a run's checkpoints folder")
    g.add_argument("--tokenizer", help="sentencepiece .model (default: <checkpoint>/tokenizer.model)")
    g.add_argument("--prompt", action="append", help="a prompt (repeatable)")
    g.add_argument("--prompt-file", help="one prompt per line, or JSONL with a 'prompt' field")
    g.add_argument("--max-new-tokens", type=int, default=64)
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--stop", action="append", default=[], help="stop string (its token ids)")
    g.add_argument("--recurrent", action="store_true", help="recurrent inference (shared weights)")
    g.add_argument("--output", help="write JSONL here instead of text on stdout")
    g.add_argument("--engine", choices=("megatron", "deepspeed"), default="megatron",
                   help="deepspeed: serve an exported package (megatron-stag export) with deepspeed.init_inference")
    g.add_argument("--tp", type=int, default=1, help="(deepspeed) tensor-parallel ranks per section")
    g.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default="fp32", help="(deepspeed) weights dtype")
    g.add_argument("--cuda-graph", action="store_true", help="(deepspeed) replay decode steps as CUDA graphs")
    g.set_defaults(func=_generate)

    x = sub.add_parser("export", help="megatron checkpoint (any TP/PP) -> plain-PyTorch package (safetensors)")
    x.add_argument("checkpoint", help="a checkpoint directory (iter_*) or a run's checkpoints folder")
    x.add_argument("out", help="new folder for config.json, model.safetensors, tokenizer.model")
    x.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default="fp32")
    x.add_argument("--tokenizer", help="sentencepiece .model to ship (default: the checkpoint's)")
    x.set_defaults(func=_export)
    return parser


def main(argv=None) -> int:
    ns = build_parser().parse_args(argv)
    return ns.func(ns)


if __name__ == "__main__":
    sys.exit(main())
