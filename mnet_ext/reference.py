"""The specification: every primitive of the op contract in plain PyTorch, written for clarity.

Every backend (``cuda`` = the C++ extension, ``triton``) implements exactly these functions with the
same signatures, and is tested against them; these functions are in turn tested against
``nn.Conv2d`` + ``nn.BatchNorm2d`` + activation modules and ``torchvision.ops.SqueezeExcitation``.
See ``docs/op_contract.md`` for the full contract.

Conventions shared by all primitives:

* ``x``: ``[N, C, H, W]`` activations in fp32/fp16/bf16, NCHW-contiguous or channels_last-contiguous.
  Outputs of the same size as ``x`` (``y``, ``dx``) keep its dtype and memory format.
* ``weight``: ``[C, 1, k, k]`` depthwise filter in the dtype of ``x``; k in {3, 5, 7}.
* Per-channel vectors (``mean``, ``invstd``, ``gamma``, ``beta``, sums) are fp32 ``[C]``.
* Padding is torchvision's ``(k - 1) // 2 * dilation``; all arithmetic is done in fp32.
* The reference alone also accepts float64 (then everything is float64), for ``gradcheck``.
* ``z = conv(x, weight)``, ``xhat = (z - mean) * invstd``, ``u = gamma * xhat + beta``, ``y = act(u)``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

CONV_ACTS = ("none", "relu", "relu6", "hardswish", "silu")
SE_ACTS = ("relu", "silu")
SE_GATES = ("hardsigmoid", "sigmoid")
KERNEL_SIZES = (3, 5, 7)
STRIDES = (1, 2)
DILATIONS = (1, 2)


# ----------------------------------------------------------------------------------------------
# Layout, precision and geometry helpers
# ----------------------------------------------------------------------------------------------
def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The accumulation (and per-channel vector) dtype for activations of ``dtype``: fp32, or fp64 for fp64."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _acc(t: torch.Tensor) -> torch.Tensor:
    return t.to(acc_dtype(t.dtype))


def memory_format_of(x: torch.Tensor) -> torch.memory_format:
    """channels_last when ``x`` is channels_last-contiguous and not also NCHW-contiguous."""
    if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def padding_for(kernel_size: int, dilation: int) -> int:
    """torchvision's 'same'-style padding for odd kernels."""
    return (kernel_size - 1) // 2 * dilation


def output_hw(h: int, w: int, kernel_size: int, stride: int, dilation: int) -> tuple[int, int]:
    pad = padding_for(kernel_size, dilation)
    span = dilation * (kernel_size - 1) + 1
    return (h + 2 * pad - span) // stride + 1, (w + 2 * pad - span) // stride + 1


# ----------------------------------------------------------------------------------------------
# Activations and their derivatives (at the kinks and for NaN they follow PyTorch's own backward kernels)
# ----------------------------------------------------------------------------------------------
def act_fwd(u: torch.Tensor, act: str) -> torch.Tensor:
    if act == "none":
        return u
    if act == "relu":
        return torch.relu(u)
    if act == "relu6":
        return u.clamp(0.0, 6.0)
    if act == "hardswish":
        return F.hardswish(u)
    if act == "silu":
        return F.silu(u)
    if act == "hardsigmoid":
        return F.hardsigmoid(u)
    if act == "sigmoid":
        return torch.sigmoid(u)
    raise ValueError(f"act: unknown activation {act!r}")


def act_bwd(u: torch.Tensor, grad: torch.Tensor, act: str) -> torch.Tensor:
    """d act(u) / du * grad, evaluated at the pre-activation ``u``."""
    zero = torch.zeros_like(grad)
    if act == "none":
        return grad
    if act == "relu":  # threshold_backward: 0 where u <= 0 (a NaN passes)
        return torch.where(u <= 0, zero, grad)
    if act == "relu6":  # hardtanh_backward: 0 where u <= 0 or u >= 6 (a NaN passes)
        return torch.where((u <= 0) | (u >= 6), zero, grad)
    if act == "hardswish":  # hardswish_backward: 0 up to -3, u/3 + 1/2 on (-3, 3), 1 from 3 (a NaN passes)
        return torch.where(u <= -3, zero, torch.where(u < 3, grad * (u / 3 + 0.5), grad))
    if act == "silu":
        s = torch.sigmoid(u)
        return grad * s * (1 + u * (1 - s))
    if act == "hardsigmoid":  # hardsigmoid_backward: 1/6 strictly inside (-3, 3) (a NaN gives 0)
        return torch.where((u > -3) & (u < 3), grad / 6, zero)
    if act == "sigmoid":
        s = torch.sigmoid(u)
        return grad * s * (1 - s)
    raise ValueError(f"act: unknown activation {act!r}")


# ----------------------------------------------------------------------------------------------
# dwconv_bn_act primitives
# ----------------------------------------------------------------------------------------------
def _conv(x: torch.Tensor, weight: torch.Tensor, stride: int, dilation: int) -> torch.Tensor:
    k = weight.shape[-1]
    return F.conv2d(_acc(x), _acc(weight), None, stride, padding_for(k, dilation), dilation, x.shape[1])


def _bcast(v: torch.Tensor) -> torch.Tensor:
    return v.view(1, -1, 1, 1)


def dwconv_bn_act_fwd(
    x: torch.Tensor,
    weight: torch.Tensor,
    mean: torch.Tensor,
    invstd: torch.Tensor,
    gamma: torch.Tensor,
    beta: torch.Tensor,
    stride: int,
    dilation: int,
    act: str,
) -> torch.Tensor:
    """y = act(gamma * (conv(x) - mean) * invstd + beta). Eval forward (running stats) and the training
    apply pass (batch stats) are this same function."""
    z = _conv(x, weight, stride, dilation)
    u = (z - _bcast(mean)) * _bcast(invstd) * _bcast(gamma) + _bcast(beta)
    return act_fwd(u, act).to(x.dtype).contiguous(memory_format=memory_format_of(x))


def dwconv_bn_stats(
    x: torch.Tensor, weight: torch.Tensor, stride: int, dilation: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and biased variance of z = conv(x), fp32 [C] each."""
    z = _conv(x, weight, stride, dilation)
    var, mean = torch.var_mean(z, dim=(0, 2, 3), correction=0)
    return mean, var


def _grad_u(grad_y, x, weight, mean, invstd, gamma, beta, stride, dilation, act):
    """Recompute z from x; return (g = dL/du, xhat)."""
    z = _conv(x, weight, stride, dilation)
    xhat = (z - _bcast(mean)) * _bcast(invstd)
    u = xhat * _bcast(gamma) + _bcast(beta)
    return act_bwd(u, _acc(grad_y), act), xhat


def dwconv_bn_act_bwd_reduce(
    grad_y: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    mean: torch.Tensor,
    invstd: torch.Tensor,
    gamma: torch.Tensor,
    beta: torch.Tensor,
    stride: int,
    dilation: int,
    act: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel (sum g, sum g * xhat) with g = dL/du; these are d beta and d gamma."""
    g, xhat = _grad_u(grad_y, x, weight, mean, invstd, gamma, beta, stride, dilation, act)
    return g.sum(dim=(0, 2, 3)), (g * xhat).sum(dim=(0, 2, 3))


def dwconv_bn_act_bwd_apply(
    grad_y: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    mean: torch.Tensor,
    invstd: torch.Tensor,
    gamma: torch.Tensor,
    beta: torch.Tensor,
    mean_g: torch.Tensor,
    mean_g_xhat: torch.Tensor,
    stride: int,
    dilation: int,
    act: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """dz = gamma * invstd * (g - mean_g - xhat * mean_g_xhat); dx = conv^T(dz), dweight = corr(dz, x).
    The xhat term is exactly zero where mean_g_xhat is zero, even for a non-finite xhat.

    Training passes mean_g = sum g / M and mean_g_xhat = sum g*xhat / M (M = N*Ho*Wo, or the global
    count under SyncBatchNorm); eval mode (statistics are constants) passes zeros.
    """
    g, xhat = _grad_u(grad_y, x, weight, mean, invstd, gamma, beta, stride, dilation, act)
    # A zero mean term (eval) contributes exactly zero, as in native's eval backward, which has no such term: an
    # Inf/NaN xhat (from an Inf/NaN input) must not poison dz where native's gradient stays finite.
    mgx = _bcast(mean_g_xhat)
    dz = _bcast(gamma * invstd) * (g - _bcast(mean_g) - torch.where(mgx == 0, 0, xhat * mgx))
    k = weight.shape[-1]
    pad = padding_for(k, dilation)
    xf = _acc(x)
    dx = torch.nn.grad.conv2d_input(xf.shape, _acc(weight), dz, stride, pad, dilation, x.shape[1])
    dw = torch.nn.grad.conv2d_weight(xf, weight.shape, dz, stride, pad, dilation, x.shape[1])
    return dx.to(x.dtype).contiguous(memory_format=memory_format_of(x)), dw.to(weight.dtype).contiguous()


# ----------------------------------------------------------------------------------------------
# squeeze_excite primitives (the two FCs run in PyTorch inside the composite op)
# ----------------------------------------------------------------------------------------------
def se_pool(x: torch.Tensor) -> torch.Tensor:
    """Per-(n, c) spatial mean, fp32 [N, C]."""
    return _acc(x).mean(dim=(2, 3))


def se_scale(x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """y = x * s[n, c]; s is the fp32 [N, C] gate."""
    y = _acc(x) * s[:, :, None, None]
    return y.to(x.dtype).contiguous(memory_format=memory_format_of(x))


def se_bwd_reduce(grad_y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Per-(n, c) sum over H, W of grad_y * x, fp32 [N, C] (the gradient of the gate)."""
    return (_acc(grad_y) * _acc(x)).sum(dim=(2, 3))


def se_bwd_apply(grad_y: torch.Tensor, s: torch.Tensor, dpooled: torch.Tensor) -> torch.Tensor:
    """dx = grad_y * s[n, c] + dpooled[n, c] / (H * W); s, dpooled fp32 [N, C]."""
    hw = grad_y.shape[2] * grad_y.shape[3]
    dx = _acc(grad_y) * s[:, :, None, None] + (dpooled / hw)[:, :, None, None]
    return dx.to(grad_y.dtype).contiguous(memory_format=memory_format_of(grad_y))
