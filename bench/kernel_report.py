"""Static kernel report: what the compiler made of every CUDA and Triton kernel, without a GPU.

    python -m bench.kernel_report [--quick] [--json FILE] [--out FILE] [--backend cuda,triton] [--arch 90,80]
                                  [--dtype bf16,fp16,fp32] [--layout nhwc,nchw] [--k 3,5,7] [--per-layer]

Compiles every kernel for sm_90 (and sm_80 with ``--arch``): the CUDA ``.cu`` files with setup.py's flags, the
Triton kernels ahead of time with the constexprs, warps and grids their launchers choose for every unique
depthwise and SE layer of MobileNet V1/V2/V3-L/V3-S at 224x224 (``mnet_ext.layers.unique_layers``; MobileNets have
no 7x7 depthwise conv, so K = 7 is measured on the K = 5 layers' shapes), batch 256 by default. Compiles are cached
by content hash (``bench.kernel_builds``), so a rerun only compiles what changed. Progress goes to stderr.

Per kernel instantiation and layer (``--json``: one record each; markdown: aggregated over the layers):

* ``regs``, ``spill_bytes`` (spill stores per thread), ``smem_bytes`` (static + dynamic per block), from
  ``ptxas -v`` and the launch; ``blocks_per_sm``: resident blocks from registers, shared memory and threads per
  block at the architecture's limits (sm_90: 65,536 registers, 228 KB, 2,048 threads, 32 blocks).
* ``sass_per_output_elem``: SASS instructions one thread issues per output element on the main path:

      (outside + trips * body) / (trips * outputs per iteration)

  where ``body`` is the counted path through the kernel's main loop (the loop with the most global loads and stores:
  the CUDA strip loops (fwd: strips per thread; stats/bwd_reduce: the strips of a chunk per walker; SE: pixels per
  walker; the staged band kernels ``fwd_band_kernel`` / ``stats_band_kernel`` of channels_last: the band tiles of a
  block, with the two staging loops (staged rows inside the image, padding rows) and the kernel-row loop inside; the
  tensor-core forward ``fwd_mma_kernel`` of bf16/fp16 channels_last at stride 1 and 2: the tiles of a block, everything
  inside unrolled), the CUDA backward apply's (image, band) item loop, Triton's ``for i in range(ITERS)``),
  ``outside`` the counted path from entry to exit around it (prologue, epilogue, other loops once), and ``trips`` the
  loop's mean trip count per thread from the launch plan (CUDA: the geometry of ``csrc/dwconv_bn_act/tile.h``,
  ``mma_tile.h`` and ``csrc/*/kernels.cuh``, mirrored in ``CUDA_KERNELS``; Triton: the launcher's own values). Inner
  loops of the main loop count their planned trips (``Plan.inner_trips``, ``Plan.nest``): the CUDA runtime loop over
  the K - 1 kernel rows after the peeled row 0, the three phase loops of the CUDA backward apply (dz rows, dweight
  strips, dx pixels per thread and item), the two of the Triton one (dz chunks, dx chunks, each with its kernel-row
  loop). A kernel without a loop (Triton fwd: one tile per program) counts its entry-to-exit path over the outputs one
  thread holds (BLOCK_P * BLOCK_C / threads); the Triton tensor-core eval forward ``_fwd_dot_kernel`` (bf16/fp16
  channels_last, sm_90) over the layer's outputs per thread of all its programs (its tiles of NB x RH x G outputs past
  the image count as waste), its TMA barrier waits' retry loops not taken. The training forward's apply pass is
  recorded as role ``fwd_train`` where it runs another kernel than the eval forward (Triton bf16/fp16 channels_last:
  ``_fwd_kernel``), and the eval budgets count role ``fwd`` only. Through branches (``bench.sass``) the counted path
  visits every block with a load or store on its way (all K*K taps, the store) and takes the cheaper side of a branch
  that only computes; a subroutine call counts its callee's path, so an int64 division counts its inline 32-bit fast
  path, not the call of the 64-bit routine. A rare path kept out of line (``__noinline__``, a separate function in the
  cubin) is off the counted path: its call site holds no load or store, so its branch only computes; so is the CUDA
  tensor-core forward's recompute of its NaN outputs (``mma_recompute_nan_outputs_cold``: only non-finite inputs take
  it), while the NaN test that guards it (on the tile's stored outputs) stays counted; likewise the Triton
  ``_fwd_dot_kernel``'s exact recompute of a tile holding a NaN (``_fwd_dot_exact_tile``, ``noinline``), while its
  NaN probe (a sum over the tile) is counted. The activation counted is the layer's own (``act`` in the record), in
  both backends: a Triton kernel is compiled for its activation; a CUDA kernel picks it with a runtime switch, whose
  cheapest case (``none``) the path takes, so the forward's records add ``act_sass_per_elem``, what the activation
  adds per output element, measured on a probe kernel that applies the same code (``bench/act_cost.cu``, compiled
  with the same flags): ``act_fwd`` on fp32 for the kernels that round after it (sm_90 relu 1, relu6 2, hardswish 2,
  silu ~30), ``act_pair`` on bf16 pairs for the tensor-core forward, whose relu / relu6 run on the rounded pairs
  (``PAIR_ACT_KERNELS``: relu 0, relu6 0.5, hardswish 2.1). The CUDA backward kernels still count ``none`` for their
  activation derivative. ``fma_per_output_elem`` and ``gmem_per_output_elem`` (global load/store instructions) split
  the same count.

  Checked by hand on the CUDA ``fwd_kernel<__nv_bfloat16, 3, 1, true, true, 14>`` (sm_90, nvcc 13.0) for
  dw_c144_56x56 at batch 256 (blocks of 18 lanes x 7 walkers, 8 strips of 14 outputs x 8 channels per thread):
  the kernel-row loop (rows 1 and 2; row 0 is peeled) is 564 instructions (336 FFMA, 16 LDG.E.128 of x, 6 LDS.128
  of the weights, 128 bf16 unpacks (LOP3 / SHF / IMAD.U32), 32 CS2R zero fills for padding, the rest addresses,
  column-mask predicates and the loop test); the strip loop around it, with one pass of the row loop, 1,461
  (strip setup with two multiply-high divisions, the peeled row 0 with FMUL for its first products, the ``none``
  epilogue: 112 FFMA of the BN fold, 56 F2FP, 14 STG.E.128); outside, 161 (parameter staging, prologue). Per
  thread 161 + 8 x (1,461 + 564) = 16,361 instructions for 896 outputs: 18.3 per output element, what the tool
  counts. (Session 3's strips of 4: 30.2; before the redesign: 414 for the one-thread-per-output kernel.)
  And on the CUDA ``fwd_mma_kernel<__nv_bfloat16, 3, 2, 28>`` (sm_90, nvcc 13.0; 4 warps of one channel group each,
  tiles of 4 x 28 outputs, 28 outputs x 8 channels / 32 lanes = 28 elements per lane and tile): from the tile loop's
  head to the activation switch's first test 205 instructions (tile indices: 2 multiply-high divisions; staging:
  18 LDGSTS.128 with their pointer steps and zero-fill predicates; 7 m-tiles of 4 LDSM.x4 + 4 HMMA.16816 +
  1 LDSM.x2 + 1 HMMA.1688), 2 of compares to the ``none`` case, the case 43 (28 FFMA of the BN fold, 14 F2FP, the
  branch), 48 for the 14 STS of the D fragments and their addresses, 50 for the 4 output vectors (each LDS.128 +
  STG.128, its mask, and the union of its NaNs: 2 HMNMX2 + 1 VHMNMX), 6 for the NaN test of the union, 11 for the
  loop test: 365 per tile, the tool's path (the NaN recompute's call is off it); outside 214. For dw_c144_56x56
  (8 tiles per block): (214 + 8 x 365) / (8 x 28) = 14.0 per output element, what the tool counts (session 7,
  before the non-finite fix: 410 per tile, 15.4).
  And on the Triton ``_fwd_kernel`` (bf16, NHWC, K = 3, dw_c144_56x56, 2 warps, 32 groups of OW = 8 columns x 16
  channels: 64 outputs per thread): 642 instructions to the kernel-row loop (setup, then the peeled row 0: 192 FFMA,
  10 LDG.E.128 of x, 6 of the fp32 weight taps), a 400-instruction loop body taken K - 1 = 2 times (192 FFMA, 120
  bf16 conversions, 16 LDG.E.128), a 310-instruction epilogue (64 FFMA of the BN fold, 128 FMNMX of relu6, 32 F2FP,
  8 STG.E.128): 1,752 / 64 = 27.4 per output element, 27.2 counted (the cheaper sides of two branches).

* ``planned_bytes_per_elem``: DRAM bytes the kernel's plan moves per element of its iteration space, in units of
  the activation's element size (eval forward at stride 1 = 2): what ``ROLES`` says each kernel reads and writes.
  Per-channel vectors, partial-sum buffers and on-chip or L2-resident scratch (the Triton backward apply's
  per-program dz slot, rewritten per band and read back at once) are ignored. The planned totals per primitive are
  listed against the fused minimum of ``mnet_ext.layers.fused_bytes``.
* ``issue_over_mem_h100`` / ``_h200``: predicted issue time / DRAM time per element: instructions at 3e13
  thread-instructions/s (132 SMs x 4 schedulers x 32 lanes x ~1.75 GHz) over bytes at 3.0 TB/s (H100) or
  4.3 TB/s (H200); above 1 the kernel is issue-bound (``bound_*``), below memory-bound. Assumes full issue rate:
  an occupancy of 1-2 blocks per SM makes the issue side worse than predicted.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import re
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

from bench import kernel_builds, sass
from bench.kernel_builds import ROOT

DTYPES = ("bf16", "fp16", "fp32")
ELEM_SIZE = {"bf16": 2, "fp16": 2, "fp32": 4}
LAYOUTS = ("NHWC", "NCHW")
# DRAM bandwidth (bytes/s) and issue rate (thread-instructions/s) the bound is predicted against, per arch.
RATES = {90: {"h100": (3.0e12, 3e13), "h200": (4.3e12, 3e13)}}


# ------------------------------------------------------------------------------------------------- roles
@dataclasses.dataclass(frozen=True)
class Role:
    """What one kernel does for its primitive, and the DRAM bytes it plans per element of its iteration space as
    a function of r = input pixels / output pixels (4 at stride 2) and the element size es."""

    primitive: str
    hot: bool
    bytes_per_elem: Callable[[float, int], float] | None = None


ROLES: dict[str, Role] = {
    # dwconv_bn_act: iteration space = output elements
    "fwd": Role("dwconv_bn_act_fwd", True, lambda r, es: es * (r + 1)),  # the eval forward: read x, write y
    # the training forward's apply pass where it runs another kernel than the eval forward (Triton: the FFMA
    # _fwd_kernel, whose z the statistics and the backward recompute, next to the tensor-core eval forward)
    "fwd_train": Role("dwconv_bn_act_fwd", True, lambda r, es: es * (r + 1)),
    "stats": Role("dwconv_bn_stats", True, lambda r, es: es * r),  # read x
    "stats_combine": Role("dwconv_bn_stats", False),
    "bwd_reduce": Role("dwconv_bn_act_bwd_reduce", True, lambda r, es: es * (1 + r)),  # read dy, x
    "sum_partials": Role("dwconv_bn_act_bwd_reduce/_apply", False),
    # dz on chip (CUDA: shared memory; Triton: a per-program L2-resident slot); read dy and x, write dx (the halo
    # rows' x and the dweight pass's x re-read from L1/L2)
    "bwd_apply": Role("dwconv_bn_act_bwd_apply", True, lambda r, es: es * (1 + 2 * r)),
    # squeeze_excite: iteration space = activation elements
    "se_pool": Role("se_pool", True, lambda r, es: es),  # read x
    "se_bwd_reduce": Role("se_bwd_reduce", True, lambda r, es: 2 * es),  # read dy, x
    "se_scale": Role("se_scale", True, lambda r, es: 2 * es),  # read x, write y
    "se_bwd_apply": Role("se_bwd_apply", True, lambda r, es: 2 * es),  # read dy, write dx
    "se_apply": Role("se_scale, se_bwd_apply", True, lambda r, es: 2 * es),  # CUDA: one kernel for both
    "unknown": Role("?", False),
}


@dataclasses.dataclass(frozen=True)
class Plan:
    """Launch plan of one kernel for one layer: per-thread view."""

    threads: int
    trips: float | None  # mean main-loop iterations per thread; None: no main loop
    outputs_per_iter: float  # elements of the iteration space one thread produces per iteration (or per tile)
    dynamic_smem: int = 0
    inner_trips: float | None = None  # iterations of the main loop's inner loop per main iteration (K rows)
    nest: tuple | None = None  # per inner loop of the main loop, in code order: (iterations, its own nest)


# ------------------------------------------------------------------------------------------------- CUDA plans
# Mirrors of the launch geometry in csrc/dwconv_bn_act/tile.h (tile_plan, reduction_chunks), kernels.cuh
# (kThreads, fwd_blocks) and csrc/squeeze_excite/se.cu: keep in step with them.
_KTHREADS = 256
_SMEM_TWO_BLOCKS = 81 * 1024  # tile.h: kSmemTwoBlocks


@dataclasses.dataclass(frozen=True)
class TilePlan:
    """tile.h's plan for one layer (dilation 1): strips of TW outputs x V channels, lanes x walkers per block."""

    v: int
    tw: int
    lanes: int
    walkers: int
    groups: int
    strips: int

    @property
    def threads(self) -> int:
        return self.lanes * self.walkers

    def fwd_trips(self) -> float:  # strips per thread (kernels.cuh: fwd_blocks)
        for per in (16, 8, 4):
            blocks = -(-self.strips // (self.walkers * per))
            if blocks * self.groups >= 1024:
                break
        return self.strips / (blocks * self.walkers)

    def chunk_trips(self) -> float:  # strips per walker of one chunk (tile.h: reduction_chunks, chunk_range)
        per = self.walkers * 4
        n = min(max(-(-self.strips // per), 1), -(-1024 // self.groups), 512)
        return -(-self.strips // max(n, 1)) / self.walkers


def narrow_tile_width(t: dict[str, Any]) -> int:
    """tile.h: narrow_tile_width (NCHW strips, the backward apply)."""
    return (2 if t.get("J") == 2 else 4) if t["CL"] else 8


def strip_tile_width(t: dict[str, Any], wo: int) -> int:
    """tile.h: strip_tile_width (fwd, stats, bwd_reduce; wide strips in channels_last: tile.h strip_wide)."""
    if not t["CL"]:
        return narrow_tile_width(t)
    return 14 if t.get("J") == 1 and t["K"] <= 5 and wo >= 14 else 7


def tile_plan(s: Shape, t: dict[str, Any], strips: bool = True) -> TilePlan:
    """``strips``: the strip kernels' plan (wide strips in half-size blocks in channels_last), else the narrow one
    (the backward apply's strip width, the SE kernels' lanes)."""
    cl = t["CL"]
    v = 16 // ELEM_SIZE[t["T"]] if cl else 1
    wide = strips and bool(cl)
    tw = strip_tile_width(t, s.wo) if strips else (narrow_tile_width(t) if "J" in t else 1)
    threads = _KTHREADS // 2 if wide else _KTHREADS  # tile.h: plan_threads
    vectors = -(-s.c // v)
    groups = -(-vectors // 32) if cl else s.c
    lanes = -(-vectors // groups) if cl else 1
    return TilePlan(v, tw, lanes, threads // lanes, groups, s.n * s.ho * -(-s.wo // tw))


def _weight_lane_floats(k: int, v: int) -> int:
    """kernels.cuh: weight_lane_floats (a lane's taps in shared memory, padded against bank conflicts)."""
    return k * k * v + (4 if k * k * v % 8 == 0 else 0)


def _band_rows(s: Shape, stride: int, k: int, band: int, rows: int) -> tuple[int, int, int, int, int, int]:
    """tile.h: band_rows (dilation 1): owned output rows, input rows, dz rows of one band."""
    pad = (k - 1) // 2
    ob0, ob1 = band * rows, min(band * rows + rows, s.ho)
    ib0, ib1 = ob0 * stride, min(ob1 * stride, s.h)
    lo = ib0 + pad - (k - 1)
    r0 = 0 if lo <= 0 else -(-lo // stride)
    r1 = (ib1 - 1 + pad) // stride + 1
    return ob0, ob1, ib0, ib1, min(r0, ob0), min(max(r1, ob1), s.ho)


def _apply_fixed_floats(k: int, v: int, lanes: int) -> int:
    """tile.h: apply_fixed_floats (the block's dweight sums, the weights, 6 per-channel rows)."""
    return k * k * lanes * v + lanes * _weight_lane_floats(k, v) + 6 * lanes * v


def _bwd_apply_plan(s: Shape, t: dict[str, Any]) -> Plan:
    """tile.h: band_plan and kernels.cuh: bwd_apply_kernel. Per thread and (image, band) item: the dz loop over
    (dz row, strip, lane) items / 256 (each with the K-row conv loop), the dx loop over (input pixel, lane) items /
    256, the dweight loop over owned strips / walkers (threads = lanes x K x walkers), the loop adding the walkers'
    dweight sums ((tap, channel) entries / 256, each over the walkers)."""
    k, stride, tp = t["K"], 2 if t["J"] == 2 else 1, tile_plan(s, t, strips=False)
    halo = ((k - 1) + stride - 1) // stride + 1
    vectors = -(-s.c // tp.v)
    budget = _SMEM_TWO_BLOCKS // 4  # floats; tile.h: kSmemTwoBlocks, apply_tile_budget

    def band_rows(lanes: int) -> int:  # tile.h: apply_band_rows
        return (budget - _apply_fixed_floats(k, tp.v, lanes)) // (s.wo * lanes * tp.v) - halo

    lanes = 8
    while lanes > 1 and (lanes > vectors or band_rows(lanes) < min(s.ho, 16)):  # tile.h: kApplyMinRows
        lanes //= 2
    cb, groups = lanes * tp.v, -(-vectors // lanes)
    rows = min(max(band_rows(lanes), 1), s.ho)
    bands = -(-s.ho // rows)
    nchunks = min(s.n * bands, -(-1024 // groups), 512)
    per_row = -(-s.wo // tp.tw)
    walkers3 = (_KTHREADS // lanes) // k
    t1 = t3 = t2 = outputs = 0.0
    for band in range(bands):
        ob0, ob1, ib0, ib1, r0, r1 = _band_rows(s, stride, k, band, rows)
        t1 += (r1 - r0) * per_row * lanes / _KTHREADS / bands
        t3 += (ob1 - ob0) * per_row / walkers3 / bands
        t2 += (ib1 - ib0) * s.w * lanes / _KTHREADS / bands
        outputs += (ob1 - ob0) * s.wo * cb / _KTHREADS / bands
    tile = max((rows + halo) * s.wo * cb, walkers3 * k * k * cb)
    smem = (tile + _apply_fixed_floats(k, tp.v, lanes)) * 4
    # nvcc versions the NCHW dweight loop into two copies of which one runs: the second counts 0 trips.
    dweight = ((t3, ()),) if t["CL"] else ((t3, ()), (0.0, ()))
    combine = (k * k * cb / _KTHREADS, ((walkers3, ()),))
    # conv_strip peels kernel row 0: its row loop runs K - 1 times per dz strip.
    return Plan(_KTHREADS, s.n * bands / nchunks, outputs, smem, None,
                ((t1, ((k - 1, ()),)), (t2, ()), *dweight, combine))


def _se_plan(s: Shape, t: dict[str, Any], per_walker: int | None) -> Plan:
    """csrc/squeeze_excite/kernels.cuh: lanes x walkers over the pixels of one image; se_affine blocks take
    ``per_walker`` pixels per walker (se.cu: kPixelsPerWalker), se_reduce all of them."""
    tp = tile_plan(s, t, strips=False)
    hw = s.h * s.w
    chunk = hw if per_walker is None else tp.walkers * per_walker
    chunks = -(-hw // chunk)
    return Plan(tp.threads, hw / chunks / tp.walkers, tp.v)


def _strip_plan(reduction: bool, param_rows: int) -> Callable[[Shape, dict[str, Any]], Plan]:
    def plan(s: Shape, t: dict[str, Any]) -> Plan:
        tp = tile_plan(s, t)
        trips = tp.chunk_trips() if reduction else tp.fwd_trips()
        smem = (_weight_lane_floats(t["K"], tp.v) + param_rows * tp.v) * tp.lanes * 4  # kernels.cuh: param_smem_bytes
        # Outputs per strip: the mean over a row's strips (the last one of a row may be partial).
        per_strip = s.wo / -(-s.wo // tp.tw) * tp.v
        return Plan(tp.threads, trips, per_strip, smem, t["K"] - 1)  # kernels.cuh: conv_strip peels row 0
    return plan


# tile.h: band_tile_plan (staged band tiles: channels_last, 16-byte vectors), kernels.cuh: band_smem_bytes
_BAND_LANE_SLOTS, _BAND_ROWS_MAX, _BAND_STAGE_BYTES = 8, 16, 84 * 1024
_BAND_TREE_BYTES = 12 * _BAND_LANE_SLOTS * _BAND_ROWS_MAX  # tile.h: kBandTreeBytes


def band_whole(s: Shape, stride: int, tw: int) -> bool:
    """tile.h: BandTilePlan::whole (dilation 1): each strip is its whole row."""
    return stride == 1 and s.w == tw and s.wo == tw


def _band_plan(reduction: bool, param_rows: int) -> Callable[[Shape, dict[str, Any]], Plan]:
    """fwd_band_kernel / stats_band_kernel (dilation 1): per thread, the tile loop (tiles per block) with the two
    staging loops (staged rows inside the image, then padding rows of zeros, per walker: means over the bands) and
    the conv's row loop (K - 1 after the peeled row 0) inside."""
    def plan(s: Shape, t: dict[str, Any]) -> Plan:
        k, j, v = t["K"], t["J"], 16 // ELEM_SIZE[t["T"]]
        stride, pad = 2 if j == 2 else 1, (k - 1) // 2
        tw = strip_tile_width({**t, "CL": True}, s.wo)
        vectors = -(-s.c // v)
        groups = -(-vectors // _BAND_LANE_SLOTS)
        lanes = -(-vectors // groups)
        cols_in = j * (tw - 1) + k
        pitch = cols_in * (v // 4) * _BAND_LANE_SLOTS + (lanes % 8 if stride == 1 else (lanes // 2) % 4)
        most = _BAND_ROWS_MAX if stride == 1 else _BAND_ROWS_MAX // 2
        bands = -(-s.ho // most)
        rows = -(-s.ho // bands)
        budget = _BAND_STAGE_BYTES  # tile.h: band_stage_budget (the stats' blocks: two per SM on sm_80)
        if reduction:
            budget = min(budget, _SMEM_TWO_BLOCKS - _weight_lane_floats(k, v) * lanes * 4 - _BAND_TREE_BYTES)
        while rows > 1 and ((rows - 1) * stride + k) * pitch * 16 > budget:
            bands += 1
            rows = -(-s.ho // bands)
        bands = -(-s.ho // rows)
        rows_in = (rows - 1) * stride + k
        per_row = -(-s.wo // tw)
        tiles = s.n * bands * per_row
        if reduction:
            nchunks = min(max(-(-tiles // 4), 1), -(-1024 // groups), 512)
        else:
            per = 8
            while per > 1 and -(-tiles // per) * groups < 1024:
                per //= 2
            nchunks = -(-tiles // per)
        smem = rows_in * pitch * 16 + (_weight_lane_floats(k, v) + param_rows * v) * lanes * 4
        inside = sum(min(rows_in, s.h - (b * rows * stride - pad)) - max(0, pad - b * rows * stride)
                     for b in range(bands)) / bands  # tile.h: band_rows_inside
        outputs = s.ho / (bands * rows) * s.wo / per_row * v  # per walker and tile: idle past Ho, partial strips
        nest = ((inside / rows, ()), ((rows_in - inside) / rows, ()), (k - 1, ()))
        return Plan(lanes * rows, tiles / nchunks, outputs, smem, nest=nest)
    return plan


# csrc/dwconv_bn_act/mma_tile.h: the tensor-core forward at stride 1 or 2 (fwd_mma_kernel; mma_tile_plan, MmaGeom).
_MMA_MIN_BLOCKS, _MMA_SMEM_MAX = 512, 80 * 1024


def mma_fwd_serves(case: Case) -> bool:
    """fwd.cu: use_mma_fwd (mma_tile.h: mma_fwd_shape) on an sm_80+ device: bf16/fp16 channels_last, C % 8 == 0,
    stride 1 or 2, dilation 1 (every MobileNet depthwise layer in bf16/fp16 NHWC)."""
    cfg = case.layer
    return (case.dtype in ("bf16", "fp16") and case.layout == "NHWC" and cfg.channels % 8 == 0
            and cfg.stride in (1, 2) and cfg.dilation == 1)


def mma_tile_width(wo: int) -> int:
    return 8 if wo <= 8 else 16 if wo <= 16 else 28


def _mma_plan(s: Shape, t: dict[str, Any]) -> Plan:
    """fwd_mma_kernel: per thread, the tile loop (tiles per block); each tile is TH x TW outputs of IMG images x 8
    channels per warp (staging and m-tiles unrolled), IMG * TH * TW / 4 elements per lane of which the part inside
    the batch's N x Ho x Wo counts."""
    k, stride, tw = t["K"], t["S"], t["MTW"]
    th = 4 if tw == 28 and stride == 2 else 8
    img = 1 if tw == 28 else 2 if tw == 16 else 3
    col_tiles, row_tiles = -(-s.wo // tw), -(-s.ho // th)
    tiles = -(-s.n // img) * row_tiles * col_tiles
    groups = s.c // 8
    ph = img * (stride * tw + k - 1) // stride
    pitch = stride * ph + (4 - stride * ph) % 8
    plane = stride * (th + (k - 1) // stride) * pitch * 16
    gb = next(g for g in (4, 3, 2, 1) if groups % g == 0 and (g == 1 or g * plane <= _MMA_SMEM_MAX))
    cblocks = groups // gb
    per = 8
    while per > 1 and -(-tiles // per) * cblocks < _MMA_MIN_BLOCKS:
        per //= 2
    smem = gb * plane
    outputs = s.n * s.ho * s.wo / tiles * 8 / 32  # per lane and tile: its share of the valid outputs
    return Plan(32 * gb, tiles / -(-tiles // per), outputs, smem)


@dataclasses.dataclass(frozen=True)
class CudaKernel:
    role: str | Callable[[dict[str, Any]], str]  # fixed, or from the template arguments
    params: tuple[str, ...]  # template parameter names, in order (T: dtype, K: kernel size, J: column pattern
    # (2 at stride 2), CL: channels_last)
    plan: Callable[[Shape, dict[str, Any]], Plan] | None = None  # None: no per-layer plan (not a hot kernel)
    fixed: tuple[tuple[str, Any], ...] = ()  # template parameters the kernel fixes (not in its argument list)
    # Which of the cases the template arguments match it serves (None: all): the launcher's choice between kernels
    # with the same template arguments.
    serves: Callable[[Case, Shape, dict[str, Any]], bool] | None = None


@dataclasses.dataclass(frozen=True)
class Shape:
    """One layer at one batch size."""

    n: int
    c: int
    h: int
    w: int
    ho: int
    wo: int

    @property
    def ratio(self) -> float:
        return self.h * self.w / (self.ho * self.wo)


# Template parameters of the strip kernels: dtype, kernel size, column pattern (2 at stride 2), channels_last, and
# FULL (16-byte channel vectors: channels_last with C % V == 0, as in every MobileNet layer; the FULL = false
# channels_last variant serves other C and is reported without a layer plan); fwd, stats and bwd_reduce add TW, the
# strip width (tile.h: strip_tile_width), matched to each layer.
_STRIP_PARAMS = ("T", "K", "J", "CL", "FULL")
# The staged band kernels (fwd_band_kernel, stats_band_kernel) serve exactly channels_last with 16-byte vectors;
# WHOLE: whole-row tiles (tile.h: BandTilePlan::whole, band_whole here).
_BAND_FIXED = (("CL", True), ("FULL", True))
_BAND_PARAMS = ("T", "K", "J", "TW", "WHOLE")


CUDA_KERNELS: dict[str, CudaKernel] = {
    "fwd_kernel": CudaKernel("fwd", (*_STRIP_PARAMS, "TW"), _strip_plan(False, 2)),  # weights, BN scale, shift
    # bf16/fp16 at stride 2: the band kernel only below sm_80 (not in this report's sm_80/sm_90 plans)
    "fwd_band_kernel": CudaKernel("fwd", _BAND_PARAMS, _band_plan(False, 2), _BAND_FIXED,
                                  lambda c, s, t: not mma_fwd_serves(c)),
    "fwd_mma_kernel": CudaKernel("fwd", ("T", "K", "S", "MTW"), _mma_plan, (("CL", True),),
                                 lambda c, s, t: mma_fwd_serves(c) and t["S"] == c.layer.stride
                                 and t["MTW"] == mma_tile_width(s.wo)),
    "stats_partial_kernel": CudaKernel("stats", (*_STRIP_PARAMS, "TW"), _strip_plan(True, 0)),
    "stats_band_kernel": CudaKernel("stats", _BAND_PARAMS, _band_plan(True, 0), _BAND_FIXED),
    "bwd_reduce_partial_kernel": CudaKernel("bwd_reduce", (*_STRIP_PARAMS, "TW"), _strip_plan(True, 4)),
    "bwd_apply_kernel": CudaKernel("bwd_apply", _STRIP_PARAMS, _bwd_apply_plan),
    "stats_final_kernel": CudaKernel("stats_combine", ()),
    "sum2_final_kernel": CudaKernel("sum_partials", ()),
    "dweight_final_kernel": CudaKernel("sum_partials", ("T",)),
    "se_reduce_kernel": CudaKernel(lambda t: "se_bwd_reduce" if t["PROD"] else "se_pool", ("T", "CL", "FULL", "PROD"),
                                   lambda s, t: _se_plan(s, t, None)),
    "se_affine_kernel": CudaKernel("se_apply", ("T", "CL", "FULL"), lambda s, t: _se_plan(s, t, 8)),
}
CUDA_THREADS_UNPLANNED = 128  # the *_final kernels' block size (stats.cu, bwd_reduce.cu, bwd_apply.cuh)
_CUDA_DTYPES = {"float": "fp32", "__half": "fp16", "__nv_bfloat16": "bf16"}


def parse_cuda_name(demangled: str) -> tuple[str, dict[str, Any]]:
    """Kernel name and template arguments by parameter name: ("fwd_kernel", {"T": "bf16", "K": 3, "CL": True})
    from "void mnet::dev::fwd_kernel<__nv_bfloat16, 3, true>(mnet::DwParams)"."""
    m = re.match(r"(?:void )?(?:[\w:]+::)?(\w+)(?:<([^>]*)>)?\(", demangled)
    if not m:
        return demangled, {}
    name, targs = m.group(1), [a.strip() for a in (m.group(2) or "").split(",") if a.strip()]
    kernel = CUDA_KERNELS.get(name)
    names = kernel.params if kernel and len(kernel.params) == len(targs) else tuple(f"arg{i}" for i in
                                                                                    range(len(targs)))
    values: dict[str, Any] = {}
    for pname, a in zip(names, targs, strict=True):
        values[pname] = _CUDA_DTYPES.get(a) or ({"true": True, "false": False}.get(a, int(a) if a.isdigit() else a))
    return name, values


# ------------------------------------------------------------------------------------------------- Triton plans
@dataclasses.dataclass(frozen=True)
class TritonKernel:
    role: str | Callable[[dict[str, Any]], str]  # fixed, or from the launch's constexprs
    trips: Callable[[dict[str, Any]], float] | None = None  # main-loop trip count from the launch values
    hot: bool = True
    # trips of the runtime loop over kernel rows: the main loop without ``trips`` (fwd), else the one loop
    # inside the main loop (the reductions: once per tile)
    rows: Callable[[dict[str, Any]], float] | None = None
    # a whole plan from the launch values and threads, for a kernel whose loops the fields above do not describe
    plan: Callable[[dict[str, Any], int], Plan] | None = None


def _conv_rows(v: dict[str, Any]) -> float:
    """Trips of ``_conv_groups``' runtime row loop: kernel rows 1 ... K - 1 (row 0 peeled); with multi-row groups
    (ROWS > 1) the input rows ROWS - 1 ... K - 1 that every output row of the group reads (the others unrolled)."""
    rows = v.get("ROWS", 1)
    return v["K"] - 1 if rows == 1 else v["K"] - rows + 1


def _triton_apply_plan(v: dict[str, Any], threads: int) -> Plan:
    """``_bwd_apply_kernel``: the main loop over ITERS bands per program; per band, the dz loop over chunks of
    BLOCK_G groups of the band's rows plus its halo (clipped to the image), each with the conv's runtime loop over
    kernel rows 1 ... K - 1, then the dx loop over chunks of the band's input rows, each with a loop over the K kernel
    rows. Trips and outputs (the band's own output elements per thread) are means over the bands of an image."""
    ho, tb, bands, stride = v["Ho"], v["TB"], v["num_bands"], v["STRIDE"]
    t_dz = t_dx = outputs = 0.0
    for b in range(bands):
        band0, band1 = b * tb, min(b * tb + tb, ho)
        rows = min(band1 + v["HALO_HI"], ho) - max(band0 - v["HALO_LO"], 0)
        t_dz += -(-rows * v["gpr"] // v["BLOCK_G"]) / bands
        t_dx += -(-(min(band1 * stride, v["H"]) - band0 * stride) * v["gprx"] // v["BLOCK_G"]) / bands
        outputs += (band1 - band0) * v["Wo"] * v["BLOCK_C"] / threads / bands
    trips = v["num_tiles"] / -(-v["num_tiles"] // v["ITERS"])  # bands per program, the tail row included
    return Plan(threads, trips, outputs, nest=((t_dz, ((v["K"] - 1, ()),)), (t_dx, ((v["K"], ()),))))


def _triton_dot_plan(v: dict[str, Any], threads: int) -> Plan:
    """``_fwd_dot_kernel``: one tile of NB images x RH rows x G columns x 8 channels per program, its kernel rows
    unrolled (the TMA barrier waits' retry loops are not taken on the counted path). The outputs per thread are the
    layer's own over all programs' threads: positions of tiles past the image count as waste, not as outputs."""
    programs = -(-v["Wo"] // v["G"]) * -(-v["N"] // v["NB"]) * v["num_hb"]
    return Plan(threads, None, v["N"] * v["Ho"] * v["Wo"] * 8 / (programs * threads))


TRITON_KERNELS: dict[str, TritonKernel] = {
    "_fwd_kernel": TritonKernel("fwd", rows=_conv_rows),
    "_fwd_dot_kernel": TritonKernel("fwd", plan=_triton_dot_plan),
    "_stats_partial_kernel": TritonKernel("stats", lambda v: v["ITERS"], rows=_conv_rows),
    "_stats_combine_kernel": TritonKernel("stats_combine", hot=False),
    "_bwd_reduce_partial_kernel": TritonKernel("bwd_reduce", lambda v: v["ITERS"], rows=_conv_rows),
    "_sum_rows_kernel": TritonKernel("sum_partials", hot=False),
    "_bwd_apply_kernel": TritonKernel("bwd_apply", plan=_triton_apply_plan),  # dweight rows: unrolled
    "_se_reduce_kernel": TritonKernel(lambda v: "se_bwd_reduce" if v["PRODUCT"] else "se_pool",
                                      lambda v: -(-v["H"] * v["W"] // v["BLOCK_P"])),
    "_se_apply_kernel": TritonKernel(lambda v: "se_bwd_apply" if v["HAS_BIAS"] else "se_scale"),
}


def triton_plan(spec: TritonKernel, v: dict[str, Any], threads: int, path: dict[str, Any] | None) -> Plan:
    """Per-thread plan of a Triton launch: a tile is BLOCK_P pixels (or BLOCK_G groups of OW outputs) x BLOCK_C
    channels. A kernel-row loop is the main loop of a one-tile kernel (fwd: its trips cover the tile) and the
    inner loop of a reduction's main loop (ITERS tiles), unless the compiler unrolled it (K is a constexpr): then
    the SASS (``path``, the build summary) has that loop's rows inline and the plan counts them as they stand."""
    if spec.plan is not None:
        return spec.plan(v, threads)
    outputs = v.get("BLOCK_P", v.get("BLOCK_G", 0) * v.get("OW", 1) * v.get("ROWS", 1)) * v["BLOCK_C"] / threads
    trips = spec.trips(v) if spec.trips else None
    rows = spec.rows(v) if spec.rows else None
    if rows is not None and path is not None:
        nest = path.get("nest")
        if (path["loops"] == 0 if trips is None else nest is not None and not nest["children"]):
            rows = None
    if rows is not None and trips is None:
        return Plan(threads, rows, outputs / rows)
    return Plan(threads, trips, outputs, nest=None if rows is None else ((rows, ()),))


# ------------------------------------------------------------------------------------------------- scope
@dataclasses.dataclass(frozen=True)
class Case:
    """One layer in one dtype and layout."""

    layer: Any  # mnet_ext.layers.LayerConfig
    source: str  # "model:layer, ..." or how a synthetic layer was derived
    dtype: str
    layout: str
    backends: tuple[str, ...] = ("cuda", "triton")  # the backends whose kernels are reported for it

    @property
    def k(self) -> int | None:
        return self.layer.kernel_size if self.layer.kind == "dwconv_bn_act" else None


def layers(models: tuple[str, ...]) -> list[tuple[Any, str]]:
    """(config, source) of the unique layers, plus a K = 7 variant of each K = 5 depthwise layer."""
    from mnet_ext.layers import unique_layers

    found = unique_layers(models)
    out = [(cfg, ", ".join(where)) for cfg, where in found.items()]
    for cfg in list(found):
        if cfg.kind == "dwconv_bn_act" and cfg.kernel_size == 5:
            k7 = dataclasses.replace(cfg, kernel_size=7)
            if k7 not in found:
                out.append((k7, f"K=7 variant of {cfg.name}"))
    return out


def _activation_elems(cfg: Any) -> int:
    return cfg.channels * cfg.height * cfg.width


def quick_cases(all_layers: list[tuple[Any, str]]) -> list[Case]:
    """The CI subset: bf16; channels_last K = 3 and K = 5 and NCHW K = 3 on the stride-1 depthwise layer with the
    largest activation of that K, and for CUDA only (its .cu files are compiled whole: no extra compile) channels_last
    K = 3 at stride 2 (fwd_mma_kernel's other stride); the largest SE layer in both layouts."""
    cases = []
    both = ("cuda", "triton")
    for layout, k, stride, backends in (("NHWC", 3, 1, both), ("NHWC", 5, 1, both), ("NCHW", 3, 1, both),
                                        ("NHWC", 3, 2, ("cuda",))):
        cands = [(c, s) for c, s in all_layers
                 if c.kind == "dwconv_bn_act" and c.kernel_size == k and c.stride == stride]
        cfg, src = max(cands, key=lambda cs: _activation_elems(cs[0]))
        cases.append(Case(cfg, src, "bf16", layout, backends))
    cfg, src = max(((c, s) for c, s in all_layers if c.kind != "dwconv_bn_act"), key=lambda cs: _activation_elems(
        cs[0]))
    cases += [Case(cfg, src, "bf16", layout) for layout in LAYOUTS]
    return cases


def all_cases(all_layers: list[tuple[Any, str]], dtypes: list[str], layouts: list[str], ks: list[int],
              dilations: tuple[int, ...] = (1,)) -> list[Case]:
    """Every layer in every dtype and layout; depthwise layers of the kernel sizes ``ks``, once per dilation in
    ``dilations`` (no MobileNet layer has dilation 2: those are variants of the same shapes, same output size)."""
    cases = []
    for cfg, src in all_layers:
        if cfg.kind != "dwconv_bn_act":
            cases += [Case(cfg, src, dtype, layout) for dtype in dtypes for layout in layouts]
        elif cfg.kernel_size in ks:
            for d in dilations:
                var = dataclasses.replace(cfg, dilation=d)
                cases += [Case(var, src if d == cfg.dilation else f"dilation-{d} variant of {cfg.name}", dtype,
                               layout) for dtype in dtypes for layout in layouts]
    return cases


def shape_of(case: Case, batch: int) -> Shape:
    from mnet_ext.reference import output_hw

    cfg = case.layer
    ho, wo = (output_hw(cfg.height, cfg.width, cfg.kernel_size, cfg.stride, cfg.dilation)
              if cfg.kind == "dwconv_bn_act" else (cfg.height, cfg.width))
    return Shape(batch, cfg.channels, cfg.height, cfg.width, ho, wo)


# ------------------------------------------------------------------------------------------------- Triton launches
def launcher_calls(case: Case, batch: int) -> tuple[str, list[tuple[str, tuple]]]:
    """(kernel module, [(launcher, args)]) running every primitive of ``case``'s op on meta tensors (shapes and
    strides only: no memory, no device)."""
    import torch

    cfg = case.layer
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[case.dtype]
    fmt = torch.channels_last if case.layout == "NHWC" else torch.contiguous_format
    s = shape_of(case, batch)
    x = torch.empty((s.n, s.c, s.h, s.w), dtype=dtype, device="meta", memory_format=fmt)
    if cfg.kind != "dwconv_bn_act":
        gate = torch.empty((s.n, s.c), dtype=torch.float32, device="meta")
        return "mnet_ext.triton_kernels.squeeze_excite", [
            ("se_pool", (x,)), ("se_scale", (x, gate)), ("se_bwd_reduce", (x, x)), ("se_bwd_apply", (x, gate, gate))]
    w = torch.empty((s.c, 1, cfg.kernel_size, cfg.kernel_size), dtype=dtype, device="meta")
    gy = torch.empty((s.n, s.c, s.ho, s.wo), dtype=dtype, device="meta", memory_format=fmt)
    v = torch.empty((s.c,), dtype=torch.float32, device="meta")
    geo = (cfg.stride, cfg.dilation)
    return "mnet_ext.triton_kernels.dwconv_bn_act", [
        ("dwconv_bn_act_fwd_eval", (x, w, v, v, v, v, *geo, cfg.act)),
        ("dwconv_bn_act_fwd", (x, w, v, v, v, v, *geo, cfg.act)),  # the training apply pass
        ("dwconv_bn_stats", (x, w, *geo)),
        ("dwconv_bn_act_bwd_reduce", (gy, x, w, v, v, v, v, *geo, cfg.act)),
        ("dwconv_bn_act_bwd_apply", (gy, x, w, v, v, v, v, v, v, *geo, cfg.act)),
    ]


# ------------------------------------------------------------------------------------------------- records
def per_elem(path: sass.PathSummary, trips: float | None, outputs_per_iter: float,
             inner_trips: float | None = None, nest: tuple | None = None) -> dict[str, float]:
    """Instructions (all, FMA, global memory) per element of the iteration space: see the module docstring."""
    if nest is not None:
        if path.nest is None:
            raise ValueError("the plan expects nested loops, the SASS has none")
        path = dataclasses.replace(path, body=sass.nested_body(path.nest, nest))
    elif inner_trips is not None and path.inner is not None and path.body is not None:
        extra = inner_trips - 1.0  # ``body`` already holds one inner iteration
        path = dataclasses.replace(path, body=sass.Cost(0, path.body.instrs + round(extra * path.inner.instrs),
                                                        path.body.fma + round(extra * path.inner.fma),
                                                        path.body.global_mem + round(extra * path.inner.global_mem)))
    if trips is None or path.body is None or path.outside is None:
        if trips is not None and trips > 1.0 and path.body is None:
            raise ValueError(f"the plan has {trips:.1f} loop trips per thread but the SASS has no loop")
        per_thread = (path.straight.instrs, path.straight.fma, path.straight.global_mem)
        outputs = outputs_per_iter * (trips or 1.0)
    else:
        o, b = path.outside, path.body
        per_thread = (o.instrs + trips * b.instrs, o.fma + trips * b.fma, o.global_mem + trips * b.global_mem)
        outputs = trips * outputs_per_iter
    sass_e, fma_e, gmem_e = (v / outputs for v in per_thread)
    return {"sass_per_output_elem": sass_e, "fma_per_output_elem": fma_e, "gmem_per_output_elem": gmem_e,
            "outputs_per_thread": outputs}


def make_record(arch: int, backend: str, kernel: str, role: str, dtype: str | None, layout: str | None,
                k: int | None, case: Case | None, batch: int, res: dict[str, Any], plan: Plan | None,
                threads: int, extra: dict[str, Any], act_sass: float | None = None) -> dict[str, Any]:
    """One JSON record. ``res``: the build summary (resources, path); ``plan``: None for kernels without one;
    ``act_sass``: instructions per output element the layer's activation adds to the counted path (CUDA forward:
    the path counts the runtime switch's ``none`` case)."""
    rec: dict[str, Any] = {
        "arch": arch, "backend": backend, "kernel": kernel, "role": role, "primitive": ROLES[role].primitive,
        "hot": ROLES[role].hot, "dtype": dtype, "layout": layout, "k": k,
        "layer": case.layer.name if case else None, "layer_source": case.source if case else None,
        "act": case.layer.act if case else None, "act_sass_per_elem": act_sass,
        "stride": case.layer.stride if case else None, "batch": batch if case else None, **extra,
        "threads": threads, "regs": None, "spill_bytes": None, "spill_load_bytes": None, "stack_bytes": None,
        "smem_bytes": None, "blocks_per_sm": None, "trips": plan.trips if plan else None,
        "outputs_per_thread": None, "sass_per_output_elem": None, "fma_per_output_elem": None,
        "gmem_per_output_elem": None, "planned_bytes_per_elem": None, "error": res.get("error"),
    }
    if "error" in res:
        return rec
    smem = res["smem_bytes"] + res.get("shared_dynamic", 0) + (plan.dynamic_smem if plan else 0)
    rec.update(regs=res["regs"], spill_bytes=res["spill_store_bytes"], spill_load_bytes=res["spill_load_bytes"],
               stack_bytes=res["stack_bytes"], smem_bytes=smem,
               blocks_per_sm=sass.blocks_per_sm(res["regs"], smem, threads, sass.SM_LIMITS[arch]))
    if plan is None or case is None:
        return rec
    try:
        rec.update(per_elem(sass.PathSummary.from_dict(res["path"]), plan.trips, plan.outputs_per_iter,
                            plan.inner_trips, plan.nest))
    except ValueError as exc:
        rec["error"] = str(exc)
        return rec
    if act_sass is not None:
        rec["sass_per_output_elem"] += act_sass
    bytes_fn = ROLES[role].bytes_per_elem
    if bytes_fn and dtype:
        es = ELEM_SIZE[dtype]
        bpe = bytes_fn(shape_of(case, batch).ratio, es) / es
        rec["planned_bytes_per_elem"] = bpe
        for gpu, (bw, issue) in RATES.get(arch, {}).items():
            ratio = (rec["sass_per_output_elem"] / issue) / (bpe * es / bw)
            rec[f"issue_over_mem_{gpu}"] = ratio
            rec[f"bound_{gpu}"] = "issue" if ratio > 1 else "memory"
    return rec


def _op_of(role: str) -> str:
    return "squeeze_excite" if role.startswith("se_") else "dwconv_bn_act"


ACT_PROBE = "bench/act_cost.cu"
ACT_NAMES = ("none", "relu", "relu6", "hardswish", "silu", "hardsigmoid", "sigmoid")  # activations.h: enum Act
# The probe family per epilogue (bench/act_cost.cu): "float" act_cost<A> (act_fwd on fp32, then the rounding), "pair"
# act_pair_cost<A> (act_pair on bf16 pairs: relu / relu6 after the rounding), and the kernels with the pair epilogue.
ACT_PROBES = {"act_cost": "float", "act_pair_cost": "pair"}
PAIR_ACT_KERNELS = ("fwd_mma_kernel",)


def act_costs(jobs: list[dict], results: dict[str, dict]) -> dict[int, dict[str, dict[str, float]]]:
    """arch -> epilogue ("float", "pair") -> {activation: SASS instructions per output element it adds}: the probe
    kernels of ``ACT_PROBE`` (8 outputs per thread), each one's counted path minus its ``<None>``'s, over 8."""
    costs: dict[int, dict[str, dict[str, float]]] = {}
    for job in jobs:
        lengths: dict[str, dict[str, int]] = {family: {} for family in ACT_PROBES.values()}
        for fn in results[job["key"]]["functions"].values():
            m = re.search(r"(act_cost|act_pair_cost)<\(mnet::Act\)(\d+)>", fn["name"])
            if m is None:
                raise ValueError(f"unexpected kernel in {ACT_PROBE}: {fn['name']}")
            lengths[ACT_PROBES[m.group(1)]][ACT_NAMES[int(m.group(2))]] = sass.PathSummary.from_dict(
                fn["path"]).straight.instrs
        for family, found in lengths.items():
            if set(found) != set(ACT_NAMES):
                raise ValueError(f"{ACT_PROBE} (sm_{job['arch']}, {family}): kernels for {sorted(found)}, expected "
                                 f"{ACT_NAMES}")
        costs[job["arch"]] = {family: {a: (n - found["none"]) / 8 for a, n in found.items()}
                              for family, found in lengths.items()}
    return costs


def cuda_records(jobs: list[dict], results: dict[str, dict], cases: list[Case], batch: int,
                 acts: dict[int, dict[str, float]]) -> list[dict]:
    """Records of the CUDA kernels; ``acts``: ``act_costs``, added to the forward's count for each layer's act."""
    records = []
    cases = [c for c in cases if "cuda" in c.backends]
    for job in jobs:
        res = results[job["key"]]
        if "error" in res:
            records.append(make_record(job["arch"], "cuda", job["source"], "unknown", None, None, None, None,
                                       batch, res, None, 0, {}))
            continue
        for fn in res["functions"].values():
            name, targs = parse_cuda_name(fn["name"])
            spec = CUDA_KERNELS.get(name)
            targs = {**dict(spec.fixed), **targs} if spec else targs
            role = "unknown" if spec is None else spec.role(targs) if callable(spec.role) else spec.role
            dtype, k = targs.get("T"), targs.get("K")
            layout = None if "CL" not in targs else "NHWC" if targs["CL"] else "NCHW"
            extra = {"template_args": targs}
            if spec is None or spec.plan is None:
                if any(dtype in (None, c.dtype) and layout in (None, c.layout) for c in cases):
                    records.append(make_record(job["arch"], "cuda", name, role, dtype, layout, k, None, batch, fn,
                                               None, CUDA_THREADS_UNPLANNED, extra))
                continue
            planned = 0
            for case in cases:
                if (case.dtype, case.layout, case.k) != (dtype, layout, k) or case.layer.kind != _op_of(role):
                    continue
                if "J" in targs and targs["J"] != (2 if case.layer.stride == 2 else 1):
                    continue
                if "FULL" in targs and targs["FULL"] != (layout == "NHWC"):
                    continue
                if "TW" in targs and targs["TW"] != strip_tile_width(targs, shape_of(case, batch).wo):
                    continue
                if "WHOLE" in targs and targs["WHOLE"] != band_whole(shape_of(case, batch), case.layer.stride,
                                                                     targs["TW"]):
                    continue
                if spec.serves is not None and not spec.serves(case, shape_of(case, batch), targs):
                    continue
                plan = spec.plan(shape_of(case, batch), targs)
                epilogue = "pair" if name in PAIR_ACT_KERNELS else "float"
                act_sass = acts[job["arch"]][epilogue][case.layer.act] if role == "fwd" else None
                records.append(make_record(job["arch"], "cuda", name, role, dtype, layout, k, case, batch, fn, plan,
                                           plan.threads, extra, act_sass))
                planned += 1
            if not planned and targs.get("FULL") is False and layout == "NHWC":
                # The channels_last variant for C % V != 0: no MobileNet layer runs it; its resources are listed
                # (not hot: outside the spill gate).
                if any(dtype == c.dtype and layout == c.layout and k == c.k for c in cases):
                    rec = make_record(job["arch"], "cuda", name, role, dtype, layout, k, None, batch, fn, None,
                                      _KTHREADS, {**extra, "variant": "ragged C"})
                    records.append({**rec, "hot": False})
    return records


def triton_records(launches: list[tuple[Case, int, kernel_builds.TritonLaunch]], results: dict[str, dict],
                   batch: int) -> list[dict]:
    """One record per launch and compile job. A launch equal to an earlier one of its case (the training apply pass
    where it runs the eval forward's kernel) is recorded once, under the earlier launcher."""
    records = []
    seen = set()
    for case, arch, launch in launches:
        same = (case, arch, launch.kernel, tuple(sorted(launch.values.items())))
        if same in seen:
            continue
        seen.add(same)
        spec = TRITON_KERNELS.get(launch.kernel)
        v = launch.values
        role = "unknown" if spec is None else spec.role(v) if callable(spec.role) else spec.role
        if role == "fwd" and launch.primitive == "dwconv_bn_act_fwd":
            role = "fwd_train"
        for job in launch.jobs:
            threads = 32 * job["num_warps"]
            plan = None
            if spec is not None and spec.hot and (spec.plan is not None or (
                    ("BLOCK_P" in v or "BLOCK_G" in v) and "BLOCK_C" in v)):
                plan = triton_plan(spec, v, threads, results[job["key"]].get("path"))
            extra = {"num_warps": job["num_warps"], "launcher": launch.primitive,
                     "constexprs": {n: v[n] for n in ("BLOCK_P", "BLOCK_G", "OW", "ROWS", "BLOCK_C", "VEC", "ITERS",
                                                      "G", "WA", "W1", "NB", "RH") if n in v}}
            records.append(make_record(arch, "triton", launch.kernel, role, case.dtype, case.layout, case.k, case,
                                       batch, results[job["key"]], plan, threads, extra))
    return records


# ------------------------------------------------------------------------------------------------- markdown
_ROLE_ORDER = list(ROLES)
# Kernels (roles) behind each mode of an op, for the planned-bytes table; "a|b": either role (backend-specific).
MODE_ROLES = {
    ("dwconv_bn_act", "eval"): ["fwd"],
    ("dwconv_bn_act", "train_fwd"): ["stats", "fwd_train|fwd"],
    ("dwconv_bn_act", "bwd"): ["bwd_reduce", "bwd_apply"],
    ("squeeze_excite", "eval"): ["se_pool", "se_scale|se_apply"],
    ("squeeze_excite", "bwd"): ["se_bwd_reduce", "se_bwd_apply|se_apply"],
}


def _fmt(v: float | None, digits: int = 1) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def _span(values: list[float], digits: int = 1) -> str:
    if not values:
        return "-"
    lo, hi = min(values), max(values)
    return _fmt(lo, digits) if _fmt(lo, digits) == _fmt(hi, digits) else f"{_fmt(lo, digits)}–{_fmt(hi, digits)}"


def _sort_key(r: dict[str, Any]) -> tuple:
    return (r["arch"] != 90, r["backend"], _ROLE_ORDER.index(r["role"]), r["kernel"],
            DTYPES.index(r["dtype"]) if r["dtype"] in DTYPES else -1, str(r["layout"]), r["k"] or 0,
            r.get("num_warps") or 0, r["layer"] or "")


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows]) + "\n"


def _group(records: list[dict[str, Any]], per_layer: bool) -> list[list[dict[str, Any]]]:
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for r in sorted(records, key=_sort_key):
        key = (r["arch"], r["backend"], r["role"], r["kernel"], r["dtype"], r["layout"], r["k"], r.get("num_warps"))
        groups.setdefault(key + ((r["layer"],) if per_layer else ()), []).append(r)
    return list(groups.values())


def _hot_rows(records: list[dict[str, Any]], per_layer: bool) -> tuple[list[str], list[list[str]]]:
    header = ["backend", "role", "kernel", "dtype", "layout", "k", "warps", "layer" if per_layer else "layers",
              "regs", "spill B", "smem B", "blocks/SM", "SASS/elem", "FMA/elem", "gmem ld/st/elem", "bytes/elem",
              "issue÷mem H100", "issue÷mem H200"]
    rows = []
    for g in _group(records, per_layer):
        r0 = g[0]

        def vals(field: str, grp: list[dict[str, Any]] = g) -> list[float]:
            return [r[field] for r in grp if r.get(field) is not None]

        rows.append([
            r0["backend"], r0["role"], f"`{r0['kernel']}`", r0["dtype"] or "-", r0["layout"] or "-",
            str(r0["k"] or "-"), str(r0.get("num_warps") or "-"), r0["layer"] if per_layer else str(len(g)),
            str(max(vals("regs"), default="-")), str(max(vals("spill_bytes"), default="-")),
            str(max(vals("smem_bytes"), default="-")), str(min(vals("blocks_per_sm"), default="-")),
            _span(vals("sass_per_output_elem")), _span(vals("fma_per_output_elem")),
            _span(vals("gmem_per_output_elem"), 2), _span(vals("planned_bytes_per_elem")),
            _fmt(max(vals("issue_over_mem_h100"), default=None), 2),
            _fmt(max(vals("issue_over_mem_h200"), default=None), 2),
        ])
    return header, rows


def _other_rows(records: list[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    header = ["backend", "role", "kernel", "dtype", "layout", "k", "warps", "instances", "regs", "spill B", "smem B",
              "blocks/SM"]
    rows = []
    for g in _group(records, False):
        r0 = g[0]
        rows.append([r0["backend"], r0["role"], f"`{r0['kernel']}`", r0["dtype"] or "-", r0["layout"] or "-",
                     str(r0["k"] or "-"), str(r0.get("num_warps") or "-"), str(len(g)),
                     str(max(r["regs"] for r in g)), str(max(r["spill_bytes"] for r in g)),
                     str(max(r["smem_bytes"] for r in g)), str(min(r["blocks_per_sm"] for r in g))])
    return header, rows


def _bytes_rows(dtypes: list[str]) -> tuple[list[str], list[list[str]]]:
    from mnet_ext.layers import fused_bytes

    rows = []
    for (op, mode), roles in MODE_ROLES.items():
        planned = []
        for dtype in dtypes:
            es = ELEM_SIZE[dtype]
            total = 0.0
            for alt in roles:
                fn = ROLES[alt.split("|")[0]].bytes_per_elem
                assert fn is not None
                total += fn(1.0, es) / es
            planned.append(_fmt(total))
        names = " + ".join(r.replace("|", " or ") for r in roles)
        rows.append([op, mode, names, *planned, _fmt(fused_bytes(op, mode, 1, 1))])
    return ["op", "mode", "kernels (roles)", *dtypes, "fused minimum"], rows


# Issues 12/13, item "budgets": eval forward, bf16, channels_last, every MobileNet layer: SASS per output element.
FWD_BUDGETS = {3: 20.0, 5: 36.0}


def _budget_rows(records: list[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    """The eval forward's budget per (backend, K, stride, activation): the layers' range and how many exceed it."""
    groups: dict[tuple, list[float]] = {}
    for r in records:
        if (r["role"] == "fwd" and r["hot"] and r["dtype"] == "bf16" and r["layout"] == "NHWC" and r["arch"] == 90
                and r["k"] in FWD_BUDGETS and r["sass_per_output_elem"] is not None):
            groups.setdefault((r["backend"], r["k"], r["stride"], r["act"]), []).append(r["sass_per_output_elem"])
    rows = []
    for (backend, k, stride, act), vals in sorted(groups.items()):
        over = sum(v > FWD_BUDGETS[k] for v in vals)
        rows.append([backend, str(k), str(stride), act, str(len(vals)), _span(vals), f"<= {FWD_BUDGETS[k]:g}",
                     "met" if not over else f"**missed on {over}**"])
    return ["backend", "k", "stride", "act", "layers", "SASS/elem", "budget", "verdict"], rows


def markdown(records: list[dict[str, Any]], meta: dict[str, Any], per_layer: bool) -> str:
    out = ["# Static kernel report\n",
           f"`python -m bench.kernel_report {meta['argv']}` at commit {meta['commit']}: {meta['tools']}. "
           f"Scope: {meta['scope']}. Method and columns: the docstring of `bench/kernel_report.py`. Values over "
           "the layers of a row: the worst (max registers, spill-store bytes and shared memory per block, min "
           "resident blocks per SM, max issue÷mem), ranges for the per-element columns (SASS/elem: instructions per "
           "output element on the main path; bytes/elem: planned DRAM bytes in units of the element size; "
           "issue÷mem > 1: issue-bound at 3e13 thread-instructions/s against 3.0 (H100) / 4.3 (H200) TB/s).\n"]
    errors = [r for r in records if r["error"]]
    for arch in sorted({r["arch"] for r in records}, key=lambda a: (a != 90, a)):
        hot = [r for r in records if r["arch"] == arch and r["hot"] and not r["error"]]
        other = [r for r in records if r["arch"] == arch and not r["hot"] and not r["error"]]
        if hot:
            out.append(f"## sm_{arch}: hot kernels\n")
            out.append(_table(*_hot_rows(hot, per_layer)))
        if other:
            out.append(f"## sm_{arch}: other kernels (second stages, unplanned)\n")
            out.append(_table(*_other_rows(other)))
    budget = _budget_rows(records)
    if budget[1]:
        out.append("## sm_90: eval forward budgets (bf16, channels_last; each layer counted with its own activation)\n")
        out.append(_table(*budget))
    dtypes = [d for d in DTYPES if any(r["dtype"] == d for r in records)] or list(DTYPES)
    out.append("## Planned DRAM bytes per mode, stride 1 (units of A = one activation tensor)\n")
    out.append("Both backends plan the same passes today; the fused minimum is `mnet_ext.layers.fused_bytes`.\n")
    out.append(_table(*_bytes_rows(dtypes)))
    if errors:
        out.append("## Errors\n")
        out.append(_table(["arch", "backend", "kernel", "layer", "error"], [
            [str(r["arch"]), r["backend"], f"`{r['kernel']}`", r["layer"] or "-", r["error"].replace("\n", " ")[:300]]
            for r in errors]))
    return "\n".join(out)


# ------------------------------------------------------------------------------------------------- CLI
def _commit() -> str:
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                             check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "csrc", "triton_kernels", "setup.py"], cwd=ROOT,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return sha + (" (kernel sources modified)" if dirty else "")


def _csv(value: str, allowed: tuple, convert: Callable[[str], Any] = str) -> list:
    items = [convert(v.strip()) for v in value.split(",") if v.strip()]
    bad = [i for i in items if i not in allowed]
    if bad:
        raise argparse.ArgumentTypeError(f"{bad}: expected values from {allowed}")
    return items


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backend", default="cuda,triton", type=lambda v: _csv(v, ("cuda", "triton")))
    p.add_argument("--arch", default="90", type=lambda v: _csv(v, (90, 80), int), help="compute capabilities")
    p.add_argument("--dtype", default="bf16", type=lambda v: _csv(v, DTYPES))
    p.add_argument("--layout", default="nhwc,nchw", type=lambda v: [x.upper() for x in _csv(v, ("nhwc", "nchw"))])
    p.add_argument("--k", default="3,5,7", type=lambda v: _csv(v, (3, 5, 7), int), help="depthwise kernel sizes")
    p.add_argument("--dilation", default="1", type=lambda v: _csv(v, (1, 2), int),
                   help="depthwise dilations (2: a variant of every depthwise layer; SE layers once)")
    p.add_argument("--kernels", default=None, type=lambda v: v.split(","),
                   help="Triton only: compile and report just these kernels (e.g. _bwd_apply_kernel); a sweep of the "
                        "kernels a change touches")
    p.add_argument("--models", default=None, help="comma list of mnet_ext.layers.MODEL_BUILDERS (default: all)")
    p.add_argument("--batch", type=int, default=256, help="batch size the launch plans are made for")
    p.add_argument("--quick", action="store_true",
                   help="CI subset: sm_90, bf16, NHWC K=3 and K=5 and NCHW K=3 on one layer each, one SE layer")
    p.add_argument("--per-layer", action="store_true", help="markdown: one row per layer instead of aggregates")
    p.add_argument("--json", default=None, help="write the records as a JSON list to this file")
    p.add_argument("--out", default=None, help="write the markdown to this file instead of stdout")
    p.add_argument("--cache-dir", default=str(kernel_builds.DEFAULT_CACHE))
    p.add_argument("--jobs", type=int, default=2, help="parallel compile processes")
    p.add_argument("--sass-dir", default=None, help="also write every disassembly there (recompiles everything)")
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    start = time.time()
    from mnet_ext import triton_kernels

    if triton_kernels.interpreting():
        raise SystemExit("kernel_report compiles the Triton kernels: run it without TRITON_INTERPRET=1")
    from mnet_ext.layers import MODEL_BUILDERS

    models = tuple(args.models.split(",")) if args.models else tuple(MODEL_BUILDERS)
    found = layers(models)
    if args.quick:
        args.arch, args.dtype = [90], ["bf16"]
        cases = quick_cases(found)
    else:
        cases = all_cases(found, args.dtype, args.layout, args.k, tuple(args.dilation))
    if (args.kernels or args.dilation != [1]) and args.backend != ["triton"]:
        # the CUDA records' launch plans (CUDA_KERNELS) model dilation 1 only
        raise SystemExit("kernel_report: --kernels and --dilation 2 are Triton sweeps: use them with --backend triton")
    cache = pathlib.Path(args.cache_dir)
    build = kernel_builds.cuda_build()
    tools = kernel_builds.find_tools(build.cuda_home)
    cuda_jobs = kernel_builds.cuda_jobs(build, tools, args.arch) if "cuda" in args.backend else []
    if "cuda" in args.backend and not cuda_jobs:
        raise SystemExit("kernel_report: no CUDA toolkit (or torch without CUDA): use --backend triton")
    act_jobs = kernel_builds.cuda_jobs(build, tools, args.arch, (ACT_PROBE,)) if cuda_jobs else []
    launches = []
    if "triton" in args.backend:
        for arch in args.arch:
            for case in (c for c in cases if "triton" in c.backends):
                module, calls = launcher_calls(case, args.batch)
                launches += [(case, arch, launch) for launch in kernel_builds.triton_launches(module, calls, arch)
                             if not args.kernels or launch.kernel in args.kernels]
    jobs = cuda_jobs + act_jobs + [j for _, _, launch in launches for j in launch.jobs]
    print(f"kernel_report: {len(cases)} layer cases, {len({j['key'] for j in jobs})} unique kernels to compile or "
          f"read from {cache}", file=sys.stderr)
    results = kernel_builds.run_jobs(jobs, tools, cache, args.jobs, args.sass_dir, not args.no_progress)
    records = (cuda_records(cuda_jobs, results, cases, args.batch, act_costs(act_jobs, results)) +
               triton_records(launches, results, args.batch))
    records.sort(key=_sort_key)
    import triton

    scope = (f"sm_{'/'.join(map(str, args.arch))}, {', '.join(args.backend)}, {', '.join(args.dtype)}, "
             f"{len({c.layer for c in cases})} layers" + (" (--quick)" if args.quick else
                                                         f", {'/'.join(args.layout)}, K {args.k}") +
             (f", dilation {args.dilation}" if args.dilation != [1] and not args.quick else "") +
             (f", kernels {','.join(args.kernels)}" if args.kernels else "") +
             f", batch {args.batch}")
    meta = {"argv": " ".join(argv if argv is not None else sys.argv[1:]), "commit": _commit(), "scope": scope,
            "tools": f"nvcc {tools.nvcc_release}, Triton {triton.__version__}"}
    md = markdown(records, meta, args.per_layer)
    if args.out:
        pathlib.Path(args.out).write_text(md)
    else:
        sys.stdout.write(md)
    if args.json:
        lines = (json.dumps(_rounded(r), separators=(",", ":"), allow_nan=False) for r in records)
        pathlib.Path(args.json).write_text("[\n" + ",\n".join(lines) + "\n]\n")  # one record per line: diffable
    errors = sum(1 for r in records if r["error"])
    print(f"kernel_report: {len(records)} records, {errors} errors, {time.time() - start:.0f} s", file=sys.stderr)
    return 1 if errors else 0


def _rounded(o: Any) -> Any:
    """Floats to 4 decimals (the counts are estimates; the JSON stays small), recursively."""
    if isinstance(o, float):
        return round(o, 4)
    if isinstance(o, dict):
        return {k: _rounded(v) for k, v in o.items()}
    return o


if __name__ == "__main__":
    sys.exit(main())
