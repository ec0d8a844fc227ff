"""The C++ extension ``mnet_ext._C`` (backend ``cuda``): registration, schemas, opcheck, input validation, and
the CUDA kernels against the reference / the host twin (``@pytest.mark.cuda``, skipped without a GPU).

Numerical agreement of every primitive with the reference on CPU is covered by the generic backend tests
(tests/test_dwconv_bn_act.py, tests/test_squeeze_excite.py) through the ``cuda`` backend's host twin.
"""

from __future__ import annotations

import itertools

import pytest
import torch

from mnet_ext import reference as R
from tests.helpers import ALLOW_MISSING_ENV, allowed_missing, assert_close_scaled, assert_matches_fp64_reference

# The extension is required (tests/test_backend.py): its import error fails this file, unless the run explicitly
# allows backend cuda to be missing (a pure-Python install).
if "cuda" in allowed_missing():
    pytest.importorskip("mnet_ext._C", reason=f"{ALLOW_MISSING_ENV} allows cuda to be missing", exc_type=ImportError)
from mnet_ext import _C  # noqa: E402
from mnet_ext.backends import cuda as B  # noqa: E402

OPS = torch.ops.mnet_ext_cuda

SCHEMAS = {
    "dwconv_bn_act_fwd": "dwconv_bn_act_fwd(Tensor x, Tensor weight, Tensor mean, Tensor invstd, Tensor gamma, "
    "Tensor beta, int stride, int dilation, str act) -> Tensor",
    "dwconv_bn_stats": "dwconv_bn_stats(Tensor x, Tensor weight, int stride, int dilation) -> (Tensor, Tensor)",
    "dwconv_bn_act_bwd_reduce": "dwconv_bn_act_bwd_reduce(Tensor grad_y, Tensor x, Tensor weight, Tensor mean, "
    "Tensor invstd, Tensor gamma, Tensor beta, int stride, int dilation, str act) -> (Tensor, Tensor)",
    "dwconv_bn_act_bwd_apply": "dwconv_bn_act_bwd_apply(Tensor grad_y, Tensor x, Tensor weight, Tensor mean, "
    "Tensor invstd, Tensor gamma, Tensor beta, Tensor mean_g, Tensor mean_g_xhat, int stride, int dilation, "
    "str act) -> (Tensor, Tensor)",
    "se_pool": "se_pool(Tensor x) -> Tensor",
    "se_scale": "se_scale(Tensor x, Tensor s) -> Tensor",
    "se_bwd_reduce": "se_bwd_reduce(Tensor grad_y, Tensor x) -> Tensor",
    "se_bwd_apply": "se_bwd_apply(Tensor grad_y, Tensor s, Tensor dpooled) -> Tensor",
}


def _dw_args(device="cpu", dtype=torch.float32, layout="nchw", shape=(2, 5, 7, 6), k=3, stride=1, dilation=1):
    n, c, h, w = shape
    fmt = torch.channels_last if layout == "nhwc" else torch.contiguous_format
    x = torch.randn(shape, device=device).to(dtype=dtype, memory_format=fmt)
    weight = (torch.randn(c, 1, k, k, device=device) / k).to(dtype)
    vec = [
        torch.randn(c, device=device) * 0.1,
        torch.rand(c, device=device) + 0.5,
        torch.rand(c, device=device) + 0.5,
        torch.randn(c, device=device) * 0.5,
    ]
    ho, wo = R.output_hw(h, w, k, stride, dilation)
    grad_y = torch.randn(n, c, ho, wo, device=device).to(dtype=dtype, memory_format=fmt)
    mg = [torch.randn(c, device=device) * 0.1, torch.randn(c, device=device) * 0.1]
    return x, weight, vec, grad_y, mg


def _op_args(name, device="cpu", dtype=torch.float32, layout="nchw", **kw):
    """Positional arguments of primitive ``name`` for a small random problem."""
    x, weight, (mean, invstd, gamma, beta), grad_y, (mg, mgx) = _dw_args(device, dtype, layout, **kw)
    stride, dilation = kw.get("stride", 1), kw.get("dilation", 1)
    n, c = x.shape[:2]
    s, dp = torch.rand(n, c, device=device), torch.randn(n, c, device=device)
    gy_se = torch.randn_like(x)
    return {
        "dwconv_bn_act_fwd": (x, weight, mean, invstd, gamma, beta, stride, dilation, "hardswish"),
        "dwconv_bn_stats": (x, weight, stride, dilation),
        "dwconv_bn_act_bwd_reduce": (grad_y, x, weight, mean, invstd, gamma, beta, stride, dilation, "silu"),
        "dwconv_bn_act_bwd_apply": (grad_y, x, weight, mean, invstd, gamma, beta, mg, mgx, stride, dilation, "relu6"),
        "se_pool": (x,),
        "se_scale": (x, s),
        "se_bwd_reduce": (gy_se, x),
        "se_bwd_apply": (gy_se, s, dp),
    }[name]


# ------------------------------------------------------------------------------------------------
# registration
# ------------------------------------------------------------------------------------------------
def test_extension_attributes():
    assert isinstance(_C.WITH_CUDA, bool)
    assert isinstance(_C.CUDA_ARCHS, str)
    assert bool(_C.CUDA_ARCHS) == _C.WITH_CUDA
    assert B.unavailable_reason("cpu") is None
    assert B.unavailable_reason("mps") is not None
    if not (_C.WITH_CUDA and torch.cuda.is_available()):
        assert B.unavailable_reason("cuda") is not None


@pytest.mark.parametrize("name", list(SCHEMAS))
def test_schema(name):
    assert str(getattr(OPS, name).default._schema) == "mnet_ext_cuda::" + SCHEMAS[name]


def test_backend_module_has_every_primitive():
    for name in SCHEMAS:
        assert callable(getattr(B, name)) and callable(getattr(R, name))


# ------------------------------------------------------------------------------------------------
# opcheck (schema, fake kernels, dispatch) on small CPU inputs
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
@pytest.mark.parametrize("name", list(SCHEMAS))
def test_opcheck(name, layout):
    torch.library.opcheck(getattr(OPS, name).default, _op_args(name, layout=layout, stride=2))


# ------------------------------------------------------------------------------------------------
# bad inputs: the message names the argument
# ------------------------------------------------------------------------------------------------
def _fwd(x=None, weight=None, mean=None, stride=1, dilation=1, act="relu"):
    x0, w0, (m0, invstd, gamma, beta), _, _ = _dw_args()
    return OPS.dwconv_bn_act_fwd(
        x0 if x is None else x,
        w0 if weight is None else weight,
        m0 if mean is None else mean,
        invstd,
        gamma,
        beta,
        stride,
        dilation,
        act,
    )


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"x": torch.randn(2, 5, 7, 6, dtype=torch.float64)}, r"x: expected dtype float32, float16 or bfloat16"),
        ({"x": torch.randn(5, 7, 6)}, r"x: expected a 4-D"),
        ({"x": torch.randn(2, 5, 7, 12)[..., ::2]}, r"x: expected an NCHW-contiguous or channels_last"),
        ({"weight": torch.randn(5, 1, 4, 4)}, r"weight: kernel size k must be 3, 5 or 7, got k = 4"),
        ({"weight": torch.randn(4, 1, 3, 3)}, r"weight: expected shape \[C, 1, k, k\] with C = 5"),
        ({"weight": torch.randn(5, 1, 3, 3, dtype=torch.bfloat16)}, r"weight: expected dtype Float"),
        ({"mean": torch.randn(4)}, r"mean: expected shape \[5\]"),
        ({"mean": torch.randn(5, dtype=torch.float64)}, r"mean: expected dtype float32"),
        ({"stride": 3}, r"stride: expected 1 or 2, got 3"),
        ({"dilation": 3}, r"dilation: expected 1 or 2, got 3"),
        ({"act": "gelu"}, r"act: expected one of .*got 'gelu'"),
    ],
)
def test_bad_inputs_dwconv(kwargs, match):
    with pytest.raises(RuntimeError, match=match):
        _fwd(**kwargs)


def test_bad_inputs_grad_y_and_se():
    x, weight, (mean, invstd, gamma, beta), grad_y, (mg, mgx) = _dw_args()
    with pytest.raises(RuntimeError, match=r"grad_y: expected shape \[2, 5, 7, 6\]"):
        OPS.dwconv_bn_act_bwd_reduce(grad_y[:, :, :3].contiguous(), x, weight, mean, invstd, gamma, beta, 1, 1, "relu")
    with pytest.raises(RuntimeError, match=r"mean_g_xhat: expected shape \[5\]"):
        OPS.dwconv_bn_act_bwd_apply(grad_y, x, weight, mean, invstd, gamma, beta, mg, mgx[:3], 1, 1, "relu")
    with pytest.raises(RuntimeError, match=r"s: expected shape \[2, 5\]"):
        OPS.se_scale(x, torch.rand(5))
    with pytest.raises(RuntimeError, match=r"x: expected the shape of grad_y"):
        OPS.se_bwd_reduce(x, x[:, :, :3].contiguous())
    with pytest.raises(RuntimeError, match=r"dpooled: expected dtype float32"):
        OPS.se_bwd_apply(x, torch.rand(2, 5), torch.rand(2, 5, dtype=torch.float64))


# ------------------------------------------------------------------------------------------------
# host twin: a few spot checks here (the generic backend tests sweep the full matrix)
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
def test_host_twin_deterministic_and_matches_reference(layout):
    args = _op_args("dwconv_bn_act_bwd_apply", layout=layout, shape=(3, 6, 9, 7), k=5, stride=2, dilation=2)
    dx1, dw1 = B.dwconv_bn_act_bwd_apply(*args)
    dx2, dw2 = B.dwconv_bn_act_bwd_apply(*args)
    assert torch.equal(dx1, dx2) and torch.equal(dw1, dw2)
    dxr, dwr = R.dwconv_bn_act_bwd_apply(*args)
    torch.testing.assert_close(dx1, dxr, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dw1, dwr, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------------
# the CUDA kernels' tile plan (csrc/dwconv_bn_act/tile.h), run on the host: the geometry the GPU launches with
# ------------------------------------------------------------------------------------------------
def _tile_cases() -> list[tuple]:
    from mnet_ext.layers import unique_layers

    cases = []
    for cfg in unique_layers():  # every MobileNet depthwise layer, at batch 2
        if cfg.kind == "dwconv_bn_act":
            cases.append((2, cfg.channels, cfg.height, cfg.width, cfg.kernel_size, cfg.stride, cfg.dilation))
    # odd sizes, C not a multiple of 8 (or of the 32-vector groups), K = 7, every stride x dilation; 1 x 1, and rows
    # whose dilation-2 shorter phase ends in an empty strip (Wo = 2 q TW + 1: 17 at TW 8, 15 at 7, 29 at 14)
    for k, s, d in itertools.product((3, 5, 7), (1, 2), (1, 2)):
        cases += [(3, 13, 9, 11, k, s, d), (1, 100, 6, 5, k, s, d), (2, 264, 7, 7, k, s, d), (1, 3, 1, 1, k, s, d)]
        cases += [(1, 10, 2, 17, k, s, d), (1, 10, 2, 15, k, s, d), (1, 10, 2, 29, k, s, d)]
    return cases


@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_tile_plan_covers_every_output_once(layout, dtype):
    """Every output of every layer is computed by exactly one (strip, lane) of the plan, each strip's register
    window reads the conv's own input columns (the op raises otherwise), and the reduction chunks partition the
    strips (checked inside the op)."""
    for n, c, h, w, k, stride, dilation in _tile_cases():
        x = torch.empty(n, c, h, w, dtype=dtype)
        if layout == "nhwc":
            x = x.to(memory_format=torch.channels_last)
        weight = torch.empty(c, 1, k, k, dtype=dtype)
        counts = OPS._dw_tile_coverage(x, weight, stride, dilation, 256)
        ho = (h - 1) // stride + 1
        assert counts.shape == (n, c, ho, (w - 1) // stride + 1)
        bad = (counts != 1).nonzero()
        case = (n, c, h, w, k, stride, dilation)
        assert bad.numel() == 0, f"{case}: outputs covered {counts.min()}..{counts.max()} times, first at {bad[0]}"


def test_tile_plan_stats_step_skips_empty_strips():
    """A dilation-2 row of Wo = 2 q TW + 1 outputs ends its shorter phase in an empty strip; the stats kernel's Chan
    step (common/math.h, run over every strip by the plan check) must leave the running mean finite past it."""
    x = torch.empty(1, 4, 2, 17)
    counts = OPS._dw_tile_coverage(x, torch.empty(4, 1, 3, 3), 1, 2, 256)
    assert (counts == 1).all()


def test_tile_plan_check_fails_on_a_gap():
    """The coverage test can fail: fewer threads than a block's lanes need is refused."""
    x = torch.empty(1, 960, 7, 7).to(memory_format=torch.channels_last)
    with pytest.raises(RuntimeError, match="block shape"):
        OPS._dw_tile_coverage(x, torch.empty(960, 1, 3, 3), 1, 1, 16)


# ------------------------------------------------------------------------------------------------
# CUDA kernels (GPU machines only)
# ------------------------------------------------------------------------------------------------
CUDA_CASES = list(itertools.product((3, 5, 7), (1, 2), (1, 2), ("nchw", "nhwc")))


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("k, stride, dilation, layout", CUDA_CASES)
def test_cuda_primitives_match_reference(k, stride, dilation, layout, dtype):
    """Values against the reference in fp64 on the GPU (a TF32 or fp32 reference would itself err by up to ~1e-3),
    each output at its own dtype's tolerance; dtypes, shapes and memory formats as the reference's."""
    assert B.unavailable_reason("cuda") is None, B.unavailable_reason("cuda")
    shape = (3, 37, 17, 13)
    for name in SCHEMAS:
        args = _op_args(
            name, device="cuda", dtype=dtype, layout=layout, shape=shape, k=k, stride=stride, dilation=dilation
        )
        out = getattr(B, name)(*args)
        ref = getattr(R, name)(*args)
        for o, r in zip(*((v,) if isinstance(v, torch.Tensor) else v for v in (out, ref)), strict=True):
            assert o.dtype == r.dtype and o.shape == r.shape and o.device == r.device, name
            if o.dim() == 4:
                assert R.memory_format_of(o) == R.memory_format_of(r), name
        assert_matches_fp64_reference(name, out, args, f"k{k} s{stride} d{dilation} {layout} {dtype}")


@pytest.mark.cuda
@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
def test_cuda_matches_host_twin_and_is_deterministic(layout):
    for name in SCHEMAS:
        args = _op_args(name, device="cuda", layout=layout, shape=(4, 24, 29, 31), k=7, stride=2)
        a = getattr(B, name)(*args)
        b = getattr(B, name)(*args)
        cpu = getattr(B, name)(*[t.cpu() if isinstance(t, torch.Tensor) else t for t in args])
        a, b, cpu = ((v,) if isinstance(v, torch.Tensor) else v for v in (a, b, cpu))
        for u, v, w in zip(a, b, cpu, strict=True):
            assert torch.equal(u, v), f"{name}: not deterministic"
            assert_close_scaled(u.cpu(), w, torch.float32, f"{name} vs the host twin")


# torch.cuda._sleep spins this many GPU clock cycles: ~2 s at the 1.7-2 GHz of an H100/H200, far longer than the
# side-stream work it must outlast (the test checks that it did).
SPIN_CYCLES = 4_000_000_000


def _outputs(name: str, args) -> tuple[torch.Tensor, ...]:
    out = getattr(B, name)(*args)
    return out if isinstance(out, tuple) else (out,)


@pytest.mark.cuda
@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
def test_cuda_kernels_run_on_the_current_stream(layout):
    """Every primitive at a size with many chunks in the two-stage reductions (64x32x56x56 bf16) is launched on a
    side stream while the default stream is blocked by a spin kernel (torch.cuda._sleep), and each output is copied
    to pinned host memory on the side stream right after its launch. A kernel launched on the default stream
    instead (or a call that waits for it, e.g. a memset on the legacy stream) would run only after the spin: the
    side stream would finish while the default stream still spins, with copies of stale memory (the allocator hands
    back the blocks of a warm-up run on other inputs). So: the side stream finishes first, and every copy equals a
    rerun on the default stream after a full synchronisation (the kernels are deterministic, see above; their
    values are checked against the reference by the other tests)."""
    kw = dict(device="cuda", dtype=torch.bfloat16, layout=layout, shape=(64, 32, 56, 56), k=3)
    default, side = torch.cuda.current_stream(), torch.cuda.Stream()
    warm_args = {name: _op_args(name, **kw) for name in SCHEMAS}
    args = {name: _op_args(name, **kw) for name in SCHEMAS}  # made on the default stream
    with torch.cuda.stream(side):  # load every kernel and fill the side stream's allocator cache
        hosts = {name: [torch.empty_strided(o.shape, o.stride(), dtype=o.dtype, pin_memory=True)
                        for o in _outputs(name, a)] for name, a in warm_args.items()}
    torch.cuda.synchronize()

    side.wait_stream(default)  # the inputs were made on the default stream: wait for them, not for the spin
    torch.cuda._sleep(SPIN_CYCLES)
    done = torch.cuda.Event()
    outs = {}  # keeps the outputs alive until every stream is done with them
    with torch.cuda.stream(side):
        for name, a in args.items():
            outs[name] = _outputs(name, a)
            for host, out in zip(hosts[name], outs[name], strict=True):
                host.copy_(out, non_blocking=True)
        done.record(side)
    done.synchronize()
    still_spinning = not default.query()
    torch.cuda.synchronize()
    assert still_spinning, "the default stream's spin ended before the side stream's work: raise SPIN_CYCLES"

    for name, a in args.items():
        for i, (host, rerun) in enumerate(zip(hosts[name], _outputs(name, a), strict=True)):
            assert torch.equal(host, rerun.cpu()), f"{name} output {i}: not ready when its stream was (wrong stream?)"


@pytest.mark.cuda
def test_cuda_bad_device():
    x, weight, (mean, invstd, gamma, beta), _, _ = _dw_args("cuda")
    with pytest.raises(RuntimeError, match=r"mean: expected a tensor on cuda"):
        OPS.dwconv_bn_act_fwd(x, weight, mean.cpu(), invstd, gamma, beta, 1, 1, "relu")
