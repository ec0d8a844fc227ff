"""Smoke tests of bench/bench_cpu.py's session-5 parts: the per-call overhead table (the BatchNorm fold the model
profile times is the product's, tested in tests/test_fuse.py)."""

from __future__ import annotations

import pytest

from bench import bench_cpu
from tests.helpers import backend_param

pytestmark = pytest.mark.parametrize("backend", [backend_param("cuda")])


def test_overhead_table(backend):
    table = bench_cpu.overhead(rounds=1, per_round=10).splitlines()
    assert len(table) == 4 and table[2].startswith("| dwconv_bn_act") and table[3].startswith("| squeeze_excite")
    assert all("nan" not in line and "inf" not in line for line in table)
