"""The tokenizer that encodes a model's prompts and decodes its completions, and the tokens that end
a completion.

A model trained on `prepare-data`'s sentencepiece ids (no BOS, `</s>` closing each document) has a
`tokenizer.model`, read through megatron's tokenizer exactly as in training. Every other model is
prompted through its own transformers tokenizer, which adds the BOS where the model was trained with
one and reads a `tokenizer.json` without a `tokenizer.model` (Llama 3): a megatron run trained on a
Hugging Face tokenizer, or imported from a Hugging Face folder, keeps it in `tokenizer/` (and its
plain export too); a Hugging Face folder holds it beside its config.json, and is read so where the
config names a `bos_token_id` (Llama 2, TinyLlama, Llama 3, and our exports of models with a BOS) or
where it has no `tokenizer.model`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional


class TransformersPrompts:
    """megatron's tokenizer interface (`tokenize`, `detokenize`, `vocab_size`, `eod`) over a
    transformers tokenizer: prompts get its special tokens (the BOS), completions drop them."""

    def __init__(self, hf):
        self.hf = hf
        self.vocab_size = len(hf)
        self.eod = hf.eos_token_id

    def tokenize(self, text: str) -> list[int]:
        return self.hf.encode(text)

    def detokenize(self, ids: list[int]) -> str:
        return self.hf.decode(ids, skip_special_tokens=True)


def _json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def transformers_tokenizer_folder(folder: Path) -> Optional[Path]:
    """Where the model in `folder` keeps the transformers tokenizer that prompts it, or None where its
    `tokenizer.model` is a `prepare-data` sentencepiece model (see the module's docstring)."""
    folder = Path(folder)
    if (folder / "tokenizer").is_dir():
        return folder / "tokenizer"
    config = folder / "config.json"
    if not config.is_file():
        return None
    if _json(config).get("bos_token_id") is not None:
        return folder
    has_files = (folder / "tokenizer.json").is_file() or (folder / "tokenizer_config.json").is_file()
    return folder if has_files and not (folder / "tokenizer.model").is_file() else None


def transformers_tokenizer(folder: Path):
    """The model's own transformers tokenizer where `transformers_tokenizer_folder` finds one, else
    None. Local files only, and never code from the folder."""
    from megatron_stag.data.tokenizer import load_hf_tokenizer

    where = transformers_tokenizer_folder(folder)
    try:
        return None if where is None else load_hf_tokenizer(where)
    except ValueError as err:
        raise FileNotFoundError(f"{err} The model in {folder} is prompted through that tokenizer.") from None


def load_prompt_tokenizer(folder: Path, override: Optional[Path] = None):
    """`override` (a sentencepiece .model or a Hugging Face tokenizer folder) if given; else the
    model's transformers tokenizer where `transformers_tokenizer` finds one, else its `tokenizer.model`.
    Missing files raise FileNotFoundError."""
    from megatron_stag.data.tokenizer import load_hf_tokenizer, load_tokenizer

    if override is not None and Path(override).is_dir():
        return TransformersPrompts(load_hf_tokenizer(Path(override)))
    if override is not None:
        return load_tokenizer(Path(override))
    hf = transformers_tokenizer(folder)
    return TransformersPrompts(hf) if hf is not None else load_tokenizer(Path(folder) / "tokenizer.model")


def end_ids(folder: Path, tok) -> set[int]:
    """The tokens that end a completion: the tokenizer's end of document, and the `eos_token_id`(s)
    of the folder's generation_config.json (instruction-tuned models list several)."""
    ends = set() if tok.eod is None else {int(tok.eod)}
    listed = _json(Path(folder) / "generation_config.json").get("eos_token_id")
    for i in listed if isinstance(listed, list) else [listed]:
        if isinstance(i, int) and not isinstance(i, bool):
            ends.add(i)
    return ends
