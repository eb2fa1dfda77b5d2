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

    return generate_from_checkpoint(ns, _read_prompts(ns))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="megatron-stag", description="StagFormer on megatron-core: train, decode, benchmark.")
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
    g.set_defaults(func=_generate)
    return parser


def main(argv=None) -> int:
    ns = build_parser().parse_args(argv)
    return ns.func(ns)


if __name__ == "__main__":
    sys.exit(main())
