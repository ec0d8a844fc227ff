"""Activation kinks and non-finite values: every backend behaves exactly as the native modules.

A delta depthwise filter and an identity BatchNorm (eval; ``running_var + eps == 1`` exactly) make the
pre-activation ``u`` equal to ``x`` bit for bit, so inputs can sit exactly on each kink (relu 0; relu6 0 and 6;
hardswish -3 and 3) and one ulp either side of it. There the branch taken decides the answer by O(1): y and dx must
match native's (to a few fp32 ulps off the kinks, where the formulas round differently; exactly on them).
NaN and +-Inf inputs must give NaN/Inf exactly where native does (``scaled_error`` demands identical non-finite
entries), and in training a NaN in one channel poisons that channel's output and running statistics, no other.
"""

from __future__ import annotations

import copy
import functools

import pytest
import torch
from torch import nn
from torchvision.ops import SqueezeExcitation
from torchvision.ops.misc import Conv2dNormActivation

import mnet_ext
from mnet_ext import reference as R
from tests.helpers import backend_param, scaled_error

# Triton's interpreter computes with numpy, which warns on NaN arithmetic: expected here
pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
BACKENDS = [backend_param("reference"), backend_param("cuda"), backend_param("triton")]
ACT_MODULES = {"none": None, "relu": nn.ReLU, "relu6": nn.ReLU6, "hardswish": nn.Hardswish, "silu": nn.SiLU,
               "hardsigmoid": nn.Hardsigmoid, "sigmoid": nn.Sigmoid}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
# eps and running_var = 1 - eps are exact even in bf16 (8 significant bits) and sum to exactly 1: invstd is 1
EPS = 2.0**-8
# A few ulps of fp32: off the kinks the fused formulas may round differently from native's (u * (1/3) vs u / 3);
# on the wrong side of a kink the error is O(1).
ULPS_TOL = 8 * 2.0**-23
C = 4


def _kink_values(dtype: torch.dtype) -> torch.Tensor:
    """Each kink of every activation, one ulp (of ``dtype``) either side, and a few ordinary values. Next to 0 the
    neighbours are the smallest normal numbers: subnormals are flushed to zero by some native kernels (oneDNN's
    bf16 convolution) and by GPU fast paths, which is a property of the platform, not of an activation."""
    kinks = torch.tensor([-3.0, 3.0, 6.0], dtype=dtype)
    up = torch.nextafter(kinks, torch.full_like(kinks, float("inf")))
    down = torch.nextafter(kinks, torch.full_like(kinks, -float("inf")))
    tiny = torch.finfo(dtype).tiny
    zero = torch.tensor([0.0, tiny, -tiny], dtype=dtype)
    others = torch.tensor([-7.0, -1.5, -0.0, 0.25, 1.0, 4.5, 9.0], dtype=dtype)
    return torch.cat([kinks, up, down, zero, others])


def _probe_layer(act: str, k: int = 3) -> nn.Sequential:
    native = Conv2dNormActivation(C, C, k, 1, groups=C, activation_layer=ACT_MODULES[act],
                                  norm_layer=functools.partial(nn.BatchNorm2d, eps=EPS))
    with torch.no_grad():
        native[0].weight.zero_()
        native[0].weight[:, :, k // 2, k // 2] = 1.0  # delta filter: z = x
        native[1].running_mean.zero_()
        native[1].running_var.fill_(1.0 - EPS)
    return native


def _fused(native: nn.Module, backend: str) -> nn.Module:
    fused = mnet_ext.fuse(nn.Sequential(copy.deepcopy(native)), backend=backend)[0]
    assert isinstance(fused, (mnet_ext.FusedConvBNAct, mnet_ext.FusedSqueezeExcitation)), type(fused)
    return fused


def _run(module: nn.Module, x: torch.Tensor, grad: torch.Tensor):
    module.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_()
    y = module(x)
    y.backward(grad)
    return y.detach(), x.grad, {n: p.grad for n, p in module.named_parameters()}


def _grid(values: torch.Tensor, layout: str, n: int = 2) -> torch.Tensor:
    """[n, C, H, W] holding ``values`` in every channel, rolled per channel so channels differ."""
    hw = values.numel()
    h = 3
    w = -(-hw // h)
    flat = torch.cat([values, values[: h * w - hw]])
    chans = [flat.roll(c) for c in range(C)]
    x = torch.stack(chans).view(1, C, h, w).expand(n, C, h, w).clone()
    return x.contiguous(memory_format=torch.channels_last if layout == "nhwc" else torch.contiguous_format)


def _assert_match(got, expected, what: str, tol: float) -> None:
    err = scaled_error(got, expected)
    assert err <= tol, f"{what}: error {err:.3g} > {tol:.3g}"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
@pytest.mark.parametrize("act", R.CONV_ACTS)
def test_conv_bn_act_kinks_match_native(backend, act, layout, dtype):
    """u = x exactly; y and dx (= the activation's derivative times grad, through a delta filter) as native's."""
    native = _probe_layer(act).to(DTYPES[dtype]).eval()
    fused = _fused(native, backend).eval()
    x = _grid(_kink_values(DTYPES[dtype]), layout)
    grad = torch.linspace(0.5, 2.0, x.numel()).view(x.shape).to(DTYPES[dtype])
    y_n, dx_n, _ = _run(native, x, grad)
    y_f, dx_f, _ = _run(fused, x, grad)
    if act != "silu":  # piecewise linear: on a kink every term is exact, so the answer is too
        kink = torch.isin(x, torch.tensor([-3.0, 0.0, 3.0, 6.0], dtype=x.dtype))
        assert torch.equal(y_f[kink], y_n[kink]), f"y on the kinks: {y_f[kink]} vs native {y_n[kink]}"
        assert torch.equal(dx_f[kink], dx_n[kink]), f"dx on the kinks: {dx_f[kink]} vs native {dx_n[kink]}"
    # bf16 outputs: one bf16 ulp of the largest value. A few fp32 ulps may straddle a bf16 rounding boundary, and
    # Triton's interpreter truncates fp32 -> bf16 even when asked for round-to-nearest-even (measured, Triton 3.x;
    # a GPU rounds to nearest). A derivative taken on the wrong side of a kink errs by O(1).
    tol = ULPS_TOL if dtype == "fp32" else 2.0**-7
    _assert_match(y_f, y_n, "y", tol)
    _assert_match(dx_f, dx_n, "dx", tol)


def _nonfinite_input(layout: str) -> torch.Tensor:
    """Ordinary values with one NaN (image 0, channel 0, at (1, 1)), one +Inf and one -Inf in other channels."""
    x = torch.randn(2, C, 9, 9)
    x[0, 0, 1, 1] = float("nan")
    x[0, 1, 4, 4] = float("inf")
    x[1, 2, 7, 7] = -float("inf")
    return x.contiguous(memory_format=torch.channels_last if layout == "nhwc" else torch.contiguous_format)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
@pytest.mark.parametrize("act", R.CONV_ACTS)
def test_conv_bn_act_nonfinite_eval_match_native(backend, act, layout):
    """Positive filters, eval: an Inf input gives +-Inf (or NaN after the activation) in its window and a NaN gives
    NaN, exactly where native's do; the gradients carry the same non-finite entries as native's.

    One exception, where native disagrees with itself: the derivative at a NaN pre-activation. PyTorch's scalar
    CPU and CUDA kernels pass the gradient there for relu/relu6/hardswish, its vectorised CPU kernels give 0 (relu6)
    or NaN (hardswish) (measured, torch 2.14). The spec follows the scalar/CUDA rule (``reference.act_bwd``); so
    next to the NaN, dx and the NaN channel's parameter gradients are compared with the reference, elsewhere with
    native."""
    native = Conv2dNormActivation(C, C, 3, 1, groups=C, activation_layer=ACT_MODULES[act])
    with torch.no_grad():
        native[0].weight.uniform_(0.5, 1.5)
        native[1].weight.uniform_(0.5, 1.5)
        native[1].bias.uniform_(-0.5, 0.5)
        native[1].running_mean.uniform_(-0.2, 0.2)
        native[1].running_var.uniform_(0.5, 1.5)
    native.eval()
    x = _nonfinite_input(layout)
    grad = torch.randn(x.shape)
    y_n, dx_n, pg_n = _run(native, x, grad)
    y_r, dx_r, pg_r = _run(_fused(native, "reference").eval(), x, grad)
    y_f, dx_f, pg_f = _run(_fused(native, backend).eval(), x, grad)
    assert not torch.isfinite(y_n).all(), "the probe must reach the output"
    _assert_match(y_f, y_n, "y vs native", 2e-5)
    near_nan = torch.zeros_like(x, dtype=torch.bool)
    near_nan[0, 0, :4, :4] = True  # inputs whose 3x3 window of outputs touches the NaN's 3x3 window
    _assert_match(dx_f[~near_nan], dx_n[~near_nan], "dx vs native away from the NaN", 2e-5)
    _assert_match(dx_f, dx_r, "dx vs the reference", 2e-5)
    for name, g in pg_n.items():
        _assert_match(pg_f[name][1:], g[1:], f"d{name} vs native (channels without the NaN)", 1e-4)
        _assert_match(pg_f[name], pg_r[name], f"d{name} vs the reference", 1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
@pytest.mark.parametrize("act", ["relu", "relu6", "hardswish"])
def test_conv_bn_act_nan_poisons_one_channel_in_training(backend, act, layout):
    """A NaN in channel 1 makes that channel's batch statistics NaN: its whole output and its running statistics
    are NaN (native), and every other channel is untouched."""
    native = Conv2dNormActivation(C, C, 3, 1, groups=C, activation_layer=ACT_MODULES[act]).train()
    fused = _fused(native, backend).train()
    x = torch.randn(2, C, 6, 6)
    x[1, 1, 2, 3] = float("nan")
    x = x.contiguous(memory_format=torch.channels_last if layout == "nhwc" else torch.contiguous_format)
    y_n, y_f = native(x).detach(), fused(x).detach()
    assert torch.isnan(y_n[:, 1]).all() and torch.isfinite(y_n[:, [0, 2, 3]]).all(), "native's own behaviour"
    _assert_match(y_f, y_n, "y", 2e-5)
    for name, b_n in native[1].state_dict().items():
        b_f = fused.bn.state_dict()[name]
        if b_n.is_floating_point():
            _assert_match(b_f, b_n, name, 2e-5)
        else:
            assert torch.equal(b_f, b_n), name


def _probe_se(gate: str, b1: list[float], b2: list[float]) -> SqueezeExcitation:
    """Zero FC weights: the FC outputs are exactly their biases, so gates sit exactly where the biases put them."""
    se = SqueezeExcitation(C, 2, activation=nn.ReLU, scale_activation=ACT_MODULES[gate])
    with torch.no_grad():
        se.fc1.weight.zero_()
        se.fc2.weight.zero_()
        se.fc1.bias.copy_(torch.tensor(b1))
        se.fc2.bias.copy_(torch.tensor(b2))
    return se


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
@pytest.mark.parametrize("gate", R.SE_GATES)
def test_squeeze_excite_kinks_match_native(backend, gate, layout):
    """The inner relu at 0 and one ulp above; hardsigmoid's gate at -3, 3 and one ulp inside: outputs and every
    gradient as native's (a derivative taken on the wrong side of a kink errs by O(1))."""
    three = torch.tensor(3.0)
    inside = torch.nextafter(three, torch.tensor(0.0)).item()
    native = _probe_se(gate, [0.0, torch.nextafter(torch.tensor(0.0), three).item()], [-3.0, 3.0, -inside, inside])
    fused = _fused(native, backend)
    fmt = torch.channels_last if layout == "nhwc" else torch.contiguous_format
    x = torch.randn(2, C, 5, 4).contiguous(memory_format=fmt)
    grad = torch.randn(x.shape)
    (y_n, dx_n, pg_n), (y_f, dx_f, pg_f) = _run(native, x, grad), _run(fused, x, grad)
    _assert_match(y_f, y_n, "y", 2e-6)
    _assert_match(dx_f, dx_n, "dx", 2e-6)
    for name, g in pg_n.items():
        if g.abs().max() == 0:
            assert torch.equal(pg_f[name], g), f"d{name}: {pg_f[name]} vs native's exact zeros"
        else:
            _assert_match(pg_f[name], g, f"d{name}", 2e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
def test_squeeze_excite_nonfinite_match_native(backend, layout):
    """A NaN (or Inf) in one image makes that image's pooled mean non-finite, hence its whole gate and output, as
    native; the other image is untouched."""
    native = SqueezeExcitation(C, 2, activation=nn.ReLU, scale_activation=nn.Hardsigmoid)
    fused = _fused(native, backend)
    x = torch.randn(3, C, 5, 4)
    x[0, 1, 2, 2] = float("nan")
    x[1, 3, 0, 1] = float("inf")
    x = x.contiguous(memory_format=torch.channels_last if layout == "nhwc" else torch.contiguous_format)
    grad = torch.randn(x.shape)
    (y_n, dx_n, pg_n), (y_f, dx_f, pg_f) = _run(native, x, grad), _run(fused, x, grad)
    assert torch.isfinite(y_n[2]).all() and not torch.isfinite(y_n[0]).all(), "native's own behaviour"
    _assert_match(y_f, y_n, "y", 2e-6)
    _assert_match(dx_f, dx_n, "dx", 2e-6)
    for name, g in pg_n.items():
        _assert_match(pg_f[name], g, f"d{name}", 2e-5)
