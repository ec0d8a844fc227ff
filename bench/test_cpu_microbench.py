"""pytest-benchmark microbenchmarks on the CPU: eval forward of one small depthwise layer (MobileNetV3-Large's
``dw_c72_56x56_k5s2d1_relu`` layer at batch 8, fp32, channels_last) by the reference, the C++ host twin (backend
``cuda`` on CPU tensors) and PyTorch eager (NCHW and channels_last). Not collected by default (testpaths is tests):

    pytest bench/test_cpu_microbench.py --benchmark-only
"""

from __future__ import annotations

import pytest
import torch

from bench.common import Setup, build_module, build_native
from mnet_ext._backend import available_backends
from mnet_ext.layers import LayerConfig

LAYER = LayerConfig("dwconv_bn_act", 72, 56, 56, kernel_size=5, stride=2, act="relu")
SETUP = Setup(torch.device("cpu"), torch.float32, 8, torch.channels_last)
PROVIDERS = ["mnet_ext_reference", "mnet_ext_cuda", "eager_nchw", "eager_channels_last"]


@pytest.mark.parametrize("provider", PROVIDERS)
def test_eval_forward(benchmark, provider):
    if provider == "mnet_ext_cuda" and (why := available_backends("cpu")["cuda"]):
        pytest.skip(f"host twin unavailable: {why}")
    fmt = torch.contiguous_format if provider == "eager_nchw" else torch.channels_last
    native = build_native(LAYER, SETUP, fmt)
    module = build_module(LAYER, provider, native).eval()
    x = torch.randn(SETUP.batch, LAYER.channels, LAYER.height, LAYER.width).contiguous(memory_format=fmt)
    benchmark.extra_info.update(layer=LAYER.name, batch=SETUP.batch, threads=torch.get_num_threads())
    with torch.no_grad():
        benchmark(module, x)
