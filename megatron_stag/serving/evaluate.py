"""`megatron-stag eval MODEL --tasks ...`: lm-evaluation-harness on a trained model, through the
harness's own `hf` backend (`HFLM`) around our transformers model (`hf_model.StagForCausalLM`, the
one serving model). MODEL is a megatron checkpoint (converted in memory), an exported package or a
Hugging Face export; tasks are the harness's, or YAML files in `--include-path` (a task over a local
JSON file needs no network). Results are written whole or not at all."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from megatron_stag.platform.files import check_output, write_atomic


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="a checkpoint (iter_* or a run's checkpoints folder), an exported package, "
                                      "or an `export --format hf` folder")
    parser.add_argument("--tasks", required=True, help="comma-separated lm-evaluation-harness task names")
    parser.add_argument("--include-path", help="folder of task YAML files (local tasks)")
    parser.add_argument("--limit", type=float, help="at most this many examples per task (a fraction if < 1)")
    parser.add_argument("--num-fewshot", type=int)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--dtype", choices=("auto", "fp32", "bf16"), default="auto",
                        help="auto: bf16 on a GPU, fp32 on CPU")
    parser.add_argument("--output", help="results JSON (default: print the table only)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --output")
    parser.add_argument("--seed", type=int, default=0)


def load_for_harness(path: Path, device: str, dtype):
    """(StagForCausalLM, its transformers tokenizer) for anything `convert.load_serving_model` reads."""
    import torch

    from megatron_stag.serving.convert import describe, load_serving_model
    from megatron_stag.serving.hf_model import StagConfig, StagForCausalLM
    from megatron_stag.serving.hf_tokenizer import hf_tokenizer
    from megatron_stag.serving.prompt_tokenizer import transformers_tokenizer

    _, folder = describe(path)
    tokenizer = folder / "tokenizer.model"
    tok = transformers_tokenizer(folder)  # the model's own where it has one (BOS included)
    if tok is None:
        if not tokenizer.is_file():
            raise FileNotFoundError(f"{tokenizer} does not exist: the harness needs the model's sentencepiece "
                                    f"tokenizer beside it.")
        tok = hf_tokenizer(tokenizer)
    plain = load_serving_model(path, device=device, dtype=dtype)
    if len(tok) > plain.cfg.vocab_size:
        raise ValueError(f"{folder}'s tokenizer has {len(tok)} pieces, more than the model's vocab_size "
                         f"{plain.cfg.vocab_size}: use the tokenizer the model was trained with.")
    with torch.device("meta"):
        model = StagForCausalLM(StagConfig.from_plain(plain.cfg, eos_token_id=tok.eos_token_id))
    model.model = plain
    return model.to(device).eval(), tok


def task_names(tasks: str) -> list[str]:
    return [t.strip() for t in tasks.split(",") if t.strip()]


def _check_options(ns) -> None:
    for flag, value, ok, need in (("--limit", ns.limit, lambda v: v > 0, "a count >= 1 or a fraction in (0, 1)"),
                                  ("--batch-size", ns.batch_size, lambda v: v >= 1, "at least 1"),
                                  ("--num-fewshot", ns.num_fewshot, lambda v: v >= 0, "0 or more")):
        if value is not None and not ok(value):
            raise SystemExit(f"{flag} {value:g}: give {need}.")
    if ns.limit is not None and ns.limit > 1 and ns.limit != int(ns.limit):
        raise SystemExit(f"--limit {ns.limit:g}: give a whole count, or a fraction below 1.")
    if not task_names(ns.tasks):  # the harness: a traceback, after loading the model
        raise SystemExit(f"--tasks {ns.tasks!r} names no task: give comma-separated harness task names.")


def load_tasks(manager, names: list[str]) -> list:
    """The harness's objects for the named tasks (a group keeps its subtasks and its aggregate score),
    built before the model is: a task whose dataset this machine cannot fetch fails in seconds, not after
    the checkpoint has loaded; `simple_evaluate` takes the objects as they are."""
    built = []
    for name in names:
        try:
            loaded = manager.load(name)
        except ConnectionError as err:  # datasets' own, for a Hub it cannot reach (or offline mode)
            raise SystemExit(
                f"--tasks {name}: {err}. A harness task downloads its dataset from the Hugging Face Hub on "
                f"first use: run it once where the Hub is reachable (the dataset is cached under $HF_HOME, "
                f"which compute nodes may share; HF_DATASETS_OFFLINE=1 then reads only the cache), or give "
                f"local tasks with --include-path.") from None
        built += [loaded["groups"][name]] if name in loaded["groups"] else list(loaded["tasks"].values())
    return built


def _commit_of_working_directory():
    """lm_eval's `get_git_commit_hash`, without git's "fatal: not a git repository" on the terminal
    when eval runs outside a repository (the usual case on a cluster)."""
    try:
        return subprocess.run(["git", "describe", "--always"], capture_output=True, text=True,
                              check=True).stdout.strip()
    except (subprocess.CalledProcessError, FileNotFoundError):
        return None


def _cell(v) -> str:
    return f"{v:.4f}" if isinstance(v, float) else str(v)


def _table(results: dict) -> str:
    """The results as a Markdown table (the harness's `make_table` needs a newer pytablewriter than
    the one its other dependencies resolve to, and prints its headers as A, B, C ...)."""
    lines = ["| task | n-shot | metric | filter | value | stderr |", "|---|--:|---|---|--:|--:|"]
    for task, metrics in results["results"].items():
        shots = results.get("n-shot", {}).get(task, "")
        for key, value in metrics.items():
            metric, _, kind = key.partition(",")
            if not kind or metric.endswith("_stderr"):
                continue  # the alias, and the stderrs (printed beside their metric)
            stderr = metrics.get(f"{metric}_stderr,{kind}")
            lines.append(f"| {metrics.get('alias', task)} | {shots} | {metric} | {kind} | {_cell(value)} | "
                         f"{'' if stderr is None else _cell(stderr)} |")
    return "\n".join(lines)


def run(ns) -> int:
    from megatron_stag.serving.convert import describe

    _check_options(ns)
    try:
        check_output(ns.output, ns.overwrite)
    except OSError as err:
        raise SystemExit(f"{err} (nothing was evaluated).") from None
    if ns.include_path and not Path(ns.include_path).is_dir():
        raise SystemExit(f"--include-path {ns.include_path} is not a folder of task YAML files.")
    try:
        describe(Path(ns.model))
    except (FileNotFoundError, ValueError) as err:
        raise SystemExit(str(err)) from None
    try:
        import lm_eval.evaluator
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise SystemExit("lm-evaluation-harness is not installed: pip install 'megatron-stag[eval]'.") from None
    import torch

    tasks = task_names(ns.tasks)
    manager = TaskManager(include_path=ns.include_path)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise SystemExit(f"--tasks: unknown task(s) {unknown}: name harness tasks, or give their YAML folder "
                         f"with --include-path.")
    built = load_tasks(manager, tasks)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}.get(
        ns.dtype, torch.bfloat16 if device == "cuda" else torch.float32)
    try:
        model, tok = load_for_harness(Path(ns.model), device, dtype)
    except (FileNotFoundError, ValueError) as err:
        raise SystemExit(str(err)) from None
    lm = HFLM(pretrained=model, tokenizer=tok, backend="causal", batch_size=ns.batch_size, device=device,
              max_length=model.config.max_sequence_length)
    lm_eval.evaluator.get_git_commit_hash = _commit_of_working_directory
    limit = int(ns.limit) if ns.limit is not None and ns.limit >= 1 else ns.limit
    results = lm_eval.evaluator.simple_evaluate(model=lm, tasks=built, task_manager=manager, limit=limit,
                                      num_fewshot=ns.num_fewshot, log_samples=False, random_seed=ns.seed,
                                      numpy_random_seed=ns.seed, torch_random_seed=ns.seed,
                                      fewshot_random_seed=ns.seed)
    print(_table(results))
    if ns.output:
        record = dict(model=str(ns.model), tasks=tasks, limit=ns.limit, results=results["results"],
                      configs=results.get("configs"), versions=results.get("versions"),
                      n_samples=results.get("n-samples"))
        out = Path(ns.output)
        write_atomic(out, json.dumps(record, indent=2, default=str) + "\n")
        print(f"wrote {out}", file=sys.stderr)
    return 0
