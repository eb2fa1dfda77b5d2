"""Quality study: StagFormer and AltUp against baselines, same data, tokens, seed and schedule.

    # issue 8: ~50M models, 20M tokens each, Python files
    python -m megatron_stag.benchmarks.quality_study --out results/quality_study [--runs a,b] [--iters N]
    # issue 19: small models at >= 10 tokens per non-embedding parameter, the machine's source text,
    # run in parts (each call runs what is not in the JSON yet, within --budget-seconds)
    python -m megatron_stag.benchmarks.quality_study --study budget --out results/quality_budget
    python -m megatron_stag.benchmarks.quality_study --study budget --throughput --out results/quality_budget

Data (no downloads): the `.py` files of this machine's Python standard library and installed
site-packages, sorted by path, one document per file, tokenised by `prepare-data` into a 16k
sentencepiece vocabulary. Megatron's GPTDataset splits documents in order (98/2), so held-out files
never train. Each run is `megatron-stag pretrain study-50m` plus the run's model overrides (~50M
parameters, seq 1024); validation loss is Megatron's evaluation every `--eval-interval` iterations.
The shared-weight run is also evaluated in recurrent mode (pass 2 reading its own earlier outputs)
on held-out sequences through the staggered decoder. Writes `<out>/<out name>.json` (commands,
machine, data, every figure), `<out>/<out name>.md` and `<out>/validation_loss.png`. A call runs the
runs not yet in the JSON (or those named), so a study too long for one sitting resumes where it stopped.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sysconfig
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from megatron_stag.benchmarks.hardware import run
from megatron_stag.platform.files import write_atomic

RUNS = {
    "baseline L=12": [],
    "baseline L=6": ["model.num_layers=6"],
    "StagFormer 2x6 separate": ["stag_sections=2"],
    "StagFormer shared (6 layers run twice)": ["stag_sections=2", "stag_shared_weights=true"],
    "StagFormer 2x6 window 128": ["stag_sections=2", "stag_cross_window=128"],
    "StagFormer 2x6 window 1": ["stag_sections=2", "stag_cross_window=1"],
    "StagFormer 2x6 null entry at position 0 only": ["stag_sections=2", "stag_null_entry=first"],
    "StagFormer p=3 (3x4)": ["stag_sections=3"],
    "AltUp K=2 recycled (L=12)": ["altup_blocks=2", "altup_compile=true"],
    "AltUp K=4 recycled (L=12)": ["altup_blocks=4", "altup_compile=true"],
}
# issue 19: budget >= 10 tokens per non-embedding parameter; two seeds where noise must be measured
BUDGET_RUNS = {
    "baseline L=6": ["model.num_layers=6"],
    "baseline L=12": [],
    "baseline L=12 seed 2": ["training.seed=2"],
    "StagFormer 2x6 separate": ["stag_sections=2"],
    "StagFormer 2x6 separate seed 2": ["stag_sections=2", "training.seed=2"],
    "StagFormer 2x6 shared": ["stag_sections=2", "stag_shared_weights=true"],
    "StagFormer 2x6 window 1": ["stag_sections=2", "stag_cross_window=1"],
    "StagFormer 2x6 null entry at position 0 only": ["stag_sections=2", "stag_null_entry=first"],
    "AltUp K=2 recycled (L=12)": ["altup_blocks=2", "altup_compile=true"],
}
STUDIES = {"small": ("study-50m", RUNS), "budget": ("study-budget", BUDGET_RUNS)}
SLUGS = {name: "-".join("".join(c if c.isalnum() else " " for c in name.lower()).split())
         for runs in (RUNS, BUDGET_RUNS) for name in runs}
# the machine's own source text (issue 19): Python, C/C++/CUDA headers and sources, docs
MACHINE_ROOTS = ("/usr/include", "/usr/local/cuda/include", "/usr/share/doc")
MACHINE_EXTENSIONS = (".py", ".h", ".hpp", ".cuh", ".c", ".cc", ".cpp", ".md", ".rst", ".txt")


def corpus_files(max_mb: float, machine: bool = False) -> tuple[list[Path], dict]:
    """Sorted source files of this machine: the stdlib's and site-packages' `.py` files, and with
    `machine` also its headers, C/C++/CUDA sources and docs (MACHINE_ROOTS, MACHINE_EXTENSIONS)."""
    from megatron_stag.data.local_corpus import stdlib_files

    roots = [Path(sysconfig.get_paths()["stdlib"]), Path(sysconfig.get_paths()["purelib"])]
    extensions = MACHINE_EXTENSIONS if machine else (".py",)
    files = stdlib_files(root=roots[0])
    walk = roots[1:] + ([Path(r) for r in MACHINE_ROOTS if Path(r).is_dir()] if machine else [])
    for root in walk:
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames[:] = sorted(d for d in dirnames if d not in ("__pycache__", "tests", "test"))
            files.extend(Path(dirpath) / f for f in sorted(filenames) if f.endswith(extensions))
    files = sorted(set(files), key=str)
    out, total = [], 0
    for f in files:
        if not f.is_file():  # a dangling link
            continue
        size = f.stat().st_size
        if 200 <= size <= 200_000 and total + size <= max_mb * 1e6:
            out.append(f)
            total += size
    return out, dict(roots=[str(r) for r in roots + walk[1:]], extensions=list(extensions), files=len(out),
                     bytes=total, rule=f"sorted files of 200 B..200 kB under the roots, {', '.join(extensions)} "
                                       f"(tests skipped)")


def corpus_dataset(folder: Path, corpus_mb: float, machine: bool = False, vocab: int = 16000,
                   workers: int = 8) -> tuple[Path, Path, dict]:
    """(dataset prefix, tokenizer model, description) of `corpus_files`' text in `folder`, prepared
    there (a sentencepiece tokenizer trained on it) unless an earlier call did."""
    from megatron_stag.data.prepare import prepare_dataset

    prefix, model_path = folder / "corpus_text_document", folder / "corpus.model"
    files, info = corpus_files(corpus_mb, machine=machine)
    if not Path(f"{prefix}.idx").is_file():
        t = time.time()
        prepare_dataset([str(f) for f in files], folder / "corpus", vocab_size=vocab, workers=workers)
        info["prepare_seconds"] = time.time() - t
    info["tokens"] = _dataset_tokens(prefix)
    return prefix, model_path, info


def recurrent_eval(save: Path, prefix: Path, split: str, sequences: int, length: int) -> dict:
    """Held-out loss of the shared-weight model decoded normally and in recurrent mode. Recurrent mode
    is a generation mode (the prompt is prefilled with both passes), so each sequence's first half is
    the prompt and the loss is that of its second half, read by decoding steps."""
    from megatron.core.datasets.blended_megatron_dataset_config import (
        convert_split_vector_to_split_matrix, parse_and_normalize_split)
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    from megatron_stag.checkpointing.checkpoint_io import load_model_weights, resolve_checkpoint
    from megatron_stag.models.model_args import ModelArgs
    from megatron_stag.platform.distributed import initialize
    from megatron_stag.serving.convert import to_plain_model
    from megatron_stag.serving.engine import StaggeredGenerator

    device = "cuda" if torch.cuda.is_available() else "cpu"
    initialize(tp=1, pp=1)
    _, run_dir = resolve_checkpoint(save)
    args = ModelArgs.load(run_dir / "model_args.json")
    model = args.build(args.config(dtype=torch.bfloat16)).to(device).eval()
    load_model_weights(model, save)
    model = to_plain_model(model, args, device=device).to(torch.bfloat16)
    ds = IndexedDataset(str(prefix))
    docs = len(ds)
    begin, end = convert_split_vector_to_split_matrix(parse_and_normalize_split(split))[1]
    held_out = list(range(round(begin * docs), round(end * docs)))  # megatron's validation documents
    tokens = torch.cat([torch.from_numpy(ds[i].astype("int64")) for i in held_out])
    seqs = [tokens[i * (length + 1):(i + 1) * (length + 1)] for i in range(sequences)]
    prompt = length // 2
    out = {}
    for mode in ("normal", "recurrent"):
        nll, count = 0.0, 0
        for seq in seqs:
            gen = StaggeredGenerator(model, max_len=length + 1, batch=1, recurrent=mode == "recurrent")
            with torch.no_grad():
                logits = [gen.prefill([seq[:prompt].tolist()])[0]]
                pos = torch.tensor([prompt], device=device)
                for t in range(prompt, length):
                    logits.append(gen.step(seq[t:t + 1].to(device), pos)[2][0].clone())
                    pos = pos + 1
            lp = torch.log_softmax(torch.stack(logits).float(), -1)
            target = seq[prompt:length + 1].to(device)
            nll += -lp.gather(-1, target[:, None]).sum().item()
            count += len(target)
        out[mode] = nll / count
    return dict(sequences=sequences, length=length, prompt=prompt, held_out_documents=len(held_out),
                loss_normal_decode=out["normal"], loss_recurrent=out["recurrent"])


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--study", choices=sorted(STUDIES), default="small",
                        help="small: issue 8's 20M-token runs; budget: issue 19's >= 10 tokens per parameter")
    parser.add_argument("--out", default="results/quality_study")
    parser.add_argument("--work", default="/tmp/quality_study", help="data and checkpoints (not kept)")
    parser.add_argument("--runs", help="comma-separated run names or slugs (default: all not yet in the JSON)")
    parser.add_argument("--rerun", action="store_true", help="run again what the JSON already holds")
    parser.add_argument("--iters", type=int, help="default: 1000 (small), the token budget (budget)")
    parser.add_argument("--tokens-per-param", type=float, default=10.0, help="budget study: tokens per "
                        "non-embedding parameter of the largest model")
    parser.add_argument("--budget-seconds", type=float, default=0, help="start no run after this (0: no limit)")
    parser.add_argument("--parallel", type=lambda v: max(1, int(v)), default=1, help="runs training at once on the GPU: the "
                        "budget study's small models leave most of an H200 idle, so several share it")
    parser.add_argument("--throughput", action="store_true", help="measure tokens/s and MFU of the study's "
                        "baseline at several micro-batch sizes, then stop")
    parser.add_argument("--eval-interval", type=int, default=100)
    parser.add_argument("--corpus-mb", type=float, default=60.0)
    parser.add_argument("--vocab", type=int, default=16000)
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--recurrent-sequences", type=int, default=4)
    parser.add_argument("--recurrent-length", type=int, default=512)
    parser.add_argument("--report-only", action="store_true", help="rewrite the table and plot from the JSON")
    ns = parser.parse_args(argv)
    recipe, study_runs = STUDIES[ns.study]
    out = Path(ns.out)
    results_path = out / f"{out.name}.json"
    if ns.report_only:
        return _write_report(json.loads(results_path.read_text()), out)

    from megatron_stag.benchmarks.hardware import machine
    from megatron_stag.config.recipe import load_recipe
    from megatron_stag.training.megatron_pretrain import launch
    from megatron_stag.training.run_logs import read_log

    started = time.time()
    work = Path(ns.work)
    out.mkdir(parents=True, exist_ok=True)
    prefix, model_path, data_info = corpus_dataset(work / "data", ns.corpus_mb, ns.study == "budget", ns.vocab,
                                                   ns.workers)
    results = json.loads(results_path.read_text()) if results_path.is_file() else {}
    import sys

    results.update(machine=machine(), data=data_info, settings=vars(ns), recipe=recipe)
    results.setdefault("commands", []).append(" ".join(sys.argv))
    iters = ns.iters or (1000 if ns.study == "small" else _budget_iters(recipe, study_runs, ns.tokens_per_param))
    if ns.throughput:
        results["throughput"] = _throughput(recipe, prefix, model_path, work, launch)
        write_atomic(results_path, json.dumps(results, indent=2) + "\n")
        print(json.dumps(results["throughput"], indent=2))
        return
    wanted = set(ns.runs.split(",")) if ns.runs else None
    runs = results.setdefault("runs", {})
    todo = [(name, overrides) for name, overrides in study_runs.items()
            if not (wanted and name not in wanted and SLUGS[name] not in wanted)
            and (name not in runs or ns.rerun)]
    lock = threading.Lock()

    def one(name: str, overrides: list[str]) -> None:
        if ns.budget_seconds and time.time() - started > ns.budget_seconds:
            print(f"budget of {ns.budget_seconds:.0f} s spent: {name!r} is left for the next call")
            return
        save = work / "runs" / SLUGS[name]
        common = [f"data.data_path=[{prefix}]", f"data.tokenizer_model={model_path}",
                  f"checkpoint.save={save}", f"checkpoint.load={save}", f"training.train_iters={iters}",
                  f"logging.eval_interval={ns.eval_interval}", f"checkpoint.save_interval={iters}",
                  f"optimizer.lr_warmup_iters={max(1, min(100, iters // 10))}"]
        start = time.time()
        if launch(recipe, common + overrides, []) != 0:
            raise RuntimeError(f"run {name!r} failed (its log: {save / 'train.log'})")
        log = read_log(save / "train.log", name)
        args = json.loads((save / "model_args.json").read_text())
        iter_ms = sorted(log.iter_ms[i] for i in log.iter_ms if i > 20)
        final = log.valid[max(log.valid)]
        row = dict(
            command=f"megatron-stag pretrain {recipe} " + " ".join(common + overrides),
            overrides=overrides, params=log.params, non_embedding_params=_non_embedding(recipe, overrides),
            layers=args["num_layers"], tokens=iters * _recipe_tokens(recipe), final_validation_loss=final,
            final_validation_ppl=math.exp(final), validation_curve=log.valid, training_curve=log.train,
            median_iteration_ms=iter_ms[len(iter_ms) // 2] if iter_ms else None,
            wall_seconds=time.time() - start, runs_sharing_the_gpu=min(ns.parallel, len(todo)), data_tokens=data_info["tokens"])
        if "shared" in name:
            row["recurrent"] = recurrent_eval(save, prefix, load_recipe(recipe).get("split"), ns.recurrent_sequences,
                                              ns.recurrent_length)
        with lock:  # each finished run is saved at once: a call cut short keeps what it finished
            runs[name] = row
            write_atomic(results_path, json.dumps(results, indent=2) + "\n")

    with ThreadPoolExecutor(max_workers=ns.parallel) as pool:
        failures = [f.exception() for f in [pool.submit(one, *job) for job in todo] if f.exception()]
    if failures:
        raise SystemExit("; ".join(map(str, failures)))
    _write_report(results, out)


def _dataset_tokens(prefix: Path) -> int:
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    dataset = IndexedDataset(str(prefix))  # alive while its memory-mapped index is read
    return int(dataset.sequence_lengths.sum())


def _non_embedding(recipe: str, overrides: list[str]) -> int:
    """Non-embedding parameters of a run (attention, MLP and cross-attention matrices; norms and AltUp
    scalars are negligible), from the recipe and the run's overrides."""
    from megatron_stag.config.recipe import load_recipe

    r = load_recipe(recipe, overrides)
    d, layers, ffn = r.get("hidden_size"), r.get("num_layers"), r.get("ffn_hidden_size") or 4 * r.get("hidden_size")
    mlp = (3 if r.get("swiglu") else 2) * d * ffn
    sections = r.get("stag_sections") or 1
    per_section = layers // sections
    distinct = per_section if r.get("stag_shared_weights") else layers
    cross = 4 * d * d * per_section * (sections - 1)
    return distinct * (4 * d * d + mlp) + cross


def _budget_iters(recipe: str, runs: dict, tokens_per_param: float) -> int:
    """Iterations giving every run >= tokens_per_param tokens per non-embedding parameter (the same
    tokens and schedule for all: the largest model sets it)."""
    largest = max(_non_embedding(recipe, overrides) for overrides in runs.values())
    return math.ceil(tokens_per_param * largest / _recipe_tokens(recipe))


def _throughput(recipe: str, prefix: Path, model_path: Path, work: Path, launch) -> dict:
    """tokens/s and MFU (megatron's own TFLOP/s over the bf16 peak) of the baseline at several
    micro-batch sizes, 30 iterations each."""
    import re

    from megatron_stag.benchmarks.hardware import peak_tflops

    rows = []
    for micro in (16, 32, 64):
        save = work / "throughput" / f"mb{micro}"
        common = [f"data.data_path=[{prefix}]", f"data.tokenizer_model={model_path}", f"checkpoint.save={save}",
                  f"checkpoint.load={save}", "training.train_iters=30", "checkpoint.save_interval=1000",
                  "logging.eval_interval=1000", "logging.log_interval=10", "optimizer.lr_warmup_iters=5",
                  f"training.micro_batch_size={micro}", f"training.global_batch_size={max(micro, 64)}"]
        if launch(recipe, common, []) != 0:
            rows.append(dict(micro_batch=micro, error="failed (out of memory?)"))
            continue
        text = (save / "train.log").read_text()
        speed = [float(x.replace(",", "")) for x in re.findall(r"tokens/s: ([0-9,]+)", text)][1:]
        tflops = [float(x) for x in re.findall(r"throughput per GPU \(TFLOP/s/GPU\): ([0-9.]+)", text)][1:]
        rows.append(dict(micro_batch=micro, global_batch=max(micro, 64), tokens_per_s=max(speed) if speed else None,
                         tflops=sorted(tflops)[len(tflops) // 2] if tflops else None,
                         mfu=sorted(tflops)[len(tflops) // 2] / peak_tflops() if tflops else None))
    return dict(recipe=recipe, rows=rows)


def _write_report(results: dict, out: Path) -> None:
    from megatron_stag.training.run_logs import plot_runs

    _report(results, out)
    try:
        plot_runs([_curve(n, r) for n, r in results["runs"].items()], out / "validation_loss.png",
                  "validation loss (held-out " + ("source and doc files)" if results.get("recipe") == "study-budget"
                                                  else "Python files)"))
    except ImportError:  # matplotlib missing on this machine: rerun with --report-only elsewhere
        print("matplotlib is not installed: no PNG written (rerun with --report-only).")


def _recipe_tokens(recipe: str = "study-50m") -> int:
    from megatron_stag.config.recipe import load_recipe

    r = load_recipe(recipe)
    return r.get("global_batch_size") * r.get("seq_length")


def _curve(name: str, run: dict):
    from megatron_stag.training.run_logs import RunLog

    valid = {int(k): v for k, v in run["validation_curve"].items()}
    return RunLog(name, valid=valid)


def _loss(r: dict, name: str) -> float:
    """A run's final validation loss; the mean over its seeds where a second seed ran."""
    losses = [r[n]["final_validation_loss"] for n in (name, f"{name} seed 2") if n in r]
    if not losses:
        raise KeyError(name)
    return sum(losses) / len(losses)


def _seed_spread(r: dict) -> float:
    """The largest difference between two seeds of one model (the pairs that ran)."""
    pairs = [(a, f"{a} seed 2") for a in ("baseline L=12", "StagFormer 2x6 separate") if f"{a} seed 2" in r]
    if not pairs:
        raise KeyError("seed 2")
    return max(abs(r[a]["final_validation_loss"] - r[b]["final_validation_loss"]) for a, b in pairs)


BUDGET_HYPOTHESES = [  # stated before the runs (issue 19)
    ("precondition: baseline L=12 clearly below L=6 (by more than the seed spread)",
     lambda r: _loss(r, "baseline L=6") - _loss(r, "baseline L=12") > _seed_spread(r)),
    ("StagFormer 2x6 within 1.5% of baseline L=12 and below L=6",
     lambda r: _loss(r, "StagFormer 2x6 separate") <= 1.015 * _loss(r, "baseline L=12")
     and _loss(r, "StagFormer 2x6 separate") < _loss(r, "baseline L=6")),
    ("StagFormer 2x6 shared below baseline L=6",
     lambda r: _loss(r, "StagFormer 2x6 shared") < _loss(r, "baseline L=6")),
    ("window 1 within 1% of full cross-attention",
     lambda r: _loss(r, "StagFormer 2x6 window 1") <= 1.01 * _loss(r, "StagFormer 2x6 separate")),
    ("AltUp K=2 below baseline L=12",
     lambda r: _loss(r, "AltUp K=2 recycled (L=12)") < _loss(r, "baseline L=12")),
    ("the null entry for position 0 only changes the loss by less than the seed spread",
     lambda r: abs(_loss(r, "StagFormer 2x6 null entry at position 0 only") - _loss(r, "StagFormer 2x6 separate"))
     < _seed_spread(r)),
]

HYPOTHESES = [
    ("StagFormer 2x6 separate within 1.5% of baseline L=12's validation loss",
     lambda r: r["StagFormer 2x6 separate"]["final_validation_loss"]
     <= 1.015 * r["baseline L=12"]["final_validation_loss"]),
    ("StagFormer shared weights below baseline L=6",
     lambda r: r["StagFormer shared (6 layers run twice)"]["final_validation_loss"]
     < r["baseline L=6"]["final_validation_loss"]),
    ("window 128 within 0.5% of full cross-attention",
     lambda r: r["StagFormer 2x6 window 128"]["final_validation_loss"]
     <= 1.005 * r["StagFormer 2x6 separate"]["final_validation_loss"]),
    ("AltUp K=2 at or below baseline L=12",
     lambda r: r["AltUp K=2 recycled (L=12)"]["final_validation_loss"]
     <= r["baseline L=12"]["final_validation_loss"]),
    ("AltUp K=2 at <= 1.05x baseline L=12's step time",
     lambda r: r["AltUp K=2 recycled (L=12)"]["median_iteration_ms"]
     <= 1.05 * r["baseline L=12"]["median_iteration_ms"]),
]


def _report(results: dict, out: Path) -> None:
    runs = results["runs"]
    bases = [runs[n] for n in ("baseline L=12", "baseline L=12 seed 2") if n in runs]
    lines = ["| model | params | layers | tokens | val loss | val ppl | step time vs L=12 |",
             "|---|---|---|---|---|---|---|"]
    for name, r in runs.items():
        # step times are comparable only between runs that shared the GPU alike
        base = next((b for b in bases if b.get("runs_sharing_the_gpu", 1) == r.get("runs_sharing_the_gpu", 1)), None)
        rel = (f"{r['median_iteration_ms'] / base['median_iteration_ms']:.2f}"
               if base and r.get("median_iteration_ms") else "")
        lines.append(f"| {name} | {r['params'] / 1e6:.1f}M | {r['layers']} | {r['tokens'] / 1e6:.0f}M | "
                     f"{r['final_validation_loss']:.4f} | {r['final_validation_ppl']:.2f} | {rel} |")
        if "recurrent" in r:
            rec = r["recurrent"]
            how = (f"the last {rec['length'] - rec['prompt'] + 1} of {rec['sequences']}x{rec['length'] + 1} held-out "
                   f"tokens after a {rec['prompt']}-token prompt" if "prompt" in rec
                   else f"{rec['sequences']}x{rec['length']} tokens")
            lines.append(f"| ↳ same model, decoded (normal / recurrent): {how}{' (see the note in the JSON)' if 'note' in rec else ''}"
                         f" | | | | {rec['loss_normal_decode']:.4f} / {rec['loss_recurrent']:.4f} | | |")
    verdicts = []
    for text, check in (BUDGET_HYPOTHESES if results.get("recipe") == "study-budget" else HYPOTHESES):
        try:
            verdicts.append((text, "held" if check(runs) else "did not hold"))
        except KeyError:
            verdicts.append((text, "not run"))
    results["hypotheses"] = dict(verdicts)
    write_atomic(out / f"{out.name}.json", json.dumps(results, indent=2) + "\n")
    try:
        spread = _seed_spread(runs)
        notes = [f"Seed spread (largest |seed 1 - seed 2| of the pairs that ran): {spread:.4f}. Verdicts use "
                 f"the mean over a model's seeds where two ran."]
    except KeyError:
        notes = []
    md = ("\n".join(lines) + "\n\n" + "".join(n + "\n\n" for n in notes)
          + "\n".join(f"- {t}: **{v}**" for t, v in verdicts) + "\n")
    write_atomic(out / f"{out.name}.md", md)
    print(md)


if __name__ == "__main__":
    run(main)
