"""GPU tests (marked ``cuda``; skipped with a reason without a GPU, run by scripts/gpu_run.sh).

Each GPU backend's primitives against the reference computed in fp64 on the GPU (so an fp32 output is held to the
fp32 tolerance: a TF32 or fp32 reference would itself err by up to ~1e-3), at real MobileNet sizes with data that
hides nothing: non-zero-mean inputs (cancellation in one-pass variances and sums shows), BatchNorm state unlike the
batch's (running mean off by up to a std, running var log-uniform around the batch's, gamma of either sign), fp32,
bf16 and fp16, both layouts, every kernel size, dilation 2 and every activation including ``none``. Then whole fused
models against native (eval, and a training step's logits, gradients and running statistics, each as close to an
fp64 truth as native's own), torch.compile, CUDA-graph capture of forward and backward, and training convergence.

TF32 is off in this file (fixture below): fp32 means fp32 for native layers too.

Time: scripts/gpu_run.sh gives all CUDA-marked tests a few minutes, and every distinct Triton configuration
(kernel size, stride, dilation, activation, dtype, layout, shape) costs compilations and autotuning. The default set
is therefore: all DW_CASES/SE_CASES on the ``cuda`` backend plus every unique MobileNet layer once (batch 8, dtype and
layout rotating), a subset of the cases on ``triton``, MobileNetV3-Small for the model tests and CUDA graphs on both
backends, torch.compile and convergence on ``cuda``. The rest (both backends x every layer x batch 1/32/256 x
fp32/bf16/fp16 x NCHW/NHWC, the other models, Triton under torch.compile and in training) is marked exhaustive.
"""

from __future__ import annotations

import copy
import itertools

import pytest
import torch
import torchvision
from torch import nn

import mnet_ext
from mnet_ext import reference as R
from mnet_ext._backend import load
from mnet_ext.layers import MODEL_BUILDERS, unique_layers
from tests.helpers import (
    ROUNDING_TOL,
    assert_close_scaled,
    assert_matches_fp64_reference,
    backend_param,
    scaled_error,
)

pytestmark = pytest.mark.cuda
BACKENDS = ("cuda", "triton")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
FORMATS = {"nchw": torch.contiguous_format, "nhwc": torch.channels_last}
FP32_TOL = ROUNDING_TOL[torch.float32]

# A pre-activation within KINK_GAP of a kink of the activation gets a zero output gradient: there the fp32 kernels
# and the fp64 reference may take different sides of the kink (a branch flip changes one dz by O(1), and among 10^7
# elements some u lie within fp32 noise, ~1e-5, of a kink by chance). The kinks themselves are probed exactly, on
# chosen inputs, in tests/test_kinks.py.
KINKS = {"none": (), "relu": (0.0,), "relu6": (0.0, 6.0), "hardswish": (-3.0, 3.0), "silu": ()}
KINK_GAP = 1e-3

# (shape, k, stride, dilation, act, dtype, layout) at real MobileNet sizes
DW_CASES = {
    "v2_first_b32_k3_relu6_bf16_nhwc": ((32, 32, 112, 112), 3, 1, 1, "relu6", "bf16", "nhwc"),
    "b32_k7_d2_none_fp32_nchw": ((32, 32, 112, 112), 7, 1, 2, "none", "fp32", "nchw"),
    "b32_k7_s2_d2_hardswish_fp16_nhwc": ((32, 32, 112, 112), 7, 2, 2, "hardswish", "fp16", "nhwc"),
    "b32_k5_s2_silu_fp16_nchw": ((32, 72, 56, 56), 5, 2, 1, "silu", "fp16", "nchw"),
    "b32_k3_s2_relu_fp32_nhwc": ((32, 144, 56, 56), 3, 2, 1, "relu", "fp32", "nhwc"),
    "b8_c37_odd_hw_k5_d2_relu6_bf16_nchw": ((8, 37, 57, 55), 5, 1, 2, "relu6", "bf16", "nchw"),
    "b256_v3l_k5_s2_relu_bf16_nhwc": ((256, 72, 56, 56), 5, 2, 1, "relu", "bf16", "nhwc"),
    "b1_c960_7x7_k5_hardswish_fp32_nhwc": ((1, 960, 7, 7), 5, 1, 1, "hardswish", "fp32", "nhwc"),
    # The CUDA forward's wide strips (csrc/dwconv_bn_act/tile.h: fwd_tile_width, 14 or 7 outputs) on the
    # 16-byte-vector path (C % V == 0, channels_last), where MobileNet widths (multiples of 7) leave no partial
    # strip: a partial last strip with the right padding inside it at K = 3, 5, 7 (strips of 14 + 5) and at stride 2
    # (strips of 7 + 3; fp32: vectors of 4), and dilation 2 (two column phases, strips of 14 holding 10 and 9).
    "b4_c24_w19_k3_relu6_bf16_nhwc": ((4, 24, 17, 19), 3, 1, 1, "relu6", "bf16", "nhwc"),
    "b4_c40_w19_k5_relu_fp16_nhwc": ((4, 40, 9, 19), 5, 1, 1, "relu", "fp16", "nhwc"),
    "b4_c16_w19_k7_silu_bf16_nhwc": ((4, 16, 9, 19), 7, 1, 1, "silu", "bf16", "nhwc"),
    "b4_c32_w19_k5_s2_hardswish_bf16_nhwc": ((4, 32, 17, 19), 5, 2, 1, "hardswish", "bf16", "nhwc"),
    "b4_c16_w19_k3_s2_silu_fp32_nhwc": ((4, 16, 13, 19), 3, 2, 1, "silu", "fp32", "nhwc"),
    "b4_c24_w19_k3_d2_none_fp16_nhwc": ((4, 24, 15, 19), 3, 1, 2, "none", "fp16", "nhwc"),
    # The staged band tiles of the channels_last 16-byte forward and stats (tile.h: band_tile_plan; R output rows
    # per tile, R = ceil(Ho / bands)): a partial last band (Ho 37 -> 13 + 13 + 11 rows; stride 2: 19 -> 7 + 7 + 5)
    # with partial last strips and padding at both ends of a row, C = 72 (9 vectors: 2 groups of 5 lanes, one idle
    # lane), odd lanes at stride 2 (C = 40), dilation 2 at stride 1 (kernel rows 2 staged rows apart) and stride 2
    # (row_step 2), K = 7 at stride 2 with a band shrunk to fit its shared memory (R 6), fp32 vectors of 4, and
    # C % 8 != 0 (the unstaged fallback); 4 lanes at K = 5 with 3 strips per row (the last partial), 2 lanes with
    # dilation 2 (4 strips over both column phases).
    "b2_c72_37x23_k3_relu_bf16_nhwc": ((2, 72, 37, 23), 3, 1, 1, "relu", "bf16", "nhwc"),
    "b2_c40_37x29_k3_s2_relu6_bf16_nhwc": ((2, 40, 37, 29), 3, 2, 1, "relu6", "bf16", "nhwc"),
    "b2_c64_31x33_k5_d2_hardswish_fp16_nhwc": ((2, 64, 31, 33), 5, 1, 2, "hardswish", "fp16", "nhwc"),
    "b2_c16_21x33_k3_s2_d2_none_bf16_nhwc": ((2, 16, 21, 33), 3, 2, 2, "none", "bf16", "nhwc"),
    "b8_c64_57x57_k7_s2_silu_bf16_nhwc": ((8, 64, 57, 57), 7, 2, 1, "silu", "bf16", "nhwc"),
    "b2_c40_23x23_k7_relu_fp16_nhwc": ((2, 40, 23, 23), 7, 1, 1, "relu", "fp16", "nhwc"),
    "b2_c20_37x23_k5_s2_relu_fp32_nhwc": ((2, 20, 37, 23), 5, 2, 1, "relu", "fp32", "nhwc"),
    "b2_c36_15x15_k3_relu6_bf16_nhwc": ((2, 36, 15, 15), 3, 1, 1, "relu6", "bf16", "nhwc"),
    "b2_c32_23x33_k5_relu_bf16_nhwc": ((2, 32, 23, 33), 5, 1, 1, "relu", "bf16", "nhwc"),
    "b2_c16_19x33_k3_d2_relu6_bf16_nhwc": ((2, 16, 19, 33), 3, 1, 2, "relu6", "bf16", "nhwc"),
    # Whole-row band tiles (tile.h: BandTilePlan::whole; stride 1, dilation 1, W = TW = 7 or 14: the kernels skip
    # the window's padding columns): K = 3 with 3 lanes, K = 5 on 14 x 14 in one band, K = 7 with fp32 vectors of
    # 4, and rows split into bands (H 37: padding rows differ per tile) at K = 5; dilation 2 on 7 x 7 is not whole.
    "b4_c24_7x7_k3_relu6_bf16_nhwc": ((4, 24, 7, 7), 3, 1, 1, "relu6", "bf16", "nhwc"),
    "b4_c40_14x14_k5_hardswish_fp16_nhwc": ((4, 40, 14, 14), 5, 1, 1, "hardswish", "fp16", "nhwc"),
    "b2_c16_7x7_k7_silu_fp32_nhwc": ((2, 16, 7, 7), 7, 1, 1, "silu", "fp32", "nhwc"),
    "b2_c32_37x7_k5_relu_bf16_nhwc": ((2, 32, 37, 7), 5, 1, 1, "relu", "bf16", "nhwc"),
    "b2_c32_7x7_k3_d2_none_bf16_nhwc": ((2, 32, 7, 7), 3, 1, 2, "none", "bf16", "nhwc"),
}
SE_CASES = {
    "b32_c72_28x28_bf16_nhwc": ((32, 72, 28, 28), "bf16", "nhwc"),
    "b32_c960_7x7_fp32_nchw": ((32, 960, 7, 7), "fp32", "nchw"),
    "b256_c16_56x56_fp16_nhwc": ((256, 16, 56, 56), "fp16", "nhwc"),
}
# Triton compiles per configuration: by default it gets the cases that between them cover fp32/bf16/fp16, both
# layouts, k = 7 with dilation 2, the none activation, odd C and H x W, and the batch-256 bf16 NHWC target.
TRITON_DEFAULT = ("b32_k7_d2_none_fp32_nchw", "b32_k7_s2_d2_hardswish_fp16_nhwc", "b256_v3l_k5_s2_relu_bf16_nhwc",
                  "b8_c37_odd_hw_k5_d2_relu6_bf16_nchw", "b32_c72_28x28_bf16_nhwc", "b32_c960_7x7_fp32_nchw")
LAYERS = list(unique_layers())
MODELS_DEFAULT = ("mobilenet_v3_small",)


@pytest.fixture(autouse=True)
def _no_tf32():
    """Native fp32 convolutions and matmuls may otherwise round their inputs to TF32 (10-bit mantissa)."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def _backends(exhaustive_only: tuple[str, ...] = ()) -> list:
    """pytest params for the GPU backends; those named in ``exhaustive_only`` run only in the exhaustive set."""
    params = [backend_param(b, "cuda") for b in BACKENDS]
    return [pytest.param(*p.values, marks=[*p.marks, pytest.mark.exhaustive], id=p.id) if p.id in exhaustive_only
            else p for p in params]


def _params(cases: dict) -> list:
    """pytest params (backend, case) for every GPU backend; Triton's cases outside TRITON_DEFAULT are exhaustive."""
    out = []
    for param in _backends():
        for name in cases:
            marks = list(param.marks)
            if param.id == "triton" and name not in TRITON_DEFAULT:
                marks.append(pytest.mark.exhaustive)
            out.append(pytest.param(param.values[0], name, marks=marks, id=f"{param.id}-{name}"))
    return out


# ------------------------------------------------------------------------------------------------
# primitives against the fp64 reference
# ------------------------------------------------------------------------------------------------
def dw_inputs(shape, k, stride, dilation, act, dtype, layout, device="cuda"):
    """x, weight, mean, invstd, gamma, beta, grad_y, mean_g, mean_g_xhat for every dwconv_bn_act primitive."""
    c = shape[1]
    fmt = FORMATS[layout]
    # Non-zero means, with filters of positive mean (as trained depthwise filters often are): |mean(z)| is ~6
    # standard deviations of z (measured for k = 3, 5, 7), so reductions run on data where cancellation costs bits.
    x = (torch.randn(shape, device=device) + 3).to(dtype=dtype, memory_format=fmt)
    weight = ((torch.randn(c, 1, k, k, device=device) + 1) / k).to(dtype)
    z = R._conv(x.double(), weight.double(), stride, dilation)
    var, mu = torch.var_mean(z, dim=(0, 2, 3), correction=0)
    std = var.sqrt()
    mean = (mu + 0.5 * std * torch.randn_like(std)).float()
    invstd = torch.rsqrt(var * torch.empty_like(var).uniform_(-1, 1).exp() + 1e-5).float()
    gamma = (torch.rand(c, device=device) + 0.5) * torch.randn(c, device=device).sign()
    beta = torch.randn(c, device=device) * 0.5
    u = (z - R._bcast(mean.double())) * R._bcast(invstd.double() * gamma.double()) + R._bcast(beta.double())
    near_kink = torch.zeros_like(u, dtype=torch.bool)
    for kink in KINKS[act]:
        near_kink |= (u - kink).abs() < KINK_GAP
    # Mean 1 (the sums over N*Ho*Wo are not mostly cancellation), scaled by 1/sqrt(N*Ho*Wo) so that the fp16 weight
    # gradient, a sum of N*Ho*Wo terms of mean ~3 (x) times ~1 (dz), stays far below fp16's largest value, 65504.
    scale = u[:, 0].numel() ** -0.5
    grad_y = ((torch.randn(u.shape, device=device) + 1) * scale).masked_fill(near_kink, 0).to(dtype=dtype,
                                                                                                memory_format=fmt)
    mean_g, mean_g_xhat = torch.randn(c, device=device) * 0.1, torch.randn(c, device=device) * 0.1
    return x, weight, mean, invstd, gamma, beta, grad_y, mean_g, mean_g_xhat


def check_dw_primitives(backend, shape, k, stride, dilation, act, dtype, layout, device="cuda"):
    impl = load(backend)
    x, weight, mean, invstd, gamma, beta, grad_y, mean_g, mean_g_xhat = dw_inputs(
        shape, k, stride, dilation, act, dtype, layout, device)
    fmt = FORMATS[layout]
    bn = (mean, invstd, gamma, beta)
    what = f"{backend} {tuple(shape)} k{k} s{stride} d{dilation} {act} {layout} {dtype}"
    calls = {
        "dwconv_bn_act_fwd": (x, weight, *bn, stride, dilation, act),
        "dwconv_bn_stats": (x, weight, stride, dilation),
        "dwconv_bn_act_bwd_reduce": (grad_y, x, weight, *bn, stride, dilation, act),
        "dwconv_bn_act_bwd_apply": (grad_y, x, weight, *bn, mean_g, mean_g_xhat, stride, dilation, act),
    }
    outputs = {name: getattr(impl, name)(*args) for name, args in calls.items()}
    y, (dx, dw) = outputs["dwconv_bn_act_fwd"], outputs["dwconv_bn_act_bwd_apply"]
    assert y.dtype == dtype and y.shape == grad_y.shape and y.is_contiguous(memory_format=fmt), what
    assert dx.dtype == dtype and dx.shape == x.shape and dx.is_contiguous(memory_format=fmt), what
    assert dw.dtype == dtype and dw.shape == weight.shape and dw.is_contiguous(), what
    for vectors in (outputs["dwconv_bn_stats"], outputs["dwconv_bn_act_bwd_reduce"]):
        assert all(v.dtype == torch.float32 and v.shape == (shape[1],) for v in vectors), what
    for name, args in calls.items():
        assert_matches_fp64_reference(name, outputs[name], args, what)


def check_se_primitives(backend, shape, dtype, layout, device="cuda"):
    impl = load(backend)
    fmt = FORMATS[layout]
    x = (torch.randn(shape, device=device) + 3).to(dtype=dtype, memory_format=fmt)  # non-zero mean for the sums
    grad_y = torch.randn(shape, device=device).to(dtype=dtype, memory_format=fmt)
    s = torch.rand(shape[:2], device=device)
    dpooled = torch.randn(shape[:2], device=device)
    what = f"{backend} {tuple(shape)} {layout} {dtype}"
    calls = {"se_pool": (x,), "se_scale": (x, s), "se_bwd_reduce": (grad_y, x), "se_bwd_apply": (grad_y, s, dpooled)}
    outputs = {name: getattr(impl, name)(*args) for name, args in calls.items()}
    for name in ("se_pool", "se_bwd_reduce"):
        assert outputs[name].dtype == torch.float32 and outputs[name].shape == shape[:2], what
    for name in ("se_scale", "se_bwd_apply"):
        assert outputs[name].dtype == dtype and outputs[name].is_contiguous(memory_format=fmt), what
    for name, args in calls.items():
        assert_matches_fp64_reference(name, outputs[name], args, what)


@pytest.mark.parametrize("backend,case", _params(DW_CASES))
def test_dwconv_primitives_real_sizes(backend, case):
    shape, k, stride, dilation, act, dtype, layout = DW_CASES[case]
    check_dw_primitives(backend, shape, k, stride, dilation, act, DTYPES[dtype], layout)


@pytest.mark.parametrize("backend,case", _params(SE_CASES))
def test_se_primitives_real_sizes(backend, case):
    shape, dtype, layout = SE_CASES[case]
    check_se_primitives(backend, shape, DTYPES[dtype], layout)


def _check_layer(backend, cfg, batch, dtype, layout):
    shape = (batch, cfg.channels, cfg.height, cfg.width)
    if cfg.kind == "dwconv_bn_act":
        check_dw_primitives(backend, shape, cfg.kernel_size, cfg.stride, cfg.dilation, cfg.act, DTYPES[dtype], layout)
    else:
        check_se_primitives(backend, shape, DTYPES[dtype], layout)


@pytest.mark.parametrize("backend", [backend_param("cuda", "cuda")])
@pytest.mark.parametrize("i,cfg", list(enumerate(LAYERS)), ids=[c.name for c in LAYERS])
def test_every_mobilenet_layer(backend, i, cfg):
    """Every unique layer once on the cuda backend (no per-configuration compilation), dtype and layout rotating."""
    _check_layer(backend, cfg, 8, ("fp32", "bf16", "fp16")[i % 3], ("nchw", "nhwc")[i % 2])


@pytest.mark.exhaustive
@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("cfg", LAYERS, ids=lambda c: c.name)
@pytest.mark.parametrize("batch,dtype,layout", list(itertools.product((1, 32, 256), DTYPES, FORMATS)))
def test_every_mobilenet_layer_exhaustive(backend, cfg, batch, dtype, layout):
    _check_layer(backend, cfg, batch, dtype, layout)


# ------------------------------------------------------------------------------------------------
# whole models against native, bounded by native's own error vs an fp64 truth
# ------------------------------------------------------------------------------------------------
def pretrained_like(model: nn.Module, x: torch.Tensor) -> nn.Module:
    """BatchNorm state like a trained network's: random gamma (either sign) and beta, running statistics taken from
    a batch (so eval activations keep their scale through the depth) then moved off it: mean by up to ~a std,
    var by a log-uniform factor in [1/2, 2]. Dropout off, so the fp64 truth can replay a training step exactly."""
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    with torch.no_grad():
        for m in bns:
            m.weight.copy_((torch.rand_like(m.weight) + 0.5) * torch.randn_like(m.weight).sign())
            m.bias.normal_(0, 0.3)
            m.reset_running_stats()
            m.momentum = None  # cumulative average: after one batch, that batch's statistics
        for m in model.modules():
            if isinstance(m, nn.Dropout):
                m.p = 0.0
        model.train()(x)
        for m in bns:
            m.momentum = 0.1
            std = m.running_var.sqrt()
            m.running_mean.add_(0.5 * std * torch.randn_like(std))
            m.running_var.mul_(torch.empty_like(std).uniform_(-0.7, 0.7).exp())
            m.num_batches_tracked.zero_()
    return model


def _running_stats(model: nn.Module) -> torch.Tensor:
    return torch.cat([t.double().flatten() for k, t in model.state_dict().items() if "running" in k])


def _rel(a: torch.Tensor, truth: torch.Tensor) -> float:
    """Relative error in norm: one measure for a whole tensor, where scaled_error's max would let one element
    at a kink decide."""
    return ((a.double() - truth).norm() / truth.norm()).item()


def check_model_against_native(native: nn.Module, backend: str, x: torch.Tensor) -> None:
    """Eval logits, then one training step (logits, every parameter gradient, running statistics): the fused
    model's error vs an fp64 truth within 3x native's own plus fp32 rounding (as tests/test_fuse.py bounds it)."""
    fused = mnet_ext.fuse(copy.deepcopy(native), backend=backend)
    truth = copy.deepcopy(native).double()
    models = ((fused, x), (native, x), (truth, x.double()))
    with torch.no_grad():
        y_f, y_n, y_t = (m.eval()(inp) for m, inp in models)
    err_f, err_n = scaled_error(y_f, y_t), scaled_error(y_n, y_t)
    assert err_f <= 3 * err_n + FP32_TOL, f"eval logits: error {err_f:.3g} vs native's {err_n:.3g}"

    logits = []
    for m, inp in models:
        m.train()
        out = m(inp)
        out.square().mean().backward()
        logits.append(out.detach())
    err_f, err_n = scaled_error(logits[0], logits[2]), scaled_error(logits[1], logits[2])
    assert err_f <= 3 * err_n + FP32_TOL, f"training logits: error {err_f:.3g} vs native's {err_n:.3g}"
    # Per parameter: a wrong depthwise or SE gradient is a negligible part of the whole gradient's norm. A gradient
    # that is zero in exact arithmetic (the bias of a BatchNorm feeding a training-mode BatchNorm through linear
    # layers; measured <= 1e-17 of the whole in fp64, vs >= 1e-4 for every other parameter of V3-Small) is fp32
    # noise in both models and is skipped.
    p_f, p_n, p_t = (dict(m.named_parameters()) for m in (fused, native, truth))
    assert list(p_f) == list(p_t), "the fused model's parameter names differ from native's"
    whole = torch.cat([p.grad.flatten() for p in p_t.values()]).norm()
    for name, p in p_t.items():
        if p.grad.norm() > 1e-9 * whole:
            err_f, err_n = _rel(p_f[name].grad, p.grad), _rel(p_n[name].grad, p.grad)
            assert err_f <= 3 * err_n + FP32_TOL, f"gradient of {name}: error {err_f:.3g} vs native's {err_n:.3g}"
    s_t = _running_stats(truth)
    err_f, err_n = _rel(_running_stats(fused), s_t), _rel(_running_stats(native), s_t)
    assert err_f <= 3 * err_n + FP32_TOL, f"running stats: relative error {err_f:.3g} vs native's {err_n:.3g}"
    for key, t in fused.state_dict().items():
        if t.dtype == torch.long:
            assert torch.equal(t, native.state_dict()[key]), key


def _gpu_model(name: str) -> tuple[nn.Module, torch.Tensor]:
    """Batch 16 at 128x128: the last BatchNorms see >= 256 values per channel (fewer make fp32 training
    ill-conditioned, see tests/test_fuse.py)."""
    torch.manual_seed(0)
    native = MODEL_BUILDERS[name](num_classes=10).cuda().to(memory_format=torch.channels_last)
    x = torch.randn(16, 3, 128, 128, device="cuda").to(memory_format=torch.channels_last)
    return pretrained_like(native, torch.randn_like(x)), x


@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("name", MODELS_DEFAULT)
def test_fused_model_on_gpu(backend, name):
    native, x = _gpu_model(name)
    check_model_against_native(native, backend, x)


@pytest.mark.exhaustive
@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("name", [m for m in MODEL_BUILDERS if m not in MODELS_DEFAULT])
def test_fused_model_on_gpu_exhaustive(backend, name):
    native, x = _gpu_model(name)
    check_model_against_native(native, backend, x)


@pytest.mark.parametrize("backend", _backends(exhaustive_only=("triton",)))  # Triton: compilations, see top
def test_compile_fullgraph_on_gpu(backend):
    model = mnet_ext.fuse(torchvision.models.mobilenet_v3_small(num_classes=10), backend=backend).cuda()
    compiled = torch.compile(model, fullgraph=True)
    x = torch.randn(4, 3, 64, 64, device="cuda")
    model.eval()
    with torch.no_grad():
        assert scaled_error(compiled(x), model(x)) <= 1e-4


# ------------------------------------------------------------------------------------------------
# CUDA graphs
# ------------------------------------------------------------------------------------------------
def _graph_block(backend: str) -> nn.Module:
    """MobileNetV3-Small's features[4]: native 1x1 conv + BN + hardswish, fused k5 s2 depthwise + BN + hardswish,
    fused SE, native 1x1 projection; training mode."""
    torch.manual_seed(0)
    block = torchvision.models.mobilenet_v3_small().features[4]
    fused = mnet_ext.fuse(block, backend=backend).cuda().train()
    kinds = {type(m) for m in fused.modules()}
    assert {mnet_ext.FusedConvBNAct, mnet_ext.FusedSqueezeExcitation} <= kinds, kinds
    return fused


@pytest.mark.parametrize("backend", _backends())
def test_cuda_graph_capture_forward_and_backward(backend):
    """Forward and backward of a fused block captured in one CUDA graph (no host sync, current stream, no
    allocation the graph cannot own) and replayed on new inputs: output, input gradient and every parameter
    gradient equal eager's on the same inputs (the replay recomputes; it does not return what was captured)."""
    block = _graph_block(backend)
    static_x = torch.randn(8, 24, 32, 32, device="cuda", requires_grad=True)
    static_gy = torch.randn(8, 40, 16, 16, device="cuda")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up outside the capture: autotuning, lazy initialisation
        for _ in range(3):
            block.zero_grad(set_to_none=True)
            block(static_x).backward(static_gy)
    torch.cuda.current_stream().wait_stream(side)
    eager = copy.deepcopy(block)
    block.zero_grad(set_to_none=True)  # backward inside the capture allocates the gradients from the graph's pool
    static_x.grad = None
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_y = block(static_x)
        static_y.backward(static_gy)

    names = [n for n, _ in block.named_parameters()]
    for replay in range(2):
        x, gy = torch.randn_like(static_x), torch.randn_like(static_gy)
        with torch.no_grad():
            static_x.copy_(x)
            static_gy.copy_(gy)
        graph.replay()
        torch.cuda.synchronize()
        replayed = {"y": static_y.detach().clone(), "dx": static_x.grad.clone()}
        replayed.update({n: p.grad.clone() for n, p in block.named_parameters()})

        eager.zero_grad(set_to_none=True)
        x_e = x.clone().requires_grad_()
        y_e = eager(x_e)
        y_e.backward(gy)
        expected = {"y": y_e.detach(), "dx": x_e.grad}
        expected.update({n: p.grad for n, p in eager.named_parameters()})
        assert list(expected) == ["y", "dx", *names]
        for key, value in expected.items():
            assert_close_scaled(replayed[key], value, torch.float32, f"replay {replay}: {key}")


# ------------------------------------------------------------------------------------------------
# training
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", _backends(exhaustive_only=("triton",)))  # Triton: compilations, see top
def test_training_converges_like_native_on_gpu(backend):
    """40 steps of MobileNetV3-Small, bf16 autocast, channels_last on the GPU: the first step's loss agrees with
    native's (identical weights and data; bf16 rounding through the network, while a wrong forward errs by O(1)),
    both learn, and the fused run's images/s and peak memory are printed beside native's (the benchmarks, not this
    test, judge speed). Tail losses are printed, not compared: the curves are chaotic (see the CPU test in
    tests/test_train.py: even native against itself differs by up to 7% in the tail mean)."""
    from mnet_ext import train as T

    cfg = dict(model="mobilenet_v3_small", width_mult=0.5, num_classes=10, resolution=64, synthetic_size=256,
               batch_size=32, steps=40, lr=0.2, label_smoothing=0.0, amp="bf16", channels_last=True, seed=0,
               device="cuda", progress=False)
    native = T.train(T.TrainConfig(**cfg, fused=False))
    fused = T.train(T.TrainConfig(**cfg, fused=True, backend=backend))
    tail_n, tail_f = (sum(r["loss_history"][-10:]) / 10 for r in (native, fused))
    print(f"{backend}: images/s fused {fused['images_per_sec']:.0f} native {native['images_per_sec']:.0f}; "
          f"peak MB fused {fused['peak_memory_bytes'] / 2**20:.0f} native {native['peak_memory_bytes'] / 2**20:.0f}")
    print(f"{backend}: tail mean loss fused {tail_f:.4f} native {tail_n:.4f}")
    assert fused["loss_history"][0] == pytest.approx(native["loss_history"][0], rel=2e-2)
    assert tail_f < fused["loss_history"][0] and tail_n < native["loss_history"][0]
