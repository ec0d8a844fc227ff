"""The backend registry: choice order, overrides, fallback with one warning; the backends this machine must run.

The registry turns any import error of a backend into an "unavailable" reason (users get a fallback and one
warning), so a broken build would only show up as skipped tests. The suite therefore requires the backends this
machine can run (tests/helpers.py: required_backends; on a CPU-only machine the C++ extension's host twin and Triton's
interpreter): test_required_backend_imports imports each directly, so the ImportError and its traceback are the
failure, and every backend_param of a required backend fails with the reason instead of skipping. The one way to
run without one is explicit: MNET_EXT_TEST_ALLOW_MISSING=cuda (comma-separated names), e.g. for a pure-Python
install without the extension; GPU-only tests still skip, with their reason, on machines without a GPU.
"""

from __future__ import annotations

import importlib
import itertools
import os
import re
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch

import mnet_ext
from mnet_ext import _backend
from tests import helpers


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
    usable = [b for b in _backend.BACKENDS if _backend.unavailable_reason(b, "cpu") is None]
    if len(usable) < 2:
        pytest.skip(f"needs two usable backends on cpu, has {usable}")
    for context, pinned in itertools.permutations(usable, 2):
        with mnet_ext.use_backend(context):
            assert _backend.resolve(None, "cpu") == context  # the context is in force...
            assert _backend.resolve(pinned, "cpu") == pinned  # ...and a module's own backend still wins


@pytest.mark.parametrize("context", [helpers.backend_param("cuda")])
def test_fused_layer_pinned_to_a_backend_ignores_the_context(monkeypatch, context):
    """A model fused with backend="reference" runs the reference inside use_backend(context): count the calls of
    each backend's forward primitive (13 depthwise layers in MobileNet V1)."""
    calls = {"reference": 0, context: 0}

    def counting(name: str, original):
        def primitive(*args):
            calls[name] += 1
            return original(*args)
        return primitive

    for name in calls:
        module = _backend.load(name)
        monkeypatch.setattr(module, "dwconv_bn_act_fwd", counting(name, module.dwconv_bn_act_fwd))
    if context == "cuda":  # on CPU tensors it runs an eval layer as one C++ call, not through the primitive
        from mnet_ext import functional as MF

        dw, se = MF._eager_calls()
        monkeypatch.setattr(MF, "_eager_calls", lambda: (counting("cuda", dw), se))
    pinned = mnet_ext.fuse(mnet_ext.models.mobilenet_v1(0.25), backend="reference").eval()
    unpinned = mnet_ext.fuse(mnet_ext.models.mobilenet_v1(0.25)).eval()
    x = torch.randn(1, 3, 32, 32)
    with mnet_ext.use_backend(context), torch.no_grad():
        pinned(x)
        assert calls == {"reference": 13, context: 0}
        unpinned(x)  # while the context does route a model fused without a backend
        assert calls == {"reference": 13, context: 13}


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


@pytest.mark.parametrize("name", ["cuda", "triton"])
def test_required_backend_imports(name):
    """A backend this machine must run imports: directly, so a broken build fails here with its own ImportError
    (see the module docstring; MNET_EXT_TEST_ALLOW_MISSING=<name> skips this), and it serves every device that
    tests/helpers.py: required_backends lists for it."""
    if name in helpers.allowed_missing():
        pytest.skip(f"{helpers.ALLOW_MISSING_ENV} allows backend {name} to be missing")
    importlib.import_module(_backend._MODULES[name])
    for device in ("cpu", "cuda"):
        if name in helpers.required_backends(device):
            assert _backend.unavailable_reason(name, device) is None, (name, device)


def test_required_backend_param_fails_and_the_override_skips(monkeypatch):
    monkeypatch.setattr(helpers, "unavailable_reason", lambda name, device: "it failed to import (ImportError: x)")
    monkeypatch.delenv(helpers.ALLOW_MISSING_ENV, raising=False)
    marks = {m.name: m for m in helpers.backend_param("cuda").marks}
    assert "skip" not in marks
    reason = marks["required_backend_missing"].kwargs["reason"]
    assert "backend cuda is required on cpu but it failed to import (ImportError: x)" in reason
    monkeypatch.setenv(helpers.ALLOW_MISSING_ENV, "cuda")
    assert [m.name for m in helpers.backend_param("cuda").marks] == ["skip"]
    monkeypatch.setenv(helpers.ALLOW_MISSING_ENV, "cdua")
    with pytest.raises(ValueError, match="unknown backends"):  # a typo must not silently allow nothing
        helpers.backend_param("cuda")


# Run in a child pytest: makes the named modules fail to import, as a broken build would.
_BREAK_IMPORTS = """
import sys

BROKEN = ("mnet_ext._C", "mnet_ext.triton_kernels")


class _Broken:
    @staticmethod
    def find_spec(name, path=None, target=None):
        if name in BROKEN:
            raise ImportError(f"{name} is broken on purpose by test_backend.py")
        return None


sys.meta_path.insert(0, _Broken)
"""


@pytest.mark.slow
def test_suite_fails_when_a_required_backend_does_not_import(tmp_path):
    """End to end: with mnet_ext._C and mnet_ext.triton_kernels unimportable, a pytest run of tests that use the
    backends fails with the import error; with both named in MNET_EXT_TEST_ALLOW_MISSING the same run skips them."""
    (tmp_path / "break_imports.py").write_text(textwrap.dedent(_BREAK_IMPORTS))
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])}
    env.pop(helpers.ALLOW_MISSING_ENV, None)
    args = [sys.executable, "-m", "pytest", "-p", "break_imports", "-q", "-p", "no:cacheprovider",
            "tests/test_backend.py::test_required_backend_imports", "tests/test_squeeze_excite.py::test_opcheck"]

    def run(**extra: str) -> subprocess.CompletedProcess:
        return subprocess.run(args, cwd=root, env={**env, **extra}, capture_output=True, text=True, timeout=600)

    broken = run()
    assert broken.returncode == 1, broken.stdout + broken.stderr
    for message in ("ImportError: mnet_ext._C is broken on purpose",
                    "ImportError: mnet_ext.triton_kernels is broken on purpose",
                    "backend cuda is required on cpu but it failed to import"):
        assert message in broken.stdout, broken.stdout
    allowed = run(**{helpers.ALLOW_MISSING_ENV: "cuda,triton"})
    assert allowed.returncode == 0, allowed.stdout + allowed.stderr
    assert re.search(r"^\d+ passed, \d+ skipped in ", allowed.stdout, re.MULTILINE), allowed.stdout
