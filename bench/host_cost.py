"""Host cost of the GPU code paths, measured on a CPU: the Python and torch calls a fused layer makes per call when
its tensors are on a GPU, without the GPU.

The first H200 run found the small layers host-bound (Triton's training forward of a 14 x 14 layer: 1.2-1.6 ms per
call, 0.09-0.14 ms as a CUDA graph replay), so this cost is worth tracking where no GPU is lent. Per call of one
tiny layer (2 x 16 x 4 x 4, fp32 channels_last), eval (no_grad) and a training step (forward and backward):

* cuda: the C++ backend on the path CUDA tensors take (``mnet_ext.functional``'s checks and torch calls, then the op
  bodies; the CPU's one-call path switched off), its host twin doing the tiny arithmetic;
* triton: the Triton backend with every kernel launch replaced by a no-op (interpreter), so the launchers' own Python
  and torch calls remain. Triton's launch itself (argument specialization, cache lookup, driver call) is not
  included: only a GPU measures it.

A device op that a GPU would launch (an allocation, a ``rsqrt``) costs its CPU host cost here, not a launch.
Native layers are not a column: on a CPU their convolution sets up a oneDNN primitive per call (~0.2 ms), which
says nothing of their cost on a GPU (the GPU benchmark's CUDA-graph column measures that).
Interleaved rounds, minimum per call (this machine is shared: the minimum is the stable statistic).

    python -m bench.host_cost [--rounds 30] [--per-round 100] [--out FILE.md]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import sys
from collections.abc import Callable, Iterator

os.environ.setdefault("TRITON_INTERPRET", "1")  # before anything imports triton: the launchers run on CPU tensors

import torch  # noqa: E402
from torch import nn  # noqa: E402

import mnet_ext  # noqa: E402
from bench.bench_cpu import time_interleaved  # noqa: E402
from mnet_ext import functional as MF  # noqa: E402

SHAPE = (2, 16, 4, 4)
PROVIDERS = ("cuda", "triton")


@contextlib.contextmanager
def gpu_path(provider: str) -> Iterator[None]:
    """Run the fused layers as they run on GPU tensors: the one-call CPU path off; for Triton, launches stubbed."""
    one_call = MF._in_one_call
    MF._in_one_call = lambda *args, **kwargs: False
    stubbed = contextlib.nullcontext()
    if provider == "triton":
        from triton.runtime import interpreter

        stubbed = _patched(interpreter.InterpretedFunction, "run", lambda self, *args, **kwargs: None)
    try:
        with stubbed:
            yield
    finally:
        MF._in_one_call = one_call


@contextlib.contextmanager
def _patched(owner: object, name: str, value: object) -> Iterator[None]:
    saved = getattr(owner, name)
    setattr(owner, name, value)
    try:
        yield
    finally:
        setattr(owner, name, saved)


def _layers() -> dict[str, nn.Module]:
    from torchvision.ops.misc import Conv2dNormActivation, SqueezeExcitation

    c = SHAPE[1]
    return {"dwconv_bn_act k3 hardswish": Conv2dNormActivation(c, c, 3, groups=c, activation_layer=nn.Hardswish),
            "squeeze_excite c16 s8": SqueezeExcitation(c, c // 2, scale_activation=nn.Hardsigmoid)}


def _call(module: nn.Module, provider: str, training: bool, per_round: int) -> Callable[[], None]:
    """``per_round`` calls of ``module`` on ``provider``'s path: eval under no_grad, or forward and backward."""
    torch.manual_seed(0)
    x = torch.randn(SHAPE).contiguous(memory_format=torch.channels_last)
    if training:
        x.requires_grad_()
    grad = torch.randn(SHAPE).contiguous(memory_format=torch.channels_last)

    def run() -> None:
        with gpu_path(provider), torch.set_grad_enabled(training):
            for _ in range(per_round):
                y = module(x)
                if training:
                    y.backward(grad)

    return run


def table(rounds: int, per_round: int) -> str:
    """The markdown table: us per call, one row per (layer, mode), one column per provider."""
    lines = ["| layer (2x16x4x4, fp32 channels_last) | mode | cuda path us | triton, launches stubbed, us |",
             "|---|---|---|---|"]
    for name, native in _layers().items():
        models = {p: mnet_ext.fuse(nn.Sequential(native), backend=p) for p in PROVIDERS}
        for mode in ("eval", "train step"):
            training = mode != "eval"
            calls = [_call(models[p].train(training), p, training, per_round) for p in PROVIDERS]
            times = [t * 1e3 / per_round for t in time_interleaved(calls, rounds, 120.0)]
            lines.append(f"| {name} | {mode} | " + " | ".join(f"{t:.1f}" for t in times) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=30, help="interleaved rounds (minimum over them)")
    parser.add_argument("--per-round", type=int, default=100, help="calls per provider and round")
    parser.add_argument("--out", help="also write the table (markdown, with the machine) to this file")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    text = table(args.rounds, args.per_round)
    print(text, end="")
    if args.out:
        head = (f"Host cost per call (bench/host_cost.py): {platform.processor() or platform.machine()}, "
                f"torch {torch.__version__}, Python {sys.version.split()[0]}, 1 thread, "
                f"{args.rounds} rounds x {args.per_round} calls, minimum.\n\n")
        with open(args.out, "w") as f:
            f.write(head + text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
