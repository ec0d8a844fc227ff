"""Host twin (backend ``cuda`` on CPU tensors) vs PyTorch CPU eager for the eval forward of dwconv_bn_act.

PyTorch eager = nn.Conv2d (depthwise) + nn.BatchNorm2d (eval) + activation, timed in NCHW and channels_last;
the baseline is the faster of the two. Prints one CSV row per case (times in ms, best of repeats: this 2-core
machine is shared, so the minimum is the stable statistic).

    python bench/bench_host_twin.py [--threads 2] [--repeat 20]
"""

from __future__ import annotations

import argparse
import platform
import time

import torch
from torch import nn

from mnet_ext import reference as R
from mnet_ext.backends import cuda as B

ACTS = {"relu": nn.ReLU, "relu6": nn.ReLU6, "hardswish": nn.Hardswish, "silu": nn.SiLU, "none": nn.Identity}
# (N, C, H, k, stride, act): depthwise layers of MobileNetV2/V3 at 224x224, batch 8
CASES = [
    (8, 32, 112, 3, 1, "relu6"),
    (8, 96, 112, 3, 2, "relu6"),
    (8, 144, 56, 3, 1, "relu6"),
    (8, 72, 56, 5, 2, "relu"),
    (8, 240, 28, 5, 1, "hardswish"),
    (8, 480, 14, 3, 1, "hardswish"),
    (8, 672, 14, 5, 2, "hardswish"),
    (8, 960, 7, 5, 1, "hardswish"),
]


def bench(fn, repeat: int) -> float:
    fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--repeat", type=int, default=20)
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    cpu = platform.processor() or platform.machine()
    print(f"# {cpu}, torch {torch.__version__}, threads {args.threads}, {args.dtype}")
    print("N,C,H,k,stride,act,eager_nchw_ms,eager_nhwc_ms,twin_nchw_ms,twin_nhwc_ms,speedup_best")
    for case in CASES:
        times = run_case(*case, dtype=dtype, repeat=args.repeat)
        print(
            ",".join(map(str, case))
            + ","
            + ",".join(f"{t:.3f}" for t in times)
            + f",{min(times[:2]) / min(times[2:]):.2f}"
        )


def run_case(n, c, h, k, s, act, dtype, repeat):
    conv = nn.Conv2d(c, c, k, s, R.padding_for(k, 1), groups=c, bias=False)
    bn = nn.BatchNorm2d(c)
    bn.running_mean.normal_(0, 0.1)
    bn.running_var.uniform_(0.5, 2.0)
    eager = nn.Sequential(conv, bn, ACTS[act]()).eval().to(dtype)
    invstd = torch.rsqrt(bn.running_var.float() + bn.eps)
    bnargs = (bn.running_mean.float(), invstd, bn.weight.detach().float(), bn.bias.detach().float())
    x = torch.randn(n, c, h, h).to(dtype)
    xcl = x.contiguous(memory_format=torch.channels_last)
    w = conv.weight.detach()
    with torch.inference_mode():
        e1 = bench(lambda: eager(x), repeat)
        eager_cl = eager.to(memory_format=torch.channels_last)
        e2 = bench(lambda: eager_cl(xcl), repeat)
        t1 = bench(lambda: B.dwconv_bn_act_fwd(x, w, *bnargs, s, 1, act), repeat)
        t2 = bench(lambda: B.dwconv_bn_act_fwd(xcl, w, *bnargs, s, 1, act), repeat)
    return e1, e2, t1, t2


if __name__ == "__main__":
    main()
