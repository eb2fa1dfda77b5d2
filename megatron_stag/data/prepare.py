"""`megatron-stag prepare-data`: text files, JSONL and directories -> megatron indexed datasets.

Documents: a plain-text file is one document; a `.jsonl` file gives one document per line (the
`--json-key` field). Directories are walked (sorted) for the given extensions. A sentencepiece BPE model
is trained on the documents unless `--tokenizer` names one. Tokenization runs in a process pool with a
progress bar; every document ends with the tokenizer's end-of-document id. The dataset is written through
megatron's `IndexedDatasetBuilder` to a temporary prefix and renamed (complete or absent). Train / valid /
test splits and weighted blends of several prepared datasets are megatron's own
(`GPTDatasetConfig(split=..., blend=...)`, see `megatron_datasets.py`).
"""

from __future__ import annotations

import json
import multiprocessing as mp
import shutil
import sys
from pathlib import Path
from typing import Iterator, Sequence

from megatron_stag.data.token_dataset import write_indexed_dataset
from megatron_stag.data.tokenizer import load_tokenizer, train_sentencepiece

DEFAULT_EXTENSIONS = (".txt", ".md", ".rst", ".py", ".jsonl")


def find_files(inputs: Sequence[str], extensions: Sequence[str] = DEFAULT_EXTENSIONS) -> list[Path]:
    files = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            files.extend(sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in extensions))
        elif path.is_file():
            files.append(path)
        else:
            raise FileNotFoundError(f"input {path} does not exist.")
    if not files:
        raise FileNotFoundError(f"no input files with extensions {', '.join(extensions)} under {inputs}.")
    return files


def iter_documents(files: Sequence[Path], json_key: str = "text") -> Iterator[str]:
    for path in files:
        if path.suffix == ".jsonl":
            with path.open(encoding="utf-8") as f:
                for n, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    try:
                        text = json.loads(line)[json_key]
                    except (json.JSONDecodeError, KeyError) as err:
                        raise ValueError(f"{path}:{n}: not a JSON object with a {json_key!r} field "
                                         f"({err}); set --json-key.") from None
                    if text.strip():
                        yield text
        else:
            text = path.read_text(encoding="utf-8", errors="replace")
            if text.strip():
                yield text


_TOKENIZER = None


def _init_worker(model_path: str) -> None:
    global _TOKENIZER
    _TOKENIZER = load_tokenizer(Path(model_path))


def _encode(text: str) -> list[int]:
    return _TOKENIZER.tokenize(text) + [_TOKENIZER.eod]


def prepare_dataset(inputs: Sequence[str], output_prefix: Path, vocab_size: int = 16000,
                    tokenizer: Path | None = None, workers: int = 2, json_key: str = "text",
                    extensions: Sequence[str] = DEFAULT_EXTENSIONS) -> tuple[Path, Path]:
    """Returns (dataset prefix, tokenizer model). Writes `<prefix>_text_document.{bin,idx}` and, when
    it trains one, `<prefix>.model`."""
    files = find_files(inputs, extensions)
    output_prefix = Path(output_prefix)
    output_prefix.parent.mkdir(parents=True, exist_ok=True)
    if tokenizer is None:
        tokenizer = train_sentencepiece(iter_documents(files, json_key),
                                        output_prefix.with_suffix(".model"), vocab_size)
    tok = load_tokenizer(tokenizer)
    docs = list(iter_documents(files, json_key))
    print(f"prepare-data: {len(files)} files, {len(docs)} documents, vocabulary {tok.vocab_size}",
          file=sys.stderr)
    ctx = mp.get_context("spawn")
    with ctx.Pool(max(1, workers), initializer=_init_worker, initargs=(str(tokenizer),)) as pool:
        encoded = pool.imap(_encode, docs, chunksize=8)
        prefix = write_indexed_dataset(encoded, Path(f"{output_prefix}_text_document"),
                                       tok.vocab_size, total=len(docs))
    return prefix, Path(tokenizer)


def copy_tokenizer(model: Path, destination: Path) -> Path:
    destination.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(model, destination)
    return destination
