"""`megatron-stag eval MODEL --tasks ...`: lm-evaluation-harness on a trained model, through the
harness's own `hf` backend (`HFLM`) around our transformers model (`hf_model.StagForCausalLM`, the
one serving model). MODEL is a megatron checkpoint (converted in memory), an exported package or a
Hugging Face export; tasks are the harness's, or YAML files in `--include-path` (a task over a local
JSON file needs no network). Results are written whole or not at all."""

from __future__ import annotations

import argparse
import json
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

    _, folder = describe(path)
    tokenizer = folder / "tokenizer.model"
    if not tokenizer.is_file():
        raise FileNotFoundError(f"{tokenizer} does not exist: the harness needs the model's sentencepiece "
                                f"tokenizer beside it.")
    tok = hf_tokenizer(tokenizer)
    plain = load_serving_model(path, device=device, dtype=dtype)
    if tok.vocab_size > plain.cfg.vocab_size:
        raise ValueError(f"{tokenizer} has {tok.vocab_size} pieces, more than the model's vocab_size "
                         f"{plain.cfg.vocab_size}: use the tokenizer the model was trained with.")
    with torch.device("meta"):
        model = StagForCausalLM(StagConfig.from_plain(plain.cfg, eos_token_id=tok.eos_token_id))
    model.model = plain
    return model.to(device).eval(), tok


def run(ns) -> int:
    from megatron_stag.serving.convert import describe

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
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise SystemExit("lm-evaluation-harness is not installed: pip install 'megatron-stag[eval]'.") from None
    import torch

    tasks = [t for t in ns.tasks.split(",") if t]
    manager = TaskManager(include_path=ns.include_path)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise SystemExit(f"--tasks: unknown task(s) {unknown}: name harness tasks, or give their YAML folder "
                         f"with --include-path.")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}.get(
        ns.dtype, torch.bfloat16 if device == "cuda" else torch.float32)
    try:
        model, tok = load_for_harness(Path(ns.model), device, dtype)
    except (FileNotFoundError, ValueError) as err:
        raise SystemExit(str(err)) from None
    lm = HFLM(pretrained=model, tokenizer=tok, backend="causal", batch_size=ns.batch_size, device=device,
              max_length=model.config.max_sequence_length)
    results = lm_eval.simple_evaluate(model=lm, tasks=tasks, task_manager=manager, limit=ns.limit,
                                      num_fewshot=ns.num_fewshot, log_samples=False, random_seed=ns.seed,
                                      numpy_random_seed=ns.seed, torch_random_seed=ns.seed,
                                      fewshot_random_seed=ns.seed)
    from lm_eval.utils import make_table

    print(make_table(results))
    if ns.output:
        record = dict(model=str(ns.model), tasks=tasks, limit=ns.limit, results=results["results"],
                      configs=results.get("configs"), versions=results.get("versions"),
                      n_samples=results.get("n-samples"))
        out = Path(ns.output)
        write_atomic(out, json.dumps(record, indent=2, default=str) + "\n")
        print(f"wrote {out}", file=sys.stderr)
    return 0
