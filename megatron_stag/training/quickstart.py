"""The quickstart: a tiny StagFormer pretrained with Megatron's training loop on this machine's own
Python sources, then staggered generation from its checkpoint. CPU-friendly (a few minutes on 2
cores); the same commands run on GPUs.

Steps: stdlib sources -> `prepare-data` (sentencepiece BPE, megatron indexed dataset) ->
`megatron-stag pretrain tiny-cpu-stag` (megatron.training.pretrain: GPTDataset 98/2 split, iteration
logs, validation, torch_dist checkpoints) -> reload the latest checkpoint -> staggered decoding,
checked against the teacher-forced forward.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from megatron_stag.data.local_corpus import stdlib_files, stdlib_root
from megatron_stag.data.prepare import prepare_dataset
from megatron_stag.platform.files import write_atomic

RECIPE = "tiny-cpu-stag"


def _data(out: Path, corpus_mb: float) -> tuple[Path, Path]:
    """The quickstart's corpus, prepared once per output folder: a re-run continues the same run on
    the same data and tokenizer; other data needs another folder (its checkpoints know only theirs)."""
    stamp = out / "data" / "corpus.json"
    prefix, spm_path = out / "data" / "stdlib_text_document", out / "data" / "stdlib.model"
    if stamp.is_file():
        made = json.loads(stamp.read_text())
        if made.get("corpus_mb") != corpus_mb:
            raise SystemExit(f"{out} holds a quickstart on {made.get('corpus_mb')} MB of text, not {corpus_mb}: "
                             f"use another --out, or the same --corpus-mb to continue it.")
        return prefix, spm_path
    files = stdlib_files(max_bytes=int(corpus_mb * 1e6))
    print(f"corpus: {len(files)} stdlib files ({sum(f.stat().st_size for f in files) / 1e6:.1f} MB) "
          f"under {stdlib_root()}", file=sys.stderr)
    prefix, spm_path = prepare_dataset([str(f) for f in files], out / "data" / "stdlib", vocab_size=2048,
                                       overwrite=True)  # an earlier attempt that stopped before the stamp
    write_atomic(stamp, json.dumps(dict(corpus_mb=corpus_mb, files=len(files))) + "\n")
    return prefix, spm_path


def run_quickstart(out: Path, iterations: int = 500, corpus_mb: float = 4.0, seed: int = 1234) -> dict:
    from megatron_stag.checkpointing.checkpoint_io import load_model_weights, resolve_checkpoint
    from megatron_stag.data.tokenizer import load_tokenizer
    from megatron_stag.serving.sampling import SamplingParams, cache_slots
    from megatron_stag.serving.convert import to_plain_model
    from megatron_stag.serving.engine import StaggeredGenerator
    from megatron_stag.models.model_args import ModelArgs
    from megatron_stag.platform.distributed import initialize
    from megatron_stag.training.megatron_pretrain import launch
    from megatron_stag.training.run_logs import plot_runs, read_log

    out = Path(out).resolve()
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise SystemExit(f"--out {out}: cannot make the folder ({err.strerror}): give a writable path.") from None
    prefix, spm_path = _data(out, corpus_mb)

    ckpts = out / "checkpoints"
    overrides = [f"data.data_path=[{prefix}]", f"data.tokenizer_model={spm_path}",
                 f"checkpoint.save={ckpts}", f"checkpoint.load={ckpts}", f"training.seed={seed}",
                 f"training.train_iters={iterations}", f"checkpoint.save_interval={iterations}",
                 f"logging.eval_interval={max(1, iterations // 3)}",
                 f"optimizer.lr_warmup_iters={min(20, iterations // 10)}",
                 f"logging.tensorboard_dir={out / 'tensorboard'}"]
    print(f"\n$ megatron-stag pretrain {RECIPE} {' '.join(overrides)}\n", file=sys.stderr)
    if launch(RECIPE, overrides, []) != 0:
        raise SystemExit("pretraining failed (see the log above).")

    initialize(tp=1, pp=1, seed=seed)
    weights, run_dir = resolve_checkpoint(ckpts)
    args = ModelArgs.load(run_dir / "model_args.json")
    tok = load_tokenizer(run_dir / "tokenizer.model")
    model = args.build(args.config()).eval()
    load_model_weights(model, ckpts)
    prompts_text = ["def main(", "import os\nimport sys\n\n\nclass "]
    prompts = [tok.tokenize(p) for p in prompts_text]
    params = SamplingParams(max_new_tokens=48, temperature=0.7, top_p=0.95, seed=seed)
    serving = to_plain_model(model, args)  # what `megatron-stag generate` decodes
    result = StaggeredGenerator(serving, max_len=cache_slots(prompts, params), batch=len(prompts)).generate(
        prompts, params, keep_logits=True, progress=True)
    worst = 0.0
    for r, prompt in enumerate(prompts):
        full = prompt + result.tokens[r]
        with torch.no_grad():
            ref = model(torch.tensor([full]), torch.arange(len(full))[None])[0]
        steps = result.step_logits[: len(result.tokens[r]) - 1, r]
        worst = max(worst, (steps - ref[len(prompt): len(full) - 1]).abs().max().item())
    for text, tokens in zip(prompts_text, result.tokens):
        print(f"\n--- prompt: {text!r}\n{text}{tok.detokenize(tokens)}")
    log = read_log(ckpts / "train.log", "tiny StagFormer p=2")
    losses = log.train
    first, last = losses[min(losses)], losses[max(losses)]
    plot = plot_runs([log], out / "loss.png", "quickstart: tiny StagFormer on stdlib sources")
    summary = dict(checkpoint=str(weights), iterations=max(losses), first_loss=first, final_loss=last,
                   validation_loss=log.valid, loss_plot=str(plot),
                   decode_vs_forward_max_abs_diff=worst, generation_seconds=result.seconds)
    write_atomic(out / "summary.json", json.dumps(summary, indent=2) + "\n")
    print(f"\nloss {first:.3f} -> {last:.3f}; staggered decode vs teacher-forced logits: max |diff| "
          f"{worst:.2e}; checkpoint {weights}", file=sys.stderr)
    return summary
