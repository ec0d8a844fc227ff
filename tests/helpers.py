"""Helpers for the tests: backend parametrisation and principled tolerances."""

from __future__ import annotations

import os

import pytest
import torch

from mnet_ext import reference
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


def assert_sums_close(actual: torch.Tensor, expected: torch.Tensor, magnitude: torch.Tensor, what: str) -> None:
    """Sums (or means) of many fp32 terms, one per entry: the error relative to the same reduction of the terms'
    magnitudes (the condition of a sum), entry by entry, not to the sum itself (cancellation makes it arbitrarily
    small) nor to the largest sum of the tensor (against which a small entry's error vanishes). Entries whose terms
    are all zero must be exactly zero."""
    diff = (actual.double() - expected.double()).abs().cpu()
    mag = magnitude.double().cpu()
    err = torch.where(mag > 0, diff / mag, torch.where(diff == 0, 0.0, torch.inf)).nan_to_num(nan=torch.inf)
    err = err.max().item()
    tol = ROUNDING_TOL[torch.float32]
    assert err <= tol, f"{what}: error {err:.3g} of the sum of |terms| > {tol:.3g}"


def _sum_magnitudes(name: str, args: tuple, expected: tuple) -> tuple:
    """For each output of primitive ``name`` on fp64 ``args``: the same reduction of its terms' magnitudes when it is
    a sum or mean over many terms, else None."""
    if name == "dwconv_bn_stats":
        x, weight, stride, dilation = args
        return reference._conv(x, weight, stride, dilation).abs().mean(dim=(0, 2, 3)), expected[1]  # var: terms >= 0
    if name == "dwconv_bn_act_bwd_reduce":
        g, xhat = reference._grad_u(*args)
        return g.abs().sum(dim=(0, 2, 3)), (g * xhat).abs().sum(dim=(0, 2, 3))
    if name == "se_pool":
        return (args[0].abs().mean(dim=(2, 3)),)
    if name == "se_bwd_reduce":
        return ((args[0] * args[1]).abs().sum(dim=(2, 3)),)
    return (None,) * len(expected)


def assert_matches_fp64_reference(name: str, outputs, args: tuple, what: str = "") -> None:
    """The outputs of backend primitive ``name`` on ``args`` against mnet_ext.reference computed in fp64 on the same
    device. Nothing in that reference rounds (no fp32, no TF32), so each output is held to its own dtype's
    ROUNDING_TOL: fp32 statistics and sums to fp32's (assert_sums_close), whatever the input dtype."""
    outputs = outputs if isinstance(outputs, tuple) else (outputs,)
    args = tuple(a.double() if isinstance(a, torch.Tensor) else a for a in args)
    expected = getattr(reference, name)(*args)
    expected = expected if isinstance(expected, tuple) else (expected,)
    for i, (out, ref, mag) in enumerate(zip(outputs, expected, _sum_magnitudes(name, args, expected), strict=True)):
        if mag is None:
            assert_close_scaled(out, ref, out.dtype, f"{name} output {i} {what}")
        else:
            assert out.dtype == torch.float32, f"{name} output {i} {what}: dtype {out.dtype}, expected float32"
            assert_sums_close(out, ref, mag, f"{name} output {i} {what}")


def check_func_grad(backend: str, loss, params: tuple[torch.Tensor, ...], monkeypatch) -> None:
    """torch.func.grad of ``loss(*params)`` against autograd's gradients on ``backend``: bitwise (a transform runs
    the op's setup_context Function, plain eager mode the cheaper one or on the host twin its one-call Function, all
    of one body), except Triton, which cannot run inside a transform and falls back to the next backend with a
    warning (gradients then within rounding of its own)."""
    import mnet_ext.functional as MF

    leaves = [t.clone().requires_grad_() for t in params]
    expected = torch.autograd.grad(loss(*leaves), leaves)
    monkeypatch.setattr(MF, "_warned_fallback", set())
    grad = torch.func.grad(loss, argnums=tuple(range(len(params))))
    if backend == "triton":
        with pytest.warns(UserWarning, match="'triton' cannot run inside torch.func transforms; using 'cuda'"):
            got = grad(*params)
    else:
        got = grad(*params)
    for i, (g, e) in enumerate(zip(got, expected, strict=True)):
        if backend == "triton":
            assert_close_scaled(g, e, torch.float32, f"gradient {i}")
        else:
            assert torch.equal(g, e), f"gradient {i}: torch.func.grad differs from autograd on backend {backend}"
