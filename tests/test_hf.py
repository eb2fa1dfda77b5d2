"""Hugging Face format (`export --format hf`): transformers loads the exported folder through
trust_remote_code, or as its own Llama for a baseline in that shape (also where megatron_stag cannot
be imported), its logits equal megatron's, its generate() equals our engine's tokens, padding is
handled, AutoTokenizer equals our tokenizer."""

import argparse
import json
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

from tests.cli_helpers import cli
from tests.model_factory import MAX_LEN, batch, tiny_model

transformers = pytest.importorskip("transformers")

TOL = 1e-5  # fp32; observed <= 1e-7 (the same serving model behind transformers' interfaces)

VARIANTS = {
    "stag": {},
    "shared": dict(stag_shared_weights=True),
    "window4-rope": dict(stag_cross_window=4, position_embedding_type="rope"),
    "null-first": dict(stag_null_entry="first"),
    "p3-combine": dict(stag_sections=3, num_layers=6, stag_output="combine"),
    "gqa-swiglu-rmsnorm-nobias": dict(num_query_groups=2, gated_linear_unit=True, activation_func=F.silu,
                                      bias_activation_fusion=False, normalization="RMSNorm",
                                      add_bias_linear=False),
    "head-dim-16-gqa": dict(kv_channels=16, num_query_groups=2, position_embedding_type="rope"),  # hidden/heads is 8
    "altup-gemma3n": dict(altup_blocks=2, altup_output="projected", altup_embedding="projected",
                          altup_form="gemma3n", altup_schedule="fixed", altup_coef_clip=0.5,
                          position_embedding_type="rope"),
}


LLAMA = dict(stag_sections=1, num_query_groups=2, gated_linear_unit=True, activation_func=F.silu,
             bias_activation_fusion=False, normalization="RMSNorm", add_bias_linear=False,
             position_embedding_type="rope")  # a baseline GPT of the production recipes' shape

REFUSE_MEGATRON_STAG = """
import importlib.abc, sys
class Refuse(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "megatron_stag":
            raise ImportError("megatron_stag is not importable here")
sys.meta_path.insert(0, Refuse())
"""


def hf_folder(model, path, shard_bytes=5 << 30, load=True):
    from megatron_stag.serving.convert import to_plain_model, write_hf_folder

    path.mkdir()
    write_hf_folder(to_plain_model(model, None), None, path, torch.float32, shard_bytes)
    if load:
        return transformers.AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True).eval()


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_hf_logits_and_generate_equal_ours(megatron_world, tmp_path, name):
    from megatron_stag.serving.convert import to_plain_model
    from megatron_stag.serving.engine import StaggeredGenerator
    from megatron_stag.serving.sampling import SamplingParams

    model = tiny_model(**VARIANTS[name])
    hf = hf_folder(model, tmp_path / "hf", shard_bytes=20_000)  # several shards and an index
    assert (tmp_path / "hf" / "model.safetensors.index.json").is_file()
    ids, pos = batch()
    with torch.no_grad():
        assert (model(ids, pos) - hf(ids).logits).abs().max() <= TOL
    prompt = [5, 9, 2, 33, 7]  # 5 + 20 columns: the HF cache grows from 16 slots to 32 on the way
    ours = StaggeredGenerator(to_plain_model(model, None), MAX_LEN, 1).generate([prompt], SamplingParams(20))
    theirs = hf.generate(torch.tensor([prompt]), max_new_tokens=20, do_sample=False, return_dict_in_generate=True)
    assert theirs.sequences[0, len(prompt):].tolist() == ours.tokens[0]
    assert theirs.past_key_values.caches[0].kv[0].shape[3] == 32


@pytest.mark.parametrize("null_entry", ["all", "first"])
def test_hf_padding_and_cache(megatron_world, tmp_path, null_entry):
    """A left-padded batch gives each row its unpadded logits (cached decoding too); right padding
    leaves the tokens before it unchanged. With the null entry for the first position only, that is
    each row's first token, wherever padding puts it."""
    model = tiny_model(stag_cross_window=2 if null_entry == "all" else None, position_embedding_type="rope",
                       num_query_groups=2, stag_null_entry=null_entry)
    hf = hf_folder(model, tmp_path / "hf")
    short, long = [4, 8, 15], [16, 23, 42, 7, 9]
    ids = torch.tensor([[0, 0] + short, long])
    mask = torch.tensor([[0, 0, 1, 1, 1], [1] * 5])
    with torch.no_grad():
        out = hf(ids, attention_mask=mask)
        alone = hf(torch.tensor([short])).logits[0]
        torch.testing.assert_close(out.logits[0, 2:], alone, atol=TOL, rtol=0)
        torch.testing.assert_close(out.logits[1], hf(torch.tensor([long])).logits[0], atol=TOL, rtol=0)
        step = hf(torch.tensor([[11], [12]]), attention_mask=torch.cat([mask, torch.ones(2, 1, dtype=torch.long)], 1),
                  past_key_values=out.past_key_values)
        torch.testing.assert_close(step.logits[0, 0], hf(torch.tensor([short + [11]])).logits[0, -1], atol=TOL, rtol=0)
        right = hf(torch.tensor([short + [0, 0]]), attention_mask=torch.tensor([[1, 1, 1, 0, 0]])).logits[0, :3]
        torch.testing.assert_close(right, alone, atol=TOL, rtol=0)
    padded = hf.generate(ids, attention_mask=mask, max_new_tokens=5, do_sample=False)
    assert padded[0, 5:].tolist() == hf.generate(torch.tensor([short]), max_new_tokens=5, do_sample=False)[0, 3:].tolist()


def test_a_baseline_exports_as_transformers_llama(megatron_world, tmp_path):
    """A one-section model in Llama's shape is written as transformers' own LlamaForCausalLM: no code
    in the folder, no trust_remote_code; its logits equal megatron's and its greedy tokens our
    engine's, in a Python that cannot import megatron_stag. `generate` reads the folder back."""
    from megatron_stag.serving.convert import to_plain_model
    from megatron_stag.serving.engine import StaggeredGenerator
    from megatron_stag.serving.model import load_plain_model
    from megatron_stag.serving.sampling import SamplingParams

    model = tiny_model(**LLAMA)
    folder = tmp_path / "hf"
    hf_folder(model, folder, shard_bytes=20_000, load=False)
    assert not list(folder.glob("*.py"))
    assert json.loads((folder / "config.json").read_text())["model_type"] == "llama"
    ids, pos = batch()
    prompt = [5, 9, 2, 33, 7]
    ours = StaggeredGenerator(to_plain_model(model, None), MAX_LEN, 1).generate([prompt], SamplingParams(8))
    script = REFUSE_MEGATRON_STAG + textwrap.dedent(f"""
        import json, torch
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained({str(folder)!r}).eval()
        with torch.no_grad():
            logits = model(torch.tensor({ids.tolist()})).logits
        out = model.generate(torch.tensor([{prompt}]), max_new_tokens=8, do_sample=False)[0, {len(prompt)}:]
        print(json.dumps(dict(cls=type(model).__name__, logits=logits.tolist(), tokens=out.tolist())))
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    theirs = json.loads(proc.stdout.strip().splitlines()[-1])
    assert theirs["cls"] == "LlamaForCausalLM"
    with torch.no_grad():
        assert (model(ids, pos) - torch.tensor(theirs["logits"])).abs().max() <= TOL
        assert (model(ids, pos) - load_plain_model(folder)(ids)).abs().max() <= TOL
    assert theirs["tokens"] == ours.tokens[0]


def test_meta_device_allocates_on_meta_under_the_cpu_adapter():
    """transformers builds a model under `torch.device("meta")` and then fills it; where the CPU
    adapter had wrapped torch's factories before torch cached which functions that context redirects,
    Llama's rotary buffers were allocated on the CPU and came out of loading uninitialised."""
    script = textwrap.dedent("""
        import torch
        from megatron_stag.platform import cpu
        assert cpu.activate()
        with torch.device("meta"):
            made = [torch.arange(0, 8, 2, dtype=torch.float), torch.empty(3), torch.zeros(2), torch.nn.Buffer(torch.ones(2))]
        print(sorted({t.device.type for t in made}))
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == "['meta']"


def test_the_tokenizer_is_fast_where_exact(tmp_path):
    """A tokenizer `prepare-data` trains becomes transformers' tokenizers-backed one (tokenizer.json: no
    code, no trust_remote_code) with sentencepiece's ids and text exactly; a sentencepiece model with
    settings tokenizers cannot reproduce (NFKC, collapsed whitespace) keeps the wrapper around
    sentencepiece itself."""
    import io
    import random
    from pathlib import Path

    import sentencepiece as spm

    import megatron_stag
    from megatron_stag.data.tokenizer import train_sentencepiece
    from megatron_stag.serving.convert import write_hf_tokenizer
    from megatron_stag.serving.hf_tokenizer import StagTokenizer, hf_tokenizer

    # the literal text of a special token (`</s>`, `<unk>`) is that token in transformers, as in any tokenizer
    sources = [p.read_text().replace("</s>", "").replace("<unk>", "")
               for p in sorted(Path(megatron_stag.__file__).parent.rglob("*.py"))]
    rng = random.Random(0)
    texts = sources + ["", " ", "  x", " leading space", "trailing  ", "a\tb\n\n c", "héllo ß 日本語 🙂",
                       "12345 3.14 a1b2", "\x00\x01", "▁", "▁▁x", " ▁ "] + [
        "".join(chr(rng.choice([rng.randrange(32, 127), rng.randrange(0x80, 0x3000), rng.randrange(0x1F300, 0x1F6FF),
                                10, 32, 9, 0x2581])) for _ in range(rng.randrange(1, 60))) for _ in range(300)]
    ours = train_sentencepiece(sources, tmp_path / "ours.model", 1000)
    buffer = io.BytesIO()  # sentencepiece's defaults: NFKC, extra whitespace removed, no byte fallback
    spm.SentencePieceTrainer.train(sentence_iterator=iter([line for s in sources for line in s.splitlines() if line.strip()]),
                                   model_writer=buffer, vocab_size=1000, minloglevel=2)
    (tmp_path / "nfkc.model").write_bytes(buffer.getvalue())
    for path, fast in ((ours, True), (tmp_path / "nfkc.model", False)):
        sp = spm.SentencePieceProcessor(model_file=str(path))
        assert isinstance(hf_tokenizer(path), StagTokenizer) != fast
        folder = tmp_path / path.stem
        folder.mkdir()
        write_hf_tokenizer(path, folder, 1 << 20)  # what an exported folder holds
        assert (folder / "hf_tokenizer.py").is_file() != fast
        tok = transformers.AutoTokenizer.from_pretrained(folder, trust_remote_code=not fast)
        assert type(tok).__name__ == ("TokenizersBackend" if fast else "StagTokenizer")
        for text in texts:
            ids = sp.encode(text)
            assert tok(text)["input_ids"] == ids, (path.stem, text[:80])
            assert tok.decode(ids) == sp.decode(ids), (path.stem, text[:80])
        assert tok.padding_side == "left" and tok.pad_token == tok.eos_token == sp.id_to_piece(sp.eos_id())


def test_hf_export_cli_loads_without_megatron_stag(quickstart_run, tmp_path):
    """`export --format hf` on the quickstart checkpoint: a Python that cannot import megatron_stag
    loads model and tokenizer (trust_remote_code) and gets our tokenizer's ids and our greedy tokens;
    `generate` reads the folder too. Bad folders fail naming the file."""
    out, _ = quickstart_run
    folder = tmp_path / "hf"
    cli("export", str(out / "checkpoints"), str(folder), "--format", "hf")
    files = {p.name for p in folder.iterdir()}
    assert {"config.json", "generation_config.json", "hf_model.py", "model.py", "tokenizer.model", "tokenizer.json",
            "tokenizer_config.json", "model.safetensors"} <= files and "hf_tokenizer.py" not in files
    text = "def f(x):\n    return x  + 1"
    ours = cli("generate", str(out / "checkpoints"), "--prompt", text, "--max-new-tokens", "8",
               "--output", str(tmp_path / "ours.jsonl"))
    assert ours.returncode == 0
    record = json.loads((tmp_path / "ours.jsonl").read_text())
    script = REFUSE_MEGATRON_STAG + textwrap.dedent(f"""
        import json, torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
        tok = AutoTokenizer.from_pretrained({str(folder)!r}, trust_remote_code=True)
        model = AutoModelForCausalLM.from_pretrained({str(folder)!r}, trust_remote_code=True).eval()
        ids = tok({text!r})["input_ids"]
        out = model.generate(torch.tensor([ids]), max_new_tokens=8, do_sample=False)[0, len(ids):].tolist()
        print(json.dumps(dict(ids=ids, tokens=out, text=tok.decode(ids))))
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    theirs = json.loads(proc.stdout.strip().splitlines()[-1])
    from megatron_stag.data.tokenizer import load_tokenizer

    assert theirs["ids"] == load_tokenizer(out / "checkpoints" / "tokenizer.model").tokenize(text)
    assert theirs["text"] == text
    assert theirs["tokens"] == record["tokens"]
    again = cli("generate", str(folder), "--prompt", text, "--max-new-tokens", "8", "--output", str(tmp_path / "hf.jsonl"))
    assert again.returncode == 0 and json.loads((tmp_path / "hf.jsonl").read_text())["tokens"] == record["tokens"]
    from megatron_stag.data.tokenizer import train_sentencepiece
    from pathlib import Path

    import megatron_stag

    sources = [p.read_text() for p in Path(megatron_stag.__file__).parent.rglob("*.py")]
    big = train_sentencepiece(sources * 3, tmp_path / "big.model", 3000)
    refused = cli("export", str(out / "checkpoints"), str(tmp_path / "hf2"), "--format", "hf", "--tokenizer", str(big),
                  check=False)
    assert refused.returncode != 0 and "big.model has 3000 pieces" in refused.stderr
    assert not (tmp_path / "hf2").exists()


def test_export_refuses_a_tokenizer_it_cannot_ship_before_reading_weights(quickstart_run, tmp_path, monkeypatch):
    """A --tokenizer that is no sentencepiece model was copied into the package as tokenizer.model (a
    package `generate` then failed on); one with more pieces than the model's vocabulary was refused for
    --format hf only, after the weights were read. Both are refused for every format, before."""
    from megatron_stag.serving import convert

    ckpt = quickstart_run[0] / "checkpoints"
    notes = tmp_path / "notes.txt"
    notes.write_text("not a tokenizer\n")

    def no_weights(*args, **kwargs):
        raise AssertionError("weights were read")

    monkeypatch.setattr(convert, "load_serving_model", no_weights)
    for fmt in ("plain", "hf"):
        with pytest.raises(convert.ExportError, match=f"--tokenizer: {notes} is not a sentencepiece model"):
            convert.export_checkpoint(ckpt, tmp_path / fmt, format=fmt, tokenizer=notes)
    monkeypatch.setattr(convert, "_tokenizer_vocab", lambda tokenizer: 10**6)
    with pytest.raises(convert.ExportError, match="has 1000000 pieces, more than the model's vocab_size"):
        convert.export_checkpoint(ckpt, tmp_path / "plain", format="plain")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


def test_hf_bad_folders_name_the_file(megatron_world, tmp_path):
    from megatron_stag.serving.model import load_plain_model

    hf_folder(tiny_model(), tmp_path / "hf")
    (tmp_path / "hf" / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model.safetensors is missing"):
        load_plain_model(tmp_path / "hf")
    other = tmp_path / "other"
    other.mkdir()
    (other / "config.json").write_text(json.dumps(dict(model_type="mistral", hidden_size=8)))
    with pytest.raises(ValueError, match=r"mistral.*not a megatron-stag"):
        load_plain_model(other)
    (other / "config.json").write_text(json.dumps(dict(model_type="llama", hidden_size=8)))
    with pytest.raises(ValueError, match=r"config.json: num_attention_heads is missing"):
        load_plain_model(other)
    (other / "config.json").write_text(json.dumps(dict(model_type="llama", attention_bias=True)))
    with pytest.raises(ValueError, match=r"attention_bias=True is not implemented"):
        load_plain_model(other)


def test_importing_hf_model_registers_the_auto_classes(megatron_world, tmp_path):
    import megatron_stag.serving.hf_model as hf_model

    hf_folder(tiny_model(), tmp_path / "hf")
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf")  # no trust_remote_code
    assert type(model) is hf_model.StagForCausalLM


def test_eval_runs_local_tasks_through_the_harness(quickstart_run, tmp_path):
    """`megatron-stag eval` on the quickstart checkpoint: a local loglikelihood task and a
    generate_until task run through lm-evaluation-harness's hf backend, offline; the harness's
    perplexity is the one our serving model gives the same continuations."""
    pytest.importorskip("lm_eval")
    out, _ = quickstart_run
    docs = [dict(context="def f(x):\n    return", continuation=" x + 1"), dict(context="import", continuation=" os"),
            dict(context="for i in", continuation=" range(10):")]
    data = tmp_path / "docs.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in docs))
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    common = (f"dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\ntest_split: test\n"
              "doc_to_text: '{{context}}'\ndoc_to_target: '{{continuation}}'\n")
    (tasks / "ll.yaml").write_text("task: tiny_ll\noutput_type: loglikelihood\n" + common +
                                   "metric_list:\n  - metric: perplexity\n  - metric: acc\n")
    (tasks / "gen.yaml").write_text("task: tiny_gen\noutput_type: generate_until\n" + common +
                                    "generation_kwargs:\n  until: ['\\n']\n  max_gen_toks: 6\n  do_sample: false\n"
                                    "metric_list:\n  - metric: exact_match\n")
    result = tmp_path / "results.json"
    run = cli("eval", str(out / "checkpoints"), "--tasks", "tiny_ll,tiny_gen", "--include-path", str(tasks),
              "--output", str(result))
    assert "| tiny_ll | 0 | perplexity | none |" in run.stdout  # our table: the harness's has headers A, B, ...
    for noise in ("`pretrained` model kwarg", "already-initialized model", "not a git repository"):
        assert noise not in run.stderr
    record = json.loads(result.read_text())
    assert set(record["results"]) == {"tiny_ll", "tiny_gen"}
    assert 0.0 <= record["results"]["tiny_gen"]["exact_match,none"] <= 1.0
    again = cli("eval", str(out / "checkpoints"), "--tasks", "tiny_ll", "--include-path", str(tasks),
                "--output", str(result), check=False)  # results are replaced only with --overwrite
    assert again.returncode != 0 and "exists: write to a new file, or add --overwrite" in again.stderr
    assert json.loads(result.read_text()) == record

    from megatron_stag.data.tokenizer import load_tokenizer
    from megatron_stag.serving.convert import load_serving_model

    tok = load_tokenizer(out / "checkpoints" / "tokenizer.model")
    model = load_serving_model(out / "checkpoints")
    lls = []
    for d in docs:
        context = tok.tokenize(d["context"])
        whole = tok.tokenize(d["context"] + d["continuation"])
        with torch.no_grad():
            logp = model(torch.tensor([whole])).log_softmax(-1)[0]
        lls.append(sum(logp[i - 1, whole[i]].item() for i in range(len(context), len(whole))))
    expected = float(torch.tensor(lls).mean().neg().exp())
    assert record["results"]["tiny_ll"]["perplexity,none"] == pytest.approx(expected, rel=1e-4)
    bad = cli("eval", str(out / "checkpoints"), "--tasks", "no_such_task", "--include-path", str(tasks), check=False)
    assert bad.returncode != 0 and "no_such_task" in bad.stderr
    (tasks / "hub.yaml").write_text("task: tiny_hub\noutput_type: loglikelihood\n" + common.replace(
        "dataset_path: json", "dataset_path: megatron-stag-tests/no-such-dataset"))
    offline = cli("eval", str(out / "checkpoints"), "--tasks", "tiny_hub", "--include-path", str(tasks),
                  check=False, env=dict(HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1"))
    assert offline.returncode != 0 and offline.stderr.strip().splitlines()[-1].startswith(
        "--tasks tiny_hub: Couldn't reach 'megatron-stag-tests/no-such-dataset'"), offline.stderr[-2000:]
    assert "Traceback" not in offline.stderr


def test_eval_refuses_bad_options_before_loading_anything():
    """Bad numbers, and a --tasks that names no task (the harness: a traceback after the model loaded)."""
    from megatron_stag.serving.evaluate import _check_options

    ok = dict(limit=None, batch_size=8, num_fewshot=None, tasks="lambada")
    _check_options(argparse.Namespace(**ok))
    _check_options(argparse.Namespace(**{**ok, "limit": 0.5, "num_fewshot": 0}))
    for change, message in ((dict(limit=0.0), "--limit 0: give a count"), (dict(limit=2.5), "--limit 2.5: give a whole"),
                            (dict(batch_size=0), "--batch-size 0"), (dict(num_fewshot=-1), "--num-fewshot -1"),
                            (dict(tasks=" , "), "--tasks ' , ' names no task")):
        with pytest.raises(SystemExit, match=message):
            _check_options(argparse.Namespace(**{**ok, **change}))


@pytest.mark.parametrize("name", sorted(VARIANTS) + ["learned-positions-gpt", "altup3-widened-learned", "llama"])
def test_import_round_trip_is_exact(megatron_world, tmp_path, name):
    """megatron -> HF folder (StagForCausalLM, or LlamaForCausalLM for a baseline in its shape) ->
    `import` -> megatron: every weight bit-exact (fp32)."""
    from megatron_stag.checkpointing.checkpoint_io import load_model_weights, resolve_checkpoint
    from megatron_stag.models.model_args import ModelArgs
    from megatron_stag.serving.convert import import_checkpoint

    kw = {"learned-positions-gpt": dict(stag_sections=1),
          "altup3-widened-learned": dict(altup_blocks=3, altup_embedding="widened", altup_output="learned"),
          "llama": LLAMA}
    model = tiny_model(**kw.get(name, VARIANTS.get(name, {})))
    hf_folder(model, tmp_path / "hf", load=False)
    assert (json.loads((tmp_path / "hf" / "config.json").read_text())["model_type"] == "llama") == (name == "llama")
    checkpoint = import_checkpoint(tmp_path / "hf", tmp_path / "ckpt")
    _, run_dir = resolve_checkpoint(checkpoint)
    args = ModelArgs.load(run_dir / "model_args.json")
    back = args.build(args.config()).eval()
    load_model_weights(back, checkpoint)
    theirs = back.state_dict()
    for key, value in model.state_dict().items():
        if torch.is_tensor(value):
            assert torch.equal(theirs[key], value), key
    with pytest.raises(Exception, match="exists"):
        import_checkpoint(tmp_path / "hf", checkpoint)
    with pytest.raises(Exception, match=f"is a megatron checkpoint already: train from it with checkpoint.load={run_dir}"):
        import_checkpoint(checkpoint, tmp_path / "again")
    with pytest.raises(FileNotFoundError, match="nowhere does not exist"):
        import_checkpoint(tmp_path / "nowhere", tmp_path / "again")
    assert not (tmp_path / "again").exists()


def test_a_llama_that_transformers_wrote_imports_exactly(megatron_world, tmp_path):
    """A Llama folder from elsewhere (transformers' own save_pretrained: grouped-query attention, rope
    base in `rope_parameters`, tied head, sharded) decodes and imports with transformers' logits; what
    the serving model or megatron-stag's model does not compute is refused by its config field. A
    head size other than hidden / heads imports as megatron's kv_channels."""
    from megatron_stag.checkpointing.checkpoint_io import load_model_weights, resolve_checkpoint
    from megatron_stag.models.model_args import ModelArgs
    from megatron_stag.serving.convert import import_checkpoint
    from megatron_stag.serving.model import load_plain_model

    torch.manual_seed(0)
    base = dict(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=MAX_LEN, rms_norm_eps=1e-5,
                tie_word_embeddings=True, rope_parameters={"rope_type": "default", "rope_theta": 500000.0})
    theirs = transformers.LlamaForCausalLM(transformers.LlamaConfig(**base)).eval()
    theirs.save_pretrained(tmp_path / "llama", max_shard_size="40KB")
    ids = torch.randint(0, 96, (2, 10))
    with torch.no_grad():
        want = theirs(ids).logits
        assert (load_plain_model(tmp_path / "llama")(ids) - want).abs().max() <= TOL
    checkpoint = import_checkpoint(tmp_path / "llama", tmp_path / "ckpt")
    args = ModelArgs.load(resolve_checkpoint(checkpoint)[1] / "model_args.json")
    assert (args.rotary_base, args.num_query_groups, args.share_embeddings_and_output_weights) == (500000, 2, True)
    back = args.build(args.config()).eval()
    load_model_weights(back, checkpoint)
    with torch.no_grad():
        assert (back(ids, torch.arange(10).expand(2, 10)) - want).abs().max() <= TOL

    for field, change in [("rope_parameters", dict(rope_parameters={"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0,
                                                                     "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                                                     "original_max_position_embeddings": 32})),
                          ("rope_parameters", dict(rope_parameters={"rope_type": "linear", "rope_theta": 5e5, "factor": 2.0})),
                          ("attention_bias", dict(attention_bias=True)), ("hidden_act", dict(hidden_act="gelu"))]:
        folder = tmp_path / field
        transformers.LlamaForCausalLM(transformers.LlamaConfig(**{**base, **change})).save_pretrained(folder)
        with pytest.raises(ValueError, match=field):
            load_plain_model(folder)
    folder = tmp_path / "head_dim"  # a head size other than hidden / heads (Mistral NeMo's 128 for 5120 / 32)
    transformers.LlamaForCausalLM(transformers.LlamaConfig(**base, head_dim=24)).eval().save_pretrained(folder)
    with torch.no_grad():
        want = transformers.AutoModelForCausalLM.from_pretrained(folder)(ids).logits
        assert (load_plain_model(folder)(ids) - want).abs().max() <= TOL
    checkpoint = import_checkpoint(folder, tmp_path / "head_dim_ckpt")  # megatron's --kv-channels 24
    args = ModelArgs.load(resolve_checkpoint(checkpoint)[1] / "model_args.json")
    assert args.kv_channels == 24
    back = args.build(args.config()).eval()
    load_model_weights(back, checkpoint)
    with torch.no_grad():
        assert (back(ids, torch.arange(10).expand(2, 10)) - want).abs().max() <= TOL


@pytest.mark.slow
def test_import_continues_training_at_tp2_pp2(quickstart_run, tmp_path):
    """The quickstart model exported to HF and imported back: `pretrain` at TP=2 x PP=2 loads it
    (megatron's release checkpoint: weights only) and trains on from the trained weights."""
    out, _ = quickstart_run
    cli("export", str(out / "checkpoints"), str(tmp_path / "hf"), "--format", "hf")
    cli("import", str(tmp_path / "hf"), str(tmp_path / "ckpt"))
    summary = json.loads((out / "summary.json").read_text())
    data = out / "data"
    proc = cli("pretrain", "tiny-cpu-stag", f"data.data_path=[{data / 'stdlib_text_document'}]",
               f"data.tokenizer_model={data / 'stdlib.model'}", f"checkpoint.pretrained_checkpoint={tmp_path / 'ckpt'}",
               f"checkpoint.save={tmp_path / 'ft'}", "training.train_iters=2", "checkpoint.save_interval=2",
               "parallelism.tensor_model_parallel_size=2", "parallelism.pipeline_model_parallel_size=2",
               "logging.eval_interval=100", "optimizer.lr_warmup_iters=1")
    log = proc.stdout + proc.stderr
    assert "loading release distributed checkpoint" in log and "at iteration 0" in log
    first = float(log.split("lm loss: ")[1].split()[0])
    assert first < summary["first_loss"] - 1.5  # a fresh model starts near ln(vocab); this one is trained


def test_llama3_rope_scaling_decodes_imports_and_exports_exactly(megatron_world, tmp_path):
    """Llama 3's rope scaling (rope_type llama3 with Llama 3.x's constants; megatron's --use-rope-scaling):
    a folder transformers wrote decodes and imports with transformers' logits over 300 positions, where
    the scaling moves them, and the imported checkpoint exports back to the same config and logits."""
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding

    from megatron_stag.checkpointing.checkpoint_io import load_model_weights, resolve_checkpoint
    from megatron_stag.models.model_args import ModelArgs
    from megatron_stag.serving.convert import import_checkpoint, to_plain_model, write_hf_folder
    from megatron_stag.serving.model import llama3_frequencies, load_plain_model

    inv = 1.0 / (5e5 ** (torch.arange(0, 64, 2, dtype=torch.float32) / 64))  # Llama 3.2 1B's heads
    megatrons = RotaryEmbedding(64, 1.0, rotary_base=500000, rope_scaling=True, rope_scaling_factor=32.0,
                                use_cpu_initialization=True).inv_freq
    assert torch.equal(llama3_frequencies(inv, 32.0), megatrons) and not torch.equal(megatrons, inv)

    torch.manual_seed(0)
    rope = {"rope_type": "llama3", "rope_theta": 5e5, "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192}
    config = transformers.LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                                      tie_word_embeddings=True, rope_parameters=rope)
    transformers.LlamaForCausalLM(config).eval().save_pretrained(tmp_path / "llama3")
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "llama3").eval()
    ids = torch.randint(0, 96, (2, 300))
    with torch.no_grad():
        want = theirs(ids).logits
        ours = load_plain_model(tmp_path / "llama3")
        assert ours.cfg.rope_scaling_factor == 32.0
        assert (ours(ids) - want).abs().max() <= TOL
        ours.cfg.rope_scaling_factor = None  # the scaling matters at these positions
        assert (ours(ids) - want).abs().max() > 10 * TOL
    checkpoint = import_checkpoint(tmp_path / "llama3", tmp_path / "ckpt")
    args = ModelArgs.load(resolve_checkpoint(checkpoint)[1] / "model_args.json")
    assert (args.use_rope_scaling, args.rope_scaling_factor) == (True, 32.0)
    back = args.build(args.config()).eval()
    load_model_weights(back, checkpoint)
    with torch.no_grad():
        assert (back(ids, torch.arange(300).expand(2, 300)) - want).abs().max() <= TOL
    write_hf_folder(to_plain_model(back, args), None, tmp_path / "hf", torch.float32)  # `export --format hf`
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["rope_parameters"] == rope
    with torch.no_grad():
        again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()(ids).logits
    assert (again - want).abs().max() <= TOL


def test_fine_tuning_an_import_starts_from_it_and_resumes_its_own_checkpoints(quickstart_run, megatron_world, tmp_path):
    """`checkpoint.pretrained_checkpoint=IMPORT` starts a run from the import and, the same command run
    again after a stop (a Slurm requeue), resumes the run's own checkpoint, not the import. A recipe
    of another model (megatron: a KeyError listing every weight of the checkpoint) and
    `checkpoint.load=IMPORT` over the run's own checkpoints (it would train from the import again and
    overwrite them) are refused by name, before anything is written."""
    from megatron_stag.serving.convert import export_checkpoint, import_checkpoint

    out, _ = quickstart_run
    export_checkpoint(out / "checkpoints", tmp_path / "hf", format="hf")
    imported = import_checkpoint(tmp_path / "hf", tmp_path / "import")
    ft = tmp_path / "ft"

    def pretrain(recipe, *overrides):
        return cli("pretrain", recipe, f"data.data_path=[{out / 'data' / 'stdlib_text_document'}]",
                   f"data.tokenizer_model={imported / 'tokenizer.model'}", f"checkpoint.save={ft}",
                   "training.train_iters=4", "checkpoint.save_interval=2", "logging.eval_interval=100",
                   "optimizer.lr_warmup_iters=1", *overrides, check=False)

    refused = pretrain("tiny-cpu-gpt", f"checkpoint.pretrained_checkpoint={imported}")
    assert refused.returncode == 1 and "(checkpoint -> recipe: stag_sections 2 -> 1;" in refused.stdout
    assert "KeyError" not in refused.stdout + refused.stderr and not (ft / "model_args.json").exists()
    first = pretrain("tiny-cpu-stag", f"checkpoint.pretrained_checkpoint={imported}", "--", "--exit-interval", "2")
    assert first.returncode == 0 and f"loading release distributed checkpoint from {imported}" in first.stdout
    again = pretrain("tiny-cpu-stag", f"checkpoint.pretrained_checkpoint={imported}")
    assert again.returncode == 0 and f"from {ft} at iteration 2" in again.stdout  # not the import again
    assert (ft / "latest_checkpointed_iteration.txt").read_text().strip() == "4"
    restart = pretrain("tiny-cpu-stag", f"checkpoint.load={imported}")
    assert restart.returncode != 0 and f"checkpoint.pretrained_checkpoint={imported} and " in restart.stderr
    assert (ft / "latest_checkpointed_iteration.txt").read_text().strip() == "4"


def test_a_llama_from_elsewhere_generates_with_its_bos_and_stops_at_its_eos(megatron_world, tmp_path):
    """A Llama folder from elsewhere (config.json names a bos_token_id) is prompted through its own
    tokenizer: BOS first, as transformers encodes it, from tokenizer.model or from tokenizer.json alone
    (Llama 3 ships no tokenizer.model). `generate` gives transformers' greedy tokens for that prompt and
    stops at any eos_token_id of generation_config.json, reporting why each completion ended. Its
    import and its plain export keep that tokenizer and those end tokens: the same completion."""
    import sentencepiece as spm

    from megatron_stag.serving.convert import export_checkpoint, import_checkpoint
    from megatron_stag.serving.generate_cli import prepare_prompts
    from tests.tokenizer_helpers import llama_tokenizer_folder

    folder = llama_tokenizer_folder(tmp_path / "llama2")
    torch.manual_seed(0)
    theirs = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=500, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=MAX_LEN, bos_token_id=1, eos_token_id=2)).eval()
    theirs.save_pretrained(folder)
    tok = transformers.AutoTokenizer.from_pretrained(folder)
    llama3 = tmp_path / "tokenizer_json_only"
    tok.save_pretrained(llama3)
    assert not (llama3 / "tokenizer.model").exists()
    for name in ("config.json", "model.safetensors"):
        (llama3 / name).write_bytes((folder / name).read_bytes())

    prompt = "def main(args):"
    want = tok(prompt)["input_ids"]
    assert want[0] == 1 and want[1:] == spm.SentencePieceProcessor(model_file=str(folder / "tokenizer.model")).encode(prompt)
    ns = argparse.Namespace(tokenizer=None, max_new_tokens=8, temperature=0.0, top_k=0, top_p=1.0, seed=0, stop=[])
    for where in (folder, llama3):
        _, ids, _, ends = prepare_prompts(ns, [prompt], where, 500, MAX_LEN)
        assert ids == [want] and ends == {2}, where
    with torch.no_grad():
        continuation = theirs.generate(torch.tensor([want]), max_new_tokens=8, do_sample=False)[0, len(want):].tolist()
    assert len(continuation) == 8 and 2 not in continuation  # ran to the budget

    def generate(model, name: str) -> dict:
        cli("generate", str(model), "--prompt", prompt, "--max-new-tokens", "8", "--output", str(tmp_path / name))
        return json.loads((tmp_path / name).read_text())

    record = generate(folder, "a.jsonl")
    assert (record["tokens"], record["finish_reason"]) == (continuation, "length")
    end = next(i for i in range(2, 8) if continuation[i] not in continuation[:i])  # a token seen first at i
    (folder / "generation_config.json").write_text(json.dumps(dict(bos_token_id=1, eos_token_id=[2, continuation[end]])))
    record = generate(folder, "b.jsonl")
    assert (record["tokens"], record["finish_reason"]) == (continuation[:end + 1], "eos")

    import_checkpoint(folder, tmp_path / "ckpt")
    export_checkpoint(folder, tmp_path / "pkg")
    assert (tmp_path / "ckpt" / "tokenizer").is_dir() and (tmp_path / "pkg" / "tokenizer").is_dir()
    for where in (tmp_path / "ckpt", tmp_path / "pkg"):
        _, ids, _, ends = prepare_prompts(ns, [prompt], where, 500, MAX_LEN)
        assert ids == [want] and ends == {2, continuation[end]}, where
    assert generate(tmp_path / "ckpt", "c.jsonl") == record  # megatron's weights, the folder's tokenizer and ends

    from megatron_stag.serving.evaluate import load_for_harness

    model, harness_tok = load_for_harness(llama3, "cpu", torch.float32)  # what `eval` hands the harness
    assert harness_tok(prompt)["input_ids"] == want
    with torch.no_grad():
        assert (model(torch.tensor([want])).logits - theirs(torch.tensor([want])).logits).abs().max() <= TOL


def test_the_llama_recipe_builds_what_import_writes_for_llama_3_2_1b(tmp_path):
    """`recipes/llama-3.2-1b.yaml`, as megatron parses and validates it, describes the model `import`
    makes of Llama 3.2 1B's config.json (its published values, no weights), so fine-tuning an import
    with it loads every weight; a setting out of step would be named by the load check instead."""
    import os
    from pathlib import Path

    from megatron_stag.models.model_args import ModelArgs
    from megatron_stag.serving.convert import model_args_for
    from megatron_stag.serving.model import PlainConfig
    from tests.tokenizer_helpers import llama_tokenizer_folder

    transformers.LlamaConfig(
        vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
        num_key_value_heads=8, head_dim=64, max_position_embeddings=131072, rms_norm_eps=1e-5, tie_word_embeddings=True,
        bos_token_id=128000, eos_token_id=128001,
        rope_parameters=dict(rope_type="llama3", rope_theta=500000.0, factor=32.0, low_freq_factor=1.0,
                             high_freq_factor=4.0, original_max_position_embeddings=8192),
    ).save_pretrained(tmp_path / "llama")
    imported = model_args_for(PlainConfig.load(tmp_path / "llama" / "config.json"))
    tokenizer = llama_tokenizer_folder(tmp_path / "tokenizer")
    parse = textwrap.dedent(f"""
        import json, sys
        from dataclasses import asdict
        from megatron.training.arguments import parse_and_validate_args
        from megatron_stag.config.recipe import load_recipe, recipe_argv
        from megatron_stag.training.megatron_builder import add_megatron_stag_args
        from megatron_stag.training.megatron_pretrain import model_args_of, platform_flags, use_tokenizer_kind
        recipe = load_recipe("llama-3.2-1b", ["data.tokenizer_model={tokenizer}"])
        use_tokenizer_kind(recipe)
        sys.argv = ["pretrain", *recipe_argv(recipe), *platform_flags()]
        args = parse_and_validate_args(extra_args_provider=add_megatron_stag_args)
        args.padded_vocab_size = 128256  # megatron's padding of Llama 3's tokenizer (this one is smaller)
        print("MODEL_ARGS", json.dumps(asdict(model_args_of(args))))
    """)
    repo = str(Path(__file__).resolve().parents[1])
    proc = subprocess.run([sys.executable, "-c", parse], capture_output=True, text=True, timeout=300, cwd=tmp_path,
                          env={**os.environ, "RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0",
                               "PYTHONPATH": os.pathsep.join([repo, os.environ.get("PYTHONPATH", "")])})
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("MODEL_ARGS ")), None)
    assert line is not None, proc.stdout[-2000:] + proc.stderr[-3000:]
    recipe = ModelArgs(**json.loads(line.removeprefix("MODEL_ARGS ")))
    assert recipe.differences(imported) == []
    assert (recipe.num_query_groups, recipe.use_rope_scaling, recipe.rope_scaling_factor) == (8, True, 32.0)
