"""Fused depthwise conv + BatchNorm + activation in Triton: the four primitives of ``docs/op_contract.md``.

Order: ``@triton.jit`` helpers and kernels, then host launchers (same signatures as ``mnet_ext.reference``).

Geometry: x [N, C, H, W] -> z [N, C, Ho, Wo] with padding (K - 1) // 2 * DIL. A tile is BLOCK_P output pixels
(flattened ``ho * Wo + wo`` of one image n) by BLOCK_C channels. fwd and dx: one tile per program, the 1-D grid
enumerating (n, pixel block, channel block) with channel blocks fastest (``triton_kernels.program_tile``).
stats, bwd_reduce and dz (the kernels that produce partial sums): program (row, channel block) walks ITERS
consecutive tiles and writes one partial row.
z is computed in fp32 from the K*K shifted x tiles (taps unrolled at compile time; the overlapping reads of
neighbouring taps hit L1/L2). Per-image offsets are int32, the image base ``n * stride_n`` is int64 so
N*C*H*W may exceed 2^31 (the launchers check that one image stays below 2^31 elements).

Launches per primitive: fwd 1; stats 2 (Welford/Chan partials per program + deterministic Chan combine);
bwd_reduce 2 (partial sums per program + deterministic column sum); bwd_apply 3 (dz + dweight partials; dx
gather; deterministic column sum of the dweight partials into weight's dtype, the same small kernel as
bwd_reduce's). The stage-1 reductions run ~8 programs per SM that each walk ITERS consecutive tiles, so their
partial buffers have a few thousand rows at most and the single-program-per-column-block stage 2 stays cheap.

Bytes (A = one activation tensor of x's dtype; the partial buffers are small and ignored):
* stats reads x (A); fwd reads x and writes y (2A). "Apply recomputes conv from x" (the contract: fwd takes x)
  moves 3A for a training forward, and the second read of x comes from L2 when x fits in it (then 2A of HBM).
  "Apply re-reads a stored z" would move A (stats reads x) + A (write z, or 2A for an fp32 z) + 2A (read z,
  write y) = 4A (5A with fp32 z): recompute is cheaper by at least A; what it repeats (K*K loads that hit L1,
  K*K FMAs) costs SM time, not HBM bytes.
* backward: reduce reads grad_y, x (2A); apply reads grad_y, x (2A), writes dz in fp32 (2A for bf16/fp16, A for
  fp32), then the dx kernel reads dz and writes dx: 9A (bf16) in all. The fp32 dz scratch buys accuracy; a
  single-kernel dx (dz of a haloed tile kept on chip) would save the 4A of the scratch round trip.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from mnet_ext.reference import memory_format_of, output_hw
from . import (
    autotune,
    hint_multiple,
    interpreting,
    on_tensor_device,
    program_tile,
    sum_pixels,
    tile_offsets,
    tile_sizes,
    vec_width,
)
from .activations import act_bwd, act_fwd, act_id


# ----------------------------------------------------------------------------------------------
# jit helpers
# ----------------------------------------------------------------------------------------------
@triton.jit
def _load_x_tap(
    x_img,  # pointer to x[n, 0, 0, 0] (int64 base already applied)
    offs_c,  # channel offsets, broadcast-shaped (see tile_offsets)
    ho,  # output row of each tile pixel, broadcast-shaped like offs_p
    wo,  # output column of each tile pixel
    mask,  # tile mask: valid (pixel, channel)
    H,
    W,
    stride_xc,
    stride_xh,
    stride_xw,
    kh: tl.constexpr,
    kw: tl.constexpr,
    STRIDE: tl.constexpr,
    DIL: tl.constexpr,
    PAD: tl.constexpr,
):
    """fp32 x[n, c, ho*STRIDE - PAD + kh*DIL, wo*STRIDE - PAD + kw*DIL], zero in the padding."""
    hi = ho * STRIDE - PAD + kh * DIL
    wi = wo * STRIDE - PAD + kw * DIL
    ok = mask & (hi >= 0) & (hi < H) & (wi >= 0) & (wi < W)
    ptrs = x_img + offs_c * stride_xc + hi * stride_xh + wi * stride_xw
    return tl.load(ptrs, mask=ok, other=0.0).to(tl.float32)


@triton.jit
def _conv_tile(
    x_img,
    w_ptr,  # weight [C, 1, K, K]
    offs_c,
    ho,
    wo,
    mask,
    cmask,  # valid channels, broadcast-shaped like offs_c
    H,
    W,
    stride_xc,
    stride_xh,
    stride_xw,
    stride_wc,  # weight strides: channel, kernel row, kernel column
    stride_wh,
    stride_ww,
    K: tl.constexpr,
    STRIDE: tl.constexpr,
    DIL: tl.constexpr,
):
    """z = depthwise conv of one tile in fp32 (zero where ``mask`` is false)."""
    PAD: tl.constexpr = (K - 1) // 2 * DIL
    acc = tl.zeros(mask.shape, dtype=tl.float32)
    for kh in tl.static_range(K):
        for kw in tl.static_range(K):
            xv = _load_x_tap(
                x_img, offs_c, ho, wo, mask, H, W, stride_xc, stride_xh, stride_xw, kh, kw, STRIDE, DIL, PAD
            )
            wv = tl.load(w_ptr + offs_c * stride_wc + kh * stride_wh + kw * stride_ww, mask=cmask, other=0.0)
            acc += xv * wv.to(tl.float32)
    return acc


@triton.jit
def _grad_u_tile(
    x_img,  # x of this tile's image (base pointer advanced by n * stride_xn)
    gy_img,  # grad_y of this tile's image
    w_ptr,  # weight [C, 1, K, K]
    offs_c,
    ho,
    wo,
    mask,
    cmask,
    mean,  # per-channel vectors of the tile, fp32
    invstd,
    gamma,
    beta,
    H,
    W,
    stride_xc,
    stride_xh,
    stride_xw,
    stride_wc,
    stride_wh,
    stride_ww,
    stride_gc,  # grad_y strides: channel, row, column
    stride_gh,
    stride_gw,
    K: tl.constexpr,
    STRIDE: tl.constexpr,
    DIL: tl.constexpr,
    ACT: tl.constexpr,
):
    """(g, xhat) of one tile: z recomputed from x, xhat = (z - mean) * invstd, g = act'(gamma*xhat + beta) * grad_y
    (zero where ``mask`` is false). Shared by both backward passes so they recompute exactly the same g."""
    z = _conv_tile(
        x_img, w_ptr, offs_c, ho, wo, mask, cmask, H, W, stride_xc, stride_xh, stride_xw,
        stride_wc, stride_wh, stride_ww, K, STRIDE, DIL,
    )  # fmt: skip
    xhat = (z - mean) * invstd
    u = xhat * gamma + beta
    gy = tl.load(gy_img + offs_c * stride_gc + ho * stride_gh + wo * stride_gw, mask=mask, other=0.0)
    return tl.where(mask, act_bwd(u, gy.to(tl.float32), ACT), 0.0), xhat


@triton.jit
def _load_vec(ptr, offs_c, cmask):
    """fp32 per-channel vector [C] loaded broadcast-shaped like offs_c."""
    return tl.load(ptr + offs_c, mask=cmask, other=0.0).to(tl.float32)


# ----------------------------------------------------------------------------------------------
# kernels
# ----------------------------------------------------------------------------------------------
@autotune(key=["C", "Ho", "Wo", "stride_xc", "K", "STRIDE", "DIL", "ACT"])
@triton.jit
def _fwd_kernel(
    x_ptr,  # x [N, C, H, W], any strides (NCHW or channels_last), fp32/fp16/bf16
    w_ptr,  # weight [C, 1, K, K], dtype of x
    mean_ptr,  # [C] fp32, contiguous
    invstd_ptr,  # [C] fp32
    gamma_ptr,  # [C] fp32
    beta_ptr,  # [C] fp32
    y_ptr,  # out: y [N, C, Ho, Wo], dtype of x
    C,  # channels
    H,  # input height
    W,  # input width
    Ho,  # output height
    Wo,  # output width
    num_pb,  # pixel blocks per image: cdiv(Ho * Wo, BLOCK_P)
    num_cb,  # channel blocks: cdiv(C, BLOCK_C)
    stride_xn,  # x strides in elements: image, channel, row, column
    stride_xc,
    stride_xh,
    stride_xw,
    stride_wc,  # weight strides: channel, kernel row, kernel column
    stride_wh,
    stride_ww,
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
    BLOCK_P: tl.constexpr,  # pixels per tile
    BLOCK_C: tl.constexpr,  # channels per tile
):
    """y = act((z - mean) * (gamma * invstd) + beta) in one pass. Subtracting the mean before scaling (one FADD
    more than the folded ``z * scale + shift``) keeps the error relative to |z - mean| when |mean| >> std."""
    C = hint_multiple(C, VEC)
    stride_xn = hint_multiple(stride_xn, VEC)
    stride_xh = hint_multiple(stride_xh, VEC)
    stride_xw = hint_multiple(stride_xw, VEC)
    stride_yn = hint_multiple(stride_yn, VEC)
    stride_yh = hint_multiple(stride_yh, VEC)
    stride_yw = hint_multiple(stride_yw, VEC)
    n, pb, cb, row = program_tile(num_pb, num_cb)
    offs_p, offs_c = tile_offsets(pb, cb, BLOCK_P, BLOCK_C, CHANNELS_LAST)
    cmask = offs_c < C
    mask = (offs_p < Ho * Wo) & cmask
    ho = offs_p // Wo
    wo = offs_p % Wo
    x_img = x_ptr + n.to(tl.int64) * stride_xn
    z = _conv_tile(
        x_img, w_ptr, offs_c, ho, wo, mask, cmask, H, W, stride_xc, stride_xh, stride_xw,
        stride_wc, stride_wh, stride_ww, K, STRIDE, DIL,
    )  # fmt: skip
    scale = _load_vec(gamma_ptr, offs_c, cmask) * _load_vec(invstd_ptr, offs_c, cmask)
    u = (z - _load_vec(mean_ptr, offs_c, cmask)) * scale + _load_vec(beta_ptr, offs_c, cmask)
    y = act_fwd(u, ACT)
    y_ptrs = y_ptr + n.to(tl.int64) * stride_yn + offs_c * stride_yc + ho * stride_yh + wo * stride_yw
    tl.store(y_ptrs, y.to(y_ptr.dtype.element_ty), mask=mask)


@autotune(key=["C", "Ho", "Wo", "stride_xc", "K", "STRIDE", "DIL", "ITERS"])
@triton.jit
def _stats_partial_kernel(
    x_ptr,  # x [N, C, H, W], any strides
    w_ptr,  # weight [C, 1, K, K]
    mean_part_ptr,  # out: [R, C] fp32, contiguous: mean of z over the pixels of row r's tiles
    m2_part_ptr,  # out: [R, C] fp32: sum over those pixels of (z - that mean)^2
    count_part_ptr,  # out: [R] fp32: the number of those pixels
    C,  # channels
    H,  # input height
    W,  # input width
    Ho,  # output height
    Wo,  # output width
    num_pb,  # pixel blocks per image: cdiv(Ho * Wo, BLOCK_P)
    num_cb,  # channel blocks: cdiv(C, BLOCK_C)
    num_tiles,  # N * num_pb
    ITERS,  # tiles per program: row r covers tiles r * ITERS ... r * ITERS + ITERS - 1 (below num_tiles)
    stride_xn,  # x strides in elements: image, channel, row, column
    stride_xc,
    stride_xh,
    stride_xw,
    stride_wc,  # weight strides: channel, kernel row, kernel column
    stride_wh,
    stride_ww,
    K: tl.constexpr,  # kernel size 3/5/7
    STRIDE: tl.constexpr,  # 1/2
    DIL: tl.constexpr,  # dilation 1/2
    CHANNELS_LAST: tl.constexpr,  # tile orientation (contiguous axis last)
    VEC: tl.constexpr,  # host-checked power of two dividing C and the n/h/w strides (1 for NCHW)
    BLOCK_P: tl.constexpr,  # pixels per tile
    BLOCK_C: tl.constexpr,  # channels per tile
):
    """Stage 1 of the statistics: program (row, channel block) walks ITERS consecutive tiles. Each tile's
    (count, mean, M2) is centred on the tile's own mean (two passes over registers, so no large sums of squares
    cancel) and folded into the running triple with Chan's update. ITERS bounds the number of rows R so that
    the one-program-per-channel-block combine stays cheap."""
    C = hint_multiple(C, VEC)
    stride_xn = hint_multiple(stride_xn, VEC)
    stride_xh = hint_multiple(stride_xh, VEC)
    stride_xw = hint_multiple(stride_xw, VEC)
    pid = tl.program_id(0)
    cb = pid % num_cb
    row = pid // num_cb
    offs_p0, offs_c = tile_offsets(0, cb, BLOCK_P, BLOCK_C, CHANNELS_LAST)
    cmask = offs_c < C
    P = Ho * Wo
    n_a = tl.zeros(offs_c.shape, dtype=tl.float32)
    mean_a = tl.zeros(offs_c.shape, dtype=tl.float32)
    m2_a = tl.zeros(offs_c.shape, dtype=tl.float32)
    for i in range(0, ITERS):
        t = row * ITERS + i
        n = t // num_pb
        pb = t % num_pb
        offs_p = pb * BLOCK_P + offs_p0
        mask = (offs_p < P) & cmask & (t < num_tiles)
        ho = offs_p // Wo
        wo = offs_p % Wo
        x_img = x_ptr + n.to(tl.int64) * stride_xn
        z = _conv_tile(
            x_img, w_ptr, offs_c, ho, wo, mask, cmask, H, W, stride_xc, stride_xh, stride_xw,
            stride_wc, stride_wh, stride_ww, K, STRIDE, DIL,
        )  # fmt: skip
        count = tl.where(t < num_tiles, tl.minimum(P - pb * BLOCK_P, BLOCK_P), 0).to(tl.float32)
        mean_t = sum_pixels(z, CHANNELS_LAST) / tl.maximum(count, 1.0)  # z is 0 outside the mask
        dev = tl.where(mask, z - mean_t, 0.0)
        m2_t = sum_pixels(dev * dev, CHANNELS_LAST)
        n_ab = n_a + count
        frac = count / tl.maximum(n_ab, 1.0)
        delta = mean_t - mean_a
        mean_a = mean_a + delta * frac
        m2_a = m2_a + m2_t + delta * delta * (n_a * frac)
        n_a = n_ab
    base = row.to(tl.int64) * C
    tl.store(mean_part_ptr + base + offs_c, mean_a, mask=cmask)
    tl.store(m2_part_ptr + base + offs_c, m2_a, mask=cmask)
    # every channel block holds the same count: the first one stores it
    tl.store(count_part_ptr + row + offs_c * 0, n_a, mask=(offs_c == 0))


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


@autotune(key=["C", "Ho", "Wo", "stride_xc", "K", "STRIDE", "DIL", "ACT", "ITERS"])
@triton.jit
def _bwd_reduce_partial_kernel(
    gy_ptr,  # grad_y [N, C, Ho, Wo], any strides, dtype of x
    x_ptr,  # x [N, C, H, W]
    w_ptr,  # weight [C, 1, K, K]
    mean_ptr,  # [C] fp32
    invstd_ptr,  # [C] fp32
    gamma_ptr,  # [C] fp32
    beta_ptr,  # [C] fp32
    part_ptr,  # out: [R, 2, C] fp32 contiguous: row r holds (sum g, sum g * xhat) over its tiles
    C,  # channels
    H,  # input height
    W,  # input width
    Ho,  # output height
    Wo,  # output width
    num_pb,  # pixel blocks per image: cdiv(Ho * Wo, BLOCK_P)
    num_cb,  # channel blocks: cdiv(C, BLOCK_C)
    num_tiles,  # N * num_pb
    ITERS,  # tiles per program (as in _stats_partial_kernel)
    stride_gn,  # grad_y strides
    stride_gc,
    stride_gh,
    stride_gw,
    stride_xn,  # x strides in elements: image, channel, row, column
    stride_xc,
    stride_xh,
    stride_xw,
    stride_wc,  # weight strides: channel, kernel row, kernel column
    stride_wh,
    stride_ww,
    K: tl.constexpr,  # kernel size 3/5/7
    STRIDE: tl.constexpr,  # 1/2
    DIL: tl.constexpr,  # dilation 1/2
    ACT: tl.constexpr,  # activations.ACT_IDS
    CHANNELS_LAST: tl.constexpr,  # tile orientation (contiguous axis last)
    VEC: tl.constexpr,  # host-checked power of two dividing C and the n/h/w strides (1 for NCHW)
    BLOCK_P: tl.constexpr,  # pixels per tile
    BLOCK_C: tl.constexpr,  # channels per tile
):
    """Stage 1 of bwd_reduce: g = act'(u) * grad_y with u recomputed from x; sums of g and g * xhat over ITERS
    consecutive tiles (xhat formed before the product, so sum g * xhat does not cancel as
    invstd * (sum g z - mean sum g) would)."""
    C = hint_multiple(C, VEC)
    stride_gn = hint_multiple(stride_gn, VEC)
    stride_gh = hint_multiple(stride_gh, VEC)
    stride_gw = hint_multiple(stride_gw, VEC)
    stride_xn = hint_multiple(stride_xn, VEC)
    stride_xh = hint_multiple(stride_xh, VEC)
    stride_xw = hint_multiple(stride_xw, VEC)
    pid = tl.program_id(0)
    cb = pid % num_cb
    row = pid // num_cb
    offs_p0, offs_c = tile_offsets(0, cb, BLOCK_P, BLOCK_C, CHANNELS_LAST)
    cmask = offs_c < C
    mean = _load_vec(mean_ptr, offs_c, cmask)
    invstd = _load_vec(invstd_ptr, offs_c, cmask)
    gamma = _load_vec(gamma_ptr, offs_c, cmask)
    beta = _load_vec(beta_ptr, offs_c, cmask)
    sum_g = tl.zeros(offs_c.shape, dtype=tl.float32)
    sum_gx = tl.zeros(offs_c.shape, dtype=tl.float32)
    for i in range(0, ITERS):
        t = row * ITERS + i
        n = t // num_pb
        offs_p = (t % num_pb) * BLOCK_P + offs_p0
        mask = (offs_p < Ho * Wo) & cmask & (t < num_tiles)
        ho = offs_p // Wo
        wo = offs_p % Wo
        x_img = x_ptr + n.to(tl.int64) * stride_xn
        g, xhat = _grad_u_tile(
            x_img, gy_ptr + n.to(tl.int64) * stride_gn, w_ptr, offs_c, ho, wo, mask, cmask, mean, invstd, gamma,
            beta, H, W, stride_xc, stride_xh, stride_xw, stride_wc, stride_wh, stride_ww, stride_gc, stride_gh,
            stride_gw, K, STRIDE, DIL, ACT,
        )  # fmt: skip
        sum_g += sum_pixels(g, CHANNELS_LAST)
        sum_gx += sum_pixels(g * xhat, CHANNELS_LAST)
    base = row.to(tl.int64) * (2 * C)
    tl.store(part_ptr + base + offs_c, sum_g, mask=cmask)
    tl.store(part_ptr + base + C + offs_c, sum_gx, mask=cmask)


@triton.jit
def _sum_rows_kernel(
    part_ptr,  # [R, L] fp32, contiguous
    out_ptr,  # out: [SPLIT] contiguous, any float dtype (the store casts): columns j < SPLIT
    out2_ptr,  # out: [L - SPLIT] contiguous: columns j >= SPLIT (unused when SPLIT == L)
    R,  # rows of the partial buffer
    L,  # columns of the partial buffer
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
        ptrs = part_ptr + r.to(tl.int64)[:, None] * L + j[None, :]
        acc += tl.load(ptrs, mask=(r < R)[:, None] & jmask[None, :], other=0.0)
    total = tl.sum(acc, axis=0)
    tl.store(out_ptr + j, total.to(out_ptr.dtype.element_ty), mask=j < SPLIT)
    tl.store(out2_ptr + (j - SPLIT), total.to(out2_ptr.dtype.element_ty), mask=jmask & (j >= SPLIT))


@autotune(key=["C", "Ho", "Wo", "stride_xc", "K", "STRIDE", "DIL", "ACT", "ITERS"])
@triton.jit
def _bwd_dz_kernel(
    gy_ptr,  # grad_y [N, C, Ho, Wo], any strides
    x_ptr,  # x [N, C, H, W]
    w_ptr,  # weight [C, 1, K, K]
    mean_ptr,  # [C] fp32
    invstd_ptr,  # [C] fp32
    gamma_ptr,  # [C] fp32
    beta_ptr,  # [C] fp32
    mean_g_ptr,  # [C] fp32: sum g / M (zeros in eval)
    mean_gx_ptr,  # [C] fp32: sum g * xhat / M (zeros in eval)
    dz_ptr,  # out: dz [N, C, Ho, Wo] fp32 scratch (memory format of x)
    dw_part_ptr,  # out: [R, C, K*K] fp32 contiguous: row r's sum of dz * x(shifted by the tap) over its tiles
    C,  # channels
    H,  # input height
    W,  # input width
    Ho,  # output height
    Wo,  # output width
    num_pb,  # pixel blocks per image: cdiv(pixels, BLOCK_P)
    num_cb,  # channel blocks: cdiv(C, BLOCK_C)
    num_tiles,  # N * num_pb
    ITERS,  # tiles per program: row r covers tiles r * ITERS ... r * ITERS + ITERS - 1 (below num_tiles)
    stride_gn,  # grad_y strides: image, channel, row, column
    stride_gc,
    stride_gh,
    stride_gw,
    stride_xn,  # x strides in elements: image, channel, row, column
    stride_xc,
    stride_xh,
    stride_xw,
    stride_wc,  # weight strides: channel, kernel row, kernel column
    stride_wh,
    stride_ww,
    stride_dn,  # dz strides
    stride_dc,
    stride_dh,
    stride_dw,
    K: tl.constexpr,  # kernel size 3/5/7
    STRIDE: tl.constexpr,  # 1/2
    DIL: tl.constexpr,  # dilation 1/2
    ACT: tl.constexpr,  # activations.ACT_IDS
    CHANNELS_LAST: tl.constexpr,  # tile orientation (contiguous axis last)
    VEC: tl.constexpr,  # host-checked power of two dividing C and the n/h/w strides (1 for NCHW)
    BLOCK_P: tl.constexpr,  # pixels per tile
    BLOCK_C: tl.constexpr,  # channels per tile
):
    """dz = gamma * invstd * (g - mean_g - xhat * mean_g_xhat) for ITERS consecutive tiles, stored for the dx
    kernel, and dweight partials for all K*K taps at once: after dz, a second sweep over the taps re-reads the x
    tiles the conv just loaded (L1/L2 hits), so x leaves HBM once per tile instead of K*K times. The K*K partial
    sums accumulate in the program's own row of dw_part (read-modify-write, ordered by a barrier): registers
    cannot hold K*K separately indexed vectors across a runtime loop, and ITERS keeps the partial buffer at
    ~8 rows per SM instead of N * num_pb rows (as large as x itself for 7x7 layers with k = 5)."""
    C = hint_multiple(C, VEC)
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
    pid = tl.program_id(0)
    cb = pid % num_cb
    row = pid // num_cb
    offs_p0, offs_c = tile_offsets(0, cb, BLOCK_P, BLOCK_C, CHANNELS_LAST)
    cmask = offs_c < C
    mean = _load_vec(mean_ptr, offs_c, cmask)
    invstd = _load_vec(invstd_ptr, offs_c, cmask)
    gamma = _load_vec(gamma_ptr, offs_c, cmask)
    beta = _load_vec(beta_ptr, offs_c, cmask)
    mean_g = _load_vec(mean_g_ptr, offs_c, cmask)
    mean_gx = _load_vec(mean_gx_ptr, offs_c, cmask)
    dw_row = dw_part_ptr + row.to(tl.int64) * (C * K * K) + offs_c * (K * K)
    for i in range(0, ITERS):
        t = row * ITERS + i
        n = t // num_pb
        offs_p = (t % num_pb) * BLOCK_P + offs_p0
        mask = (offs_p < Ho * Wo) & cmask & (t < num_tiles)
        ho = offs_p // Wo
        wo = offs_p % Wo
        x_img = x_ptr + n.to(tl.int64) * stride_xn
        g, xhat = _grad_u_tile(
            x_img, gy_ptr + n.to(tl.int64) * stride_gn, w_ptr, offs_c, ho, wo, mask, cmask, mean, invstd, gamma,
            beta, H, W, stride_xc, stride_xh, stride_xw, stride_wc, stride_wh, stride_ww, stride_gc, stride_gh,
            stride_gw, K, STRIDE, DIL, ACT,
        )  # fmt: skip
        # a zero mean term (eval) contributes exactly zero, as native's eval backward that has none: an Inf/NaN
        # xhat must not poison dz there
        xhat_term = tl.where(mean_gx == 0.0, 0.0, xhat * mean_gx)
        dz = tl.where(mask, (gamma * invstd) * (g - mean_g - xhat_term), 0.0)
        dz_ptrs = dz_ptr + n.to(tl.int64) * stride_dn + offs_c * stride_dc + ho * stride_dh + wo * stride_dw
        tl.store(dz_ptrs, dz, mask=mask)
        for kh in tl.static_range(K):
            for kw in tl.static_range(K):
                xv = _load_x_tap(
                    x_img, offs_c, ho, wo, mask, H, W, stride_xc, stride_xh, stride_xw, kh, kw, STRIDE, DIL, PAD
                )
                part = sum_pixels(dz * xv, CHANNELS_LAST)
                prev = tl.load(dw_row + (kh * K + kw), mask=cmask & (i > 0), other=0.0)
                tl.store(dw_row + (kh * K + kw), prev + part, mask=cmask)
        # the next iteration's loads of dw_row may run on other threads than these stores
        tl.debug_barrier()


@autotune(key=["C", "H", "W", "stride_xc", "K", "STRIDE", "DIL"])
@triton.jit
def _bwd_dx_kernel(
    dz_ptr,  # dz [N, C, Ho, Wo] fp32 (from _bwd_dz_kernel)
    w_ptr,  # weight [C, 1, K, K]
    dx_ptr,  # out: dx [N, C, H, W], dtype and memory format of x
    C,  # channels
    H,  # input height
    W,  # input width
    Ho,  # output height
    Wo,  # output width
    num_pb,  # pixel blocks per image over the *input* pixels: cdiv(H * W, BLOCK_P)
    num_cb,  # channel blocks: cdiv(C, BLOCK_C)
    stride_dn,  # dz strides: image, channel, row, column
    stride_dc,
    stride_dh,
    stride_dw,
    stride_wc,  # weight strides: channel, kernel row, kernel column
    stride_wh,
    stride_ww,
    stride_xn,  # dx strides (same as x's layout)
    stride_xc,
    stride_xh,
    stride_xw,
    K: tl.constexpr,  # kernel size 3/5/7
    STRIDE: tl.constexpr,  # 1/2
    DIL: tl.constexpr,  # dilation 1/2
    CHANNELS_LAST: tl.constexpr,  # tile orientation (contiguous axis last)
    VEC: tl.constexpr,  # host-checked power of two dividing C and the n/h/w strides (1 for NCHW)
    BLOCK_P: tl.constexpr,  # pixels per tile
    BLOCK_C: tl.constexpr,  # channels per tile
):
    """dx = conv^T(dz) as a gather (no atomics): input pixel (hi, wi) receives w[kh, kw] * dz[ho, wo] for each
    tap with ho * STRIDE - PAD + kh * DIL == hi (same for w), i.e. ho = (hi + PAD - kh * DIL) / STRIDE when that
    is a non-negative integer below Ho. For STRIDE 2 three taps in four fail the parity test (masked lanes)."""
    C = hint_multiple(C, VEC)
    stride_dn = hint_multiple(stride_dn, VEC)
    stride_dh = hint_multiple(stride_dh, VEC)
    stride_dw = hint_multiple(stride_dw, VEC)
    stride_xn = hint_multiple(stride_xn, VEC)
    stride_xh = hint_multiple(stride_xh, VEC)
    stride_xw = hint_multiple(stride_xw, VEC)
    PAD: tl.constexpr = (K - 1) // 2 * DIL
    n, pb, cb, row = program_tile(num_pb, num_cb)
    offs_p, offs_c = tile_offsets(pb, cb, BLOCK_P, BLOCK_C, CHANNELS_LAST)
    cmask = offs_c < C
    mask = (offs_p < H * W) & cmask
    hi = offs_p // W
    wi = offs_p % W
    dz_img = dz_ptr + n.to(tl.int64) * stride_dn
    acc = tl.zeros(mask.shape, dtype=tl.float32)
    for kh in tl.static_range(K):
        th = hi + PAD - kh * DIL
        ho = th // STRIDE
        ok_h = (th >= 0) & (ho < Ho)
        if STRIDE > 1:
            ok_h = ok_h & (th % STRIDE == 0)
        ho = tl.where(ok_h, ho, 0)
        for kw in tl.static_range(K):
            tw = wi + PAD - kw * DIL
            wo = tw // STRIDE
            ok_w = (tw >= 0) & (wo < Wo)
            if STRIDE > 1:
                ok_w = ok_w & (tw % STRIDE == 0)
            wo = tl.where(ok_w, wo, 0)
            dzv = tl.load(
                dz_img + offs_c * stride_dc + ho * stride_dh + wo * stride_dw, mask=mask & ok_h & ok_w, other=0.0
            )
            wv = tl.load(w_ptr + offs_c * stride_wc + kh * stride_wh + kw * stride_ww, mask=cmask, other=0.0)
            acc += dzv * wv.to(tl.float32)
    dx_ptrs = dx_ptr + n.to(tl.int64) * stride_xn + offs_c * stride_xc + hi * stride_xh + wi * stride_xw
    tl.store(dx_ptrs, acc.to(dx_ptr.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------------------------
# host launchers
# ----------------------------------------------------------------------------------------------
_COMBINE_BLOCK_R = 64
_COMBINE_BLOCK_C = 32
_SUM_BLOCK_R = 64
_STAGE1_PROGRAMS_PER_SM = 8
_INTERP_STAGE1_PROGRAMS = 4  # interpreter: few programs (each costs ~13 ms); ITERS > 1 once there are > 4 tiles


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


def _grid(n: int, num_pb: int, c: int, block_c: int):
    """1-D grid (see ``program_tile``) and the number of channel blocks."""
    num_cb = triton.cdiv(c, block_c)
    return (n * num_pb * num_cb,), num_cb


@functools.cache
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _stage1_rows(tiles: int, c: int, block_c: int, device: torch.device) -> tuple[int, int]:
    """(rows, ITERS) for a stage-1 reduction over ``tiles`` tiles: about _STAGE1_PROGRAMS_PER_SM programs per SM
    in all (one wave, each walking ITERS consecutive tiles), so that the stage-2 kernel, one program per channel
    block, reads only a few thousand rows instead of N * num_pb (25k for a 112x112 layer at batch 256)."""
    if interpreting():
        target = _INTERP_STAGE1_PROGRAMS
    else:
        target = _STAGE1_PROGRAMS_PER_SM * _num_sms(
            device.index if device.index is not None else torch.cuda.current_device()
        )
    rows_wanted = max(1, target // triton.cdiv(c, block_c))
    iters = triton.cdiv(tiles, min(tiles, rows_wanted))
    return triton.cdiv(tiles, iters), iters


def _sum_rows(part: torch.Tensor, out: torch.Tensor, out2: torch.Tensor | None = None) -> None:
    """out (and out2) <- column sums of ``part`` [R, L]: out takes the first out.numel() columns, out2 the rest."""
    rows, length = part.shape
    block_l = 32 if not interpreting() else min(1024, triton.next_power_of_2(length))
    _sum_rows_kernel[(triton.cdiv(length, block_l),)](
        part, out, out if out2 is None else out2, rows, length, out.numel(), BLOCK_R=_SUM_BLOCK_R, BLOCK_L=block_l
    )


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
    n, c, h, w, ho, wo, cl = _geometry(x, k, stride, dilation)
    y = _new_like(x, (n, c, ho, wo))
    bp, bc = tile_sizes(ho * wo, c, cl)
    num_pb = triton.cdiv(ho * wo, bp)
    grid, num_cb = _grid(n, num_pb, c, bc)
    _fwd_kernel[grid](
        x, weight, mean, invstd, gamma, beta, y,
        c, h, w, ho, wo, num_pb, num_cb,
        *x.stride(), weight.stride(0), weight.stride(2), weight.stride(3), *y.stride(),
        K=k, STRIDE=stride, DIL=dilation, ACT=act_id(act), CHANNELS_LAST=cl,
        VEC=vec_width(cl, c, x, y), BLOCK_P=bp, BLOCK_C=bc,
    )  # fmt: skip
    return y


@on_tensor_device
def dwconv_bn_stats(
    x: torch.Tensor, weight: torch.Tensor, stride: int, dilation: int
) -> tuple[torch.Tensor, torch.Tensor]:
    k = _check(x, weight, stride, dilation)
    n, c, h, w, ho, wo, cl = _geometry(x, k, stride, dilation)
    bp, bc = tile_sizes(ho * wo, c, cl)
    num_pb = triton.cdiv(ho * wo, bp)
    rows, iters = _stage1_rows(n * num_pb, c, bc, x.device)
    mean_part = torch.empty((rows, c), dtype=torch.float32, device=x.device)
    m2_part = torch.empty_like(mean_part)
    count_part = torch.empty((rows,), dtype=torch.float32, device=x.device)
    num_cb = triton.cdiv(c, bc)
    _stats_partial_kernel[(rows * num_cb,)](
        x, weight, mean_part, m2_part, count_part,
        c, h, w, ho, wo, num_pb, num_cb, n * num_pb, iters,
        *x.stride(), weight.stride(0), weight.stride(2), weight.stride(3),
        K=k, STRIDE=stride, DIL=dilation, CHANNELS_LAST=cl,
        VEC=vec_width(cl, c, x), BLOCK_P=bp, BLOCK_C=bc,
    )  # fmt: skip
    mean = torch.empty((c,), dtype=torch.float32, device=x.device)
    var = torch.empty_like(mean)
    block_c = min(_COMBINE_BLOCK_C, triton.next_power_of_2(c))
    _stats_combine_kernel[(triton.cdiv(c, block_c),)](
        mean_part, m2_part, count_part, mean, var, rows, c, BLOCK_R=_COMBINE_BLOCK_R, BLOCK_C=block_c
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
    bp, bc = tile_sizes(ho * wo, c, cl)
    num_pb = triton.cdiv(ho * wo, bp)
    rows, iters = _stage1_rows(n * num_pb, c, bc, x.device)
    part = torch.empty((rows, 2 * c), dtype=torch.float32, device=x.device)
    num_cb = triton.cdiv(c, bc)
    _bwd_reduce_partial_kernel[(rows * num_cb,)](
        grad_y, x, weight, mean, invstd, gamma, beta, part,
        c, h, w, ho, wo, num_pb, num_cb, n * num_pb, iters,
        *grad_y.stride(), *x.stride(), weight.stride(0), weight.stride(2), weight.stride(3),
        K=k, STRIDE=stride, DIL=dilation, ACT=act_id(act), CHANNELS_LAST=cl,
        VEC=vec_width(cl, c, grad_y, x), BLOCK_P=bp, BLOCK_C=bc,
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
    bp, bc = tile_sizes(ho * wo, c, cl)
    num_pb = triton.cdiv(ho * wo, bp)
    dz = _new_like(x, (n, c, ho, wo), torch.float32)
    rows, iters = _stage1_rows(n * num_pb, c, bc, x.device)
    dw_part = torch.empty((rows, c * k * k), dtype=torch.float32, device=x.device)
    num_cb = triton.cdiv(c, bc)
    _bwd_dz_kernel[(rows * num_cb,)](
        grad_y, x, weight, mean, invstd, gamma, beta, mean_g, mean_g_xhat, dz, dw_part,
        c, h, w, ho, wo, num_pb, num_cb, n * num_pb, iters,
        *grad_y.stride(), *x.stride(), weight.stride(0), weight.stride(2), weight.stride(3), *dz.stride(),
        K=k, STRIDE=stride, DIL=dilation, ACT=act_id(act), CHANNELS_LAST=cl,
        VEC=vec_width(cl, c, grad_y, x, dz), BLOCK_P=bp, BLOCK_C=bc,
    )  # fmt: skip
    dx = _new_like(x, (n, c, h, w))
    bp_in, bc_in = tile_sizes(h * w, c, cl)
    num_pb_in = triton.cdiv(h * w, bp_in)
    grid, num_cb_in = _grid(n, num_pb_in, c, bc_in)
    _bwd_dx_kernel[grid](
        dz, weight, dx,
        c, h, w, ho, wo, num_pb_in, num_cb_in,
        *dz.stride(), weight.stride(0), weight.stride(2), weight.stride(3), *dx.stride(),
        K=k, STRIDE=stride, DIL=dilation, CHANNELS_LAST=cl,
        VEC=vec_width(cl, c, dz, dx), BLOCK_P=bp_in, BLOCK_C=bc_in,
    )  # fmt: skip
    # dweight stage 2: deterministic column sums of the [R, C*K*K] partials, stored in weight's dtype.
    dweight = torch.empty(weight.shape, dtype=weight.dtype, device=weight.device)
    _sum_rows(dw_part, dweight.view(-1))
    return dx, dweight
