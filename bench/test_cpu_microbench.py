"""pytest-benchmark microbenchmarks on the CPU: eval forward of one small depthwise layer (MobileNetV3-Large's
``dw_c72_56x56_k5s2d1_relu`` layer at batch 8, fp32, channels_last) by the reference, the C++ host twin (backend
``cuda`` on CPU tensors) and PyTorch eager (NCHW and channels_last).

Each case checks what it timed: the timed call's output is the layer's (within fp32 rounding of an fp64 truth), and
with timing on, every round took a positive, finite time. Speed goals live in the benchmarks (bench/*.py), not here.
testpaths (pyproject.toml) is tests/, so a bare ``pytest`` does not collect this file; ``make test`` runs it with
``--benchmark-disable`` (one untimed call per provider: the correctness check only). To time:

    pytest bench/test_cpu_microbench.py --benchmark-only
"""

from __future__ import annotations

import copy
import math

import pytest
import torch

from bench.common import Setup, build_module, build_native
from mnet_ext._backend import available_backends
from mnet_ext.layers import LayerConfig
from tests.helpers import ALLOW_MISSING_ENV, ROUNDING_TOL, required_backends, scaled_error

LAYER = LayerConfig("dwconv_bn_act", 72, 56, 56, kernel_size=5, stride=2, act="relu")
SETUP = Setup(torch.device("cpu"), torch.float32, 8, torch.channels_last)
PROVIDERS = ["mnet_ext_reference", "mnet_ext_cuda", "eager_nchw", "eager_channels_last"]


@pytest.mark.parametrize("provider", PROVIDERS)
def test_eval_forward(benchmark, provider):
    if provider == "mnet_ext_cuda" and (why := available_backends("cpu")["cuda"]):
        if "cuda" in required_backends("cpu"):  # never time a fallback under the host twin's name
            pytest.fail(f"host twin required but unavailable: {why} (to skip instead: {ALLOW_MISSING_ENV}=cuda)")
        pytest.skip(f"host twin unavailable: {why}")
    fmt = torch.contiguous_format if provider == "eager_nchw" else torch.channels_last
    native = build_native(LAYER, SETUP, fmt)
    module = build_module(LAYER, provider, native).eval()
    truth = copy.deepcopy(native).double().eval()
    x = torch.randn(SETUP.batch, LAYER.channels, LAYER.height, LAYER.width).contiguous(memory_format=fmt)
    benchmark.extra_info.update(layer=LAYER.name, batch=SETUP.batch, threads=torch.get_num_threads())
    with torch.no_grad():
        y = benchmark(module, x)
        y_truth = truth(x.double())
    err = scaled_error(y, y_truth)
    assert err <= ROUNDING_TOL[torch.float32], f"{provider}: scaled error {err:.3g} vs the fp64 truth"
    if benchmark.enabled:
        times = benchmark.stats.stats
        assert times.rounds >= 1 and 0 < times.min <= times.max and math.isfinite(times.max), times.as_dict()
