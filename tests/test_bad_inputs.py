"""Bad input gets a clear error naming the argument and what was expected."""

from __future__ import annotations

import pytest
import torch

import mnet_ext
from mnet_ext import functional as MF
from tests.helpers import backend_param

# Each case on the Python checks (backend reference) and on the C++ checks of the eager CPU call (backend cuda:
# mnet_ext.functional runs an eval layer with nothing for autograd to record as one C++ call; same messages).
BACKENDS = ["reference", backend_param("cuda")]


def _dw_args(**over):
    c = 4
    args = dict(x=torch.randn(2, c, 6, 6), weight=torch.randn(c, 1, 3, 3), running_mean=torch.zeros(c),
                running_var=torch.ones(c), bn_weight=torch.ones(c), bn_bias=torch.zeros(c), backend="reference")
    args.update(over)
    return args


@pytest.mark.parametrize("over,match", [
    (dict(x=torch.randn(4, 6, 6)), "x: expected a 4-D"),
    (dict(x=torch.randint(0, 3, (2, 4, 6, 6))), "x: expected dtype"),
    (dict(x=torch.randn(2, 4, 0, 6)), "x: expected a non-zero height and width"),  # an empty batch is fine
    (dict(x=torch.randn(2, 0, 6, 6)), "x: expected at least one channel"),
    (dict(weight=torch.randn(4, 2, 3, 3)), "weight: expected a depthwise filter"),  # groups != channels
    (dict(weight=torch.randn(8, 1, 3, 3)), "weight: expected a depthwise filter"),  # wrong channel count
    (dict(weight=torch.randn(4, 1, 4, 4)), r"weight: .*k in \(3, 5, 7\)"),
    (dict(weight=torch.randn(4, 1, 3, 3, dtype=torch.float64)), "weight: expected dtype torch.float32"),
    (dict(running_mean=torch.zeros(5)), r"running_mean: expected shape \(4,\)"),
    (dict(bn_weight=torch.ones(3)), r"bn_weight: expected shape \(4,\)"),
    (dict(running_mean=torch.zeros(4, device="meta")), "running_mean: expected device cpu"),
    (dict(stride=3), r"stride: expected one of \(1, 2\)"),
    (dict(dilation=3), r"dilation: expected one of \(1, 2\)"),
    (dict(act="gelu"), "act: expected one of"),
    (dict(training=True, x=torch.randn(1, 4, 1, 1)), "more than 1 value per channel"),
    (dict(running_mean=None, running_var=None), "running_mean/running_var: required when training=False"),
])
@pytest.mark.parametrize("backend", BACKENDS)
def test_dwconv_bn_act_bad_inputs(over, match, backend):
    with pytest.raises(ValueError, match=match):
        MF.dwconv_bn_act(**_dw_args(**over, backend=backend))


def test_dwconv_bn_act_not_a_tensor():
    with pytest.raises(TypeError, match="x: expected a torch.Tensor"):
        MF.dwconv_bn_act(**_dw_args(x=[1.0, 2.0]))


def _se_args(**over):
    args = dict(x=torch.randn(2, 8, 4, 4), fc1_weight=torch.randn(2, 8, 1, 1), fc1_bias=torch.randn(2),
                fc2_weight=torch.randn(8, 2, 1, 1), fc2_bias=torch.randn(8), backend="reference")
    args.update(over)
    return args


@pytest.mark.parametrize("over,match", [
    (dict(fc1_weight=torch.randn(2, 6)), r"fc1_weight: expected shape \[S, 8\]"),
    (dict(fc2_weight=torch.randn(8, 3)), r"fc2_weight: expected shape \[8, 2\]"),
    (dict(fc1_bias=torch.randn(3)), r"fc1_bias: expected shape \[2\]"),
    (dict(fc2_bias=torch.randn(7)), r"fc2_bias: expected shape \[8\]"),
    (dict(fc2_bias=torch.randn(8, device="meta")), "fc2_bias: expected device cpu"),
    (dict(act="hardswish"), "act: expected one of"),
    (dict(gate="relu"), "gate: expected one of"),
    (dict(x=torch.randn(2, 0, 4, 4)), "x: expected at least one channel"),  # empty batches: see test_parity.py
])
@pytest.mark.parametrize("backend", BACKENDS)
def test_squeeze_excite_bad_inputs(over, match, backend):
    with pytest.raises(ValueError, match=match):
        MF.squeeze_excite(**_se_args(**over, backend=backend))


def test_unknown_backend_names_the_argument():
    with pytest.raises(ValueError, match="backend: expected"):
        mnet_ext.fuse(mnet_ext.models.mobilenet_v1(0.25), backend="cudnn")
    with pytest.raises(ValueError, match=r"use_backend\(name\): expected"):
        with mnet_ext.use_backend("fast"):
            pass


def test_non_depthwise_conv_is_not_fused_and_says_why():
    from torch import nn
    from torchvision.ops.misc import Conv2dNormActivation

    model = nn.Sequential(Conv2dNormActivation(8, 8, 3, groups=4), Conv2dNormActivation(8, 8, 3, groups=8))
    report = mnet_ext.explain_fuse(model)
    assert [e.name for e in report.fused] == ["1"]  # grouped (non-depthwise) convs are not candidates


def test_fused_bn_state_cannot_be_called_alone():
    model = mnet_ext.fuse(mnet_ext.models.mobilenet_v1(0.25))
    with pytest.raises(RuntimeError, match="holds a fused layer's BatchNorm tensors"):
        model.features[1].block[0].bn(torch.randn(1, 8, 4, 4))
