"""GPU diagnosis of the depthwise kernels' gap to the memory roofline (``scripts/gpu_diag.sh`` runs it).

The first H200 run measured the bf16 channels_last eval forward (CUDA ``fwd_mma_kernel``, Triton
``_fwd_dot_kernel``) at 7-31 % (CUDA) and 2-25 % (Triton) of the copy bandwidth, where the static report
(``bench/kernel_report.py``: 10-30 SASS per output element) predicts memory-bound; Triton's eval was nearly flat at
0.4-0.68 ms even on 40 MB layers. Hypotheses, and the data here that decides each:

* **H1, channel-sliced access.** A CUDA block covers 8*GB channels (GB = 1-4 warps, 16 bytes per warp) of every
  pixel (pixel stride C*2 bytes), channel blocks the grid's slow axis: every warp load / store touches 32 different
  128-byte lines for 16 bytes each, and a line's other sectors are written by blocks far apart in time. Triton's
  TMA boxes have a 16-byte inner dimension too. Decided by: the ``sweep`` trend of % of copy over C at fixed bytes
  (H1 predicts it falls as C grows: C = 8 is a dense stream, C = 672 is 84 slices per pixel), and ncu's L2 sectors
  per request (1 = a 32-byte sector per 128-byte request: sliced; ~4 = whole lines) and DRAM bytes over the ideal
  (partial sectors re-read or written twice).
* **H2, no overlap of load and compute within a warp** (cp.async, wait_all, compute, store, next tile) at 9-21
  resident warps per SM. Decided by: ncu's warp stall breakdown (long_scoreboard / barrier / wait dominating with
  the DRAM throughput far below peak), achieved occupancy and issue-slot use, with coalescing fine (not H1).
* **H3, host / launch overhead** (Triton's launcher and TensorDescriptors, the torch.library op glue). Decided by:
  the ``sweep``'s do_bench time of the module (the benchmark's path) vs the primitive vs a CUDA graph replay of the
  primitive (no host in the loop), and the CPU enqueue time per call (``host``): host-bound when the enqueue time
  is at or above the graph's GPU time, and the do_bench time tracks the enqueue time, not the bytes.
* **H4, something pathological in the kernel** (the out-of-line NaN recompute taken for every tile, local memory,
  a fallback path). Decided by: ncu's executed instructions per output element against the static report's SASS
  count (several times over: extra work), local-memory sectors (spills), plain global loads in a kernel whose main
  path loads by cp.async (CUDA) or TMA (Triton) only (the recompute path's loads), and the sweep's record of which
  Triton path ran (``_fwd_dot_kernel`` or the ``_fwd_kernel`` fallback).

Subcommands (each writes into ``--out`` as it goes, so a timeout keeps what was done):

* ``sweep``: eval forward, bf16 channels_last, K3 stride 1 and 2, input 56x56, C in 8..672 with N*H*W*C fixed
  (``--elements``, default 64 Mi: 128 MiB of input), for the CUDA and Triton backends: do_bench of the fused module
  (as bench/common.py's ``mnet_ext_*`` providers) and of the backend primitive, a CUDA graph replaying the primitive,
  the CPU enqueue time per call of each; eager channels_last and a same-bytes device copy (do_bench and graph).
  -> ``sweep.csv``.
* ``ncu``: Nsight Compute on single launches (``NCU_CASES``), one ``ncu`` process per case under its own time cap,
  each running ``ncu-target`` (warm-up call outside the profiler range, then one call between cudaProfilerStart /
  Stop) -> ``ncu_<case>.csv`` (``--csv --page details``) and ``ncu_<case>.log``.
* ``host``: per-call CPU enqueue time, synchronised wall time and GPU kernel time (torch.profiler) of the CUDA and
  Triton eval and training (forward + backward) on one small and one large layer -> ``host.csv``,
  ``host_profile.txt`` (the profiler's top CPU ops per case).
* ``summary DIR``: ``diag_summary.md``: the tables above, one table per ncu case, the derived figures per
  hypothesis. Runs without a GPU (missing data is said to be missing).
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import io
import math
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

ROOT = pathlib.Path(__file__).resolve().parents[1]
STATIC_REPORTS = {"cuda": ROOT / "bench/results/static/kernel_report_cuda.json",
                  "triton": ROOT / "bench/results/static/triton_report.json"}

SWEEP_CHANNELS = (8, 16, 32, 64, 72, 128, 256, 672)
SWEEP_HW = 56
SWEEP_ELEMENTS = 64 << 20
SWEEP_COLUMNS = ["stride", "channels", "batch", "height", "width", "bytes", "provider", "status", "ms_bench",
                 "ms_prim", "ms_graph", "host_us_module", "host_us_prim", "gbps_graph", "pct_copy_bench",
                 "pct_copy_graph", "detail"]
HOST_COLUMNS = ["layer", "backend", "mode", "status", "enqueue_us", "wall_us", "gpu_us", "kernels_per_call",
                "detail"]


# ----------------------------------------------------------------------------------------------- cases
@dataclass(frozen=True)
class DwCase:
    """One depthwise layer at a batch: the shapes every step here builds its tensors from (bf16, channels_last)."""

    channels: int
    height: int
    width: int
    stride: int
    batch: int
    act: str = "relu"
    kernel: int = 3

    @property
    def name(self) -> str:
        return f"dw_c{self.channels}_{self.height}x{self.width}_k{self.kernel}s{self.stride}_n{self.batch}"

    @property
    def out_hw(self) -> tuple[int, int]:
        pad = (self.kernel - 1) // 2
        return ((self.height + 2 * pad - self.kernel) // self.stride + 1,
                (self.width + 2 * pad - self.kernel) // self.stride + 1)

    @property
    def in_elems(self) -> int:
        return self.batch * self.channels * self.height * self.width

    @property
    def out_elems(self) -> int:
        ho, wo = self.out_hw
        return self.batch * self.channels * ho * wo

    def layer(self):  # -> mnet_ext.layers.LayerConfig (imported lazily: torchvision is slow to import)
        from mnet_ext.layers import LayerConfig

        return LayerConfig("dwconv_bn_act", self.channels, self.height, self.width, self.kernel, self.stride, 1,
                           self.act)


def sweep_cases(elements: int = SWEEP_ELEMENTS, channels: Iterable[int] = SWEEP_CHANNELS,
                hw: int = SWEEP_HW) -> list[DwCase]:
    """Stride 1 first (a timeout keeps it whole), then stride 2; per C the batch that keeps N*H*W*C near
    ``elements``."""
    return [DwCase(c, hw, hw, s, max(1, round(elements / (hw * hw * c)))) for s in (1, 2) for c in channels]


@dataclass(frozen=True)
class NcuCase:
    """A single launch to profile: ``what`` picks the call (``ncu-target``), ``kernel`` the ncu name filter."""

    key: str
    what: str
    kernel: str
    case: DwCase

    def ideal_bytes(self) -> tuple[int, int]:
        """(read, write) bytes of the kernel's planned traffic (bf16): each tensor once."""
        a_in, a_out = 2 * self.case.in_elems, 2 * self.case.out_elems
        return {"cuda_fwd": (a_in, a_out), "triton_fwd": (a_in, a_out), "copy": (a_in, a_in),
                "cuda_stats": (a_in, 0), "cuda_bwd_apply": (a_in + a_out, a_in)}[self.what]

    def outputs(self) -> int:
        """Elements the kernel produces (the unit of instructions per element): y, dx, or the copy's elements;
        the statistics pass: the z it reduces."""
        return self.case.in_elems if self.what in ("copy", "cuda_bwd_apply") else self.case.out_elems


_C72 = DwCase(72, 56, 56, 1, 256)
NCU_CASES = (  # in order of value: a timeout loses the last
    NcuCase("cuda_fwd_c72", "cuda_fwd", "fwd_mma_kernel", _C72),
    NcuCase("copy_c72", "copy", "elementwise", _C72),
    NcuCase("triton_fwd_c72", "triton_fwd", "_fwd_dot_kernel", _C72),
    NcuCase("cuda_fwd_c16", "cuda_fwd", "fwd_mma_kernel", DwCase(16, 112, 112, 1, 256)),
    NcuCase("cuda_fwd_c672", "cuda_fwd", "fwd_mma_kernel", DwCase(672, 14, 14, 1, 256, "hardswish")),
    NcuCase("cuda_stats_c72", "cuda_stats", "stats_band_kernel", _C72),
    NcuCase("cuda_bwd_apply_c72", "cuda_bwd_apply", "bwd_apply_kernel", _C72),
)
NCU_SECTIONS = ("SpeedOfLight", "MemoryWorkloadAnalysis", "Occupancy", "WarpStateStats", "LaunchStats")
# The full command adds these (base units, the coalescing table's rules, explicit metrics: the "Command line profiler
# metrics" section). If this ncu rejects any of them, ncu fails before profiling; the step then reruns that case with
# the plain command and keeps the plain command for the rest.
NCU_FULL_SECTIONS = ("MemoryWorkloadAnalysis_Tables",)
NCU_METRICS = (
    "gpu__time_duration.sum", "dram__bytes_read.sum", "dram__bytes_write.sum",
    "lts__t_sectors_srcunit_tex_op_read.sum", "lts__t_requests_srcunit_tex_op_read.sum",
    "lts__t_sectors_srcunit_tex_op_write.sum", "lts__t_requests_srcunit_tex_op_write.sum",
    "l1tex__t_sectors_pipe_lsu_mem_global_op_ld.sum", "l1tex__t_requests_pipe_lsu_mem_global_op_ld.sum",
    "l1tex__t_sectors_pipe_lsu_mem_global_op_st.sum", "l1tex__t_requests_pipe_lsu_mem_global_op_st.sum",
    "l1tex__t_sectors_pipe_lsu_mem_local_op_ld.sum", "l1tex__t_sectors_pipe_lsu_mem_local_op_st.sum",
    "smsp__inst_executed.sum", "smsp__inst_executed_op_ldgsts.sum", "sm__warps_active.avg.pct_of_peak_sustained_active",
    "launch__registers_per_thread", "smsp__average_warp_latency_per_inst_issued.ratio",
    "regex:smsp__average_warps_issue_stalled_.*_per_issue_active\\.ratio",
)
HOST_CASES = (DwCase(184, 14, 14, 1, 256, "hardswish"), DwCase(64, 112, 112, 2, 256))


# ----------------------------------------------------------------------------------------------- ncu CSV parsing
@dataclass(frozen=True)
class NcuRow:
    """One row of ``ncu --csv --page details``: a metric (metric, unit, value) or a rule's message (rule_*)."""

    launch: str
    kernel: str
    block: str
    grid: str
    section: str
    metric: str
    unit: str
    value: float | None  # None: empty, "n/a" or text
    text: str  # the value as printed
    rule: str = ""
    rule_type: str = ""
    rule_text: str = ""


def parse_number(text: str) -> float | None:
    """ncu's printed number ("1,234,567.5", "n/a", "") as a float, or None."""
    try:
        return float(text.replace(",", ""))
    except ValueError:
        return None


def parse_ncu_csv(text: str) -> list[NcuRow]:
    """The rows of ``ncu --csv --page details`` output; other lines (``==PROF==`` progress, the program's own
    output) are skipped. Handles both the 15-column layout and the newer one with rule columns."""
    lines = text.splitlines()
    start = next((i for i, line in enumerate(lines) if line.startswith('"ID",')), None)
    if start is None:
        return []
    body = [line for line in lines[start:] if line.startswith('"')]
    rows = []
    for rec in csv.DictReader(io.StringIO("\n".join(body))):
        if rec.get("ID") == "ID":  # a repeated header (several result blocks)
            continue
        raw = (rec.get("Metric Value") or "").strip()
        rows.append(NcuRow(
            launch=rec.get("ID") or "", kernel=rec.get("Kernel Name") or "", block=rec.get("Block Size") or "",
            grid=rec.get("Grid Size") or "", section=rec.get("Section Name") or "",
            metric=rec.get("Metric Name") or "", unit=rec.get("Metric Unit") or "", value=parse_number(raw),
            text=raw, rule=rec.get("Rule Name") or "", rule_type=rec.get("Rule Type") or "",
            rule_text=rec.get("Rule Description") or ""))
    return rows


_UNIT_SCALE = {"byte": 1.0, "kbyte": 1e3, "mbyte": 1e6, "gbyte": 1e9, "nsecond": 1.0, "usecond": 1e3,
               "msecond": 1e6, "second": 1e9}


def in_base_units(row: NcuRow) -> float | None:
    """The value in bytes (byte units) or nanoseconds (time units); other units as printed."""
    if row.value is None:
        return None
    return row.value * _UNIT_SCALE.get(row.unit.lower(), 1.0)


def metric_values(rows: list[NcuRow]) -> dict[str, float]:
    """{metric name: value in base units} of the first profiled launch (section display names and raw metric
    names alike; the first occurrence wins)."""
    out: dict[str, float] = {}
    first = rows[0].launch if rows else ""
    for r in rows:
        if r.launch == first and r.metric and r.metric not in out:
            v = in_base_units(r)
            if v is not None:
                out[r.metric] = v
    return out


def _first(values: dict[str, float], *names: str) -> float | None:
    return next((values[n] for n in names if n in values), None)


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b == 0 else a / b


def derived_ncu(rows: list[NcuRow], case: NcuCase, static_sass: float | None = None) -> dict[str, object]:
    """The figures that decide the hypotheses, from one case's rows (None where ncu did not report the input)."""
    v = metric_values(rows)
    read, write = case.ideal_bytes()
    dram_r = _first(v, "dram__bytes_read.sum")
    dram_w = _first(v, "dram__bytes_write.sum")
    inst = _first(v, "smsp__inst_executed.sum")
    stalls = sorted(((k.removeprefix("smsp__average_warps_issue_stalled_").removesuffix("_per_issue_active.ratio"),
                      x) for k, x in v.items() if k.startswith("smsp__average_warps_issue_stalled_")),
                    key=lambda kv: -kv[1])
    return {
        "kernel": short_kernel(rows[0].kernel) if rows else "",
        "grid": rows[0].grid if rows else "",
        "block": rows[0].block if rows else "",
        "duration_us": _ratio(_first(v, "gpu__time_duration.sum", "Duration"), 1e3),
        "dram_read_over_ideal": _ratio(dram_r, read),
        "dram_write_over_ideal": _ratio(dram_w, write),
        "dram_gbps": _ratio((dram_r or 0) + (dram_w or 0), _first(v, "gpu__time_duration.sum", "Duration")),
        "l2_sectors_per_req_read": _ratio(_first(v, "lts__t_sectors_srcunit_tex_op_read.sum"),
                                          _first(v, "lts__t_requests_srcunit_tex_op_read.sum")),
        "l2_sectors_per_req_write": _ratio(_first(v, "lts__t_sectors_srcunit_tex_op_write.sum"),
                                           _first(v, "lts__t_requests_srcunit_tex_op_write.sum")),
        "l1_sectors_per_req_ld": _ratio(_first(v, "l1tex__t_sectors_pipe_lsu_mem_global_op_ld.sum"),
                                        _first(v, "l1tex__t_requests_pipe_lsu_mem_global_op_ld.sum")),
        "l1_sectors_per_req_st": _ratio(_first(v, "l1tex__t_sectors_pipe_lsu_mem_global_op_st.sum"),
                                        _first(v, "l1tex__t_requests_pipe_lsu_mem_global_op_st.sum")),
        "global_ld_requests": _first(v, "l1tex__t_requests_pipe_lsu_mem_global_op_ld.sum"),
        "ldgsts_inst": _first(v, "smsp__inst_executed_op_ldgsts.sum"),
        "local_sectors": _sum_present(v, "l1tex__t_sectors_pipe_lsu_mem_local_op_ld.sum",
                                      "l1tex__t_sectors_pipe_lsu_mem_local_op_st.sum"),
        "achieved_occupancy_pct": _first(v, "sm__warps_active.avg.pct_of_peak_sustained_active",
                                         "Achieved Occupancy"),
        "theoretical_occupancy_pct": _first(v, "Theoretical Occupancy"),
        "registers": _first(v, "launch__registers_per_thread", "Registers Per Thread"),
        "thread_inst_per_output": _ratio(None if inst is None else 32 * inst, case.outputs()),
        "static_sass_per_output": static_sass,
        "warp_cycles_per_inst": _first(v, "smsp__average_warp_latency_per_inst_issued.ratio",
                                       "Warp Cycles Per Issued Instruction"),
        "top_stalls": ", ".join(f"{k} {x:.1f}" for k, x in stalls[:4]),
    }


def short_kernel(name: str) -> str:
    """A kernel's function name without return type, namespaces, template arguments and parameters."""
    return name.removeprefix("void ").split("(")[0].split("<")[0].rsplit("::", 1)[-1]


def _sum_present(values: dict[str, float], *names: str) -> float | None:
    got = [values[n] for n in names if n in values]
    return sum(got) if got else None


def static_sass_per_output(case: NcuCase) -> float | None:
    """The static report's SASS per output element for this case's kernel and layer (bf16, NHWC), if recorded."""
    import json

    backend = "triton" if case.what.startswith("triton") else "cuda"
    try:
        records = json.loads(STATIC_REPORTS[backend].read_text())
    except (OSError, ValueError):
        return None
    prefix = f"dw_c{case.case.channels}_{case.case.height}x{case.case.width}_k{case.case.kernel}s{case.case.stride}"
    for r in records:
        if (r.get("kernel") == case.kernel and r.get("dtype") == "bf16" and r.get("layout") == "NHWC"
                and (r.get("layer") or "").startswith(prefix) and r.get("sass_per_output_elem") is not None):
            return float(r["sass_per_output_elem"])
    return None


# ----------------------------------------------------------------------------------------------- markdown
def fmt(v: object, digits: int = 3) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{digits}g}" if math.isfinite(v) else "-"
    return str(v)


def markdown_table(rows: list[dict[str, object]], columns: list[str]) -> str:
    out = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    out += ["| " + " | ".join(fmt(r.get(c)).replace("|", "/") for c in columns) + " |" for r in rows]
    return "\n".join(out) + "\n"


def ncu_case_markdown(rows: list[NcuRow], max_rule_chars: int = 400) -> str:
    """One profiled launch as a table of its metrics (section, metric, value, unit), then its rules' messages."""
    if not rows:
        return "no ncu rows\n"
    first = rows[0].launch
    metrics = [{"section": r.section, "metric": r.metric, "value": r.text, "unit": r.unit}
               for r in rows if r.launch == first and r.metric]
    text = [f"kernel `{rows[0].kernel}`, grid {rows[0].grid}, block {rows[0].block}\n",
            markdown_table(metrics, ["section", "metric", "value", "unit"])]
    rules = [r for r in rows if r.launch == first and r.rule and r.rule_text]
    if rules:
        text.append("ncu rules:\n")
        text += [f"- {r.rule} ({r.rule_type}): {r.rule_text[:max_rule_chars]}" for r in rules]
        text.append("")
    return "\n".join(text)


# ----------------------------------------------------------------------------------------------- GPU helpers
def _need_gpu(what: str) -> bool:
    import torch

    if not torch.cuda.is_available():
        print(f"{what}: skipped: no CUDA device (torch.cuda.is_available() is False)", file=sys.stderr)
        return False
    return True


def _tensors(case: DwCase, device: str = "cuda", seed: int = 0):
    """x, dy (bf16 channels_last) and the layer's parameters in the primitives' dtypes."""
    import torch

    torch.manual_seed(seed)
    dev, cl = device, torch.channels_last
    n, c = case.batch, case.channels
    ho, wo = case.out_hw
    x = torch.randn(n, c, case.height, case.width, device=dev, dtype=torch.bfloat16).contiguous(memory_format=cl)
    dy = torch.randn(n, c, ho, wo, device=dev, dtype=torch.bfloat16).contiguous(memory_format=cl)
    f32 = {"device": dev, "dtype": torch.float32}
    weight = torch.randn(c, 1, case.kernel, case.kernel, device=dev, dtype=torch.bfloat16) * 0.3
    mean, invstd = torch.randn(c, **f32) * 0.1, torch.rand(c, **f32) + 0.5
    gamma, beta = torch.rand(c, **f32) + 0.5, torch.randn(c, **f32) * 0.1
    return x, dy, weight, mean, invstd, gamma, beta


def primitive_call(backend: str, what: str, case: DwCase, device: str = "cuda") -> Callable[[], object]:
    """A no-argument call of one backend primitive on fresh tensors: ``fwd`` (the eval forward the op runs),
    ``stats`` or ``bwd_apply``; ``copy``: an elementwise kernel reading and writing x's bytes."""
    import torch

    from mnet_ext._backend import load

    x, dy, weight, mean, invstd, gamma, beta = _tensors(case, device)
    if what == "copy":
        out = torch.empty_like(x)
        return lambda: torch.mul(x, 1.0, out=out)  # a kernel (copy_ of equal dtypes is a memcpy, unprofiled)
    impl = load(backend)
    s, act = case.stride, case.act
    if what == "fwd":
        fwd = getattr(impl, "dwconv_bn_act_fwd_eval", impl.dwconv_bn_act_fwd)  # as mnet_ext.ops's eval op
        return lambda: fwd(x, weight, mean, invstd, gamma, beta, s, 1, act)
    if what == "stats":
        return lambda: impl.dwconv_bn_stats(x, weight, s, 1)
    if what == "bwd_apply":
        mean_g, mean_g_xhat = torch.randn_like(mean) * 1e-2, torch.randn_like(mean) * 1e-2
        return lambda: impl.dwconv_bn_act_bwd_apply(dy, x, weight, mean, invstd, gamma, beta, mean_g, mean_g_xhat,
                                                    s, 1, act)
    raise ValueError(f"what: expected fwd, stats, bwd_apply or copy, got {what!r}")


def enqueue_us(fn: Callable[[], object], calls: int = 20) -> float:
    """CPU microseconds per call to enqueue ``fn`` (no synchronisation between calls: the host's own cost, as long
    as nothing in ``fn`` waits for the GPU; if something does, this equals the GPU time)."""
    import torch

    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    t1 = time.perf_counter()
    torch.cuda.synchronize()
    return (t1 - t0) / calls * 1e6


def graph_ms_per_call(fn: Callable[[], object], timer, calls: int = 8) -> float:
    """ms per call of a CUDA graph replaying ``fn`` ``calls`` times (bench/common.py's graph_ms)."""
    from bench.common import graph_ms

    return graph_ms(lambda: [fn] * calls, timer)


def triton_path(case: DwCase) -> str:
    """Which kernel the Triton eval forward runs for ``case`` and its tile (the sweep's record for H4)."""
    import torch

    from mnet_ext.triton_kernels import dwconv_bn_act as tk

    x = torch.empty(case.batch, case.channels, case.height, case.width, device="cuda", dtype=torch.bfloat16,
                    memory_format=torch.channels_last)
    ho, wo = case.out_hw
    y = torch.empty(case.batch, case.channels, ho, wo, device="cuda", dtype=torch.bfloat16,
                    memory_format=torch.channels_last)
    if not tk._dot_fwd_supported(x, y, case.kernel, case.stride, 1):
        return "triton: _fwd_kernel (fallback)"
    t = tk._dot_tile(case.batch, ho, wo, case.kernel, case.stride)
    grid = (case.channels // 8, -(-wo // t.g), -(-case.batch // t.nb) * -(-ho // t.rh))
    return f"triton: _fwd_dot_kernel G{t.g} WA{t.wa} W1{t.w1} NB{t.nb} RH{t.rh} grid {grid}"


class RowFile:
    """CSV rows flushed as written (a timeout keeps them)."""

    def __init__(self, path: pathlib.Path, columns: list[str]) -> None:
        self.file = open(path, "w", newline="")  # noqa: SIM115  (closed in close())
        self.writer = csv.DictWriter(self.file, columns, extrasaction="ignore")
        self.writer.writeheader()
        self.file.flush()

    def write(self, row: dict[str, object]) -> None:
        self.writer.writerow({k: fmt(v, 4) if isinstance(v, float) else v for k, v in row.items()})
        self.file.flush()

    def close(self) -> None:
        self.file.close()


# ----------------------------------------------------------------------------------------------- sweep
def run_sweep(out: pathlib.Path, elements: int, budget_s: float, channels: tuple[int, ...]) -> int:
    if not _need_gpu("sweep"):
        return 0
    import torch

    from bench.common import Setup, Timer, build_module, build_native

    timer = Timer(torch.device("cuda"), warmup_ms=3.0, rep_ms=15.0)
    rows = RowFile(out / "sweep.csv", SWEEP_COLUMNS)
    t_end = time.monotonic() + budget_s
    for case in sweep_cases(elements, channels):
        base = {"stride": case.stride, "channels": case.channels, "batch": case.batch, "height": case.height,
                "width": case.width, "bytes": 2 * (case.in_elems + case.out_elems)}
        if time.monotonic() > t_end:
            rows.write({**base, "provider": "-", "status": "skipped", "detail": "sweep budget spent"})
            continue
        nbytes = base["bytes"]
        copy = _copy_times(nbytes, timer)
        rows.write({**base, "provider": "copy", "status": "ok", **copy, "gbps_graph": nbytes / copy["ms_graph"] / 1e6,
                    "pct_copy_bench": 100.0, "pct_copy_graph": 100.0})
        setup = Setup(torch.device("cuda"), torch.bfloat16, case.batch, torch.channels_last)
        cfg = case.layer()
        native = build_native(cfg, setup, torch.channels_last).eval()
        x = torch.randn(case.batch, case.channels, case.height, case.width, device="cuda",
                        dtype=torch.bfloat16).contiguous(memory_format=torch.channels_last)
        for provider in ("mnet_ext_cuda", "mnet_ext_triton", "eager_channels_last"):
            row = {**base, "provider": provider.removeprefix("mnet_ext_")}
            try:
                row.update(_sweep_provider(provider, case, cfg, native, x, timer, build_module))
                row["status"] = "ok"
                row["pct_copy_bench"] = 100 * copy["ms_bench"] / row["ms_bench"]
                if row.get("ms_graph"):
                    row["gbps_graph"] = nbytes / row["ms_graph"] / 1e6
                    row["pct_copy_graph"] = 100 * copy["ms_graph"] / row["ms_graph"]
            except Exception as exc:  # recorded in the row, never silent
                row.update(status="error", detail=f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
                           if str(exc) else type(exc).__name__)
            rows.write(row)
            torch.cuda.empty_cache()
        del x, native
        torch.cuda.empty_cache()
    rows.close()
    return 0


def _copy_times(nbytes: int, timer) -> dict[str, float]:
    """do_bench and graph ms of a device copy moving ``nbytes`` (reading and writing half each)."""
    import torch

    src = torch.empty(nbytes // 2, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)

    def copy() -> object:
        return dst.copy_(src)

    return {"ms_bench": timer(copy)[0], "ms_graph": graph_ms_per_call(copy, timer)}


def _sweep_provider(provider: str, case: DwCase, cfg, native, x, timer, build_module) -> dict[str, object]:
    import torch

    if provider == "eager_channels_last":
        def eager() -> object:
            with torch.no_grad():
                return native(x)
        return {"ms_bench": timer(eager)[0], "host_us_module": enqueue_us(eager)}
    backend = provider.removeprefix("mnet_ext_")
    module = build_module(cfg, provider, native).eval()

    def run_module() -> object:
        with torch.no_grad():
            return module(x)

    conv, bn = native[0], native[1]
    from mnet_ext._backend import load

    impl = load(backend)
    fwd = getattr(impl, "dwconv_bn_act_fwd_eval", impl.dwconv_bn_act_fwd)
    args = (x, conv.weight.detach().contiguous(), bn.running_mean.float(),
            torch.rsqrt(bn.running_var.float() + bn.eps), bn.weight.detach().float(), bn.bias.detach().float(),
            case.stride, 1, case.act)

    def run_prim() -> object:
        return fwd(*args)

    got = run_module()
    want = run_prim()
    torch.cuda.synchronize()
    detail = triton_path(case) if backend == "triton" else "cuda: dwconv_bn_act_fwd"
    if not torch.equal(got, want):  # the module must run the timed primitive, or the comparison means nothing
        detail += f"; module != primitive (max diff {(got.float() - want.float()).abs().max().item():.3g})"
    return {"ms_bench": timer(run_module)[0], "ms_prim": timer(run_prim)[0],
            "ms_graph": graph_ms_per_call(run_prim, timer), "host_us_module": enqueue_us(run_module),
            "host_us_prim": enqueue_us(run_prim), "detail": detail}


# ----------------------------------------------------------------------------------------------- ncu
NCU_TARGET_CALL = {"cuda_fwd": ("cuda", "fwd"), "triton_fwd": ("triton", "fwd"), "cuda_stats": ("cuda", "stats"),
                   "cuda_bwd_apply": ("cuda", "bwd_apply"), "copy": ("cuda", "copy")}


def run_ncu_target(key: str) -> int:
    """The program ncu profiles: one warm-up call (compiles, allocates) outside the profiler range, then one call
    between cudaProfilerStart and Stop (``ncu --profile-from-start off``)."""
    import torch
    import torch.cuda.profiler as cuda_profiler

    case = next(c for c in NCU_CASES if c.key == key)
    call = primitive_call(*NCU_TARGET_CALL[case.what], case.case)
    call()
    torch.cuda.synchronize()
    cuda_profiler.start()
    call()
    torch.cuda.synchronize()
    cuda_profiler.stop()
    return 0


def ncu_command(case: NcuCase, python: str, full: bool) -> list[str]:
    """The ncu call profiling ``case``'s one launch between cudaProfilerStart / Stop (``full``: with the explicit
    metrics, the extra sections and base units)."""
    cmd = ["ncu", "--target-processes", "application-only", "--profile-from-start", "off", "--clock-control", "none",
           "--kernel-name", f"regex:{case.kernel}", "--launch-count", "1", "--csv", "--page", "details"]
    for s in NCU_SECTIONS + (NCU_FULL_SECTIONS if full else ()):
        cmd += ["--section", s]
    if full:
        cmd += ["--print-units", "base", "--metrics", ",".join(NCU_METRICS)]
    return cmd + [python, "-m", "bench.diag_gpu", "ncu-target", "--case", case.key]


def _run_capped(cmd: list[str], cap_s: float, stdout: pathlib.Path, stderr: pathlib.Path) -> int:
    """Run ``cmd`` in its own process group; past ``cap_s``, or when this process gets SIGTERM (the shell step's
    timeout), the whole group (ncu and the profiled python) is killed: no profiler left running into the next step.
    Returns the exit code, 124 on timeout."""
    with open(stdout, "w") as out, open(stderr, "w") as err:
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, cwd=ROOT, start_new_session=True)

        def kill_group(*_: object) -> None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)

        def on_term(*_: object) -> None:
            kill_group()
            sys.exit(124)

        previous = signal.signal(signal.SIGTERM, on_term)
        try:
            return proc.wait(timeout=cap_s)
        except subprocess.TimeoutExpired:
            kill_group()
            proc.wait()
            err.write(f"\n[diag_gpu] killed after {cap_s:.0f} s\n")
            return 124
        finally:
            signal.signal(signal.SIGTERM, previous)


def run_ncu(out: pathlib.Path, budget_s: float, case_cap_s: float, keys: list[str] | None) -> int:
    if not _need_gpu("ncu"):
        return 0
    if shutil.which("ncu") is None:
        print("ncu: skipped: ncu is not on PATH", file=sys.stderr)
        return 0
    t_end = time.monotonic() + budget_s
    full = True
    status = []
    for case in NCU_CASES:
        if keys and case.key not in keys:
            continue
        left = t_end - time.monotonic()
        if left < 8:
            status.append(f"{case.key}: no_time_left")
            continue
        csv_path, log_path = out / f"ncu_{case.key}.csv", out / f"ncu_{case.key}.log"
        t0 = time.monotonic()
        rc = _run_capped(ncu_command(case, sys.executable, full), min(case_cap_s, left), csv_path, log_path)
        rows = parse_ncu_csv(csv_path.read_text(errors="replace"))
        # ncu failed (an unknown metric, section or option; not "no kernel matched", which exits 0): the plain
        # command from here on
        if not rows and full and rc not in (0, 124):
            full = False
            log_path.rename(out / f"ncu_{case.key}.full_failed.log")
            left = t_end - time.monotonic()
            if left >= 8:
                rc = _run_capped(ncu_command(case, sys.executable, False), min(case_cap_s, left), csv_path, log_path)
                rows = parse_ncu_csv(csv_path.read_text(errors="replace"))
        status.append(f"{case.key}: rc={rc} rows={len(rows)} {'full' if full else 'plain'} command "
                      f"{time.monotonic() - t0:.0f}s")
        print(status[-1], file=sys.stderr, flush=True)
        (out / "ncu_status.txt").write_text("\n".join(status) + "\n")
    (out / "ncu_status.txt").write_text("\n".join(status) + "\n")
    return 0


# ----------------------------------------------------------------------------------------------- host
def run_host(out: pathlib.Path, budget_s: float) -> int:
    if not _need_gpu("host"):
        return 0
    import torch

    from bench.common import Setup, build_module, build_native, make_call, make_inputs, mode_bytes
    from mnet_ext._timing import time_samples

    rows = RowFile(out / "host.csv", HOST_COLUMNS)
    t_end = time.monotonic() + budget_s
    with open(out / "host_profile.txt", "w") as prof_txt:
        for mode in ("eval", "fwd_bwd"):  # eval of every layer and backend first: H3 is about the eval forward
            for case in HOST_CASES:
                cfg = case.layer()
                setup = Setup(torch.device("cuda"), torch.bfloat16, case.batch, torch.channels_last)
                native = build_native(cfg, setup, torch.channels_last)
                x, dy = make_inputs(cfg, setup, torch.channels_last)
                for backend in ("cuda", "triton"):
                    row = {"layer": case.name, "backend": backend, "mode": mode}
                    if time.monotonic() > t_end:
                        rows.write({**row, "status": "skipped", "detail": "host budget spent"})
                        continue
                    try:
                        module = build_module(cfg, f"mnet_ext_{backend}", native)
                        call = make_call(cfg, f"mnet_ext_{backend}", mode, module, native, setup, x, dy,
                                         mode_bytes(cfg, mode, case.batch, setup.dtype), {})
                        row.update(_host_case(call, torch, time_samples, prof_txt, f"{case.name} {backend} {mode}"))
                        row["status"] = "ok"
                    except Exception as exc:  # recorded in the row, never silent
                        row.update(status="error", detail=f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
                                   if str(exc) else type(exc).__name__)
                    rows.write(row)
                del x, dy, native
                torch.cuda.empty_cache()
    rows.close()
    return 0


def _host_case(call: Callable[[], object], torch, time_samples, prof_txt, title: str) -> dict[str, object]:
    from torch.profiler import ProfilerActivity, profile

    for _ in range(3):
        call()
    enq = enqueue_us(call)
    wall = sorted(time_samples(call, torch.device("cuda"), min_time=0.2, max_reps=50))
    calls = 10
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            call()
        torch.cuda.synchronize()
    events = prof.key_averages()
    gpu = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA]
    gpu_us = sum(getattr(e, "self_device_time_total", None) or getattr(e, "self_cuda_time_total", 0) for e in gpu)
    prof_txt.write(f"== {title}: per {calls} calls\n")
    prof_txt.write(events.table(sort_by="self_cpu_time_total", row_limit=15) + "\n")
    prof_txt.flush()
    return {"enqueue_us": enq, "wall_us": 1e3 * wall[len(wall) // 2], "gpu_us": gpu_us / calls,
            "kernels_per_call": sum(e.count for e in gpu) / calls}


# ----------------------------------------------------------------------------------------------- summary
def _read_csv(path: pathlib.Path) -> list[dict[str, str]]:
    if not path.exists():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _num(text: str | None) -> float | None:
    return None if text in (None, "", "-") else parse_number(text)


def sweep_markdown(rows: list[dict[str, str]]) -> str:
    """Per stride: one line per C, each backend's % of copy (do_bench of the module; graph of the primitive),
    its do_bench and graph times, its enqueue time, beside the copy's times."""
    if not rows:
        return "no sweep data (sweep.csv missing or empty)\n"
    out = []
    for stride in sorted({r["stride"] for r in rows}):
        table = []
        for c in sorted({int(r["channels"]) for r in rows if r["stride"] == stride}):
            by = {r["provider"]: r for r in rows if r["stride"] == stride and int(r["channels"]) == c}
            line: dict[str, object] = {"C": c, "N": next(iter(by.values()))["batch"],
                                       "MB": _ratio(_num(next(iter(by.values()))["bytes"]), 1e6),
                                       "copy ms (bench/graph)": _pair(by.get("copy"), "ms_bench", "ms_graph")}
            for p in ("cuda", "triton"):
                r = by.get(p)
                line[f"{p} % copy (bench/graph)"] = _pair(r, "pct_copy_bench", "pct_copy_graph", 3)
                line[f"{p} ms bench/prim/graph"] = (
                    "/".join(fmt(_num(r.get(k))) for k in ("ms_bench", "ms_prim", "ms_graph")) if r else "-")
                line[f"{p} enqueue us mod/prim"] = _pair(r, "host_us_module", "host_us_prim")
            line["eager cl % copy"] = fmt(_num(by.get("eager_channels_last", {}).get("pct_copy_bench")))
            table.append(line)
        out.append(f"### K3 stride {stride}\n")
        out.append(markdown_table(table, list(table[0])))
    notes = sorted({f"{r['provider']} C={r['channels']} s{r['stride']}: {r['status']} {r['detail']}" for r in rows
                    if r["status"] != "ok" or "!=" in r.get("detail", "")})
    paths = sorted({r["detail"].split(" grid")[0] for r in rows
                    if r["provider"] == "triton" and r["status"] == "ok" and r["detail"].startswith("triton:")})
    if paths:
        out.append("Triton paths seen: " + "; ".join(paths) + "\n")
    if notes:
        out.append("Not ok / notes:\n" + "\n".join(f"- {n}" for n in notes) + "\n")
    return "\n".join(out)


def _pair(row: dict[str, str] | None, a: str, b: str, digits: int = 3) -> str:
    if not row:
        return "-"
    return f"{fmt(_num(row.get(a)), digits)}/{fmt(_num(row.get(b)), digits)}"


def host_markdown(rows: list[dict[str, str]]) -> str:
    if not rows:
        return "no host data (host.csv missing or empty)\n"
    table = [{**r, "host_bound": _host_bound(r)} for r in rows]
    return markdown_table(table, ["layer", "backend", "mode", "status", "enqueue_us", "wall_us", "gpu_us",
                                  "kernels_per_call", "host_bound", "detail"])


def _host_bound(r: dict[str, str]) -> str:
    enq, gpu = _num(r.get("enqueue_us")), _num(r.get("gpu_us"))
    if enq is None or gpu is None:
        return "-"
    return "yes" if enq >= gpu else "no"


NCU_DERIVED_COLUMNS = ["case", "kernel", "grid", "block", "duration_us", "dram_gbps", "dram_read_over_ideal",
                       "dram_write_over_ideal",
                       "l2_sectors_per_req_read", "l2_sectors_per_req_write", "l1_sectors_per_req_ld",
                       "l1_sectors_per_req_st", "global_ld_requests", "ldgsts_inst", "local_sectors",
                       "achieved_occupancy_pct", "theoretical_occupancy_pct", "registers", "thread_inst_per_output",
                       "static_sass_per_output", "warp_cycles_per_inst", "top_stalls"]


def ncu_markdown(out: pathlib.Path) -> str:
    parts, derived = [], []
    for case in NCU_CASES:
        path = out / f"ncu_{case.key}.csv"
        if not path.exists():
            continue
        rows = parse_ncu_csv(path.read_text(errors="replace"))
        if rows:
            derived.append({"case": case.key, **derived_ncu(rows, case, static_sass_per_output(case))})
        parts.append(f"### ncu {case.key} ({case.case.name}, {case.what})\n")
        parts.append(ncu_case_markdown(rows) if rows else
                     f"no rows parsed: see ncu_{case.key}.log (last lines: "
                     f"{_tail(out / f'ncu_{case.key}.log')})\n")
    if not parts:
        return "no ncu data (ncu did not run: see diag.log / status.env)\n"
    # one column per case: the figures side by side
    table = [{"figure": f, **{d["case"]: d.get(f) for d in derived}} for f in NCU_DERIVED_COLUMNS[1:]]
    head = ["Derived per case (ideal bytes: each tensor once; sectors per request: 4 = whole 128-byte lines, 1 = a "
            "32-byte sector each; thread_inst_per_output = 32 x warp instructions / output elements, beside the "
            "static report's SASS per output element):\n",
            markdown_table(table, ["figure", *(d["case"] for d in derived)]) if derived else "no case parsed\n"]
    status = out / "ncu_status.txt"
    if status.exists():
        head.append("ncu calls: " + "; ".join(status.read_text().split("\n")).strip("; ") + "\n")
    return "\n".join(head + parts)


def _tail(path: pathlib.Path, n: int = 3) -> str:
    if not path.exists():
        return "no log"
    lines = [line.strip() for line in path.read_text(errors="replace").splitlines() if line.strip()]
    return " / ".join(lines[-n:])[:400] or "empty log"


def summary(out: pathlib.Path) -> str:
    status = (out / "status.env").read_text().split() if (out / "status.env").exists() else []
    info = (out / "info.txt").read_text().strip() if (out / "info.txt").exists() else "no info.txt"
    skipped = (out / "skipped.txt").read_text().strip() if (out / "skipped.txt").exists() else ""
    parts = ["# GPU diagnosis: the depthwise eval forward's gap to the copy bandwidth\n",
             "Hypotheses and what decides them: `bench/diag_gpu.py`'s docstring.\n",
             f"- statuses: `{' '.join(status) or 'none'}`",
             *(f"- {line}" for line in skipped.splitlines()),
             "", "```", info, "```\n",
             "## 1. Channel sweep: eval forward, bf16 channels_last, K3, 56x56 input, N*H*W*C fixed\n",
             "% copy = the same-bytes copy's time / this time (bench: do_bench of the fused module, as the benchmark; "
             "graph: a CUDA graph replaying the backend primitive, no host in the loop). H1 predicts % copy falling "
             "with C; H3 a bench time far above the graph time, near the enqueue time.\n",
             sweep_markdown(_read_csv(out / "sweep.csv")),
             "## 2. Nsight Compute: single launches\n", ncu_markdown(out),
             "## 3. Host overhead per call (torch.profiler; enqueue = CPU time per call without synchronising)\n",
             "host_bound: the CPU enqueue time per call is at or above the GPU kernel time per call.\n",
             host_markdown(_read_csv(out / "host.csv"))]
    return "\n".join(parts)


# ----------------------------------------------------------------------------------------------- CLI
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("sweep")
    s.add_argument("--out", required=True)
    s.add_argument("--elements", type=int, default=SWEEP_ELEMENTS, help="N*H*W*C of each input")
    s.add_argument("--channels", default=",".join(map(str, SWEEP_CHANNELS)))
    s.add_argument("--budget-s", type=float, default=70.0, help="no new case after this many seconds")
    n = sub.add_parser("ncu")
    n.add_argument("--out", required=True)
    n.add_argument("--budget-s", type=float, default=110.0)
    n.add_argument("--case-cap-s", type=float, default=25.0, help="time cap of one ncu call")
    n.add_argument("--cases", default=None, help=f"comma list of {','.join(c.key for c in NCU_CASES)}")
    t = sub.add_parser("ncu-target")
    t.add_argument("--case", required=True, choices=[c.key for c in NCU_CASES])
    h = sub.add_parser("host")
    h.add_argument("--out", required=True)
    h.add_argument("--budget-s", type=float, default=25.0)
    m = sub.add_parser("summary")
    m.add_argument("dir")
    args = p.parse_args(argv)
    if args.cmd == "summary":
        print(summary(pathlib.Path(args.dir)))
        return 0
    if args.cmd == "ncu-target":
        return run_ncu_target(args.case)
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.cmd == "sweep":
        return run_sweep(out, args.elements, args.budget_s, tuple(int(c) for c in args.channels.split(",")))
    if args.cmd == "ncu":
        return run_ncu(out, args.budget_s, args.case_cap_s, args.cases.split(",") if args.cases else None)
    return run_host(out, args.budget_s)


if __name__ == "__main__":
    sys.exit(main())
