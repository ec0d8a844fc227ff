"""Helpers shared by the op files."""

from __future__ import annotations

import torch
from torch import Tensor

from mnet_ext.reference import memory_format_of


def dense_like(grad: Tensor, ref: Tensor) -> Tensor:
    """Backends read NCHW- or channels_last-contiguous tensors; autograd may hand us other strides."""
    if grad.is_contiguous() or grad.is_contiguous(memory_format=torch.channels_last):
        return grad
    return grad.contiguous(memory_format=memory_format_of(ref))
