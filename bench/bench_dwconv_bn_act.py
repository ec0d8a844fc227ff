"""Benchmark fused depthwise conv + BatchNorm + activation against eager PyTorch, torch.compile and a device copy.

Every unique depthwise layer of the requested MobileNets, modes eval / train_fwd / bwd / fwd_bwd / wgrad, one CSV
row per layer/mode/provider (see bench/README.md and bench/common.py for columns and bytes per mode):

    python -m bench.bench_dwconv_bn_act --dtype bf16 --batch 256 --out bench/results/h100
    python -m bench.bench_dwconv_bn_act --quick            # CPU smoke: batch 2, resolution 32
"""

from __future__ import annotations

import pathlib
import sys

if __package__ in (None, ""):  # run as a file: make `bench` importable
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from bench import common  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    return common.main("dwconv_bn_act", argv, __doc__)


if __name__ == "__main__":
    sys.exit(main())
