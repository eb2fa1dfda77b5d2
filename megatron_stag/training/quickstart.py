"""The quickstart: a tiny StagFormer pretrained on this machine's own Python sources, then staggered
generation from its checkpoint. CPU-friendly (a few minutes on 2 cores); the same code runs on a GPU.

Steps: stdlib sources -> `prepare-data` (sentencepiece BPE, megatron indexed dataset) -> megatron
GPTDataset (95/5 split) -> StagFormer p=2 pretraining with a falling loss -> atomic torch_dist
checkpoint -> reload -> staggered decoding, checked against the teacher-forced forward.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from megatron_stag.data.local_corpus import stdlib_files, stdlib_root
from megatron_stag.data.megatron_datasets import batches, build_gpt_datasets
from megatron_stag.data.prepare import prepare_dataset
from megatron_stag.data.tokenizer import load_tokenizer
from megatron_stag.models.model_args import ModelArgs
from megatron_stag.training.train_loop import TrainSettings, train


def run_quickstart(out: Path, iterations: int = 400, corpus_mb: float = 6.0, seed: int = 1234) -> dict:
    from megatron_stag.checkpointing.checkpoint_io import latest_checkpoint, load_model_weights
    from megatron_stag.inference.sampling import SamplingParams
    from megatron_stag.inference.staggered_generation import StaggeredGenerator
    from megatron_stag.platform.distributed import initialize

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    initialize(tp=1, pp=1, seed=seed)
    torch.manual_seed(seed)
    files = stdlib_files(max_bytes=int(corpus_mb * 1e6))
    print(f"corpus: {len(files)} stdlib files ({sum(f.stat().st_size for f in files) / 1e6:.1f} MB) "
          f"under {stdlib_root()}", file=sys.stderr)
    prefix, spm_path = prepare_dataset([str(f) for f in files], out / "data" / "stdlib", vocab_size=2048)
    tok = load_tokenizer(spm_path)
    seq, batch = 128, 16
    args = ModelArgs(vocab_size=tok.vocab_size, max_sequence_length=seq, num_layers=4, hidden_size=192,
                     num_attention_heads=6, position_embedding_type="rope", stag_sections=2)
    model = args.build(args.config())
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: StagFormer p=2 separate, {args.num_layers} layers, hidden {args.hidden_size}, "
          f"{n_params / 1e6:.2f}M parameters", file=sys.stderr)
    settings = TrainSettings(iterations=iterations, warmup=max(1, min(30, iterations // 10)),
                             eval_interval=max(1, iterations // 4))
    # megatron's GPTDataset: documents split 95/5 in order (held-out files never train)
    train_set, valid_set, _ = build_gpt_datasets(
        [prefix], None, "95,5,0", seq, tok,
        [iterations * batch, 5 * settings.eval_batches * batch, 0], seed, out / "data" / "cache")
    train_batches, valid_batches = batches(train_set, batch), batches(valid_set, batch)
    records = train(model, args, train_batches, valid_batches, settings, out / "checkpoints", spm_path)

    ckpt = latest_checkpoint(out / "checkpoints")
    fresh = args.build(args.config()).eval()
    load_model_weights(fresh, ckpt)
    prompts_text = ["def main(", "import os\nimport sys\n\n\nclass "]
    prompts = [tok.tokenize(p) for p in prompts_text]
    params = SamplingParams(max_new_tokens=48, temperature=0.7, top_p=0.95, seed=seed)
    result = StaggeredGenerator(fresh, max_len=seq, batch=len(prompts)).generate(
        prompts, params, keep_logits=True, progress=True)
    worst = 0.0
    for r, prompt in enumerate(prompts):
        full = prompt + result.tokens[r]
        with torch.no_grad():
            ref = fresh(torch.tensor([full]), torch.arange(len(full))[None])[0]
        steps = result.step_logits[: len(result.tokens[r]) - 1, r]
        worst = max(worst, (steps - ref[len(prompt): len(full) - 1]).abs().max().item())
    for text, tokens in zip(prompts_text, result.tokens):
        print(f"\n--- prompt: {text!r}\n{text}{tok.detokenize(tokens)}")
    losses = [r["loss"] for r in records if "loss" in r]
    summary = dict(checkpoint=str(ckpt), first_loss=losses[0], final_loss=losses[-1],
                   valid_loss=[r["valid_loss"] for r in records if "valid_loss" in r][-1],
                   decode_vs_forward_max_abs_diff=worst, generation_seconds=result.seconds)
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"\nloss {summary['first_loss']:.3f} -> {summary['final_loss']:.3f}; staggered decode vs "
          f"teacher-forced logits: max |diff| {worst:.2e}; checkpoint {ckpt}", file=sys.stderr)
    return summary
