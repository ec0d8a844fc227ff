"""The real CUDA kernels (csrc/dwconv_bn_act/kernels.cuh) and launchers (*.cu), compiled with g++ against a host
emulation of the CUDA builtins (tests/cuda_emu: one fiber per CUDA thread, barriers by a cooperative scheduler in
several thread orders, NaN-filled shared memory, checked loads, guard areas around every buffer) and run on small
shapes: the threading (staging, barriers, shared-memory tiles, partial-sum layouts) that the host twin does not
share, checked on a machine without a GPU. Outputs against mnet_ext.reference in fp64 at the project's tolerances
(tests/helpers.py: assert_matches_fp64_reference)."""

from __future__ import annotations

import os
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch

from mnet_ext import reference as R
from tests.cuda_emu import build as emu_build
from tests.helpers import assert_matches_fp64_reference

PRIMS = {
    "dwconv_bn_act_fwd": "fwd",
    "dwconv_bn_stats": "stats",
    "dwconv_bn_act_bwd_reduce": "bwd_reduce",
    "dwconv_bn_act_bwd_apply": "bwd_apply",
}
DTYPE_CODE = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
ACT = {"dwconv_bn_act_fwd": "hardswish", "dwconv_bn_act_bwd_reduce": "silu", "dwconv_bn_act_bwd_apply": "relu6"}


def _build(full: bool) -> Path:
    if emu_build.cuda_include() is None:
        pytest.skip("no CUDA toolkit headers (cuda_bf16.h) on this machine: the emulator compiles against them")
    return emu_build.build(full=full)


@pytest.fixture(scope="module")
def emulator() -> Path:
    return _build(full=False)


@pytest.fixture(scope="module")
def emulator_full() -> Path:
    """Every dtype (fp16 too): a second build, for the exhaustive sweep."""
    return _build(full=True)


def _raw(t: torch.Tensor) -> bytes:
    """The bytes of t in its memory format (channels_last: N, H, W, C order)."""
    if t.dim() == 4 and R.memory_format_of(t) == torch.channels_last:
        t = t.permute(0, 2, 3, 1)
    t = t.contiguous()
    return (t.view(torch.int16) if t.element_size() == 2 else t).numpy().tobytes()


def _read(path: Path, like: torch.Tensor) -> torch.Tensor:
    """A tensor shaped and laid out like `like` from its raw bytes."""
    cl = like.dim() == 4 and R.memory_format_of(like) == torch.channels_last
    shape = (like.shape[0], like.shape[2], like.shape[3], like.shape[1]) if cl else tuple(like.shape)
    raw = np.fromfile(path, dtype=np.int16 if like.element_size() == 2 else np.float32)
    t = torch.from_numpy(raw).view(like.dtype).reshape(shape)
    return t.permute(0, 3, 1, 2) if cl else t


def _args(name: str, shape, k: int, stride: int, dilation: int, dtype: torch.dtype, layout: str) -> tuple:
    n, c, h, w = shape
    fmt = torch.channels_last if layout == "nhwc" else torch.contiguous_format
    x = torch.randn(shape).to(dtype=dtype, memory_format=fmt)
    weight = (torch.randn(c, 1, k, k) / k).to(dtype)
    mean, invstd, gamma, beta = torch.randn(c) * 0.1, torch.rand(c) + 0.5, torch.rand(c) + 0.5, torch.randn(c) * 0.5
    ho, wo = R.output_hw(h, w, k, stride, dilation)
    grad_y = torch.randn(n, c, ho, wo).to(dtype=dtype, memory_format=fmt)
    mg, mgx = torch.randn(c) * 0.1, torch.randn(c) * 0.1
    return {
        "dwconv_bn_act_fwd": (x, weight, mean, invstd, gamma, beta, stride, dilation, ACT.get(name)),
        "dwconv_bn_stats": (x, weight, stride, dilation),
        "dwconv_bn_act_bwd_reduce": (grad_y, x, weight, mean, invstd, gamma, beta, stride, dilation, ACT.get(name)),
        "dwconv_bn_act_bwd_apply": (grad_y, x, weight, mean, invstd, gamma, beta, mg, mgx, stride, dilation,
                                    ACT.get(name)),
    }[name]


def _outputs_like(name: str, args: tuple) -> tuple[torch.Tensor, ...]:
    """Empty tensors with the shapes, dtypes and layouts of primitive `name`'s outputs (the reference's)."""
    x = args[1] if name in ("dwconv_bn_act_bwd_reduce", "dwconv_bn_act_bwd_apply") else args[0]
    weight = args[2] if x is args[1] else args[1]
    n, c, h, w = x.shape
    k = weight.shape[-1]
    stride, dilation = {"dwconv_bn_act_fwd": args[6:8], "dwconv_bn_stats": args[2:4],
                        "dwconv_bn_act_bwd_reduce": args[7:9], "dwconv_bn_act_bwd_apply": args[9:11]}[name]
    ho, wo = R.output_hw(h, w, k, stride, dilation)
    fmt = R.memory_format_of(x)
    vec = torch.empty(c)
    return {
        "dwconv_bn_act_fwd": (torch.empty(n, c, ho, wo, dtype=x.dtype).to(memory_format=fmt),),
        "dwconv_bn_stats": (vec, vec),
        "dwconv_bn_act_bwd_reduce": (vec, vec),
        "dwconv_bn_act_bwd_apply": (torch.empty_like(x), torch.empty_like(weight)),
    }[name]


def run_emulated(exe: Path, name: str, args: tuple, order: int) -> tuple[tuple[torch.Tensor, ...], list[str]]:
    """Primitive `name` on `args` (its reference signature) through the emulated CUDA launcher: its outputs, shaped
    as the reference's, and the kernels it launched (names without namespace and template arguments). order: the
    thread order within a barrier epoch (0 forward, 1 reverse, 2 alternating)."""
    names = {
        "dwconv_bn_act_fwd": ("x", "weight", "mean", "invstd", "gamma", "beta"),
        "dwconv_bn_stats": ("x", "weight"),
        "dwconv_bn_act_bwd_reduce": ("grad_y", "x", "weight", "mean", "invstd", "gamma", "beta"),
        "dwconv_bn_act_bwd_apply": ("grad_y", "x", "weight", "mean", "invstd", "gamma", "beta", "mean_g",
                                    "mean_g_xhat"),
    }[name]
    tensors = dict(zip(names, args, strict=False))
    stride, dilation = args[len(names)], args[len(names) + 1]
    act = args[len(names) + 2] if len(args) > len(names) + 2 else "none"
    x, weight = tensors["x"], tensors["weight"]
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        for key, t in tensors.items():
            (d / f"{key}.bin").write_bytes(_raw(t))
        cl = int(R.memory_format_of(x) == torch.channels_last)
        n, c, h, w = x.shape
        (d / "meta.txt").write_text(
            f"{PRIMS[name]} {n} {c} {h} {w} {weight.shape[-1]} {stride} {dilation} {act} {DTYPE_CODE[x.dtype]} {cl} "
            f"{order}\n")
        r = subprocess.run([str(exe), str(d)], capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, f"emulator failed (status {r.returncode}):\n{r.stderr[-4000:]}"
        launches = [line.split(" kernel ", 1)[1] for line in r.stdout.splitlines() if line.startswith("launch ")]
        outs = tuple(_read(d / f"out{i}.bin", e) for i, e in enumerate(_outputs_like(name, args)))
    return outs, [k.split("<")[0].split("(")[0].split("::")[-1] for k in launches]


def expected_kernels(name: str, x: torch.Tensor, stride: int, dilation: int) -> list[str]:
    """The kernels the launcher runs for x (csrc/dwconv_bn_act/*.cu): the staged band kernels for channels_last
    with 16-byte channel vectors (C a multiple of 16 bytes' worth), the strip kernels otherwise; the forward on the
    tensor cores for bf16/fp16 of those at stride 1 or 2, dilation 1 (fwd.cu: use_mma_fwd; the emulator is an
    sm_90)."""
    band = R.memory_format_of(x) == torch.channels_last and x.shape[1] * x.element_size() % 16 == 0
    mma = band and x.element_size() == 2 and stride in (1, 2) and dilation == 1
    return {
        "dwconv_bn_act_fwd": ["fwd_mma_kernel" if mma else "fwd_band_kernel" if band else "fwd_kernel"],
        "dwconv_bn_stats": ["stats_band_kernel" if band else "stats_partial_kernel", "stats_final_kernel"],
        "dwconv_bn_act_bwd_reduce": ["bwd_reduce_partial_kernel", "sum2_final_kernel"],
        "dwconv_bn_act_bwd_apply": ["bwd_apply_kernel", "dweight_final_kernel"],
    }[name]


def check(exe: Path, shape, k: int, stride: int, dilation: int, dtype: torch.dtype, layout: str, order: int,
          prims=tuple(PRIMS)) -> None:
    """Every primitive (of `prims`) on one problem: outputs against the fp64 reference, and the kernels that ran."""
    for name in prims:
        args = _args(name, shape, k, stride, dilation, dtype, layout)
        out, launched = run_emulated(exe, name, args, order)
        what = f"{shape} k{k} s{stride} d{dilation} {dtype} {layout} order {order}"
        x = args[1] if name in ("dwconv_bn_act_bwd_reduce", "dwconv_bn_act_bwd_apply") else args[0]
        assert launched == expected_kernels(name, x, stride, dilation), f"{name} {what}: launched {launched}"
        assert_matches_fp64_reference(name, out if len(out) > 1 else out[0], args, what)


# (shape, k, stride, dilation, dtype, layout): the geometry corners of the band and strip kernels, on shapes small
# enough to emulate in well under a second each. MobileNet widths are multiples of 7: the odd widths here give
# partial last strips (TW 7 / 14) and right padding inside a strip, which those layers never hit.
F32, BF16 = torch.float32, torch.bfloat16
CASES = [
    ((1, 16, 19, 19), 3, 1, 1, BF16, "nhwc"),  # partial last strip (Wo 19 = 14 + 5), bands over 19 rows
    ((2, 40, 19, 9), 5, 2, 1, F32, "nhwc"),  # stride 2, two images, 10 fp32 vectors
    ((1, 24, 9, 9), 3, 1, 2, BF16, "nhwc"),  # dilation 2: two column phases (J = 2)
    ((1, 16, 13, 17), 7, 2, 1, BF16, "nhwc"),  # K 7 stride 2: the largest halo, padding inside the strip
    ((2, 16, 5, 29), 5, 1, 2, F32, "nhwc"),  # dilation 2, K 5, a wide row: padding rows above and below
    ((1, 8, 1, 2), 7, 1, 1, BF16, "nhwc"),  # tiny: every tap but one row in the padding
    ((1, 16, 3, 1), 3, 2, 1, F32, "nhwc"),  # W 1 at stride 2
    ((16, 8, 3, 5), 3, 1, 1, BF16, "nhwc"),  # many images: tiles and chunks across image boundaries
    ((128, 4, 40, 3), 3, 1, 1, F32, "nhwc"),  # 5120 strips: 10 reduction chunks (final combines: > 1 per walker)
    ((1, 12, 11, 13), 3, 1, 1, BF16, "nhwc"),  # C % 8 != 0: the strip kernels, partial channel vector
    ((1, 20, 7, 7), 5, 1, 1, F32, "nhwc"),  # C % 8 != 0 but fp32 vectors of 4: band; a 7x7 MobileNet layer
    ((1, 16, 12, 10), 3, 2, 1, F32, "nchw"),  # NCHW strips
    ((2, 5, 9, 8), 5, 1, 2, BF16, "nchw"),  # NCHW, odd C, dilation 2
    ((1, 64, 14, 14), 3, 1, 1, BF16, "nhwc"),  # MobileNet-like: 14x14, 8 channel vectors
    ((1, 32, 28, 28), 3, 2, 1, BF16, "nhwc"),  # MobileNet-like: 28x28 -> 14x14 at stride 2
    # K 7: the backward apply in 2 bands of 8 rows x 2 images, 2 items per block (the block's dweight sums across
    # items); the stats in tiles of 8 rows where the forward takes 16 (tile.h: band_stage_budget)
    ((2, 64, 16, 14), 7, 1, 1, BF16, "nhwc"),
]


def _id(case) -> str:
    shape, k, s, d, dtype, layout = case
    return f"{'x'.join(map(str, shape))}-k{k}s{s}d{d}-{str(dtype)[6:]}-{layout}"


@pytest.mark.parametrize("case", CASES, ids=_id)
def test_emulated_kernels_match_reference(emulator, case):
    shape, k, stride, dilation, dtype, layout = case
    check(emulator, shape, k, stride, dilation, dtype, layout, order=CASES.index(case) % 3)


# The tensor-core forward at stride 2 and 1 (csrc/dwconv_bn_act/mma_fwd.cuh; mma_tile.h): tile widths 8 / 16 / 28
# (Wo <= 8, <= 16, more; 3 / 2 / 1 images side by side, the last group of a batch partial), odd sizes (partial
# tiles: outputs masked, padding on every side of the staged input), C = 8, 16, 24 (1, 2, 3 warps per block), 40
# (5 channel blocks of one warp), several tiles per block (the emulator build lowers kMmaMinBlocks: build.py),
# K 3 / 5 / 7. fp16 needs the full build (a second compile).
HALF = torch.float16
MMA_CASES = [
    ((1, 8, 15, 17), 3, 2, BF16),  # Ho 8, Wo 9: TW 16, 7 columns of the tile past Wo
    ((2, 24, 29, 31), 5, 2, BF16),  # TW 16, two row tiles per image (the second 7 of 8 rows), 3 warps per block
    ((3, 16, 57, 56), 5, 2, BF16),  # TW 28, Ho 29: 8 row tiles (the last 1 of 4 rows), 12 tiles per image
    ((4, 40, 9, 9), 3, 2, BF16),  # 5x5 outputs (TW 8, 3 images per tile: groups of 3 and 1), 5 blocks of one warp
    ((2, 16, 14, 14), 7, 2, BF16),  # K 7: 24 pairs and the lone tap, padding 3
    ((1, 24, 9, 11), 5, 2, HALF),  # fp16 (full build), Ho 5, Wo 6
    ((2, 16, 30, 29), 3, 2, HALF),  # fp16, TW 16 at Wo 15
    # stride 1: one stride phase, the window TH + K - 1 rows x TW + K - 1 columns per image
    ((1, 8, 9, 17), 3, 1, BF16),  # TW 28 at Wo 17 (11 columns past Wo), two row tiles (the second 1 of 8 rows)
    ((2, 24, 13, 14), 5, 1, BF16),  # TW 16, 2 images per tile, 2 row tiles (the second 5 rows), 3 warps per block
    ((4, 40, 7, 7), 3, 1, BF16),  # a 7x7 layer: TW 8, 3 images per tile (groups of 3 and 1), 5 blocks of one warp
    ((2, 16, 11, 30), 7, 1, BF16),  # K 7: padding 3, 2 column tiles (the second 2 of 28 columns)
    ((5, 8, 3, 4), 7, 1, BF16),  # narrow images: most taps in the padding, groups of 3 and 2
    ((1, 24, 6, 5), 5, 1, HALF),  # fp16, Ho 6, Wo 5
    ((3, 16, 16, 16), 3, 1, HALF),  # fp16, TW 16 exact, image groups of 2 and 1
    # TW 28 at stride 2 (tiles of 4 rows: 112 outputs, 16 vectors past the tile) with a block boundary inside an
    # image, blocks run in reverse (order 2): a store of a vector past the tile into the next tile's first row, a
    # race on the GPU (the first H200 run, 2026-11-30), shows here. Ho 23, Wo 29: 2 column tiles, 6 row tiles.
    ((1, 8, 45, 58), 3, 2, BF16),
]


@pytest.mark.parametrize("case", MMA_CASES,
                         ids=lambda c: f"{'x'.join(map(str, c[0]))}-k{c[1]}s{c[2]}-{str(c[3])[6:]}")
def test_emulated_mma_forward(request, case):
    shape, k, stride, dtype = case
    exe = request.getfixturevalue("emulator_full" if dtype == HALF else "emulator")
    check(exe, shape, k, stride, 1, dtype, "nhwc", order=MMA_CASES.index(case) % 3, prims=("dwconv_bn_act_fwd",))


# Non-finite inputs stay in their own channel, as in the reference: the tensor-core forward contracts 8 channels
# against block-diagonal weights, where a lone Inf or NaN meets zeros (0 * Inf = NaN) and would reach the other 7
# channels of its group; the kernel finds those outputs by their NaN after the activation (mma_fwd.cuh) and recomputes
# them. Stride 2 and stride 1, every conv activation (each must keep the NaN for the test of the outputs to see it;
# relu / relu6 run on the rounded pairs: device.cuh act_pair), bf16 and fp16 (their NaN tests differ).
NONFINITE_CASES = [((2, 16, 15, 17), 3, 2, "relu6", BF16), ((1, 24, 9, 11), 5, 2, "hardswish", BF16),
                   ((1, 16, 9, 10), 3, 1, "relu", BF16), ((2, 16, 9, 9), 5, 1, "silu", BF16),
                   ((1, 16, 8, 9), 3, 1, "none", BF16), ((1, 16, 9, 10), 3, 2, "relu6", HALF)]


@pytest.mark.parametrize("case", NONFINITE_CASES,
                         ids=lambda c: f"{'x'.join(map(str, c[0]))}-k{c[1]}s{c[2]}-{c[3]}-{str(c[4])[6:]}")
def test_emulated_forward_keeps_non_finite_in_its_channel(request, case):
    shape, k, stride, act, dtype = case
    exe = request.getfixturevalue("emulator_full" if dtype == HALF else "emulator")
    args = (*_args("dwconv_bn_act_fwd", shape, k, stride, 1, dtype, "nhwc")[:-1], act)
    x = args[0]
    x[0, 3, 4, 5], x[0, 9, 2, 2], x[-1, 5, 7, 6] = float("inf"), float("nan"), float("-inf")
    out, launched = run_emulated(exe, "dwconv_bn_act_fwd", args, order=0)
    assert launched == expected_kernels("dwconv_bn_act_fwd", x, stride, 1)
    assert_matches_fp64_reference("dwconv_bn_act_fwd", out[0], args,
                                  f"{shape} k{k} s{stride} {act} {dtype} with Inf/NaN inputs")


@pytest.mark.parametrize(
    "kernel, message",
    [
        ("divergent_barrier", "is not reached by 32 of 64 threads"),
        ("mismatched_barriers", "waits at the barrier at"),
        ("missing_barrier", "a NaN in the output"),
        ("smem_overrun", "past the launch's 256 bytes"),
        ("bad_loads", "misaligned address"),
        ("bad_loads", "outside every buffer"),
        ("divergent_ldmatrix", "every lane of the warp must reach it"),
    ],
)
def test_emulator_reports_defects(emulator, kernel, message):
    """The emulator's own checks, on kernels with the defect (tests/cuda_emu/selftest.cpp): a barrier not every
    thread reaches, threads at different barriers, a read of shared memory before the barrier that orders it, a
    write past the dynamic shared memory, misaligned and out-of-bounds 16-byte loads."""
    r = subprocess.run([str(emulator), "--selftest", kernel], capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and message in r.stderr, r.stderr


def test_emulated_mma_fragments(emulator):
    """The emulator's ldmatrix and mma.m16n8k16 / m16n8k8 (bf16, fp16; tests/cuda_emu/selftest.cpp: mma_fragments):
    D = C + A B from fragments loaded by ldmatrix and from fragments built per lane by the PTX ISA's tables, equal to
    a plain matmul bit for bit (exact small values)."""
    r = subprocess.run([str(emulator), "--selftest", "mma_fragments"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr


@pytest.mark.parametrize("defect", ["mma", "ldmatrix"])
def test_mma_fragment_selftest_catches_layout_defects(emulator, defect):
    """The self-test above fails when the emulator's own layout is wrong (emu.cpp: MNET_EMU_DEFECT plants one)."""
    r = subprocess.run([str(emulator), "--selftest", "mma_fragments"], capture_output=True, text=True, timeout=60,
                       env={**os.environ, "MNET_EMU_DEFECT": defect})
    assert r.returncode == 1 and "mma fragments" in r.stderr, r.stderr


# The exhaustive sweep: every (k, stride, dilation) on shapes with every kind of edge; channels_last in every dtype
# (the full build), NCHW in fp32; the thread order rotating.
SWEEP_SHAPES = [(2, 40, 19, 9), (1, 72, 21, 15), (1, 8, 1, 2), (1, 16, 1, 3), (1, 8, 3, 1), (2, 24, 17, 19),
                (1, 16, 2, 29), (64, 8, 3, 5), (1, 24, 15, 15), (2, 5, 7, 6)]


@pytest.mark.exhaustive
@pytest.mark.parametrize("k, stride, dilation", [(k, s, d) for k in (3, 5, 7) for s in (1, 2) for d in (1, 2)],
                         ids=lambda v: str(v))
@pytest.mark.parametrize("shape", SWEEP_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_emulated_kernels_sweep(emulator_full, shape, k, stride, dilation):
    for i, (dtype, layout) in enumerate([(F32, "nhwc"), (BF16, "nhwc"), (torch.float16, "nhwc"), (F32, "nchw")]):
        check(emulator_full, shape, k, stride, dilation, dtype, layout, order=(i + k + stride + dilation) % 3)
