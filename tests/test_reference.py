"""The reference (the spec) against native PyTorch/torchvision modules: outputs, every gradient, running stats."""

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
from tests.helpers import ROUNDING_TOL, scaled_error

ACT_MODULES = {"none": None, "relu": nn.ReLU, "relu6": nn.ReLU6, "hardswish": nn.Hardswish, "silu": nn.SiLU}


def make_native(c: int, k: int, stride: int, dilation: int, act: str, **bn_kwargs) -> nn.Sequential:
    native = Conv2dNormActivation(c, c, k, stride, groups=c, dilation=dilation, activation_layer=ACT_MODULES[act],
                                  norm_layer=functools.partial(nn.BatchNorm2d, **bn_kwargs))
    with torch.no_grad():  # non-trivial BN state, so every term of the formulas matters
        bn = native[1]
        if bn.affine:
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.5, 0.5)
        if bn.track_running_stats:
            bn.running_mean.uniform_(-0.2, 0.2)
            bn.running_var.uniform_(0.5, 1.5)
    return native


def fused_copy(native: nn.Module, backend: str) -> nn.Module:
    fused = mnet_ext.fuse(nn.Sequential(copy.deepcopy(native)), backend=backend)[0]
    assert isinstance(fused, mnet_ext.FusedConvBNAct)
    return fused


def run_steps(module: nn.Module, xs: list[torch.Tensor], grads: list[torch.Tensor]):
    """Forward + backward on each batch; returns outputs, input grads and parameter grads of the last step."""
    outs, dxs = [], []
    for x, g in zip(xs, grads, strict=False):
        module.zero_grad(set_to_none=True)
        x = x.detach().requires_grad_()
        y = module(x)
        y.backward(g)
        outs.append(y.detach())
        dxs.append(x.grad)
    return outs, dxs, {n: p.grad for n, p in module.named_parameters()}


def compare_layer(native: nn.Module, fused: nn.Module, shape, dtype, channels_last: bool, training: bool,
                  steps: int = 2, tol: float | None = None) -> None:
    """Same batches through both modules: outputs, dx, dW, dgamma, dbeta and all buffers after ``steps`` steps."""
    native.train(training)
    fused.train(training)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    xs = [torch.randn(shape).to(dtype=dtype, memory_format=fmt) for _ in range(steps)]
    conv = native[0]
    y_shape = (*shape[:2], *R.output_hw(*shape[2:], conv.kernel_size[0], conv.stride[0], conv.dilation[0]))
    grads = [torch.randn(y_shape).to(dtype=dtype, memory_format=fmt) for _ in range(steps)]
    tol = ROUNDING_TOL[dtype] if tol is None else tol
    out_n, dx_n, pg_n = run_steps(native, xs, grads)
    out_f, dx_f, pg_f = run_steps(fused, xs, grads)
    for i in range(steps):
        assert out_f[i].dtype == dtype and out_f[i].shape == out_n[i].shape
        assert out_f[i].is_contiguous(memory_format=fmt), "output must keep the input's memory format"
        assert scaled_error(out_f[i], out_n[i]) <= tol, f"y step {i}: {scaled_error(out_f[i], out_n[i])}"
        assert scaled_error(dx_f[i], dx_n[i]) <= tol, f"dx step {i}: {scaled_error(dx_f[i], dx_n[i])}"
    for name, g in pg_n.items():
        # weight/BN gradients are sums over N*H*W terms: allow the fp32 summation-order noise of such sums
        assert scaled_error(pg_f[name], g) <= 4 * tol, f"d{name}: {scaled_error(pg_f[name], g)}"
    for (name, b_f), b_n in zip(fused.state_dict().items(), native.state_dict().values(), strict=False):
        assert scaled_error(b_f.float(), b_n.float()) <= tol, f"{name} after {steps} steps"


@pytest.mark.parametrize("k", R.KERNEL_SIZES)
@pytest.mark.parametrize("stride", R.STRIDES)
@pytest.mark.parametrize("dilation", R.DILATIONS)
@pytest.mark.parametrize("act", R.CONV_ACTS)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_reference_matches_native_fp32(k, stride, dilation, act, channels_last, training):
    native = make_native(6, k, stride, dilation, act)
    compare_layer(native, fused_copy(native, "reference"), (3, 6, 9, 7), torch.float32, channels_last, training)


@pytest.mark.parametrize("bn_kwargs", [dict(momentum=None), dict(affine=False), dict(eps=1e-3, momentum=0.01),
                                       dict(track_running_stats=False)],
                         ids=["momentum_none", "no_affine", "v3_eps_momentum", "no_running_stats"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_reference_batchnorm_options(bn_kwargs, training):
    native = make_native(5, 3, 1, 1, "relu6", **bn_kwargs)
    compare_layer(native, fused_copy(native, "reference"), (2, 5, 6, 5), torch.float32, False, training, steps=3)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_reference_low_precision_beats_native(dtype, channels_last, training):
    """Both against an fp64 truth: the reference's error is bounded by PyTorch's own error at that precision."""
    native = make_native(8, 3, 2, 1, "hardswish")
    truth = copy.deepcopy(native).double().train(training)
    fused = fused_copy(native, "reference").to(dtype).train(training)
    native_lp = copy.deepcopy(native).to(dtype).train(training)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(4, 8, 12, 11).to(dtype=dtype, memory_format=fmt)
    y_true = truth(x.double())
    err_ours = scaled_error(fused(x), y_true)
    err_native = scaled_error(native_lp(x), y_true)
    assert err_ours <= 2 * err_native + ROUNDING_TOL[dtype], (err_ours, err_native)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("act", R.CONV_ACTS)
def test_reference_gradcheck_fp64(training, act):
    x = torch.randn(2, 3, 6, 5, dtype=torch.float64, requires_grad=True)
    w = torch.randn(3, 1, 3, 3, dtype=torch.float64, requires_grad=True)
    gamma = torch.rand(3, dtype=torch.float64).add(0.5).requires_grad_()
    beta = torch.randn(3, dtype=torch.float64, requires_grad=True)
    rm, rv = torch.zeros(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64)

    def f(x, w, gamma, beta):
        return mnet_ext.functional.dwconv_bn_act(x, w, rm.clone(), rv.clone(), gamma, beta, training,
                                                 stride=2, act=act, backend="reference")

    assert torch.autograd.gradcheck(f, (x, w, gamma, beta), fast_mode=True)


@pytest.mark.parametrize("act,gate", [("relu", "hardsigmoid"), ("silu", "sigmoid"), ("relu", "sigmoid")])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_reference_squeeze_excite_matches_torchvision(act, gate, channels_last):
    acts = {"relu": nn.ReLU, "silu": nn.SiLU, "hardsigmoid": nn.Hardsigmoid, "sigmoid": nn.Sigmoid}
    native = SqueezeExcitation(12, 4, activation=acts[act], scale_activation=acts[gate])
    fused = mnet_ext.fuse(nn.Sequential(copy.deepcopy(native)), backend="reference")[0]
    assert isinstance(fused, mnet_ext.FusedSqueezeExcitation)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(3, 12, 5, 7).to(memory_format=fmt)
    g = torch.randn(3, 12, 5, 7)
    out_n, dx_n, pg_n = run_steps(native, [x], [g])
    out_f, dx_f, pg_f = run_steps(fused, [x], [g])
    assert out_f[0].is_contiguous(memory_format=fmt)
    assert scaled_error(out_f[0], out_n[0]) <= ROUNDING_TOL[torch.float32]
    assert scaled_error(dx_f[0], dx_n[0]) <= ROUNDING_TOL[torch.float32]
    for name, grad in pg_n.items():
        assert scaled_error(pg_f[name], grad) <= 4 * ROUNDING_TOL[torch.float32], name


def test_reference_squeeze_excite_gradcheck_fp64():
    args = [torch.randn(s, dtype=torch.float64, requires_grad=True) for s in ((2, 6, 4, 3), (3, 6), (3,), (6, 3), (6,))]
    for act, gate in (("relu", "hardsigmoid"), ("silu", "sigmoid")):
        assert torch.autograd.gradcheck(
            lambda *a, act=act, gate=gate: mnet_ext.functional.squeeze_excite(*a, act=act, gate=gate,
                                                                          backend="reference"), args,
            fast_mode=True)


@pytest.mark.parametrize("act", R.CONV_ACTS + R.SE_GATES)
def test_activation_derivatives_match_autograd(act):
    """act_bwd is PyTorch's own derivative, kinks included."""
    u = torch.tensor([-4.0, -3.0, -1.0, 0.0, 0.5, 3.0, 6.0, 7.0], requires_grad=True)
    modules = {"none": nn.Identity(), "relu": nn.ReLU(), "relu6": nn.ReLU6(), "hardswish": nn.Hardswish(),
               "silu": nn.SiLU(), "hardsigmoid": nn.Hardsigmoid(), "sigmoid": nn.Sigmoid()}
    y = modules[act](u)
    torch.testing.assert_close(R.act_fwd(u.detach(), act), y.detach())
    g = torch.linspace(0.5, 2.0, 8)
    (expected,) = torch.autograd.grad(y, u, g)
    torch.testing.assert_close(R.act_bwd(u.detach(), g, act), expected)
