"""A Hugging Face tokenizer folder in Llama's layout, built here (no download): a sentencepiece BPE
model with <unk> 0, <s> 1, </s> 2 and byte fallback, read by transformers' LlamaTokenizer, which adds
the BOS as Llama 2 and TinyLlama ship it."""

from __future__ import annotations

import io
import json
from pathlib import Path


def llama_sentencepiece(vocab_size: int = 500) -> bytes:
    import sentencepiece as spm

    import megatron_stag

    sources = [line for p in sorted(Path(megatron_stag.__file__).parent.rglob("*.py"))
               for line in p.read_text().splitlines() if line.strip()]
    buffer = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(sources), model_writer=buffer, vocab_size=vocab_size,
                                   model_type="bpe", byte_fallback=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
                                   minloglevel=2, character_coverage=0.99)
    return buffer.getvalue()


def llama_tokenizer_folder(folder: Path, vocab_size: int = 500, add_bos: bool = True) -> Path:
    """`tokenizer.model` and `tokenizer_config.json` in `folder`, as a Llama 2 repository has them."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "tokenizer.model").write_bytes(llama_sentencepiece(vocab_size))
    (folder / "tokenizer_config.json").write_text(json.dumps(dict(tokenizer_class="LlamaTokenizer",
                                                                  add_bos_token=add_bos, legacy=False)))
    return folder
