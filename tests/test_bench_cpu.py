"""Smoke tests of bench/bench_cpu.py's session-5 parts: the per-call overhead table, and the what-if fold of the
1x1 convolutions' BatchNorm that the model profile times (it must compute the same model)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from bench import bench_cpu
from mnet_ext.layers import MODEL_BUILDERS
from tests.helpers import backend_param

pytestmark = pytest.mark.parametrize("backend", [backend_param("cuda")])


def test_fold_pointwise_bn_computes_the_same_model(backend):
    torch.manual_seed(0)
    model = MODEL_BUILDERS["mobilenet_v3_small"]().eval()
    for m in model.modules():  # non-trivial statistics, so that a wrong fold shows
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.normal_(0, 0.1)
            m.running_var.uniform_(0.5, 2.0)
    folded = bench_cpu._fold_pointwise_bn(model)
    pointwise_bns = [s for s in folded.modules() if isinstance(s, nn.Sequential) and len(s) >= 2
                     and isinstance(s[0], nn.Conv2d) and s[0].kernel_size == (1, 1)
                     and isinstance(s[1], nn.BatchNorm2d)]
    assert not pointwise_bns and any(isinstance(m, nn.BatchNorm2d) for m in model.modules())  # the original stays
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), model(x), rtol=1e-4, atol=1e-4)


def test_overhead_table(backend):
    table = bench_cpu.overhead(rounds=1, per_round=10).splitlines()
    assert len(table) == 4 and table[2].startswith("| dwconv_bn_act") and table[3].startswith("| squeeze_excite")
    assert all("nan" not in line and "inf" not in line for line in table)
