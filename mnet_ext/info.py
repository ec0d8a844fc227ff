"""``python -m mnet_ext.info`` (or ``mnet-ext-info``): versions, what the extension was built with (and for which
GPU architectures), which backends run here."""

from __future__ import annotations

import argparse
import importlib
import platform

import torch

import mnet_ext
from mnet_ext._backend import available_backends


def _version(module: str) -> str:
    try:
        return importlib.import_module(module).__version__
    except Exception as exc:  # any import failure is reported, not raised
        return f"not importable ({type(exc).__name__})"


def collect() -> dict[str, str]:
    info = {
        "mnet_ext": mnet_ext.__version__,
        "python": platform.python_version(),
        "torch": f"{torch.__version__} (CUDA {torch.version.cuda})",
        "torchvision": _version("torchvision"),
        "triton": _version("triton"),
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else "none visible",
    }
    try:
        from mnet_ext import _C

        info["extension mnet_ext._C"] = f"built; CUDA kernels: {_C.WITH_CUDA}; archs: {_C.CUDA_ARCHS or '-'}"
    except Exception as exc:  # a missing or broken build is information here
        info["extension mnet_ext._C"] = f"not available ({type(exc).__name__}: {exc})"
    for device in ("cpu", "cuda"):
        for name, reason in available_backends(device).items():
            info[f"backend {name} on {device}"] = "usable" if reason is None else f"unusable: {reason}"
    return info


def main(argv: list[str] | None = None) -> int:
    argparse.ArgumentParser(prog="mnet-ext-info", description=__doc__).parse_args(argv)
    info = collect()
    width = max(map(len, info))
    for key, value in info.items():
        print(f"{key:<{width}}  {value}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
