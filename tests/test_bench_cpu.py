"""Smoke tests of bench/bench_cpu.py's session-5 parts: the per-call overhead table (the BatchNorm fold the model
profile times is the product's, tested in tests/test_fuse.py)."""

from __future__ import annotations

import csv

import pytest

from bench import bench_cpu
from tests.helpers import backend_param

pytestmark = pytest.mark.parametrize("backend", [backend_param("cuda")])


def test_overhead_table(backend):
    table = bench_cpu.overhead(rounds=1, per_round=10).splitlines()
    assert len(table) == 4 and table[2].startswith("| dwconv_bn_act") and table[3].startswith("| squeeze_excite")
    assert all("nan" not in line and "inf" not in line for line in table)


def test_layer_rows_report_bandwidth(backend, tmp_path):
    """One dw and one SE layer, eval, one round: every row carries its copy rate and the md its per-layer table."""
    out = tmp_path / "run"
    assert bench_cpu.main(["--batches", "1", "--threads", "1", "--modes", "eval", "--kinds", "dw,se", "--rounds", "1",
                           "--filter", "c960_7x7", "--models", "mobilenet_v3_large", "--out", str(out)]) == 0
    with open(out.with_suffix(".csv"), newline="") as f:
        rows = list(csv.DictReader(f))
    assert {r["kind"] for r in rows} == {"dwconv_bn_act", "squeeze_excite"}
    for r in rows:
        assert float(r["copy_ms"]) > 0 and float(r["fused_gbs"]) > 0 and 0 < float(r["pct_copy_bw"]) < 1000
    md = out.with_suffix(".md").read_text()
    assert "% of copy rate" in md and all(r["layer"] in md for r in rows)
