"""mnet_ext: fused depthwise conv + BatchNorm + activation and squeeze-excitation for MobileNet V1/V2/V3.

Quick start::

    import torchvision, mnet_ext
    model = mnet_ext.fuse(torchvision.models.mobilenet_v3_large(), verbose=True)

See ``docs/op_contract.md`` for the ops and README.md for backends and results.
"""

from __future__ import annotations

import torch

__version__ = "0.1.0"

_MIN_TORCH = (2, 11)


def _torch_version() -> tuple[int, int]:
    major, minor = torch.__version__.split("+")[0].split(".")[:2]
    return int(major), int(minor)


if _torch_version() < _MIN_TORCH:
    raise ImportError(
        f"mnet_ext needs torch >= {'.'.join(map(str, _MIN_TORCH))} (tested 2.11-2.14); found {torch.__version__}"
    )

from mnet_ext import functional, models  # noqa: E402
from mnet_ext._backend import available_backends, use_backend  # noqa: E402
from mnet_ext.fuse import FuseReport, convert_sync_batchnorm, explain_fuse, fuse, unfuse  # noqa: E402
from mnet_ext.modules import FusedConvBNAct, FusedSqueezeExcitation  # noqa: E402

__all__ = [
    "FuseReport",
    "FusedConvBNAct",
    "FusedSqueezeExcitation",
    "available_backends",
    "convert_sync_batchnorm",
    "explain_fuse",
    "functional",
    "fuse",
    "models",
    "unfuse",
    "use_backend",
]
