"""Triton kernels for mnet_ext: ``dwconv_bn_act`` (depthwise conv + BatchNorm + activation) and
``squeeze_excite``. Host launchers have the signatures of ``mnet_ext.reference``; ``mnet_ext.backends.triton``
re-exports them.

This module holds what both ops share: the interpreter switch, the fixed warp count, the tile heuristics
(``tile_sizes`` for SE, ``dw_tile`` for the depthwise kernels) and the ``@triton.jit`` helpers that place a program
in the grid and orient its tile.

Tiles. Every kernel works on a 2-D tile of BLOCK_P pixels (flattened ``h * W + w`` of one image; the depthwise
kernels: BLOCK_G groups of OW consecutive columns of one row) by BLOCK_C channels. The axis that is contiguous in
memory is made the *last* (fastest) axis of the tile so that a warp's threads walk consecutive addresses: channels
for channels_last (NHWC), pixels for NCHW. The constexpr ``CHANNELS_LAST`` picks the orientation; all arithmetic
broadcasts either way and per-channel reductions go through ``sum_pixels``. The orientation only affects speed,
never results: every address is formed from the tensor's own four strides.

No autotuning: every launch's tile and warp count is a function of the shape, so nothing is benchmarked inside a
call (a first call can be captured in a CUDA graph) and every reduction's order, hence its result, is fixed.
"""

from __future__ import annotations

import functools
import os
from typing import NamedTuple

import torch
import triton
import triton.language as tl

# Elements per [pixels x channels] tile of the SE kernels on a GPU: 4096 fp32 values = 32 registers per thread and
# per live tile with 4 warps.
_TILE_ELEMS = 4096
# Longest pixel run of an NCHW SE tile (the contiguous axis there).
_NCHW_BLOCK_P = 1024
# Warps of every kernel: fixed, so that the reduction tree of each ``tl.sum`` (hence every sum the reductions
# return) depends on the shape alone, never on a timing (no autotuning: nothing is benchmarked inside a call, and a
# first call can be captured in a CUDA graph).
NUM_WARPS = 4
# Depthwise tiles (``dw_tile``): groups x channels per tile. channels_last: 8 channels (16 bytes of bf16) per
# thread, one group per thread at 4 warps; NCHW: 2 (group, channel) slots per thread.
_DW_NHWC_SLOTS = 1024
_DW_NCHW_SLOTS = 256
# Most outputs per group (consecutive output columns a thread computes from one window of input columns) by kernel
# kind and K: a thread holds OW x 8 accumulators, K x 8 weights and the window's columns, so this bounds the live
# registers. Measured on sm_90 (bf16 and fp32): a reduction (stats, bwd_reduce: more live per-channel vectors and
# sums; hardswish's derivative) at K = 3, OW = 7 spills up to 140 bytes, at K = 5, OW = 5 28 bytes; at K = 7 the
# weights alone take 56 registers, so the K = 7 reductions hold 2 slots per thread. The backward apply holds 2 slots
# per thread (1 at K = 7), not 8 channels: its K*K dweight sums per slot stay in registers across its bands (K = 7
# at 2 slots: 28 bytes of spill in fp32 in the former dz kernel; NCHW K = 3, stride 2, OW = 8: 12 bytes). The
# forward at K <= 5 takes OW = Wo on outputs of <= 7 columns (``dw_tile``).
_DW_OW_MAX = {"fwd": {3: 8, 5: 6, 7: 4}, "reduce": {3: 4, 5: 4, 7: 2}, "apply": {3: 4, 5: 4, 7: 2}}
# Most outputs per row of a forward group of _DW_FWD_ROWS output rows (``dw_tile(shared_rows=True)``: channels_last,
# stride 1, dilation 1), by K: each converted input row feeds the group's rows, so a thread holds ROWS x OW x 8
# accumulators. Measured (bf16 and fp16; the launcher takes one-row groups for fp32, which has no conversion to
# share): K = 3 at 2 x 6 uses 238-254 registers without spill on sm_90 and sm_80, 2 x 8 spills 116-164 bytes and
# 2 x 7 12-64 on the 112-, 56- and 28-wide outputs (sm_90 bf16 relu6, sm_80 fp16 relu); the 7- and 14-wide ones
# take 2 x 7 without spill (_DW_FWD_ROWS_OW_NARROW; 245-255 registers, sm_90 and sm_80, bf16 and fp16: the 14-wide
# K = 3 layers 23.7-28.6 -> 19.9-24.9 SASS/elem, sm_90 bf16), but 2 x 5 spilled 24 bytes on 14-wide outputs on
# sm_80, so the unmeasured widths 8-13 keep one-row groups (_DW_FWD_ROWS_SKIP_WO); K = 5 at 2 x 4 236-254
# registers (2 x 6 and 3 x 3 spill); K = 7 keeps one-row groups.
_DW_FWD_ROWS = 2
_DW_FWD_ROWS_OW_MAX = {3: 6, 5: 4}
_DW_FWD_ROWS_OW_NARROW = {3: (14, 7)}  # K: (outputs of at most this many columns, OW up to this)
_DW_FWD_ROWS_SKIP_WO = {3: (8, 13)}  # K: output widths (inclusive range) that keep one-row groups


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for the launchers' host arithmetic. ``triton.cdiv`` and ``triton.next_power_of_2`` are
    ``ConstexprFunction`` objects in recent Triton, ~6 us per host call on a CPU core (measured with Triton 3.8),
    and a layer's launchers make about ten such calls per step: the small layers are host-bound."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """The smallest power of two >= n (0 for n <= 0, as ``triton.next_power_of_2``), for host code (see ``cdiv``)."""
    return 1 << (n - 1).bit_length() if n > 0 else 0


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1 before triton was imported)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def on_tensor_device(fn):
    """Run launcher ``fn`` with its first tensor's CUDA device current: Triton launches on the current device,
    which need not be the tensors' (e.g. a model replica on cuda:1)."""

    @functools.wraps(fn)
    def wrapper(t, *args, **kwargs):
        if t.is_cuda and t.device.index != torch.cuda.current_device():
            with torch.cuda.device(t.device):
                return fn(t, *args, **kwargs)
        return fn(t, *args, **kwargs)

    return wrapper


def next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def pick_block_c(channels: int) -> int:
    """Channel block for a channels_last SE tile: the largest of 64/32/16 that keeps >= 85% of the lanes busy
    (C = 72 -> 16, not 64 with 56% busy), else the most efficient (ties to the larger). Masked lanes cost no
    bandwidth, but they cost issue slots and shrink the bytes in flight per program."""
    cands = [b for b in (64, 32, 16) if b <= next_pow2(channels)] or [next_pow2(channels)]

    def eff(b: int) -> float:
        return channels / (-(-channels // b) * b)

    good = [b for b in cands if eff(b) >= 0.85]
    return good[0] if good else max(cands, key=lambda b: (eff(b), b))


def tile_sizes(pixels: int, channels: int, channels_last: bool) -> tuple[int, int]:
    """(BLOCK_P, BLOCK_C) for a tile over ``pixels`` x ``channels``: the contiguous axis gets up to 64 channels
    (channels_last: 128 bytes of bf16 per pixel, see ``pick_block_c``) or 1024 pixels (NCHW), the other axis
    fills the tile to ``_TILE_ELEMS``. Tiny shapes give one tile per image, which keeps interpreter runs short."""
    if channels_last:
        block_c = pick_block_c(channels)
        block_p = min(next_pow2(pixels), max(16, _TILE_ELEMS // block_c))
    else:
        block_p = min(next_pow2(pixels), _NCHW_BLOCK_P)
        block_c = min(next_pow2(channels), max(1, _TILE_ELEMS // block_p))
    return block_p, block_c


class DwTile(NamedTuple):
    """Tile of the depthwise kernels: BLOCK_G groups x BLOCK_C channels, a group being OW consecutive output
    columns of one output row (``groups_per_row`` = cdiv(Wo, OW) groups per row, ``num_gb`` group blocks per image),
    computed by ``num_warps`` warps."""

    ow: int
    groups_per_row: int
    block_g: int
    block_c: int
    num_gb: int
    num_warps: int
    rows: int = 1  # output rows per group (the forward's multi-row groups; 1 elsewhere)


# Cached: a launch's planning is a pure function of these ints, and this search costs ~0.3 ms of Python per call
# (more than a small layer's kernels on a GPU: the first H200 run's Triton layers were host-bound).
@functools.lru_cache(maxsize=4096)
def dw_tile(ho: int, wo: int, channels: int, channels_last: bool, k: int, kind: str = "fwd",
            max_block_c: int = 128, shared_rows: bool = False, elem_bytes: int = 2) -> DwTile:
    """The depthwise tile for an output of ``ho`` x ``wo`` pixels and ``channels`` channels: a pure function of the
    shape (no timing, so every reduction over it is reproducible). Among OW <= _DW_OW_MAX[kind][k] (fwd, reduce for
    stats and bwd_reduce, apply for the backward apply) and power-of-two blocks of at most _DW_*_SLOTS groups x channels
    and at most ``max_block_c`` channels (the backward apply's dz slot holds rows x Wo x BLOCK_C; channels_last: at
    least 8 channels, one 16-byte bf16 vector per thread, except in the backward apply), it keeps the configurations
    whose lanes do useful work at >= 80 % (masked groups, columns past Wo, channels past C; at K <= 5 the forward also
    idle lanes of a warp with no slot: no quarter of the lanes idle) and takes the largest min(OW, 4) x min(slots, 512)
    (x values reused by more outputs: OW = 1 costs 2.5x the instructions of OW = 4 at K = 7; tiles of fewer slots leave
    warps idle), then the largest OW, then the busiest lanes; with none at 80 %, the busiest. channels_last reductions
    (stats, bwd_reduce) take 128-channel blocks only in tiles of one warp: at 2 or 4 warps ptxas keeps 16-20 bytes of
    the epilogue's addresses in local memory (measured on sm_90, bf16: 14x14 and 28x28 layers with C >= 128); 64-channel
    blocks of the same shapes do not spill and issue as many or fewer instructions per output. The forward at K <= 5
    takes one group of Wo columns per row when Wo <= 7: on V3's 7 x 7 outputs the former OW = 4 + 3 tiles of 2 groups
    kept 8-16 of 32 lanes busy (NHWC K = 5: 102-162 SASS instructions per output; 51-68 with this rule, no spill in bf16
    or fp32 on sm_90). At K = 7 the same rule spilled 24 bytes in fp32 (a 1-warp tile at 168 registers), and OW = 7 on
    wider outputs spilled in fp32 (stride 2, 255 registers); counted in the reductions, idle lanes moved two K = 5
    layers (7 x 7 outputs) to 1-warp tiles of 128 channels that spill 4-12 bytes. Those keep the former choice.

    ``elem_bytes`` (x's element size; the backward reduction passes it): channels_last tiles hold one 16-byte vector
    per thread, 4 channels in fp32 (with 8, two vectors, bwd_reduce spilled 48 bytes at 168 registers on sm_90 at
    stride 2); the default 2 is the 8 channels of bf16/fp16.

    ``shared_rows`` (the forward at stride 1 and dilation 1; channels_last, K <= 5): groups of _DW_FWD_ROWS output
    rows x OW <= _DW_FWD_ROWS_OW_MAX[k] columns (see _DW_FWD_ROWS_OW_NARROW, _SKIP_WO) compete with one-row
    groups by outputs per converted input value of the group's window: each input row is loaded and converted once
    for both rows (at K = 3, OW = 6: 4 input rows per 2 output rows instead of 6)."""
    # the backward apply (its K*K dweight sums per slot live in registers) and the K = 7 reductions: 2 slots per
    # thread in both layouts; the backward apply at K = 7: 1
    narrow = not channels_last or kind == "apply" or (kind == "reduce" and k == 7)
    # channels_last: one 16-byte vector per thread (8 bf16/fp16 or 4 fp32 channels), 4 warps' worth of slots
    vec = 16 // elem_bytes
    slots = _DW_NCHW_SLOTS if narrow else _DW_NHWC_SLOTS * vec // 8
    per_thread = 2 if narrow else vec
    if kind == "apply" and k == 7:
        slots, per_thread = slots // 2, 1
    ow_max = min(_DW_OW_MAX[kind][k], wo)
    fill_warp = kind == "fwd" and k <= 5  # see the docstring
    if fill_warp and wo <= 7:
        ow_max = wo
    c_floor = 1 if narrow else min(vec, next_pow2(channels))
    block_cs = [b for b in (1, 2, 4, 8, 16, 32, 64, 128)
                if c_floor <= b <= max(c_floor, min(max_block_c, next_pow2(channels)))]
    # channels that no block can use (C = 5 in blocks of 8) are not the tile's fault: measure against the best
    c_eff = max(channels / (-(-channels // b) * b) for b in block_cs)
    warp = max(1, slots // per_thread // NUM_WARPS)  # threads of one warp: 32 (1 under the tests' small tiles)
    multi = shared_rows and channels_last and kind == "fwd" and k in _DW_FWD_ROWS_OW_MAX
    shapes = [(1, ow) for ow in range(1, ow_max + 1)]
    skip_lo, skip_hi = _DW_FWD_ROWS_SKIP_WO.get(k, (0, -1))
    if multi and not skip_lo <= wo <= skip_hi:
        narrow_wo, narrow_ow = _DW_FWD_ROWS_OW_NARROW.get(k, (0, 0))
        ow_rows = narrow_ow if wo <= narrow_wo else _DW_FWD_ROWS_OW_MAX[k]
        shapes += [(_DW_FWD_ROWS, ow) for ow in range(1, min(ow_rows, wo) + 1)]
    best, best_key = None, None
    for rows, ow in shapes:
        gpr = -(-wo // ow)
        groups = -(-ho // rows) * gpr
        for block_c in block_cs:
            block_g = 1
            while block_g <= min(next_pow2(groups), max(1, slots // block_c)):
                threads = block_g * block_c // per_thread
                if kind == "reduce" and not narrow and block_c > 64 and threads > 32:
                    break  # measured (sm_90): 128-channel reduction tiles of more than one warp spill
                eff = ho * wo * channels / (-(-groups // block_g) * block_g * rows * ow * -(-channels // block_c)
                                            * block_c)
                if fill_warp:  # a tile of fewer threads than a warp leaves lanes idle
                    eff *= min(1.0, threads / warp)
                good = eff >= 0.8 * c_eff
                # x values reused by more outputs: OW (capped: OW = 1 costs 2.5x the instructions of OW = 4 at
                # K = 7); with shared rows, outputs per converted input value of the group's window
                reuse = rows * ow / ((rows + k - 1) * (ow + k - 1)) if multi else min(ow, 4)
                key = (good, reuse * min(block_g * block_c, 512) if good else 0, ow, eff, block_g * block_c)
                if best_key is None or key > best_key:
                    best_key = key
                    best = DwTile(ow, gpr, block_g, block_c, -(-groups // block_g),
                                  max(1, min(NUM_WARPS, block_g * block_c // per_thread // 32)), rows)
                block_g *= 2
    assert best is not None
    return best


def vec_width(channels_last: bool, channels: int, *tensors) -> int:
    """The kernels' VEC: 1 for NCHW; for channels_last the largest power of two <= 8 dividing C and the image,
    row and column strides of every activation tensor the kernel indexes (see ``hint_multiple``)."""
    if not channels_last:
        return 1
    values = [channels] + [t.stride(d) for t in tensors for d in (0, 2, 3)]
    vec = 8
    while vec > 1 and any(v % vec for v in values):
        vec //= 2
    return vec


@triton.jit
def hint_multiple(v, VEC: tl.constexpr):
    """``v`` (a scalar the host checked is a multiple of VEC) rewritten as (v // VEC) * VEC, which the compiler
    can prove divisible by VEC. Triton only specialises integer arguments divisible by 16; with this hint a
    channels_last tile with C = 24, 40, 72 or 120 still loads 8 consecutive bf16 channels as one 16-byte vector
    (the channel mask ``c < C`` and the pixel offsets then share that divisibility). Costs two integer ops."""
    if VEC > 1:
        v = (v // VEC) * VEC
    return v


@triton.jit
def program_tile(num_pb, num_cb):
    """(n, pb, cb, row) of this program in a 1-D grid of N * num_pb * num_cb programs (axis 0 allows 2^31 - 1):
    channel block cb fastest, then pixel block pb of image n; row = n * num_pb + pb indexes the per-tile partial
    buffers. Channel blocks of the same pixels run back to back, so DRAM sectors they share (channels_last
    pixels whose channel count is not a multiple of the block) are fetched once and hit L2 for the neighbour."""
    pid = tl.program_id(0)
    cb = pid % num_cb
    row = pid // num_cb
    return row // num_pb, row % num_pb, cb, row


@triton.jit
def tile_offsets(pid_p, pid_c, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr, CHANNELS_LAST: tl.constexpr):
    """Pixel and channel offsets of tile (pid_p, pid_c), shaped to broadcast into the tile:
    channels_last: offs_p [BLOCK_P, 1], offs_c [1, BLOCK_C]; NCHW: offs_p [1, BLOCK_P], offs_c [BLOCK_C, 1]."""
    p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    if CHANNELS_LAST:
        offs_p = p[:, None]
        offs_c = c[None, :]
    else:
        offs_p = p[None, :]
        offs_c = c[:, None]
    return offs_p, offs_c


@triton.jit
def sum_pixels(v, CHANNELS_LAST: tl.constexpr):
    """Sum of a tile over its pixel axis, kept as a broadcastable per-channel vector (the shape of offs_c)."""
    if CHANNELS_LAST:
        r = tl.sum(v, axis=0, keep_dims=True)
    else:
        r = tl.sum(v, axis=1, keep_dims=True)
    return r
