"""Squeeze-excitation primitives in Triton (``docs/op_contract.md``): ``se_pool``, ``se_scale``,
``se_bwd_reduce``, ``se_bwd_apply``. The two FCs run in PyTorch on [N, C] tensors between them.

Order: ``@triton.jit`` kernels, then host launchers. Tiles are BLOCK_P pixels (flattened ``h * W + w``) by
BLOCK_C channels oriented for the memory format (see ``triton_kernels.tile_offsets``); image bases are int64.
Reductions (pool, bwd_reduce) give one program per (n, channel block) that walks the image's pixels in a fixed
order at a fixed warp count
(``NUM_WARPS``): deterministic, one launch, no partial buffers. Elementwise passes (scale, bwd_apply) tile
(n, pixels, channels) on a 1-D grid, channel blocks fastest (``triton_kernels.program_tile``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from mnet_ext.reference import memory_format_of

from . import (
    NUM_WARPS,
    cdiv,
    hint_multiple,
    on_tensor_device,
    program_tile,
    sum_pixels,
    tile_offsets,
    tile_sizes,
    vec_width,
)


# ----------------------------------------------------------------------------------------------
# kernels
# ----------------------------------------------------------------------------------------------
@triton.jit
def _pixel_offset(p, W, stride_h, stride_w, DENSE_HW: tl.constexpr):
    """Element offset of flattened pixel ``p`` (= h * W + w): ``p * stride_w`` where rows lie back to back
    (DENSE_HW: stride_h == W * stride_w, both contiguous layouts), which saves a division per element."""
    if DENSE_HW:
        return p * stride_w
    return (p // W) * stride_h + (p % W) * stride_w


@triton.jit
def _se_reduce_kernel(
    a_ptr,  # x (pool) or grad_y (bwd_reduce): [N, C, H, W], any strides, fp32/fp16/bf16
    b_ptr,  # x for bwd_reduce (same shape as a); unused when PRODUCT is false
    out_ptr,  # out: [N, C] fp32 contiguous
    C,  # channels
    H,  # input height
    W,  # input width
    scale,  # multiplier of the sum: 1 / (H * W) for the mean, 1 for the sum
    stride_an,  # strides of a: image, channel, row, column
    stride_ac,
    stride_ah,
    stride_aw,
    stride_bn,  # strides of b
    stride_bc,
    stride_bh,
    stride_bw,
    PRODUCT: tl.constexpr,  # False: sum a (pool); True: sum a * b (bwd_reduce)
    DENSE_HW: tl.constexpr,  # every tensor's rows lie back to back (stride_h == W * stride_w): see _pixel_offset
    CHANNELS_LAST: tl.constexpr,  # tile orientation (contiguous axis last)
    VEC: tl.constexpr,  # host-checked power of two dividing C and the n/h/w strides (1 for NCHW)
    BLOCK_P: tl.constexpr,  # pixels per tile
    BLOCK_C: tl.constexpr,  # channels per tile
):
    """out[n, c] = scale * sum_{h, w} a[n, c, h, w] (* b[n, c, h, w]). Program (n, channel block) accumulates
    a whole tile per step in fp32 and reduces it once at the end."""
    C = hint_multiple(C, VEC)
    stride_an = hint_multiple(stride_an, VEC)
    stride_ah = hint_multiple(stride_ah, VEC)
    stride_aw = hint_multiple(stride_aw, VEC)
    stride_bn = hint_multiple(stride_bn, VEC)
    stride_bh = hint_multiple(stride_bh, VEC)
    stride_bw = hint_multiple(stride_bw, VEC)
    n = tl.program_id(0).to(tl.int64)
    offs_p, offs_c = tile_offsets(0, tl.program_id(1), BLOCK_P, BLOCK_C, CHANNELS_LAST)
    cmask = offs_c < C
    a_img = a_ptr + n * stride_an + offs_c * stride_ac
    b_img = b_ptr + n * stride_bn + offs_c * stride_bc
    acc = tl.zeros((offs_p + offs_c).shape, dtype=tl.float32)
    for p0 in range(0, H * W, BLOCK_P):
        p = p0 + offs_p
        mask = (p < H * W) & cmask
        v = tl.load(a_img + _pixel_offset(p, W, stride_ah, stride_aw, DENSE_HW), mask=mask, other=0.0)
        v = v.to(tl.float32)
        if PRODUCT:
            b = tl.load(b_img + _pixel_offset(p, W, stride_bh, stride_bw, DENSE_HW), mask=mask, other=0.0)
            v *= b.to(tl.float32)
        acc += v
    tl.store(out_ptr + n * C + offs_c, sum_pixels(acc, CHANNELS_LAST) * scale, mask=cmask)


@triton.jit
def _se_apply_kernel(
    g_ptr,  # x (se_scale) or grad_y (se_bwd_apply): [N, C, H, W], any strides
    s_ptr,  # [N, C] fp32 contiguous: the gate
    d_ptr,  # [N, C] fp32 contiguous: dpooled (only when HAS_BIAS)
    out_ptr,  # out: [N, C, H, W], dtype and memory format of g
    C,  # channels
    H,  # input height
    W,  # input width
    inv_hw,  # 1 / (H * W)
    num_pb,  # pixel blocks per image: cdiv(H * W, BLOCK_P)
    num_cb,  # channel blocks: cdiv(C, BLOCK_C)
    stride_gn,  # grad_y strides: image, channel, row, column
    stride_gc,
    stride_gh,
    stride_gw,
    stride_on,  # out strides
    stride_oc,
    stride_oh,
    stride_ow,
    HAS_BIAS: tl.constexpr,  # False: out = g * s (se_scale); True: out = g * s + d / (H*W) (se_bwd_apply)
    DENSE_HW: tl.constexpr,  # g's and out's rows lie back to back (stride_h == W * stride_w): see _pixel_offset
    CHANNELS_LAST: tl.constexpr,  # tile orientation (contiguous axis last)
    VEC: tl.constexpr,  # host-checked power of two dividing C and the n/h/w strides (1 for NCHW)
    BLOCK_P: tl.constexpr,  # pixels per tile
    BLOCK_C: tl.constexpr,  # channels per tile
):
    """Elementwise out = g * s[n, c] (+ dpooled[n, c] / (H * W)), fp32 math, one tile per program."""
    C = hint_multiple(C, VEC)
    stride_gn = hint_multiple(stride_gn, VEC)
    stride_gh = hint_multiple(stride_gh, VEC)
    stride_gw = hint_multiple(stride_gw, VEC)
    stride_on = hint_multiple(stride_on, VEC)
    stride_oh = hint_multiple(stride_oh, VEC)
    stride_ow = hint_multiple(stride_ow, VEC)
    n, pb, cb, row = program_tile(num_pb, num_cb)
    n = n.to(tl.int64)
    offs_p, offs_c = tile_offsets(pb, cb, BLOCK_P, BLOCK_C, CHANNELS_LAST)
    cmask = offs_c < C
    mask = (offs_p < H * W) & cmask
    s = tl.load(s_ptr + n * C + offs_c, mask=cmask, other=0.0).to(tl.float32)
    g_pix = _pixel_offset(offs_p, W, stride_gh, stride_gw, DENSE_HW)
    g = tl.load(g_ptr + n * stride_gn + offs_c * stride_gc + g_pix, mask=mask, other=0.0)
    out = g.to(tl.float32) * s
    if HAS_BIAS:
        out += tl.load(d_ptr + n * C + offs_c, mask=cmask, other=0.0).to(tl.float32) * inv_hw
    out_ptrs = out_ptr + n * stride_on + offs_c * stride_oc + _pixel_offset(offs_p, W, stride_oh, stride_ow, DENSE_HW)
    tl.store(out_ptrs, out.to(out_ptr.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------------------------
# host launchers
# ----------------------------------------------------------------------------------------------
def _check_act(x: torch.Tensor, name: str) -> None:
    if x.dim() != 4:
        raise ValueError(f"{name}: expected [N, C, H, W], got shape {tuple(x.shape)}")
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"{name}: expected fp32/fp16/bf16, got {x.dtype}")
    if x[0].numel() >= 2**31:
        raise ValueError(f"{name}: one image must hold fewer than 2^31 elements (per-image offsets are int32)")


def _check_nc(v: torch.Tensor, x: torch.Tensor, name: str) -> None:
    if tuple(v.shape) != tuple(x.shape[:2]) or not v.is_contiguous():
        raise ValueError(f"{name}: expected a contiguous [N, C] = {tuple(x.shape[:2])} tensor, got {tuple(v.shape)}")


def _dense_hw(*tensors: torch.Tensor) -> bool:
    """Every tensor's rows lie back to back (a pixel's offset is (h * W + w) * stride_w): both contiguous layouts;
    a one-row image always."""
    return all(t.shape[2] == 1 or t.stride(2) == t.shape[3] * t.stride(3) for t in tensors)


def _maxnreg(x: torch.Tensor) -> int | None:
    """Register limit (PTX .maxnreg) of both kernels: 255 for fp16 NCHW, else ptxas's own choice. Left to itself
    ptxas holds fp16 NCHW tiles (scalar loads, 16-32 per thread) at 80 or 96 registers and spills (sm_80 and
    sm_90: bwd_reduce 40-180 bytes on the 28 x 28 / 56 x 56 layers, se_scale 24-36 on 7 x 7, bwd_apply 4-32 on
    14 x 14); under 255 it takes 56-247 with no spill and 0-7 fewer SASS instructions per element. The other dtypes
    and channels_last do not spill at ptxas's choice, which keeps more blocks per SM."""
    return 255 if x.dtype == torch.float16 and memory_format_of(x) != torch.channels_last else None


def _reduce(a: torch.Tensor, b: torch.Tensor | None, scale: float) -> torch.Tensor:
    n, c, h, w = a.shape
    cl = memory_format_of(a) == torch.channels_last
    bp, bc = tile_sizes(h * w, c, cl)
    out = torch.empty((n, c), dtype=torch.float32, device=a.device)
    bb = a if b is None else b
    _se_reduce_kernel[(n, cdiv(c, bc))](
        a, bb, out, c, h, w, scale, *a.stride(), *bb.stride(),
        PRODUCT=b is not None, DENSE_HW=_dense_hw(a, bb), CHANNELS_LAST=cl, VEC=vec_width(cl, c, a, bb),
        BLOCK_P=bp, BLOCK_C=bc, num_warps=NUM_WARPS, maxnreg=_maxnreg(a),
    )  # fmt: skip
    return out


def _apply(g: torch.Tensor, s: torch.Tensor, d: torch.Tensor | None) -> torch.Tensor:
    n, c, h, w = g.shape
    cl = memory_format_of(g) == torch.channels_last
    bp, bc = tile_sizes(h * w, c, cl)
    num_pb = cdiv(h * w, bp)
    out = torch.empty(g.shape, dtype=g.dtype, device=g.device, memory_format=memory_format_of(g))
    num_cb = cdiv(c, bc)
    _se_apply_kernel[(n * num_pb * num_cb,)](
        g, s, s if d is None else d, out, c, h, w, 1.0 / (h * w), num_pb, num_cb, *g.stride(), *out.stride(),
        HAS_BIAS=d is not None, DENSE_HW=_dense_hw(g, out), CHANNELS_LAST=cl, VEC=vec_width(cl, c, g, out),
        BLOCK_P=bp, BLOCK_C=bc, num_warps=NUM_WARPS, maxnreg=_maxnreg(g),
    )  # fmt: skip
    return out


@on_tensor_device
def se_pool(x: torch.Tensor) -> torch.Tensor:
    """Per-(n, c) spatial mean, fp32 [N, C]."""
    _check_act(x, "x")
    return _reduce(x, None, 1.0 / (x.shape[2] * x.shape[3]))


@on_tensor_device
def se_scale(x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """y = x * s[n, c]; s is the fp32 [N, C] gate."""
    _check_act(x, "x")
    _check_nc(s, x, "s")
    return _apply(x, s, None)


@on_tensor_device
def se_bwd_reduce(grad_y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Per-(n, c) sum over H, W of grad_y * x, fp32 [N, C]."""
    _check_act(grad_y, "grad_y")
    _check_act(x, "x")
    if grad_y.shape != x.shape:
        raise ValueError(f"grad_y: expected the shape of x {tuple(x.shape)}, got {tuple(grad_y.shape)}")
    return _reduce(grad_y, x, 1.0)


@on_tensor_device
def se_bwd_apply(grad_y: torch.Tensor, s: torch.Tensor, dpooled: torch.Tensor) -> torch.Tensor:
    """dx = grad_y * s[n, c] + dpooled[n, c] / (H * W); s, dpooled fp32 [N, C]."""
    _check_act(grad_y, "grad_y")
    _check_nc(s, grad_y, "s")
    _check_nc(dpooled, grad_y, "dpooled")
    return _apply(grad_y, s, dpooled)
