"""bench/diag_gpu.py without a GPU: the ncu ``--csv --page details`` parser on hand-written samples in ncu's format
(both the 15-column layout and the newer one with rule columns), the figures derived from them, the summary built
from synthetic step outputs, the case plans, and the primitive calls' plumbing on the CPU host twin."""

from __future__ import annotations

import csv
import math
import pathlib

import pytest
import torch

from bench import diag_gpu as dg

HEAD15 = ('"ID","Process ID","Process Name","Host Name","Kernel Name","Context","Stream","Block Size","Grid Size",'
          '"Device","CC","Section Name","Metric Name","Metric Unit","Metric Value"')
HEAD20 = HEAD15 + ',"Rule Name","Rule Type","Rule Description","Estimated Speedup Type","Estimated Speedup"'
KERNEL = "void mnet::dev::fwd_mma_kernel<__nv_bfloat16, 3, 1, 28>(mnet::DwParams, mnet::MmaTilePlan)"


def _row(launch: str, section: str, metric: str, unit: str, value: str, rule: tuple[str, str, str] = ("", "", ""),
         cols: int = 20) -> str:
    fields = [launch, "4242", "python3", "127.0.0.1", KERNEL, "1", "7", "(96, 1, 1)", "(6272, 9, 1)", "0", "9.0",
              section, metric, unit, value]
    if cols == 20:
        fields += [*rule, "", ""]
    return ",".join(f'"{f}"' for f in fields)


C72 = next(c for c in dg.NCU_CASES if c.key == "cuda_fwd_c72")
IN_BYTES = 2 * 256 * 72 * 56 * 56  # 115,605,504


def sample_details(cols: int = 20) -> str:
    """ncu output as the device prints it: progress lines, then the CSV (thousands separators, base units)."""
    lines = ["==PROF== Connected to process 4242 (/usr/bin/python3.12)",
             '==PROF== Profiling "fwd_mma_kernel" - 0: 0%....50%....100% - 38 passes',
             "==PROF== Disconnected from process 4242",
             HEAD20 if cols == 20 else HEAD15]
    r = lambda *a, **k: lines.append(_row(*a, cols=cols, **k))  # noqa: E731
    r("0", "GPU Speed Of Light Throughput", "Duration", "nsecond", "477,312")
    r("0", "GPU Speed Of Light Throughput", "DRAM Throughput", "%", "13.52")
    r("0", "Launch Statistics", "Registers Per Thread", "register/thread", "128")
    r("0", "Occupancy", "Achieved Occupancy", "%", "31.44")
    r("0", "Occupancy", "Theoretical Occupancy", "%", "39.06")
    r("0", "Command line profiler metrics", "dram__bytes_read.sum", "byte", "231,211,008")
    r("0", "Command line profiler metrics", "dram__bytes_write.sum", "Mbyte", "115.61")
    r("0", "Command line profiler metrics", "gpu__time_duration.sum", "usecond", "477.31")
    r("0", "Command line profiler metrics", "lts__t_requests_srcunit_tex_op_read.sum", "", "7,225,344")
    r("0", "Command line profiler metrics", "lts__t_sectors_srcunit_tex_op_read.sum", "sector", "7,225,344")
    r("0", "Command line profiler metrics", "l1tex__t_requests_pipe_lsu_mem_global_op_st.sum", "", "112,896")
    r("0", "Command line profiler metrics", "l1tex__t_sectors_pipe_lsu_mem_global_op_st.sum", "sector", "3,612,672")
    r("0", "Command line profiler metrics", "l1tex__t_sectors_pipe_lsu_mem_local_op_ld.sum", "sector", "0")
    r("0", "Command line profiler metrics", "l1tex__t_sectors_pipe_lsu_mem_local_op_st.sum", "sector", "n/a")
    r("0", "Command line profiler metrics", "smsp__inst_executed.sum", "inst", "18,063,360")
    r("0", "Command line profiler metrics",
      "smsp__average_warps_issue_stalled_long_scoreboard_per_issue_active.ratio", "", "9.5")
    r("0", "Command line profiler metrics", "smsp__average_warps_issue_stalled_barrier_per_issue_active.ratio", "",
      "0.2")
    r("0", "Command line profiler metrics", "smsp__average_warps_issue_stalled_wait_per_issue_active.ratio", "",
      "3.25")
    if cols == 20:
        r("0", "MemoryWorkloadAnalysis_Tables", "", "", "",
          rule=("UncoalescedGlobalAccess", "OPT", "This kernel has uncoalesced global accesses resulting in a total "
                "of 3612672 excessive sectors (75% of the total 4816896 sectors)."))
    r("0", "Command line profiler metrics", "smsp__inst_executed_op_ldgsts.sum", "inst", "")  # printed empty
    # a second launch: its values (even a metric launch 0 lacks) stay out of launch 0's figures
    lines.append(_row("1", "GPU Speed Of Light Throughput", "Duration", "nsecond", "1", cols=cols))
    lines.append(_row("1", "Occupancy", "Block Limit Registers", "block", "4", cols=cols))
    return "\n".join(lines) + "\n"


@pytest.mark.parametrize("cols", [15, 20])
def test_parse_ncu_details(cols):
    rows = dg.parse_ncu_csv(sample_details(cols))
    assert len(rows) == 21 + (cols == 20)  # 19 metrics of launch 0, 2 of launch 1, the rule
    first = rows[0]
    assert (first.launch, first.kernel, first.grid, first.block) == ("0", KERNEL, "(6272, 9, 1)", "(96, 1, 1)")
    assert (first.section, first.metric, first.unit, first.value) == (
        "GPU Speed Of Light Throughput", "Duration", "nsecond", 477312.0)
    values = dg.metric_values(rows)
    assert values["dram__bytes_read.sum"] == 231211008.0
    assert values["dram__bytes_write.sum"] == pytest.approx(115.61e6)  # Mbyte -> bytes
    assert values["gpu__time_duration.sum"] == pytest.approx(477310.0)  # usecond -> ns
    assert values["Duration"] == 477312.0  # launch 0's, not launch 1's
    assert "l1tex__t_sectors_pipe_lsu_mem_local_op_st.sum" not in values  # n/a
    assert "smsp__inst_executed_op_ldgsts.sum" not in values and "Block Limit Registers" not in values
    rules = [r for r in rows if r.rule]
    assert [r.rule for r in rules] == (["UncoalescedGlobalAccess"] if cols == 20 else [])


def test_parse_ncu_without_table_or_with_repeated_header():
    assert dg.parse_ncu_csv("==PROF== Disconnected from process 1\nsome program output\n") == []
    text = sample_details(15) + HEAD15 + "\n" + _row("2", "Occupancy", "Achieved Occupancy", "%", "50", cols=15)
    rows = dg.parse_ncu_csv(text)
    assert [r.launch for r in rows][-1] == "2" and all(r.launch != "ID" for r in rows)


def test_derived_ncu_figures():
    d = dg.derived_ncu(dg.parse_ncu_csv(sample_details()), C72, static_sass=10.0)
    assert d["duration_us"] == pytest.approx(477.31)
    assert d["dram_read_over_ideal"] == pytest.approx(231211008 / IN_BYTES)  # 2.0: every input byte read twice
    assert d["dram_write_over_ideal"] == pytest.approx(115.61e6 / IN_BYTES)
    assert d["dram_gbps"] == pytest.approx((231211008 + 115.61e6) / 477310.0)
    assert d["l2_sectors_per_req_read"] == 1.0
    assert d["l1_sectors_per_req_st"] == 32.0
    assert d["l2_sectors_per_req_write"] is None  # not reported: None, not a guess
    assert d["local_sectors"] == 0.0  # the ld half is 0, the st half n/a
    assert d["achieved_occupancy_pct"] == 31.44 and d["theoretical_occupancy_pct"] == 39.06
    assert d["registers"] == 128.0
    assert d["thread_inst_per_output"] == pytest.approx(32 * 18063360 / (256 * 72 * 56 * 56))
    assert d["top_stalls"] == "long_scoreboard 9.5, wait 3.2, barrier 0.2"


def test_ncu_case_markdown_lists_metrics_and_rules():
    text = dg.ncu_case_markdown(dg.parse_ncu_csv(sample_details()))
    assert "| Occupancy | Achieved Occupancy | 31.44 | % |" in text
    assert "UncoalescedGlobalAccess (OPT): This kernel has uncoalesced" in text
    assert "| 1 |" not in text  # the second launch is not tabled


def test_ncu_command_flags():
    cmd = dg.ncu_command(C72, "python3", full=True)
    joined = " ".join(cmd)
    for flag in ("--profile-from-start off", "--clock-control none", "--kernel-name regex:fwd_mma_kernel",
                 "--launch-count 1", "--csv", "--page details", "--section WarpStateStats"):
        assert flag in joined
    assert cmd[-5:] == ["-m", "bench.diag_gpu", "ncu-target", "--case", "cuda_fwd_c72"]
    assert "gpu__time_duration.sum" in cmd[cmd.index("--metrics") + 1]
    plain = dg.ncu_command(C72, "python3", full=False)
    assert "--metrics" not in plain and "--print-units" not in plain and "MemoryWorkloadAnalysis_Tables" not in plain


def test_sweep_cases_hold_the_elements_fixed():
    cases = dg.sweep_cases()
    assert [c.stride for c in cases] == [1] * 8 + [2] * 8
    assert [c.channels for c in cases[:8]] == list(dg.SWEEP_CHANNELS)
    for c in cases:
        assert abs(c.in_elems - dg.SWEEP_ELEMENTS) <= 0.02 * dg.SWEEP_ELEMENTS, c
    assert cases[8].out_hw == (28, 28) and cases[0].out_hw == (56, 56)


def test_ncu_case_bytes():
    bwd = next(c for c in dg.NCU_CASES if c.what == "cuda_bwd_apply")
    assert bwd.ideal_bytes() == (2 * IN_BYTES, IN_BYTES)
    assert next(c for c in dg.NCU_CASES if c.what == "copy").ideal_bytes() == (IN_BYTES, IN_BYTES)


def _write_csv(path: pathlib.Path, columns: list[str], rows: list[dict[str, object]]) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, columns)
        w.writeheader()
        w.writerows(rows)


def test_summary_from_synthetic_outputs(tmp_path):
    base = {"stride": 1, "channels": 72, "batch": 256, "height": 56, "width": 56, "bytes": 2 * IN_BYTES}
    _write_csv(tmp_path / "sweep.csv", dg.SWEEP_COLUMNS, [
        {**base, "provider": "copy", "status": "ok", "ms_bench": 0.07, "ms_graph": 0.065},
        {**base, "provider": "cuda", "status": "ok", "ms_bench": 0.477, "ms_prim": 0.47, "ms_graph": 0.44,
         "host_us_module": 30, "host_us_prim": 9, "pct_copy_bench": 14.7, "pct_copy_graph": 14.8,
         "detail": "cuda: dwconv_bn_act_fwd"},
        {**base, "provider": "triton", "status": "error", "detail": "RuntimeError: boom"},
    ])
    _write_csv(tmp_path / "host.csv", dg.HOST_COLUMNS, [
        {"layer": "dw_c184", "backend": "triton", "mode": "eval", "status": "ok", "enqueue_us": 400, "wall_us": 420,
         "gpu_us": 60, "kernels_per_call": 3}])
    (tmp_path / "ncu_cuda_fwd_c72.csv").write_text(sample_details())
    (tmp_path / "ncu_triton_fwd_c72.csv").write_text("==ERROR== something failed\n")
    (tmp_path / "ncu_triton_fwd_c72.log").write_text("==ERROR== Failed to profile kernel\n")
    (tmp_path / "status.env").write_text("sweep_status=0\nncu_status=0\n")
    text = dg.summary(tmp_path)
    assert "`sweep_status=0 ncu_status=0`" in text
    assert "| 72 | 256 | 231 | 0.07/0.065 | 14.7/14.8 | 0.477/0.47/0.44 | 30/9 |" in text
    assert "Triton paths seen" not in text  # only from rows that ran
    assert "triton C=72 s1: error RuntimeError: boom" in text
    assert "| dw_c184 | triton | eval | ok | 400 | 420 | 60 | 3 | yes |" in text
    assert "| figure | cuda_fwd_c72 |" in text and "| kernel | fwd_mma_kernel |" in text
    assert "| l2_sectors_per_req_read | 1 |" in text and "| top_stalls | long_scoreboard 9.5" in text
    assert "no rows parsed: see ncu_triton_fwd_c72.log (last lines: ==ERROR== Failed to profile kernel)" in text


def test_summary_without_any_data(tmp_path):
    text = dg.summary(tmp_path)
    assert "no sweep data" in text and "no ncu data" in text and "no host data" in text


@pytest.mark.parametrize("what", ["fwd", "stats", "bwd_apply", "copy"])
def test_primitive_calls_run_on_the_host_twin(what):
    """The argument lists ncu-target passes to each primitive, checked on the CPU host twin (tiny shape)."""
    case = dg.DwCase(8, 6, 5, 2, 2)
    out = dg.primitive_call("cuda", what, case, device="cpu")()
    first = out[0] if isinstance(out, tuple) else out
    shape = {"fwd": (2, 8, 3, 3), "stats": (8,), "bwd_apply": (2, 8, 6, 5), "copy": (2, 8, 6, 5)}[what]
    assert tuple(first.shape) == shape
    assert torch.isfinite(first.float()).all() and not math.isclose(first.float().abs().sum().item(), 0.0)
