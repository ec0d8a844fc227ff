"""``python -m mnet_ext.profile``: fuse a MobileNet, check it against native, time every fused layer.

For each fused layer it times the fused module against the native modules it replaced, on the input that layer
sees in the model, then the whole model; prints a per-layer table (shape, native ms, fused ms, speedup, % of the
measured copy bandwidth for the bytes the fused op must move) and writes a PNG bar chart. Runs on the GPU when one
is present, else on the CPU (and says so).
"""

from __future__ import annotations

import argparse
import copy
import sys
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

import mnet_ext
from mnet_ext._backend import resolve
from mnet_ext._timing import copy_bandwidth, time_ms
from mnet_ext.layers import MODEL_BUILDERS, fused_bytes

MODELS = MODEL_BUILDERS
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class LayerTiming:
    name: str
    kind: str
    shape: tuple[int, ...]
    native_ms: float
    fused_ms: float
    gbps: float

    @property
    def speedup(self) -> float:
        return self.native_ms / self.fused_ms


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


def layer_inputs(native: nn.Module, names: list[str], x: torch.Tensor) -> dict[str, torch.Tensor]:
    """The input each named module sees in one forward pass of the native model."""
    seen: dict[str, torch.Tensor] = {}
    modules = dict(native.named_modules())
    def record(name: str):
        def hook(module: nn.Module, args: tuple) -> None:
            seen.setdefault(name, args[0].detach())
        return hook

    hooks = [modules[n].register_forward_pre_hook(record(n)) for n in names]
    with torch.no_grad():
        native(x)
    for h in hooks:
        h.remove()
    return seen


def check_outputs(native: nn.Module, fused: nn.Module, x: torch.Tensor) -> float:
    """Max |fused - native| of the eval logits, relative to the largest native logit."""
    with torch.no_grad():
        ref, out = native.eval()(x).float(), fused.eval()(x).float()
    return ((out - ref).abs().max() / ref.abs().max().clamp(min=1e-12)).item()


def profile(model_name: str, batch: int, mode: str, backend: str | None, dtype: torch.dtype, resolution: int,
            channels_last: bool, device: torch.device, progress: bool = True) -> tuple[list[LayerTiming], dict]:
    from tqdm import tqdm

    torch.manual_seed(0)
    native = MODELS[model_name]().to(device=device, dtype=dtype)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    native = native.to(memory_format=fmt)
    fused = mnet_ext.fuse(copy.deepcopy(native), backend=backend)
    report = mnet_ext.explain_fuse(native)
    x = torch.randn(batch, 3, resolution, resolution, device=device, dtype=dtype).to(memory_format=fmt)
    summary = {"check_rel_error": check_outputs(native, fused, x[: min(batch, 8)]),
               "backend": resolve(backend, device.type), "fused_layers": len(report.fused)}
    names = [e.name for e in report.fused]
    inputs = layer_inputs(native.eval(), names, x)
    native_modules, fused_modules = dict(native.named_modules()), dict(fused.named_modules())
    native.train(mode == "train")
    fused.train(mode == "train")
    bandwidth = copy_bandwidth(device)
    rows = []
    for entry in tqdm(report.fused, desc=f"timing {model_name} layers", disable=not progress, file=sys.stderr):
        xin = inputs[entry.name]
        n_mod, f_mod = native_modules[entry.name], fused_modules[entry.name]
        native_ms = time_ms(_step(n_mod, xin, mode), device)
        fused_ms = time_ms(_step(f_mod, xin, mode), device)
        with torch.no_grad():
            y = f_mod.eval()(xin)
        f_mod.train(mode == "train")
        nbytes = fused_bytes(entry.kind, "eval" if mode == "eval" else "fwd_bwd", xin.nbytes, y.nbytes)
        gbps = nbytes / fused_ms / 1e6
        rows.append(LayerTiming(entry.name, entry.kind, tuple(xin.shape), native_ms, fused_ms, gbps))
    summary["model_native_ms"] = time_ms(_step(native, x, mode), device)
    summary["model_fused_ms"] = time_ms(_step(fused, x, mode), device)
    summary["copy_gbps"] = bandwidth
    return rows, summary


def format_table(rows: list[LayerTiming], summary: dict) -> str:
    bw = summary["copy_gbps"]
    lines = [f"{'layer':<22} {'op':<14} {'input shape':<20} {'native ms':>10} {'fused ms':>10} {'speedup':>8} "
             f"{'GB/s':>8} {'% copy bw':>9}"]
    for r in rows:
        lines.append(f"{r.name:<22} {r.kind:<14} {'x'.join(map(str, r.shape)):<20} {r.native_ms:>10.3f} "
                     f"{r.fused_ms:>10.3f} {r.speedup:>7.2f}x {r.gbps:>8.1f} {100 * r.gbps / bw:>8.1f}%")
    native_sum, fused_sum = sum(r.native_ms for r in rows), sum(r.fused_ms for r in rows)
    lines.append(f"{'fused layers total':<57} {native_sum:>10.3f} {fused_sum:>10.3f} {native_sum / fused_sum:>7.2f}x")
    m_n, m_f = summary["model_native_ms"], summary["model_fused_ms"]
    lines.append(f"{'whole model':<57} {m_n:>10.3f} {m_f:>10.3f} {m_n / m_f:>7.2f}x")
    return "\n".join(lines)


def plot(rows: list[LayerTiming], title: str, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(6.0, 0.4 * len(rows)), 4))
    colors = ["tab:blue" if r.kind == "dwconv_bn_act" else "tab:orange" for r in rows]
    ax.bar(range(len(rows)), [r.speedup for r in rows], color=colors)
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xticks(range(len(rows)), [r.name for r in rows], rotation=90, fontsize=7)
    ax.set_ylabel("speedup over native (x)")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=sorted(MODELS), default="mobilenet_v3_large")
    parser.add_argument("--batch", type=int, default=None, help="default: 128 on a GPU, 8 on the CPU")
    parser.add_argument("--mode", choices=("eval", "train"), default="eval")
    parser.add_argument("--backend", choices=("auto", *mnet_ext._backend.BACKENDS), default="auto")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default: bf16 on a GPU, fp32 on CPU")
    parser.add_argument("--resolution", type=int, default=224)
    parser.add_argument("--nchw", action="store_true", help="NCHW instead of channels_last")
    parser.add_argument("--plot", default="mnet_ext_profile.png", help="PNG path for the bar chart ('' = none)")
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    args = parser.parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    on_gpu = device.type == "cuda"
    batch = args.batch or (128 if on_gpu else 8)
    dtype = DTYPES[args.dtype or ("bf16" if on_gpu else "fp32")]
    where = torch.cuda.get_device_name(device) if on_gpu else f"CPU ({torch.get_num_threads()} threads)"
    if not on_gpu:
        print("No GPU: profiling on the CPU with the CPU backends (these are CPU numbers, not GPU numbers).")
    rows, summary = profile(args.model, batch, args.mode, None if args.backend == "auto" else args.backend, dtype,
                            args.resolution, not args.nchw, device)
    title = (f"{args.model} {args.mode} batch {batch} {dtype} {'NCHW' if args.nchw else 'channels_last'} on {where}, "
             f"backend {summary['backend']}")
    print(title)
    print(f"fused {summary['fused_layers']} layers; eval logits vs native: max relative error "
          f"{summary['check_rel_error']:.2e}; measured copy bandwidth {summary['copy_gbps']:.0f} GB/s")
    print(format_table(rows, summary))
    if args.plot:
        plot(rows, title, args.plot)
        print(f"bar chart: {args.plot}")
    tolerance = 1e-3 if dtype == torch.float32 else 5e-2
    if summary["check_rel_error"] > tolerance:
        print(f"ERROR: fused logits differ from native by {summary['check_rel_error']:.2e} (> {tolerance})")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
