"""Test setup: Triton's interpreter on CPU-only machines (set before any import of triton), markers, seeding,
required backends (tests/helpers.py: required_backends) and a guard on the torch thread count."""

from __future__ import annotations

import os

import torch

# Triton reads TRITON_INTERPRET when kernels are defined: set it before anything imports mnet_ext.triton_kernels.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

HAS_CUDA = torch.cuda.is_available()


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "required_backend_missing(reason): a backend this machine must run is unavailable (set by "
        "tests/helpers.py: backend_param); the test fails with the reason instead of skipping")


def pytest_collection_modifyitems(config, items):
    if not config.getoption("-m"):
        skip = pytest.mark.skip(reason="exhaustive sweep: run with -m exhaustive")
        for item in items:
            if item.get_closest_marker("exhaustive"):
                item.add_marker(skip)
    if not HAS_CUDA:
        skip = pytest.mark.skip(reason="needs a CUDA GPU (none on this machine); scripts/gpu_run.sh runs it")
        for item in items:
            if item.get_closest_marker("cuda"):
                item.add_marker(skip)


def pytest_runtest_setup(item):
    # Runs after the skipping plugin's setup (tryfirst): exhaustive and GPU-only tests still skip.
    if marker := item.get_closest_marker("required_backend_missing"):
        pytest.fail(marker.kwargs["reason"], pytrace=False)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture(autouse=True)
def _threads_restored():
    """A test that calls torch.set_num_threads must restore the previous value: later tests (and their timings)
    would otherwise run with whatever it left."""
    before = torch.get_num_threads()
    yield
    after = torch.get_num_threads()
    assert after == before, f"the test left torch.get_num_threads() at {after} (was {before}): restore it"

