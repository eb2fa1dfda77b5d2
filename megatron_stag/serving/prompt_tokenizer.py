"""The tokenizer that encodes a model's prompts and decodes its completions, and the tokens that end
a completion.

megatron-stag's own models (checkpoints, exports) were trained on sentencepiece ids with no BOS and
`</s>` closing each document: their `tokenizer.model` is read through megatron's tokenizer, exactly as
in training. A Hugging Face folder from elsewhere whose config names a `bos_token_id` (Llama 2,
TinyLlama, Llama 3: trained with a BOS at every document's start) is read through its own
transformers tokenizer instead, which adds the BOS as the model expects and also reads a
`tokenizer.json` without a `tokenizer.model` (Llama 3)."""

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


def needs_own_tokenizer(folder: Path) -> bool:
    """Whether `folder` is a Hugging Face folder whose model began its training documents with a BOS
    (config.json names a bos_token_id), so that only its own tokenizer prompts it as trained."""
    return _json(Path(folder) / "config.json").get("bos_token_id") is not None


def transformers_tokenizer(folder: Path):
    """The folder's own transformers tokenizer where `needs_own_tokenizer`, else None. Local files
    only, and never code from the folder."""
    folder = Path(folder)
    if not needs_own_tokenizer(folder):
        return None
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(folder, local_files_only=True, trust_remote_code=False)
    except (OSError, ValueError) as err:
        raise FileNotFoundError(f"{folder}: its model starts documents with a BOS token (config.json bos_token_id), "
                                f"so its own transformers tokenizer encodes the prompts, and it does not load "
                                f"({err}): add tokenizer.json or tokenizer.model and tokenizer_config.json from "
                                f"where the model came from.") from None


def load_prompt_tokenizer(folder: Path, override: Optional[Path] = None):
    """`override` (a sentencepiece .model) if given; else the folder's transformers tokenizer where
    `transformers_tokenizer` takes it, else its `tokenizer.model`. Missing files raise FileNotFoundError."""
    from megatron_stag.data.tokenizer import load_tokenizer

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
