"""Triton-specific checks the generic backend tests do not cover: the tile-size heuristic, grids with several
pixel and channel blocks (partial tiles on both axes), the multi-chunk paths of the deterministic second stages,
numerically hard statistics, bitwise determinism and ``unavailable_reason``.

Small tiles are forced by patching the module constants, so the interpreter (CPU) runs few, cheap programs.
"""

from __future__ import annotations

import os

import pytest
import torch
import triton  # required: a missing Triton fails these tests, it does not skip them
import triton.language as tl

import mnet_ext.triton_kernels as triton_kernels
import mnet_ext.triton_kernels.dwconv_bn_act as tdw
import mnet_ext.triton_kernels.squeeze_excite as tse
from mnet_ext import reference as ref
from mnet_ext.backends import triton as backend
from mnet_ext.triton_kernels.activations import ACT_IDS, act_bwd, act_fwd
from tests.helpers import assert_close_scaled

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = [] if DEVICE == "cuda" else [pytest.mark.triton_interp]
if DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
    pytestmark.append(pytest.mark.skip(reason="CPU tensors need TRITON_INTERPRET=1 (set by tests/conftest.py)"))


@pytest.fixture
def small_tiles(monkeypatch):
    """Depthwise tiles of at most 32 (channels_last: 4 groups x 8 channels) or 8 (NCHW) groups x channels, SE tiles
    of 16 pixels, and second stages folding 2 rows per chunk: tiny shapes then span several blocks on every axis."""
    monkeypatch.setattr(triton_kernels, "_TILE_ELEMS", 64)
    monkeypatch.setattr(triton_kernels, "_NCHW_BLOCK_P", 16)
    monkeypatch.setattr(triton_kernels, "_DW_NHWC_SLOTS", 32)
    monkeypatch.setattr(triton_kernels, "_DW_NCHW_SLOTS", 8)
    monkeypatch.setattr(tdw, "_COMBINE_BLOCK_R", 2)
    monkeypatch.setattr(tdw, "_SUM_BLOCK_R", 2)
    # stage-1 reductions: a few rows of several tiles each, with a short tail
    monkeypatch.setattr(tdw, "_INTERP_STAGE1_PROGRAMS", 6)
    # dw_tile is cached: no plan made with the real slot counts may serve these tests, nor theirs the others
    triton_kernels.dw_tile.cache_clear()
    yield
    triton_kernels.dw_tile.cache_clear()


def _inputs(n, c, h, w, k, stride, dilation, dtype, channels_last, offset=0.0):
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = (torch.randn(n, c, h, w) + offset).to(DEVICE, dtype).contiguous(memory_format=fmt)
    weight = (torch.randn(c, 1, k, k) / k).to(DEVICE, dtype)
    ho, wo = ref.output_hw(h, w, k, stride, dilation)
    grad_y = torch.randn(n, c, ho, wo).to(DEVICE, dtype).contiguous(memory_format=fmt)
    vec = {name: v.to(DEVICE) for name, v in zip(
        ("mean", "invstd", "gamma", "beta", "mean_g", "mean_g_xhat"),
        (0.1 * torch.randn(c), torch.rand(c) + 0.5, torch.randn(c), torch.randn(c), 0.1 * torch.randn(c),
         0.1 * torch.randn(c)), strict=True,
    )}  # fmt: skip
    return x, weight, grad_y, vec


@pytest.mark.parametrize("channels", [1, 5, 16, 24, 40, 72, 120, 960])
def test_pick_block_c_keeps_lanes_busy(channels):
    b = triton_kernels.pick_block_c(channels)
    assert b in (1, 2, 4, 8, 16, 32, 64) and b <= triton_kernels.next_pow2(channels)
    assert channels / (-(-channels // b) * b) >= 0.6  # never more than 40% of lanes masked
    assert triton_kernels.pick_block_c(72) == 16 and triton_kernels.pick_block_c(960) == 64


def test_tile_sizes_orientation():
    bp, bc = triton_kernels.tile_sizes(112 * 112, 32, channels_last=True)
    assert (bp, bc) == (128, 32)  # channels contiguous: 32 channels x 128 pixels
    bp, bc = triton_kernels.tile_sizes(112 * 112, 32, channels_last=False)
    assert (bp, bc) == (1024, 4)  # pixels contiguous: long pixel runs
    assert triton_kernels.tile_sizes(49, 5, True) == (64, 8)  # tiny shapes: one tile per image


def test_stage1_rows(small_tiles):
    """The multi-block tests below really walk several tiles per stage-1 program, with a short tail; the row count
    depends on the shape alone (not on the GPU), so the sums are the same on every GPU."""
    if DEVICE == "cpu":
        assert tdw._stage1_rows(8, 5, 4) == (3, 3)  # 8 tiles: rows of 3, 3, 2
    rows, iters = tdw._stage1_rows(256 * 98, 32, 32)
    assert rows * iters >= 256 * 98 and (rows - 1) * iters < 256 * 98


# The MobileNet output sizes (stride 1 and 2 layers) and channel counts.
@pytest.mark.parametrize("hw", [112, 56, 28, 14, 7])
@pytest.mark.parametrize("channels", [16, 72, 120, 960])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("k", [3, 5, 7])
@pytest.mark.parametrize("shared_rows", [False, True], ids=["rows1", "shared_rows"])
def test_dw_tile_keeps_lanes_busy(hw, channels, channels_last, k, shared_rows):
    t = triton_kernels.dw_tile(hw, hw, channels, channels_last, k, shared_rows=shared_rows)
    if t.rows == 1:
        ow_max = hw if hw <= 7 and k <= 5 else triton_kernels._DW_OW_MAX["fwd"][k]  # one group per row of 7 columns
    else:  # multi-row groups: the forward at stride 1, channels_last, K <= 5 only
        assert shared_rows and channels_last and t.rows == triton_kernels._DW_FWD_ROWS, t
        narrow_wo, narrow_ow = triton_kernels._DW_FWD_ROWS_OW_NARROW.get(k, (0, 0))
        ow_max = narrow_ow if hw <= narrow_wo else triton_kernels._DW_FWD_ROWS_OW_MAX[k]
    assert 1 <= t.ow <= ow_max and t.groups_per_row == -(-hw // t.ow)
    row_groups = -(-hw // t.rows)
    assert t.num_gb == -(-row_groups * t.groups_per_row // t.block_g)
    slots = t.block_g * t.block_c
    assert slots <= (triton_kernels._DW_NHWC_SLOTS if channels_last else triton_kernels._DW_NCHW_SLOTS)
    if channels_last:
        assert t.block_c % 8 == 0  # 16-byte bf16 vectors
    busy = hw * hw * channels / (t.num_gb * t.block_g * t.rows * t.ow * -(-channels // t.block_c) * t.block_c)
    if k <= 5:  # the forward counts the lanes of a warp without a slot as idle too (K = 7: see dw_tile)
        busy *= min(1.0, slots / (8 if channels_last else 2) / 32)
    # no quarter of the lanes idle, 28x28 and 14x14 NCHW included; a 7 x 7 image of 16 channels holds 14 8-channel
    # vectors (a warp has 32 lanes), and 72 channels pad to 96 in the blocks that fill a warp
    floor = 0.8 if hw > 7 or channels >= 120 or not channels_last else 0.4
    assert busy >= floor, t
    assert t.num_warps == max(1, min(4, slots // (8 if channels_last else 2) // 32))
    assert triton_kernels.dw_tile(hw, hw, channels, channels_last, k, shared_rows=shared_rows) == t  # of the shape


def _mobilenet_dw_outputs() -> list[tuple[int, int, int, int]]:
    """(Ho, Wo, C, K) of every unique MobileNet depthwise layer, and K = 7 on the K = 5 shapes."""
    from mnet_ext.layers import MODEL_BUILDERS, unique_layers

    out = set()
    for cfg in unique_layers(tuple(MODEL_BUILDERS)):
        if cfg.kind == "dwconv_bn_act":
            for k in {cfg.kernel_size, 7 if cfg.kernel_size == 5 else cfg.kernel_size}:
                out.add((*ref.output_hw(cfg.height, cfg.width, k, cfg.stride, cfg.dilation), cfg.channels, k))
    return sorted(out)


def test_dw_tile_fills_a_warp_on_7_wide_images():
    """V3's K = 5 layers with 7 x 7 outputs: the forward takes one group of 7 columns per row and at least a warp of
    threads with 8 channels each (the former OW = 4 + 3 tiles of 2 groups x 32 channels kept 8 of 32 lanes busy:
    162 SASS instructions per output in the static report)."""
    for c in (288, 576, 672, 960):
        t = triton_kernels.dw_tile(7, 7, c, True, 5)
        assert t.ow == 7 and t.block_g * t.block_c // 8 >= 32, (c, t)
    for ho, wo, c, k in _mobilenet_dw_outputs():
        for cl in (True, False):
            if k == 7:
                continue  # K = 7 keeps the former tiles (fp32 spills, see dw_tile)
            t = triton_kernels.dw_tile(ho, wo, c, cl, k)
            assert t.block_g * t.block_c // (8 if cl else 2) >= 32, (ho, wo, c, k, cl, t)


def test_dw_tile_reduce_nhwc_block_c():
    """The channels_last reductions take 128-channel blocks only in one-warp tiles (more warps spill on sm_90, see
    ``dw_tile``), on every MobileNet layer: the static report's spill gate checks the compiled result."""
    for ho, wo, c, k in _mobilenet_dw_outputs():
        if k < 7:  # K = 7 reductions hold 2 slots per thread, not 8 channels
            t = triton_kernels.dw_tile(ho, wo, c, True, k, "reduce")
            assert t.block_c <= 64 or t.block_g * t.block_c // 8 <= 32, (ho, wo, c, k, t)


def test_dw_tile_reduce_fp32_one_vector_per_thread():
    """fp32 channels_last reductions hold one 16-byte vector (4 channels) per thread, not 8 channels (48 bytes of
    spill on sm_90 at stride 2, K = 3), within the fixed 4 warps; bf16/fp16 keep 8."""
    for ho, wo, c, k in _mobilenet_dw_outputs():
        if k < 7:
            for elem_bytes, vec in ((4, 4), (2, 8)):
                t = triton_kernels.dw_tile(ho, wo, c, True, k, "reduce", elem_bytes=elem_bytes)
                per_thread = t.block_g * t.block_c / (t.num_warps * 32)
                assert per_thread <= vec and t.num_warps <= triton_kernels.NUM_WARPS, (ho, wo, c, k, elem_bytes, t)


# Each case spans several group blocks per image and several channel blocks, with groups of OW > 1 outputs whose
# windows cross the image edges (the halo); C = 20 (channels_last: VEC 4, not a multiple of the 8-channel vector)
# and C = 5 / 6 leave a partial channel block; Wo not a multiple of OW leaves a partial last group per row.
GEOMETRY = [
    # k, stride, dilation, act, channels_last, C, H, W
    (3, 1, 1, "relu6", False, 5, 5, 8),
    (3, 2, 2, "silu", True, 20, 5, 9),
    (5, 2, 1, "hardswish", True, 20, 5, 9),
    (5, 2, 2, "none", False, 5, 5, 17),
    (5, 1, 1, "relu", False, 5, 9, 7),  # NCHW groups of 7 columns: the forward's plain loads at dilation 1
    # K = 7 costs 35-95 s each in the interpreter: the exhaustive run keeps it (the tile and halo logic does not
    # depend on K beyond the window width, which the K = 5 cases and tests/test_dwconv_bn_act.py's K = 7 cover).
    pytest.param(7, 1, 2, "relu", True, 20, 6, 5, marks=pytest.mark.exhaustive),
    pytest.param(7, 1, 1, "hardswish", False, 6, 6, 5, marks=pytest.mark.exhaustive),
]


def _check_geometry(k, stride, dilation, channels_last, c, h, w):
    ho, wo = ref.output_hw(h, w, k, stride, dilation)
    t = triton_kernels.dw_tile(ho, wo, c, channels_last, k)
    assert t.ow > 1 and t.num_gb > 1 and -(-c // t.block_c) > 1, t  # the test exercises what it claims


@pytest.mark.parametrize("k, stride, dilation, act, channels_last, c, h, w", GEOMETRY)
def test_dwconv_multi_block(small_tiles, k, stride, dilation, act, channels_last, c, h, w):
    _check_geometry(k, stride, dilation, channels_last, c, h, w)
    x, weight, grad_y, v = _inputs(2, c, h, w, k, stride, dilation, torch.float32, channels_last)
    bn = (v["mean"], v["invstd"], v["gamma"], v["beta"])
    args = (x, weight, *bn, stride, dilation, act)
    assert_close_scaled(tdw.dwconv_bn_act_fwd(*args), ref.dwconv_bn_act_fwd(*args), torch.float32, "fwd")
    for got, want in zip(
        tdw.dwconv_bn_stats(x, weight, stride, dilation), ref.dwconv_bn_stats(x, weight, stride, dilation), strict=True
    ):
        assert_close_scaled(got, want, torch.float32, "stats")
    red = (grad_y, x, weight, *bn, stride, dilation, act)
    for got, want in zip(tdw.dwconv_bn_act_bwd_reduce(*red), ref.dwconv_bn_act_bwd_reduce(*red), strict=True):
        assert_close_scaled(got, want, torch.float32, "bwd_reduce")
    app = (grad_y, x, weight, *bn, v["mean_g"], v["mean_g_xhat"], stride, dilation, act)
    for got, want in zip(tdw.dwconv_bn_act_bwd_apply(*app), ref.dwconv_bn_act_bwd_apply(*app), strict=True):
        assert_close_scaled(got, want, torch.float32, "bwd_apply")


@pytest.mark.parametrize("k, act, dtype", [(3, "relu6", torch.float16), (5, "hardswish", torch.bfloat16)])
def test_fwd_shared_rows(small_tiles, monkeypatch, k, act, dtype):
    """The forward's groups of two output rows (channels_last, stride 1: each converted input row feeds both rows)
    on an odd number of rows (the last group's second row lies past Ho and must not be stored), several group and
    channel blocks, C = 20 (VEC 4) and a partial last group per row: y matches the reference, and matches bitwise
    the one-row groups (per output the taps add in the same (kh, kw) order, so bwd_reduce and the backward apply,
    which recompute z with one-row groups, see the same z). bf16 runs ``_load_f32``'s bit-level widening. (fp32
    keeps one-row groups: no conversion to share.)"""
    c, h, w = 20, 7, 17
    ho, wo = ref.output_hw(h, w, k, 1, 1)
    t = triton_kernels.dw_tile(ho, wo, c, True, k, shared_rows=True)
    assert t.rows == 2 and ho % 2 and wo % t.ow and t.num_gb > 1 and -(-c // t.block_c) > 1, t
    x, weight, _, v = _inputs(2, c, h, w, k, 1, 1, dtype, True)
    args = (x, weight, v["mean"], v["invstd"], v["gamma"], v["beta"], 1, 1, act)
    got = tdw.dwconv_bn_act_fwd(*args)
    assert_close_scaled(got, ref.dwconv_bn_act_fwd(*args), dtype, "fwd")
    real_tile = tdw.dw_tile
    monkeypatch.setattr(tdw, "dw_tile", lambda *a, shared_rows=False, **kw: real_tile(*a, **kw))
    assert torch.equal(got, tdw.dwconv_bn_act_fwd(*args))


# Eval forward on the tensor cores (``_fwd_dot_kernel``). On CPU tensors the interpreter runs it in fp16 only
# (Triton 3.8's interpreter computes bf16 tl.dot wrongly), and it runs the TMA boxes (tensor descriptors) as numpy
# slices with zero fill: these tests check the kernel's math, tiling and dispatch, not the TMA hardware, nor the
# wgmma fragment layouts; bf16 is covered by the dispatch tests here and, on a GPU, by the CUDA-marked test below.
DOT_GEOMETRY = [
    # k, stride, act, N, C, H, W
    (3, 1, "relu6", 2, 16, 9, 11),
    (3, 2, "relu", 3, 8, 10, 9),  # K = 3 at stride 2: two boxes per kernel row (WA = 8, W1 = 2)
    (5, 1, "hardswish", 2, 16, 7, 6),
    (5, 2, "silu", 2, 8, 9, 13),  # odd H at stride 2: the odd-row descriptor has one row fewer
    (7, 1, "none", 1, 8, 8, 9),
    (7, 2, "relu", 1, 8, 11, 10),
]


@pytest.fixture
def small_dot_tiles(monkeypatch):
    """Tiles of 16 output rows (the smallest tl.dot M) of 4 columns: tiny images span several tiles in rows, columns
    and images."""
    monkeypatch.setattr(tdw, "_DOT_MIN_M", 16)
    monkeypatch.setattr(tdw, "_DOT_OUTPUTS", 16 * 4 * 8)
    tdw._dot_tile.cache_clear()  # tiles are cached per shape
    yield
    tdw._dot_tile.cache_clear()


def _dot_spy(monkeypatch) -> list:
    """Records each call of the tensor-core forward's launcher."""
    calls = []
    real = tdw._fwd_dot
    monkeypatch.setattr(tdw, "_fwd_dot", lambda *a: calls.append(a) or real(*a))
    return calls


def _dot_case(monkeypatch, k, stride, act, n, c, h, w, poison=None):
    """(got, want) of the eval forward in fp16 channels_last, after checking it took the tensor-core path."""
    x, weight, _, v = _inputs(n, c, h, w, k, stride, 1, torch.float16, True)
    if poison is not None:
        x[n - 1, c // 2, h // 2, w // 2] = poison  # one value of one channel
    args = (x, weight, v["mean"], v["invstd"], v["gamma"], v["beta"], stride, 1, act)
    calls = _dot_spy(monkeypatch)
    got = tdw.dwconv_bn_act_fwd_eval(*args)
    assert len(calls) == (1 if DEVICE == "cpu" or torch.cuda.get_device_capability()[0] >= 9 else 0)
    assert got.is_contiguous(memory_format=torch.channels_last)
    return got, ref.dwconv_bn_act_fwd(*args)


@pytest.mark.parametrize("k, stride, act, n, c, h, w", DOT_GEOMETRY)
@pytest.mark.parametrize("tiles", ["small", "default"])
def test_fwd_dot_matches_reference(request, monkeypatch, tiles, k, stride, act, n, c, h, w):
    """fp16 against the reference at fp16's rounding tolerance (fp32 accumulation of exact products; one rounding of
    y): with small tiles every case spans several row or image blocks, column blocks and channel blocks, with
    partial tiles at the bottom and right edges (TMA zero fill and clipped stores)."""
    if tiles == "small":
        request.getfixturevalue("small_dot_tiles")
    ho, wo = ref.output_hw(h, w, k, stride, 1)
    t = tdw._dot_tile(n, ho, wo, k, stride)
    if tiles == "small":
        assert t.nb * t.rh == 16 and (ho % t.rh or n % t.nb) and wo % t.g and wo > t.g, t
        assert (t.w1 > 0) == (k == 3 and stride == 2), t  # both box layouts are covered
    got, want = _dot_case(monkeypatch, k, stride, act, n, c, h, w)
    assert_close_scaled(got, want, torch.float16, "fwd (tensor cores)")


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # numpy's 0 * inf (interpreter)
@pytest.mark.parametrize("poison", [float("inf"), float("-inf"), float("nan")], ids=["inf", "-inf", "nan"])
@pytest.mark.parametrize("k, stride", [(3, 1), (3, 2), (5, 2)])
def test_fwd_dot_non_finite_input_stays_in_its_channel(monkeypatch, small_dot_tiles, poison, k, stride):
    """One Inf/-Inf/NaN in one channel: B's zeros times it make NaN across its 8-channel group; the NaN tile is
    recomputed exactly, so y is non-finite exactly where the reference's is (with the same infinities) and equal
    elsewhere. (Fails with the NaN probe disabled: the group's other channels come out NaN.)"""
    got, want = _dot_case(monkeypatch, k, stride, "none", 2, 16, 9, 10, poison)
    assert not torch.isfinite(want).all() and torch.isfinite(want[:, :8]).all()
    assert_close_scaled(got, want, torch.float16, "fwd (tensor cores), non-finite input")


def test_fwd_dot_dispatch(monkeypatch):
    """Which eval forward runs: the tensor cores only for bf16/fp16 channels_last, C % 8 == 0, dilation 1, on an
    sm_90+ GPU (meta tensors stand for its tensors, as in the static report); under the interpreter in fp16 only."""
    import types

    monkeypatch.setattr(tdw, "_gpu_arch", tdw._gpu_arch.__wrapped__)  # uncached: props changes per call

    def supported(dtype=torch.bfloat16, c=16, h=9, w=9, k=3, stride=1, dilation=1, cl=True, major=9, device="meta"):
        props = types.SimpleNamespace(major=major, minor=0)
        monkeypatch.setattr(torch.cuda, "get_device_properties", lambda *a: props)
        monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
        fmt = torch.channels_last if cl else torch.contiguous_format
        x = torch.empty((2, c, h, w), dtype=dtype, device=device, memory_format=fmt)
        y = torch.empty((2, c, *ref.output_hw(h, w, k, stride, dilation)), dtype=dtype, device=device,
                        memory_format=fmt)
        return tdw._dot_fwd_supported(x, y, k, stride, dilation)

    assert supported() and supported(torch.float16, k=5, stride=2) and supported(k=7) and supported(major=10)
    assert not supported(major=8)  # no TMA
    assert not supported(torch.float32)  # would need TF32
    assert not supported(cl=False) and not supported(c=12) and not supported(dilation=2)
    assert not supported(stride=2, h=1)
    assert supported(torch.float16, device="cpu") == (DEVICE == "cpu")  # the interpreter
    assert not supported(torch.bfloat16, device="cpu")  # its bf16 tl.dot is wrong


def test_fwd_dot_eval_only(monkeypatch):
    """The eval op runs the tensor cores; the training forward applies with ``_fwd_kernel`` (its z is the one its
    statistics and the backward recompute)."""
    from mnet_ext.ops import dwconv_bn_act as dw_ops

    x, weight, _, v = _inputs(2, 16, 6, 6, 3, 1, 1, torch.float16, True)
    calls = _dot_spy(monkeypatch)
    dw_ops.eval_forward(x, weight, v["mean"], v["invstd"], v["gamma"], v["beta"], 1, 1, "relu", "triton")
    expected = 1 if DEVICE == "cpu" or torch.cuda.get_device_capability()[0] >= 9 else 0
    assert len(calls) == expected
    dw_ops.train_forward(x, weight, v["gamma"], v["beta"], 1e-5, 1, 1, "relu", "triton")
    assert len(calls) == expected


@pytest.mark.skipif(DEVICE != "cuda", reason="bf16 tl.dot needs a GPU (the interpreter's is wrong)")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_fwd_dot_mobilenet_layers_gpu(monkeypatch, dtype):
    """Every MobileNet depthwise layer shape (and K = 7 on the K = 5 shapes), at both strides, at the tiles the
    launcher picks, against the reference; one Inf per layer for the NaN-tile recompute."""
    from mnet_ext.layers import MODEL_BUILDERS, unique_layers

    for cfg in unique_layers(tuple(MODEL_BUILDERS)):
        if cfg.kind != "dwconv_bn_act":
            continue
        for k in {cfg.kernel_size, 7 if cfg.kernel_size == 5 else cfg.kernel_size}:
            x, weight, _, v = _inputs(3, cfg.channels, cfg.height, cfg.width, k, cfg.stride, 1, dtype, True)
            args = (x, weight, v["mean"], v["invstd"], v["gamma"], v["beta"], cfg.stride, 1, cfg.act)
            want = ref.dwconv_bn_act_fwd(*args)
            calls = _dot_spy(monkeypatch)
            assert_close_scaled(tdw.dwconv_bn_act_fwd_eval(*args), want, dtype, f"{cfg.name} K={k}")
            assert len(calls) == (torch.cuda.get_device_capability()[0] >= 9)
            x[1, 3, cfg.height // 2, cfg.width // 2] = float("inf")
            assert_close_scaled(tdw.dwconv_bn_act_fwd_eval(*args), ref.dwconv_bn_act_fwd(*args), dtype,
                                f"{cfg.name} K={k} with an Inf")


# Backward apply (``_bwd_apply_kernel``): bands of TB output rows whose dz is recomputed with HALO_LO/HALO_HI rows
# around them. Each case has several bands per image (halo rows at the band borders, clipped at the image's top and
# bottom), several bands per program (the slot rewritten per band; in the first case a tail band past the grid),
# groups of OW outputs with a partial last group per row (Wo and W not multiples of OW and OWX), chunks of BLOCK_G
# groups that break rows, and a partial channel block (C = 5 in blocks of 4): the tile and TB are forced.
APPLY = [
    # k, stride, dilation, act, channels_last, train, H, W, TB, OW
    (3, 1, 2, "relu6", True, True, 6, 7, 2, 3),
    (3, 2, 1, "silu", False, False, 7, 9, 1, 3),
    (5, 2, 2, "hardswish", True, False, 7, 9, 1, 2),
    (7, 1, 1, "relu", False, True, 6, 5, 2, 2),
    (7, 2, 1, "hardswish", True, True, 7, 7, 1, 3),
]
APPLY_SWEEP = [
    (k, s, d, act, cl, train, 9, 9, tb, ow)
    for k in (3, 5, 7) for s in (1, 2) for d in (1, 2) for cl in (True, False) for train in (True, False)
    for act, tb, ow in (("hardswish", 1, 2), ("relu", 2, 4))
]  # fmt: skip


def _bwd_apply_case(monkeypatch, k, stride, dilation, act, channels_last, train, h, w, tb, ow, c=5):
    """(got, want) of bwd_apply with bands of ``tb`` rows, groups of ``ow`` outputs in chunks of 8 groups x 4
    channels, and 2 stage-1 rows of several bands each."""
    ho, wo = ref.output_hw(h, w, k, stride, dilation)
    assert tb < ho and wo % ow and w % (-(-ow // stride) * stride) and c % 4
    real_tile = tdw.dw_tile

    def tile(ho_, wo_, c_, cl_, k_, kind="fwd", max_block_c=128):
        if kind != "apply":
            return real_tile(ho_, wo_, c_, cl_, k_, kind, max_block_c)
        return triton_kernels.DwTile(ow, -(-wo_ // ow), 8, 4, -(-ho_ * -(-wo_ // ow) // 8), 1)

    monkeypatch.setattr(tdw, "dw_tile", tile)
    monkeypatch.setattr(tdw, "_band_rows", lambda *_: tb)
    monkeypatch.setattr(tdw, "_INTERP_STAGE1_PROGRAMS", 2 * -(-c // 4))
    rows, iters = tdw._stage1_rows(-(-ho // tb), c, 4)
    assert iters > 1, (rows, iters)  # several bands per program: the slot is reused
    x, weight, grad_y, v = _inputs(1, c, h, w, k, stride, dilation, torch.float32, channels_last)
    if not train:
        v["mean_g"], v["mean_g_xhat"] = torch.zeros_like(v["mean_g"]), torch.zeros_like(v["mean_g_xhat"])
    bn = (v["mean"], v["invstd"], v["gamma"], v["beta"], v["mean_g"], v["mean_g_xhat"])
    app = (grad_y, x, weight, *bn, stride, dilation, act)
    return tdw.dwconv_bn_act_bwd_apply(*app), ref.dwconv_bn_act_bwd_apply(*app)


def _check_apply(got, want):
    for g, r, name in zip(got, want, ("dx", "dweight"), strict=True):
        assert_close_scaled(g, r, torch.float32, name)


@pytest.mark.parametrize("k, stride, dilation, act, channels_last, train, h, w, tb, ow", APPLY)
def test_bwd_apply_bands(monkeypatch, k, stride, dilation, act, channels_last, train, h, w, tb, ow):
    _check_apply(*_bwd_apply_case(monkeypatch, k, stride, dilation, act, channels_last, train, h, w, tb, ow))


@pytest.mark.exhaustive
@pytest.mark.parametrize("k, stride, dilation, act, channels_last, train, h, w, tb, ow", APPLY_SWEEP)
def test_bwd_apply_bands_sweep(monkeypatch, k, stride, dilation, act, channels_last, train, h, w, tb, ow):
    _check_apply(*_bwd_apply_case(monkeypatch, k, stride, dilation, act, channels_last, train, h, w, tb, ow))


@pytest.mark.parametrize("side", [0, 1], ids=["above", "below"])
def test_bwd_apply_short_halo_fails(monkeypatch, side):
    """A halo one row short (above or below the band) must fail the comparison above: the tests see the halo."""
    halo = tdw._band_halo

    def short(k, stride, dilation):
        lo_hi = list(halo(k, stride, dilation))
        lo_hi[side] -= 1
        return tuple(lo_hi)

    monkeypatch.setattr(tdw, "_band_halo", short)
    got, want = _bwd_apply_case(monkeypatch, *APPLY[0])
    assert_close_scaled(got[1], want[1], torch.float32, "dweight")  # the halo feeds only dx
    with pytest.raises(AssertionError):
        assert_close_scaled(got[0], want[0], torch.float32, "dx")


def test_band_rows_fit_the_slot():
    """Every MobileNet layer (and K = 7 on the K = 5 shapes), both layouts: the backward apply's slot stays within
    _SLOT_FLOATS and its bands recompute at most 1.5x the dz rows (one band per image where the image fits)."""
    from mnet_ext.layers import MODEL_BUILDERS, unique_layers

    for cfg in unique_layers(tuple(MODEL_BUILDERS)):
        if cfg.kind != "dwconv_bn_act":
            continue
        for k in {cfg.kernel_size, 7 if cfg.kernel_size == 5 else cfg.kernel_size}:
            ho, wo = ref.output_hw(cfg.height, cfg.width, k, cfg.stride, cfg.dilation)
            lo, hi = tdw._band_halo(k, cfg.stride, cfg.dilation)
            for cl in (True, False):
                for dtype in (torch.bfloat16, torch.float32):
                    block_c = tdw._apply_block_c(ho, wo, lo + hi, k, dtype, cfg.dilation)
                    t = triton_kernels.dw_tile(ho, wo, cfg.channels, cl, k, "apply", block_c)
                    tb = tdw._band_rows(ho, wo, t.block_c, lo + hi)
                    assert min(tb + lo + hi, ho) * wo * t.block_c <= tdw._SLOT_FLOATS, (cfg, k, t, tb)
                    bands = -(-ho // tb)
                    dz_rows = sum(min(b * tb + tb + hi, ho) - max(b * tb - lo, 0) for b in range(bands))
                    assert dz_rows <= 1.5 * ho, (cfg, k, t, tb)


@pytest.mark.parametrize("kernel, dtype, channels_last, k, stride, arch, want, dilation", [
    ("_bwd_apply_kernel", torch.float32, True, 3, 1, 80, 255, 1),  # spilled 4-12 bytes under 168 on sm_80
    ("_bwd_apply_kernel", torch.float32, True, 3, 1, 90, 168, 1),
    ("_bwd_apply_kernel", torch.float32, False, 3, 1, 80, 255, 1),
    ("_bwd_apply_kernel", torch.bfloat16, True, 3, 1, 80, 168, 1),
    ("_bwd_apply_kernel", torch.float32, True, 3, 2, 90, 255, 1),
    ("_bwd_apply_kernel", torch.float16, False, 3, 1, 90, 255, 1),
    ("_bwd_apply_kernel", torch.float32, True, 5, 1, 80, None, 1),
    ("_fwd_kernel", torch.float16, True, 7, 1, 90, 255, 1),
    ("_fwd_kernel", torch.float16, False, 7, 1, 90, None, 1),
    ("_stats_partial_kernel", torch.bfloat16, True, 7, 2, 80, 255, 1),
    ("_stats_partial_kernel", torch.float32, False, 5, 2, 80, 255, 1),
    ("_stats_partial_kernel", torch.float32, False, 5, 2, 90, None, 1),
    ("_bwd_reduce_partial_kernel", torch.float32, True, 5, 2, 80, 255, 1),
    ("_bwd_reduce_partial_kernel", torch.float32, True, 5, 1, 80, None, 1),
    ("_bwd_reduce_partial_kernel", torch.float32, True, 7, 1, 90, None, 1),
    ("_stats_partial_kernel", torch.bfloat16, True, 3, 1, 90, 255, 2),
    ("_stats_partial_kernel", torch.bfloat16, True, 3, 1, 90, None, 1),
    ("_bwd_apply_kernel", torch.bfloat16, True, 3, 2, 90, 255, 2),
    ("_bwd_apply_kernel", torch.bfloat16, True, 3, 2, 90, 168, 1),
    ("_fwd_kernel", torch.float32, True, 3, 2, 90, 255, 1),  # fp32 channels_last fwd / stats (session 10)
    ("_stats_partial_kernel", torch.float32, True, 3, 1, 80, 255, 1),
    ("_stats_partial_kernel", torch.float32, False, 3, 1, 80, None, 1),
    ("_stats_partial_kernel", torch.float32, False, 3, 1, 80, 255, 2),  # stats at dilation 2, both layouts
    ("_bwd_apply_kernel", torch.float32, False, 3, 1, 90, 255, 2),
])  # fmt: skip
def test_register_limit_follows_the_gpu(monkeypatch, kernel, dtype, channels_last, k, stride, arch, want, dilation):
    """Each launcher's .maxnreg is its rule (``_conv_maxnreg``) for the launch's GPU, which it asks for x's device;
    on meta tensors (the static report, which answers as its target GPU) the current device's."""
    import types

    props = types.SimpleNamespace(major=arch // 10, minor=arch % 10)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda *a: props)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(tdw, "_gpu_arch", tdw._gpu_arch.__wrapped__)  # uncached: the cache keeps the real GPU's
    launches = {}

    class Recorder:  # stands in for a kernel: records the launch's keyword arguments
        def __init__(self, name):
            self.name = name

        def __getitem__(self, grid):
            return lambda *args, **kwargs: launches.setdefault(self.name, kwargs)

    for name in ("_fwd_kernel", "_stats_partial_kernel", "_stats_combine_kernel", "_bwd_reduce_partial_kernel",
                 "_bwd_apply_kernel", "_sum_rows_kernel"):
        monkeypatch.setattr(tdw, name, Recorder(name))
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    c, h = 32, 28
    ho = ref.output_hw(h, h, k, stride, dilation)[0]
    x = torch.empty((2, c, h, h), dtype=dtype, device="meta", memory_format=fmt)
    gy = torch.empty((2, c, ho, ho), dtype=dtype, device="meta", memory_format=fmt)
    weight = torch.empty((c, 1, k, k), dtype=dtype, device="meta")
    v = torch.empty((c,), dtype=torch.float32, device="meta")
    geo = (stride, dilation)
    {
        "_fwd_kernel": lambda: tdw.dwconv_bn_act_fwd(x, weight, v, v, v, v, *geo, "relu"),
        "_stats_partial_kernel": lambda: tdw.dwconv_bn_stats(x, weight, *geo),
        "_bwd_reduce_partial_kernel": lambda: tdw.dwconv_bn_act_bwd_reduce(gy, x, weight, v, v, v, v, *geo, "relu"),
        "_bwd_apply_kernel": lambda: tdw.dwconv_bn_act_bwd_apply(gy, x, weight, v, v, v, v, v, v, *geo, "relu"),
    }[kernel]()
    assert launches[kernel]["maxnreg"] == want


def test_stats_large_mean(small_tiles):
    """mean 1000, std ~1: a naive sum of squares in fp32 loses the variance; Welford tiles + Chan keep it."""
    x, weight, _, _ = _inputs(2, 4, 7, 9, 3, 1, 1, torch.float32, True, offset=1000.0)
    weight = weight.abs()  # keep the conv output near k^2 * 1000 / k scale, far from zero
    mean, var = tdw.dwconv_bn_stats(x, weight, 1, 1)
    z = ref._conv(x.double(), weight.double(), 1, 1)
    var64, mean64 = torch.var_mean(z, dim=(0, 2, 3), correction=0)
    torch.testing.assert_close(mean.double(), mean64, rtol=1e-6, atol=0)
    torch.testing.assert_close(var.double(), var64, rtol=1e-3, atol=0)


def test_reductions_bitwise_deterministic(small_tiles):
    x, weight, grad_y, v = _inputs(2, 5, 7, 7, 3, 1, 1, torch.float32, True)
    bn = (v["mean"], v["invstd"], v["gamma"], v["beta"])
    runs = [
        (*tdw.dwconv_bn_stats(x, weight, 1, 1), *tdw.dwconv_bn_act_bwd_reduce(grad_y, x, weight, *bn, 1, 1, "relu"))
        for _ in range(2)
    ]
    for a, b in zip(*runs, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("rows", ["dense", "strided"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_se_multi_block(small_tiles, channels_last, rows):
    """Several pixel and channel blocks; "strided": columns 1-7 of 9, so rows are not back to back and the kernels
    take the (h, w) addressing (DENSE_HW false)."""
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(2, 20, 5, 9).to(DEVICE).contiguous(memory_format=fmt)
    gy = torch.randn_like(x)
    x, gy = (x[..., 1:8], gy[..., 1:8]) if rows == "strided" else (x[..., :7].contiguous(memory_format=fmt),
                                                                    gy[..., :7].contiguous(memory_format=fmt))
    assert tse._dense_hw(x, gy) == (rows == "dense")
    s, dp = torch.rand(2, 20, device=DEVICE), torch.randn(2, 20, device=DEVICE)
    assert_close_scaled(tse.se_pool(x), ref.se_pool(x), torch.float32, "se_pool")
    assert_close_scaled(tse.se_scale(x, s), ref.se_scale(x, s), torch.float32, "se_scale")
    assert_close_scaled(tse.se_bwd_reduce(gy, x), ref.se_bwd_reduce(gy, x), torch.float32, "se_bwd_reduce")
    assert_close_scaled(tse.se_bwd_apply(gy, s, dp), ref.se_bwd_apply(gy, s, dp), torch.float32, "se_bwd_apply")


def test_no_autotuning():
    """Every kernel is a plain JIT function launched with the launcher's own config: an autotuner would benchmark
    inside the first call (breaking CUDA-graph capture) and pick warp counts, hence reduction orders, by timing."""
    from triton.runtime.autotuner import Autotuner
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    kernels = {n: k for m in (tdw, tse) for n, k in vars(m).items() if n.endswith("_kernel")}
    assert len(kernels) >= 8
    plain = (JITFunction, InterpretedFunction)
    assert all(isinstance(k, plain) and not isinstance(k, Autotuner) for k in kernels.values()), kernels


def test_unavailable_reason(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert "TRITON_INTERPRET=1" in backend.unavailable_reason("cpu")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert backend.unavailable_reason("cpu") is None
    assert backend.unavailable_reason("mps") is not None
    assert (backend.unavailable_reason("cuda") is None) == torch.cuda.is_available()


def test_bad_arguments():
    x, weight, _, v = _inputs(1, 3, 5, 5, 3, 1, 1, torch.float32, False)
    bn = (v["mean"], v["invstd"], v["gamma"], v["beta"])
    with pytest.raises(ValueError, match="stride"):
        tdw.dwconv_bn_act_fwd(x, weight, *bn, 3, 1, "relu")
    with pytest.raises(ValueError, match="act"):
        tdw.dwconv_bn_act_fwd(x, weight, *bn, 1, 1, "gelu")
    with pytest.raises(TypeError, match="weight"):
        tdw.dwconv_bn_act_fwd(x, weight.double(), *bn, 1, 1, "relu")


@triton.jit
def _act_probe_kernel(u_ptr, g_ptr, y_ptr, dy_ptr, n, ACT: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    mask = offs < n
    u = tl.load(u_ptr + offs, mask=mask, other=0.0)
    g = tl.load(g_ptr + offs, mask=mask, other=0.0)
    tl.store(y_ptr + offs, act_fwd(u, ACT), mask=mask)
    tl.store(dy_ptr + offs, act_bwd(u, g, ACT), mask=mask)


# exp(100) overflows to inf on purpose (sigmoid(-100) must come out 0): numpy warns in the interpreter
@pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")
@pytest.mark.parametrize("act", list(ACT_IDS))
def test_activations_match_reference(act):
    """All seven activations, at and around their kinks (-3, 0, 3, 6) and far out, against reference."""
    u = torch.tensor(
        [-100.0, -6.0, -3.0, -2.999, -1.0, -1e-7, 0.0, 1e-7, 0.5, 2.999, 3.0, 3.001, 5.999, 6.0, 6.001, 100.0]
    )
    u = torch.cat([u, torch.randn(48) * 4]).to(DEVICE)
    g = torch.randn_like(u)
    y, dy = torch.empty_like(u), torch.empty_like(u)
    _act_probe_kernel[(1,)](u, g, y, dy, u.numel(), ACT=ACT_IDS[act], BLOCK=64)
    torch.testing.assert_close(y, ref.act_fwd(u, act), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(dy, ref.act_bwd(u, g, act), rtol=1e-6, atol=1e-6)
