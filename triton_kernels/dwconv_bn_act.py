"""Fused depthwise conv + BatchNorm + activation in Triton: the four primitives of ``docs/op_contract.md``.

Order: ``@triton.jit`` helpers and kernels, then host launchers (same signatures as ``mnet_ext.reference``).

Geometry: x [N, C, H, W] -> z [N, C, Ho, Wo] with padding (K - 1) // 2 * DIL. A tile is BLOCK_G groups by BLOCK_C
channels, a group being OW consecutive output columns of one output row (``triton_kernels.dw_tile``: a function of
the shape, OW bounded per kind and K so that nothing spills). ``_conv_groups`` computes a tile's z in fp32: kernel
row 0, then a runtime loop over rows 1 ... K - 1; per row the K weights (fp32 taps [K*K, CP], a copy the launcher
makes: one 16-byte load per 4 channels, no conversion) and the NJ input columns of the group's window, each loaded
and converted once and used by every output that reads it. channels_last tiles hold 8 channels (a 16-byte bf16
vector) per thread. The forward at stride 1 and dilation 1 (channels_last, bf16/fp16) takes groups of ROWS = 2
output rows (``dw_tile(shared_rows=True)``, ``_conv_input_row``): it walks the group's ROWS + K - 1 input rows
(the first and last unrolled, the rows every output row reads in a runtime loop) and multiplies each converted
input row into both output rows, so an x value is loaded and converted (K + 1) / 2 instead of K times per output
row. Per output the taps add in (kh, kw) order whatever the tile, so every kernel recomputes the same z bit for
bit (bwd_reduce and dz see the same g). Per-image offsets are int32, the image base ``n * stride_n`` is int64
(the launchers check that one image stays below 2^31 elements).

Launches per primitive: fwd 1 (one tile per program); stats 2 (per program: shifted sums over ITERS tiles, then
one (count, mean, M2) row; a deterministic Chan combine); bwd_reduce 2 (sums over ITERS tiles; deterministic column
sum); bwd_apply 2 (``_bwd_apply_kernel``: per program ITERS bands of TB output rows, dz recomputed on the band plus
its halo rows into a program-private fp32 slot, the dweight sums from the band's own dz, dx gathered from the slot;
then the deterministic column sum of the dweight rows into weight's dtype). Every warp count and tile is fixed by
the shape (no autotuning, nothing benchmarked inside a call, CUDA graph capture safe) and the stage-1 row count does
not depend on the GPU: every sum is bitwise reproducible, on any GPU. No atomics, no read-modify-write of memory.

Backward apply: why a slot. dx at an input pixel needs dz at up to K x K neighbouring outputs, and a Triton tile has
no shifted views of itself (no explicit shared memory in the language the interpreter runs). Recomputing dz per tap
would cost K*K convolutions per output; storing dz for the whole tensor costs 4 bytes per output twice in DRAM (the
former design: 9A in bf16). The slot holds one band's dz (SR = TB + halo rows clipped to the image, x Wo x BLOCK_C
fp32; ``_SLOT_FLOATS`` = 32 KB at most), written and read back by its own program between two barriers and rewritten
per band, so the slots in use are those of the resident programs (~4 per SM: ~17 MB on an H100): it is L2 traffic
(4 bytes written per dz, read back by the dx gather mostly from L1), not DRAM. The halo rows (HALO_LO = PAD // S
above, HALO_HI = ceil(PAD / S) below) are recomputed by both bands that need them: at most 1.5x the dz rows
(``_apply_block_c`` narrows the channel block until the slot holds 3 halos' worth of rows; 1.0-1.32x on the
MobileNet layers, where images of <= 28 rows are one band). Bands span whole rows, so there are no column tile
borders: the column halo is the image border (masked reads). Tiles of rows x column blocks would need a column halo
recomputed as well; a rolling slot that keeps the previous band's last rows would remove the row halo recompute
(next step).

Planned DRAM bytes (A = one activation tensor of x's dtype at stride 1; per-channel vectors, weight taps, the
partial rows and the L2-resident slots are small and ignored):
* fwd: read x, write y: 2A. stats: read x: A. Training forward = stats + fwd = 3A ("apply re-reads a stored z"
  would be 4A, 5A with an fp32 z: recomputing z from x is cheaper; what it repeats costs SM time, not DRAM).
* bwd_reduce: read grad_y, x: 2A.
* bwd_apply: read grad_y, x, write dx: 3A (the halo rows' and the dweight pass's x are L1/L2 hits of the band's own
  reads). Backward = bwd_reduce + bwd_apply = 5A in every dtype (issue 13's budget: 5.5A; was 9A in bf16).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from mnet_ext.reference import memory_format_of, output_hw

from . import (
    NUM_WARPS,
    cdiv,
    dw_tile,
    hint_multiple,
    interpreting,
    next_power_of_2,
    on_tensor_device,
    program_tile,
    sum_pixels,
    tile_offsets,
    vec_width,
)
from .activations import act_bwd, act_fwd, act_id


# ----------------------------------------------------------------------------------------------
# jit helpers
# ----------------------------------------------------------------------------------------------
@triton.jit
def _load_vec(ptr, offs_c, cmask):
    """fp32 per-channel vector [C] loaded broadcast-shaped like offs_c."""
    return tl.load(ptr + offs_c, mask=cmask, other=0.0).to(tl.float32)


@triton.jit
def _load_f32(ptr, mask):
    """x values at ``ptr`` (zero where ``mask`` is false) as fp32. bf16 is widened by moving its 16 bits into the
    top half of an int32 (exact: bf16 is fp32's top half): one shift or AND per value, where the compiler's own
    conversion spends a PRMT and a shift on every odd lane of a packed pair."""
    x = tl.load(ptr, mask=mask, other=0.0)
    if x.dtype == tl.bfloat16:
        return (x.to(tl.int16, bitcast=True).to(tl.int32) << 16).to(tl.float32, bitcast=True)
    return x.to(tl.float32)


@triton.jit
def _group_tile(offs_g, gpr, Ho, Wo, OW: tl.constexpr, ROWS: tl.constexpr = 1):
    """(ho, wo0, gmask) of the groups ``offs_g`` (indices into the cdiv(Ho, ROWS) * gpr groups of an image): first
    output row, first output column, and whether the group exists (its first row is inside the image)."""
    if ROWS == 1:
        return offs_g // gpr, (offs_g % gpr) * OW, offs_g < Ho * gpr
    ho = (offs_g // gpr) * ROWS
    return ho, (offs_g % gpr) * OW, ho < Ho


@triton.jit
def _tile_count(g0, BLOCK_G: tl.constexpr, gpr, Ho, Wo, OW: tl.constexpr):
    """Number of outputs in the groups g0 ... g0 + BLOCK_G - 1 of an image (scalar): OW per group, less the
    columns past Wo of each row's last group (g % gpr == gpr - 1; there are g1 // gpr - g0 // gpr of them)."""
    g1 = tl.minimum(g0 + BLOCK_G, Ho * gpr)
    return (g1 - g0) * OW - (g1 // gpr - g0 // gpr) * (gpr * OW - Wo)


@triton.jit
def _conv_row(
    accs,  # tuple of OW fp32 accumulator tiles
    kh,  # kernel row
    x_c,  # x of the image, advanced by the channel offsets
    wt_ptr,
    offs_c,  # channel offsets of the weight loads (FWD_LOADS: broadcast to the tile's shape)
    cmask,
    ho,
    wi0,  # first input column of each group's window: wo0 * STRIDE - PAD
    gmask,
    CP,
    H,
    W,
    stride_xh,
    stride_xw,
    K: tl.constexpr,
    STRIDE: tl.constexpr,
    DIL: tl.constexpr,
    OW: tl.constexpr,
    FWD_LOADS: tl.constexpr = False,  # the forward's loads (see _conv_groups)
):
    """accs + the taps of kernel row ``kh``: the K weight vectors of the row, then each of the NJ input columns the
    group's window spans, loaded and converted once and multiplied into every output that reads it."""
    PAD: tl.constexpr = (K - 1) // 2 * DIL
    NJ: tl.constexpr = (OW - 1) * STRIDE + (K - 1) * DIL + 1
    hi = ho * STRIDE + (kh * DIL - PAD)
    row_ok = gmask & (hi >= 0) & (hi < H) & cmask
    x_row = x_c + hi * stride_xh
    if FWD_LOADS:
        x_row += wi0 * stride_xw  # column j at x_row + j * stride_xw: a pointer add per column
    w_row = wt_ptr + kh * (K * CP) + offs_c
    ws = ()
    for kw in tl.static_range(K):
        ws = ws + (tl.load(w_row + kw * CP),)  # padded to CP channels: no mask
    for j in tl.static_range(NJ):
        wi = wi0 + j
        if FWD_LOADS:
            xj = _load_f32(x_row + j * stride_xw, row_ok & (wi >= 0) & (wi < W))
        else:
            xj = tl.load(x_row + wi * stride_xw, mask=row_ok & (wi >= 0) & (wi < W), other=0.0).to(tl.float32)
        # column j feeds output i through tap kw where j = i * STRIDE + kw * DIL (consumed at once: one column live)
        new_accs = ()
        for i in tl.static_range(OW):
            if j >= i * STRIDE and (j - i * STRIDE) % DIL == 0 and (j - i * STRIDE) // DIL < K:
                new_accs = new_accs + (accs[i] + ws[(j - i * STRIDE) // DIL] * xj,)
            else:
                new_accs = new_accs + (accs[i],)
        accs = new_accs
    return accs


@triton.jit
def _conv_input_row(
    accs,  # tuple of ROWS * OW fp32 accumulator tiles: output (ho + q, wo0 + i) at q * OW + i
    r,  # input row of the group's window (image row ho - PAD + r): a constexpr, or the runtime loop's index
    x_c,
    wt_ptr,
    offs_w,
    cmask,
    ho,  # first output row of each group
    wi0,
    gmask,
    CP,
    H,
    W,
    stride_xh,
    stride_xw,
    K: tl.constexpr,
    OW: tl.constexpr,
    ROWS: tl.constexpr,
    Q_LO: tl.constexpr,  # the output rows q in [Q_LO, Q_HI) read input row r (through kernel row r - q)
    Q_HI: tl.constexpr,
):
    """accs + the taps of input row ``r`` of a multi-row group (stride 1, dilation 1): the K weight vectors of each
    reading output row's kernel row, then each of the row's NJ columns, loaded and converted once and multiplied
    into every output of every reading row that reads the column."""
    PAD: tl.constexpr = (K - 1) // 2
    NJ: tl.constexpr = OW + K - 1
    hi = ho + (r - PAD)
    row_ok = gmask & (hi >= 0) & (hi < H) & cmask
    x_w = x_c + hi * stride_xh + wi0 * stride_xw  # column j at x_w + j * stride_xw
    wss = ()  # per output row q: the K weight vectors of kernel row r - q (empty outside [Q_LO, Q_HI))
    for q in tl.static_range(ROWS):
        ws = ()
        if q >= Q_LO and q < Q_HI:
            w_row = wt_ptr + (r - q) * (K * CP) + offs_w
            for kw in tl.static_range(K):
                ws = ws + (tl.load(w_row + kw * CP),)  # padded to CP channels: no mask
        wss = wss + (ws,)
    for j in tl.static_range(NJ):
        wi = wi0 + j
        xj = _load_f32(x_w + j * stride_xw, row_ok & (wi >= 0) & (wi < W))
        new_accs = ()
        for q in tl.static_range(ROWS):
            for i in tl.static_range(OW):
                if q >= Q_LO and q < Q_HI and j >= i and j - i < K:
                    new_accs = new_accs + (accs[q * OW + i] + wss[q][j - i] * xj,)
                else:
                    new_accs = new_accs + (accs[q * OW + i],)
        accs = new_accs
    return accs


@triton.jit
def _conv_groups(
    x_img,  # pointer to x[n, 0, 0, 0] (int64 image base applied)
    wt_ptr,  # weight taps [K*K, CP] fp32, contiguous, zero past C (the launcher's copy of weight)
    init,  # per-channel start of the accumulators (broadcast-shaped like offs_c): -mean folds the centring in
    offs_c,  # channel offsets (tile_offsets)
    cmask,  # channel mask, shaped like offs_c
    ho,  # output row of each group, shaped like offs_g
    wo0,  # first output column of each group
    gmask,  # the group exists
    CP,  # channels of the weight taps (C padded to a multiple of BLOCK_C)
    H,
    W,
    stride_xc,
    stride_xh,
    stride_xw,
    K: tl.constexpr,
    STRIDE: tl.constexpr,
    DIL: tl.constexpr,
    OW: tl.constexpr,
    ROWS: tl.constexpr = 1,  # output rows per group: 1, or several sharing each converted input row (FWD_LOADS)
    FWD_LOADS: tl.constexpr = False,
):
    """init + z at the OW outputs (ho, wo0 + i) of every group: a tuple of OW fp32 tiles in the orientation of the
    tile. Kernel row 0, then a runtime loop over rows 1 ... K - 1, so the live set is one row's: its K weight
    vectors and NJ = (OW - 1) * STRIDE + (K - 1) * DIL + 1 input columns, each x value loaded and converted once
    for the OW * K / NJ outputs and taps that read it (2.4x at K = 3, OW = 8, stride 1). Row 0 adds onto ``init``
    itself, so the accumulators need no initialising moves. Taps outside the image read 0; per output the taps
    add in (kh, kw) order.

    FWD_LOADS (the forward at dilation 1 only): weight vectors loaded in the tile's own layout (no shared-memory
    shuffle), x addressed by one pointer add per column, bf16 widened by a shift (``_load_f32``). Fewer
    instructions in the forward (sm_90 bf16 NHWC K = 7: 118-169 -> 98-136 SASS/elem), but in the reduction and
    backward-apply kernels ptxas then budgets 72-128 registers and spills (measured, session 6: bwd_apply NCHW
    K = 7 20-28 B on every layer), and the forward at dilation 2 spills 12 B (K = 7, stride 2, silu, sm_90), so
    those keep the plain loads."""
    PAD: tl.constexpr = (K - 1) // 2 * DIL
    init_t = init + tl.zeros((gmask & cmask).shape, dtype=tl.float32)
    wi0 = wo0 * STRIDE - PAD
    x_c = x_img + offs_c * stride_xc
    offs_w = offs_c
    if FWD_LOADS:
        offs_w = offs_c + tl.zeros_like(ho)
    if ROWS == 1:
        accs = _conv_row(
            (init_t,) * OW, 0, x_c, wt_ptr, offs_w, cmask, ho, wi0, gmask, CP, H, W, stride_xh, stride_xw,
            K, STRIDE, DIL, OW, FWD_LOADS,
        )  # fmt: skip
        for kh in range(1, K):
            accs = _conv_row(
                accs, kh, x_c, wt_ptr, offs_w, cmask, ho, wi0, gmask, CP, H, W, stride_xh, stride_xw,
                K, STRIDE, DIL, OW, FWD_LOADS,
            )  # fmt: skip
    else:
        tl.static_assert(STRIDE == 1 and DIL == 1 and ROWS <= K and FWD_LOADS)
        # input rows 0 ... ROWS - 2 feed only the first rows, ROWS - 1 ... K - 1 every row (a runtime loop: its
        # weight loads stay in the loop), K ... K + ROWS - 2 only the last rows
        accs = (init_t,) * (ROWS * OW)
        for r in tl.static_range(ROWS - 1):
            accs = _conv_input_row(
                accs, r, x_c, wt_ptr, offs_w, cmask, ho, wi0, gmask, CP, H, W, stride_xh, stride_xw,
                K, OW, ROWS, 0, r + 1,
            )  # fmt: skip
        for r in range(ROWS - 1, K):
            accs = _conv_input_row(
                accs, r, x_c, wt_ptr, offs_w, cmask, ho, wi0, gmask, CP, H, W, stride_xh, stride_xw,
                K, OW, ROWS, 0, ROWS,
            )  # fmt: skip
        for r in tl.static_range(K, K + ROWS - 1):
            accs = _conv_input_row(
                accs, r, x_c, wt_ptr, offs_w, cmask, ho, wi0, gmask, CP, H, W, stride_xh, stride_xw,
                K, OW, ROWS, r - K + 1, ROWS,
            )  # fmt: skip
    return accs


# ----------------------------------------------------------------------------------------------
# kernels
# ----------------------------------------------------------------------------------------------
@triton.jit
def _fwd_kernel(
    x_ptr,  # x [N, C, H, W], any strides (NCHW or channels_last), fp32/fp16/bf16
    wt_ptr,  # weight taps [K*K, CP] fp32 contiguous, zero past C
    mean_ptr,  # [C] fp32, contiguous
    invstd_ptr,  # [C] fp32
    gamma_ptr,  # [C] fp32
    beta_ptr,  # [C] fp32
    y_ptr,  # out: y [N, C, Ho, Wo], dtype of x
    C,  # channels
    CP,  # channels of the weight taps: C padded to a multiple of BLOCK_C
    H,  # input height
    W,  # input width
    Ho,  # output height
    Wo,  # output width
    gpr,  # groups per output row: cdiv(Wo, OW)
    num_gb,  # group blocks per image: cdiv(cdiv(Ho, ROWS) * gpr, BLOCK_G)
    num_cb,  # channel blocks: cdiv(C, BLOCK_C)
    stride_xn,  # x strides in elements: image, channel, row, column
    stride_xc,
    stride_xh,
    stride_xw,
    stride_yn,  # y strides in elements
    stride_yc,
    stride_yh,
    stride_yw,
    K: tl.constexpr,  # kernel size 3/5/7
    STRIDE: tl.constexpr,  # 1/2
    DIL: tl.constexpr,  # 1/2
    ACT: tl.constexpr,  # activations.ACT_IDS
    CHANNELS_LAST: tl.constexpr,  # tile orientation (contiguous axis last)
    VEC: tl.constexpr,  # host-checked power of two dividing C and the n/h/w strides (1 for NCHW)
    OW: tl.constexpr,  # outputs per group and output row
    ROWS: tl.constexpr,  # output rows per group (sharing each converted input row)
    BLOCK_G: tl.constexpr,  # groups per tile
    BLOCK_C: tl.constexpr,  # channels per tile
):
    """y = act((z - mean) * (gamma * invstd) + beta), one tile per program. The accumulators start at -mean, so the
    centring costs nothing and the error stays relative to |z - mean| when |mean| >> std."""
    C = hint_multiple(C, VEC)
    CP = hint_multiple(CP, BLOCK_C)
    stride_xn = hint_multiple(stride_xn, VEC)
    stride_xh = hint_multiple(stride_xh, VEC)
    stride_xw = hint_multiple(stride_xw, VEC)
    stride_yn = hint_multiple(stride_yn, VEC)
    stride_yh = hint_multiple(stride_yh, VEC)
    stride_yw = hint_multiple(stride_yw, VEC)
    n, gb, cb, row = program_tile(num_gb, num_cb)
    offs_g, offs_c = tile_offsets(gb, cb, BLOCK_G, BLOCK_C, CHANNELS_LAST)
    cmask = offs_c < C
    ho, wo0, gmask = _group_tile(offs_g, gpr, Ho, Wo, OW, ROWS)
    # per-channel vectors loaded tile-shaped: in the tile's layout, not shuffled into it through shared memory
    offs_t = offs_c + tl.zeros_like(ho)
    scale = _load_vec(gamma_ptr, offs_t, cmask) * _load_vec(invstd_ptr, offs_t, cmask)
    beta = _load_vec(beta_ptr, offs_t, cmask)
    # the forward's loads (_conv_groups) at dilation 1, except NCHW groups of 7 columns at stride 1 or K = 5: there
    # the plain loads issue fewer instructions (sm_80 / sm_90, bf16 / fp32: K3 s1 -2.5, K5 -7 to -11 SASS/elem;
    # every other NCHW tile -2 to +40 with them off)
    FWD_LOADS: tl.constexpr = DIL == 1 and (CHANNELS_LAST or OW != 7 or (STRIDE == 2 and K != 5))
    zs = _conv_groups(
        x_ptr + n.to(tl.int64) * stride_xn, wt_ptr, -_load_vec(mean_ptr, offs_t, cmask), offs_c, cmask, ho, wo0,
        gmask, CP, H, W, stride_xc, stride_xh, stride_xw, K, STRIDE, DIL, OW, ROWS, FWD_LOADS,
    )  # fmt: skip
    y_img = y_ptr + n.to(tl.int64) * stride_yn + offs_c * stride_yc
    for q in tl.static_range(ROWS):
        y_row = y_img + (ho + q) * stride_yh
        row_ok = gmask & (ho + q < Ho) & cmask
        for i in tl.static_range(OW):
            wo = wo0 + i
            y = act_fwd(zs[q * OW + i] * scale + beta, ACT)
            tl.store(y_row + wo * stride_yw, y.to(y_ptr.dtype.element_ty), mask=row_ok & (wo < Wo))


@triton.jit
def _stats_partial_kernel(
    x_ptr,  # x [N, C, H, W], any strides
    wt_ptr,  # weight taps [K*K, CP] fp32 contiguous, zero past C
    mean_part_ptr,  # out: [R, C] fp32, contiguous: mean of z over the outputs of row r's tiles
    m2_part_ptr,  # out: [R, C] fp32: sum over those outputs of (z - that mean)^2
    count_part_ptr,  # out: [R] fp32: the number of those outputs
    C,  # channels
    CP,  # channels of the weight taps: C padded to a multiple of BLOCK_C
    H,  # input height
    W,  # input width
    Ho,  # output height
    Wo,  # output width
    gpr,  # groups per output row: cdiv(Wo, OW)
    num_gb,  # group blocks per image: cdiv(Ho * gpr, BLOCK_G)
    num_cb,  # channel blocks: cdiv(C, BLOCK_C)
    num_tiles,  # N * num_gb
    ITERS,  # tiles per program: row r covers tiles r * ITERS ... r * ITERS + ITERS - 1 (below num_tiles)
    stride_xn,  # x strides in elements: image, channel, row, column
    stride_xc,
    stride_xh,
    stride_xw,
    K: tl.constexpr,  # kernel size 3/5/7
    STRIDE: tl.constexpr,  # 1/2
    DIL: tl.constexpr,  # dilation 1/2
    CHANNELS_LAST: tl.constexpr,  # tile orientation (contiguous axis last)
    VEC: tl.constexpr,  # host-checked power of two dividing C and the n/h/w strides (1 for NCHW)
    OW: tl.constexpr,  # outputs per group
    BLOCK_G: tl.constexpr,  # groups per tile
    BLOCK_C: tl.constexpr,  # channels per tile
):
    """Stage 1 of the statistics: program (row, channel block) walks ITERS consecutive tiles and sums, per tile
    slot (each thread its own elements, no cross-thread work in the loop), z - shift and (z - shift)^2 where shift
    is the per-channel mean of the program's first tile: shifted sums, so the variance does not cancel when |mean|
    >> std. At the end one reduction over the pixel axis gives the row's (count, mean, M2) for the Chan combine."""
    C = hint_multiple(C, VEC)
    CP = hint_multiple(CP, BLOCK_C)
    stride_xn = hint_multiple(stride_xn, VEC)
    stride_xh = hint_multiple(stride_xh, VEC)
    stride_xw = hint_multiple(stride_xw, VEC)
    pid = tl.program_id(0)
    cb = pid % num_cb
    row = pid // num_cb
    offs_g0, offs_c = tile_offsets(0, cb, BLOCK_G, BLOCK_C, CHANNELS_LAST)
    cmask = offs_c < C
    zero_c = tl.zeros(offs_c.shape, dtype=tl.float32)
    shift = zero_c
    s1 = tl.zeros((offs_g0 + offs_c).shape, dtype=tl.float32)
    s2 = tl.zeros((offs_g0 + offs_c).shape, dtype=tl.float32)
    count = 0
    for it in range(0, ITERS):
        t = row * ITERS + it
        n = t // num_gb
        g0 = (t % num_gb) * BLOCK_G
        ho, wo0, gmask = _group_tile(g0 + offs_g0, gpr, Ho, Wo, OW)
        gmask = gmask & (t < num_tiles)
        zs = _conv_groups(
            x_ptr + n.to(tl.int64) * stride_xn, wt_ptr, zero_c, offs_c, cmask, ho, wo0, gmask,
            CP, H, W, stride_xc, stride_xh, stride_xw, K, STRIDE, DIL, OW,
        )  # fmt: skip
        if it == 0:  # the first tile always lies inside the image and has outputs
            first = tl.zeros_like(s1)
            for i in tl.static_range(OW):
                first += tl.where(gmask & (wo0 + i < Wo) & cmask, zs[i], 0.0)
            shift = sum_pixels(first, CHANNELS_LAST) / _tile_count(g0, BLOCK_G, gpr, Ho, Wo, OW).to(tl.float32)
        for i in tl.static_range(OW):
            d = tl.where(gmask & (wo0 + i < Wo) & cmask, zs[i] - shift, 0.0)
            s1 += d
            s2 += d * d
        count += tl.where(t < num_tiles, _tile_count(g0, BLOCK_G, gpr, Ho, Wo, OW), 0)
    cnt = count.to(tl.float32)
    sum1 = sum_pixels(s1, CHANNELS_LAST)
    base = row.to(tl.int64) * C
    tl.store(mean_part_ptr + base + offs_c, shift + sum1 / cnt, mask=cmask)
    tl.store(m2_part_ptr + base + offs_c, tl.maximum(sum_pixels(s2, CHANNELS_LAST) - sum1 * (sum1 / cnt), 0.0),
             mask=cmask)
    # every channel block holds the same count: the first one stores it
    tl.store(count_part_ptr + row + offs_c * 0, cnt + zero_c, mask=(offs_c == 0))


@triton.jit
def _stats_combine_kernel(
    mean_part_ptr,  # [R, C] fp32: per-row means (from _stats_partial_kernel)
    m2_part_ptr,  # [R, C] fp32: per-row M2
    count_part_ptr,  # [R] fp32: per-row pixel counts (all >= 1)
    mean_ptr,  # out: [C] fp32
    var_ptr,  # out: [C] fp32, biased variance
    R,  # rows of the partial buffer
    C,  # channels
    BLOCK_R: tl.constexpr,  # partial rows folded per step
    BLOCK_C: tl.constexpr,  # channels per tile
):
    """Stage 2, deterministic Chan combine, one program per channel block: each chunk of BLOCK_R rows is merged
    exactly (n_b = sum n_i, mean_b = sum n_i mean_i / n_b, M2_b = sum M2_i + n_i (mean_i - mean_b)^2), then the
    chunks are folded in order with Chan's pairwise update. No atomics, fixed order: bitwise reproducible."""
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = c < C
    n_a = tl.zeros([BLOCK_C], dtype=tl.float32)
    mean_a = tl.zeros([BLOCK_C], dtype=tl.float32)
    m2_a = tl.zeros([BLOCK_C], dtype=tl.float32)
    for r0 in range(0, R, BLOCK_R):
        r = r0 + tl.arange(0, BLOCK_R)
        rmask = r < R
        cnt = tl.load(count_part_ptr + r, mask=rmask, other=0.0)
        offs = r.to(tl.int64)[:, None] * C + c[None, :]
        m2mask = rmask[:, None] & cmask[None, :]
        m = tl.load(mean_part_ptr + offs, mask=m2mask, other=0.0)
        q = tl.load(m2_part_ptr + offs, mask=m2mask, other=0.0)
        n_b = tl.sum(cnt, axis=0)  # >= 1: the chunk starts below R
        mean_b = tl.sum(cnt[:, None] * m, axis=0) / n_b
        dev = m - mean_b[None, :]
        m2_b = tl.sum(q + cnt[:, None] * dev * dev, axis=0)
        n_ab = n_a + n_b
        frac = n_b / n_ab
        delta = mean_b - mean_a
        mean_a = mean_a + delta * frac
        m2_a = m2_a + m2_b + delta * delta * (n_a * frac)
        n_a = n_ab
    tl.store(mean_ptr + c, mean_a, mask=cmask)
    tl.store(var_ptr + c, m2_a / n_a, mask=cmask)


@triton.jit
def _bwd_reduce_partial_kernel(
    gy_ptr,  # grad_y [N, C, Ho, Wo], any strides, dtype of x
    x_ptr,  # x [N, C, H, W]
    wt_ptr,  # weight taps [K*K, CP] fp32 contiguous, zero past C
    mean_ptr,  # [C] fp32
    invstd_ptr,  # [C] fp32
    gamma_ptr,  # [C] fp32
    beta_ptr,  # [C] fp32
    part_ptr,  # out: [R, 2, C] fp32 contiguous: row r holds (sum g, sum g * xhat) over its tiles
    C,  # channels
    CP,  # channels of the weight taps: C padded to a multiple of BLOCK_C
    H,  # input height
    W,  # input width
    Ho,  # output height
    Wo,  # output width
    gpr,  # groups per output row: cdiv(Wo, OW)
    num_gb,  # group blocks per image: cdiv(Ho * gpr, BLOCK_G)
    num_tiles,  # N * num_gb
    ITERS,  # tiles per program (as in _stats_partial_kernel)
    stride_gn,  # grad_y strides
    stride_gc,
    stride_gh,
    stride_gw,
    stride_xn,  # x strides in elements: image, channel, row, column
    stride_xc,
    stride_xh,
    stride_xw,
    K: tl.constexpr,  # kernel size 3/5/7
    STRIDE: tl.constexpr,  # 1/2
    DIL: tl.constexpr,  # dilation 1/2
    ACT: tl.constexpr,  # activations.ACT_IDS
    CHANNELS_LAST: tl.constexpr,  # tile orientation (contiguous axis last)
    VEC: tl.constexpr,  # host-checked power of two dividing C and the n/h/w strides (1 for NCHW)
    OW: tl.constexpr,  # outputs per group
    BLOCK_G: tl.constexpr,  # groups per tile
    BLOCK_C: tl.constexpr,  # channels per tile
):
    """Stage 1 of bwd_reduce: g = act'(u) * grad_y with u recomputed from x; per tile slot sums of g and g * xhat
    over ITERS consecutive tiles (xhat formed before the product, so sum g * xhat does not cancel as
    invstd * (sum g z - mean sum g) would), reduced over the pixel axis once at the end."""
    C = hint_multiple(C, VEC)
    CP = hint_multiple(CP, BLOCK_C)
    stride_gn = hint_multiple(stride_gn, VEC)
    stride_gh = hint_multiple(stride_gh, VEC)
    stride_gw = hint_multiple(stride_gw, VEC)
    stride_xn = hint_multiple(stride_xn, VEC)
    stride_xh = hint_multiple(stride_xh, VEC)
    stride_xw = hint_multiple(stride_xw, VEC)
    # a 2-D grid (channel block, stage-1 row): no division, and ptxas re-reads the block index where the epilogue
    # needs it (as it re-reads SR_TID) instead of keeping cb * BLOCK_C in local memory around the loop
    cb = tl.program_id(0)
    row = tl.program_id(1)
    offs_g0, offs_c = tile_offsets(0, cb, BLOCK_G, BLOCK_C, CHANNELS_LAST)
    cmask = offs_c < C
    neg_mean = -_load_vec(mean_ptr, offs_c, cmask)
    invstd = _load_vec(invstd_ptr, offs_c, cmask)
    gamma = _load_vec(gamma_ptr, offs_c, cmask)
    beta = _load_vec(beta_ptr, offs_c, cmask)
    sum_g = tl.zeros((offs_g0 + offs_c).shape, dtype=tl.float32)
    sum_gx = tl.zeros((offs_g0 + offs_c).shape, dtype=tl.float32)
    for it in range(0, ITERS):
        t = row * ITERS + it
        n = t // num_gb
        ho, wo0, gmask = _group_tile((t % num_gb) * BLOCK_G + offs_g0, gpr, Ho, Wo, OW)
        gmask = gmask & (t < num_tiles)
        zs = _conv_groups(
            x_ptr + n.to(tl.int64) * stride_xn, wt_ptr, neg_mean, offs_c, cmask, ho, wo0, gmask,
            CP, H, W, stride_xc, stride_xh, stride_xw, K, STRIDE, DIL, OW,
        )  # fmt: skip
        gy_row = gy_ptr + n.to(tl.int64) * stride_gn + offs_c * stride_gc + ho * stride_gh
        for i in tl.static_range(OW):
            wo = wo0 + i
            ok = gmask & (wo < Wo) & cmask
            xhat = zs[i] * invstd
            gy = tl.load(gy_row + wo * stride_gw, mask=ok, other=0.0).to(tl.float32)
            g = tl.where(ok, act_bwd(xhat * gamma + beta, gy, ACT), 0.0)
            sum_g += g
            sum_gx += g * xhat
    base = row.to(tl.int64) * (2 * C)
    tl.store(part_ptr + base + offs_c, sum_pixels(sum_g, CHANNELS_LAST), mask=cmask)
    tl.store(part_ptr + base + C + offs_c, sum_pixels(sum_gx, CHANNELS_LAST), mask=cmask)


@triton.jit
def _sum_rows_kernel(
    part_ptr,  # [R, L] fp32, unit column stride
    out_ptr,  # out: [SPLIT] contiguous, any float dtype (the store casts): columns j < SPLIT
    out2_ptr,  # out: [L - SPLIT] contiguous: columns j >= SPLIT (unused when SPLIT == L)
    R,  # rows of the partial buffer
    L,  # columns of the partial buffer
    stride_r,  # row stride of the partial buffer (>= L)
    SPLIT,
    BLOCK_R: tl.constexpr,  # partial rows folded per step
    BLOCK_L: tl.constexpr,  # columns per program
):
    """Column sums of the partial buffer in a fixed order (BLOCK_R lanes accumulate strided rows, then one tree
    sum): the deterministic second stage of bwd_reduce (two separate [C] outputs, so the op's dgamma and dbeta
    do not alias each other) and of dweight."""
    j = tl.program_id(0) * BLOCK_L + tl.arange(0, BLOCK_L)
    jmask = j < L
    acc = tl.zeros([BLOCK_R, BLOCK_L], dtype=tl.float32)
    for r0 in range(0, R, BLOCK_R):
        r = r0 + tl.arange(0, BLOCK_R)
        ptrs = part_ptr + r.to(tl.int64)[:, None] * stride_r + j[None, :]
        acc += tl.load(ptrs, mask=(r < R)[:, None] & jmask[None, :], other=0.0)
    total = tl.sum(acc, axis=0)
    tl.store(out_ptr + j, total.to(out_ptr.dtype.element_ty), mask=j < SPLIT)
    tl.store(out2_ptr + (j - SPLIT), total.to(out2_ptr.dtype.element_ty), mask=jmask & (j >= SPLIT))


@triton.jit
def _dweight_rows(
    parts,  # parts[kh][kw]: K x K tuples of fp32 tiles, the program's running dweight sums per tile slot
    dzs,  # tuple of OW dz tiles of the groups (zero where the output does not count)
    x_c,  # x of the image, advanced by the channel offsets
    ho,  # output row of each group
    wo0,  # first output column of each group
    mask,  # groups (and channels) whose outputs count: x is loaded only there
    H,
    W,
    stride_xh,
    stride_xw,
    K: tl.constexpr,
    STRIDE: tl.constexpr,
    DIL: tl.constexpr,
    OW: tl.constexpr,
):
    """parts[kh][kw] + dz_i * x[ho * STRIDE - PAD + kh * DIL, wo0 * STRIDE - PAD + i * STRIDE + kw * DIL] over the
    OW outputs i: per kernel row the NJ window columns are loaded once (L1/L2 hits of the conv's own loads) and
    each multiplies the dz of every output whose tap reads it. Unrolled over the rows: the sums are indexed by
    the row, so a runtime loop would have to keep them in memory."""
    PAD: tl.constexpr = (K - 1) // 2 * DIL
    NJ: tl.constexpr = (OW - 1) * STRIDE + (K - 1) * DIL + 1
    wi0 = wo0 * STRIDE - PAD
    new_parts = ()
    for kh in tl.static_range(K):
        hi = ho * STRIDE + (kh * DIL - PAD)
        row_ok = mask & (hi >= 0) & (hi < H)
        x_row = x_c + hi * stride_xh
        prow = parts[kh]
        for j in tl.static_range(NJ):
            wi = wi0 + j
            xj = tl.load(x_row + wi * stride_xw, mask=row_ok & (wi >= 0) & (wi < W), other=0.0).to(tl.float32)
            new_row = ()
            for kw in tl.static_range(K):
                p = prow[kw]
                for i in tl.static_range(OW):
                    if i * STRIDE + kw * DIL == j:
                        p += dzs[i] * xj
                new_row = new_row + (p,)
            prow = new_row
        new_parts = new_parts + (prow,)
    return new_parts


# ITERS is 1 on layers with few bands: a specialised ITERS = 1 would drop the band loop from the code the report counts
@triton.jit(do_not_specialize=["ITERS"])
def _bwd_apply_kernel(
    gy_ptr,  # grad_y [N, C, Ho, Wo], any strides
    x_ptr,  # x [N, C, H, W]
    wt_ptr,  # weight taps [K*K, CP] fp32 contiguous, zero past C
    mean_ptr,  # [C] fp32
    invstd_ptr,  # [C] fp32
    gamma_ptr,  # [C] fp32
    beta_ptr,  # [C] fp32
    mean_g_ptr,  # [C] fp32: sum g / M (zeros in eval)
    mean_gx_ptr,  # [C] fp32: sum g * xhat / M (zeros in eval)
    dx_ptr,  # out: dx [N, C, H, W], dtype and memory format of x
    dw_part_ptr,  # out: [R, CP, K*K] fp32 contiguous: row r's sums of dz * x(shifted by the tap) over its bands
    slot_ptr,  # scratch [programs, SLOT] fp32: program p's dz of one haloed band (written, then read, by p only)
    C,  # channels
    CP,  # channels of the weight taps: C padded to a multiple of BLOCK_C
    H,  # input height
    W,  # input width
    Ho,  # output height
    Wo,  # output width
    gpr,  # dz groups per output row: cdiv(Wo, OW)
    gprx,  # dx groups per input row: cdiv(W, OWX)
    TB,  # output rows per band (a band's dx: input rows [b * TB * STRIDE, (b + 1) * TB * STRIDE) below H)
    SR,  # rows of a slot: min(TB + HALO_LO + HALO_HI, Ho)
    num_bands,  # bands per image: cdiv(Ho, TB)
    num_cb,  # channel blocks: cdiv(C, BLOCK_C)
    num_tiles,  # N * num_bands
    ITERS,  # bands per program: row r covers bands r * ITERS ... r * ITERS + ITERS - 1 (below num_tiles)
    stride_gn,  # grad_y strides: image, channel, row, column
    stride_gc,
    stride_gh,
    stride_gw,
    stride_xn,  # x strides in elements: image, channel, row, column
    stride_xc,
    stride_xh,
    stride_xw,
    stride_dn,  # dx strides (same layout as x)
    stride_dc,
    stride_dh,
    stride_dw,
    K: tl.constexpr,  # kernel size 3/5/7
    STRIDE: tl.constexpr,  # 1/2
    DIL: tl.constexpr,  # dilation 1/2
    ACT: tl.constexpr,  # activations.ACT_IDS
    CHANNELS_LAST: tl.constexpr,  # tile orientation (contiguous axis last)
    VEC: tl.constexpr,  # host-checked power of two dividing C and the n/h/w strides (1 for NCHW)
    OW: tl.constexpr,  # outputs per dz group
    OWX: tl.constexpr,  # input columns per dx group (a multiple of STRIDE)
    HALO_LO: tl.constexpr,  # dz rows above a band that its dx reads: PAD // STRIDE (``_band_halo``)
    HALO_HI: tl.constexpr,  # dz rows below: ceil(PAD / STRIDE)
    BLOCK_G: tl.constexpr,  # groups per chunk (both phases)
    BLOCK_C: tl.constexpr,  # channels per tile
):
    """The whole backward apply in one pass over ITERS bands of TB output rows (all columns) of one image x BLOCK_C
    channels per program. Per band:

    1. dz phase: dz = gamma * invstd * (g - mean_g - xhat * mean_g_xhat) on the band's rows plus HALO_LO rows above
       and HALO_HI below (clipped to the image), in chunks of BLOCK_G groups of OW outputs; z and g exactly as
       bwd_reduce recomputes them (``_conv_groups`` adds every output's taps in the same order whatever the tile).
       Each chunk stores its dz (fp32) into the program's slot [SR rows][Wo][BLOCK_C] (NCHW: [BLOCK_C][SR][Wo]) and
       adds the dz of the band's own rows into the dweight sums (``_dweight_rows``: K*K running sums per tile slot in
       registers across all the bands, written once at the end; halo rows belong to the neighbouring band).
    2. dx phase, after a barrier: dx = conv^T(dz) as a gather over the band's input rows in chunks of BLOCK_G groups
       of OWX input columns: input (hi, wi) receives w[kh, kw] * dz[ho, wo] where ho * STRIDE = hi + PAD - kh * DIL
       and wo * STRIDE = wi + PAD - kw * DIL, dz read back from the slot (rows outside the slot's image rows read 0:
       the image border).

    The slot is the program's own (no other program touches it): a barrier before the dz phase (the previous band's
    dx reads are done) and one before the dx phase (every dz of the band is written). No atomics, no
    read-modify-write across programs; the dweight rows are summed by ``_sum_rows_kernel`` in a fixed order."""
    C = hint_multiple(C, VEC)
    CP = hint_multiple(CP, BLOCK_C)
    stride_gn = hint_multiple(stride_gn, VEC)
    stride_gh = hint_multiple(stride_gh, VEC)
    stride_gw = hint_multiple(stride_gw, VEC)
    stride_xn = hint_multiple(stride_xn, VEC)
    stride_xh = hint_multiple(stride_xh, VEC)
    stride_xw = hint_multiple(stride_xw, VEC)
    stride_dn = hint_multiple(stride_dn, VEC)
    stride_dh = hint_multiple(stride_dh, VEC)
    stride_dw = hint_multiple(stride_dw, VEC)
    PAD: tl.constexpr = (K - 1) // 2 * DIL
    LO: tl.constexpr = (PAD - (K - 1) * DIL) // STRIDE  # lowest dz column offset (floor), relative to wi0 / STRIDE
    NJX: tl.constexpr = (OWX - 1 + PAD) // STRIDE - LO + 1  # dz columns a dx group's taps reach per kernel row
    cb = tl.program_id(0)  # a 2-D grid, as in _bwd_reduce_partial_kernel
    row = tl.program_id(1)
    offs_g0, offs_c = tile_offsets(0, cb, BLOCK_G, BLOCK_C, CHANNELS_LAST)
    cmask = offs_c < C
    neg_mean = -_load_vec(mean_ptr, offs_c, cmask)
    invstd = _load_vec(invstd_ptr, offs_c, cmask)
    gamma = _load_vec(gamma_ptr, offs_c, cmask)
    beta = _load_vec(beta_ptr, offs_c, cmask)
    scale = gamma * invstd
    mean_g = _load_vec(mean_g_ptr, offs_c, cmask)
    mean_gx = _load_vec(mean_gx_ptr, offs_c, cmask)
    # a zero mean term (eval) contributes exactly zero, as native's eval backward that has none: an Inf/NaN xhat
    # must not poison dz there (one per-channel test, outside the loops)
    no_xhat_term = mean_gx == 0.0
    # the slot: [SR][Wo][BLOCK_C] for channels_last (a thread's channels contiguous), [BLOCK_C][SR][Wo] for NCHW
    if CHANNELS_LAST:
        slot_w = BLOCK_C
        slot_h = Wo * BLOCK_C
        slot_c = 1
    else:
        slot_w = 1
        slot_h = Wo
        slot_c = SR * Wo
    slot_c_ptr = slot_ptr + (row * num_cb + cb).to(tl.int64) * (SR * Wo * BLOCK_C)
    slot_c_ptr += (offs_c - cb * BLOCK_C) * slot_c
    zero = tl.zeros((offs_g0 + offs_c).shape, dtype=tl.float32)
    parts = ((zero,) * K,) * K  # parts[kh][kw]
    # the loop runs over the band index itself (the tail row stops at num_tiles): one loop-carried value, which ptxas
    # kept in local memory when it was a counter beside row * ITERS
    t0 = row * ITERS
    for t in range(t0, tl.minimum(t0 + ITERS, num_tiles)):
        n = t // num_bands
        b = t % num_bands
        band0 = b * TB
        band1 = tl.minimum(band0 + TB, Ho)
        h_lo = tl.maximum(band0 - HALO_LO, 0)  # image rows of the slot: [h_lo, h_hi)
        h_hi = tl.minimum(band1 + HALO_HI, Ho)
        x_img = x_ptr + n.to(tl.int64) * stride_xn
        x_c = x_img + offs_c * stride_xc
        gy_c = gy_ptr + n.to(tl.int64) * stride_gn + offs_c * stride_gc
        tl.debug_barrier()  # the previous band's dx reads of the slot are done
        for g0 in range(0, (h_hi - h_lo) * gpr, BLOCK_G):
            offs_g = g0 + offs_g0
            ho = h_lo + offs_g // gpr
            wo0 = (offs_g % gpr) * OW
            gmask = ho < h_hi
            zs = _conv_groups(
                x_img, wt_ptr, neg_mean, offs_c, cmask, ho, wo0, gmask,
                CP, H, W, stride_xc, stride_xh, stride_xw, K, STRIDE, DIL, OW,
            )  # fmt: skip
            gy_row = gy_c + ho * stride_gh
            slot_row = slot_c_ptr + (ho - h_lo) * slot_h
            owned = gmask & (ho >= band0) & (ho < band1)
            dzs = ()
            for i in tl.static_range(OW):
                wo = wo0 + i
                ok = gmask & (wo < Wo) & cmask
                xhat = zs[i] * invstd
                gy = tl.load(gy_row + wo * stride_gw, mask=ok, other=0.0).to(tl.float32)
                g = act_bwd(xhat * gamma + beta, gy, ACT)
                dz = tl.where(ok, scale * (g - mean_g - tl.where(no_xhat_term, 0.0, xhat * mean_gx)), 0.0)
                # every channel of the slot is written (zeros past C), so the dx phase needs no channel mask there
                tl.store(slot_row + wo * slot_w, dz, mask=gmask & (wo < Wo))
                dzs = dzs + (tl.where(owned, dz, 0.0),)
            parts = _dweight_rows(parts, dzs, x_c, ho, wo0, owned & cmask, H, W, stride_xh, stride_xw,
                                  K, STRIDE, DIL, OW)
        tl.debug_barrier()  # every dz of the band is in the slot
        hx0 = band0 * STRIDE
        hx1 = tl.minimum(band1 * STRIDE, H)  # the last band reaches H: Ho * STRIDE >= H
        for g0 in range(0, (hx1 - hx0) * gprx, BLOCK_G):
            offs_g = g0 + offs_g0
            hi = hx0 + offs_g // gprx
            wi0 = (offs_g % gprx) * OWX
            gmask = hi < hx1
            wob = wi0 // STRIDE + LO
            accs = (tl.zeros((gmask & cmask).shape, dtype=tl.float32),) * OWX
            for kh in range(K):
                th = hi + (PAD - kh * DIL)  # = ho * STRIDE for the dz row this kernel row reads
                ok_h = gmask & (th >= h_lo * STRIDE) & (th < h_hi * STRIDE)
                if STRIDE > 1:
                    ok_h = ok_h & (th % STRIDE == 0)
                slot_row = slot_c_ptr + (th // STRIDE - h_lo) * slot_h
                w_row = wt_ptr + kh * (K * CP) + offs_c
                ws = ()
                for kw in tl.static_range(K):
                    ws = ws + (tl.load(w_row + kw * CP),)
                for j in tl.static_range(NJX):
                    wo = wob + j
                    dzj = tl.load(slot_row + wo * slot_w, mask=ok_h & (wo >= 0) & (wo < Wo), other=0.0)
                    new_accs = ()
                    for i in tl.static_range(OWX):
                        acc = accs[i]
                        for kw in tl.static_range(K):
                            if (i + PAD - kw * DIL) % STRIDE == 0 and (i + PAD - kw * DIL) // STRIDE - LO == j:
                                acc += ws[kw] * dzj
                        new_accs = new_accs + (acc,)
                    accs = new_accs
            dx_row = dx_ptr + n.to(tl.int64) * stride_dn + offs_c * stride_dc + hi * stride_dh
            for i in tl.static_range(OWX):
                wi = wi0 + i
                tl.store(dx_row + wi * stride_dw, accs[i].to(dx_ptr.dtype.element_ty), mask=gmask & (wi < W) & cmask)
    # CP channels per row (zero sums past C): no channel mask, which ptxas kept in local memory around the band loop
    dw_row = dw_part_ptr + row.to(tl.int64) * (CP * K * K) + offs_c * (K * K)
    for kh in tl.static_range(K):
        for kw in tl.static_range(K):
            tl.store(dw_row + (kh * K + kw), sum_pixels(parts[kh][kw], CHANNELS_LAST))


# ----------------------------------------------------------------------------------------------
# host launchers
# ----------------------------------------------------------------------------------------------
_COMBINE_BLOCK_R = 32  # 64 x 32 spills 12 bytes on sm_80
_COMBINE_BLOCK_C = 32
_SUM_BLOCK_R = 64
_STAGE1_PROGRAMS = 1024
_INTERP_STAGE1_PROGRAMS = 4  # interpreter: few programs (each costs ~13 ms); ITERS > 1 once there are > 4 tiles
# fp32 values of one backward-apply slot (a program's dz of one haloed band: rows x Wo x BLOCK_C): 32 KB, so the
# slots of the resident programs (~4 per SM) stay in L2 (132 SMs x 4 x 32 KB = 17 MB of H100's 50 MB)
_SLOT_FLOATS = 8192
_APPLY_MAXNREG = 168  # K = 3, see _conv_maxnreg: 3 blocks of 128 threads per SM (65,536 registers)


def _check(x: torch.Tensor, weight: torch.Tensor, stride: int, dilation: int, vectors=()) -> int:
    """Validate the shared arguments; return the kernel size."""
    if x.dim() != 4:
        raise ValueError(f"x: expected [N, C, H, W], got shape {tuple(x.shape)}")
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"x: expected fp32/fp16/bf16, got {x.dtype}")
    c = x.shape[1]
    k = weight.shape[-1]
    if weight.dim() != 4 or tuple(weight.shape) != (c, 1, k, k) or k not in (3, 5, 7):
        raise ValueError(f"weight: expected [C={c}, 1, k, k] with k in (3, 5, 7), got {tuple(weight.shape)}")
    if weight.dtype != x.dtype:
        raise TypeError(f"weight: expected the dtype of x ({x.dtype}), got {weight.dtype}")
    if stride not in (1, 2) or dilation not in (1, 2):
        raise ValueError(f"stride and dilation must be 1 or 2, got stride={stride}, dilation={dilation}")
    for name, v in vectors:
        if v.shape != (c,) or not v.is_contiguous():
            raise ValueError(f"{name}: expected a contiguous [C={c}] tensor, got shape {tuple(v.shape)}")
    if x[0].numel() >= 2**31:
        raise ValueError("x: one image must hold fewer than 2^31 elements (per-image offsets are int32)")
    return k


def _geometry(x: torch.Tensor, k: int, stride: int, dilation: int):
    n, c, h, w = x.shape
    ho, wo = output_hw(h, w, k, stride, dilation)
    channels_last = memory_format_of(x) == torch.channels_last
    return n, c, h, w, ho, wo, channels_last


def _new_like(x: torch.Tensor, shape, dtype=None) -> torch.Tensor:
    return torch.empty(shape, dtype=dtype or x.dtype, device=x.device, memory_format=memory_format_of(x))


def _stage1_rows(tiles: int, c: int, block_c: int) -> tuple[int, int]:
    """(rows, ITERS) for a stage-1 reduction over ``tiles`` tiles: about _STAGE1_PROGRAMS programs in all (several
    waves' worth on any GPU, each walking ITERS consecutive tiles), so that the stage-2 kernel, one program per
    channel block, reads only a few thousand rows instead of N * num_gb. A function of the shape alone, not of the
    GPU's SM count: the sums come out bitwise the same on every GPU."""
    target = _INTERP_STAGE1_PROGRAMS if interpreting() else _STAGE1_PROGRAMS
    rows_wanted = max(1, target // cdiv(c, block_c))
    iters = cdiv(tiles, min(tiles, rows_wanted))
    return cdiv(tiles, iters), iters


def _weight_taps(weight: torch.Tensor, block_c: int) -> torch.Tensor:
    """weight [C, 1, K, K] as fp32 taps [K*K, CP], CP = C padded with zeros to a multiple of ``block_c``: a tiny
    copy (K*K*CP values) after which a thread loads its 8 channels of a tap as two 16-byte vectors, unmasked and
    with no conversion."""
    c = weight.shape[0]
    cp = cdiv(c, block_c) * block_c
    taps = torch.empty((weight[0].numel(), cp), dtype=torch.float32, device=weight.device)
    if cp == c:  # one device op (a launch on a GPU) where no channel is padded: most layers
        return taps.copy_(weight.reshape(c, -1).t())
    taps[:, c:].zero_()
    taps[:, :c] = weight.reshape(c, -1).t()
    return taps


def _band_halo(k: int, stride: int, dilation: int) -> tuple[int, int]:
    """(rows above, rows below) of dz that the dx of a band's input rows reads beyond the band's own output rows:
    input row hi reads dz rows (hi + PAD - kh * DIL) / STRIDE, so the band's input rows [b*TB*S, (b+1)*TB*S)
    reach from b*TB - PAD // S to (b+1)*TB - 1 + ceil(PAD / S)."""
    pad = (k - 1) // 2 * dilation
    return pad // stride, -(-pad // stride)


def _apply_block_c(ho: int, wo: int, halo: int, k: int, dtype: torch.dtype, dilation: int) -> int:
    """Most channels per backward-apply tile: the largest power of two whose slot holds the bands' rows with a halo
    at most half of them (TB >= 2 * halo: <= 1.5x dz recomputed), or the whole image; at K = 5 at most 64 in fp32
    (measured on sm_90: 128-channel tiles of 4 warps on c960 7 x 7 spill 4 bytes at 255 registers; 64-channel tiles
    of 2 warps do not, with 3 fewer SASS/elem) and 32 at dilation 2 (sm_90 fp16 channels_last, c672 14 x 14 stride
    2: 64-channel tiles spill 8 bytes at 255 registers)."""
    rows = min(ho, 3 * halo)
    block_c = 128
    if k == 5 and dilation == 2:
        block_c = 32
    elif k == 5 and dtype == torch.float32:
        block_c = 64
    while block_c > 1 and rows * wo * block_c > _SLOT_FLOATS:
        block_c //= 2
    return block_c


def _band_rows(ho: int, wo: int, block_c: int, halo: int) -> int:
    """Output rows per band of the backward apply: the whole image when its dz fits a slot of _SLOT_FLOATS (no halo
    to recompute), else as many as fit with the ``halo`` rows, balanced over the image's bands (at least 1)."""
    row = wo * block_c
    if ho * row <= _SLOT_FLOATS:
        return ho
    tb = max(1, _SLOT_FLOATS // row - halo)
    return cdiv(ho, cdiv(ho, tb))


def _device_arch(x: torch.Tensor) -> int | None:
    """Compute capability (90 for sm_90) of the GPU that runs a launch on ``x``: x's own; on meta tensors (the
    static report) the current device, which the report answers as its target architecture; None on CPU tensors
    (the interpreter: no registers, no tensor cores)."""
    if x.device.type == "cpu":
        return None
    return _gpu_arch(x.device.index if x.device.type == "cuda" else torch.cuda.current_device())


@functools.lru_cache(maxsize=16)
def _gpu_arch(index: int) -> int:
    """Compute capability of CUDA device ``index``, cached: every launcher call asks (the layers are host-bound)."""
    props = torch.cuda.get_device_properties(index)
    return props.major * 10 + props.minor


def _conv_maxnreg(
    kind: str, k: int, dtype: torch.dtype, channels_last: bool, stride: int, dilation: int, arch: int | None
) -> int | None:
    """Register limit (PTX .maxnreg) of the forward (``kind`` "fwd"), statistics ("stats"), backward reduction
    ("bwd_reduce") and backward apply ("apply") kernels on GPU ``arch`` (``_device_arch``: the launch's GPU; the
    static report compiles each target through the launchers, so both apply this one rule), else None: ptxas's own
    choice, and the interpreter (``arch`` None), which has no registers. Left to itself, ptxas holds a kernel at an
    occupancy step (80/96/128/168 registers) and spills 4-28 bytes where the tile needs a few registers more.
    Measured on sm_80 and sm_90; sm_86/89 take sm_80's rules, later GPUs sm_90's.

    fwd / stats / bwd_reduce:
    - 255 for fwd and stats at K = 7 channels_last (stats at 80-96 registers, fwd at 168 on 4 warps: sm_90 fp16
      stats 4-8 bytes on 3 layers, fwd 4 on c120 14 x 14; fp32 stats 4-16 bytes on 2 layers on sm_90 and sm_80):
      109-240 registers, no spill, SASS per element fwd -15 to +0.5 %, stats -0.2 to -22.5 % in bf16, fp16 and fp32
      on sm_90 and sm_80, for fewer resident blocks (stats 5-12 -> 4-8 per SM).
    - 255 for fwd and stats in fp32 channels_last at every K (ptxas's own steps spilled: sm_80 stats K = 3 8-20
      bytes at 168 on 6 layers, sm_90 stats K = 5 4 bytes at 128 on 7 x 7, fwd K = 5 stride 2 64 bytes at 168 on
      c288); with the forward's stride-2 tiles of 4 channels (``dw_tile(elem_bytes=)``: 8-channel ones spilled 4-12
      bytes at 255 on 10 layers) no spill on sm_80 or sm_90, SASS/elem -2.4 to +0.7 at stride 1, +1.6 to +5.6 at
      stride 2 (+10 to +14 at K = 7), blocks per SM 2-16 -> 2-12.
    - 255 for stats and bwd_reduce in fp32 at K = 5, stride 2 below sm_90 (sm_80: stats 4 bytes at 96 and 168
      registers on 3 layers, bwd_reduce 16-28 at 128 on 2): no spill, -0.5 to -8.2 SASS/elem, bwd_reduce
      channels_last 4 -> 2 blocks per SM on 2 layers.
    - 255 for stats at dilation 2 (no MobileNet layer). sm_90 bf16 channels_last K = 3: 16 bytes at 168 on 8
      stride-1 layers; under 255 168-231 registers, no spill, -0.1 to -1.0 SASS/elem, 3-16 -> 2-16 blocks per SM.
      sm_80: NCHW K = 3 4-8 bytes at 80 registers (c960 / c1024 7 x 7, every dtype), K = 5 stride 2 4 bytes at 96
      (bf16, fp16), channels_last K = 5 stride 2 fp16 12 bytes at 168.

    apply (K = 3 only: K = 5 needs 181-255 registers and spills 4-400 bytes under 168; K = 7 runs at 156-166
    without a limit, and a limit of 168 spilled 4 bytes on NCHW K = 7):
    - 168 (``_APPLY_MAXNREG``) by default. Left to itself ptxas holds the kernel at its 128- or 168-register step
      and spills a pair of the dweight sums carried around the band loop (sm_90: bf16 NHWC 8 bytes on 2 layers,
      fp32 4-12 bytes on 13); under 168 it uses 168 and spills nothing, with 1-17 fewer SASS instructions per
      element, for one resident block per SM less where it sat at 128-140.
    - 255 for fp16 (its conversions: 4-16 bytes under 168 on 9 layers, NCHW stride 1 and NHWC stride 2), for fp32
      channels_last at stride 2 (183-187 registers: an x value is a register, its windows are the widest; 24-64
      bytes under 168, 4 at ptxas's own 168 on one layer), and for fp32 below sm_90 (sm_80 spills under 168: NHWC
      stride 1 4-12 bytes on 9 layers, NCHW 16 on c200 14 x 14; and at ptxas's own choice: 4 bytes at 128 on NHWC
      c200 14 x 14; under 255 189-251 registers, no spill, -8.2 to +1.2 SASS/elem, 2 blocks per SM instead of 3).
    - 255 at dilation 2 (no MobileNet layer): sm_90 bf16 channels_last stride 2 spilled 4 bytes under 168 on 3
      layers (under 255: 187-206 registers, -1.4 to +0.9 SASS/elem, 3 -> 2 blocks per SM), sm_90 fp32 4-16 bytes
      on 6 layers of both layouts."""
    if arch is None:
        return None
    if kind == "apply":
        if k != 3:
            return None
        wide = dtype == torch.float16 or (dtype == torch.float32 and (arch < 90 or channels_last and stride == 2))
        return 255 if wide or dilation == 2 else _APPLY_MAXNREG
    if channels_last and kind in ("fwd", "stats") and (k == 7 or dtype == torch.float32):
        return 255
    if k == 5 and stride == 2 and dtype == torch.float32 and arch < 90 and kind in ("stats", "bwd_reduce"):
        return 255
    if dilation == 2 and kind == "stats":
        return 255
    return None


def _stats_block_c(k: int, dtype: torch.dtype) -> int:
    """Most channels per statistics tile: 64 in fp32 at K = 7 (128-channel tiles of 4 warps, c120 / c240 14 x 14,
    spill 16 bytes at ptxas's 128 registers and 12 at 255 on sm_90), else 128."""
    return 64 if k == 7 and dtype == torch.float32 else 128


def _sum_rows(part: torch.Tensor, out: torch.Tensor, out2: torch.Tensor | None = None) -> None:
    """out (and out2) <- column sums of ``part`` [R, L] (unit column stride): out takes the first out.numel()
    columns, out2 the rest."""
    rows, length = part.shape
    block_l = 32 if not interpreting() else min(1024, next_power_of_2(length))
    _sum_rows_kernel[(cdiv(length, block_l),)](
        part, out, out if out2 is None else out2, rows, length, part.stride(0), out.numel(), BLOCK_R=_SUM_BLOCK_R,
        BLOCK_L=block_l, num_warps=NUM_WARPS,
    )


def _fwd(x, weight, mean, invstd, gamma, beta, y, k: int, stride: int, dilation: int, act: str) -> None:
    """y <- the forward by ``_fwd_kernel`` (arguments checked, y allocated by the caller)."""
    n, c, h, w, ho, wo, cl = _geometry(x, k, stride, dilation)
    # multi-row groups share converted input rows: fp32 has no conversion, and its 8-channel loads are two vectors
    # fp32 channels_last: tiles of one 16-byte vector (4 channels) per thread at stride 2 and dilation 2, whose
    # windows are the widest (8 channels spilled 4-64 bytes at 255 registers); 8 channels elsewhere, fewer SASS/elem
    t = dw_tile(ho, wo, c, cl, k, shared_rows=stride == 1 and dilation == 1 and x.element_size() == 2,
                elem_bytes=x.element_size() if stride == 2 or dilation == 2 else 2)
    taps = _weight_taps(weight, t.block_c)
    num_cb = cdiv(c, t.block_c)
    _fwd_kernel[(n * t.num_gb * num_cb,)](
        x, taps, mean, invstd, gamma, beta, y,
        c, taps.shape[1], h, w, ho, wo, t.groups_per_row, t.num_gb, num_cb, *x.stride(), *y.stride(),
        K=k, STRIDE=stride, DIL=dilation, ACT=act_id(act), CHANNELS_LAST=cl,
        VEC=vec_width(cl, c, x, y), OW=t.ow, ROWS=t.rows, BLOCK_G=t.block_g, BLOCK_C=t.block_c, num_warps=t.num_warps,
        maxnreg=_conv_maxnreg("fwd", k, x.dtype, cl, stride, dilation, _device_arch(x)),
    )  # fmt: skip


@on_tensor_device
def dwconv_bn_act_fwd(
    x: torch.Tensor,
    weight: torch.Tensor,
    mean: torch.Tensor,
    invstd: torch.Tensor,
    gamma: torch.Tensor,
    beta: torch.Tensor,
    stride: int,
    dilation: int,
    act: str,
) -> torch.Tensor:
    k = _check(x, weight, stride, dilation, (("mean", mean), ("invstd", invstd), ("gamma", gamma), ("beta", beta)))
    n, c, h, w = x.shape
    y = _new_like(x, (n, c, *output_hw(h, w, k, stride, dilation)))
    _fwd(x, weight, mean, invstd, gamma, beta, y, k, stride, dilation, act)
    return y


@on_tensor_device
def dwconv_bn_stats(
    x: torch.Tensor, weight: torch.Tensor, stride: int, dilation: int
) -> tuple[torch.Tensor, torch.Tensor]:
    k = _check(x, weight, stride, dilation)
    n, c, h, w, ho, wo, cl = _geometry(x, k, stride, dilation)
    # fp32 channels_last at dilation 2: 4 channels per thread (8 spilled 36-40 bytes at 255 registers)
    t = dw_tile(ho, wo, c, cl, k, "reduce", _stats_block_c(k, x.dtype),
                elem_bytes=x.element_size() if dilation == 2 else 2)
    num_cb = cdiv(c, t.block_c)
    rows, iters = _stage1_rows(n * t.num_gb, c, t.block_c)
    mean_part = torch.empty((rows, c), dtype=torch.float32, device=x.device)
    m2_part = torch.empty_like(mean_part)
    count_part = torch.empty((rows,), dtype=torch.float32, device=x.device)
    taps = _weight_taps(weight, t.block_c)
    _stats_partial_kernel[(rows * num_cb,)](
        x, taps, mean_part, m2_part, count_part,
        c, taps.shape[1], h, w, ho, wo, t.groups_per_row, t.num_gb, num_cb, n * t.num_gb, iters, *x.stride(),
        K=k, STRIDE=stride, DIL=dilation, CHANNELS_LAST=cl,
        VEC=vec_width(cl, c, x), OW=t.ow, BLOCK_G=t.block_g, BLOCK_C=t.block_c, num_warps=t.num_warps,
        maxnreg=_conv_maxnreg("stats", k, x.dtype, cl, stride, dilation, _device_arch(x)),
    )  # fmt: skip
    mean = torch.empty((c,), dtype=torch.float32, device=x.device)
    var = torch.empty_like(mean)
    block_c = min(_COMBINE_BLOCK_C, next_power_of_2(c))
    _stats_combine_kernel[(cdiv(c, block_c),)](
        mean_part, m2_part, count_part, mean, var, rows, c, BLOCK_R=_COMBINE_BLOCK_R, BLOCK_C=block_c,
        num_warps=NUM_WARPS,
    )
    return mean, var


@on_tensor_device
def dwconv_bn_act_bwd_reduce(
    grad_y: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    mean: torch.Tensor,
    invstd: torch.Tensor,
    gamma: torch.Tensor,
    beta: torch.Tensor,
    stride: int,
    dilation: int,
    act: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    k = _check(x, weight, stride, dilation, (("mean", mean), ("invstd", invstd), ("gamma", gamma), ("beta", beta)))
    n, c, h, w, ho, wo, cl = _geometry(x, k, stride, dilation)
    _check_grad(grad_y, x, (n, c, ho, wo))
    t = dw_tile(ho, wo, c, cl, k, "reduce", elem_bytes=x.element_size())
    num_cb = cdiv(c, t.block_c)
    rows, iters = _stage1_rows(n * t.num_gb, c, t.block_c)
    part = torch.empty((rows, 2 * c), dtype=torch.float32, device=x.device)
    taps = _weight_taps(weight, t.block_c)
    _bwd_reduce_partial_kernel[(num_cb, rows)](
        grad_y, x, taps, mean, invstd, gamma, beta, part,
        c, taps.shape[1], h, w, ho, wo, t.groups_per_row, t.num_gb, n * t.num_gb, iters,
        *grad_y.stride(), *x.stride(),
        K=k, STRIDE=stride, DIL=dilation, ACT=act_id(act), CHANNELS_LAST=cl,
        VEC=vec_width(cl, c, grad_y, x), OW=t.ow, BLOCK_G=t.block_g, BLOCK_C=t.block_c, num_warps=t.num_warps,
        maxnreg=_conv_maxnreg("bwd_reduce", k, x.dtype, cl, stride, dilation, _device_arch(x)),
    )  # fmt: skip
    sum_g = torch.empty((c,), dtype=torch.float32, device=x.device)
    sum_g_xhat = torch.empty_like(sum_g)
    _sum_rows(part, sum_g, sum_g_xhat)
    return sum_g, sum_g_xhat


def _check_grad(grad_y: torch.Tensor, x: torch.Tensor, shape) -> None:
    if tuple(grad_y.shape) != tuple(shape):
        raise ValueError(f"grad_y: expected shape {tuple(shape)}, got {tuple(grad_y.shape)}")
    if grad_y.dtype != x.dtype:
        raise TypeError(f"grad_y: expected the dtype of x ({x.dtype}), got {grad_y.dtype}")


@on_tensor_device
def dwconv_bn_act_bwd_apply(
    grad_y: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    mean: torch.Tensor,
    invstd: torch.Tensor,
    gamma: torch.Tensor,
    beta: torch.Tensor,
    mean_g: torch.Tensor,
    mean_g_xhat: torch.Tensor,
    stride: int,
    dilation: int,
    act: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    vectors = (("mean", mean), ("invstd", invstd), ("gamma", gamma), ("beta", beta))
    vectors += (("mean_g", mean_g), ("mean_g_xhat", mean_g_xhat))
    k = _check(x, weight, stride, dilation, vectors)
    n, c, h, w, ho, wo, cl = _geometry(x, k, stride, dilation)
    _check_grad(grad_y, x, (n, c, ho, wo))
    halo_lo, halo_hi = _band_halo(k, stride, dilation)
    t = dw_tile(ho, wo, c, cl, k, "apply", _apply_block_c(ho, wo, halo_lo + halo_hi, k, x.dtype, dilation))
    tb = _band_rows(ho, wo, t.block_c, halo_lo + halo_hi)
    num_bands = cdiv(ho, tb)
    sr = min(tb + halo_lo + halo_hi, ho)
    taps = _weight_taps(weight, t.block_c)
    num_cb = cdiv(c, t.block_c)
    rows, iters = _stage1_rows(n * num_bands, c, t.block_c)
    dw_part = torch.empty((rows, taps.shape[1] * k * k), dtype=torch.float32, device=x.device)
    slots = torch.empty((rows * num_cb, sr * wo * t.block_c), dtype=torch.float32, device=x.device)
    dx = _new_like(x, (n, c, h, w))
    owx = cdiv(t.ow, stride) * stride
    _bwd_apply_kernel[(num_cb, rows)](
        grad_y, x, taps, mean, invstd, gamma, beta, mean_g, mean_g_xhat, dx, dw_part, slots,
        c, taps.shape[1], h, w, ho, wo, t.groups_per_row, cdiv(w, owx), tb, sr, num_bands, num_cb,
        n * num_bands, iters, *grad_y.stride(), *x.stride(), *dx.stride(),
        K=k, STRIDE=stride, DIL=dilation, ACT=act_id(act), CHANNELS_LAST=cl, VEC=vec_width(cl, c, grad_y, x, dx),
        OW=t.ow, OWX=owx, HALO_LO=halo_lo, HALO_HI=halo_hi, BLOCK_G=t.block_g, BLOCK_C=t.block_c,
        num_warps=t.num_warps, maxnreg=_conv_maxnreg("apply", k, x.dtype, cl, stride, dilation, _device_arch(x)),
    )  # fmt: skip
    # dweight stage 2: deterministic column sums of the partials' first C*K*K columns, stored in weight's dtype.
    dweight = torch.empty(weight.shape, dtype=weight.dtype, device=weight.device)
    _sum_rows(dw_part[:, : c * k * k], dweight.view(-1))
    return dx, dweight


# ----------------------------------------------------------------------------------------------
# eval forward on the tensor cores (tl.dot, A loaded by TMA boxes): kernel, exact recompute, launcher
# ----------------------------------------------------------------------------------------------
# Why: with fp32 FFMAs the eval forward cannot reach issue 13's instruction budget (<= 20 SASS per output element at
# K = 3, <= 36 at K = 5, bf16 channels_last, sm_90): the FFMA design's floors are K3 s2 19-23 and K5 36-40 before
# any addressing. Here a tile is NB images x RH output rows x G output columns x 8 channels (one 16-byte vector per
# pixel), and its convolution is K (or 2K) tl.dot calls. Per kernel row kh, TMA boxes of the input rows
# S * ho + kh - PAD hold, per output row, the S*(G - 1) + K input columns S * wo0 - PAD + j of its window (one box
# of WA columns, or two of WA = S*G and W1 when one would be much wider than the window; hardware zero fill outside
# the image: no masks, no address math per element). Reshaped to A [NB*RH, WA*8] (column (j, c')), a box meets
# B_kh [WA*8, G*8], the block-diagonal Toeplitz weights: B[(j, c'), (i, c)] = w[c, kh, kw] if c' == c and
# kw = j - S*i is a tap, else 0. fp32 accumulate (exact products: the weights are in x's dtype). Stride 2 reads the
# input rows of one parity through a descriptor whose row stride is doubled (xa0/xb0: even rows, xa1/xb1: odd rows;
# 2*W*C-element strides stay 16-byte multiples since C % 8 == 0). The loads are not pipelined (static kernel rows:
# each box is issued and awaited in turn); a GPU measurement is owed.
#
# Non-finite inputs: B's zeros meet the other channels' and columns' x, and 0 * Inf = 0 * NaN = NaN, so one Inf/NaN
# in x turns its whole group NaN where the reference keeps it to its own outputs. Every contaminated output is NaN,
# so a tile whose accumulators hold a NaN (one sum over the tile: ~1 FADD per output and a reduction) is recomputed
# tap by tap in (kh, kw) order (``_fwd_dot_exact_tile``, out of line: ``noinline`` keeps it off the tile's
# registers and the report's counted path); a genuine NaN output stays NaN there.
#
# Domain (``_dot_fwd_supported``): eval forward only (``dwconv_bn_act_fwd_eval``; the training forward applies with
# ``_fwd_kernel``, so the statistics, the apply pass and the backward recompute the same z bit for bit),
# bf16/fp16 (the MMA's inputs; fp32 would need TF32 and change its numerics), channels_last x with C % 8 == 0 and
# 16-byte aligned x and y (TMA), dilation 1 (a dilated window is not a run of columns), at stride 2 H >= 2, grid
# axes below 65536, a GPU with TMA (sm_90+; sm_80 would need a pointer-load A: see the session-7 prototype, whose
# im2col addressing cost more than the FFMAs it removed). Elsewhere ``_fwd_kernel`` runs. Triton 3.8's interpreter
# computes bf16 tl.dot wrongly (fp16 and fp32 agree with the reference): on CPU tensors under the interpreter only
# fp16 takes this path, so the CPU tests check its math in fp16.
@triton.jit(noinline=True)
def _fwd_dot_exact_tile(
    x_ptr,  # x [N, C, H, W] channels_last
    w_ptr,  # weight [C, K*K], contiguous, x's dtype
    mean_ptr,  # [C] fp32
    invstd_ptr,  # [C] fp32
    gamma_ptr,  # [C] fp32
    beta_ptr,  # [C] fp32
    y_ptr,  # out: y [N, C, Ho, Wo] channels_last
    n0,  # the tile: first image, output row, output column, channel
    ho0,
    wo0,
    c0,
    N,
    H,
    W,
    Ho,
    Wo,
    stride_xn,  # x strides in elements: image, row, column (channel stride 1)
    stride_xh,
    stride_xw,
    stride_yn,  # y strides in elements
    stride_yh,
    stride_yw,
    K: tl.constexpr,
    STRIDE: tl.constexpr,
    ACT: tl.constexpr,
    NB: tl.constexpr,  # images per tile
    RH: tl.constexpr,  # output rows per tile
    CW: tl.constexpr,  # output columns per tile
):
    """y of the tile [NB, RH, CW] x 8 channels, each output's taps added in (kh, kw) order on the CUDA cores: the
    rare path of a tile whose tensor-core result holds a NaN."""
    PAD: tl.constexpr = (K - 1) // 2
    p = tl.arange(0, NB * RH * CW)
    nn = n0 + p // (RH * CW)
    ho = ho0 + (p // CW) % RH
    wo = wo0 + p % CW
    c = c0 + tl.arange(0, 8)
    ok = ((nn < N) & (ho < Ho) & (wo < Wo))[:, None]
    x_img = x_ptr + nn.to(tl.int64)[:, None] * stride_xn + c[None, :]
    acc = tl.zeros([NB * RH * CW, 8], dtype=tl.float32) - tl.load(mean_ptr + c)[None, :]
    for kh in tl.range(K, loop_unroll_factor=1):  # rolled: a small out-of-line function
        hi = ho * STRIDE + kh - PAD
        for kw in tl.range(K, loop_unroll_factor=1):
            wi = wo * STRIDE + kw - PAD
            inside = ok & ((hi >= 0) & (hi < H) & (wi >= 0) & (wi < W))[:, None]
            xv = tl.load(x_img + (hi * stride_xh + wi * stride_xw)[:, None], mask=inside, other=0.0)
            wv = tl.load(w_ptr + c * (K * K) + (kh * K + kw))
            acc += xv.to(tl.float32) * wv.to(tl.float32)[None, :]
    scale = tl.load(gamma_ptr + c) * tl.load(invstd_ptr + c)
    y = act_fwd(acc * scale[None, :] + tl.load(beta_ptr + c)[None, :], ACT)
    y_img = y_ptr + nn.to(tl.int64)[:, None] * stride_yn + c[None, :]
    tl.store(y_img + (ho * stride_yh + wo * stride_yw)[:, None], y.to(y_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _fwd_dot_kernel(
    xa0_desc,  # TensorDescriptors of x as [N, H', W, C] (NHWC): stride 1: every input row (H' = H); stride 2: the
    xb0_desc,  # even input rows (xa0, xb0) and the odd ones (xa1, xb1; H' = their count). Blocks: xa [NB, RH, WA, 8]
    xa1_desc,  # (the first WA columns of each kernel row's window), xb [NB, RH, W1, 8] (the next W1; unused when
    xb1_desc,  # W1 = 0); stride 1: xa1 = xa0, xb1 = xb0
    y_desc,  # TensorDescriptor of y as [N, Ho, Wo, C], block [NB, RH, G, 8]
    b_ptr,  # B [C/8, K, (WA + W1)*8, G*8], x's dtype, contiguous: the block-diagonal Toeplitz weights (_dot_weights)
    mean_ptr,  # [C] fp32
    invstd_ptr,  # [C] fp32
    gamma_ptr,  # [C] fp32
    beta_ptr,  # [C] fp32
    x_ptr,  # x [N, C, H, W] channels_last, for the exact recompute
    w_ptr,  # weight [C, K*K] contiguous, x's dtype, for the exact recompute
    y_ptr,  # y [N, C, Ho, Wo] channels_last, for the exact recompute
    N,
    H,  # input height, width
    W,
    Ho,  # output height, width
    Wo,
    num_hb,  # row blocks: cdiv(Ho, RH) (the grid: channel block, column block, image block * num_hb + row block)
    stride_xn,  # x strides in elements: image, row, column (the exact recompute's)
    stride_xh,
    stride_xw,
    stride_yn,  # y strides in elements
    stride_yh,
    stride_yw,
    K: tl.constexpr,  # kernel size
    STRIDE: tl.constexpr,  # 1/2
    ACT: tl.constexpr,  # activations.ACT_IDS
    G: tl.constexpr,  # output columns per tile (the dot's N = G*8)
    WA: tl.constexpr,  # columns of the first box (>= S*G; all S*(G - 1) + K of the window when W1 = 0)
    W1: tl.constexpr,  # columns of the second box: the window's columns past WA (0: one box per kernel row)
    NB: tl.constexpr,  # images per tile
    RH: tl.constexpr,  # output rows per tile
):
    """y = act((z - mean) * (gamma * invstd) + beta) of one tile [NB, RH, G] x 8 channels per program (channel block
    fastest, so the programs sharing a pixel's 32-byte sector run together). The accumulators start at zero (the
    MMA's first product needs no initialised registers) and the epilogue folds -mean * scale into the bias."""
    PAD: tl.constexpr = (K - 1) // 2
    M: tl.constexpr = NB * RH
    NJ: tl.constexpr = WA + W1
    c0 = tl.program_id(0) * 8
    wo0 = tl.program_id(1) * G
    t = tl.program_id(2)
    ho0 = (t % num_hb) * RH
    n0 = (t // num_hb) * NB
    q = tl.arange(0, G * 8)
    cq = c0 + q % 8
    acc = tl.zeros([M, G * 8], dtype=tl.float32)
    ra = tl.arange(0, WA * 8)
    b_kh = b_ptr + (c0 // 8) * (K * NJ * 8 * G * 8)
    col = wo0 * STRIDE - PAD
    for kh in tl.static_range(K):
        # the descriptor pair and box row of input rows STRIDE * ho + kh - PAD
        if STRIDE == 1:
            row = ho0 + kh - PAD
        elif (kh + PAD) % 2 == 0:
            row = ho0 + (kh - PAD) // 2
        else:
            row = ho0 + (kh - PAD - 1) // 2
        if STRIDE == 2 and (kh + PAD) % 2 == 1:
            a0 = xa1_desc.load([n0, row, col, c0])
        else:
            a0 = xa0_desc.load([n0, row, col, c0])
        b0 = tl.load(b_kh + kh * (NJ * 8 * G * 8) + ra[:, None] * (G * 8) + q[None, :])
        acc = tl.dot(a0.reshape(M, WA * 8), b0, acc)
        if W1 > 0:
            if STRIDE == 2 and (kh + PAD) % 2 == 1:
                a1 = xb1_desc.load([n0, row, col + WA, c0])
            else:
                a1 = xb0_desc.load([n0, row, col + WA, c0])
            rb = tl.arange(0, W1 * 8)
            b1 = tl.load(b_kh + kh * (NJ * 8 * G * 8) + (WA * 8 + rb[:, None]) * (G * 8) + q[None, :])
            acc = tl.dot(a1.reshape(M, W1 * 8), b1, acc)
    # a NaN anywhere in the tile (an Inf/NaN input spreads through B's zeros): recompute it exactly, out of line
    nan_probe = tl.sum(tl.sum(acc, axis=1), axis=0)
    if nan_probe != nan_probe:
        _fwd_dot_exact_tile(
            x_ptr, w_ptr, mean_ptr, invstd_ptr, gamma_ptr, beta_ptr, y_ptr, n0, ho0, wo0, c0, N, H, W, Ho, Wo,
            stride_xn, stride_xh, stride_xw, stride_yn, stride_yh, stride_yw, K, STRIDE, ACT, NB, RH, G,
        )  # fmt: skip
    else:
        scale = tl.load(gamma_ptr + cq) * tl.load(invstd_ptr + cq)
        bias = tl.load(beta_ptr + cq) - tl.load(mean_ptr + cq) * scale
        y = act_fwd(acc * scale[None, :] + bias[None, :], ACT)
        y_desc.store([n0, ho0, wo0, c0], y.to(y_ptr.dtype.element_ty).reshape(NB, RH, G, 8))


class _DotTile(NamedTuple):
    """Tile of ``_fwd_dot_kernel``: the same RH output rows x G output columns (x 8 channels) of NB images (small
    images: RH = 1 or 2 rows of many images waste no rows); per kernel row a box of WA input columns and one of W1
    (0: none)."""

    g: int
    wa: int
    w1: int
    nb: int
    rh: int


# Output rows of a tile (the dot's M): 4 warps issue wgmma on M = 64 rows at a time. Larger tiles amortise the ~25
# instructions each TMA box costs (issue, barrier wait) and the per-tile setup over more outputs; 64 accumulators
# per thread (M * G * 8 = 8192 outputs) keep the registers below 255.
_DOT_MIN_M = 64
_DOT_OUTPUTS = 8192
_DOT_NUM_WARPS = 4


def _dot_boxes(k: int, stride: int, g: int) -> tuple[int, int]:
    """(WA, W1): the box widths covering the S*(G - 1) + K input columns of a kernel row's window, each a power of
    two >= 2 (the dot's K dimension a multiple of 16). One box of the whole window when it is at most 4 columns
    wider than the two boxes S*G + W1 (each box costs ~25 instructions of TMA issue and barrier waits; each extra
    column of a box 1/2 HGMMA and ~1 LDSM per 64 rows), else those two."""
    window = stride * (g - 1) + k
    one = next_power_of_2(window)
    w1 = max(2, next_power_of_2(window - stride * g))
    return (one, 0) if one <= stride * g + w1 + 4 else (stride * g, w1)


@functools.lru_cache(maxsize=1024)
def _dot_tile(n: int, ho: int, wo: int, k: int, stride: int) -> _DotTile:
    """The tile with the fewest instructions per useful output by a simple model: per computed output a cost that
    falls with the tile's outputs (1 + 2 * 8192 / outputs: the per-tile boxes and setup), times the computed
    positions per useful one (tiles past the image); ties go to more rows of fewer images. A function of the shape
    only."""
    best, best_key = None, None
    for g in (4, 8):
        for rh in (1, 2, 4, 8, 16, 32, 64, 128, 256):
            for nb in (1, 2, 4, 8, 16, 32, 64, 128, 256):
                m = nb * rh
                if m < _DOT_MIN_M or m * g * 8 > _DOT_OUTPUTS:
                    continue
                tiles = cdiv(n, nb) * cdiv(ho, rh) * cdiv(wo, g)
                waste = tiles * m * g / (n * ho * wo)
                key = (round(waste * (1 + 2 * _DOT_OUTPUTS / (m * g * 8)), 4), -m * g, -rh)  # ties: compact
                if best_key is None or key < best_key:
                    best, best_key = _DotTile(g, *_dot_boxes(k, stride, g), nb, rh), key
    assert best is not None
    return best


@functools.lru_cache(maxsize=64)
def _dot_weight_index(k: int, stride: int, g: int, nj: int, device: torch.device) -> torch.Tensor:
    """[K * NJ*8 * G*8] int64: for B[kh, (j, c'), (i, c)] the index of its weight in a channel block's flattened
    [8 (c), K, K] weights, or 8*K*K (a zero appended after them) where c' != c or kw = j - S*i is not a tap."""
    kh = torch.arange(k)[:, None, None, None, None]
    j = torch.arange(nj)[None, :, None, None, None]
    c_in = torch.arange(8)[None, None, :, None, None]
    i = torch.arange(g)[None, None, None, :, None]
    c = torch.arange(8)[None, None, None, None, :]
    kw = j - stride * i
    tap = (c_in == c) & (kw >= 0) & (kw < k)
    return torch.where(tap, c * (k * k) + kh * k + kw, 8 * k * k).reshape(-1).to(device)


def _dot_weights(weight: torch.Tensor, k: int, stride: int, g: int, nj: int) -> torch.Tensor:
    """B [C/8, K, NJ*8, G*8] in weight's dtype: B[cb, kh, (j, c'), (i, c)] = weight[cb*8 + c, 0, kh, kw] if c' == c
    and kw = j - S*i is a tap (0 <= kw < K), else 0 (window column j: the first box's, then the second's). Two
    device ops per call (a zero appended per channel block, one gather by a cached index)."""
    c = weight.shape[0]
    w = torch.nn.functional.pad(weight.reshape(c // 8, 8 * k * k), (0, 1))
    return w[:, _dot_weight_index(k, stride, g, nj, weight.device)].reshape(c // 8, k, nj * 8, g * 8)


def _dot_fwd_supported(x: torch.Tensor, y: torch.Tensor, k: int, stride: int, dilation: int) -> bool:
    """Whether the eval forward runs ``_fwd_dot_kernel``: the domain in the section's comment, in order: the MMA's
    dtypes; dilation 1; channels_last x of 16-byte pixels vectors (C % 8 == 0) and 16-byte aligned x and y (TMA);
    at stride 2 at least 2 input rows (the odd-row descriptor); the grid's axes 1 and 2 (< 65536 blocks); a GPU with
    TMA (sm_90+), or on CPU tensors the interpreter in fp16 (its bf16 tl.dot is wrong in Triton 3.8)."""
    n, c, h, w = x.shape
    ho, wo = y.shape[2:]
    if x.dtype not in (torch.bfloat16, torch.float16) or dilation != 1:
        return False
    if memory_format_of(x) != torch.channels_last or c % 8 or x.stride(0) % 8 or x.stride(2) % 8:
        return False
    if x.data_ptr() % 16 or y.data_ptr() % 16 or (stride == 2 and h < 2):
        return False
    t = _dot_tile(n, ho, wo, k, stride)
    if cdiv(wo, t.g) >= 65536 or cdiv(n, t.nb) * cdiv(ho, t.rh) >= 65536:
        return False
    arch = _device_arch(x)
    if arch is None:
        return interpreting() and x.dtype == torch.float16
    return arch >= 90


def _fwd_dot(x, weight, mean, invstd, gamma, beta, y, k: int, stride: int, act: str) -> None:
    """y <- the eval forward by ``_fwd_dot_kernel`` (x and y channels_last, see ``_dot_fwd_supported``)."""
    n, c, h, w = x.shape
    ho, wo = y.shape[2:]
    t = _dot_tile(n, ho, wo, k, stride)
    xv = x.permute(0, 2, 3, 1)  # [N, H, W, C], contiguous
    rows = (xv, xv) if stride == 1 else (xv[:, 0::2], xv[:, 1::2])  # stride 2: even, odd input rows
    descs = [TensorDescriptor.from_tensor(r, [t.nb, t.rh, width, 8]) for r in rows for width in (t.wa, t.w1 or t.wa)]
    y_desc = TensorDescriptor.from_tensor(y.permute(0, 2, 3, 1), [t.nb, t.rh, t.g, 8])
    num_hb = cdiv(ho, t.rh)
    _fwd_dot_kernel[(c // 8, cdiv(wo, t.g), cdiv(n, t.nb) * num_hb)](
        *descs, y_desc, _dot_weights(weight, k, stride, t.g, t.wa + t.w1), mean, invstd, gamma, beta, x,
        weight.reshape(c, k * k), y, n, h, w, ho, wo, num_hb, x.stride(0), x.stride(2), x.stride(3),
        y.stride(0), y.stride(2), y.stride(3),
        K=k, STRIDE=stride, ACT=act_id(act), G=t.g, WA=t.wa, W1=t.w1, NB=t.nb, RH=t.rh, num_warps=_DOT_NUM_WARPS,
    )  # fmt: skip


@on_tensor_device
def dwconv_bn_act_fwd_eval(
    x: torch.Tensor,
    weight: torch.Tensor,
    mean: torch.Tensor,
    invstd: torch.Tensor,
    gamma: torch.Tensor,
    beta: torch.Tensor,
    stride: int,
    dilation: int,
    act: str,
) -> torch.Tensor:
    """``dwconv_bn_act_fwd`` for the eval forward (running statistics): on the tensor cores where
    ``_dot_fwd_supported``, else by ``dwconv_bn_act_fwd``'s kernel. The training forward calls ``dwconv_bn_act_fwd``
    itself, so its z is the statistics' and the backward's z bit for bit."""
    k = _check(x, weight, stride, dilation, (("mean", mean), ("invstd", invstd), ("gamma", gamma), ("beta", beta)))
    n, c, h, w = x.shape
    y = _new_like(x, (n, c, *output_hw(h, w, k, stride, dilation)))
    if _dot_fwd_supported(x, y, k, stride, dilation):
        _fwd_dot(x, weight, mean, invstd, gamma, beta, y, k, stride, act)
    else:
        _fwd(x, weight, mean, invstd, gamma, beta, y, k, stride, dilation, act)
    return y
