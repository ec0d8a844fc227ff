"""Smoke tests of the command-line tools on CPU: info and profile."""

from __future__ import annotations

import pytest
import torch

from mnet_ext import info, profile


@pytest.fixture
def one_thread():
    """One torch thread (spinning OpenMP threads make a loaded 2-core machine crawl), restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_info_reports_versions_build_and_backends(capsys):
    info.main()
    out = capsys.readouterr().out
    for key in ("torch", "extension mnet_ext._C", "backend reference on cpu", "backend cuda on cpu"):
        assert key in out


def test_profile_cli_checks_times_and_plots(tmp_path, capsys, one_thread):
    png = tmp_path / "profile.png"
    code = profile.main(["--model", "mobilenet_v3_small", "--batch", "2", "--resolution", "32", "--mode", "train",
                         "--device", "cpu", "--backend", "reference", "--plot", str(png)])
    out = capsys.readouterr().out
    assert code == 0
    assert "these are CPU numbers" in out and "whole model" in out and "features.1.block.0" in out
    assert png.stat().st_size > 0
