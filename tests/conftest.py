"""Test setup: Triton's interpreter on CPU-only machines (set before any import of triton), markers, seeding."""

from __future__ import annotations

import os

import torch

# Triton reads TRITON_INTERPRET when kernels are defined: set it before anything imports triton_kernels.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

HAS_CUDA = torch.cuda.is_available()


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


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield

