"""torch.library ops for fused depthwise conv + BatchNorm + activation.

Three composite ops, each running the primitives of one backend (``docs/op_contract.md``):

* ``mnet_ext::dwconv_bn_act`` -- statistics given (eval: running stats); one ``fwd`` pass.
* ``mnet_ext::dwconv_bn_act_train`` -- batch statistics: ``stats`` -> finalize -> ``fwd``; returns ``(y, mean, var)``
  so the caller updates running statistics (an op that mutated its inputs could not have autograd).
* ``mnet_ext::dwconv_bn_act_backward`` -- ``bwd_reduce`` -> finalize -> ``bwd_apply``;
  gives dx, dweight, dgamma, dbeta.

Per-channel tensors (mean, invstd/var, gamma, beta) are fp32 (fp64 for fp64 inputs); ``backend`` is an
already-resolved backend name. The ops take a weight of any strides (the backends read a contiguous one: it is
tiny, so it is copied here when needed). An empty batch never reaches a backend: the results are those native
modules give (empty outputs; zero gradients for the weight and the affine parameters); its statistics are zeros,
which the caller must not fold into running statistics (native leaves them alone).
"""

from __future__ import annotations

import torch
from torch import Tensor

from mnet_ext._backend import load
from mnet_ext.ops._common import autocast_off, dense_like, eager_function, new_output
from mnet_ext.reference import acc_dtype, output_hw


def _like_output(x: Tensor, weight: Tensor, stride: int, dilation: int) -> Tensor:
    n, c, h, w = x.shape
    return new_output(x, (n, c, *output_hw(h, w, weight.shape[-1], stride, dilation)))


def _vector(x: Tensor) -> Tensor:
    return torch.empty((x.shape[1],), dtype=acc_dtype(x.dtype), device=x.device)


@torch.library.custom_op("mnet_ext::dwconv_bn_act", mutates_args=())
def dwconv_bn_act(
    x: Tensor,
    weight: Tensor,
    mean: Tensor,
    invstd: Tensor,
    gamma: Tensor,
    beta: Tensor,
    stride: int,
    dilation: int,
    act: str,
    backend: str,
) -> Tensor:
    return eval_forward(x, weight, mean, invstd, gamma, beta, stride, dilation, act, backend)


def eval_forward(x: Tensor, weight: Tensor, mean: Tensor, invstd: Tensor, gamma: Tensor, beta: Tensor, stride: int,
                 dilation: int, act: str, backend: str) -> Tensor:
    """The body of ``mnet_ext::dwconv_bn_act``; ``mnet_ext.functional`` calls it directly when autograd has nothing
    to record (the op's dispatch costs more than a small layer's convolution on a CPU)."""
    if x.numel() == 0:
        return _like_output(x, weight, stride, dilation)
    impl, weight = load(backend), weight.contiguous()
    # a backend may run its eval forward differently from the training apply pass (Triton: tensor cores, while the
    # training forward keeps the z its statistics and backward recompute): then it exposes dwconv_bn_act_fwd_eval
    fwd = getattr(impl, "dwconv_bn_act_fwd_eval", impl.dwconv_bn_act_fwd)
    with autocast_off(x):
        return fwd(x, weight, mean, invstd, gamma, beta, stride, dilation, act)


@torch.library.custom_op("mnet_ext::dwconv_bn_act_train", mutates_args=())
def dwconv_bn_act_train(
    x: Tensor,
    weight: Tensor,
    gamma: Tensor,
    beta: Tensor,
    eps: float,
    stride: int,
    dilation: int,
    act: str,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor]:
    return train_forward(x, weight, gamma, beta, eps, stride, dilation, act, backend)


def train_forward(x: Tensor, weight: Tensor, gamma: Tensor, beta: Tensor, eps: float, stride: int, dilation: int,
                  act: str, backend: str) -> tuple[Tensor, Tensor, Tensor]:
    """The body of ``mnet_ext::dwconv_bn_act_train`` (also run by ``train_autograd``)."""
    if x.numel() == 0:  # zero statistics with a count of 0, as an empty rank reports them under SyncBatchNorm
        return _like_output(x, weight, stride, dilation), _vector(x).zero_(), _vector(x).zero_()
    impl, weight = load(backend), weight.contiguous()
    with autocast_off(x):
        mean, var = impl.dwconv_bn_stats(x, weight, stride, dilation)
        invstd = torch.rsqrt(var + eps)
        y = impl.dwconv_bn_act_fwd(x, weight, mean, invstd, gamma, beta, stride, dilation, act)
    return y, mean, var


@torch.library.custom_op("mnet_ext::dwconv_bn_act_backward", mutates_args=())
def dwconv_bn_act_backward(
    grad_y: Tensor,
    x: Tensor,
    weight: Tensor,
    mean: Tensor,
    invstd: Tensor,
    gamma: Tensor,
    beta: Tensor,
    stride: int,
    dilation: int,
    act: str,
    training: bool,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return backward(grad_y, x, weight, mean, invstd, gamma, beta, stride, dilation, act, training, backend)


def backward(grad_y: Tensor, x: Tensor, weight: Tensor, mean: Tensor, invstd: Tensor, gamma: Tensor, beta: Tensor,
             stride: int, dilation: int, act: str, training: bool,
             backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The body of ``mnet_ext::dwconv_bn_act_backward`` (also run by ``train_autograd``)."""
    if x.numel() == 0:
        dweight = torch.zeros_like(weight, memory_format=torch.contiguous_format)
        return new_output(x, x.shape), dweight, _vector(x).zero_(), _vector(x).zero_()
    impl, weight = load(backend), weight.contiguous()
    with autocast_off(x):
        sum_g, sum_g_xhat = impl.dwconv_bn_act_bwd_reduce(
            grad_y, x, weight, mean, invstd, gamma, beta, stride, dilation, act
        )
        if training:  # the statistics depend on x: BatchNorm's mean terms
            count = grad_y.shape[0] * grad_y.shape[2] * grad_y.shape[3]
            mean_g, mean_g_xhat = sum_g / count, sum_g_xhat / count
        else:
            mean_g, mean_g_xhat = torch.zeros_like(sum_g), torch.zeros_like(sum_g_xhat)
        dx, dweight = impl.dwconv_bn_act_bwd_apply(
            grad_y, x, weight, mean, invstd, gamma, beta, mean_g, mean_g_xhat, stride, dilation, act
        )
    return dx, dweight, sum_g_xhat, sum_g


@dwconv_bn_act.register_fake
def _(x, weight, mean, invstd, gamma, beta, stride, dilation, act, backend):
    return _like_output(x, weight, stride, dilation)


@dwconv_bn_act_train.register_fake
def _(x, weight, gamma, beta, eps, stride, dilation, act, backend):
    return _like_output(x, weight, stride, dilation), _vector(x), _vector(x)


@dwconv_bn_act_backward.register_fake
def _(grad_y, x, weight, mean, invstd, gamma, beta, stride, dilation, act, training, backend):
    dweight = torch.empty_like(weight, memory_format=torch.contiguous_format)
    return new_output(x, x.shape), dweight, _vector(x), _vector(x)


# ---------------------------------------------------------------------------------------------- autograd
# One setup and one backward per op, for two callers: the custom ops' registered autograd (what torch.compile
# traces), and in eager mode the plain autograd.Functions below (``eager_function``), which run the same op bodies
# without the custom ops' dispatch and autograd layers (~0.2-0.3 ms per layer and training step on a CPU).
# ``direct`` picks the backward's body over its op.
def _setup_eval(ctx, inputs, output, direct: bool = False):
    x, weight, mean, invstd, gamma, beta, stride, dilation, act, backend = inputs
    ctx.save_for_backward(x, weight, mean, invstd, gamma, beta)
    ctx.args = (stride, dilation, act, backend)
    ctx.bwd = backward if direct else dwconv_bn_act_backward


def _backward_eval(ctx, grad_y):
    x, weight, mean, invstd, gamma, beta = ctx.saved_tensors
    stride, dilation, act, backend = ctx.args
    dx, dweight, dgamma, dbeta = ctx.bwd(
        dense_like(grad_y, x), x, weight, mean, invstd, gamma, beta, stride, dilation, act, False, backend
    )
    return dx, dweight, None, None, dgamma, dbeta, None, None, None, None


def _setup_train(ctx, inputs, output, direct: bool = False):
    x, weight, gamma, beta, eps, stride, dilation, act, backend = inputs
    _, mean, var = output
    ctx.mark_non_differentiable(mean, var)
    ctx.save_for_backward(x, weight, gamma, beta, mean, var)
    ctx.args = (eps, stride, dilation, act, backend)
    ctx.bwd = backward if direct else dwconv_bn_act_backward
    if direct:
        ctx.set_materialize_grads(False)  # mean and var never get gradients: no zeros for them


def _backward_train(ctx, grad_y, _grad_mean, _grad_var):
    if grad_y is None:  # y did not reach the loss (only without materialized gradients)
        return (None,) * 9
    x, weight, gamma, beta, mean, var = ctx.saved_tensors
    eps, stride, dilation, act, backend = ctx.args
    invstd = torch.rsqrt(var + eps)
    dx, dweight, dgamma, dbeta = ctx.bwd(
        dense_like(grad_y, x), x, weight, mean, invstd, gamma, beta, stride, dilation, act, True, backend
    )
    return dx, dweight, dgamma, dbeta, None, None, None, None, None


dwconv_bn_act.register_autograd(_backward_eval, setup_context=_setup_eval)
dwconv_bn_act_train.register_autograd(_backward_train, setup_context=_setup_train)


eval_autograd = eager_function("EvalFunction", eval_forward, _setup_eval, _backward_eval)
train_autograd = eager_function("TrainFunction", train_forward, _setup_train, _backward_train)


class TrainStepFunction(torch.autograd.Function):
    """A training step of one layer on the host twin (backend ``cuda``, CPU tensors, eager mode) in two C++ calls:
    ``dwconv_bn_act_train_eager`` (``mnet_ext.functional``'s checks, statistics, forward, the running statistics'
    update in place) and ``dwconv_bn_act_train_backward_eager`` (bwd_reduce, BatchNorm's mean terms, bwd_apply).
    The kernels and torch ops of ``train_autograd`` plus the functional's update, without their Python: bitwise the
    same results. Arguments as ``mnet_ext.functional.dwconv_bn_act``'s (affine parameters and running statistics
    may be None)."""

    @staticmethod
    def forward(ctx, x, weight, bn_weight, bn_bias, running_mean, running_var, momentum, eps, stride, dilation, act):
        ops = load("cuda")._ops
        y, mean, var = ops.dwconv_bn_act_train_eager.default(x, weight, bn_weight, bn_bias, running_mean, running_var,
                                                             momentum, eps, stride, dilation, act)
        ctx.save_for_backward(x, weight, bn_weight, bn_bias, mean, var)
        ctx.args = (eps, stride, dilation, act)
        return y

    @staticmethod
    def backward(ctx, grad_y):
        x, weight, gamma, beta, mean, var = ctx.saved_tensors
        dx, dweight, dgamma, dbeta = load("cuda")._ops.dwconv_bn_act_train_backward_eager.default(
            grad_y, x, weight, mean, var, gamma, beta, *ctx.args
        )
        return dx, dweight, None if gamma is None else dgamma, None if beta is None else dbeta, *(None,) * 7
