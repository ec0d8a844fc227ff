"""``python -m mnet_ext.profile`` (or ``mnet-ext-profile``): fuse a MobileNet, check it against native, and show
where its work, parameters, memory traffic and time go, per layer type and per fused layer.

The per-layer-type table is the MobileNet V1 paper's Table 2 (resource per layer type) extended by what decides
speed on a GPU: for dw conv, 1x1 conv, SE, first conv, classifier and other layers it gives the Mult-Adds and
parameters (share of the model), the activation bytes the eval forward moves (native modules one by one, and with
the fused kernels) and the measured time share, native and fused. Depthwise layers carry ~3 % of V1's Mult-Adds but
a far larger share of its bytes and time: that is why fusing them pays.

Every layer (a conv+BN+act container, a squeeze-excitation, the classifier, or a module outside those) is timed on
the input it sees in the model; a fused layer is timed interleaved with the native modules it replaced (medians,
per-pair ratio with its interquartile range; a ``!`` marks a ratio whose spread makes it meaningless, see
``mnet_ext._timing``). A layer the fusion leaves unchanged is timed once and counts for both columns. Runs on the GPU
when one is present, else on the CPU (and says so). ``--plot PATH`` writes a chart (needs ``mnet_ext[plot]``).
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import sys
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn
from torchvision.ops import SqueezeExcitation

import mnet_ext
from mnet_ext._backend import resolve
from mnet_ext._timing import PairTiming, Spread, copy_bandwidth, time_pair, time_samples
from mnet_ext.layers import MODEL_BUILDERS, fused_bytes

MODELS = MODEL_BUILDERS
WIDTH_MODELS = ("mobilenet_v1", "mobilenet_v2")  # the builders that take a width multiplier (width_mult)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
CATEGORIES = ("dw conv", "1x1 conv", "SE", "first conv", "classifier", "other")
_NORMS = (nn.BatchNorm2d, nn.GroupNorm, nn.LayerNorm)
PLOT_HINT = "plotting needs matplotlib: pip install 'mnet_ext[plot]' (or pip install matplotlib)"


@dataclass
class Unit:
    """One timed layer of the model: a conv+norm+act container, an SE, the classifier, or a lone module."""

    name: str
    category: str
    macs: int = 0  # per image
    params: int = 0
    bytes_native: int = 0  # per image, eval forward: input + output bytes of every module that ran
    bytes_fused: int = 0
    fused_kind: str | None = None  # "dwconv_bn_act" / "squeeze_excite" when the fusion replaced it
    shape: tuple[int, ...] = ()  # input shape
    native: Spread | None = None  # ms
    fused: Spread | None = None  # ms (the native timing when the fusion leaves the layer unchanged)
    pair: PairTiming | None = field(default=None, repr=False)  # native vs fused, interleaved (fused layers only)


def _conv_category(conv: nn.Conv2d, first: bool) -> str:
    if first:
        return "first conv"
    if conv.groups > 1 and conv.groups == conv.in_channels == conv.out_channels:
        return "dw conv"
    if conv.kernel_size == (1, 1) and conv.groups == 1:
        return "1x1 conv"
    return "other"


def _is_conv_container(module: nn.Module) -> bool:
    """[Conv2d, norm, activation...] as in torchvision's Conv2dNormActivation: only the conv and the norm have
    parameters."""
    children = list(module.children())
    return (len(children) >= 2 and isinstance(children[0], nn.Conv2d) and isinstance(children[1], _NORMS)
            and all(not list(c.children()) and not list(c.parameters()) for c in children[2:]))


def find_units(model: nn.Module) -> list[tuple[str, nn.Module, str]]:
    """(name, module, layer type) of the layers of ``model`` in registration order, which is forward order for the
    MobileNets. The first convolution found is the "first conv"; a norm directly after a lone conv in the same
    parent (MobileNet V2's projection) belongs to that conv's type; the top-level ``classifier`` is one layer."""
    units: list[tuple[str, nn.Module, str]] = []
    seen_conv = False

    def visit(prefix: str, module: nn.Module) -> None:
        nonlocal seen_conv
        previous: str | None = None  # category of the previous sibling when it was a lone conv
        for name, child in module.named_children():
            qual = f"{prefix}.{name}" if prefix else name
            if qual == "classifier":
                units.append((qual, child, "classifier"))
            elif isinstance(child, SqueezeExcitation):
                units.append((qual, child, "SE"))
            elif isinstance(child, nn.Conv2d) or _is_conv_container(child):
                conv = child if isinstance(child, nn.Conv2d) else next(iter(child.children()))
                category = _conv_category(conv, not seen_conv)
                seen_conv = True
                units.append((qual, child, category))
                previous = category if isinstance(child, nn.Conv2d) else None
                continue
            elif isinstance(child, _NORMS) and previous is not None:
                units.append((qual, child, previous))
            elif not list(child.children()):
                units.append((qual, child, "classifier" if isinstance(child, nn.Linear) else "other"))
            else:
                visit(qual, child)
            previous = None

    visit("", model)
    return units


def _nbytes(value: object) -> int:
    if isinstance(value, torch.Tensor):
        return value.nbytes
    if isinstance(value, (tuple, list)):
        return sum(_nbytes(v) for v in value)
    return 0


def _macs(module: nn.Module, out: torch.Tensor) -> int:
    if isinstance(module, nn.Conv2d):
        kh, kw = module.kernel_size
        return out.numel() * (module.in_channels // module.groups) * kh * kw
    if isinstance(module, nn.Linear):
        return out.numel() * module.in_features
    return 0


def count_units(native: nn.Module, fused: nn.Module, x: torch.Tensor) -> tuple[list[Unit], dict[str, torch.Tensor]]:
    """The layers of ``native`` with their Mult-Adds, parameters and eval-forward activation bytes per image
    (native: every leaf module that runs; fused: the fused modules' own reads and writes, ``fused_bytes``), and the
    input each layer sees."""
    batch = x.shape[0]
    fused_modules = dict(fused.named_modules())
    units: list[Unit] = []
    inputs: dict[str, torch.Tensor] = {}
    hooks = []

    def leaf_hook(unit: Unit) -> Callable:
        def hook(module: nn.Module, args: tuple, out: object) -> None:
            unit.macs += _macs(module, out) // batch
            unit.bytes_native += (_nbytes(args) + _nbytes(out)) // batch
        return hook

    def input_hook(name: str) -> Callable:
        def hook(module: nn.Module, args: tuple) -> None:
            inputs.setdefault(name, args[0].detach())
        return hook

    for name, module, category in find_units(native):
        unit = Unit(name, category, params=sum(p.numel() for p in module.parameters()))
        replacement = fused_modules[name]
        if isinstance(replacement, mnet_ext.FusedConvBNAct):
            unit.fused_kind = "dwconv_bn_act"
        elif isinstance(replacement, mnet_ext.FusedSqueezeExcitation):
            unit.fused_kind = "squeeze_excite"
        units.append(unit)
        hooks.append(module.register_forward_pre_hook(input_hook(name)))
        leaves = [m for m in module.modules() if not list(m.children())] or [module]
        hooks += [leaf.register_forward_hook(leaf_hook(unit)) for leaf in leaves]
    with torch.no_grad():
        y = native.eval()(x)
    for h in hooks:
        h.remove()
    for unit in units:
        unit.shape = tuple(inputs[unit.name].shape)
        if unit.fused_kind is None:
            unit.bytes_fused = unit.bytes_native
        else:
            with torch.no_grad():
                y = fused_modules[unit.name].eval()(inputs[unit.name])
            unit.bytes_fused = fused_bytes(unit.fused_kind, "eval", inputs[unit.name].nbytes, y.nbytes) // batch
    return units, inputs


def _step(module: nn.Module, x: torch.Tensor, mode: str) -> Callable[[], object]:
    if mode == "eval":
        def run() -> object:
            with torch.no_grad():
                return module(x)
        return run
    xg = x.detach().requires_grad_()

    def run_train() -> object:
        y = module(xg)
        y.backward(torch.ones_like(y))
        return y
    return run_train


def check_outputs(native: nn.Module, fused: nn.Module, x: torch.Tensor) -> float:
    """Max |fused - native| of the eval logits, relative to the largest native logit."""
    with torch.no_grad():
        ref, out = native.eval()(x).float(), fused.eval()(x).float()
    return ((out - ref).abs().max() / ref.abs().max().clamp(min=1e-12)).item()


def build_model(model_name: str, width: float | None) -> nn.Module:
    if width is None:
        return MODELS[model_name]()
    if model_name not in WIDTH_MODELS:
        raise ValueError(f"--width: only {', '.join(WIDTH_MODELS)} take a width multiplier, not {model_name}")
    return MODELS[model_name](width_mult=width)


def profile(model_name: str, batch: int, mode: str, backend: str | None, dtype: torch.dtype, resolution: int,
            channels_last: bool, device: torch.device, progress: bool = True, width: float | None = None,
            min_time: float = 0.2, min_reps: int = 5) -> tuple[list[Unit], dict]:
    """Count and time every layer of ``model_name`` native and fused (see the module docstring)."""
    from tqdm import tqdm

    torch.manual_seed(0)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    native = build_model(model_name, width).to(device=device, dtype=dtype).to(memory_format=fmt)
    fused = mnet_ext.fuse(copy.deepcopy(native), backend=backend)
    x = torch.randn(batch, 3, resolution, resolution, device=device, dtype=dtype).to(memory_format=fmt)
    summary = {"check_rel_error": check_outputs(native, fused, x[: min(batch, 8)]),
               "backend": resolve(backend, device.type),
               "fused_layers": sum(e.fused for e in mnet_ext.explain_fuse(native).entries)}
    units, inputs = count_units(native, fused, x)
    native.train(mode == "train")
    fused.train(mode == "train")
    native_modules, fused_modules = dict(native.named_modules()), dict(fused.named_modules())
    timing = {"min_time": min_time, "min_pairs": min_reps}
    for unit in tqdm(units, desc=f"timing {model_name} layers", disable=not progress, file=sys.stderr):
        xin = inputs[unit.name]
        run_native = _step(native_modules[unit.name], xin, mode)
        if unit.fused_kind is None:
            unit.native = unit.fused = Spread.of(time_samples(run_native, device, min_time, min_reps=min_reps))
        else:
            unit.pair = time_pair(run_native, _step(fused_modules[unit.name], xin, mode), device, **timing)
            unit.native, unit.fused = unit.pair.a, unit.pair.b
    summary["model"] = time_pair(_step(native, x, mode), _step(fused, x, mode), device, **timing)
    summary["copy_gbps"] = copy_bandwidth(device)
    return units, summary


@dataclass
class CategoryRow:
    category: str
    layers: int = 0
    macs: int = 0
    params: int = 0
    bytes_native: int = 0
    bytes_fused: int = 0
    native_ms: float = 0.0
    fused_ms: float = 0.0


def by_category(units: list[Unit]) -> list[CategoryRow]:
    """Per-layer-type sums (times: of the per-layer medians), in the order of ``CATEGORIES``."""
    rows = {c: CategoryRow(c) for c in CATEGORIES}
    for u in units:
        r = rows[u.category]
        r.layers += 1
        r.macs += u.macs
        r.params += u.params
        r.bytes_native += u.bytes_native
        r.bytes_fused += u.bytes_fused
        r.native_ms += u.native.median if u.native else 0.0
        r.fused_ms += u.fused.median if u.fused else 0.0
    return [rows[c] for c in CATEGORIES]


def _pct(part: float, total: float) -> str:
    return f"{100 * part / total:5.1f}%" if total > 0 else "    -"


def format_category_table(units: list[Unit], timed: bool = True) -> str:
    """Table 2 of the MobileNet V1 paper, per layer type, plus bytes and (when ``timed``) measured time."""
    rows = by_category(units)
    tot = CategoryRow("total", *(sum(getattr(r, f) for r in rows) for f in
                                 ("layers", "macs", "params", "bytes_native", "bytes_fused", "native_ms", "fused_ms")))
    head = (f"{'layer type':<11} {'layers':>6} {'Mult-Adds (M)':>14} {'params (M)':>14} "
            f"{'act. MB native':>15} {'fused':>14}")
    if timed:
        head += f" {'native ms':>16} {'fused ms':>16}"
    lines = [head]
    for r in [*rows, tot]:
        line = (f"{r.category:<11} {r.layers:>6} {r.macs / 1e6:>7.1f} {_pct(r.macs, tot.macs)} "
                f"{r.params / 1e6:>7.3f} {_pct(r.params, tot.params)} {r.bytes_native / 1e6:>8.2f} "
                f"{_pct(r.bytes_native, tot.bytes_native)} {r.bytes_fused / 1e6:>7.2f} "
                f"{_pct(r.bytes_fused, tot.bytes_fused)}")
        if timed:
            line += (f" {r.native_ms:>9.3f} {_pct(r.native_ms, tot.native_ms)} {r.fused_ms:>9.3f} "
                     f"{_pct(r.fused_ms, tot.fused_ms)}")
        lines.append(line)
    lines.append("Mult-Adds and params per image (params include the norms of their layer); act. MB: bytes read and "
                 "written per image by the eval forward; ms: sums of per-layer medians, % of their total.")
    return "\n".join(lines)


def _range(s: Spread) -> str:
    return f"{s.median:.3f} [{s.q1:.3f}-{s.q3:.3f}]"


def format_fused_table(units: list[Unit], summary: dict) -> str:
    """Per fused layer: native and fused medians with their interquartile ranges, and the speedup."""
    fused = [u for u in units if u.pair is not None]
    lines = [f"{'layer':<24} {'op':<14} {'input shape':<18} {'native ms [IQR]':>24} {'fused ms [IQR]':>24} "
             f"{'speedup [IQR]':>21} {'GB/s':>7}"]
    model: PairTiming = summary["model"]
    flagged = False
    for u in [*fused, None]:
        pair = model if u is None else u.pair
        r = pair.ratio
        flagged |= not r.meaningful
        name, kind, shape, gbps = ("whole model", "", "", "")
        if u is not None:
            name, kind, shape = u.name, u.fused_kind, "x".join(map(str, u.shape))
            gbps = f"{u.bytes_fused * u.shape[0] / pair.b.median / 1e6:7.1f}" if pair.b.median > 0 else "-"
        lines.append(f"{name:<24} {kind:<14} {shape:<18} {_range(pair.a):>24} {_range(pair.b):>24} "
                     f"{r.format()} [{r.spread.q1:.2f}-{r.spread.q3:.2f}] {gbps:>7}")
    if flagged:
        lines.append("! the middle half of the per-pair speedups spans more than 20% of the median: timing noise "
                     "(a busy machine) is as large as the effect, so that speedup means nothing.")
    lines.append("GB/s: bytes a fused eval forward must move (mnet_ext.layers.fused_bytes) per fused median time; "
                 f"measured copy bandwidth {summary['copy_gbps']:.0f} GB/s.")
    return "\n".join(lines)


def plot(units: list[Unit], title: str, path: str) -> None:
    """Left: each layer type's share of Mult-Adds, parameters, bytes and time; right: speedup per fused layer."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = by_category(units)
    measures = {"Mult-Adds": "macs", "params": "params", "bytes native": "bytes_native",
                "bytes fused": "bytes_fused", "time native": "native_ms", "time fused": "fused_ms"}
    fused = [u for u in units if u.pair is not None]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(8 + 0.25 * len(fused), 4.5),
                                   gridspec_kw={"width_ratios": [1, max(1.0, len(fused) / 12)]})
    width = 0.8 / len(measures)
    for i, (label, attr) in enumerate(measures.items()):
        total = sum(getattr(r, attr) for r in rows) or 1.0
        ax1.bar([j + i * width for j in range(len(rows))], [100 * getattr(r, attr) / total for r in rows], width,
                label=label)
    ax1.set_xticks([j + 0.4 - width / 2 for j in range(len(rows))], [r.category for r in rows], rotation=30)
    ax1.set_ylabel("% of the model")
    ax1.set_title("per layer type", fontsize=8)
    ax1.legend(fontsize=7)
    ratios = [u.pair.ratio for u in fused]
    ax2.bar(range(len(fused)), [r.value for r in ratios],
            yerr=[[r.value - r.spread.q1 for r in ratios], [r.spread.q3 - r.value for r in ratios]],
            color=["tab:blue" if r.meaningful else "lightgrey" for r in ratios])
    ax2.axhline(1.0, color="black", linewidth=0.8)
    ax2.set_xticks(range(len(fused)), [u.name for u in fused], rotation=90, fontsize=6)
    ax2.set_ylabel("speedup over native (x)")
    ax2.set_title("per fused layer: median, IQR bars; grey = spread too large", fontsize=8)
    fig.suptitle(title, fontsize=8, y=0.995)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mnet-ext-profile", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=sorted(MODELS), default="mobilenet_v3_large")
    parser.add_argument("--width", type=float, default=None,
                        help="width multiplier alpha (mobilenet_v1/v2; the paper's Table 6: 1, 0.75, 0.5, 0.25)")
    parser.add_argument("--resolution", type=int, default=224,
                        help="input resolution (the paper's rho, Table 7: 224, 192, 160, 128)")
    parser.add_argument("--batch", type=int, default=None, help="default: 128 on a GPU, 8 on the CPU")
    parser.add_argument("--mode", choices=("eval", "train"), default="eval")
    parser.add_argument("--backend", choices=("auto", *mnet_ext._backend.BACKENDS), default="auto")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default: bf16 on a GPU, fp32 on CPU")
    parser.add_argument("--nchw", action="store_true", help="NCHW instead of channels_last")
    parser.add_argument("--plot", default="", metavar="PNG", help="write a chart there (needs mnet_ext[plot])")
    parser.add_argument("--counts-only", action="store_true",
                        help="only the per-layer-type Mult-Adds/params/bytes table: no fusion check, no timing")
    parser.add_argument("--min-time", type=float, default=0.2,
                        help="seconds of repetitions per timed layer, at least --min-reps (default 0.2)")
    parser.add_argument("--min-reps", type=int, default=5, help="fewest repetitions (native/fused pairs) per layer")
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    args = parser.parse_args(argv)
    if args.plot and importlib.util.find_spec("matplotlib") is None:
        print(f"mnet-ext-profile: --plot: {PLOT_HINT}", file=sys.stderr)
        return 2
    if args.width is not None and args.model not in WIDTH_MODELS:
        parser.error(f"--width: only {', '.join(WIDTH_MODELS)} take a width multiplier, not {args.model}")
    if args.resolution < 32 or args.min_reps < 1 or args.min_time < 0:
        parser.error("--resolution must be >= 32, --min-reps >= 1, --min-time >= 0")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    on_gpu = device.type == "cuda"
    batch = args.batch or (128 if on_gpu else 8)
    dtype = DTYPES[args.dtype or ("bf16" if on_gpu else "fp32")]
    alpha = f" alpha {args.width}" if args.width is not None else ""
    if args.counts_only:
        torch.manual_seed(0)
        model = build_model(args.model, args.width)
        units, _ = count_units(model, mnet_ext.fuse(copy.deepcopy(model)), torch.randn(1, 3, args.resolution,
                                                                                        args.resolution))
        print(f"{args.model}{alpha} at {args.resolution}x{args.resolution}, fp32")
        print(format_category_table(units, timed=False))
        return 0
    where = torch.cuda.get_device_name(device) if on_gpu else f"CPU ({torch.get_num_threads()} threads)"
    if not on_gpu:
        print("No GPU: profiling on the CPU with the CPU backends (these are CPU numbers, not GPU numbers).")
    units, summary = profile(args.model, batch, args.mode, None if args.backend == "auto" else args.backend, dtype,
                             args.resolution, not args.nchw, device, width=args.width, min_time=args.min_time,
                             min_reps=args.min_reps)
    title = (f"{args.model}{alpha} {args.resolution}px {args.mode} batch {batch} {str(dtype).split('.')[-1]} "
             f"{'NCHW' if args.nchw else 'channels_last'} on {where}, backend {summary['backend']}")
    print(title)
    print(f"fused {summary['fused_layers']} layers; eval logits vs native: max relative error "
          f"{summary['check_rel_error']:.2e}")
    print()
    print(format_category_table(units))
    print()
    print(format_fused_table(units, summary))
    if args.plot:
        plot(units, title, args.plot)
        print(f"chart: {args.plot}")
    tolerance = 1e-3 if dtype == torch.float32 else 5e-2
    if summary["check_rel_error"] > tolerance:
        print(f"ERROR: fused logits differ from native by {summary['check_rel_error']:.2e} (> {tolerance})")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
