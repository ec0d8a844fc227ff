"""squeeze_excite: every backend's primitives against the reference; module vs torchvision; the torch ops."""

from __future__ import annotations

import copy
import types

import pytest
import torch
from torch import nn
from torchvision.ops import SqueezeExcitation

import mnet_ext
from mnet_ext import reference as R
from mnet_ext._backend import load
from tests.helpers import (
    ROUNDING_TOL,
    assert_close_scaled,
    assert_sums_close,
    backend_param,
    check_func_grad,
    scaled_error,
)

CPU_BACKENDS = [backend_param("cuda"), backend_param("triton")]


def check_primitives(backend: str | types.SimpleNamespace, shape, dtype, layout, device="cpu") -> None:
    """``backend``'s primitives against the reference; ``backend`` is a registry name or an object with the
    primitives and a ``__name__`` as attributes (the mutants of tests/test_mutation.py)."""
    impl = load(backend) if isinstance(backend, str) else backend
    fmt = torch.channels_last if layout == "nhwc" else torch.contiguous_format
    # mean 1, as SE inputs (activations) have: a mean of zero-mean data is all cancellation (see assert_sums_close)
    x = (torch.randn(shape, device=device) + 1).to(dtype=dtype, memory_format=fmt)
    grad_y = torch.randn(shape, device=device).to(dtype=dtype, memory_format=fmt)
    s = torch.rand(shape[:2], device=device)
    dpooled = torch.randn(shape[:2], device=device)
    label = backend if isinstance(backend, str) else backend.__name__
    what = f"{label} {shape} {layout} {dtype}"

    pooled = impl.se_pool(x)
    assert pooled.dtype == torch.float32 and pooled.shape == shape[:2], what
    assert_sums_close(pooled, R.se_pool(x), R.se_pool(x.abs()), f"se_pool {what}")

    y = impl.se_scale(x, s)
    assert y.dtype == dtype and y.is_contiguous(memory_format=fmt), what
    assert_close_scaled(y, R.se_scale(x, s), dtype, f"se_scale {what}")

    red = impl.se_bwd_reduce(grad_y, x)
    assert red.dtype == torch.float32 and red.shape == shape[:2], what
    assert_sums_close(red, R.se_bwd_reduce(grad_y, x), R.se_bwd_reduce(grad_y.abs(), x.abs()), f"se_bwd_reduce {what}")

    dx = impl.se_bwd_apply(grad_y, s, dpooled)
    assert dx.dtype == dtype and dx.is_contiguous(memory_format=fmt), what
    assert_close_scaled(dx, R.se_bwd_apply(grad_y, s, dpooled), dtype, f"se_bwd_apply {what}")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
# "wide": C = 100, not a multiple of 8 (a partial Triton channel block, the host twin's SIMD tail)
@pytest.mark.parametrize("shape", [(2, 12, 5, 7), (1, 3, 1, 1), (3, 17, 9, 11), (2, 100, 3, 4)],
                         ids=["small", "1x1", "odd", "wide"])
def test_primitives_match_reference(backend, dtype, layout, shape):
    check_primitives(backend, shape, dtype, layout)


def make_se(c: int, s: int, act: str, gate: str) -> SqueezeExcitation:
    acts = {"relu": nn.ReLU, "silu": nn.SiLU, "hardsigmoid": nn.Hardsigmoid, "sigmoid": nn.Sigmoid}
    return SqueezeExcitation(c, s, activation=acts[act], scale_activation=acts[gate])


@pytest.mark.parametrize("backend", [backend_param("reference"), *CPU_BACKENDS])
@pytest.mark.parametrize("act,gate", [("relu", "hardsigmoid"), ("silu", "sigmoid")])
def test_module_matches_torchvision(backend, act, gate):
    native = make_se(16, 8, act, gate)
    fused = mnet_ext.fuse(nn.Sequential(copy.deepcopy(native)), backend=backend)[0]
    x = torch.randn(2, 16, 6, 5).to(memory_format=torch.channels_last)
    x_n, x_f = x.clone().requires_grad_(), x.clone().requires_grad_()
    g = torch.randn(2, 16, 6, 5)
    y_n, y_f = native(x_n), fused(x_f)
    y_n.backward(g)
    y_f.backward(g)
    tol = ROUNDING_TOL[torch.float32]
    assert scaled_error(y_f, y_n) <= tol
    assert scaled_error(x_f.grad, x_n.grad) <= tol
    for (name, p_f), p_n in zip(fused.named_parameters(), native.parameters(), strict=False):
        assert scaled_error(p_f.grad, p_n.grad) <= 4 * tol, name


@pytest.mark.parametrize("backend", [backend_param("reference"), *CPU_BACKENDS])
def test_func_grad_matches_autograd(backend, monkeypatch):
    """torch.func.grad through a fused SE layer: autograd's gradients (tests.helpers.check_func_grad)."""
    import mnet_ext.functional as MF

    x = torch.randn(2, 6, 4, 5).to(memory_format=torch.channels_last)
    params = [torch.randn(s) for s in ((3, 6), (3,), (6, 3), (6,))]

    def loss(x, w1, b1, w2, b2):
        y = MF.squeeze_excite(x, w1, b1, w2, b2, "silu", "hardsigmoid", backend)
        return (y * y).sum()

    check_func_grad(backend, loss, (x, *params), monkeypatch)


@pytest.mark.parametrize("backend", [backend_param("reference"), *CPU_BACKENDS])
def test_opcheck(backend):
    x = torch.randn(2, 6, 4, 5, requires_grad=True)
    params = [torch.randn(s, requires_grad=True) for s in ((3, 6), (3,), (6, 3), (6,))]
    torch.library.opcheck(torch.ops.mnet_ext.squeeze_excite.default, (x, *params, "relu", "hardsigmoid", backend))


def test_opcheck_backward_op():
    x, grad_y = torch.randn(2, 6, 4, 5), torch.randn(2, 6, 4, 5)
    params = [torch.randn(s) for s in ((3, 6), (3,), (6, 3), (6,))]
    pooled = R.se_pool(x)
    torch.library.opcheck(torch.ops.mnet_ext.squeeze_excite_backward.default,
                          (grad_y, x, pooled, *params, "silu", "sigmoid", "reference"))
