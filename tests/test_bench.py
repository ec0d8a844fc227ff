"""Smoke tests of the benchmark scripts (bench/): each main() with --quick on the CPU into a temporary directory,
then the CSV's columns and rows, and the plots made from it. Sizes are tiny (batch 2, 32x32): these check the
plumbing, not the numbers. ``--device cpu`` also on a GPU machine (scripts/gpu_run.sh times the GPU)."""

from __future__ import annotations

import csv
import pathlib

import pytest
import torch

from bench import bench_dwconv_bn_act, bench_models, bench_squeeze_excite, common, plot
from mnet_ext._backend import available_backends
from mnet_ext.layers import unique_layers
from tests.helpers import required_backends

QUICK = ["--quick", "--device", "cpu", "--no-progress"]
MODEL = "mobilenet_v3_small"  # has both ops; the smallest model
PROVIDERS = ["eager_nchw", "eager_channels_last", "mnet_ext_reference", "copy"]
# the C++ extension's CPU host twin; when required but broken, its rows say "skipped" and the tests fail
if available_backends("cpu")["cuda"] is None or "cuda" in required_backends("cpu"):
    PROVIDERS.insert(3, "mnet_ext_cuda")


@pytest.fixture(autouse=True)
def _restore_threads():
    threads = torch.get_num_threads()  # --quick sets 1 thread
    yield
    torch.set_num_threads(threads)


def read(path: pathlib.Path) -> tuple[list[str], list[dict[str, str]]]:
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        return list(reader.fieldnames or []), list(reader)


def n_layers(op: str) -> int:
    return sum(cfg.kind == op for cfg in unique_layers((MODEL,), 32))


@pytest.mark.parametrize(
    "script, op, modes",
    [
        (bench_dwconv_bn_act, "dwconv_bn_act", ["eval", "fwd_bwd", "wgrad"]),
        (bench_squeeze_excite, "squeeze_excite", ["eval", "bwd", "wgrad"]),  # wgrad: skipped rows for SE
    ],
)
def test_op_bench_quick(tmp_path, script, op, modes):
    argv = [*QUICK, "--models", MODEL, "--modes", ",".join(modes), "--providers", ",".join(PROVIDERS),
            "--out", str(tmp_path)]
    assert script.main(argv) == 0
    columns, rows = read(tmp_path / f"{op}.csv")
    assert columns == common.COLUMNS
    assert len(rows) == n_layers(op) * len(modes) * len(PROVIDERS)
    assert {r["provider"] for r in rows} == set(PROVIDERS)
    for r in rows:
        assert r["op"] == op and r["device"].startswith("CPU") and r["commit"] and r["torch"] == torch.__version__
        skip_se_wgrad = op == "squeeze_excite" and r["mode"] == "wgrad"
        assert r["status"] == ("skipped" if skip_se_wgrad else "ok"), r
        if r["status"] == "ok":
            assert float(r["ms"]) > 0 and float(r["gbps"]) > 0 and int(r["bytes"]) > 0
            if r["provider"].startswith("mnet_ext"):
                assert float(r["speedup_vs_eager_channels_last"]) > 0
        else:
            assert r["reason"]  # never skipped silently
    assert "Geomean speedup" in (tmp_path / f"{op}.md").read_text()
    assert plot.main([str(tmp_path)]) == 0
    assert (tmp_path / f"{op}_eval_speedup.png").stat().st_size > 0
    assert (tmp_path / f"{op}_eval_bandwidth.png").stat().st_size > 0


def test_unavailable_provider_is_a_row(tmp_path):
    """Triton on CPU tensors is only an interpreter: skipped with the reason, not silently dropped."""
    argv = [*QUICK, "--models", MODEL, "--modes", "eval", "--providers", "eager_channels_last,mnet_ext_triton",
            "--layers", "c16_", "--out", str(tmp_path)]
    assert bench_dwconv_bn_act.main(argv) == 0
    _, rows = read(tmp_path / "dwconv_bn_act.csv")
    triton_rows = [r for r in rows if r["provider"] == "mnet_ext_triton"]
    assert triton_rows and all(r["status"] == "skipped" and "interpreter" in r["reason"] for r in triton_rows)


def test_models_bench_quick(tmp_path):
    argv = [*QUICK, "--models", MODEL, "--providers", "eager,fused", "--out", str(tmp_path)]
    assert bench_models.main(argv) == 0
    columns, rows = read(tmp_path / "models.csv")
    assert columns == bench_models.COLUMNS
    assert [(r["task"], r["provider"]) for r in rows] == [("infer", "eager"), ("infer", "fused"),
                                                          ("train", "eager"), ("train", "fused")]
    for r in rows:
        assert r["status"] == "ok", r
        assert float(r["images_per_s"]) > 0 and r["peak_mem_mb"] == "n/a" and r["peak_mem_source"].startswith("n/a")
    assert plot.main([str(tmp_path)]) == 0
    assert (tmp_path / "models_throughput.png").stat().st_size > 0


@pytest.mark.slow
def test_compile_provider_one_layer(tmp_path):
    """torch.compile of the native module (eval) and of conv2d_weight (wgrad), one tiny layer."""
    argv = [*QUICK, "--models", MODEL, "--modes", "eval,wgrad", "--providers", "eager_channels_last,compile",
            "--layers", "c16_", "--out", str(tmp_path)]
    assert bench_dwconv_bn_act.main(argv) == 0
    _, rows = read(tmp_path / "dwconv_bn_act.csv")
    assert [r["status"] for r in rows if r["provider"] == "compile"] == ["ok", "ok"], rows
