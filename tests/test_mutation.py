"""Tests of the tests: the comparisons the suite relies on must reject a backend that is slightly wrong.

A mutant is the reference (the spec) with one output of one primitive perturbed. The primitive checks of
tests/test_dwconv_bn_act.py and tests/test_squeeze_excite.py run against it and must fail on exactly that output.
Perturbations: a relative 1e-3 (the whole output scaled, or 1e-3 of its largest magnitude added to one element), and
one tile of pixels or one image dropped from a reduction. Outputs stored in bf16/fp16 (y, dx, dweight, se_scale,
se_bwd_apply) are perturbed by 3 ulps of their dtype instead of 1e-3: 1e-3 is below bf16's rounding (half an ulp is
2e-3) and at fp16's (half an ulp is 5e-4), so a correct comparison must accept it there (measured: it does); the
1e-3 mutants of those outputs run in the fp32 configurations. Outputs in fp32 (statistics, sums, se_pool) get 1e-3
in every configuration. Sums are judged against the sum of their terms' magnitudes (``assert_sums_close``), so a
1e-3 error in a sum S of terms t is visible only while |S| > 0.02 * sum |t|: these shapes (< 100 terms per sum,
activations of mean 1) keep it so; in a sum of many more zero-mean terms such an error is below fp32 rounding.
The whole-layer comparison ``compare_layer`` is mutated the same way (output, gradients, running statistics).
"""

from __future__ import annotations

import types
from collections.abc import Callable

import pytest
import torch
from torch import Tensor

from mnet_ext import reference as R
from tests import test_dwconv_bn_act as dw
from tests import test_squeeze_excite as se
from tests.test_reference import compare_layer, fused_copy, make_native

PRIMITIVES = ("dwconv_bn_act_fwd", "dwconv_bn_stats", "dwconv_bn_act_bwd_reduce", "dwconv_bn_act_bwd_apply",
              "se_pool", "se_scale", "se_bwd_reduce", "se_bwd_apply")
REL = 1e-3


def _rel(dtype: torch.dtype) -> float:
    """The perturbation for an output stored in ``dtype``: 1e-3, or 3 of its ulps where 1e-3 is within rounding."""
    return max(REL, 3 * torch.finfo(dtype).eps)


def _tile_zeroed(t: Tensor) -> Tensor:
    """``t`` with one tile of pixels (the first row of image 0, all channels) zeroed."""
    t = t.clone()
    t[0, :, 0, :] = 0
    return t


def _stats_without_tile(x: Tensor, weight: Tensor, stride: int, dilation: int) -> tuple[Tensor, Tensor]:
    """Mean and variance of z = conv(x) over every output pixel but the first row of image 0: a lost partial."""
    z = R._conv(x, weight, stride, dilation)
    keep = torch.ones_like(z[:, 0], dtype=torch.bool)
    keep[0, 0, :] = False
    var, mean = torch.var_mean(z.transpose(0, 1)[:, keep], dim=1, correction=0)
    return mean, var


def _recompute(primitive: str, args: tuple, kind: str) -> tuple | Tensor:
    """``primitive`` on its arguments with one tile or image of the reduced input dropped. The reductions are linear
    in their first argument (grad_y for the backward sums, x for se_pool), so a zeroed tile there removes exactly
    that tile's terms; the statistics of z are not, so they are recomputed without the tile."""
    if kind == "drop_image":  # the activations (x, and grad_y first in the backward passes) lose image 0
        n_acts = 1 if primitive == "dwconv_bn_stats" else 2
        return getattr(R, primitive)(*(a[1:] for a in args[:n_acts]), *args[n_acts:])
    if primitive == "dwconv_bn_stats":
        return _stats_without_tile(*args)
    return getattr(R, primitive)(_tile_zeroed(args[0]), *args[1:])


def _perturb(out: Tensor, kind: str) -> Tensor:
    rel = _rel(out.dtype)
    if kind == "scale":
        return (out.float() * (1 + rel)).to(out.dtype)
    out = out.clone()  # kind == "element": the middle element, by rel of the largest magnitude
    out[tuple(s // 2 for s in out.shape)] += rel * out.abs().max().item()
    return out


def reference_backend(name: str = "wrapped reference", **replaced: Callable) -> types.SimpleNamespace:
    """A backend object serving the reference's primitives, some of them ``replaced``."""
    return types.SimpleNamespace(__name__=name, **{p: replaced.get(p, getattr(R, p)) for p in PRIMITIVES})


def mutant(primitive: str, output: int | None, kind: str) -> types.SimpleNamespace:
    """The reference backend with output ``output`` (None: the only one) of ``primitive`` mutated by ``kind``:
    "scale", "element", "drop_tile" or "drop_image"."""
    spec: Callable = getattr(R, primitive)

    def wrapped(*args):
        out = spec(*args)
        if kind in ("drop_tile", "drop_image"):
            dropped = _recompute(primitive, args, kind)
            bad = dropped if output is None else dropped[output]
        else:
            bad = _perturb(out if output is None else out[output], kind)
        return bad if output is None else tuple(bad if i == output else o for i, o in enumerate(out))

    return reference_backend(f"mutant {primitive}[{output}] {kind}", **{primitive: wrapped})


# (label the check must fail with, primitive, output index)
DW_OUTPUTS = [
    (r"fwd", "dwconv_bn_act_fwd", None),
    (r"stats mean", "dwconv_bn_stats", 0),
    (r"stats var", "dwconv_bn_stats", 1),
    (r"sum_g\b", "dwconv_bn_act_bwd_reduce", 0),
    (r"sum_g_xhat", "dwconv_bn_act_bwd_reduce", 1),
    (r"dx\b", "dwconv_bn_act_bwd_apply", 0),
    (r"dweight", "dwconv_bn_act_bwd_apply", 1),
]
DW_REDUCTIONS = [
    (r"stats mean", "dwconv_bn_stats", 0, "drop_tile"),
    (r"stats var", "dwconv_bn_stats", 1, "drop_tile"),
    (r"stats mean", "dwconv_bn_stats", 0, "drop_image"),
    (r"stats var", "dwconv_bn_stats", 1, "drop_image"),
    (r"sum_g\b", "dwconv_bn_act_bwd_reduce", 0, "drop_tile"),
    (r"sum_g_xhat", "dwconv_bn_act_bwd_reduce", 1, "drop_tile"),
    (r"dweight", "dwconv_bn_act_bwd_apply", 1, "drop_image"),
]
DW_MUTANTS = [(*o, kind) for o in DW_OUTPUTS for kind in ("scale", "element")] + DW_REDUCTIONS
# (k, stride, dilation, act, layout, dtype): both layouts and every dtype, strided and dilated
DW_CONFIGS = [(3, 1, 1, "hardswish", "nchw", "fp32"), (5, 2, 1, "silu", "nhwc", "fp32"),
              (3, 1, 1, "hardswish", "nhwc", "bf16"), (3, 2, 2, "relu6", "nchw", "fp16")]
DW_SHAPE = (2, 5, 7, 6)

# (primitive, kind): the check names each SE output by its primitive
SE_MUTANTS = [(p, kind) for p in ("se_pool", "se_scale", "se_bwd_reduce", "se_bwd_apply")
              for kind in ("scale", "element")] + [("se_pool", "drop_tile"), ("se_bwd_reduce", "drop_tile")]
SE_CONFIGS = [("nchw", "fp32"), ("nhwc", "fp32"), ("nhwc", "bf16"), ("nchw", "fp16")]
SE_SHAPE = (2, 12, 5, 7)


def _ids(params: list[tuple]) -> list[str]:
    return ["-".join(map(str, p)) for p in params]


@pytest.mark.parametrize("config", DW_CONFIGS, ids=_ids(DW_CONFIGS))
def test_dwconv_check_accepts_the_reference(config):
    """The control: the wrapped reference itself passes (a mutant's failure is then the mutation's doing)."""
    k, s, d, act, layout, dtype = config
    dw.check_primitives(reference_backend(), DW_SHAPE, k, s, d, act, layout, dw.DTYPES[dtype])


@pytest.mark.parametrize("config", DW_CONFIGS, ids=_ids(DW_CONFIGS))
@pytest.mark.parametrize("label,primitive,output,kind", DW_MUTANTS,
                         ids=[f"{p}[{o}]-{kind}" for _, p, o, kind in DW_MUTANTS])
def test_dwconv_check_rejects_mutant(config, label, primitive, output, kind):
    k, s, d, act, layout, dtype = config
    with pytest.raises(AssertionError, match=label):
        dw.check_primitives(mutant(primitive, output, kind), DW_SHAPE, k, s, d, act, layout, dw.DTYPES[dtype])


@pytest.mark.parametrize("layout,dtype", SE_CONFIGS, ids=_ids(SE_CONFIGS))
def test_se_check_accepts_the_reference(layout, dtype):
    se.check_primitives(reference_backend(), SE_SHAPE, dw.DTYPES[dtype], layout)


@pytest.mark.parametrize("layout,dtype", SE_CONFIGS, ids=_ids(SE_CONFIGS))
@pytest.mark.parametrize("primitive,kind", SE_MUTANTS, ids=_ids(SE_MUTANTS))
def test_se_check_rejects_mutant(layout, dtype, primitive, kind):
    with pytest.raises(AssertionError, match=primitive):
        se.check_primitives(mutant(primitive, None, kind), SE_SHAPE, dw.DTYPES[dtype], layout)


# ---------------------------------------------------------------------------------------------------------------------
# compare_layer: a fused reference layer with one result off by 1e-3
# ---------------------------------------------------------------------------------------------------------------------
def _scale_output(module, args, out):
    return out * (1 + REL)


def _scale_input_grad(module, args):
    if args[0].requires_grad:
        args[0].register_hook(lambda g: g * (1 + REL))


def _skew_running_var(module, args, out):
    """The running-variance update's batch term off by about 1e-3: the buffer off by momentum * 1e-3."""
    if module.training:
        with torch.no_grad():
            module.bn.running_var.mul_(1 + module.bn.momentum * REL)


def _skew_running_mean(module, args, out):
    if module.training:
        with torch.no_grad():
            module.bn.running_mean.add_(module.bn.momentum * REL * module.bn.running_mean.abs().max())


def _hook_forward(hook):
    return lambda fused: fused.register_forward_hook(hook)


LAYER_MUTANTS = {
    "y": (r"y step", _hook_forward(_scale_output)),
    "dx": (r"dx step", lambda fused: fused.register_forward_pre_hook(_scale_input_grad)),
    "dweight": (r"d0\.weight", lambda fused: fused.conv.weight.register_hook(lambda g: g * (1 + REL))),
    "dgamma": (r"d1\.weight", lambda fused: fused.bn.weight.register_hook(lambda g: g * (1 + REL))),
    "dbeta": (r"d1\.bias", lambda fused: fused.bn.bias.register_hook(lambda g: g * (1 + REL))),
    "running_mean": (r"running_mean", _hook_forward(_skew_running_mean)),
    "running_var": (r"running_var", _hook_forward(_skew_running_var)),
}


def _layer_check(install: Callable | None = None) -> None:
    native = make_native(6, 3, 1, 1, "hardswish")
    fused = fused_copy(native, "reference")
    if install is not None:
        install(fused)
    compare_layer(native, fused, (2, 6, 7, 6), torch.float32, False, True, steps=2)


def test_compare_layer_accepts_the_reference():
    _layer_check()


@pytest.mark.parametrize("name", LAYER_MUTANTS)
def test_compare_layer_rejects_mutant(name):
    label, install = LAYER_MUTANTS[name]
    with pytest.raises(AssertionError, match=label):
        _layer_check(install)
