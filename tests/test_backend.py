"""The backend registry: choice order, overrides, fallback with one warning."""

from __future__ import annotations

import warnings

import pytest
import torch

import mnet_ext
from mnet_ext import _backend


def test_reference_is_always_available():
    assert mnet_ext.available_backends("cpu")["reference"] is None
    assert _backend.resolve("reference", "cpu") == "reference"


def test_use_backend_overrides_and_nests():
    with mnet_ext.use_backend("reference"):
        assert _backend.resolve(None, "cpu") == "reference"
        with mnet_ext.use_backend("auto"):
            assert _backend.resolve(None, "cpu") == next(
                b for b in _backend.BACKENDS if _backend.unavailable_reason(b, "cpu") is None)
        assert _backend.resolve(None, "cpu") == "reference"


def test_module_backend_wins_over_context():
    assert _backend.resolve("reference", "cpu") == "reference"


def test_env_variable(monkeypatch):
    monkeypatch.setenv("MNET_EXT_BACKEND", "reference")
    assert _backend.resolve(None, "cpu") == "reference"
    monkeypatch.setenv("MNET_EXT_BACKEND", "bogus")
    with pytest.raises(ValueError, match="MNET_EXT_BACKEND: expected one of"):
        _backend.resolve(None, "cpu")


def test_unavailable_backend_falls_back_with_one_warning(monkeypatch):
    monkeypatch.setattr(_backend, "_warned", set())
    monkeypatch.setattr(_backend, "unavailable_reason",
                        lambda name, device: None if name == "reference" else "it is switched off in this test")
    with pytest.warns(UserWarning, match="backend 'triton' is unavailable for cpu tensors because it is switched off"):
        assert _backend.resolve("triton", "cpu") == "reference"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _backend.resolve("triton", "cpu") == "reference"  # second time: silent


def test_fused_layer_runs_on_the_chosen_backend(monkeypatch):
    """use_backend really routes the op: count calls of the reference's forward primitive."""
    calls = []
    original = mnet_ext.reference.dwconv_bn_act_fwd
    monkeypatch.setattr(mnet_ext.reference, "dwconv_bn_act_fwd", lambda *a: calls.append(1) or original(*a))
    model = mnet_ext.fuse(mnet_ext.models.mobilenet_v1(0.25)).eval()
    with mnet_ext.use_backend("reference"):
        model(torch.randn(1, 3, 32, 32))
    assert len(calls) == 13
