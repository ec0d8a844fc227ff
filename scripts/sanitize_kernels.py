"""A small run of every CUDA kernel of the ``cuda`` backend, for compute-sanitizer (memcheck, racecheck).

Covers each primitive in fp32 and bf16, NCHW and channels_last (with and without 16-byte channel vectors), every
kernel size, both strides, dilation 2, odd sizes and non-finite inputs; exits non-zero if the backend is unusable
so a missing build cannot pass as clean.
"""

from __future__ import annotations

import itertools
import sys

import torch

from mnet_ext._backend import load, unavailable_reason


def main() -> int:
    reason = unavailable_reason("cuda", "cuda")
    if reason is not None:
        print(f"cuda backend unusable: {reason}")
        return 2
    impl = load("cuda")
    torch.manual_seed(0)
    runs = 0
    # C = 37: the strip kernels (and channels_last with C % V != 0); C = 40 in channels_last: the staged band kernels
    # (16-byte vectors), H = 19 > 16 rows per band: two bands, the last one partial; in bf16 at dilation 1 the
    # forward runs the tensor-core fwd_mma_kernel instead (stride 2, Wo = 5: tile width 8, a 3-image group holding 2;
    # stride 1, Wo = 9: tile width 16, a 2-image group).
    shapes = ((False, 37, 11), (True, 37, 11), (True, 40, 19))  # (channels_last, C, H)
    for k, stride, dilation, dtype, (cl, c, h) in itertools.product((3, 5, 7), (1, 2), (1, 2),
                                                                    (torch.float32, torch.bfloat16), shapes):
        fmt = torch.channels_last if cl else torch.contiguous_format
        n, w = 2, 9
        x = torch.randn(n, c, h, w, device="cuda").to(dtype=dtype, memory_format=fmt)
        # Non-finite inputs send the tensor-core forward down its out-of-line exact recompute (rare path: its loads
        # from global x need the sanitizer as much as the fast path's).
        x[0, c // 2, 1, 1] = float("inf")
        x[n - 1, c - 1, h - 2, w - 3] = float("nan")
        weight = torch.randn(c, 1, k, k, device="cuda", dtype=dtype)
        vec = [torch.rand(c, device="cuda") + 0.5 for _ in range(6)]
        y = impl.dwconv_bn_act_fwd(x, weight, *vec[:4], stride, dilation, "hardswish")
        impl.dwconv_bn_stats(x, weight, stride, dilation)
        g = torch.randn_like(y)
        impl.dwconv_bn_act_bwd_reduce(g, x, weight, *vec[:4], stride, dilation, "relu6")
        impl.dwconv_bn_act_bwd_apply(g, x, weight, *vec, stride, dilation, "silu")
        s = torch.rand(n, c, device="cuda")
        impl.se_scale(x, s)
        impl.se_pool(x)
        impl.se_bwd_reduce(x, x)
        impl.se_bwd_apply(x, s, s)
        runs += 1
    torch.cuda.synchronize()
    print(f"ran every cuda-backend primitive in {runs} configurations")
    return 0


if __name__ == "__main__":
    sys.exit(main())
