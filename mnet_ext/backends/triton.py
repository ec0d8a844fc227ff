"""The ``triton`` backend: the eight primitives of ``docs/op_contract.md`` as Triton kernels
(``triton_kernels/``, installed as ``mnet_ext.triton_kernels``), for CUDA tensors, or CPU tensors under Triton's
interpreter (TRITON_INTERPRET=1); plus ``dwconv_bn_act_fwd_eval``, the eval op's forward (tensor cores where
supported; the training forward keeps ``dwconv_bn_act_fwd``).

Importing this module compiles nothing and touches no GPU; kernels are compiled on first call.
"""

from __future__ import annotations

import os

from mnet_ext.triton_kernels.dwconv_bn_act import (
    dwconv_bn_act_bwd_apply,
    dwconv_bn_act_bwd_reduce,
    dwconv_bn_act_fwd,
    dwconv_bn_act_fwd_eval,
    dwconv_bn_stats,
)
from mnet_ext.triton_kernels.squeeze_excite import se_bwd_apply, se_bwd_reduce, se_pool, se_scale

__all__ = [
    "dwconv_bn_act_bwd_apply",
    "dwconv_bn_act_bwd_reduce",
    "dwconv_bn_act_fwd",
    "dwconv_bn_act_fwd_eval",
    "dwconv_bn_stats",
    "se_bwd_apply",
    "se_bwd_reduce",
    "se_pool",
    "se_scale",
    "unavailable_reason",
]


def unavailable_reason(device_type: str) -> str | None:
    """None when the Triton kernels can run on tensors of ``device_type``; otherwise why not."""
    if device_type == "cuda":
        import torch

        if not torch.cuda.is_available():
            return "no CUDA device is available to torch"
        return None
    if device_type == "cpu":
        if os.environ.get("TRITON_INTERPRET") == "1":
            return None
        return "Triton runs CPU tensors only in its interpreter (set TRITON_INTERPRET=1 before importing triton)"
    return f"Triton kernels here target CUDA tensors (or CPU tensors in the interpreter), not {device_type!r}"
