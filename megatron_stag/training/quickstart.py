"""The quickstart: a tiny StagFormer pretrained on this machine's own Python sources, then staggered
generation from its checkpoint. CPU-friendly (a few minutes on 2 cores); the same code runs on a GPU.

Steps: stdlib sources -> sentencepiece BPE -> megatron indexed datasets (.bin/.idx) -> StagFormer
p=2 pretraining with a falling loss -> atomic torch_dist checkpoint -> reload -> staggered decoding,
checked against the teacher-forced forward.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from megatron_stag.data.local_corpus import read_texts, split_of, stdlib_files, stdlib_root
from megatron_stag.data.token_dataset import RandomWindows, load_token_stream, write_indexed_dataset
from megatron_stag.data.tokenizer import load_tokenizer, train_sentencepiece
from megatron_stag.models.model_args import ModelArgs
from megatron_stag.training.train_loop import TrainSettings, train


def prepare_local_data(out: Path, corpus_bytes: int, vocab_size: int):
    """Tokenizer + train/valid indexed datasets from the stdlib sources."""
    root = stdlib_root()
    files = stdlib_files(max_bytes=corpus_bytes)
    splits = {"train": [f for f in files if split_of(f, root) == "train"],
              "valid": [f for f in files if split_of(f, root) == "valid"]}
    print(f"corpus: {len(files)} stdlib files ({sum(f.stat().st_size for f in files) / 1e6:.1f} MB) "
          f"under {root}; {len(splits['valid'])} held out", file=sys.stderr)
    spm_path = train_sentencepiece(read_texts(splits["train"]), out / "tokenizer.model", vocab_size)
    tok = load_tokenizer(spm_path)
    prefixes = {}
    for name, split_files in splits.items():
        docs = (tok.text_to_ids(t) + [tok.eos_id] for t in read_texts(split_files))
        prefixes[name] = write_indexed_dataset(docs, out / f"{name}_text_document", tok.vocab_size,
                                               total=len(split_files))
    return spm_path, tok, prefixes


def run_quickstart(out: Path, iterations: int = 400, corpus_mb: float = 6.0, seed: int = 1234) -> dict:
    from megatron_stag.checkpointing.checkpoint_io import latest_checkpoint, load_model_weights
    from megatron_stag.inference.sampling import SamplingParams
    from megatron_stag.inference.staggered_generation import StaggeredGenerator
    from megatron_stag.platform.distributed import initialize

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    initialize(tp=1, pp=1, seed=seed)
    torch.manual_seed(seed)
    spm_path, tok, prefixes = prepare_local_data(out / "data", int(corpus_mb * 1e6), vocab_size=2048)
    seq = 128
    args = ModelArgs(vocab_size=tok.vocab_size, max_sequence_length=seq, num_layers=4, hidden_size=192,
                     num_attention_heads=6, position_embedding_type="rope", stag_sections=2)
    model = args.build(args.config())
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: StagFormer p=2 separate, {args.num_layers} layers, hidden {args.hidden_size}, "
          f"{n_params / 1e6:.2f}M parameters", file=sys.stderr)
    train_batches = RandomWindows(load_token_stream(prefixes["train"]), seq, batch=16, seed=seed)
    valid_batches = RandomWindows(load_token_stream(prefixes["valid"]), seq, batch=16, seed=seed + 1)
    settings = TrainSettings(iterations=iterations, warmup=max(1, min(30, iterations // 10)),
                             eval_interval=max(1, iterations // 4))
    records = train(model, args, train_batches, valid_batches, settings, out / "checkpoints", spm_path)

    ckpt = latest_checkpoint(out / "checkpoints")
    fresh = args.build(args.config()).eval()
    load_model_weights(fresh, ckpt)
    prompts_text = ["def main(", "import os\nimport sys\n\n\nclass "]
    prompts = [tok.text_to_ids(p) for p in prompts_text]
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
        print(f"\n--- prompt: {text!r}\n{text}{tok.ids_to_text(tokens)}")
    losses = [r["loss"] for r in records if "loss" in r]
    summary = dict(checkpoint=str(ckpt), first_loss=losses[0], final_loss=losses[-1],
                   valid_loss=[r["valid_loss"] for r in records if "valid_loss" in r][-1],
                   decode_vs_forward_max_abs_diff=worst, generation_seconds=result.seconds)
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"\nloss {summary['first_loss']:.3f} -> {summary['final_loss']:.3f}; staggered decode vs "
          f"teacher-forced logits: max |diff| {worst:.2e}; checkpoint {ckpt}", file=sys.stderr)
    return summary
