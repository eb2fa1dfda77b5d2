"""prepare-data and megatron's dataset stack: token round trip, blending weights, corrupt files."""

import json
import re

import numpy as np
import pytest

from megatron_stag.data.prepare import iter_documents, prepare_dataset

pytestmark = pytest.mark.usefixtures("megatron_world")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    from megatron_stag.data.local_corpus import stdlib_files

    files = stdlib_files(max_bytes=400_000)
    (root / "a.jsonl").write_text("".join(json.dumps({"text": f.read_text()}) + "\n" for f in files[:20]))
    sub = root / "dir"
    sub.mkdir()
    for i, f in enumerate(files[20:40]):
        (sub / f"{i:02d}_{f.stem}.py").write_text(f.read_text())
    return root


def test_round_trip_tokens(corpus, tmp_path):
    """Tokens read back through megatron's IndexedDataset equal the tokenizer's output, doc by doc."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    from megatron_stag.data.prepare import find_files
    from megatron_stag.data.tokenizer import load_tokenizer

    inputs = [str(corpus / "a.jsonl"), str(corpus / "dir")]
    prefix, model = prepare_dataset(inputs, tmp_path / "ds", vocab_size=600, workers=2)
    tok = load_tokenizer(model)
    docs = list(iter_documents(find_files(inputs)))
    ds = IndexedDataset(str(prefix))
    assert len(ds) == len(docs) > 10  # empty files are skipped, every other file or line is one doc
    for i in (0, 7, len(docs) - 1):
        assert list(ds[i]) == tok.tokenize(docs[i]) + [tok.eod]
    assert tok.detokenize(tok.tokenize(docs[3])) == docs[3]  # byte-exact for source code


def test_blend_weights_and_corrupt_file(corpus, tmp_path):
    from megatron_stag.data.megatron_datasets import build_gpt_datasets
    from megatron_stag.data.tokenizer import load_tokenizer

    a, model = prepare_dataset([str(corpus / "a.jsonl")], tmp_path / "a", vocab_size=600)
    b, _ = prepare_dataset([str(corpus / "dir")], tmp_path / "b", tokenizer=model)
    tok = load_tokenizer(model)
    train, _, _ = build_gpt_datasets(([a, b], [0.8, 0.2]), None, "100,0,0", 32, tok, [2000, 0, 0], 1,
                                     tmp_path / "cache")
    share = np.bincount(train.dataset_index[:2000], minlength=2) / 2000
    assert share[0] == pytest.approx(0.8, abs=0.02)  # megatron's blend follows the weights
    item = train[0]
    assert item["tokens"].shape == (32,) and (item["labels"][:-1] == item["tokens"][1:]).all()

    data = (tmp_path / "a_text_document.bin").read_bytes()
    (tmp_path / "a_text_document.bin").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        build_gpt_datasets(([a], None), None, "100,0,0", 32, tok, [10, 0, 0], 1, tmp_path / "cache2")
    (tmp_path / "a_text_document.idx").unlink()
    with pytest.raises(FileNotFoundError, match="prepare-data"):
        build_gpt_datasets(([a], None), None, "100,0,0", 32, tok, [10, 0, 0], 1, tmp_path / "cache3")


def test_bad_jsonl_names_the_key(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"content": "x"}\n')
    with pytest.raises(ValueError, match="--json-key"):
        list(iter_documents([bad]))


def test_outputs_are_refused_replaced_whole_and_never_another_prefixs(corpus, tmp_path):
    """Issue 15: `--output-prefix data/corpus.v2` once overwrote `data/corpus.model` (with_suffix); a
    re-run replaced the tokenizer first and left stray temporaries. Now: prefix + '.model', existing
    outputs refused unless overwrite, replaced as a set, nothing partial left."""
    from megatron_stag.data.tokenizer import load_tokenizer

    inputs = [str(corpus / "a.jsonl")]
    _, first = prepare_dataset(inputs, tmp_path / "corpus", vocab_size=600)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    _, v2 = prepare_dataset([str(corpus / "dir")], tmp_path / "corpus.v2", vocab_size=500)
    assert v2 == tmp_path / "corpus.v2.model" and first == tmp_path / "corpus.model"
    assert all((tmp_path / n).read_bytes() == b for n, b in before.items())  # the other dataset untouched
    with pytest.raises(FileExistsError, match="--overwrite"):
        prepare_dataset([str(corpus / "dir")], tmp_path / "corpus", vocab_size=500)
    assert all((tmp_path / n).read_bytes() == b for n, b in before.items())
    prepare_dataset([str(corpus / "dir")], tmp_path / "corpus", vocab_size=500, overwrite=True)
    assert load_tokenizer(tmp_path / "corpus.model").vocab_size == 500
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        f"{p}{s}" for p in ("corpus", "corpus.v2") for s in (".model", "_text_document.bin", "_text_document.idx"))


def test_bad_corpora_are_refused_by_name(tmp_path):
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("caf\xe9 au lait\n".encode("latin-1"))
    with pytest.raises(ValueError, match="latin1.txt is not UTF-8"):
        list(iter_documents([latin1]))
    bad_jsonl = tmp_path / "bad.jsonl"
    bad_jsonl.write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(ValueError, match="bad.jsonl is not UTF-8"):
        list(iter_documents([bad_jsonl]))
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    with pytest.raises(ValueError, match="hold no text"):
        prepare_dataset([str(empty)], tmp_path / "e")
    small = tmp_path / "small.txt"
    small.write_text("a tiny corpus with very few distinct pieces\n" * 3)
    with pytest.raises(ValueError, match="--vocab-size 5000"):
        prepare_dataset([str(small)], tmp_path / "s", vocab_size=5000)
    with pytest.raises(ValueError, match="--vocab-size 5000"):  # the folders made for it go too
        prepare_dataset([str(small)], tmp_path / "new" / "deeper" / "s", vocab_size=5000)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.jsonl", "empty.txt", "latin1.txt", "small.txt"]


def test_a_file_that_is_not_a_sentencepiece_model_is_named(tmp_path):
    """sentencepiece's own error (a RuntimeError, "INTERNAL: could not parse ModelProto") came as a
    traceback from prepare-data and generate, and from a rank of pretrain; now each names the file
    (pretrain's launcher before any process starts)."""
    from megatron_stag.config.recipe import RecipeError, load_recipe
    from megatron_stag.data.tokenizer import load_tokenizer
    from megatron_stag.training.megatron_pretrain import use_tokenizer_kind

    text = tmp_path / "notes.txt"
    text.write_text("not a tokenizer\n")
    for call in (lambda: load_tokenizer(text), lambda: prepare_dataset([str(text)], tmp_path / "d", tokenizer=text)):
        with pytest.raises(ValueError, match=f"^{text} is not a sentencepiece model .*prepare-data"):
            call()
    with pytest.raises(RecipeError, match=f"^data.tokenizer_model: {text} is not a sentencepiece model"):
        use_tokenizer_kind(load_recipe("tiny-cpu-stag", [f"data.tokenizer_model={text}"]))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


def test_tokenizer_is_the_same_in_every_process(tmp_path):
    """Above 200k lines the tokenizer trains on a sample; sentencepiece's own sampler is seeded by the
    OS, so before the sample was drawn here two processes (two machines, two calls of a study) built
    different vocabularies from the same files. Two fresh processes must write identical bytes."""
    import hashlib
    import subprocess
    import sys

    script = (
        "import sys\nfrom pathlib import Path\n"
        "from megatron_stag.data.local_corpus import stdlib_files\n"
        "from megatron_stag.data.tokenizer import train_sentencepiece\n"
        "texts = (f.read_text(errors='replace') for f in stdlib_files(max_bytes=12_000_000))\n"
        "train_sentencepiece(texts, Path(sys.argv[1]), 2000)\n")
    from megatron_stag.data.local_corpus import stdlib_files

    lines = sum(1 for f in stdlib_files(max_bytes=12_000_000)
                for line in f.read_text(errors="replace").splitlines() if line.strip())
    assert lines > 200_000  # else no sample is drawn and this proves nothing
    digests = []
    for k in range(2):
        path = tmp_path / f"{k}.model"
        subprocess.run([sys.executable, "-c", script, str(path)], check=True)
        digests.append(hashlib.sha256(path.read_bytes()).hexdigest())
    assert digests[0] == digests[1]


@pytest.mark.parametrize("option", ["--vocab-size", "--workers"])
def test_prepare_data_sizes_are_whole_numbers_of_at_least_one(option, tmp_path, capsys):
    from megatron_stag.cli import main

    with pytest.raises(SystemExit) as stop:
        main(["prepare-data", "--input", str(tmp_path), "--output-prefix", str(tmp_path / "d"), option, "0"])
    assert stop.value.code == 2 and f"argument {option}: 0 is below 1" in capsys.readouterr().err


def test_a_split_without_documents_stops_the_rank_in_one_line(tmp_path, monkeypatch):
    """megatron's GPTDataset spins forever on a split that owns no document but must give samples; the
    dataset provider of `pretrain`'s ranks stops with the message instead (rank 0 prints it, every rank
    exits), not with a traceback from each rank."""
    import argparse

    import megatron.training

    from megatron_stag.data.megatron_datasets import build_gpt_datasets
    from megatron_stag.data.token_dataset import DataError, write_indexed_dataset
    from megatron_stag.training.megatron_pretrain import datasets_provider

    prefix, tok = tmp_path / "few_text_document", argparse.Namespace(vocab_size=16)
    write_indexed_dataset([[5, 6, 7, 2]] * 4, prefix, vocab_size=16)
    message = f"{prefix}: 4 documents give the valid split (fraction 0.020) no document, but 64 valid samples"
    with pytest.raises(DataError, match=re.escape(message)):
        build_gpt_datasets(([str(prefix)], None), None, "98,2,0", 8, tok, [10, 64, 0], 1, tmp_path / "cache")
    args = argparse.Namespace(data_path=[str(prefix)], split="98,2,0", seq_length=8, seed=1, data_cache_path=None,
                              train_data_path=None, valid_data_path=None, test_data_path=None, data_args_path=None,
                              per_split_data_args_path=None, reset_position_ids=False, reset_attention_mask=False,
                              eod_mask_loss=False, mid_level_dataset_surplus=0.005)
    for name, value in (("get_args", lambda: args), ("get_tokenizer", lambda: tok), ("print_rank_0", print)):
        monkeypatch.setattr(megatron.training, name, value)
    for rank, code in (("0", message), ("1", 1)):
        monkeypatch.setenv("RANK", rank)
        with pytest.raises(SystemExit) as stop:
            datasets_provider([10, 64, 0])
        assert str(stop.value.code).startswith(str(code)) and stop.value.__cause__ is None
