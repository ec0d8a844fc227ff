"""The host twin's vectorised channels_last fp32 kernels (csrc/dwconv_bn_act/cpu_nhwc_fwd.h: the eval forward,
and the conv rows the statistics and backward passes recompute) on the geometries their blocking splits into
separate code: channel counts that leave 16-, 8- and scalar-channel rests after the wide blocks (also below one
vector), maps narrower than the tap window (every pixel an edge pixel), interior runs that are not a multiple of
the 4-pixel group (2- and 1-pixel rests), stride 2 and dilation 2. Each case against mnet_ext.reference in fp64;
the result must also not depend on the thread count (rows are independent work items)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from mnet_ext import functional as MF
from mnet_ext.backends import cuda as B
from tests.helpers import assert_matches_fp64_reference, backend_param

pytestmark = pytest.mark.parametrize("backend", [backend_param("cuda")])

# C: 1, 5 (< 8 lanes), 13 = 8 + 5, 24 = 16 + 8, 61 = 3 x 16 + 8 + 5; W: 1, 2, 3 (<= every tap window), 10, 19;
# W 7, 14, 28 and 42: rows in blocks of 7 or 14 pixels (K 3/5, stride 1 and 2: one block, first + last, first +
# middle + last), every channel block
GEOMETRIES = [
    (2, 1, 5, 5), (1, 5, 3, 2), (2, 13, 2, 1), (2, 24, 10, 10), (1, 61, 9, 19), (1, 40, 19, 3), (1, 16, 7, 7),
    (1, 29, 3, 37), (1, 61, 7, 7), (2, 61, 14, 14), (1, 45, 6, 28), (1, 61, 4, 42),
]


def _args(n: int, c: int, h: int, w: int, k: int, seed: int) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, h, w, generator=g).contiguous(memory_format=torch.channels_last)
    weight = torch.randn(c, 1, k, k, generator=g)
    mean = torch.randn(c, generator=g) * 0.1
    invstd = torch.rand(c, generator=g) + 0.5
    gamma = torch.randn(c, generator=g)
    beta = torch.randn(c, generator=g)
    return x, weight, mean, invstd, gamma, beta


@pytest.mark.parametrize("geometry", GEOMETRIES, ids=lambda g: "x".join(map(str, g)))
@pytest.mark.parametrize("k,stride,dilation",
                         [(3, 1, 1), (5, 2, 1), (7, 1, 2), (3, 2, 2), (5, 1, 1), (7, 1, 1), (3, 2, 1), (7, 2, 1)])
@pytest.mark.parametrize("act", ["none", "relu", "relu6", "hardswish", "silu"])
def test_nhwc_fwd_geometry(backend, geometry, k, stride, dilation, act):
    args = (*_args(*geometry, k, seed=k * 10 + stride + dilation), stride, dilation, act)
    y = B.dwconv_bn_act_fwd(*args)
    assert y.is_contiguous(memory_format=torch.channels_last)
    assert_matches_fp64_reference("dwconv_bn_act_fwd", y, args, f"{geometry} k{k} s{stride} d{dilation} {act}")


@pytest.mark.parametrize("geometry", GEOMETRIES, ids=lambda g: "x".join(map(str, g)))
@pytest.mark.parametrize("k,stride,dilation", [(3, 1, 1), (5, 2, 1), (7, 1, 2), (3, 2, 1)])
def test_nhwc_training_primitives_geometry(backend, geometry, k, stride, dilation):
    x, weight, mean, invstd, gamma, beta = _args(*geometry, k, seed=k + stride)
    what = f"{geometry} k{k} s{stride} d{dilation}"
    assert_matches_fp64_reference("dwconv_bn_stats", B.dwconv_bn_stats(x, weight, stride, dilation),
                                  (x, weight, stride, dilation), what)
    grad_y = torch.randn_like(B.dwconv_bn_act_fwd(x, weight, mean, invstd, gamma, beta, stride, dilation, "relu"))
    args = (grad_y, x, weight, mean, invstd, gamma, beta, stride, dilation, "hardswish")
    assert_matches_fp64_reference("dwconv_bn_act_bwd_reduce", B.dwconv_bn_act_bwd_reduce(*args), args, what)
    mean_g, mean_g_xhat = torch.randn(2, geometry[1]).unbind()
    args = (*args[:7], mean_g, mean_g_xhat, *args[7:])
    assert_matches_fp64_reference("dwconv_bn_act_bwd_apply", B.dwconv_bn_act_bwd_apply(*args), args, what)


# The backward apply splits each image into bands of dx rows (~512 KB of dz each, so several bands only on wide
# rows) and recomputes the dz rows of each band's halo: 200 channels x 100 columns make bands of 6 rows at stride 1
# and 13 (an odd boundary) at stride 2 over 14 rows, 2 images; 72 x 30 x 64 two bands of 28 and 2 rows. SiLU: a
# smooth derivative (on half a million values some u falls within fp32 rounding of a hardswish kink, where dx jumps).
@pytest.mark.parametrize("geometry", [(2, 200, 14, 100), (1, 72, 30, 64)], ids=lambda g: "x".join(map(str, g)))
@pytest.mark.parametrize("k,stride,dilation", [(3, 1, 1), (5, 2, 1), (7, 1, 2), (3, 2, 2)])
def test_nhwc_bwd_apply_bands(backend, geometry, k, stride, dilation):
    x, weight, mean, invstd, gamma, beta = _args(*geometry, k, seed=k + stride)
    grad_y = torch.randn_like(B.dwconv_bn_act_fwd(x, weight, mean, invstd, gamma, beta, stride, dilation, "relu"))
    mean_g, mean_g_xhat = torch.randn(2, geometry[1]).unbind()
    args = (grad_y, x, weight, mean, invstd, gamma, beta, mean_g, mean_g_xhat, stride, dilation, "silu")
    assert_matches_fp64_reference("dwconv_bn_act_bwd_apply", B.dwconv_bn_act_bwd_apply(*args), args,
                                  f"{geometry} k{k} s{stride} d{dilation}")


def test_nhwc_fwd_independent_of_threads(backend):
    args = (*_args(3, 40, 17, 13, 5, seed=1), 1, 1, "hardswish")
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = B.dwconv_bn_act_fwd(*args)
        torch.set_num_threads(max(threads, 2))
        many = B.dwconv_bn_act_fwd(*args)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, many)


@pytest.mark.skipif(bool(os.environ.get("MNET_EXT_CPU_ISA")), reason="already inside a capped-ISA run")
@pytest.mark.parametrize("isa", ["avx2", "baseline"])
def test_narrower_isa_copies(backend, isa):
    """The host twin is compiled once per ISA and the widest the CPU has runs; MNET_EXT_CPU_ISA caps it, so the AVX2
    and baseline copies are checked here too (on a CPU without them the cap changes nothing and this repeats)."""
    cases = ("geometry and (1x61x9x19 or 2x24x10x10 or 2x13x2x1 or 1x29x3x37 or 1x300x5x3 or 2x7x37x29 or 1x61x7x7 "
             "or 1x45x6x28 or 1x61x4x42)")
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", __file__, "-k", cases],
                         env={**os.environ, "MNET_EXT_CPU_ISA": isa}, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    assert " passed" in run.stdout and " failed" not in run.stdout, run.stdout[-2000:]


# SE (csrc/squeeze_excite/cpu.cpp): C across the 256-channel NHWC block (300 = 256 + 44), planes across the
# 1024-element NCHW chunk with a rest below the 16 lanes (37 x 29 = 1073 = 67 x 16 + 1), a single pixel, batch 1.
@pytest.mark.parametrize("shape", [(1, 300, 5, 3), (2, 7, 37, 29), (1, 3, 1, 1), (3, 20, 6, 5)],
                         ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_se_primitives_geometry(backend, shape, layout):
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    g = torch.Generator().manual_seed(sum(shape))
    x, grad_y = (torch.randn(*shape, generator=g).contiguous(memory_format=fmt) + 1.0 for _ in range(2))
    s, dpooled = torch.randn(2, *shape[:2], generator=g).unbind()
    what = f"{shape} {layout}"
    assert_matches_fp64_reference("se_pool", B.se_pool(x), (x,), what)
    assert_matches_fp64_reference("se_scale", B.se_scale(x, s), (x, s), what)
    assert_matches_fp64_reference("se_bwd_reduce", B.se_bwd_reduce(grad_y, x), (grad_y, x), what)
    assert_matches_fp64_reference("se_bwd_apply", B.se_bwd_apply(grad_y, s, dpooled), (grad_y, s, dpooled), what)


# mnet_ext.functional runs the op bodies without the custom ops' dispatch and autograd layers in eager mode
# (eval_forward / EvalFunction, and since session 5 the one-call TrainStepFunctions for training and SE): the results
# and every gradient must be bitwise those of the custom ops (which torch.compile traces), on every backend (since
# session 9 the Triton and reference backends take the fast path too: the custom op's Python dispatch cost more than
# a small layer's kernels on the first GPU run).
def _grads(out: torch.Tensor, inputs: list[torch.Tensor]) -> tuple[torch.Tensor, ...]:
    return torch.autograd.grad(out, inputs, torch.linspace(-1, 1, out.numel()).reshape(out.shape))


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("name", ["cuda", "triton", "reference"])
def test_functional_fast_path_matches_custom_op(backend, name, training, layout):
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    x, weight, mean, invstd, gamma, beta = _args(2, 24, 9, 7, 3, seed=5)
    x = x.contiguous(memory_format=fmt)
    var = invstd.pow(-2) - 1e-5
    inputs = [t.clone().requires_grad_() for t in (x, weight, gamma, beta)]
    y = MF.dwconv_bn_act(inputs[0], inputs[1], mean.clone(), var.clone(), inputs[2], inputs[3], training,
                         stride=2, act="hardswish", backend=name)
    if training:
        y_op = torch.ops.mnet_ext.dwconv_bn_act_train(*inputs, 1e-5, 2, 1, "hardswish", name)[0]
    else:
        inv = torch.rsqrt(var + 1e-5)
        y_op = torch.ops.mnet_ext.dwconv_bn_act(inputs[0], inputs[1], mean, inv, inputs[2], inputs[3], 2, 1,
                                                "hardswish", name)
        with torch.no_grad():  # the path without autograd
            assert torch.equal(MF.dwconv_bn_act(x, weight, mean, var, gamma, beta, stride=2, act="hardswish",
                                                backend=name), y_op)
    assert torch.equal(y, y_op)
    for g, g_op in zip(_grads(y, inputs), _grads(y_op, inputs), strict=True):
        assert torch.equal(g, g_op)


@pytest.mark.parametrize("name", ["cuda", "triton", "reference"])
def test_functional_se_fast_path_matches_custom_op(backend, name):
    g = torch.Generator().manual_seed(7)
    x = torch.randn(2, 12, 5, 6, generator=g).contiguous(memory_format=torch.channels_last)
    params = [torch.randn(4, 12, generator=g), torch.randn(4, generator=g), torch.randn(12, 4, generator=g),
              torch.randn(12, generator=g)]
    inputs = [t.clone().requires_grad_() for t in (x, *params)]
    y = MF.squeeze_excite(*inputs, backend=name)
    y_op = torch.ops.mnet_ext.squeeze_excite(*inputs, "relu", "hardsigmoid", name)[0]
    assert torch.equal(y, y_op)
    for gr, gr_op in zip(_grads(y, inputs), _grads(y_op, inputs), strict=True):
        assert torch.equal(gr, gr_op)
    with torch.no_grad():
        assert torch.equal(MF.squeeze_excite(x, *params, backend=name), y_op)


# Eval with nothing for autograd to record runs each layer as one C++ call (dwconv_bn_act_eval, squeeze_excite_eval:
# the checks, the BN fold or the FCs, the kernels): taken, and bitwise the custom op's result.
def _counting_eager_calls(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    calls: list[str] = []
    dw, se = MF._eager_calls()

    def counted(name: str, op):
        def run(*args):
            calls.append(name)
            return op(*args)
        return run
    monkeypatch.setattr(MF, "_eager_calls", lambda: (counted("dw", dw), counted("se", se)))
    return calls


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "no_affine"])
@pytest.mark.parametrize("layout", ["nchw", "channels_last", "strided"])
@pytest.mark.parametrize("n", [2, 0])
def test_eval_in_one_call_matches_custom_op(backend, monkeypatch, dtype, affine, layout, n):
    calls = _counting_eager_calls(monkeypatch)
    x, weight, mean, invstd, gamma, beta = _args(max(n, 1), 20, 9, 8, 5, seed=11)
    x = x[:n]
    if layout == "nchw":
        x = x.contiguous()
    elif layout == "strided":  # neither layout: copied once
        x = torch.cat([x, x], dim=3)[..., ::2]
    var = (invstd.pow(-2) - 1e-3).to(dtype)  # BN tensors in the model's dtype: the fold converts them
    x, weight, mean, gamma, beta = (t.to(dtype) for t in (x, weight, mean, gamma, beta))
    y = MF.dwconv_bn_act(x, weight, mean, var, gamma if affine else None, beta if affine else None, eps=1e-3,
                         stride=2, act="silu", backend="cuda")
    assert calls == ["dw"]
    ones, zeros = torch.ones(20), torch.zeros(20)
    x = MF._check_input(x)  # the op takes the layouts only: the functional copies x as _check_input does
    y_op = torch.ops.mnet_ext.dwconv_bn_act(x, weight, mean.float(), torch.rsqrt(var.float() + 1e-3),
                                            gamma.float() if affine else ones, beta.float() if affine else zeros,
                                            2, 1, "silu", "cuda")
    assert y.dtype == y_op.dtype and y.shape == y_op.shape and y.stride() == y_op.stride()
    assert torch.equal(y, y_op)


@pytest.mark.parametrize("act,gate", [("relu", "hardsigmoid"), ("silu", "sigmoid")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n", [3, 0])
def test_se_eval_in_one_call_matches_custom_op(backend, monkeypatch, act, gate, dtype, n):
    calls = _counting_eager_calls(monkeypatch)
    g = torch.Generator().manual_seed(13)
    x = torch.randn(n, 24, 5, 6, generator=g).to(dtype).contiguous(memory_format=torch.channels_last)
    params = [torch.randn(8, 24, 1, 1, generator=g), torch.randn(8, generator=g), torch.randn(24, 8, 1, 1, generator=g),
              torch.randn(24, generator=g)]
    y = MF.squeeze_excite(x, *params, act=act, gate=gate, backend="cuda")
    assert calls == ["se"]
    y_op = torch.ops.mnet_ext.squeeze_excite(x, params[0].reshape(8, 24), params[1], params[2].reshape(24, 8),
                                             params[3], act, gate, "cuda")[0]
    assert y.dtype == y_op.dtype and y.shape == y_op.shape and y.stride() == y_op.stride()
    assert torch.equal(y, y_op)


def test_eval_in_one_call_only_without_autograd(backend, monkeypatch):
    """A parameter that requires grad under grad mode takes the autograd path (gradients stay correct)."""
    calls = _counting_eager_calls(monkeypatch)
    x, weight, mean, invstd, gamma, beta = _args(1, 8, 6, 6, 3, seed=3)
    weight.requires_grad_()
    MF.dwconv_bn_act(x, weight, mean, invstd, gamma, beta, backend="cuda").sum().backward()
    assert calls == [] and weight.grad is not None
    with torch.no_grad():
        MF.dwconv_bn_act(x, weight, mean, invstd, gamma, beta, backend="cuda")
    assert calls == ["dw"]


@pytest.mark.parametrize("affine", [True, False], ids=["affine", "no_affine"])
@pytest.mark.parametrize("layout", ["nchw", "channels_last", "strided"])
@pytest.mark.parametrize("n", [2, 0])
def test_train_step_in_one_call_matches_python_path(backend, monkeypatch, affine, layout, n):
    """Training runs as TrainStepFunction (one C++ call forward, one backward): output, gradients and the running
    statistics' update bitwise those of the Python path (session 4: TrainFunction + the functional's update)."""
    x, weight, _, invstd, gamma, beta = _args(max(n, 1), 20, 9, 8, 3, seed=17)
    x = x[:n]
    if layout == "nchw":
        x = x.contiguous()
    elif layout == "strided":
        x = torch.cat([x, x], dim=3)[..., ::2]
    results = []
    for one_call in (True, False):
        if not one_call:
            monkeypatch.setattr(MF, "_in_one_call", lambda *args, **kwargs: False)
        inputs = [t.clone().requires_grad_() for t in ((x, weight, gamma, beta) if affine else (x, weight))]
        stats = [torch.randn(20, generator=torch.Generator().manual_seed(1)), invstd.clone()]
        y = MF.dwconv_bn_act(inputs[0], inputs[1], *stats, *(inputs[2:] if affine else (None, None)), training=True,
                             momentum=0.3, eps=1e-3, stride=2, act="relu6", backend="cuda")
        assert (type(y.grad_fn).__name__ == "TrainStepFunctionBackward") == one_call
        results.append([y, *stats, *_grads(y, inputs)])
    for got, want in zip(*results, strict=True):
        assert got.stride() == want.stride() and torch.equal(got, want)


@pytest.mark.parametrize("act,gate", [("relu", "hardsigmoid"), ("silu", "sigmoid")])
@pytest.mark.parametrize("layout", ["channels_last", "strided"])
@pytest.mark.parametrize("n", [3, 0])
def test_se_train_step_in_one_call_matches_python_path(backend, monkeypatch, act, gate, layout, n):
    """SE with autograd runs as its TrainStepFunction (one C++ call forward, one backward): output and every
    gradient bitwise those of the Python path (session 4: SEFunction), 1x1-conv-shaped FC weights included."""
    g = torch.Generator().manual_seed(19)
    x = torch.randn(max(n, 1), 24, 5, 6, generator=g)[:n].contiguous(memory_format=torch.channels_last)
    if layout == "strided":
        x = torch.cat([x, x], dim=3)[..., ::2]
    params = [torch.randn(8, 24, 1, 1, generator=g), torch.randn(8, generator=g), torch.randn(24, 8, generator=g),
              torch.randn(24, generator=g)]
    results = []
    for one_call in (True, False):
        if not one_call:
            monkeypatch.setattr(MF, "_in_one_call", lambda *args, **kwargs: False)
        inputs = [t.clone().requires_grad_() for t in (x, *params)]
        y = MF.squeeze_excite(*inputs, act=act, gate=gate, backend="cuda")
        assert (type(y.grad_fn).__name__ == "TrainStepFunctionBackward") == one_call
        results.append([y, *_grads(y, inputs)])
    for got, want in zip(*results, strict=True):
        assert got.shape == want.shape and got.dtype == want.dtype and torch.equal(got, want)
