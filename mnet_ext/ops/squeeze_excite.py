"""torch.library ops for fused squeeze-excitation: y = x * gate(fc2(act(fc1(mean_hw(x))))).

The backend's primitives make the two passes over the activation (pool; scale) and the two passes of the
backward (reduce; apply). The fully connected layers act on ``[N, C]`` fp32 tensors between those passes and run
in PyTorch: they are a few kilobytes per sample.

* ``mnet_ext::squeeze_excite`` -> ``(y, pooled)``; ``pooled`` is saved for the backward.
* ``mnet_ext::squeeze_excite_backward`` -> ``(dx, dfc1_weight, dfc1_bias, dfc2_weight, dfc2_bias)``.

FC weights are 2-D: ``fc1_weight [S, C]``, ``fc2_weight [C, S]``. An empty x never reaches a backend: its passes
are done here as native does them (the mean of no pixels is NaN; sums over nothing are 0).
"""

from __future__ import annotations

import torch
from torch import Tensor

from mnet_ext._backend import load
from mnet_ext.ops._common import autocast_off, dense_like, eager_function, new_output
from mnet_ext.reference import acc_dtype, act_bwd, act_fwd


def _as(t: Tensor, dtype: torch.dtype) -> Tensor:
    """``t.to(dtype)`` without the call when it would return ``t`` itself (one call per SE layer and step)."""
    return t if t.dtype == dtype else t.to(dtype)


def _excite(pooled: Tensor, w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor, act: str, gate: str):
    """The two FCs on the pooled means, in their dtype (fp32; fp64 for fp64 inputs).

    Returns every intermediate the backward needs."""
    dt = pooled.dtype
    a1 = torch.addmm(_as(b1, dt), pooled, _as(w1, dt).t())
    h = act_fwd(a1, act)
    a2 = torch.addmm(_as(b2, dt), h, _as(w2, dt).t())
    return a1, h, a2, act_fwd(a2, gate)


@torch.library.custom_op("mnet_ext::squeeze_excite", mutates_args=())
def squeeze_excite(
    x: Tensor,
    fc1_weight: Tensor,
    fc1_bias: Tensor,
    fc2_weight: Tensor,
    fc2_bias: Tensor,
    act: str,
    gate: str,
    backend: str,
) -> tuple[Tensor, Tensor]:
    return forward(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, act, gate, backend)


def forward(x: Tensor, fc1_weight: Tensor, fc1_bias: Tensor, fc2_weight: Tensor, fc2_bias: Tensor, act: str,
            gate: str, backend: str) -> tuple[Tensor, Tensor]:
    """The body of ``mnet_ext::squeeze_excite``; ``mnet_ext.functional`` calls it directly when autograd has nothing
    to record (the op's dispatch costs more than a small SE layer on a CPU)."""
    if x.numel() == 0:
        pooled = x.to(acc_dtype(x.dtype)).mean(dim=(2, 3))
        return new_output(x, x.shape), pooled
    impl = load(backend)
    with autocast_off(x):
        pooled = impl.se_pool(x)
        return impl.se_scale(x, _excite(pooled, fc1_weight, fc1_bias, fc2_weight, fc2_bias, act, gate)[-1]), pooled


@torch.library.custom_op("mnet_ext::squeeze_excite_backward", mutates_args=())
def squeeze_excite_backward(
    grad_y: Tensor,
    x: Tensor,
    pooled: Tensor,
    fc1_weight: Tensor,
    fc1_bias: Tensor,
    fc2_weight: Tensor,
    fc2_bias: Tensor,
    act: str,
    gate: str,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    return backward(grad_y, x, pooled, fc1_weight, fc1_bias, fc2_weight, fc2_bias, act, gate, backend)


def backward(grad_y: Tensor, x: Tensor, pooled: Tensor, fc1_weight: Tensor, fc1_bias: Tensor, fc2_weight: Tensor,
             fc2_bias: Tensor, act: str, gate: str, backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The body of ``mnet_ext::squeeze_excite_backward`` (also run by ``se_autograd``)."""
    impl, empty = load(backend), x.numel() == 0
    with autocast_off(x):
        a1, h, a2, s = _excite(pooled, fc1_weight, fc1_bias, fc2_weight, fc2_bias, act, gate)
        ds = torch.zeros_like(pooled) if empty else impl.se_bwd_reduce(grad_y, x)
        da2 = act_bwd(a2, ds, gate)
        da1 = act_bwd(a1, da2 @ fc2_weight.to(s.dtype), act)
        dx = new_output(x, x.shape) if empty else impl.se_bwd_apply(grad_y, s, da1 @ fc1_weight.to(s.dtype))
    return (
        dx,
        (da1.t() @ pooled).to(fc1_weight.dtype),
        da1.sum(0).to(fc1_bias.dtype),
        (da2.t() @ h).to(fc2_weight.dtype),
        da2.sum(0).to(fc2_bias.dtype),
    )


@squeeze_excite.register_fake
def _(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, act, gate, backend):
    return new_output(x, x.shape), x.new_empty(x.shape[:2], dtype=acc_dtype(x.dtype))


@squeeze_excite_backward.register_fake
def _(grad_y, x, pooled, fc1_weight, fc1_bias, fc2_weight, fc2_bias, act, gate, backend):
    return (
        new_output(x, x.shape),
        torch.empty_like(fc1_weight),
        torch.empty_like(fc1_bias),
        torch.empty_like(fc2_weight),
        torch.empty_like(fc2_bias),
    )


# One setup and one backward for the custom op's registered autograd and the eager ``se_autograd`` (see
# ``dwconv_bn_act``'s autograd section): ``direct`` picks the backward's body over its op.
def _setup(ctx, inputs, output, direct: bool = False):
    x, w1, b1, w2, b2, act, gate, backend = inputs
    ctx.mark_non_differentiable(output[1])
    ctx.save_for_backward(x, output[1], w1, b1, w2, b2)
    ctx.args = (act, gate, backend)
    ctx.bwd = backward if direct else squeeze_excite_backward
    if direct:
        ctx.set_materialize_grads(False)  # pooled never gets a gradient: no zeros for it


def _backward(ctx, grad_y, _grad_pooled):
    if grad_y is None:  # y did not reach the loss (only without materialized gradients)
        return (None,) * 8
    x, pooled, w1, b1, w2, b2 = ctx.saved_tensors
    act, gate, backend = ctx.args
    grads = ctx.bwd(dense_like(grad_y, x), x, pooled, w1, b1, w2, b2, act, gate, backend)
    return *grads, None, None, None


squeeze_excite.register_autograd(_backward, setup_context=_setup)


se_autograd = eager_function("SEFunction", forward, _setup, _backward)


class TrainStepFunction(torch.autograd.Function):
    """An SE layer with autograd on the host twin (backend ``cuda``, CPU tensors, eager mode) in two C++ calls:
    ``squeeze_excite_train_eager`` (``mnet_ext.functional``'s checks, pool, FCs, scale) and
    ``squeeze_excite_backward_eager`` (this file's ``backward``, op for op). The torch ops of ``se_autograd``
    without their Python (~0.3 ms per layer and step on a CPU, more than the layer's kernels at batch 1): bitwise
    the same results. Arguments as ``mnet_ext.functional.squeeze_excite``'s (FC weights 2-D or 1x1 conv weights)."""

    @staticmethod
    def forward(ctx, x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, act, gate):
        y, pooled = load("cuda")._ops.squeeze_excite_train_eager.default(x, fc1_weight, fc1_bias, fc2_weight,
                                                                          fc2_bias, act, gate)
        ctx.save_for_backward(x, pooled, fc1_weight, fc1_bias, fc2_weight, fc2_bias)
        ctx.args = (act, gate)
        return y

    @staticmethod
    def backward(ctx, grad_y):
        grads = load("cuda")._ops.squeeze_excite_backward_eager.default(grad_y, *ctx.saved_tensors, *ctx.args)
        return *grads, None, None
