"""Helpers shared by the op files."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from mnet_ext.reference import memory_format_of


def dense_like(grad: Tensor, ref: Tensor) -> Tensor:
    """Backends read NCHW- or channels_last-contiguous tensors; autograd may hand us other strides."""
    if grad.is_contiguous() or grad.is_contiguous(memory_format=torch.channels_last):
        return grad
    return grad.contiguous(memory_format=memory_format_of(ref))


def new_output(x: Tensor, shape: tuple[int, ...]) -> Tensor:
    """An uninitialised result of ``shape`` for input ``x``, laid out as native modules lay theirs out.

    A non-empty result takes x's layout (NCHW or channels_last). An empty x is contiguous in every format, so its
    strides decide, as in native: its empty convolution is ``x * w[0]`` viewed to the output shape and BatchNorm
    and the activations are elementwise, so the result keeps x's strides when the shape is unchanged and is
    NCHW-contiguous otherwise (measured on torch 2.14).
    """
    if x.numel() == 0:
        return torch.empty_like(x) if tuple(shape) == tuple(x.shape) else x.new_empty(shape)
    return torch.empty(shape, dtype=x.dtype, device=x.device, memory_format=memory_format_of(x))


def autocast_off(t: Tensor) -> contextlib.AbstractContextManager:
    """Autocast disabled for ``t``'s device while the backends run (they take the dtypes they are given); no context
    at all when it is off already: entering one costs microseconds, a real share of a small layer on a CPU."""
    device = t.device.type
    return torch.autocast(device, enabled=False) if torch.is_autocast_enabled(device) else contextlib.nullcontext()


def transforming() -> bool:
    """Whether a ``torch.func`` transform (grad, vmap, ...) is active: only ``setup_context``-style autograd Functions
    run under one. (A private torch API, stable since torch 2.0; recheck on upgrades.)"""
    return torch._C._functorch.peek_interpreter_stack() is not None


def eager_function(name: str, body: Callable, setup: Callable, backward: Callable) -> Callable[..., Any]:
    """An op's body with its registered autograd (``setup(ctx, inputs, output, direct=True)``, ``backward``) as the
    ``apply`` of a plain ``autograd.Function``, which eager mode runs without the custom op's dispatch and autograd
    layers (they cost as much as a small layer's kernels on a CPU). ``torch.compile`` traces the custom op itself.

    Two classes of one body: torch binds the arguments of a Function that has a ``setup_context`` with
    ``inspect.signature`` on every call (~55 us on a CPU core, more than a small layer's GPU time), so eager mode runs
    the ``forward(ctx, ...)`` style, and only a ``torch.func`` transform, which requires ``setup_context``, the other.
    """

    class Transformable(torch.autograd.Function):
        forward = staticmethod(body)

        @staticmethod
        def setup_context(ctx, inputs, output):
            setup(ctx, inputs, output, direct=True)

    class Eager(torch.autograd.Function):
        @staticmethod
        def forward(ctx, *inputs):
            output = body(*inputs)
            setup(ctx, inputs, output, direct=True)
            return output

    for cls, cls_name in ((Eager, name), (Transformable, f"{name}ForTransforms")):
        cls.backward = staticmethod(backward)
        cls.__name__ = cls.__qualname__ = cls_name

    def apply(*inputs: Any) -> Any:
        return (Transformable if transforming() else Eager).apply(*inputs)

    return apply
