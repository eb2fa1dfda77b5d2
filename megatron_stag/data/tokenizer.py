"""Sentencepiece tokenizers: trained with sentencepiece, used through megatron's tokenizer
(`megatron.core.tokenizers.MegatronTokenizer`: `tokenize`, `detokenize`, `vocab_size`, `eod`), which
megatron's GPT datasets also require."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Iterable


def train_sentencepiece(texts: Iterable[str], model_path: Path, vocab_size: int) -> Path:
    """Train a BPE sentencepiece model on documents; writes `model_path` (a .model file)."""
    import sentencepiece as spm

    buffer = io.BytesIO()

    def lines():
        for text in texts:
            for line in text.splitlines():
                if line.strip():
                    yield line

    spm.SentencePieceTrainer.train(
        sentence_iterator=lines(), model_writer=buffer, vocab_size=vocab_size, model_type="bpe",
        character_coverage=1.0, byte_fallback=True, split_digits=True, allow_whitespace_only_pieces=True,
        remove_extra_whitespaces=False, normalization_rule_name="identity", bos_id=-1, eos_id=1,
        unk_id=0, pad_id=-1, input_sentence_size=200_000, shuffle_input_sentence=True,
        minloglevel=2, num_threads=2,
    )
    model_path = Path(model_path)
    model_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = model_path.with_suffix(".tmp")
    tmp.write_bytes(buffer.getvalue())
    tmp.replace(model_path)
    return model_path


def load_tokenizer(model_path: Path):
    """megatron's text tokenizer for a sentencepiece .model file (clear error if it is missing)."""
    model_path = Path(model_path)
    if not model_path.is_file():
        raise FileNotFoundError(f"tokenizer model {model_path} does not exist: pass the .model file "
                                f"written by training (e.g. <checkpoint>/tokenizer.model).")
    from megatron.core.tokenizers import MegatronTokenizer

    return MegatronTokenizer.from_pretrained(tokenizer_path=str(model_path),
                                             metadata_path={"library": "sentencepiece"})
