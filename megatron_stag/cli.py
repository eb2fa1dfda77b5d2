"""`megatron-stag` command line. Subcommands stay thin: they parse, validate, and call the package."""

from __future__ import annotations

import argparse
import json
import pickle
import signal
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
    from megatron_stag.platform.files import refuse_existing
    from megatron_stag.training.run_logs import plot_runs, read_log

    labels = ns.label or []
    if labels and len(labels) != len(ns.logs):
        raise SystemExit(f"--label given {len(labels)} times for {len(ns.logs)} logs: one per log.")
    try:
        refuse_existing(ns.out, ns.overwrite, "--out")
    except FileExistsError as err:
        raise SystemExit(f"{err} (nothing was plotted).") from None
    try:
        runs = [read_log(Path(p), labels[i] if labels else None) for i, p in enumerate(ns.logs)]
    except (FileNotFoundError, ValueError) as err:
        raise SystemExit(str(err)) from None
    print(f"wrote {plot_runs(runs, Path(ns.out), ns.title)}")
    return 0


def _prepare_data(ns) -> int:
    from megatron_stag.data.prepare import prepare_dataset

    try:
        prefix, model = prepare_dataset(ns.input, Path(ns.output_prefix), vocab_size=ns.vocab_size,
                                        tokenizer=Path(ns.tokenizer) if ns.tokenizer else None,
                                        workers=ns.workers, json_key=ns.json_key, overwrite=ns.overwrite)
    except (FileExistsError, FileNotFoundError, ValueError) as err:
        raise SystemExit(f"prepare-data: {err}") from None
    print(f"wrote {prefix}.bin/.idx (tokenizer {model})")
    return 0


def _read_prompts(ns) -> list[str]:
    prompts = list(ns.prompt or [])
    if ns.prompt_file:
        path = Path(ns.prompt_file)
        if not path.is_file():
            raise SystemExit(f"--prompt-file {path} {'is a folder' if path.is_dir() else 'does not exist'}: give a "
                             f"text file (a prompt per line) or a .jsonl file (a \"prompt\" per line).")
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except UnicodeDecodeError as err:
            raise SystemExit(f"--prompt-file {path} is not UTF-8 text (byte {err.start}).") from None
        for n, line in enumerate(lines, 1):
            if not line.strip():
                continue
            if path.suffix != ".jsonl":
                prompts.append(line)
                continue
            try:
                record = json.loads(line)
                prompts.append(record["prompt"])
            except (json.JSONDecodeError, KeyError, TypeError):
                raise SystemExit(f"--prompt-file {path}:{n}: expected a JSON object with a \"prompt\" field, "
                                 f"got {line[:60]!r}.") from None
            if not isinstance(prompts[-1], str):
                raise SystemExit(f"--prompt-file {path}:{n}: \"prompt\" must be a string.")
    if not prompts:
        raise SystemExit("give at least one --prompt or a --prompt-file.")
    empty = [i + 1 for i, p in enumerate(prompts) if not p.strip()]
    if empty:
        raise SystemExit(f"prompt {empty[0]} is empty: every prompt needs some text to continue.")
    return prompts


def _generate(ns) -> int:
    prompts = _read_prompts(ns)  # before torch is imported: a bad prompt file fails at once
    from megatron_stag.serving.generate_cli import generate_from_checkpoint

    return generate_from_checkpoint(ns, prompts)


def _import(ns) -> int:
    from megatron_stag.serving.convert import ExportError, import_checkpoint

    try:
        out = import_checkpoint(Path(ns.source), Path(ns.out))
    except (ExportError, FileNotFoundError, ValueError) as err:
        raise SystemExit(str(err)) from None
    tok = next((t for t in (out / "tokenizer", out / "tokenizer.model") if t.exists()), None)
    print(f"wrote {out} (megatron torch_dist, any TP/PP loads it): continue training with "
          f"`megatron-stag pretrain RECIPE checkpoint.pretrained_checkpoint={out} checkpoint.save=NEW_DIR"
          f"{f' data.tokenizer_model={tok}' if tok else ''}` and the model settings in {out / 'model_args.json'}")
    return 0


def _export(ns) -> int:
    from megatron_stag.serving.convert import DTYPES, ExportError, export_checkpoint

    try:
        out = export_checkpoint(Path(ns.checkpoint), Path(ns.out), dtype=DTYPES[ns.dtype],
                                tokenizer=Path(ns.tokenizer) if ns.tokenizer else None, format=ns.format)
    except (ExportError, FileNotFoundError, ValueError, pickle.UnpicklingError) as err:
        raise SystemExit(str(err)) from None
    if ns.format == "hf":
        llama = json.loads((out / "config.json").read_text())["model_type"] == "llama"
        print(f"wrote {out}: load it with transformers.AutoModelForCausalLM.from_pretrained({str(out)!r}"
              f"{')' if llama else ', trust_remote_code=True)'} and AutoTokenizer.from_pretrained({str(out)!r})")
    else:
        print(f"wrote {out} ({', '.join(sorted(p.name for p in out.iterdir()))})")
    return 0


def _job_options(ns, name: str, run_dir: Path):
    from megatron_stag.platform.slurm import JobOptions, time_limit_seconds

    if ns.time:
        time_limit_seconds(ns.time)  # a malformed limit is named here, not by sbatch
    return JobOptions(job_name=ns.job_name or name, run_dir=run_dir.resolve(), partition=ns.partition,
                      account=ns.account, time=ns.time, signal_seconds=ns.signal_seconds,
                      container_image=ns.container_image, container_mounts=ns.container_mounts,
                      extra_sbatch=ns.sbatch or [])


def _submit(ns) -> int:
    """Validate the recipe like `pretrain` does, derive the job's shape, sbatch slurm/pretrain.sbatch."""
    from megatron_stag.config.recipe import RecipeError, load_recipe
    from megatron_stag.platform import slurm
    from megatron_stag.training.megatron_pretrain import blend_prefixes, check_recipe

    argv, extra = (ns.args[:ns.args.index("--")], ns.args[ns.args.index("--") + 1:]) if "--" in ns.args \
        else (ns.args, [])
    if not argv:
        raise SystemExit("usage: megatron-stag submit [options] RECIPE [key=value ...] [-- megatron flags]")
    try:
        recipe = load_recipe(argv[0], argv[1:])
        if any(a.split("=", 1)[0].rsplit(".", 1)[-1] == "load" for a in argv[1:]):
            raise RecipeError("checkpoint.load: the job loads its own checkpoints (--run-dir) so that a requeued "
                              "job resumes; to start from other weights (an import, another run), give "
                              "checkpoint.pretrained_checkpoint=FOLDER: megatron starts from it while the run has "
                              "no checkpoint of its own.")
        recipe = check_recipe(recipe, extra)[1]  # what the job's ranks will use: raw Megatron flags win
        run_dir = Path(ns.run_dir or Path("runs") / Path(argv[0]).stem)
        shape = slurm.pretrain_shape(recipe, ns.nodes, ns.gpus_per_node, ns.cpu)
        paths = [run_dir] + blend_prefixes(recipe)
        paths += [Path(recipe.get(k)) for k in ("tokenizer_model", "pretrained_checkpoint") if recipe.get(k)]
        opts = _job_options(ns, f"stag-{Path(argv[0]).stem}", run_dir)
        slurm.check_warning_time(opts)
        slurm.check_shared_paths(paths + slurm.job_files(opts), shape.nodes)
        slurm.check_run_dir_free(run_dir, opts)
        cmd = slurm.sbatch_command("pretrain.sbatch", shape, opts, [*argv, *(["--", *extra] if extra else [])])
        slurm.submit(cmd, slurm.job_environment(opts), ns.dry_run)
    except (RecipeError, slurm.SlurmError) as err:
        raise SystemExit(f"submit: {err}") from None
    return 0


def _submit_generate(ns) -> int:
    """Check the generate request as each rank would (errors before submitting), size the job from the model."""
    from megatron_stag.platform import slurm

    gen = build_parser().parse_args(["generate", ns.checkpoint, *ns.args])
    ckpt = Path(ns.checkpoint)
    try:
        from megatron_stag.serving.generate_cli import check_request

        try:  # what `generate` would refuse in the job, after the queue
            cfg = check_request(gen, _read_prompts(gen), None, "nothing was submitted")[0]
        except SystemExit as err:
            raise slurm.SlurmError(str(err.code)) from None
        run_dir = Path(ns.run_dir or Path("runs") / "generate")
        # --recurrent runs both passes on each rank: the job is one group of --tp tasks
        shape = slurm.generate_shape(1 if gen.recurrent else cfg.sections, gen.tp, ns.nodes, ns.gpus_per_node, ns.cpu)
        paths = [run_dir, ckpt] + [Path(p) for p in (gen.prompt_file, gen.output) if p]
        opts = _job_options(ns, "stag-generate", run_dir)
        slurm.check_shared_paths(paths + slurm.job_files(opts), shape.nodes)
        cmd = slurm.sbatch_command("generate.sbatch", shape, opts, [ns.checkpoint, *ns.args])
        slurm.submit(cmd, slurm.job_environment(opts), ns.dry_run)
    except slurm.SlurmError as err:
        raise SystemExit(f"submit-generate: {err}") from None
    return 0


def _at_least(low: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"{value} is below {low}")
        return value
    return parse


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text} is not above 0")
    return value


def _run_dir(text: str) -> str:
    if "%" in text:  # sbatch expands %j, %x, ... in --output, which holds the run directory
        raise argparse.ArgumentTypeError(f"{text!r} contains '%', which sbatch would expand: rename the folder")
    return text


def _add_job_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--nodes", type=_at_least(1), help="nodes (default: enough for one model replica)")
    p.add_argument("--gpus-per-node", type=_at_least(1), help="tasks (GPUs, or CPU ranks with --cpu) per node")
    p.add_argument("--cpu", action="store_true", help="CPU ranks (gloo), no GPUs requested")
    p.add_argument("--partition")
    p.add_argument("--account")
    p.add_argument("--time", help="time limit, e.g. 04:00:00")
    p.add_argument("--job-name")
    p.add_argument("--run-dir", type=_run_dir, help="per-job logs (and checkpoints); shared on multi-node jobs")
    p.add_argument("--signal-seconds", type=_at_least(1), default=300,
                   help="warning before the time limit: save a checkpoint and requeue")
    p.add_argument("--container-image", help="pyxis image for srun --container-image")
    p.add_argument("--container-mounts", help="pyxis mounts, src:dst[,src:dst]")
    p.add_argument("--sbatch", action="append", help="extra sbatch option, e.g. --sbatch=--exclusive")
    p.add_argument("--dry-run", action="store_true", help="print the sbatch command instead of submitting")


class _HELP(argparse.ArgumentDefaultsHelpFormatter):
    """Every option's help shows its default, unless it has none or its help already says it."""

    def _get_help_string(self, action):
        if action.default is None or "(default:" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def _recipes_epilog() -> str:
    from megatron_stag.config.recipe import packaged_recipes

    return "packaged recipes: " + ", ".join(packaged_recipes())


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="megatron-stag", description="StagFormer on megatron-core: train, decode, benchmark.")
    # DeepSpeed's launcher prepends --local_rank=N (LOCAL_RANK is in the environment as well)
    parser.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command", required=True)

    q = sub.add_parser("quickstart", formatter_class=_HELP, help="tiny StagFormer pretraining on local text + staggered generation")
    q.add_argument("--out", default="runs/quickstart", help="folder for data, checkpoints, logs and the loss plot")
    q.add_argument("--iterations", type=_at_least(1), default=500, help="training iterations")
    q.add_argument("--corpus-mb", type=_positive_float, default=4.0, help="MB of stdlib sources to use")
    q.add_argument("--seed", type=_at_least(0), default=1234, help="training and sampling seed")
    q.set_defaults(func=_quickstart)

    t = sub.add_parser("pretrain", formatter_class=_HELP, help="Megatron's training loop on a recipe (recipes/*.yaml)",
                       description="megatron-stag pretrain RECIPE [section.key=value ...] "
                                   "[-- --megatron-flag value ...]", epilog=_recipes_epilog())
    t.add_argument("args", nargs=argparse.REMAINDER, help="RECIPE, overrides, then -- and Megatron flags")
    t.set_defaults(func=_pretrain)

    p = sub.add_parser("plot", formatter_class=_HELP, help="loss curves of one or more runs (their train.log) as a PNG")
    p.add_argument("logs", nargs="+", help="train.log files, save folders holding one, or Slurm run directories")
    p.add_argument("--out", default="loss.png", help="PNG to write")
    p.add_argument("--label", action="append", help="legend name per log (default: folder name)")
    p.add_argument("--title", default="lm loss", help="plot title")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.set_defaults(func=_plot)

    d = sub.add_parser("prepare-data", formatter_class=_HELP, help="text/JSONL files or folders -> megatron indexed dataset")
    d.add_argument("--input", nargs="+", required=True, help="files or directories")
    d.add_argument("--output-prefix", required=True,
                   help="writes <prefix>_text_document.bin/.idx (and <prefix>.model when it trains a tokenizer)")
    d.add_argument("--tokenizer", help="existing sentencepiece .model, or a Hugging Face tokenizer folder "
                                       "(tokenizer.json; BOS added where its config says) (default: train one)")
    d.add_argument("--vocab-size", type=_at_least(1), default=16000, help="pieces of the trained tokenizer")
    d.add_argument("--workers", type=_at_least(1), default=2, help="tokenizing processes")
    d.add_argument("--json-key", default="text", help="field holding the text in .jsonl inputs")
    d.add_argument("--overwrite", action="store_true", help="replace existing outputs of --output-prefix")
    d.set_defaults(func=_prepare_data)

    g = sub.add_parser("generate", formatter_class=_HELP, help="staggered generation from a checkpoint")
    g.add_argument("checkpoint", help="a checkpoint directory (iter_*), a run's checkpoints folder, or an "
                                      "exported package (megatron-stag export)")
    g.add_argument("--tokenizer", help="sentencepiece .model or Hugging Face tokenizer folder (default: the "
                                       "model's own: tokenizer.model, tokenizer/, or a Hugging Face folder's)")
    g.add_argument("--prompt", action="append", help="a prompt (repeatable)")
    g.add_argument("--prompt-file", help="one prompt per line, or JSONL with a 'prompt' field")
    g.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate per prompt")
    g.add_argument("--batch-size", type=int, default=64,
                   help="prompts decoded at once; more are decoded in groups of this many")
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    g.add_argument("--top-k", type=int, default=0, help="sample from the k most likely tokens (0 = off)")
    g.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1 = off)")
    g.add_argument("--seed", type=int, default=0, help="sampling seed")
    g.add_argument("--stop", action="append", default=[],
                   help="stop string (repeatable): a row ends once its completion contains one; the text "
                        "is cut after it")
    g.add_argument("--recurrent", action="store_true", help="recurrent inference (shared weights)")
    g.add_argument("--output", help="write JSONL here instead of text on stdout")
    g.add_argument("--overwrite", action="store_true", help="replace an existing --output")
    g.add_argument("--engine", choices=("native", "deepspeed"), default="native",
                   help="native: our engine drives the model; deepspeed: deepspeed.init_inference wraps it "
                        "first (AutoTP for --tp); the same engine decodes")
    g.add_argument("--tp", type=_at_least(1), default=1, help="tensor-parallel ranks per section (--engine deepspeed)")
    g.add_argument("--dtype", choices=("auto", "fp32", "bf16", "fp16"), default="auto",
                   help="weights and activations (auto: bf16 on a GPU, fp32 on CPU)")
    g.add_argument("--eager", action="store_true",
                   help="run decode steps eagerly (no torch.compile, no CUDA graph): for debugging")
    g.add_argument("--deterministic", action="store_true",
                   help="the same output on every run at any --batch-size: above 4 prompts per step (16 heads) "
                        "attention runs on the engine's own kernel instead of cuDNN's (1xH200, 1B GPT: +7%% at 8 "
                        "prompts, +22%% at 32)")
    g.set_defaults(func=_generate)

    s = sub.add_parser("submit", formatter_class=_HELP, help="sbatch slurm/pretrain.sbatch for a recipe (nodes/tasks from its parallelism)",
                       description="megatron-stag submit [options] RECIPE [key=value ...] [-- megatron flags]")
    _add_job_options(s)
    s.add_argument("args", nargs=argparse.REMAINDER, help="RECIPE, overrides, then -- and Megatron flags")
    s.set_defaults(func=_submit)

    sg = sub.add_parser("submit-generate", formatter_class=_HELP, help="sbatch slurm/generate.sbatch: one section per task",
                        description="megatron-stag submit-generate [options] CHECKPOINT [generate options]")
    _add_job_options(sg)
    sg.add_argument("checkpoint", help="as for generate: a checkpoint or an exported package")
    sg.add_argument("args", nargs=argparse.REMAINDER, help="options of megatron-stag generate")
    sg.set_defaults(func=_submit_generate)

    x = sub.add_parser("export", formatter_class=_HELP, help="megatron checkpoint (any TP/PP) -> plain-PyTorch package (safetensors)")
    x.add_argument("checkpoint", help="a checkpoint directory (iter_*) or a run's checkpoints folder")
    x.add_argument("out", help="new folder for config.json, model.safetensors, tokenizer.model")
    x.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default="fp32", help="weights dtype written")
    x.add_argument("--tokenizer", help="sentencepiece .model or Hugging Face tokenizer folder to ship "
                                       "(default: the checkpoint's)")
    x.add_argument("--format", choices=("plain", "hf"), default="plain",
                   help="plain: this package's serving format; hf: a Hugging Face transformers folder")
    x.set_defaults(func=_export)

    im = sub.add_parser("import", formatter_class=_HELP,
                        help="Hugging Face export (or plain package) -> megatron checkpoint to fine-tune from")
    im.add_argument("source", help="a folder written by `megatron-stag export` (--format hf or plain)")
    im.add_argument("out", help="new checkpoint folder; train from it with checkpoint.load=OUT")
    im.set_defaults(func=_import)

    e = sub.add_parser("eval", formatter_class=_HELP, help="lm-evaluation-harness on a checkpoint or export")
    from megatron_stag.serving import evaluate

    evaluate.add_arguments(e)
    e.set_defaults(func=evaluate.run)
    return parser


def hoist_job_options(argv: list[str]) -> list[str]:
    """`submit` and `submit-generate` with their job options (--nodes, --time, ...) moved before the
    recipe or checkpoint, from wherever they were given before `--`: the words after it are the
    recipe's overrides or generate's options, and would otherwise swallow a job option given there."""
    if not argv or argv[0] not in ("submit", "submit-generate"):
        return argv
    probe = argparse.ArgumentParser(add_help=False)
    _add_job_options(probe)
    flags = {o: a.nargs == 0 for a in probe._actions for o in a.option_strings}  # option -> takes no value
    front, rest, words = [], [], iter(argv[1:])
    for word in words:
        if word == "--":
            rest += [word, *words]
            break
        name = word.split("=", 1)[0]
        if name in flags:
            front.append(word)
            if "=" not in word and not flags[name]:
                front.append(next(words, ""))
        else:
            rest.append(word)
    return [argv[0], *front, *rest]


def main(argv=None) -> int:
    from megatron_stag.platform import quiet
    from megatron_stag.platform.slurm import adopt_slurm_rank_env

    quiet.install()  # known, harmless library warnings: off for this command and the ranks it starts
    adopt_slurm_rank_env()  # a task of our batch scripts: Slurm's variables -> RANK, WORLD_SIZE, ...
    ns = build_parser().parse_args(hoist_job_options(sys.argv[1:] if argv is None else list(argv)))
    try:
        return ns.func(ns)
    except KeyboardInterrupt:  # Ctrl-C: the shell's status for it, not a traceback of wherever it landed
        return 128 + signal.SIGINT


if __name__ == "__main__":
    sys.exit(main())
