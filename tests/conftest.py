"""Shared pytest set-up: the CPU adapter, one single-process megatron world, and the slow marker."""

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
    """A single-process (TP=1, PP=1) megatron world on gloo for in-process model tests."""
    from megatron_stag.platform.distributed import initialize

    initialize(tp=1, pp=1, seed=1234)
    yield
