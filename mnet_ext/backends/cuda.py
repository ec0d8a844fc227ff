"""Backend ``cuda``: the C++ extension ``mnet_ext._C``.

Importing ``mnet_ext._C`` registers ``torch.ops.mnet_ext_cuda.*``: CUDA kernels for CUDA tensors (when built
with CUDA) and the host twin (same ``__host__ __device__`` math) for CPU tensors. The functions below are thin
wrappers with the signatures of ``mnet_ext.reference``; fake (meta) kernels are registered here so the ops
trace under ``torch.compile`` / ``opcheck``.

If ``mnet_ext._C`` cannot be imported, the ImportError propagates: the registry turns it into the reason.
"""

from __future__ import annotations

import torch
from torch import Tensor

from mnet_ext import _C  # noqa: F401  (registers the ops)
from mnet_ext.reference import memory_format_of, output_hw

_ops = torch.ops.mnet_ext_cuda


def unavailable_reason(device_type: str) -> str | None:
    if device_type == "cpu":
        return None
    if device_type == "cuda":
        if not _C.WITH_CUDA:
            return "mnet_ext._C was built without CUDA (CPU host twin only; rebuild with a CUDA toolkit)"
        if not torch.cuda.is_available():
            return "torch.cuda.is_available() is False"
        return None
    return f"the C++ extension serves only cpu and cuda tensors, not {device_type!r}"


# ----------------------------------------------------------------------------------------------
# dwconv_bn_act
# ----------------------------------------------------------------------------------------------
def dwconv_bn_act_fwd(
    x: Tensor,
    weight: Tensor,
    mean: Tensor,
    invstd: Tensor,
    gamma: Tensor,
    beta: Tensor,
    stride: int,
    dilation: int,
    act: str,
) -> Tensor:
    return _ops.dwconv_bn_act_fwd(x, weight, mean, invstd, gamma, beta, stride, dilation, act)


def dwconv_bn_stats(x: Tensor, weight: Tensor, stride: int, dilation: int) -> tuple[Tensor, Tensor]:
    return _ops.dwconv_bn_stats(x, weight, stride, dilation)


def dwconv_bn_act_bwd_reduce(
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
) -> tuple[Tensor, Tensor]:
    return _ops.dwconv_bn_act_bwd_reduce(grad_y, x, weight, mean, invstd, gamma, beta, stride, dilation, act)


def dwconv_bn_act_bwd_apply(
    grad_y: Tensor,
    x: Tensor,
    weight: Tensor,
    mean: Tensor,
    invstd: Tensor,
    gamma: Tensor,
    beta: Tensor,
    mean_g: Tensor,
    mean_g_xhat: Tensor,
    stride: int,
    dilation: int,
    act: str,
) -> tuple[Tensor, Tensor]:
    return _ops.dwconv_bn_act_bwd_apply(
        grad_y, x, weight, mean, invstd, gamma, beta, mean_g, mean_g_xhat, stride, dilation, act
    )


# ----------------------------------------------------------------------------------------------
# squeeze_excite
# ----------------------------------------------------------------------------------------------
def se_pool(x: Tensor) -> Tensor:
    return _ops.se_pool(x)


def se_scale(x: Tensor, s: Tensor) -> Tensor:
    return _ops.se_scale(x, s)


def se_bwd_reduce(grad_y: Tensor, x: Tensor) -> Tensor:
    return _ops.se_bwd_reduce(grad_y, x)


def se_bwd_apply(grad_y: Tensor, s: Tensor, dpooled: Tensor) -> Tensor:
    return _ops.se_bwd_apply(grad_y, s, dpooled)


# ----------------------------------------------------------------------------------------------
# fake kernels (shapes, dtypes and memory formats only)
# ----------------------------------------------------------------------------------------------
def _like(x: Tensor, h, w) -> Tensor:
    n, c = x.shape[0], x.shape[1]
    return torch.empty((n, c, h, w), dtype=x.dtype, device=x.device).contiguous(memory_format=memory_format_of(x))


def _vec(x: Tensor, *shape) -> Tensor:
    return x.new_empty(shape, dtype=torch.float32)


def _out_hw(x: Tensor, weight: Tensor, stride: int, dilation: int):
    return output_hw(x.shape[2], x.shape[3], weight.shape[-1], stride, dilation)


def _register_fakes() -> None:
    lib = "mnet_ext_cuda::"

    @torch.library.register_fake(lib + "dwconv_bn_act_fwd")
    def _(x, weight, mean, invstd, gamma, beta, stride, dilation, act):
        return _like(x, *_out_hw(x, weight, stride, dilation))

    @torch.library.register_fake(lib + "dwconv_bn_stats")
    def _(x, weight, stride, dilation):
        return _vec(x, x.shape[1]), _vec(x, x.shape[1])

    @torch.library.register_fake(lib + "dwconv_bn_act_bwd_reduce")
    def _(grad_y, x, weight, mean, invstd, gamma, beta, stride, dilation, act):
        return _vec(x, x.shape[1]), _vec(x, x.shape[1])

    @torch.library.register_fake(lib + "dwconv_bn_act_bwd_apply")
    def _(grad_y, x, weight, mean, invstd, gamma, beta, mean_g, mean_g_xhat, stride, dilation, act):
        return _like(x, x.shape[2], x.shape[3]), torch.empty_like(weight, memory_format=torch.contiguous_format)

    @torch.library.register_fake(lib + "se_pool")
    def _(x):
        return _vec(x, x.shape[0], x.shape[1])

    @torch.library.register_fake(lib + "se_scale")
    def _(x, s):
        return _like(x, x.shape[2], x.shape[3])

    @torch.library.register_fake(lib + "se_bwd_reduce")
    def _(grad_y, x):
        return _vec(x, x.shape[0], x.shape[1])

    @torch.library.register_fake(lib + "se_bwd_apply")
    def _(grad_y, s, dpooled):
        return _like(grad_y, grad_y.shape[2], grad_y.shape[3])


_register_fakes()
