"""dwconv_bn_act: every backend's primitives against the reference; the torch ops (opcheck, autograd, compile)."""

from __future__ import annotations

import copy
import itertools
import types

import pytest
import torch

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
from tests.test_reference import compare_layer, fused_copy, make_native

CPU_BACKENDS = [backend_param("cuda"), backend_param("triton")]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _configs(exhaustive: bool):
    """(k, stride, dilation, act, layout, dtype). The default set covers every k/stride/dilation/layout pair with
    activations and dtypes rotating through them independently (each layout meets every dtype and every activation),
    plus every activation in every dtype, the layouts alternating; the exhaustive set is the full product."""
    if exhaustive:
        yield from itertools.product(R.KERNEL_SIZES, R.STRIDES, R.DILATIONS, R.CONV_ACTS, ("nchw", "nhwc"), DTYPES)
        return
    dtypes, configs = tuple(DTYPES), []
    for i, (k, s, d, layout) in enumerate(itertools.product(R.KERNEL_SIZES, R.STRIDES, R.DILATIONS, ("nchw", "nhwc"))):
        # the layout is i % 2: a dtype index of i % 2 would tie dtype to layout; i // 2 + i % 2 does not
        configs.append((k, s, d, R.CONV_ACTS[i % len(R.CONV_ACTS)], layout, dtypes[(i // 2 + i % 2) % len(dtypes)]))
    for i, (act, dtype) in enumerate(itertools.product(R.CONV_ACTS, dtypes)):
        configs.append((3, 1, 1, act, ("nhwc", "nchw")[i % 2], dtype))
    yield from dict.fromkeys(configs)  # without the repeats


def make_inputs(shape, k, dtype, layout, device="cpu", stride=1, dilation=1):
    """Random inputs for every primitive: x, weight, per-channel stats/affine, grad_y and the mean terms."""
    n, c, h, w = shape
    fmt = torch.channels_last if layout == "nhwc" else torch.contiguous_format
    # mean 1, as activations after a ReLU have: the batch mean of zero-mean data is all cancellation, under whose
    # rounding noise a small relative error in a backend's mean would hide
    x = (torch.randn(shape, device=device) + 1).to(dtype=dtype, memory_format=fmt)
    weight = (torch.randn(c, 1, k, k, device=device) / k).to(dtype)
    z = R._conv(x, weight, stride, dilation)
    mean = z.mean(dim=(0, 2, 3)) + 0.1 * torch.randn(c, device=device)  # near, not at, the batch statistics
    invstd = torch.rsqrt(z.var(dim=(0, 2, 3)) + 0.1)
    gamma = torch.rand(c, device=device) + 0.5
    beta = torch.randn(c, device=device) * 0.5
    grad_y = torch.randn(z.shape, device=device).to(dtype=dtype, memory_format=fmt)
    mean_g, mean_g_xhat = torch.randn(c, device=device) * 0.1, torch.randn(c, device=device) * 0.1
    return x, weight, mean, invstd, gamma, beta, grad_y, mean_g, mean_g_xhat


def check_primitives(backend: str | types.SimpleNamespace, shape, k, stride, dilation, act, layout, dtype,
                     device="cpu") -> None:
    """``backend``'s primitives against the reference; ``backend`` is a registry name or an object with the
    primitives and a ``__name__`` as attributes (the mutants of tests/test_mutation.py)."""
    impl = load(backend) if isinstance(backend, str) else backend
    x, weight, mean, invstd, gamma, beta, grad_y, mean_g, mean_g_xhat = make_inputs(
        shape, k, dtype, layout, device, stride, dilation)
    fmt = torch.channels_last if layout == "nhwc" else torch.contiguous_format
    bn = (mean, invstd, gamma, beta)
    label = backend if isinstance(backend, str) else backend.__name__
    what = f"{label} k{k} s{stride} d{dilation} {act} {layout} {dtype}"

    y, y_ref = (m.dwconv_bn_act_fwd(x, weight, *bn, stride, dilation, act) for m in (impl, R))
    assert y.dtype == dtype and y.shape == y_ref.shape and y.is_contiguous(memory_format=fmt), what
    assert_close_scaled(y, y_ref, dtype, f"fwd {what}")

    z = R._conv(x, weight, stride, dilation)
    mean_ref, var_ref = R.dwconv_bn_stats(x, weight, stride, dilation)
    magnitudes = (z.abs().mean(dim=(0, 2, 3)), var_ref)  # mean|z|; the terms (z - mean)^2 are >= 0
    for got, ref, mag, name in zip(impl.dwconv_bn_stats(x, weight, stride, dilation), (mean_ref, var_ref),
                                   magnitudes, ("mean", "var"), strict=True):
        assert got.dtype == torch.float32 and got.shape == (shape[1],), what
        assert_sums_close(got, ref, mag, f"stats {name} {what}")

    args = (grad_y, x, weight, *bn, stride, dilation, act)
    g, xhat = R._grad_u(*args)
    magnitudes = (g.abs().sum(dim=(0, 2, 3)), (g * xhat).abs().sum(dim=(0, 2, 3)))
    for got, ref, mag, name in zip(impl.dwconv_bn_act_bwd_reduce(*args), R.dwconv_bn_act_bwd_reduce(*args),
                                   magnitudes, ("sum_g", "sum_g_xhat"), strict=True):
        assert got.dtype == torch.float32, what
        assert_sums_close(got, ref, mag, f"bwd_reduce {name} {what}")

    args = (grad_y, x, weight, *bn, mean_g, mean_g_xhat, stride, dilation, act)
    (dx, dw), (dx_ref, dw_ref) = impl.dwconv_bn_act_bwd_apply(*args), R.dwconv_bn_act_bwd_apply(*args)
    assert dx.dtype == dtype and dx.shape == x.shape and dx.is_contiguous(memory_format=fmt), what
    assert dw.dtype == dtype and dw.shape == weight.shape and dw.is_contiguous(), what
    assert_close_scaled(dx, dx_ref, dtype, f"dx {what}")
    assert_close_scaled(dw, dw_ref, dtype, f"dweight {what}")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("k,stride,dilation,act,layout,dtype", list(_configs(False)))
def test_primitives_match_reference(backend, k, stride, dilation, act, layout, dtype):
    check_primitives(backend, (2, 5, 7, 6), k, stride, dilation, act, layout, DTYPES[dtype])


def test_default_grid_crosses_dtype_with_layout_and_activation():
    """Every dtype runs in both layouts and with every activation (once NCHW was always fp32, NHWC always bf16)."""
    configs = list(_configs(False))
    assert {(layout, dtype) for *_, layout, dtype in configs} == set(itertools.product(("nchw", "nhwc"), DTYPES))
    assert {(act, dtype) for _, _, _, act, _, dtype in configs} == set(itertools.product(R.CONV_ACTS, DTYPES))
    assert {(act, layout) for _, _, _, act, layout, _ in configs} == set(itertools.product(R.CONV_ACTS,
                                                                                          ("nchw", "nhwc")))


@pytest.mark.exhaustive
@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("k,stride,dilation,act,layout,dtype", list(_configs(True)))
def test_primitives_match_reference_exhaustive(backend, k, stride, dilation, act, layout, dtype):
    check_primitives(backend, (2, 5, 7, 6), k, stride, dilation, act, layout, DTYPES[dtype])


# Many channels: C = 72 (a multiple of 8 but not of Triton's 64/32-channel blocks: five 16-channel blocks) and
# C = 100 (not a multiple of 8: a partial channel block, vector width 4, the host twin's SIMD tail); every layout
# and dtype once. Small H, W keep the Triton interpreter fast.
WIDE_CONFIGS = [
    ((2, 72, 5, 4), 3, 1, 1, "relu6", "nhwc", "bf16"),
    ((2, 72, 5, 4), 5, 2, 1, "hardswish", "nchw", "fp16"),
    ((2, 72, 5, 4), 3, 2, 2, "silu", "nhwc", "fp32"),
    ((1, 100, 4, 5), 3, 1, 2, "relu", "nchw", "bf16"),
    ((1, 100, 4, 5), 5, 1, 1, "none", "nhwc", "fp16"),
    ((1, 100, 4, 5), 3, 2, 1, "hardswish", "nchw", "fp32"),
]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("shape,k,stride,dilation,act,layout,dtype", WIDE_CONFIGS,
                         ids=["-".join(map(str, (c[0][1], *c[1:]))) for c in WIDE_CONFIGS])
def test_primitives_many_channels(backend, shape, k, stride, dilation, act, layout, dtype):
    check_primitives(backend, shape, k, stride, dilation, act, layout, DTYPES[dtype])


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("shape", [(1, 3, 5, 5), (3, 17, 9, 11), (2, 8, 1, 1), (1, 1, 4, 3)],
                         ids=["n1", "odd_c_h_w", "1x1_spatial", "one_channel"])
def test_primitives_edge_shapes(backend, shape):
    for layout in ("nchw", "nhwc"):
        check_primitives(backend, shape, 3, 2, 1, "hardswish", layout, torch.float32)


@pytest.mark.parametrize("backend", [backend_param("reference"), *CPU_BACKENDS])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_module_matches_native(backend, training):
    """The whole module (ops, autograd, running-stat update) on each backend against nn modules."""
    native = make_native(6, 5, 2, 1, "hardswish", momentum=None)
    compare_layer(native, fused_copy(native, backend), (2, 6, 9, 8), torch.float32, True, training, steps=2)


def _op_args(backend: str, training: bool):
    x, weight, mean, invstd, gamma, beta, *_ = make_inputs((2, 4, 6, 5), 3, torch.float32, "nhwc")
    x.requires_grad_()
    weight.requires_grad_()
    gamma.requires_grad_()
    beta.requires_grad_()
    if training:
        return torch.ops.mnet_ext.dwconv_bn_act_train.default, (x, weight, gamma, beta, 1e-5, 2, 1, "relu6", backend)
    return torch.ops.mnet_ext.dwconv_bn_act.default, (x, weight, mean, invstd, gamma, beta, 2, 1, "relu6", backend)


@pytest.mark.parametrize("backend", [backend_param("reference"), *CPU_BACKENDS])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_opcheck(backend, training):
    op, args = _op_args(backend, training)
    torch.library.opcheck(op, args)


def test_opcheck_backward_op():
    x, weight, mean, invstd, gamma, beta, grad_y, *_ = make_inputs((2, 4, 6, 5), 3, torch.float32, "nchw")
    args = (grad_y, x, weight, mean, invstd, gamma, beta, 1, 1, "silu", True, "reference")
    torch.library.opcheck(torch.ops.mnet_ext.dwconv_bn_act_backward.default, args)


@pytest.mark.parametrize("backend", [backend_param("reference"), *CPU_BACKENDS])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_func_grad_matches_autograd(backend, training, monkeypatch):
    """torch.func.grad through a fused layer: autograd's gradients. (Training without running statistics: their
    in-place update inside a transform is refused by torch as a mutation of a captured tensor; NOTES.md.)"""
    import mnet_ext.functional as MF

    x, weight, mean, _, gamma, beta, *_ = make_inputs((2, 5, 7, 6), 3, torch.float32, "nhwc")
    running = (None, None) if training else (mean, torch.rand(5) + 0.5)

    def loss(x, weight, gamma, beta):
        y = MF.dwconv_bn_act(x, weight, *running, gamma, beta, training, 0.1, 1e-5, 2, 1, "hardswish", backend)
        return (y * y).sum()

    check_func_grad(backend, loss, (x, weight, gamma, beta), monkeypatch)


@pytest.mark.slow
def test_compile_fullgraph_matches_eager():
    """A fused layer trains under torch.compile(fullgraph=True) with no graph break, like eager."""
    native = make_native(8, 3, 1, 1, "relu6")
    eager, compiled_module = fused_copy(native, None), fused_copy(native, None)
    compiled = torch.compile(compiled_module, fullgraph=True)
    x = torch.randn(2, 8, 6, 6)
    for module in (eager, compiled):
        module.train()
    y_e, y_c = eager(x), compiled(x)
    y_e.sum().backward()
    y_c.sum().backward()
    assert_close_scaled(y_c, y_e, torch.float32, "compiled forward")
    assert_close_scaled(compiled_module.conv.weight.grad, eager.conv.weight.grad, torch.float32, "compiled dW")
    torch.testing.assert_close(compiled_module.bn.running_mean, eager.bn.running_mean)
    assert int(compiled_module.bn.num_batches_tracked) == 1


def test_float64_matches_native():
    """float64 (for gradcheck) runs on the reference whatever the backend; it matches native to fp64 precision."""
    native = make_native(3, 3, 1, 1, "relu").double().eval()
    fused = fused_copy(native, None).eval()
    x = torch.randn(1, 3, 4, 4, dtype=torch.float64)
    y = fused(x)
    assert y.dtype == torch.float64
    assert_close_scaled(y, native(x), torch.float64, "fp64 eval")


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_autocast_like_native(training):
    """Under autocast the fused layer casts like a native conv (bf16 output) and is at least as accurate."""
    native = make_native(8, 3, 1, 1, "hardswish").train(training)
    fused = fused_copy(native, None).train(training)
    truth = copy.deepcopy(native).double().train(training)
    x = torch.randn(2, 8, 10, 10)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y_f, y_n = fused(x), native(x)
    assert y_f.dtype == y_n.dtype == torch.bfloat16
    y_t = truth(x.double())
    assert scaled_error(y_f, y_t) <= 2 * scaled_error(y_n, y_t) + ROUNDING_TOL[torch.bfloat16]


def test_gradient_checkpointing_counts_the_batch_once():
    """Under torch.utils.checkpoint the forward is recomputed during backward. Native BatchNorm then updates its
    running statistics twice; the fused layer skips the update on recomputation, so a checkpointed step leaves the
    same statistics as a plain one (and the same gradients)."""
    from torch.utils.checkpoint import checkpoint

    native = make_native(6, 3, 1, 1, "relu6")
    fused, native_ckpt = fused_copy(native, None), copy.deepcopy(native)
    x = torch.randn(2, 6, 8, 8)
    for module, ckpt in ((native, False), (fused, True), (native_ckpt, True)):
        module.train()
        xi = x.clone().requires_grad_()
        y = checkpoint(module, xi, use_reentrant=False) if ckpt else module(xi)
        y.sum().backward()
    assert int(native_ckpt[1].num_batches_tracked) == 2, "native BatchNorm counts a checkpointed batch twice"
    assert int(fused.bn.num_batches_tracked) == int(native[1].num_batches_tracked) == 1
    assert_close_scaled(fused.bn.running_mean, native[1].running_mean, torch.float32, "running_mean")
    assert_close_scaled(fused.bn.running_var, native[1].running_var, torch.float32, "running_var")
    assert_close_scaled(fused.conv.weight.grad, native[0].weight.grad, torch.float32, "dW")
