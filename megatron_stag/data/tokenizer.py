"""Sentencepiece tokenizers: trained with sentencepiece, used through megatron's tokenizer
(`megatron.core.tokenizers.MegatronTokenizer`: `tokenize`, `detokenize`, `vocab_size`, `eod`), which
megatron's GPT datasets also require."""

from __future__ import annotations

import io
import random
from pathlib import Path
from typing import Iterable


def train_sentencepiece(texts: Iterable[str], model_path: Path, vocab_size: int,
                        max_lines: int = 200_000, seed: int = 1234) -> Path:
    """Train a BPE sentencepiece model on documents; writes `model_path` (a .model file). The
    training lines are a seeded sample of at most `max_lines` of the documents' lines, drawn here:
    sentencepiece's own sampler draws its seed from the OS (`set_random_generator_seed` does not
    reach it), so the same documents gave a different tokenizer in every process."""
    import sentencepiece as spm

    buffer = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_sample_lines(texts, max_lines, seed)), model_writer=buffer,
        vocab_size=vocab_size, model_type="bpe",
        character_coverage=1.0, byte_fallback=True, split_digits=True, allow_whitespace_only_pieces=True,
        remove_extra_whitespaces=False, normalization_rule_name="identity", bos_id=-1, eos_id=1,
        unk_id=0, pad_id=-1, input_sentence_size=0, shuffle_input_sentence=False,
        minloglevel=2, num_threads=2,
    )
    model_path = Path(model_path)
    model_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = model_path.with_suffix(".tmp")
    tmp.write_bytes(buffer.getvalue())
    tmp.replace(model_path)
    return model_path


def _sample_lines(texts: Iterable[str], k: int, seed: int) -> list[str]:
    """A uniform sample of k non-blank lines, in one pass (reservoir sampling), the same for the
    same documents and seed."""
    rng, sample, seen = random.Random(seed), [], 0
    for text in texts:
        for line in text.splitlines():
            if not line.strip():
                continue
            seen += 1
            if len(sample) < k:
                sample.append(line)
            elif (j := rng.randrange(seen)) < k:
                sample[j] = line
    return sample


def load_tokenizer(model_path: Path):
    """megatron's text tokenizer for a sentencepiece .model file (clear error if it is missing)."""
    model_path = Path(model_path)
    if not model_path.is_file():
        raise FileNotFoundError(f"tokenizer model {model_path} does not exist: pass the .model file "
                                f"written by training (e.g. <checkpoint>/tokenizer.model).")
    from megatron.core.tokenizers import MegatronTokenizer

    return MegatronTokenizer.from_pretrained(tokenizer_path=str(model_path),
                                             metadata_path={"library": "sentencepiece"})
