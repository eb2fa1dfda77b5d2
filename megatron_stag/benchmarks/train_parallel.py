"""Training throughput and MFU on several GPUs: StagFormer p=2 against the GPT baseline in the same
parallel layout, each run through `megatron-stag pretrain` (megatron's training loop, NCCL, bf16, the
distributed optimizer), every layout and model in one job.

    python -m megatron_stag.benchmarks.train_parallel --out results/train_parallel_2gpu_h200.json

Layouts (N = --gpus): PP=N, where StagFormer's sections map onto the pipeline stages (one section per
stage at p = N), and TP=N with sequence parallelism. Each run trains --iters iterations of the recipe on
local text (the quality study's corpus of this machine's Python sources), logging every --log-interval;
the time per iteration is the median of megatron's logged intervals after the first (compile, warm-up).
tokens/s = global batch x sequence / that time; MFU = the model's training FLOPs per iteration
(`train_throughput.step_flops`, which counts the cross-attention that megatron's own TFLOP/s figure
leaves out) / that time / (N x the bf16 peak). `vs_baseline`: a model's FLOP/s over the baseline's (the
first recipe's) in the same layout, which is its MFU over the baseline's.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
from pathlib import Path

import torch

from megatron_stag.benchmarks.hardware import peak_tflops, run, write_result


def layouts(names: str, gpus: int) -> list[tuple[str, list[str]]]:
    """(label, recipe overrides) per layout name ('pp', 'tp')."""
    table = {"pp": (f"PP={gpus}", [f"parallelism.pipeline_model_parallel_size={gpus}"]),
             "tp": (f"TP={gpus}", [f"parallelism.tensor_model_parallel_size={gpus}"]
                    + (["parallelism.sequence_parallel=true"] if torch.cuda.is_available() else []))}
    unknown = [n for n in names.split(",") if n not in table]
    if unknown:
        raise SystemExit(f"--layouts {names}: unknown {', '.join(unknown)} (choose from pp, tp).")
    return [table[n] for n in names.split(",")]


def measure(recipe: str, overrides: list[str], save: Path, warmup: int) -> dict:
    """One pretrain run in a fresh folder: megatron's logged iteration times past iteration `warmup`
    (megatron also logs iteration 1 alone), and the model it trained."""
    from megatron_stag.benchmarks.train_throughput import step_flops
    from megatron_stag.config.recipe import load_recipe
    from megatron_stag.models.model_args import ModelArgs
    from megatron_stag.training.megatron_pretrain import launch
    from megatron_stag.training.run_logs import read_log

    shutil.rmtree(save, ignore_errors=True)  # the benchmark's own scratch folder: a run never resumes
    overrides = overrides + [f"checkpoint.save={save}", f"checkpoint.load={save}"]
    if launch(recipe, overrides, []) != 0:
        return dict(error=f"pretrain failed: see {save / 'train.log'}")
    r = load_recipe(recipe, overrides)
    batch, seq = r.get("global_batch_size"), r.get("seq_length")
    times = [ms for it, ms in sorted(read_log(save).iter_ms.items()) if it > warmup]
    if not times:
        return dict(error=f"no iteration logged past iteration {warmup}: raise --iters")
    ms = statistics.median(times)
    flops = step_flops(ModelArgs.load(save / "model_args.json"), batch, seq)
    return dict(ms_per_iteration=ms, logged_ms=times, global_batch=batch, seq_length=seq,
                tokens_per_s=batch * seq / (ms / 1e3), tflops_per_iteration=flops / 1e12,
                tflops_per_s=flops / 1e12 / (ms / 1e3))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gpus", type=int, default=max(2, torch.cuda.device_count()))
    ap.add_argument("--layouts", default="pp,tp", help="comma-separated: pp, tp (each over every GPU)")
    ap.add_argument("--recipes", default="350m-gpt,350m-stag", help="baseline first, then the models "
                    "compared with it")
    ap.add_argument("--iters", type=int, default=40)
    ap.add_argument("--log-interval", type=int, default=5)
    ap.add_argument("--micro-batch", type=int, default=4)
    ap.add_argument("--global-batch", type=int, default=64)
    ap.add_argument("--corpus-mb", type=float, default=30.0)
    ap.add_argument("--data", help="a prepared dataset prefix (with --tokenizer) instead of the local corpus")
    ap.add_argument("--tokenizer", help="the dataset's tokenizer model")
    ap.add_argument("--work", default="/tmp/train_parallel", help="data and checkpoints (not kept)")
    ap.add_argument("--out", required=True)
    ns = ap.parse_args(argv)
    if (ns.data is None) != (ns.tokenizer is None):
        raise SystemExit("--data and --tokenizer go together (a dataset and the tokenizer that made it).")
    if ns.iters < 3 * ns.log_interval:
        raise SystemExit(f"--iters {ns.iters}: at least 3 x --log-interval ({3 * ns.log_interval}), so that "
                         f"two logged intervals follow the first.")
    if torch.cuda.is_available() and ns.gpus > torch.cuda.device_count():
        raise SystemExit(f"--gpus {ns.gpus}: this machine has {torch.cuda.device_count()} GPU(s).")
    chosen = layouts(ns.layouts, ns.gpus)
    recipes = ns.recipes.split(",")
    from megatron_stag.config.recipe import RecipeError, load_recipe

    for recipe in recipes:  # a misspelt recipe is named before the corpus is prepared
        try:
            load_recipe(recipe)
        except RecipeError as err:
            raise SystemExit(f"--recipes {ns.recipes}: {err}") from None
    work = Path(ns.work)
    if ns.data is None:
        from megatron_stag.benchmarks.quality_study import corpus_dataset

        prefix, tokenizer, _ = corpus_dataset(work / "data", ns.corpus_mb)
    else:
        prefix, tokenizer = Path(ns.data), Path(ns.tokenizer)
    common = [f"data.data_path=[{prefix}]", f"data.tokenizer_model={tokenizer}", f"training.train_iters={ns.iters}",
              f"training.micro_batch_size={ns.micro_batch}", f"training.global_batch_size={ns.global_batch}",
              f"logging.log_interval={ns.log_interval}", f"checkpoint.save_interval={10 * ns.iters}",
              f"logging.eval_interval={10 * ns.iters}", "logging.eval_iters=1", "optimizer.lr_warmup_iters=2"]
    peak = peak_tflops() if torch.cuda.is_available() else None
    rows = []
    for label, layout in chosen:
        for recipe in recipes:
            print(f"train_parallel: {recipe}, {label}", flush=True)
            row = dict(recipe=recipe, layout=label, gpus=ns.gpus,
                       **measure(recipe, common + layout, work / label / recipe, warmup=ns.log_interval))
            baseline = next(r for r in rows + [row] if r["layout"] == label)
            if "error" not in row and "error" not in baseline:
                row["vs_baseline"] = row["tflops_per_s"] / baseline["tflops_per_s"]
            if "error" not in row and peak:
                row["mfu"] = row["tflops_per_s"] / (ns.gpus * peak)
            rows.append(row)
            write_result(Path(ns.out), dict(settings=vars(ns), peak_bf16_tflops=peak, rows=rows))
    for row in rows:
        print(f"{row['recipe']:24s} {row['layout']:6s} " + (row["error"] if "error" in row else
              f"{row['ms_per_iteration']:9.1f} ms/iteration  {row['tokens_per_s']:10.0f} tokens/s"
              + (f"  MFU {row['mfu']:.3f}" if "mfu" in row else "")
              + (f"  {row['vs_baseline']:.3f}x the baseline" if "vs_baseline" in row else "")))


if __name__ == "__main__":
    run(main)
