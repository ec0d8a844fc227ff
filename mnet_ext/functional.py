"""User-facing functions with autograd, as ``torch.nn.functional`` is for native layers.

Both validate their arguments (errors name the argument and what was expected), pick the backend, apply
autocast the way native convolutions do, and call the ``mnet_ext`` torch ops.
"""

from __future__ import annotations

import functools
import warnings
from typing import Any

import torch
from torch import Tensor

from mnet_ext._backend import load, resolve, unavailable_reason
from mnet_ext.ops import dwconv_bn_act as dw_ops  # importing registers the torch.ops.mnet_ext ops
from mnet_ext.ops import squeeze_excite as se_ops
from mnet_ext.ops._common import transforming
from mnet_ext.reference import (
    CONV_ACTS,
    DILATIONS,
    KERNEL_SIZES,
    SE_ACTS,
    SE_GATES,
    STRIDES,
    acc_dtype,
    output_hw,
)
from mnet_ext.sync_batchnorm import needs_sync, sync_dwconv_bn_act_train

_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_warned_fallback: set[tuple[str, str]] = set()


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


# The checks below run on every call of a fused layer (a few microseconds of a small layer's time): each formats
# its message only once it has failed.
def _check_input(x: Tensor) -> Tensor:
    if not isinstance(x, Tensor):
        raise TypeError(f"x: expected a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(f"x: expected a 4-D [N, C, H, W] tensor, got shape {tuple(x.shape)}")
    if x.dtype not in _DTYPES:
        raise ValueError(f"x: expected dtype float32, float16, bfloat16 (or float64), got {x.dtype}")
    if x.shape[1] <= 0:
        raise ValueError(f"x: expected at least one channel, got shape {tuple(x.shape)}")
    if x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last):
        return x
    return x.contiguous()  # neither supported layout: one explicit copy


def _check_vector(name: str, v: Tensor, c: int, x: Tensor) -> None:
    if v.shape != (c,):
        raise ValueError(f"{name}: expected shape ({c},) (one value per channel of x), got {tuple(v.shape)}")
    if v.device != x.device:
        raise ValueError(f"{name}: expected device {x.device} (that of x), got {v.device}")
    if not v.is_floating_point():
        raise ValueError(f"{name}: expected a floating-point tensor, got {v.dtype}")


def _backend_for(backend: str | None, x: Tensor) -> str:
    """The resolved backend; float64 (for gradcheck) runs only on the reference, and Triton, whose launchers read
    raw pointers, not inside a ``torch.func`` transform (its tensors are wrappers without storage): the next
    backend then, with a one-time warning."""
    name = resolve(backend, x.device.type)
    if x.dtype == torch.float64 and name != "reference":
        fallback, why = "reference", "has no float64 kernels"
    elif name == "triton" and transforming():
        fallback = "cuda" if unavailable_reason("cuda", x.device.type) is None else "reference"
        why = "cannot run inside torch.func transforms"
    else:
        return name
    if (name, why) not in _warned_fallback:
        _warned_fallback.add((name, why))
        warnings.warn(f"mnet_ext: backend {name!r} {why}; using {fallback!r}", stacklevel=3)
    return fallback


def _autocast_dtype(t: Tensor) -> torch.dtype | None:
    """The dtype autocast gives ``t`` in a native convolution, None when it leaves ``t`` alone: autocast casts only
    floating tensors of its device, and never float64 ones."""
    device_type = t.device.type
    if torch.is_autocast_enabled(device_type) and t.is_floating_point() and t.dtype != torch.float64:
        return torch.get_autocast_dtype(device_type)
    return None


def _as(t: Tensor, dtype: torch.dtype) -> Tensor:
    """``t.to(dtype)`` without the call when it would return ``t`` itself."""
    return t if t.dtype == dtype else t.to(dtype)


def _autocast(*tensors: Tensor) -> tuple[Tensor, ...]:
    """Cast like a native convolution does under autocast."""
    return tuple(t if (dtype := _autocast_dtype(t)) is None else t.to(dtype) for t in tensors)


def _in_one_call(x: object, backend: str | None, params: tuple[object, ...], with_autograd: bool) -> bool:
    """Whether a layer runs in one C++ call (without autograd: ``_eager_calls``; ``with_autograd``: the ops'
    ``TrainStepFunction``, one call forward and one backward): the host twin (backend ``cuda``, CPU tensors of its
    dtypes) in eager mode without autocast or a ``torch.func`` transform (the one-call Functions have no
    ``setup_context``), without ``with_autograd`` only when autograd has nothing to record,
    every parameter a tensor (or None) so that the Python checks below name a non-tensor argument. The C++ calls
    check the rest, with the Python checks' messages."""
    if not (isinstance(x, Tensor) and x.is_cpu and x.dtype is not torch.float64):
        return False
    grad = not with_autograd and torch.is_grad_enabled()
    if grad and x.requires_grad:
        return False
    for p in params:
        if p is not None and (not isinstance(p, Tensor) or (grad and p.requires_grad)):
            return False
    return (not torch.is_autocast_enabled("cpu") and not torch.compiler.is_compiling() and not transforming()
            and resolve(backend, "cpu") == "cuda")


@functools.cache
def _eager_calls() -> tuple[Any, Any]:
    """``torch.ops.mnet_ext_cuda``'s whole-layer eval calls (checks, BN fold or FCs, kernels: the Python path costs
    more than a small layer's kernels on a CPU); the registered ``mnet_ext`` ops stay what ``torch.compile``
    traces."""
    ops = load("cuda")._ops
    return ops.dwconv_bn_act_eval.default, ops.squeeze_excite_eval.default


def dwconv_bn_act(
    x: Tensor,
    weight: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    bn_weight: Tensor | None = None,
    bn_bias: Tensor | None = None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
    stride: int = 1,
    dilation: int = 1,
    act: str = "none",
    backend: str | None = None,
    process_group: Any = None,
) -> Tensor:
    """act(batch_norm(depthwise_conv2d(x, weight))) in one fused op.

    Args mirror ``F.conv2d`` + ``F.batch_norm``: ``x`` is ``[N, C, H, W]`` (NCHW or channels_last), ``weight`` the
    depthwise filter ``[C, 1, k, k]`` (k in 3/5/7, padding ``(k-1)//2*dilation``), then BatchNorm's running stats
    and affine parameters (``None`` = no affine). ``training=True`` normalizes with batch statistics and, when
    running stats are given, updates them in place (``momentum`` as in ``F.batch_norm``). ``act`` is one of
    none/relu/relu6/hardswish/silu. ``backend`` None picks one (see ``mnet_ext.use_backend``). With a
    ``process_group`` (e.g. ``torch.distributed.group.WORLD``) of several ranks, training statistics are those of
    the whole group, as ``nn.SyncBatchNorm`` computes them.
    """
    if _in_one_call(x, backend, (weight, running_mean, running_var, bn_weight, bn_bias), training):
        if not training:
            return _eager_calls()[0](x, weight, running_mean, running_var, bn_weight, bn_bias, eps, stride, dilation,
                                     act)
        if not needs_sync(process_group):
            return dw_ops.TrainStepFunction.apply(x, weight, bn_weight, bn_bias, running_mean, running_var, momentum,
                                                  eps, stride, dilation, act)
    x = _check_input(x)
    n, c, h, w = x.shape
    # Native convolutions refuse an empty image (an empty batch is fine: the result is empty).
    if h <= 0 or w <= 0:
        raise ValueError(f"x: expected a non-zero height and width, got shape {tuple(x.shape)}")
    if not (isinstance(weight, Tensor) and weight.dim() == 4):
        raise ValueError("weight: expected a 4-D [C, 1, k, k] tensor")
    k = weight.shape[-1]
    if weight.shape != (c, 1, k, k) or k not in KERNEL_SIZES:
        raise ValueError(f"weight: expected a depthwise filter of shape ({c}, 1, k, k) with k in {KERNEL_SIZES} "
                         f"(groups = channels = {c}), got {tuple(weight.shape)}")
    if weight.device != x.device:
        raise ValueError(f"weight: expected device {x.device} (that of x), got {weight.device}")
    if stride not in STRIDES:
        raise ValueError(f"stride: expected one of {STRIDES}, got {stride!r}")
    if dilation not in DILATIONS:
        raise ValueError(f"dilation: expected one of {DILATIONS}, got {dilation!r}")
    if act not in CONV_ACTS:
        raise ValueError(f"act: expected one of {CONV_ACTS}, got {act!r}")
    autocasting = torch.is_autocast_enabled(x.device.type)
    if autocasting:
        x, weight = _autocast(x, weight)
    if weight.dtype != x.dtype:
        raise ValueError(f"weight: expected dtype {x.dtype} (that of x), got {weight.dtype}")
    for name, v in (("running_mean", running_mean), ("running_var", running_var),
                    ("bn_weight", bn_weight), ("bn_bias", bn_bias)):
        if v is not None:
            _check_vector(name, v, c, x)
    acc = acc_dtype(x.dtype)
    gamma = x.new_ones(c, dtype=acc) if bn_weight is None else _as(bn_weight, acc)
    beta = x.new_zeros(c, dtype=acc) if bn_bias is None else _as(bn_bias, acc)
    name = _backend_for(backend, x)
    if not training:
        if running_mean is None or running_var is None:
            raise ValueError("running_mean/running_var: required when training=False")
        grad = torch.is_grad_enabled()
        mean, var = (running_mean.detach(), running_var.detach()) if grad else (running_mean, running_var)
        invstd = torch.rsqrt(_as(var, acc) + eps)
        mean = _as(mean, acc)
        if not autocasting and not torch.compiler.is_compiling():
            # The op's body without the custom op's dispatch and autograd layers (they cost more than a small
            # layer's convolution on a CPU): directly when autograd has nothing to record, else with its autograd
            # as an autograd.Function
            if grad and (x.requires_grad or weight.requires_grad or gamma.requires_grad or beta.requires_grad):
                return dw_ops.eval_autograd(x, weight, mean, invstd, gamma, beta, stride, dilation, act, name)
            return dw_ops.eval_forward(x, weight, mean, invstd, gamma, beta, stride, dilation, act, name)
        return torch.ops.mnet_ext.dwconv_bn_act(x, weight, mean, invstd, gamma, beta, stride, dilation, act, name)
    if needs_sync(process_group):
        y, mean, var, count = sync_dwconv_bn_act_train(x, weight, gamma, beta, eps, stride, dilation, act, name,
                                                       process_group)
    else:
        ho, wo = output_hw(h, w, k, stride, dilation)
        count = n * ho * wo
        # As native: an empty batch is fine (an empty result, running statistics left alone), one value is not.
        _check(count != 1, f"x: expected more than 1 value per channel when training, got input size {list(x.shape)}")
        if not autocasting and not torch.compiler.is_compiling():
            # The op bodies and their autograd without the custom op's layers (see train_autograd)
            y, mean, var = dw_ops.train_autograd(x, weight, gamma, beta, eps, stride, dilation, act, name)
        else:
            y, mean, var = torch.ops.mnet_ext.dwconv_bn_act_train(x, weight, gamma, beta, eps, stride, dilation,
                                                                  act, name)
    if running_mean is not None and running_var is not None:
        _update_running_stats(running_mean, running_var, mean, var, count, momentum)
    return y

def _update_running_stats(running_mean: Tensor, running_var: Tensor, mean: Tensor, var: Tensor,
                          count: int | Tensor, momentum: float) -> None:
    """Exactly nn.BatchNorm2d's update: unbiased variance into running_var. An empty batch leaves the statistics
    alone, as native does; under SyncBatchNorm ``count`` is the group's count as a device tensor, read without a
    host synchronisation."""
    if isinstance(count, int) and count == 0:
        return
    with torch.no_grad():
        unbiased = var * (count / (count - 1))
        for running, stat in ((running_mean, mean), (running_var, unbiased)):
            if isinstance(count, int):  # in place: two device ops per statistic (each a launch on a GPU)
                running.mul_(1 - momentum).add_(stat.to(running.dtype), alpha=momentum)
            else:
                updated = running.mul(1 - momentum).add_(stat.to(running.dtype), alpha=momentum)
                running.copy_(torch.where(count > 0, updated, running))


def squeeze_excite(
    x: Tensor,
    fc1_weight: Tensor,
    fc1_bias: Tensor,
    fc2_weight: Tensor,
    fc2_bias: Tensor,
    act: str = "relu",
    gate: str = "hardsigmoid",
    backend: str | None = None,
) -> Tensor:
    """x * gate(fc2(act(fc1(mean_hw(x))))), torchvision's ``SqueezeExcitation`` in one fused op.

    ``fc1_weight`` is ``[S, C]`` or ``[S, C, 1, 1]`` (a 1x1 conv's weight), ``fc2_weight`` ``[C, S]`` or
    ``[C, S, 1, 1]``; the biases ``[S]`` and ``[C]``. ``act`` relu/silu, ``gate`` hardsigmoid/sigmoid.
    """
    params = (fc1_weight, fc1_bias, fc2_weight, fc2_bias)
    if _in_one_call(x, backend, params, with_autograd=True):
        if torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in params)):
            return se_ops.TrainStepFunction.apply(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, act, gate)
        return _eager_calls()[1](x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, act, gate)
    x = _check_input(x)
    c = x.shape[1]
    w1 = fc1_weight.reshape(fc1_weight.shape[0], -1) if isinstance(fc1_weight, Tensor) else fc1_weight
    w2 = fc2_weight.reshape(fc2_weight.shape[0], -1) if isinstance(fc2_weight, Tensor) else fc2_weight
    if not (isinstance(w1, Tensor) and w1.dim() == 2 and w1.shape[1] == c):
        raise ValueError(f"fc1_weight: expected shape [S, {c}] or [S, {c}, 1, 1], got "
                         f"{tuple(fc1_weight.shape) if isinstance(fc1_weight, Tensor) else type(fc1_weight).__name__}")
    s = w1.shape[0]
    if not (isinstance(w2, Tensor) and w2.shape == (c, s)):
        raise ValueError(f"fc2_weight: expected shape [{c}, {s}] or [{c}, {s}, 1, 1], got "
                         f"{tuple(fc2_weight.shape) if isinstance(fc2_weight, Tensor) else type(fc2_weight).__name__}")
    if not (isinstance(fc1_bias, Tensor) and fc1_bias.shape == (s,)):
        raise ValueError(f"fc1_bias: expected shape [{s}]")
    if not (isinstance(fc2_bias, Tensor) and fc2_bias.shape == (c,)):
        raise ValueError(f"fc2_bias: expected shape [{c}]")
    for name, t in (("fc1_weight", w1), ("fc1_bias", fc1_bias), ("fc2_weight", w2), ("fc2_bias", fc2_bias)):
        if t.device != x.device:
            raise ValueError(f"{name}: expected device {x.device} (that of x), got {t.device}")
        if t.dtype not in _DTYPES:
            raise ValueError(f"{name}: expected a float32/float16/bfloat16 tensor, got {t.dtype}")
    if act not in SE_ACTS:
        raise ValueError(f"act: expected one of {SE_ACTS}, got {act!r}")
    if gate not in SE_GATES:
        raise ValueError(f"gate: expected one of {SE_GATES}, got {gate!r}")
    autocasting = (dtype := _autocast_dtype(x)) is not None
    if autocasting:
        # Native SE computes its gate in the autocast dtype and multiplies x by it: type promotion gives the result
        # (x's dtype for float32 or the autocast dtype itself; float32 for float16 x under bfloat16 and vice versa).
        x = x.to(torch.promote_types(x.dtype, dtype))
    name = _backend_for(backend, x)
    if not autocasting and not torch.compiler.is_compiling():
        # The op's body without the custom op's layers (see dwconv_bn_act): directly when autograd has nothing to
        # record, else with its autograd as an autograd.Function
        if torch.is_grad_enabled() and any(t.requires_grad for t in (x, w1, fc1_bias, w2, fc2_bias)):
            return se_ops.se_autograd(x, w1, fc1_bias, w2, fc2_bias, act, gate, name)[0]
        return se_ops.forward(x, w1, fc1_bias, w2, fc2_bias, act, gate, name)[0]
    return torch.ops.mnet_ext.squeeze_excite(x, w1, fc1_bias, w2, fc2_bias, act, gate, name)[0]
