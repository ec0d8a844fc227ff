"""Activations and their derivatives for the Triton kernels, selected by a ``tl.constexpr`` id.

``act_fwd(u, ACT)`` and ``act_bwd(u, grad, ACT)`` are ``@triton.jit`` helpers inlined into the kernels; the
branch on ``ACT`` is resolved at compile time, so each specialisation carries only its own activation. The
derivative conventions at the kinks are those of ``mnet_ext.reference.act_bwd`` (PyTorch's backward kernels).
All arithmetic is fp32 (callers upcast before calling).
"""

from __future__ import annotations

import triton
import triton.language as tl

# Host name -> constexpr id passed as ``ACT`` to the kernels.
ACT_IDS: dict[str, int] = {
    "none": 0,
    "relu": 1,
    "relu6": 2,
    "hardswish": 3,
    "silu": 4,
    "hardsigmoid": 5,
    "sigmoid": 6,
}


def act_id(act: str) -> int:
    """The constexpr id of activation ``act``; raises ValueError for an unknown name."""
    try:
        return ACT_IDS[act]
    except KeyError:
        raise ValueError(f"act: unknown activation {act!r}; expected one of {tuple(ACT_IDS)}") from None


@triton.jit
def _sigmoid(u):
    # 1 / (1 + exp(-u)): exp overflows to inf for u << 0 and the result is then exactly 0, as torch's.
    return 1.0 / (1.0 + tl.exp(-u))


@triton.jit
def _clamp(u, lo, hi):
    # NaN-propagating min/max (two FMNMX.NAN on a GPU), as torch.clamp keeps a NaN input NaN; the default
    # tl.minimum/tl.maximum may return the non-NaN operand (fmin/fmax).
    return tl.clamp(u, lo, hi, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def act_fwd(u, ACT: tl.constexpr):
    """act(u) for fp32 ``u`` of any shape; a NaN input gives NaN, as PyTorch's."""
    if ACT == 0:  # none
        return u
    elif ACT == 1:  # relu
        return tl.maximum(u, 0.0, propagate_nan=tl.PropagateNan.ALL)
    elif ACT == 2:  # relu6 (hardtanh(0, 6))
        return _clamp(u, 0.0, 6.0)
    elif ACT == 3:  # hardswish: u * relu6(u + 3) / 6
        return u * _clamp(u + 3.0, 0.0, 6.0) / 6.0
    elif ACT == 4:  # silu
        return u * _sigmoid(u)
    elif ACT == 5:  # hardsigmoid: relu6(u + 3) / 6
        return _clamp(u + 3.0, 0.0, 6.0) / 6.0
    else:  # 6: sigmoid
        return _sigmoid(u)


@triton.jit
def act_bwd(u, grad, ACT: tl.constexpr):
    """act'(u) * grad for fp32 ``u``, ``grad`` of the same shape; kinks and NaN as in ``reference.act_bwd`` (each
    test written as PyTorch's backward kernel writes it, so a NaN ``u`` takes PyTorch's branch)."""
    if ACT == 0:  # none
        return grad
    elif ACT == 1:  # relu: threshold_backward, 0 where u <= 0
        return tl.where(u <= 0.0, 0.0, grad)
    elif ACT == 2:  # relu6: hardtanh_backward, 0 where u <= 0 or u >= 6
        return tl.where((u <= 0.0) | (u >= 6.0), 0.0, grad)
    elif ACT == 3:  # hardswish: 0 up to -3, u/3 + 1/2 on (-3, 3), 1 from 3
        return tl.where(u <= -3.0, 0.0, tl.where(u < 3.0, grad * (u / 3.0 + 0.5), grad))
    elif ACT == 4:  # silu: s * (1 + u * (1 - s))
        s = _sigmoid(u)
        return grad * s * (1.0 + u * (1.0 - s))
    elif ACT == 5:  # hardsigmoid: 1/6 strictly inside (-3, 3)
        return tl.where((u > -3.0) & (u < 3.0), grad / 6.0, 0.0)
    else:  # 6: sigmoid: s * (1 - s)
        s = _sigmoid(u)
        return grad * s * (1.0 - s)
