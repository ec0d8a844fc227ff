"""Drop-in parity with native modules on edge inputs: empty batches, non-contiguous weights, float64 under
autocast, and which modules ``fuse`` may swap (only those whose code is torchvision's/PyTorch's own)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torchvision.ops import SqueezeExcitation
from torchvision.ops.misc import Conv2dNormActivation

import mnet_ext
from mnet_ext import functional as MF
from tests.helpers import ROUNDING_TOL, backend_param, scaled_error
from tests.test_reference import compare_layer, fused_copy, make_native

BACKENDS = [backend_param("reference"), backend_param("cuda"), backend_param("triton")]
LAYOUTS = {"nchw": torch.contiguous_format, "nhwc": torch.channels_last}


def _forward_backward(module: nn.Module, x: torch.Tensor):
    """y and every gradient of one forward + backward (the upstream gradient is all ones)."""
    module.zero_grad(set_to_none=True)
    x = x.detach().requires_grad_()
    y = module(x)
    y.backward(torch.ones_like(y))
    return y, x.grad, {n: p.grad for n, p in module.named_parameters()}


def _assert_same_results(fused: nn.Module, native: nn.Module, x: torch.Tensor) -> None:
    """Same shapes, dtypes and strides (the memory format of an empty tensor is in its strides), and the same values
    (NaN where native has NaN) for y, dx, every parameter gradient and every buffer."""
    y_f, dx_f, pg_f = _forward_backward(fused, x)
    y_n, dx_n, pg_n = _forward_backward(native, x)
    for what, a, b in (("y", y_f, y_n), ("dx", dx_f, dx_n)):
        assert (a.shape, a.dtype, a.stride()) == (b.shape, b.dtype, b.stride()), what
    for name, g in pg_n.items():
        assert pg_f[name] is not None and scaled_error(pg_f[name], g) == 0, f"d{name}: {pg_f[name]} vs {g}"
    for (name, b_f), b_n in zip(fused.state_dict().items(), native.state_dict().values(), strict=True):
        assert scaled_error(b_f, b_n) == 0, name


# ------------------------------------------------------------------------------------------------ empty batch
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_empty_batch_dwconv_bn_act_like_native(backend, stride, layout, training):
    """Native gives an empty result (x's strides when the shape is kept, NCHW strides otherwise), zero gradients for
    the weight and the affine parameters, and in training counts the batch without touching the running statistics
    (measured on torch 2.14)."""
    native = make_native(4, 3, stride, 1, "hardswish").train(training)
    fused = fused_copy(native, backend).train(training)
    _assert_same_results(fused, native, torch.randn(0, 4, 7, 7).contiguous(memory_format=LAYOUTS[layout]))
    assert int(fused.bn.num_batches_tracked) == int(training)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", [(0, 8, 4, 4), (2, 8, 0, 4)], ids=["no_images", "no_pixels"])
def test_empty_squeeze_excite_like_native(backend, layout, shape):
    """An empty batch gives an empty result and zero FC gradients; images without pixels pool to NaN (the mean of
    nothing), so native's FC gradients are NaN: ours too."""
    native = SqueezeExcitation(8, 2, scale_activation=nn.Hardsigmoid)
    fused = mnet_ext.fuse(nn.Sequential(copy.deepcopy(native)), backend=backend)[0]
    assert isinstance(fused, mnet_ext.FusedSqueezeExcitation)
    _assert_same_results(fused, native, torch.randn(shape).contiguous(memory_format=LAYOUTS[layout]))


@pytest.mark.parametrize("layout", LAYOUTS)
def test_empty_batch_ops_trace_like_eager(layout):
    """The fake kernels give an empty batch the strides the eager ops give it (torch.compile checks them)."""
    x = torch.randn(0, 6, 7, 7).contiguous(memory_format=LAYOUTS[layout])
    w, one, zero = torch.randn(6, 1, 3, 3, requires_grad=True), torch.ones(6), torch.zeros(6)
    ops = torch.ops.mnet_ext
    for stride in (1, 2):
        torch.library.opcheck(ops.dwconv_bn_act, (x, w, zero, one, one, zero, stride, 1, "relu", "cuda"))
        torch.library.opcheck(ops.dwconv_bn_act_train, (x, w, one, zero, 1e-5, stride, 1, "relu", "cuda"))
    se = (torch.randn(2, 6), torch.randn(2), torch.randn(6, 2), torch.randn(6), "relu", "hardsigmoid", "cuda")
    torch.library.opcheck(ops.squeeze_excite, (x, *se))


def test_empty_batch_needs_no_values_per_channel():
    """Training BatchNorm refuses one value per channel but takes none (an empty batch), as native does."""
    args = dict(weight=torch.randn(4, 1, 3, 3), running_mean=torch.zeros(4), running_var=torch.ones(4),
                training=True, stride=2)
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        MF.dwconv_bn_act(torch.randn(1, 4, 2, 2), **args)  # stride 2: one output value per channel
    assert MF.dwconv_bn_act(torch.randn(0, 4, 2, 2), **args).shape == (0, 4, 1, 1)
    assert torch.equal(args["running_mean"], torch.zeros(4)) and torch.equal(args["running_var"], torch.ones(4))


# ------------------------------------------------------------------------------------ non-contiguous weights
def _noncontiguous(w: torch.Tensor, kind: str) -> nn.Parameter:
    if kind == "transposed":  # dense, k x k taps transposed
        return nn.Parameter(w.transpose(2, 3).contiguous().transpose(2, 3))
    wide = torch.zeros(*w.shape[:3], 2 * w.shape[3])  # every other column of a wider tensor: not dense
    wide[..., ::2] = w
    return nn.Parameter(wide[..., ::2])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["transposed", "sliced"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_noncontiguous_weight_like_native(backend, kind, training):
    """Native convolutions take a weight of any strides; so does every backend, and dW keeps the weight's shape."""
    native = make_native(6, 3, 1, 1, "relu6")
    fused = fused_copy(native, backend)
    for conv in (native[0], fused.conv):
        conv.weight = _noncontiguous(conv.weight.detach(), kind)
        assert not conv.weight.is_contiguous()
    compare_layer(native, fused, (2, 6, 7, 5), torch.float32, False, training)
    assert fused.conv.weight.grad.shape == fused.conv.weight.shape
    assert fused.conv.weight.grad.stride() == native[0].weight.grad.stride()


@pytest.mark.parametrize("backend", BACKENDS)
def test_noncontiguous_weight_view_gets_its_gradient(backend):
    """A weight that is a strided view of a bigger tensor: the gradient reaches it where native's does."""
    wide = torch.randn(4, 1, 3, 6, requires_grad=True)
    x, grad = torch.randn(2, 4, 6, 6), torch.randn(2, 4, 6, 6)
    MF.dwconv_bn_act(x, wide[..., ::2], torch.zeros(4), torch.ones(4), act="relu", backend=backend).backward(grad)
    ours, wide.grad = wide.grad, None
    native = nn.functional.conv2d(x, wide[..., ::2], padding=1, groups=4)
    nn.functional.relu(nn.functional.batch_norm(native, torch.zeros(4), torch.ones(4))).backward(grad)
    assert scaled_error(ours, wide.grad) <= 4 * ROUNDING_TOL[torch.float32]  # sums over N*H*W terms
    assert not ours[..., 1::2].any()


# ---------------------------------------------------------------------------------------------------- autocast
@pytest.mark.filterwarnings("ignore:mnet_ext.*no float64 kernels")  # float64 runs on the reference
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_autocast_keeps_float64_like_native(backend, training):
    """Autocast never casts float64 tensors: a float64 layer stays float64 (native keeps it too)."""
    native = make_native(6, 3, 2, 1, "hardswish").double().train(training)
    fused = fused_copy(native, backend).train(training)
    x = torch.randn(2, 6, 9, 8, dtype=torch.float64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y_f, y_n = fused(x), native(x)
    assert y_f.dtype == y_n.dtype == torch.float64
    assert scaled_error(y_f, y_n) <= ROUNDING_TOL[torch.float64]


@pytest.mark.filterwarnings("ignore:mnet_ext.*no float64 kernels")
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16],
                         ids=["fp64", "fp32", "fp16", "bf16"])
def test_autocast_squeeze_excite_dtype_like_native(backend, dtype):
    """Native SE multiplies x by a gate computed in the autocast dtype (never for float64): the result has the
    promoted dtype (float32 for float16 x under bfloat16 autocast). Values: at least as close to a float64 truth as
    native's."""
    native = SqueezeExcitation(8, 4, scale_activation=nn.Hardsigmoid).to(dtype if dtype == torch.float64 else
                                                                          torch.float32)
    fused = mnet_ext.fuse(nn.Sequential(copy.deepcopy(native)), backend=backend)[0]
    truth = copy.deepcopy(native).double()
    x = torch.randn(2, 8, 5, 5).to(dtype)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y_f, y_n = fused(x), native(x)
    assert y_f.dtype == y_n.dtype
    y_t = truth(x.double())
    assert scaled_error(y_f, y_t) <= 2 * scaled_error(y_n, y_t) + ROUNDING_TOL[y_f.dtype]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_autocast_dwconv_bn_act_casts_low_precision_like_native(dtype):
    """Eligible floating inputs of any low precision are cast to the autocast dtype, as native does."""
    native = make_native(6, 3, 1, 1, "relu").eval()
    fused = fused_copy(native, None)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        x = torch.randn(2, 6, 8, 8).to(dtype)
        assert fused(x).dtype == native(x).dtype == torch.bfloat16


# ------------------------------------------------------------------------------- what fuse may swap, and why not
class _DoubledSE(SqueezeExcitation):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 2 * super().forward(x)


class _SquaredGateSE(SqueezeExcitation):
    def _scale(self, x: torch.Tensor) -> torch.Tensor:
        return super()._scale(x) ** 2


class _ResidualLookAlikeSE(nn.Module):
    """torchvision's attributes, another forward."""

    def __init__(self, c: int, s: int) -> None:
        super().__init__()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc1, self.fc2 = nn.Conv2d(c, s, 1), nn.Conv2d(s, c, 1)
        self.activation, self.scale_activation = nn.ReLU(), nn.Hardsigmoid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.scale_activation(self.fc2(self.activation(self.fc1(self.avgpool(x)))))
        return x + x * s


class _PlainSubclassSE(SqueezeExcitation):
    """Overrides nothing: torchvision's forward runs, so it is fused."""


class _ResidualConvBNAct(Conv2dNormActivation):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + super().forward(x)


class _StandardisedConv(nn.Conv2d):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        return self._conv_forward(x, (w - w.mean((1, 2, 3), keepdim=True)) / w.std((1, 2, 3), keepdim=True), None)


class _ClampAt5(nn.ReLU6):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.clamp(0, 5)


def _dw_block(container: type = Conv2dNormActivation, act: type = nn.Hardswish, conv: type | None = None) -> nn.Module:
    block = container(8, 8, 3, groups=8, activation_layer=act)
    if conv is not None:
        block[0] = conv(8, 8, 3, padding=1, groups=8, bias=False)
    return block


def _with_pre_hook(module: nn.Module, child: str = "") -> nn.Module:
    """``module`` with a forward pre-hook (which does nothing here; weight_norm's recomputes the weight) on itself or
    on ``child``."""
    module.get_submodule(child).register_forward_pre_hook(lambda m, args: None)
    return module


LEFT_NATIVE = {
    "doubled_se": (lambda: _DoubledSE(8, 4), "_DoubledSE overrides forward"),
    "squared_gate_se": (lambda: _SquaredGateSE(8, 4), "_SquaredGateSE overrides _scale"),
    "lookalike_se": (lambda: _ResidualLookAlikeSE(8, 4), "_ResidualLookAlikeSE is not torchvision's"),
    "hooked_se": (lambda: _with_pre_hook(SqueezeExcitation(8, 4), "fc1"), "fc1 has forward/backward hooks"),
    "residual_block": (lambda: _dw_block(container=_ResidualConvBNAct), "_ResidualConvBNAct overrides forward"),
    "standardised_conv": (lambda: _dw_block(conv=_StandardisedConv), "_StandardisedConv overrides forward"),
    "clamped_act": (lambda: _dw_block(act=_ClampAt5), "activation _ClampAt5 unsupported"),
    "hooked_block": (lambda: _with_pre_hook(_dw_block()), "container has forward/backward hooks"),
    "hooked_conv": (lambda: _with_pre_hook(_dw_block(), "0"), "conv has forward/backward hooks"),
}


@pytest.mark.parametrize("case", LEFT_NATIVE)
def test_lookalikes_are_left_native_and_explained(case):
    """A module whose code (its class's forward, or a hook) differs from what the fused op computes is never
    swapped: explain_fuse reports it as left native with the reason, and the model computes what it did."""
    build, reason = LEFT_NATIVE[case]
    torch.manual_seed(0)
    model = nn.Sequential(build())
    x = torch.randn(2, 8, 6, 6)
    expected = model(x)
    report = mnet_ext.explain_fuse(model)
    assert len(report.entries) == 1 and not report.entries[0].fused, str(report)
    assert reason in report.entries[0].detail, str(report)
    fused = mnet_ext.fuse(model)
    assert not any(isinstance(m, (mnet_ext.FusedConvBNAct, mnet_ext.FusedSqueezeExcitation)) for m in fused.modules())
    assert torch.equal(fused(x), expected)


@pytest.mark.parametrize("build", [lambda: SqueezeExcitation(8, 4), lambda: _PlainSubclassSE(8, 4), _dw_block,
                                   lambda: _dw_block(act=nn.ReLU6)],
                         ids=["torchvision_se", "plain_subclass_se", "conv_bn_act", "conv_bn_relu6"])
def test_native_code_is_still_fused(build):
    model = nn.Sequential(build()).eval()
    report = mnet_ext.explain_fuse(model)
    assert [e.fused for e in report.entries] == [True], str(report)
    x = torch.randn(2, 8, 6, 6)
    expected = model(x)
    assert scaled_error(mnet_ext.fuse(model, backend="reference")(x), expected) <= ROUNDING_TOL[torch.float32]
