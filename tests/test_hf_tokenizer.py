"""Training on a Hugging Face tokenizer folder (Llama's, say): `prepare-data --tokenizer DIR` writes
exactly transformers' ids (BOS included) with the end of text after each document; `pretrain` with
`data.tokenizer_model=DIR` trains through megatron's HuggingFaceTokenizer and keeps the tokenizer in
`<save>/tokenizer/`; every later step (generate, export in both formats, import) prompts with it."""

import argparse
import json

import pytest

from tests.cli_helpers import cli
from tests.tokenizer_helpers import llama_sentencepiece, llama_tokenizer_folder

transformers = pytest.importorskip("transformers")

PROMPT = "def main(argv):"


@pytest.fixture(scope="module")
def hf_tokenizer(tmp_path_factory):
    """A Llama-layout tokenizer as transformers saves it (tokenizer.json, no tokenizer.model)."""
    source = llama_tokenizer_folder(tmp_path_factory.mktemp("llama"))
    folder = tmp_path_factory.mktemp("hf_tokenizer")
    transformers.AutoTokenizer.from_pretrained(source).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    from megatron_stag.data.local_corpus import stdlib_files

    root = tmp_path_factory.mktemp("text")
    for i, f in enumerate(stdlib_files(max_bytes=300_000)[:30]):
        (root / f"{i:02d}.py").write_text(f.read_text())
    return root


@pytest.fixture(scope="module")
def dataset(hf_tokenizer, corpus, tmp_path_factory):
    from megatron_stag.data.prepare import prepare_dataset

    out = tmp_path_factory.mktemp("ds")
    prefix, tok_path = prepare_dataset([str(corpus)], out / "ds", tokenizer=hf_tokenizer, workers=1)
    assert tok_path == hf_tokenizer and not (out / "ds.model").exists()
    return prefix


def test_prepare_data_writes_the_tokenizers_ids_and_bos(hf_tokenizer, corpus, dataset):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    from megatron_stag.data.prepare import find_files, iter_documents

    prefix = dataset
    tok = transformers.AutoTokenizer.from_pretrained(hf_tokenizer)
    docs = list(iter_documents(find_files([str(corpus)])))
    ds = IndexedDataset(str(prefix))
    assert len(ds) == len(docs) > 10
    for i in (0, len(docs) // 2, len(docs) - 1):
        assert ds[i].tolist() == tok(docs[i]).input_ids + [tok.eos_token_id]
        assert ds[i][0] == tok.bos_token_id == 1


def test_a_tokenizer_folder_that_would_run_code_or_cannot_end_documents_is_refused(corpus, tmp_path):
    """A folder whose tokenizer_config names code (`auto_map`) is refused without running it; one
    without an eos_token, or with no tokenizer files, is named with the fix. Nothing is written."""
    from megatron_stag.data.prepare import prepare_dataset

    ran = tmp_path / "ran"
    remote = llama_tokenizer_folder(tmp_path / "remote")
    (remote / "evil.py").write_text(f"open({str(ran)!r}, 'w').close()\n")
    config = json.loads((remote / "tokenizer_config.json").read_text())
    (remote / "tokenizer_config.json").write_text(json.dumps(
        {**config, "tokenizer_class": "Evil", "auto_map": {"AutoTokenizer": ["evil.Evil", None]}}))
    no_eos = tmp_path / "no_eos"
    transformers.AutoTokenizer.from_pretrained(llama_tokenizer_folder(tmp_path / "src"), eos_token=None).save_pretrained(no_eos)
    (tmp_path / "empty").mkdir()
    for folder, message in [(remote, "without remote code"), (no_eos, "no eos_token"),
                            (tmp_path / "empty", "needs tokenizer.json")]:
        with pytest.raises(ValueError, match=message) as err:
            prepare_dataset([str(corpus)], tmp_path / folder.name, tokenizer=folder)
        assert str(folder) in str(err.value)
        assert not list(tmp_path.glob(f"{folder.name}_text_document*"))
    assert not ran.exists()


def test_train_export_and_import_on_a_hugging_face_tokenizer(megatron_world, hf_tokenizer, dataset, tmp_path):
    """pretrain on a tokenizer folder (megatron's HuggingFaceTokenizer, chosen from the path) keeps
    it beside the checkpoints; the checkpoint, its plain and HF exports and the HF export's import
    are prompted with the BOS and end at its eos_token (`generate` runs on it); a resume with another
    tokenizer of the same vocabulary, or a sentencepiece one, is refused before anything is written."""
    from megatron_stag.config.recipe import RecipeError, load_recipe
    from megatron_stag.data.tokenizer import load_hf_tokenizer, same_hf_tokenizer
    from megatron_stag.models.model_args import ModelArgs
    from megatron_stag.serving.convert import export_checkpoint, import_checkpoint
    from megatron_stag.serving.generate_cli import prepare_prompts
    from megatron_stag.training.megatron_pretrain import check_run_files, use_tokenizer_kind

    save = tmp_path / "ckpt"
    cli("pretrain", "tiny-cpu-stag", f"data.data_path=[{dataset}]", f"data.tokenizer_model={hf_tokenizer}",
        f"checkpoint.save={save}", "training.train_iters=4", "checkpoint.save_interval=4",
        "logging.eval_interval=100", "optimizer.lr_warmup_iters=1")
    assert "HuggingFaceTokenizer" in (save / "megatron_arguments.txt").read_text()
    assert (save / "latest_checkpointed_iteration.txt").read_text().strip() == "4"
    tok = transformers.AutoTokenizer.from_pretrained(hf_tokenizer)
    assert same_hf_tokenizer(load_hf_tokenizer(save / "tokenizer"), tok)
    assert not (save / "tokenizer.model").exists()

    export_checkpoint(save, tmp_path / "pkg")
    export_checkpoint(save, tmp_path / "hf", format="hf")
    import_checkpoint(tmp_path / "hf", tmp_path / "back")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert (config["bos_token_id"], config["eos_token_id"]) == (1, 2)
    ns = argparse.Namespace(tokenizer=None, max_new_tokens=8, temperature=0.0, top_k=0, top_p=1.0, seed=0, stop=[])
    for where in ("ckpt", "pkg", "hf", "back"):
        _, ids, _, ends = prepare_prompts(ns, [PROMPT], tmp_path / where, 512, 128)
        assert ids == [tok(PROMPT).input_ids] and ids[0][0] == 1 and ends == {2}, where
    cli("generate", str(save), "--prompt", PROMPT, "--max-new-tokens", "8", "--output", str(tmp_path / "out.jsonl"))
    assert len(json.loads((tmp_path / "out.jsonl").read_text())["tokens"]) >= 1

    other = tmp_path / "no_bos"  # the same pieces, no BOS: other ids for every document
    transformers.AutoTokenizer.from_pretrained(hf_tokenizer, add_bos_token=False).save_pretrained(other)
    stored = (save / "model_args.json").read_bytes()
    wanted = ModelArgs.load(save / "model_args.json")
    with pytest.raises(SystemExit, match="another tokenizer"):
        check_run_files(save, wanted, other)
    sentencepiece = tmp_path / "llama.model"
    sentencepiece.write_bytes(llama_sentencepiece())
    with pytest.raises(SystemExit, match="another tokenizer"):
        check_run_files(save, wanted, sentencepiece)
    check_run_files(save, wanted, hf_tokenizer)  # its own: resumes
    assert (save / "model_args.json").read_bytes() == stored

    recipe = load_recipe("tiny-cpu-stag", [f"data.tokenizer_model={hf_tokenizer / 'tokenizer.json'}",
                                           "data.tokenizer_type=HuggingFaceTokenizer"])
    with pytest.raises(RecipeError, match="give the folder"):
        use_tokenizer_kind(recipe)
