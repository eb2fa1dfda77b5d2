"""Shared pytest set-up: the CPU adapter, one single-process megatron world, one prepared corpus, one
trained quickstart checkpoint, and the slow marker."""

import os

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "1")


def pytest_addoption(parser):
    parser.addoption("--run-slow", action="store_true", help="also run tests marked slow")


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: long-running; run with `make test-slow`")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--run-slow"):
        return
    skip = pytest.mark.skip(reason="slow: run with --run-slow (make test-slow)")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def megatron_world():
    """A single-process (TP=1, PP=1) megatron world on gloo for in-process model tests, shut down at
    the end of the session (else NCCL warns at exit that the group leaked)."""
    from megatron_stag.platform.distributed import initialize, shutdown

    initialize(tp=1, pp=1, seed=1234)
    yield
    shutdown()


@pytest.fixture(scope="session")
def corpus(tmp_path_factory):
    """A small indexed dataset of stdlib sources with its sentencepiece model (vocabulary 512), prepared
    once for the pretraining and Slurm tests: (prefix, tokenizer model)."""
    from megatron_stag.data.local_corpus import stdlib_files
    from megatron_stag.data.prepare import prepare_dataset

    out = tmp_path_factory.mktemp("corpus")
    return prepare_dataset([str(f) for f in stdlib_files(max_bytes=600_000)], out / "stdlib", vocab_size=512)


@pytest.fixture(scope="session")
def quickstart_run(tmp_path_factory):
    """One shortened quickstart (prepare-data -> pretrain -> generate), shared by every test that
    needs a trained checkpoint: (output folder, the finished process)."""
    from tests.cli_helpers import cli

    out = tmp_path_factory.mktemp("qs")
    proc = cli("quickstart", "--out", str(out), "--iterations", "100", "--corpus-mb", "1.5")
    return out, proc
