"""Tokenizers, used through megatron's tokenizer (`megatron.core.tokenizers.MegatronTokenizer`:
`tokenize`, `detokenize`, `vocab_size`, `eod`), which megatron's GPT datasets also require. Two kinds:
a sentencepiece `.model` file (what `prepare-data` trains: no BOS, `</s>` closes each document), or a
Hugging Face tokenizer folder (`tokenizer.json`, or `tokenizer.model` with `tokenizer_config.json`:
Llama's, Mistral's, any model's), read as transformers reads it, BOS included where its config adds
one; its `eos_token` closes each document. A path names its kind: a folder is a Hugging Face tokenizer."""

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
    """megatron's text tokenizer for a sentencepiece .model file or a Hugging Face tokenizer folder
    (the same class `pretrain` builds for it), with a clear error where it is missing or unreadable."""
    model_path = Path(model_path)
    from megatron.core.tokenizers import MegatronTokenizer

    if model_path.is_dir():
        load_hf_tokenizer(model_path)  # the checks, with messages naming the folder
        return MegatronTokenizer.from_pretrained(tokenizer_path=str(model_path),
                                                 metadata_path={"library": "huggingface"})
    if not model_path.is_file():
        raise FileNotFoundError(f"tokenizer model {model_path} does not exist: pass the .model file "
                                f"written by training (e.g. <checkpoint>/tokenizer.model), or a Hugging Face "
                                f"tokenizer folder.")
    check_sentencepiece(model_path)
    return MegatronTokenizer.from_pretrained(tokenizer_path=str(model_path),
                                             metadata_path={"library": "sentencepiece"})


def check_sentencepiece(model_path: Path) -> None:
    """ValueError naming the file where it is not a sentencepiece model (sentencepiece's own error is
    an INTERNAL RuntimeError that does not say which file, raised wherever the model is first read)."""
    import sentencepiece as spm

    try:
        spm.SentencePieceProcessor(model_file=str(model_path))
    except (RuntimeError, OSError) as err:
        raise ValueError(f"{model_path} is not a sentencepiece model ({str(err).splitlines()[0]}): pass the "
                         f".model file that `megatron-stag prepare-data` wrote (a checkpoint keeps it as "
                         f"tokenizer.model), or a Hugging Face tokenizer folder.") from None


def load_hf_tokenizer(folder: Path):
    """The transformers tokenizer in `folder`: local files only, never code from the folder, and an
    end-of-text token to close documents with (ValueError naming the folder and the fix otherwise)."""
    from transformers import AutoTokenizer

    folder = Path(folder)
    try:
        tok = AutoTokenizer.from_pretrained(folder, local_files_only=True, trust_remote_code=False)
    except (OSError, ValueError) as err:
        raise ValueError(f"{folder} is not a Hugging Face tokenizer folder that loads without remote code "
                         f"({str(err).splitlines()[0]}): it needs tokenizer.json, or tokenizer.model with "
                         f"tokenizer_config.json, as the model's publisher ships them.") from None
    if tok.eos_token_id is None:
        raise ValueError(f"{folder}: the tokenizer has no eos_token, the token that closes every document: "
                         f"set eos_token in its tokenizer_config.json.")
    return tok


def save_hf_tokenizer(tok, destination: Path) -> Path:
    """Write transformers tokenizer `tok` to the new folder `destination` (its own `save_pretrained`:
    the files it needs and no model weights), staged beside it and renamed: whole or absent."""
    from megatron_stag.platform.files import staged_folder

    with staged_folder(destination) as tmp:
        tok.save_pretrained(tmp)
    return Path(destination)


PROBE = "def main(argv):\n    return 0  # Ünïcödé, 数字 12345\n"


def same_hf_tokenizer(a, b) -> bool:
    """Whether two transformers tokenizers give the same ids: vocabulary, special tokens, and the
    encoding of a probe text (where BOS, normalisation and pre-tokenisation show)."""
    return (a.get_vocab() == b.get_vocab() and a.all_special_ids == b.all_special_ids
            and a.encode(PROBE) == b.encode(PROBE))
