"""Helpers for the tests: backend parametrisation and principled tolerances."""

from __future__ import annotations

import os

import pytest
import torch

from mnet_ext._backend import BACKENDS, unavailable_reason

HAS_CUDA = torch.cuda.is_available()
ALLOW_MISSING_ENV = "MNET_EXT_TEST_ALLOW_MISSING"


def allowed_missing() -> frozenset[str]:
    """Backends this test run may lack, named explicitly (comma-separated) in MNET_EXT_TEST_ALLOW_MISSING, e.g.
    ``cuda`` for a pure-Python install without the C++ extension. Nothing else lets a required backend go missing."""
    names = frozenset(s.strip() for s in os.environ.get(ALLOW_MISSING_ENV, "").split(",") if s.strip())
    if unknown := names - set(BACKENDS):
        raise ValueError(f"{ALLOW_MISSING_ENV}: unknown backends {sorted(unknown)}; expected some of {BACKENDS}")
    return names


def required_backends(device: str = "cpu") -> tuple[str, ...]:
    """The backends this machine can run on ``device`` tensors, so the suite fails (not skips) without them: on
    ``cpu`` the C++ extension's host twin (``cuda``) and Triton when its interpreter is on (tests/conftest.py turns
    it on on machines without a GPU); on ``cuda`` both when torch sees a CUDA device. Minus allowed_missing()."""
    if device == "cpu":
        wanted = ["cuda"] + (["triton"] if os.environ.get("TRITON_INTERPRET") == "1" else [])
    elif device == "cuda" and HAS_CUDA:
        wanted = ["cuda", "triton"]
    else:
        wanted = []
    allowed = allowed_missing()
    return tuple(name for name in wanted if name not in allowed)


def backend_param(name: str, device: str = "cpu"):
    """A pytest param for backend ``name`` on ``device``. Unusable: skipped with the registry's reason, except for a
    required backend (required_backends), whose tests fail with that reason (tests/conftest.py)."""
    reason = unavailable_reason(name, device)
    if reason and name in required_backends(device):
        why = f"backend {name} is required on {device} but {reason} (to skip instead: {ALLOW_MISSING_ENV}={name})"
        marks = [pytest.mark.required_backend_missing(reason=why)]
    else:
        marks = [pytest.mark.skip(reason=f"backend {name} on {device}: {reason}")] if reason else []
    if name == "triton" and device == "cpu":
        marks.append(pytest.mark.triton_interp)
    return pytest.param(name, marks=marks, id=name)


def scaled_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |actual - expected| relative to the largest finite magnitude of ``expected`` itself (no floor: a tensor
    of scale 1e-3 is judged at 1e-3). Non-finite entries must match exactly (NaN where NaN, the same infinity),
    else the error is inf; an all-zero ``expected`` is compared absolutely."""
    assert actual.shape == expected.shape, f"shape {tuple(actual.shape)} != expected {tuple(expected.shape)}"
    if not expected.numel():
        return 0.0
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    finite = torch.isfinite(e)
    if not torch.equal(torch.isfinite(a), finite) or not torch.equal(a[~finite].nan_to_num(), e[~finite].nan_to_num()):
        return float("inf")
    if not finite.any():
        return 0.0
    scale = e[finite].abs().max().item()
    diff = (a[finite] - e[finite]).abs().max().item()
    return diff / scale if scale > 0 else diff


# Error allowed when a result rounded to ``dtype`` is compared with one computed in fp32 and rounded alike:
# two roundings of half an ulp each, plus fp32 accumulation-order noise.
ROUNDING_TOL = {torch.float32: 2e-5, torch.float16: 2 * 2.0**-11 + 2e-5, torch.bfloat16: 2 * 2.0**-8 + 2e-5,
                torch.float64: 1e-12}


def assert_close_scaled(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, what: str = "") -> None:
    err = scaled_error(actual, expected)
    assert err <= ROUNDING_TOL[dtype], f"{what}: scaled error {err:.3g} > {ROUNDING_TOL[dtype]:.3g} ({dtype})"
