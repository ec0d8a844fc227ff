"""CPU benchmark of the fused layers (host twin: backend ``cuda`` on CPU tensors) against native PyTorch.

Every unique depthwise conv + BN + act and SE layer of MobileNetV1/V2/V3-Large/V3-Small (224x224 inputs), fp32,
per batch size and thread count. Per case the providers run interleaved, round after round (native NCHW, native
channels_last, fused channels_last), so machine load hits them alike; the statistic is each provider's minimum over
the rounds (the stable one on a shared machine). ``speedup`` = the better native layout's time / the fused time
(the fused module, as a fused model runs it). For the eval forward of dwconv_bn_act the op alone is timed too
(``op_ms``: ``torch.ops.mnet_ext_cuda`` called directly with the folded BN tensors, i.e. without the Python
wrapper ``mnet_ext.functional``), with ``speedup_op``. ``--kinds model`` times whole models (eval only, 224x224):
native NCHW, native channels_last, ``mnet_ext.fuse`` of the channels_last model, and native channels_last with torch's
own eval conv + BN fold (``torch.fx.experimental.optimization.fuse``: ``native_cl_fold_ms``, ``speedup_fold``),
interleaved the same way.

Where a layer stands against the machine: each eval case also times a copy of its input into a preallocated tensor
(``copy_ms``, interleaved with the others), and reports the fused layer's bytes (input read + output written, fp32)
per second (``fused_gbs``) as a percentage of that copy's rate (``pct_copy_bw``). A layer near 100 % is
memory-bound: no kernel can make it much faster, and its speedup is set by how far from the copy rate native is.

    python -m bench.bench_cpu [--batches 1,8] [--threads 1,0] [--modes eval,fwd_bwd] [--kinds dw,se,model]
                                [--rounds 15] [--out bench/results/cpu/NAME]

``--threads 0`` means all cores. With ``--out`` it writes NAME.csv and NAME.md (per-group geomean and minimum).
``--kinds overhead`` times the per-call cost instead (``overhead``): one tiny layer, where the kernels take ~1 us.
``--kinds profile`` profiles the fused models' eval (``profile``): the share of model time per kind of op.
"""

from __future__ import annotations

import argparse
import copy
import csv
import math
import os
import pathlib
import platform
import time
from collections.abc import Callable

import torch

import mnet_ext
from bench.common import Setup, activation_bytes, build_module, build_native, make_call, make_inputs, mode_bytes
from mnet_ext import functional as MF
from mnet_ext.backends import cuda as B
from mnet_ext.layers import MODEL_BUILDERS, LayerConfig, unique_layers

MODELS = ("mobilenet_v1", "mobilenet_v2", "mobilenet_v3_large", "mobilenet_v3_small")
PROVIDERS = ("eager_nchw", "eager_channels_last", "mnet_ext_cuda")
COLUMNS = ["layer", "kind", "mode", "batch", "threads", "native_nchw_ms", "native_cl_ms", "fused_ms", "speedup",
           "op_ms", "speedup_op", "native_cl_fold_ms", "speedup_fold", "copy_ms", "fused_gbs", "pct_copy_bw"]


def time_interleaved(calls: list[Callable[[], object]], rounds: int, budget_s: float) -> list[float]:
    """Minimum time in ms of each call, the calls alternating within every round (at least 3 rounds)."""
    for c in calls:
        c()
    best = [math.inf] * len(calls)
    start = time.perf_counter()
    for r in range(rounds):
        for i, c in enumerate(calls):
            t0 = time.perf_counter()
            c()
            best[i] = min(best[i], time.perf_counter() - t0)
        if r >= 2 and time.perf_counter() - start > budget_s:
            break
    return [b * 1e3 for b in best]


def op_call(module: torch.nn.Module, x: torch.Tensor) -> Callable[[], object]:
    """The fused module's eval forward as the bare op (BN folded to invstd once, outside the timing)."""
    conv, bn = module.conv, module.bn
    invstd = torch.rsqrt(bn.running_var.float() + bn.eps)
    args = (x, conv.weight.detach(), bn.running_mean.float(), invstd, bn.weight.detach().float(),
            bn.bias.detach().float(), module.stride, module.dilation, module.act)

    def run() -> object:
        with torch.no_grad():
            return B.dwconv_bn_act_fwd(*args)
    return run


def copy_call(x: torch.Tensor) -> Callable[[], object]:
    """A copy of x into a preallocated tensor: the machine's rate of reading and writing this many bytes."""
    out = torch.empty_like(x)
    return lambda: out.copy_(x)


def run_case(cfg: LayerConfig, mode: str, batch: int, rounds: int, budget_s: float) -> list[float]:
    """Times in ms: native NCHW, native channels_last, fused, the bare op (eval dwconv only, else NaN) and the copy
    of the input (eval only, else NaN)."""
    calls = []
    for provider in PROVIDERS:
        fmt = torch.contiguous_format if provider == "eager_nchw" else torch.channels_last
        setup = Setup(torch.device("cpu"), torch.float32, batch, fmt)
        native = build_native(cfg, setup, fmt)
        module = build_module(cfg, provider, native)
        x, dy = make_inputs(cfg, setup, fmt)
        calls.append(make_call(cfg, provider, mode, module, native, setup, x, dy, 0, {}))
    with_op = mode == "eval" and cfg.kind == "dwconv_bn_act"
    if with_op:
        calls.append(op_call(module, x))
    if mode == "eval":
        calls.append(copy_call(x))
    times = time_interleaved(calls, rounds, budget_s)
    if not with_op:
        times.insert(3, math.nan)
    return times if mode == "eval" else [*times, math.nan]


def run_model(name: str, batch: int, rounds: int, budget_s: float) -> list[float]:
    """Whole-model eval times in ms: native NCHW, native channels_last, fused channels_last, NaN (no op) and native
    channels_last with torch's own eval fold of every conv's BatchNorm (``torch.fx.experimental.optimization.fuse``),
    the baseline a native user would deploy."""
    from torch.fx.experimental.optimization import fuse as fx_fuse

    calls = []
    for provider in (*PROVIDERS, "native_cl_fold"):
        fmt = torch.contiguous_format if provider == "eager_nchw" else torch.channels_last
        torch.manual_seed(0)
        model = MODEL_BUILDERS[name]().eval().to(memory_format=fmt)
        if provider == "mnet_ext_cuda":
            model = mnet_ext.fuse(model, backend="cuda")
        elif provider == "native_cl_fold":
            model = fx_fuse(model).to(memory_format=fmt)
        x = torch.randn(batch, 3, 224, 224).contiguous(memory_format=fmt)

        def run(model: torch.nn.Module = model, x: torch.Tensor = x) -> object:
            with torch.no_grad():
                return model(x)
        calls.append(run)
    nchw, cl, fused, cl_fold = time_interleaved(calls, rounds, budget_s)
    return [nchw, cl, fused, math.nan, cl_fold]


def overhead(rounds: int, per_round: int = 2000) -> str:
    """Per-call cost in us of one tiny layer (1 x 16 x 2 x 2, channels_last: the kernels take ~1 us), eval, no_grad:
    native (channels_last modules), the fused module as it runs (one C++ call per layer), the fused module on the
    Python path of session 4 (``mnet_ext.functional``'s checks and torch calls, then the op bodies: the one-call
    path switched off), and for dwconv_bn_act the bare op. Interleaved rounds of ``per_round`` calls, minimum."""
    from torch import nn
    from torchvision.ops.misc import Conv2dNormActivation, SqueezeExcitation

    torch.manual_seed(0)
    x = torch.randn(1, 16, 2, 2).contiguous(memory_format=torch.channels_last)
    natives = {"dwconv_bn_act k3 hardswish": Conv2dNormActivation(16, 16, 3, groups=16,
                                                                  activation_layer=nn.Hardswish),
               "squeeze_excite c16 s8": SqueezeExcitation(16, 8, scale_activation=nn.Hardsigmoid)}
    one_call = MF._in_one_call

    def python_path(*args: object, **kwargs: object) -> bool:
        return False
    lines = ["| layer (1x16x2x2) | native us | fused, one C++ call us | fused, Python path (session 4) us "
             "| op alone us |", "|---|---|---|---|---|"]
    for name, native in natives.items():
        native = native.eval().to(memory_format=torch.channels_last)
        fused = mnet_ext.fuse(nn.Sequential(native), backend="cuda").eval()
        calls = [lambda m=native: m(x), lambda m=fused: m(x)]

        def slow(fused: nn.Module = fused) -> object:
            MF._in_one_call = python_path
            try:
                return fused(x)
            finally:
                MF._in_one_call = one_call
        calls.append(slow)
        if name.startswith("dw"):
            calls.append(op_call(fused[0], x))
        def repeated(c: Callable[[], object], n: int = per_round) -> Callable[[], object]:
            def run() -> None:
                with torch.no_grad():
                    for _ in range(n):
                        c()
            return run
        times = [t * 1e3 / per_round for t in time_interleaved([repeated(c) for c in calls], rounds, 60.0)]
        op = f"{times[3]:.1f}" if len(times) > 3 else "-"
        lines.append(f"| {name} | {times[0]:.1f} | {times[1]:.1f} | {times[2]:.1f} | {op} |")
    return "\n".join(lines) + "\n"


def _category(evt: object) -> str:
    """The kind of a top-level op of a fused MobileNet's eval (torch.profiler event)."""
    name = evt.name
    if name.startswith("mnet_ext_cuda::dwconv_bn_act"):
        return "fused depthwise + BN + act"
    if name.startswith("mnet_ext_cuda::squeeze_excite"):
        return "fused SE"
    if name in ("aten::conv2d", "aten::convolution", "aten::_convolution"):
        weight = evt.input_shapes[1] if len(evt.input_shapes) > 1 else []
        return "1x1 convolutions (ATen: GEMM or oneDNN)" if list(weight[2:]) == [1, 1] else "other convolutions (stem)"
    if name == "aten::batch_norm":
        return "BatchNorm of the 1x1 convs (native, eval)"
    if name in ("aten::hardswish", "aten::hardswish_", "aten::relu_", "aten::relu", "aten::hardtanh_",
                "aten::hardtanh"):
        return "activations of the 1x1 convs (native)"
    if name in ("aten::add", "aten::add_"):
        return "residual adds"
    return "rest (pooling, classifier, views)"


def profile(models: list[str], batch: int, rounds: int) -> str:
    """Where a fused model's eval time goes: torch.profiler over ``rounds`` forwards of each fused channels_last
    model built with ``fold_batchnorm=False`` (so the other convs' BatchNorm shows as its own kind), top-level ops
    summed by kind (``_category``), with the native channels_last model's time, the Amdahl bound (the speedup over
    native if the fused layers took no time at all) and the default fused model (that BatchNorm folded into the
    convs in eval, ``mnet_ext.modules.FoldedConvBN``), timed alongside."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    lines = [f"batch {batch}, threads {torch.get_num_threads()}, {rounds} forwards profiled per model", "",
             "| model | kind | ms per forward | share |", "|---|---|---|---|"]
    notes = []
    for name in models:
        torch.manual_seed(0)
        native = MODEL_BUILDERS[name]().eval().to(memory_format=torch.channels_last)
        fused = mnet_ext.fuse(copy.deepcopy(native), backend="cuda", fold_batchnorm=False)
        folded = mnet_ext.fuse(copy.deepcopy(native), backend="cuda")
        x = torch.randn(batch, 3, 224, 224).contiguous(memory_format=torch.channels_last)
        with torch.no_grad():
            calls = [lambda m=native, x=x: m(x), lambda m=fused, x=x: m(x), lambda m=folded, x=x: m(x)]
            native_ms, fused_ms, folded_ms = time_interleaved(calls, rounds, 60.0)
            with torch_profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
                for _ in range(rounds):
                    fused(x)
        totals: dict[str, float] = {}
        for evt in prof.events():
            if evt.cpu_parent is None:
                kind = _category(evt)
                totals[kind] = totals.get(kind, 0.0) + evt.cpu_time_total / 1e3 / rounds
        whole = sum(totals.values())
        for kind, ms in sorted(totals.items(), key=lambda kv: -kv[1]):
            lines.append(f"| {name} | {kind} | {ms:.2f} | {ms / whole:.0%} |")
        fused_share = sum(ms for kind, ms in totals.items() if kind.startswith("fused")) / whole
        notes.append(f"{name}: native channels_last {native_ms:.1f} ms, fused {fused_ms:.1f} ms "
                     f"({native_ms / fused_ms:.2f}x) without the BatchNorm fold; fused layers {fused_share:.0%} of "
                     f"the fused model's time; "
                     f"with fused layers taking no time at all: {native_ms / (fused_ms * (1 - fused_share)):.2f}x; "
                     f"fused with the other convs' BatchNorm folded into them (the default): {folded_ms:.1f} ms "
                     f"({native_ms / folded_ms:.2f}x)")
    return "\n".join([*lines, "", *(f"- {n}" for n in notes)]) + "\n"


def bandwidth(cfg: LayerConfig | None, batch: int, fused_ms: float, copy_ms: float) -> dict[str, str]:
    """The copy_ms / fused_gbs / pct_copy_bw columns (empty where no copy was timed). The fused layer's bytes are
    the kernels' planned traffic (``mode_bytes``: dwconv reads x and writes y; SE reads x twice and writes y) plus,
    for SE, its two FC weights and biases (at batch 1 they outweigh the activation)."""
    if cfg is None or math.isnan(copy_ms):
        return dict(copy_ms="", fused_gbs="", pct_copy_bw="")
    nbytes = mode_bytes(cfg, "eval", batch, torch.float32)
    if cfg.kind == "squeeze_excite":
        nbytes += 4 * (2 * cfg.channels * cfg.squeeze + cfg.channels + cfg.squeeze)
    fused_gbs = nbytes / fused_ms / 1e6
    copy_gbs = 2 * activation_bytes(cfg, batch, torch.float32)[0] / copy_ms / 1e6
    return dict(copy_ms=f"{copy_ms:.4f}", fused_gbs=f"{fused_gbs:.2f}", pct_copy_bw=f"{100 * fused_gbs / copy_gbs:.1f}")


def geomean(v: list[float]) -> float:
    return math.exp(sum(math.log(x) for x in v) / len(v)) if v else math.nan


def markdown(rows: list[dict[str, object]], header: str) -> str:
    lines = [header, "", "| kind | mode | batch | threads | layers | speedup geomean | min | max "
             "| op alone: geomean | min |", "|---|---|---|---|---|---|---|---|---|---|"]
    groups: dict[tuple, list[dict[str, object]]] = {}
    for r in rows:
        groups.setdefault((r["kind"], r["mode"], r["batch"], r["threads"]), []).append(r)
    for (kind, mode, batch, threads), g in groups.items():
        v = [float(r["speedup"]) for r in g]
        o = [float(r["speedup_op"]) for r in g if r["speedup_op"]]
        op = f"{geomean(o):.2f}x | {min(o):.2f}x" if o else "- | -"
        lines.append(f"| {kind} | {mode} | {batch} | {threads} | {len(v)} | {geomean(v):.2f}x | {min(v):.2f}x | "
                     f"{max(v):.2f}x | {op} |")
    layers = [r for r in rows if r["pct_copy_bw"]]
    if layers:
        lines += ["", "Eval per layer: the fused layer's bytes per second against a copy of its input, weakest speedup "
                  "first.", "", "| layer | batch | threads | better native ms | fused ms | speedup | op alone "
                  "| fused GB/s | % of copy rate |", "|---|---|---|---|---|---|---|---|---|"]
        for r in sorted(layers, key=lambda r: float(r["speedup"])):
            native = min(float(r["native_nchw_ms"]), float(r["native_cl_ms"]))
            op = f"{float(r['speedup_op']):.2f}x" if r["speedup_op"] else "-"
            lines.append(f"| {r['layer']} | {r['batch']} | {r['threads']} | {native:.3f} | {float(r['fused_ms']):.3f} "
                         f"| {float(r['speedup']):.2f}x | {op} | {r['fused_gbs']} | {r['pct_copy_bw']} |")
    models = [r for r in rows if r["kind"] == "model"]
    if models:
        lines += ["", "| model | batch | threads | native NCHW ms | native channels_last ms | native channels_last, "
                  "BN folded (torch fx fuse) ms | fused ms | vs channels_last | vs better | vs channels_last folded |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for r in models:
            vs_cl = float(r["native_cl_ms"]) / float(r["fused_ms"])
            lines.append(f"| {r['layer']} | {r['batch']} | {r['threads']} | {float(r['native_nchw_ms']):.2f} | "
                         f"{float(r['native_cl_ms']):.2f} | {float(r['native_cl_fold_ms']):.2f} | "
                         f"{float(r['fused_ms']):.2f} | {vs_cl:.2f}x | {float(r['speedup']):.2f}x | "
                         f"{float(r['speedup_fold']):.2f}x |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--threads", default="1,0", help="thread counts; 0 = all cores")
    ap.add_argument("--modes", default="eval", help="eval and/or fwd_bwd")
    ap.add_argument("--kinds", default="dw,se", help="dw, se and/or model (whole models, eval)")
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--budget-s", type=float, default=2.0, help="time cap per case (after 3 rounds)")
    ap.add_argument("--model-budget-s", type=float, default=30.0, help="time cap per whole-model case")
    ap.add_argument("--filter", default="", help="only layers whose name contains this")
    ap.add_argument("--out", type=pathlib.Path, help="write OUT.csv and OUT.md")
    args = ap.parse_args(argv)
    before = torch.get_num_threads()
    try:
        return run(args)
    finally:
        torch.set_num_threads(before)  # main() is called from Python too (tests): leave the thread count as found


def run(args: argparse.Namespace) -> int:
    kinds = {"dw": "dwconv_bn_act", "se": "squeeze_excite"}
    want = {kinds[k] for k in args.kinds.split(",") if k in kinds}
    models = args.models.split(",") if {"model", "profile"} & set(args.kinds.split(",")) else []
    layers = [c for c in unique_layers(tuple(args.models.split(","))) if c.kind in want and args.filter in c.name]
    threads = [int(t) or os.cpu_count() or 1 for t in args.threads.split(",")]
    where = pathlib.Path(mnet_ext.__file__).parent
    header = (f"# CPU: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, load average "
              f"{os.getloadavg()[0]:.1f}, torch {torch.__version__}, mnet_ext from {where}, fp32, "
              f"min of up to {args.rounds} interleaved rounds")
    print(header)
    if args.kinds in ("overhead", "profile"):
        torch.set_num_threads(threads[0])
        batch = int(args.batches.split(",")[0])
        table = overhead(args.rounds) if args.kinds == "overhead" else profile(models, batch, args.rounds)
        print(table)
        if args.out:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.with_suffix(".md").write_text(f"{header}, threads {threads[0]}\n\n{table}")
        return 0
    print(",".join(COLUMNS))
    rows = []
    for nt in threads:
        torch.set_num_threads(nt)
        for mode in args.modes.split(","):
            for batch in (int(b) for b in args.batches.split(",")):
                cases = [(cfg.name, cfg.kind, cfg) for cfg in layers]
                cases += [(name, "model", None) for name in models] if mode == "eval" else []
                for name, kind, cfg in cases:
                    if cfg is None:
                        nchw, cl, fused, op, cl_fold = run_model(name, batch, args.rounds, args.model_budget_s)
                        copy_ms = math.nan
                    else:
                        nchw, cl, fused, op, copy_ms = run_case(cfg, mode, batch, args.rounds, args.budget_s)
                        cl_fold = math.nan
                    row = dict(layer=name, kind=kind, mode=mode, batch=batch, threads=nt,
                               native_nchw_ms=f"{nchw:.4f}", native_cl_ms=f"{cl:.4f}", fused_ms=f"{fused:.4f}",
                               speedup=f"{min(nchw, cl) / fused:.3f}",
                               op_ms="" if math.isnan(op) else f"{op:.4f}",
                               speedup_op="" if math.isnan(op) else f"{min(nchw, cl) / op:.3f}",
                               native_cl_fold_ms="" if math.isnan(cl_fold) else f"{cl_fold:.4f}",
                               speedup_fold="" if math.isnan(cl_fold) else f"{cl_fold / fused:.3f}",
                               **bandwidth(cfg, batch, fused, copy_ms))
                    rows.append(row)
                    print(",".join(str(row[c]) for c in COLUMNS), flush=True)
    print(markdown(rows, header))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        with open(args.out.with_suffix(".csv"), "w", newline="") as f:
            w = csv.DictWriter(f, COLUMNS)
            w.writeheader()
            w.writerows(rows)
        args.out.with_suffix(".md").write_text(markdown(rows, header))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
