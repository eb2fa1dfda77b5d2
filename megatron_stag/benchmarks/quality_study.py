"""Quality study: StagFormer and AltUp against baselines, same data, tokens, seed and schedule.

    python -m megatron_stag.benchmarks.quality_study --out results/quality_study [--runs a,b] [--iters N]

Data (no downloads): the `.py` files of this machine's Python standard library and installed
site-packages, sorted by path, one document per file, tokenised by `prepare-data` into a 16k
sentencepiece vocabulary. Megatron's GPTDataset splits documents in order (98/2), so held-out files
never train. Each run is `megatron-stag pretrain study-50m` plus the run's model overrides (~50M
parameters, seq 1024); validation loss is Megatron's evaluation every `--eval-interval` iterations.
The shared-weight run is also evaluated in recurrent mode (pass 2 reading its own earlier outputs)
on held-out sequences through the staggered decoder. Writes `<out>/quality_study.json` (command,
machine, data, every figure), `<out>/quality_study.md` and `<out>/validation_loss.png`.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sysconfig
import time
from pathlib import Path

import torch

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
SLUGS = {name: "-".join("".join(c if c.isalnum() else " " for c in name.lower()).split()) for name in RUNS}


def corpus_files(max_mb: float) -> tuple[list[Path], dict]:
    from megatron_stag.data.local_corpus import stdlib_files

    roots = [Path(sysconfig.get_paths()["stdlib"]), Path(sysconfig.get_paths()["purelib"])]
    files = stdlib_files(root=roots[0])
    for dirpath, dirnames, filenames in os.walk(roots[1]):
        dirnames[:] = sorted(d for d in dirnames if d not in ("__pycache__", "tests", "test"))
        files.extend(Path(dirpath) / f for f in sorted(filenames) if f.endswith(".py"))
    files = sorted(set(files), key=str)
    out, total = [], 0
    for f in files:
        size = f.stat().st_size
        if 200 <= size <= 200_000 and total + size <= max_mb * 1e6:
            out.append(f)
            total += size
    return out, dict(roots=[str(r) for r in roots], files=len(out), bytes=total,
                     rule="sorted .py files of 200 B..200 kB under the roots (tests skipped)")


def recurrent_eval(save: Path, prefix: Path, sequences: int, length: int) -> dict:
    """Held-out loss of the shared-weight model decoded normally and in recurrent mode."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    from megatron_stag.checkpointing.checkpoint_io import load_model_weights, resolve_checkpoint
    from megatron_stag.models.model_args import ModelArgs
    from megatron_stag.platform.distributed import initialize
    from megatron_stag.serving.convert import to_plain_model
    from megatron_stag.serving.engine import StaggeredGenerator

    initialize(tp=1, pp=1)
    _, run_dir = resolve_checkpoint(save)
    args = ModelArgs.load(run_dir / "model_args.json")
    model = args.build(args.config(dtype=torch.bfloat16)).cuda().eval()
    load_model_weights(model, save)
    model = to_plain_model(model, args, device="cuda").to(torch.bfloat16)
    ds = IndexedDataset(str(prefix))
    docs = len(ds)
    held_out = list(range(int(round(0.98 * docs)), docs))  # the validation split's documents
    tokens = torch.cat([torch.from_numpy(ds[i].astype("int64")) for i in held_out])
    seqs = [tokens[i * (length + 1):(i + 1) * (length + 1)] for i in range(sequences)]
    out = {}
    for mode in ("normal", "recurrent"):
        nll, count = 0.0, 0
        for seq in seqs:
            gen = StaggeredGenerator(model, max_len=length + 1, batch=1, recurrent=mode == "recurrent")
            with torch.no_grad():
                logits = [gen.prefill(0, seq[:1].tolist())]
                pos = torch.tensor([1], device="cuda")
                for t in range(1, length):
                    logits.append(gen.step(seq[t:t + 1].cuda(), pos)[2][0].clone())
                    pos = pos + 1
            lp = torch.log_softmax(torch.stack(logits).float(), -1)
            target = seq[1:length + 1].cuda()
            nll += -lp.gather(-1, target[:, None]).sum().item()
            count += length
        out[mode] = nll / count
    return dict(sequences=sequences, length=length, held_out_documents=len(held_out),
                loss_normal_decode=out["normal"], loss_recurrent=out["recurrent"])


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="results/quality_study")
    parser.add_argument("--work", default="/tmp/quality_study", help="data and checkpoints (not kept)")
    parser.add_argument("--runs", help="comma-separated run names or slugs (default: all)")
    parser.add_argument("--iters", type=int, default=1000)
    parser.add_argument("--eval-interval", type=int, default=100)
    parser.add_argument("--corpus-mb", type=float, default=60.0)
    parser.add_argument("--vocab", type=int, default=16000)
    parser.add_argument("--recurrent-sequences", type=int, default=4)
    parser.add_argument("--recurrent-length", type=int, default=512)
    parser.add_argument("--report-only", action="store_true", help="rewrite the table and plot from the JSON")
    ns = parser.parse_args(argv)
    if ns.report_only:
        return _write_report(json.loads((Path(ns.out) / "quality_study.json").read_text()), Path(ns.out))

    from megatron_stag.benchmarks.hardware import machine
    from megatron_stag.data.prepare import prepare_dataset
    from megatron_stag.training.megatron_pretrain import launch
    from megatron_stag.training.run_logs import read_log

    out, work = Path(ns.out), Path(ns.work)
    out.mkdir(parents=True, exist_ok=True)
    prefix = work / "data" / "corpus_text_document"
    model_path = work / "data" / "corpus.model"
    files, data_info = corpus_files(ns.corpus_mb)
    if not Path(f"{prefix}.idx").is_file():
        prepare_dataset([str(f) for f in files], work / "data" / "corpus", vocab_size=ns.vocab, workers=8)
    wanted = set(ns.runs.split(",")) if ns.runs else None
    results_path = out / "quality_study.json"
    results = json.loads(results_path.read_text()) if results_path.is_file() else {}
    import sys

    results.update(machine=machine(), data=data_info, settings=vars(ns))
    results.setdefault("commands", []).append(" ".join(sys.argv))
    runs = results.setdefault("runs", {})
    for name, overrides in RUNS.items():
        if wanted and name not in wanted and SLUGS[name] not in wanted:
            continue
        save = work / "runs" / SLUGS[name]
        common = [f"data.data_path=[{prefix}]", f"data.tokenizer_model={model_path}",
                  f"checkpoint.save={save}", f"checkpoint.load={save}", f"training.train_iters={ns.iters}",
                  f"logging.eval_interval={ns.eval_interval}", f"checkpoint.save_interval={ns.iters}",
                  f"optimizer.lr_warmup_iters={max(1, min(100, ns.iters // 10))}"]
        start = time.time()
        if launch("study-50m", common + overrides, []) != 0:
            raise SystemExit(f"run {name!r} failed")
        log = read_log(save / "train.log", name)
        args = json.loads((save / "model_args.json").read_text())
        iter_ms = sorted(log.iter_ms[i] for i in log.iter_ms if i > 20)
        final = log.valid[max(log.valid)]
        runs[name] = dict(
            overrides=overrides, params=log.params, layers=args["num_layers"],
            tokens=ns.iters * _recipe_tokens(), final_validation_loss=final,
            final_validation_ppl=math.exp(final), validation_curve=log.valid,
            median_iteration_ms=iter_ms[len(iter_ms) // 2] if iter_ms else None,
            wall_seconds=time.time() - start)
        if "shared" in name:
            runs[name]["recurrent"] = recurrent_eval(save, prefix, ns.recurrent_sequences,
                                                     ns.recurrent_length)
        results_path.write_text(json.dumps(results, indent=2) + "\n")
    _write_report(results, out)


def _write_report(results: dict, out: Path) -> None:
    from megatron_stag.training.run_logs import plot_runs

    _report(results, out)
    try:
        plot_runs([_curve(n, r) for n, r in results["runs"].items()], out / "validation_loss.png",
                  "validation loss (held-out Python files)")
    except ImportError:  # matplotlib missing on this machine: rerun with --report-only elsewhere
        print("matplotlib is not installed: no PNG written (rerun with --report-only).")


def _recipe_tokens() -> int:
    from megatron_stag.config.recipe import load_recipe

    r = load_recipe("study-50m")
    return r.get("global_batch_size") * r.get("seq_length")


def _curve(name: str, run: dict):
    from megatron_stag.training.run_logs import RunLog

    valid = {int(k): v for k, v in run["validation_curve"].items()}
    return RunLog(name, valid=valid)


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
    base = runs.get("baseline L=12")
    lines = ["| model | params | layers | tokens | val loss | val ppl | step time vs L=12 |",
             "|---|---|---|---|---|---|---|"]
    for name, r in runs.items():
        rel = (f"{r['median_iteration_ms'] / base['median_iteration_ms']:.2f}"
               if base and r.get("median_iteration_ms") else "")
        lines.append(f"| {name} | {r['params'] / 1e6:.1f}M | {r['layers']} | {r['tokens'] / 1e6:.0f}M | "
                     f"{r['final_validation_loss']:.4f} | {r['final_validation_ppl']:.2f} | {rel} |")
        if "recurrent" in r:
            rec = r["recurrent"]
            lines.append(f"| ↳ same model, decoded (normal / recurrent) on {rec['sequences']}x"
                         f"{rec['length']} held-out tokens | | | | {rec['loss_normal_decode']:.4f} / "
                         f"{rec['loss_recurrent']:.4f} | | |")
    verdicts = []
    for text, check in HYPOTHESES:
        try:
            verdicts.append((text, "held" if check(runs) else "did not hold"))
        except KeyError:
            verdicts.append((text, "not run"))
    results["hypotheses"] = dict(verdicts)
    (out / "quality_study.json").write_text(json.dumps(results, indent=2) + "\n")
    md = "\n".join(lines) + "\n\n" + "\n".join(f"- {t}: **{v}**" for t, v in verdicts) + "\n"
    (out / "quality_study.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
