"""`megatron-stag prepare-data`: text files, JSONL and directories -> megatron indexed datasets.

Documents: a plain-text file is one document; a `.jsonl` file gives one document per line (the
`--json-key` field). Directories are walked (sorted) for the given extensions. A sentencepiece BPE model
is trained on the documents unless `--tokenizer` names one, or names a Hugging Face tokenizer folder
(whose config decides the BOS each document starts with). Tokenization runs in a process pool with a
progress bar; every document ends with the tokenizer's end-of-document id. The dataset is written through
megatron's `IndexedDatasetBuilder`. Outputs (`<prefix>.model`, `<prefix>_text_document.bin/.idx`) are
written beside their final names and moved into place together at the end, the index last, so a dataset
is complete or absent and never sits beside another run's tokenizer; existing outputs are refused
unless `overwrite`. Train / valid /
test splits and weighted blends of several prepared datasets are megatron's own
(`GPTDatasetConfig(split=..., blend=...)`, see `megatron_datasets.py`).
"""

from __future__ import annotations

import contextlib
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
                for n, line in enumerate(_utf8_lines(f, path), 1):
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
            try:
                text = path.read_text(encoding="utf-8")
            except UnicodeDecodeError as err:
                raise ValueError(f"{path} is not UTF-8 text (byte {err.start}): convert it (e.g. iconv -t "
                                 f"UTF-8) or leave it out.") from None
            if text.strip():
                yield text


def _utf8_lines(f, path: Path) -> Iterator[str]:
    try:
        yield from f
    except UnicodeDecodeError as err:
        raise ValueError(f"{path} is not UTF-8 text (byte {err.start}): convert it (e.g. iconv -t UTF-8) "
                         f"or leave it out.") from None


_TOKENIZER = None


def _init_worker(model_path: str) -> None:
    from megatron_stag.platform import quiet

    global _TOKENIZER
    quiet.install()  # a spawned worker starts afresh: the parent's log filters are not inherited
    _TOKENIZER = load_tokenizer(Path(model_path))


def _encode(text: str) -> list[int]:
    return _TOKENIZER.tokenize(text) + [_TOKENIZER.eod]


def outputs(output_prefix: Path, trains_tokenizer: bool) -> list[Path]:
    """The files prepare-data writes for `output_prefix`, the index last."""
    prefix = Path(output_prefix)
    files = [Path(f"{prefix}.model")] if trains_tokenizer else []
    return files + [Path(f"{prefix}_text_document.bin"), Path(f"{prefix}_text_document.idx")]


def _train_tokenizer(files, json_key: str, path: Path, vocab_size: int) -> None:
    try:
        train_sentencepiece(iter_documents(files, json_key), path, vocab_size)
    except RuntimeError as err:  # sentencepiece: "Vocabulary size too high (N). Please set it to a value <= M."
        raise ValueError(f"--vocab-size {vocab_size}: the corpus cannot support it ({err}).") from None


def prepare_dataset(inputs: Sequence[str], output_prefix: Path, vocab_size: int = 16000,
                    tokenizer: Path | None = None, workers: int = 2, json_key: str = "text",
                    extensions: Sequence[str] = DEFAULT_EXTENSIONS, overwrite: bool = False) -> tuple[Path, Path]:
    """Returns (dataset prefix, tokenizer model). Writes `<prefix>_text_document.{bin,idx}` and, when
    it trains one, `<prefix>.model`."""
    output_prefix = Path(output_prefix)
    final = outputs(output_prefix, tokenizer is None)
    existing = [str(p) for p in final if p.exists()]
    if existing and not overwrite:
        raise FileExistsError(f"{', '.join(existing)} exist: choose another --output-prefix, or pass "
                              f"--overwrite to replace them (nothing was written).")
    if tokenizer is not None and not Path(tokenizer).exists():
        raise FileNotFoundError(f"--tokenizer {tokenizer} does not exist.")
    # a folder that is not a usable tokenizer is named before any reading
    given = load_tokenizer(Path(tokenizer)) if tokenizer is not None else None
    files = find_files(inputs, extensions)
    if not any(True for _ in iter_documents(files, json_key)):
        raise ValueError(f"the inputs ({len(files)} files) hold no text: nothing to tokenize.")
    made = [d for d in (output_prefix.parent, *output_prefix.parent.parents) if not d.exists()]
    output_prefix.parent.mkdir(parents=True, exist_ok=True)
    stage = output_prefix.with_name(f".{output_prefix.name}.partial")
    staged = outputs(stage, tokenizer is None)
    done = False
    try:
        if tokenizer is None:
            _train_tokenizer(files, json_key, staged[0], vocab_size)
        tok_path = staged[0] if tokenizer is None else Path(tokenizer)
        tok = given if given is not None else load_tokenizer(tok_path)
        docs = list(iter_documents(files, json_key))
        print(f"prepare-data: {len(files)} files, {len(docs)} documents, vocabulary {tok.vocab_size}",
              file=sys.stderr)
        ctx = mp.get_context("spawn")
        with ctx.Pool(max(1, workers), initializer=_init_worker, initargs=(str(tok_path),)) as pool:
            encoded = pool.imap(_encode, docs, chunksize=8)
            write_indexed_dataset(encoded, Path(f"{stage}_text_document"), tok.vocab_size, total=len(docs))
        for p in final:  # the old outputs go first: a dataset is whole or absent
            p.unlink(missing_ok=True)
        for src, dst in zip(staged, final):
            src.replace(dst)
        done = True
    finally:
        for p in staged:
            p.unlink(missing_ok=True)
        for d in made if not done else ():  # deepest first: folders made for outputs that never came
            with contextlib.suppress(OSError):
                d.rmdir()
    return Path(f"{output_prefix}_text_document"), final[0] if tokenizer is None else Path(tokenizer)


def copy_tokenizer(model: Path, destination: Path) -> Path:
    destination.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(model, destination)
    return destination
