"""Helpers for the tests: backend parametrisation and principled tolerances."""

from __future__ import annotations

import pytest
import torch

from mnet_ext._backend import unavailable_reason

HAS_CUDA = torch.cuda.is_available()


def backend_param(name: str, device: str = "cpu"):
    """A pytest param for backend ``name`` on ``device``, skipped with the registry's reason when unusable."""
    reason = unavailable_reason(name, device)
    marks = [pytest.mark.skip(reason=f"backend {name} on {device}: {reason}")] if reason else []
    if name == "triton" and device == "cpu":
        marks.append(pytest.mark.triton_interp)
    return pytest.param(name, marks=marks, id=name)


def scaled_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |actual - expected| relative to the largest magnitude of ``expected`` (at least 1)."""
    scale = max(expected.detach().abs().max().item(), 1.0) if expected.numel() else 1.0
    return (actual.detach().double() - expected.detach().double()).abs().max().item() / scale


# Error allowed when a result rounded to ``dtype`` is compared with one computed in fp32 and rounded alike:
# two roundings of half an ulp each, plus fp32 accumulation-order noise.
ROUNDING_TOL = {torch.float32: 2e-5, torch.float16: 2 * 2.0**-11 + 2e-5, torch.bfloat16: 2 * 2.0**-8 + 2e-5,
                torch.float64: 1e-12}


def assert_close_scaled(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, what: str = "") -> None:
    err = scaled_error(actual, expected)
    assert err <= ROUNDING_TOL[dtype], f"{what}: scaled error {err:.3g} > {ROUNDING_TOL[dtype]:.3g} ({dtype})"
