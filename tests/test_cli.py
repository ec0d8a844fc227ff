"""The command-line tools on CPU: info, and profile with its per-layer-type counts (checked against the MobileNet
V1 paper's Tables 2, 6 and 7) and its timing statistics (``mnet_ext._timing``, with an injected fake clock)."""

from __future__ import annotations

import copy

import pytest
import torch
import torchvision
from torch import nn

import mnet_ext
from mnet_ext import _timing, info, profile


@pytest.fixture
def one_thread():
    """One torch thread (spinning OpenMP threads make a loaded 2-core machine crawl), restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_info_reports_versions_build_and_backends(capsys):
    info.main([])
    out = capsys.readouterr().out
    for key in ("torch", "extension mnet_ext._C", "backend reference on cpu", "backend cuda on cpu"):
        assert key in out


def test_profile_cli_checks_times_and_plots(tmp_path, capsys, one_thread):
    pytest.importorskip("matplotlib")
    png = tmp_path / "profile.png"
    code = profile.main(["--model", "mobilenet_v3_small", "--batch", "2", "--resolution", "32", "--mode", "train",
                         "--device", "cpu", "--backend", "reference", "--plot", str(png), "--min-time", "0",
                         "--min-reps", "2"])
    out = capsys.readouterr().out
    assert code == 0
    assert "these are CPU numbers" in out and "whole model" in out and "features.1.block.0" in out
    for category in profile.CATEGORIES:
        assert f"\n{category} " in out
    assert png.stat().st_size > 0


def test_profile_cli_refuses_width_for_a_model_without_one(capsys):
    with pytest.raises(SystemExit):
        profile.main(["--model", "mobilenet_v3_large", "--width", "0.5", "--counts-only"])
    assert "--width" in capsys.readouterr().err


# The MobileNet V1 paper (Howard et al. 2017): Table 2 (alpha 1, rho 224: % of Mult-Adds and of parameters per
# layer type; its first-conv Mult-Adds entry reads 1.19 %, but then its rows sum to 99.29 %: the digits are
# transposed, 112*112*32*27 / 569M = 1.91 %) and Tables 6/7 (Mult-Adds in millions, parameters in millions).
PAPER_TABLE_2 = {"1x1 conv": (94.86, 74.59), "dw conv": (3.06, 1.06), "first conv": (1.91, 0.02),
                 "classifier": (0.18, 24.33)}
PAPER_TABLES_6_7 = [(1.0, 224, 569, 4.2), (0.75, 224, 325, 2.6), (0.5, 224, 149, 1.3), (0.25, 224, 41, 0.5),
                    (1.0, 192, 418, 4.2), (1.0, 160, 290, 4.2), (1.0, 128, 186, 4.2)]


def _counts(model: nn.Module, resolution: int) -> list[profile.Unit]:
    units, _ = profile.count_units(model, mnet_ext.fuse(copy.deepcopy(model)), torch.zeros(1, 3, resolution,
                                                                                         resolution))
    return units


def test_v1_resources_per_layer_type_match_the_paper_table_2(one_thread):
    model = mnet_ext.models.mobilenet_v1()
    units = _counts(model, 224)
    rows = {r.category: r for r in profile.by_category(units)}
    macs = sum(u.macs for u in units)
    # the paper's parameters are conv and FC weights (no FC bias, no norms): with those its shares match to 0.01 %
    weights = {c: 0 for c in rows}
    for _, module, category in profile.find_units(model):
        weights[category] += sum(m.weight.numel() for m in module.modules() if isinstance(m, (nn.Conv2d, nn.Linear)))
    for category, (paper_macs, paper_params) in PAPER_TABLE_2.items():
        # the paper gives two decimals: half a unit of the last one, plus float noise
        assert 100 * rows[category].macs / macs == pytest.approx(paper_macs, abs=0.0051), category
        assert 100 * weights[category] / sum(weights.values()) == pytest.approx(paper_params, abs=0.0051), category
    assert rows["dw conv"].layers == 13 and rows["1x1 conv"].layers == 13 and rows["SE"].layers == 0


@pytest.mark.parametrize("width, resolution, paper_macs, paper_params", PAPER_TABLES_6_7)
def test_v1_width_and_resolution_match_the_paper_tables_6_7(width, resolution, paper_macs, paper_params, one_thread):
    units = _counts(mnet_ext.models.mobilenet_v1(width), resolution)
    assert sum(u.macs for u in units) / 1e6 == pytest.approx(paper_macs, abs=0.75)  # the paper rounds to 1M
    assert sum(u.params for u in units) / 1e6 == pytest.approx(paper_params, abs=0.05)  # ... and to 0.1M


@pytest.mark.parametrize("builder, expected", [
    (torchvision.models.mobilenet_v2, {"first conv": 1, "dw conv": 17, "1x1 conv": 34 + 17, "SE": 0,
                                       "classifier": 1, "other": 0}),
    (torchvision.models.mobilenet_v3_large, {"first conv": 1, "dw conv": 15, "1x1 conv": 14 + 15 + 1, "SE": 8,
                                             "classifier": 1, "other": 1}),
])
def test_layer_types_cover_every_parameter_once(builder, expected):
    """Each parameter of the model sits in exactly one layer; V2's projection BatchNorm (a lone module after its
    1x1 conv, counted as a layer of its own) belongs to the 1x1 convs."""
    model = builder()
    units = profile.find_units(model)
    counts = {c: sum(cat == c for _, _, cat in units) for c in profile.CATEGORIES}
    assert counts == expected
    owned = [id(p) for _, module, _ in units for p in module.parameters()]
    assert sorted(owned) == sorted(id(p) for p in model.parameters())


def test_counted_bytes_shrink_where_layers_are_fused(one_thread):
    """Native dw conv+BN+ReLU reads and writes the activation three times, the fused op once: bytes per image."""
    units = _counts(mnet_ext.models.mobilenet_v1(), 64)
    dw = next(u for u in units if u.category == "dw conv" and u.shape[1:] == (32, 32, 32))
    a = 32 * 32 * 32 * 4
    assert dw.bytes_native == 6 * a and dw.bytes_fused == 2 * a
    assert all(u.bytes_fused == u.bytes_native for u in units if u.fused_kind is None)


class FakeClock:
    """A clock (seconds) that only the timed functions advance; records the order of calls. (Times come back with
    float rounding: compare with approx.)"""

    def __init__(self) -> None:
        self.now = 0.0
        self.calls: list[str] = []

    def __call__(self) -> float:
        return self.now

    def fn(self, name: str, durations_ms: list[float]):
        it = iter(durations_ms * 1000)

        def run() -> None:
            self.calls.append(name)
            self.now += next(it) / 1e3
        return run


CPU = torch.device("cpu")


def test_time_pair_interleaves_and_takes_per_pair_ratios():
    clock = FakeClock()
    t = _timing.time_pair(clock.fn("a", [2.0]), clock.fn("b", [1.0]), CPU, min_time=0, min_pairs=4, warmup=1,
                          clock=clock)
    assert clock.calls == ["a", "b", "a", "b", "b", "a", "a", "b", "b", "a"]  # warm-up, then A B, B A, ...
    assert (t.a.median, t.b.median, t.ratio.value) == pytest.approx((2.0, 1.0, 2.0)) and t.a.n == 4
    assert t.ratio.meaningful and t.ratio.format() == "  2.00x "


def test_time_pair_ratio_survives_a_load_change():
    """The machine gets 4x slower halfway: both candidates' times spread widely, their per-pair ratio does not."""
    clock = FakeClock()
    t = _timing.time_pair(clock.fn("a", [3.0] * 4 + [12.0] * 4), clock.fn("b", [1.0] * 4 + [4.0] * 4), CPU,
                          min_time=0, min_pairs=8, warmup=0, clock=clock)
    assert t.a.rel_iqr > 1 and t.b.rel_iqr > 1
    assert t.ratio.value == pytest.approx(3.0) and t.ratio.spread.rel_iqr < 1e-9 and t.ratio.meaningful


def test_time_pair_flags_scheduler_quanta_as_meaningless():
    """The issue's busy 2-core box: every call takes one or two 8 ms scheduler slices whatever its work."""
    clock = FakeClock()
    t = _timing.time_pair(clock.fn("native", [8.0, 16.0, 16.0, 8.0]), clock.fn("fused", [8.0]), CPU, min_time=0,
                          min_pairs=8, warmup=0, clock=clock)
    assert not t.ratio.meaningful and t.ratio.format().endswith("!")


def test_time_pair_runs_until_min_time_then_stops():
    clock = FakeClock()
    t = _timing.time_pair(clock.fn("a", [2.0]), clock.fn("b", [1.0]), CPU, min_time=0.010, min_pairs=1, warmup=0,
                          clock=clock)
    assert t.a.n == 4  # 3 ms per pair: 9 ms < 10 ms after three pairs, 12 ms after four
    t = _timing.time_pair(clock.fn("a", [2.0]), clock.fn("b", [1.0]), CPU, min_time=1.0, max_pairs=6, min_pairs=1,
                          warmup=0, clock=clock)
    assert t.a.n == 6
    with pytest.raises(ValueError, match="min_pairs"):
        _timing.time_pair(clock.fn("a", [1.0]), clock.fn("b", [1.0]), CPU, min_pairs=0, clock=clock)


def test_spread_is_median_and_interquartile_range():
    s = _timing.Spread.of([5.0, 1.0, 4.0, 2.0, 3.0])
    assert (s.median, s.q1, s.q3, s.n) == (3.0, 2.0, 4.0, 5)
    assert s.rel_iqr == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="samples"):
        _timing.Spread.of([])


def test_fused_table_marks_a_meaningless_speedup():
    def pair(ratios: list[float]) -> _timing.PairTiming:
        return _timing.PairTiming(_timing.Spread.of([2.0]), _timing.Spread.of([1.0]),
                                  _timing.Ratio(_timing.Spread.of(ratios)))

    noisy = profile.Unit("features.1.block.0", "dw conv", fused_kind="dwconv_bn_act", shape=(2, 16, 8, 8),
                         bytes_fused=100, pair=pair([1.0, 2.0, 3.0]))
    steady = profile.Unit("features.2.block.0", "dw conv", fused_kind="dwconv_bn_act", shape=(2, 16, 8, 8),
                          bytes_fused=100, pair=pair([2.0, 2.0, 2.1]))
    table = profile.format_fused_table([noisy, steady], {"model": pair([2.0]), "copy_gbps": 10.0})
    lines = table.splitlines()
    assert "2.00x!" in lines[1] and "2.00x " in lines[2] and "!" not in lines[2]
    assert any(line.startswith("! ") for line in lines)
    quiet = profile.format_fused_table([steady], {"model": pair([2.0]), "copy_gbps": 10.0})
    assert "!" not in quiet
