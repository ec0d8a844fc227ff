"""Per-op benchmark driver shared by ``bench_dwconv_bn_act.py`` and ``bench_squeeze_excite.py``.

Every provider runs side by side in one process on the unique layers of the requested models
(``mnet_ext.layers.unique_layers``), one CSV row per op/layer/dtype/mode/provider:

| provider | what runs |
|---|---|
| ``eager_nchw`` | the native module (``Conv2dNormActivation`` / torchvision ``SqueezeExcitation``), NCHW |
| ``eager_channels_last`` | the same, channels_last |
| ``compile`` | ``torch.compile`` of the native module (default mode; ``--max-autotune`` optional), ``--layout`` |
| ``mnet_ext_cuda`` / ``mnet_ext_triton`` / ``mnet_ext_reference`` | the fused module pinned to that backend |
| ``copy`` | a device copy of the bytes the mode must move: the roofline probe |

A provider that cannot run is still a row: ``status=skipped`` and the reason (errors: ``status=error``).

Bytes per mode: what the fused kernels must move (PERF-NOTES), the same figure for every provider, so GB/s is an
effective bandwidth. ``A_in`` = bytes of x, ``A_out`` = bytes of y (= bytes of dy); for SE, A = A_in = A_out:

| mode | what is timed | dwconv_bn_act bytes | squeeze_excite bytes |
|---|---|---|---|
| ``eval`` | forward with running statistics, no autograd | A_in + A_out | 3A |
| ``train_fwd`` | training forward incl. batch statistics (autograd recording) | 2 A_in + A_out | 3A |
| ``bwd`` | backward alone: dx and every weight gradient (graph retained) | 3 A_in + 2 A_out | 4A |
| ``fwd_bwd`` | training forward + backward | 5 A_in + 3 A_out | 7A |
| ``wgrad`` | weight gradient alone (see below) | A_in + A_out | skipped |

dwconv: eval reads x, writes y; train_fwd = stats pass (reads x) + apply pass (reads x, writes y); bwd = bwd_reduce
(reads dy, x) + bwd_apply (reads dy, x, writes dx); wgrad reads dy and x: eager/compile time
``torch.nn.grad.conv2d_weight``, mnet_ext the ``bwd_apply`` primitive (which also writes dx: its bytes are
undercounted by A_in). SE: pool reads x, scale reads x and writes y; bwd_reduce reads dy, x, bwd_apply reads dy,
writes dx; no wgrad row (its FC weights act on [N, C] tensors).

Timing. CUDA: ``triton.testing.do_bench`` (median and 20/80 % quantiles; it zeroes a buffer larger than L2 before
every repetition, so repeats do not measure the cache). For small layers (eval bytes below the L2 size) a second
column, ``graph_ms``: one CUDA graph replaying the call over rotating input buffers totalling > 2x L2, divided by
the number of calls (no launch overhead, no cache reuse). CPU: ``time.perf_counter`` medians (and quantiles) with
no cache flush.
"""

from __future__ import annotations

import argparse
import copy
import csv
import math
import pathlib
import platform
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

import mnet_ext
from bench import report
from mnet_ext._backend import available_backends, load
from mnet_ext._timing import copy_bandwidth, quantiles, time_samples
from mnet_ext.layers import MODEL_BUILDERS, LayerConfig, fused_bytes, unique_layers
from mnet_ext.reference import output_hw, padding_for

ROOT = pathlib.Path(__file__).resolve().parents[1]
PROVIDERS = ("eager_nchw", "eager_channels_last", "compile", "mnet_ext_cuda", "mnet_ext_triton",
             "mnet_ext_reference", "copy")
DEFAULT_PROVIDERS = {
    "cuda": ("eager_nchw", "eager_channels_last", "compile", "mnet_ext_cuda", "mnet_ext_triton", "copy"),
    "cpu": ("eager_nchw", "eager_channels_last", "mnet_ext_cuda", "mnet_ext_reference", "copy"),
}
MODES = ("eval", "train_fwd", "bwd", "fwd_bwd", "wgrad")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
COLUMNS = [
    "op", "layer", "models", "batch", "channels", "height", "width", "kernel", "stride", "dilation", "act",
    "dtype", "layout", "mode", "provider", "status", "reason", "ms", "ms_p20", "ms_p80", "graph_ms", "bytes",
    "gbps", "pct_copy_bw", "pct_same_size_copy", "speedup_vs_eager_nchw", "speedup_vs_eager_channels_last",
    "speedup_vs_compile", "copy_peak_gbps", "timing", "device", "torch", "triton", "cuda", "commit",
]
L2_FALLBACK = 50 << 20


# ----------------------------------------------------------------------------------------------- environment
def commit_id() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out.stdout.strip() if out.returncode == 0 and out.stdout.strip() else "unknown"


def env_info(device: torch.device) -> dict[str, str]:
    """Columns naming where and with what a row was measured."""
    try:
        import triton

        triton_version = triton.__version__
    except Exception:  # not installed, or broken: the row says so
        triton_version = "none"
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = f"CPU {platform.processor() or platform.machine()} ({torch.get_num_threads()} threads)"
    return {"device": name, "torch": torch.__version__, "triton": triton_version,
            "cuda": torch.version.cuda or "none", "commit": commit_id()}


def l2_bytes(device: torch.device) -> int:
    if device.type != "cuda":
        return L2_FALLBACK
    return int(getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 0) or L2_FALLBACK)


def provider_unavailable(provider: str, device: torch.device) -> str | None:
    """None when ``provider`` can run on ``device``; otherwise why not (recorded in the row)."""
    if provider == "mnet_ext_triton" and device.type == "cpu":
        return "Triton runs CPU tensors only in its interpreter, which is a correctness tool, not a benchmark"
    if provider.startswith("mnet_ext_"):
        reason = available_backends(device.type)[provider.removeprefix("mnet_ext_")]
        return None if reason is None else f"backend unavailable: {reason}"
    if provider == "compile" and not hasattr(torch, "compile"):
        return "torch.compile is missing from this torch"
    return None


# ----------------------------------------------------------------------------------------------- bytes
def activation_bytes(cfg: LayerConfig, batch: int, dtype: torch.dtype) -> tuple[int, int]:
    """(A_in, A_out): bytes of x and of y for this layer."""
    item = torch.empty((), dtype=dtype).element_size()
    a_in = batch * cfg.channels * cfg.height * cfg.width * item
    if cfg.kind != "dwconv_bn_act":
        return a_in, a_in
    ho, wo = output_hw(cfg.height, cfg.width, cfg.kernel_size, cfg.stride, cfg.dilation)
    return a_in, batch * cfg.channels * ho * wo * item


def mode_bytes(cfg: LayerConfig, mode: str, batch: int, dtype: torch.dtype) -> int:
    """Bytes the fused kernels must move in ``mode`` (the table in the module docstring)."""
    return fused_bytes(cfg.kind, mode, *activation_bytes(cfg, batch, dtype))


def mode_skip_reason(cfg: LayerConfig, mode: str) -> str | None:
    if mode == "wgrad" and cfg.kind != "dwconv_bn_act":
        return "squeeze_excite has no weight gradient over the activation (its FC weights act on [N, C])"
    return None


# ----------------------------------------------------------------------------------------------- cases
@dataclass
class Setup:
    device: torch.device
    dtype: torch.dtype
    batch: int
    layout: torch.memory_format  # for compile and mnet_ext_* (eager_* fix their own)
    max_autotune: bool = False


def provider_format(provider: str, setup: Setup) -> torch.memory_format:
    return {"eager_nchw": torch.contiguous_format, "eager_channels_last": torch.channels_last}.get(
        provider, setup.layout)


def build_native(cfg: LayerConfig, setup: Setup, fmt: torch.memory_format) -> nn.Module:
    torch.manual_seed(0)
    native = cfg.make_native()
    for m in native.modules():
        if isinstance(m, nn.BatchNorm2d):  # non-trivial statistics (timing does not depend on them)
            m.running_mean.normal_(0, 0.1)
            m.running_var.uniform_(0.5, 2.0)
    return native.to(device=setup.device, dtype=setup.dtype, memory_format=fmt)


def build_module(cfg: LayerConfig, provider: str, native: nn.Module) -> nn.Module:
    if not provider.startswith("mnet_ext_"):
        return native
    fused = mnet_ext.fuse(nn.Sequential(copy.deepcopy(native)), backend=provider.removeprefix("mnet_ext_"))[0]
    expected = "FusedConvBNAct" if cfg.kind == "dwconv_bn_act" else "FusedSqueezeExcitation"
    if type(fused).__name__ != expected:
        raise RuntimeError(f"mnet_ext.fuse left {type(fused).__name__} unfused")
    return fused


def compile_fn(fn: Callable, setup: Setup, cache: dict[str, Callable], key: str) -> Callable:
    """``torch.compile(fn)``, once per case (``cache``): the graph column reuses it for its rotating buffers."""
    if key not in cache:
        torch._dynamo.reset()  # each case compiles afresh: no recompile limit falling back to eager silently
        cache[key] = torch.compile(fn, mode="max-autotune" if setup.max_autotune else None)
    return cache[key]


def make_call(cfg: LayerConfig, provider: str, mode: str, module: nn.Module, native: nn.Module, setup: Setup,
              x: torch.Tensor, dy: torch.Tensor, nbytes: int, cache: dict[str, Callable]) -> Callable[[], object]:
    """A no-argument call running ``mode`` of ``provider`` on the input ``x`` (and output gradient ``dy``)."""
    if provider == "copy":
        src = torch.empty(max(nbytes // 2, 1), dtype=torch.uint8, device=setup.device)
        dst = torch.empty_like(src)
        return lambda: dst.copy_(src)
    if mode == "wgrad":
        return _wgrad_call(cfg, provider, native, setup, x, dy, cache)
    module.train(mode != "eval")
    fwd = compile_fn(module, setup, cache, mode) if provider == "compile" else module
    if mode == "eval":
        def run_eval() -> object:
            with torch.no_grad():
                return fwd(x)
        return run_eval
    xg = x.detach().requires_grad_()
    inputs = [xg, *(p for p in module.parameters() if p.requires_grad)]
    if mode == "train_fwd":
        return lambda: fwd(xg)
    if mode == "bwd":
        y = fwd(xg)
        return lambda: torch.autograd.grad(y, inputs, dy, retain_graph=True)
    return lambda: torch.autograd.grad(fwd(xg), inputs, dy)  # fwd_bwd


def _wgrad_call(cfg: LayerConfig, provider: str, native: nn.Module, setup: Setup, x: torch.Tensor,
                dy: torch.Tensor, cache: dict[str, Callable]) -> Callable[[], object]:
    conv, bn = native[0], native[1]
    weight = conv.weight.detach()
    if provider.startswith("mnet_ext_"):
        impl = load(provider.removeprefix("mnet_ext_"))
        f32 = {"dtype": torch.float32, "device": setup.device}
        mean = bn.running_mean.detach().to(**f32)
        invstd = torch.rsqrt(bn.running_var.detach().to(**f32) + bn.eps)
        gamma, beta = bn.weight.detach().to(**f32), bn.bias.detach().to(**f32)
        mean_g = torch.randn(cfg.channels, **f32) * 1e-2  # a training backward's finalize terms
        mean_g_xhat = torch.randn(cfg.channels, **f32) * 1e-2
        args = (dy, x, weight, mean, invstd, gamma, beta, mean_g, mean_g_xhat, cfg.stride, cfg.dilation, cfg.act)
        return lambda: impl.dwconv_bn_act_bwd_apply(*args)
    padding = padding_for(cfg.kernel_size, cfg.dilation)

    def wgrad(x: torch.Tensor, dz: torch.Tensor) -> torch.Tensor:
        return torch.nn.grad.conv2d_weight(x, weight.shape, dz, cfg.stride, padding, cfg.dilation, cfg.channels)

    fn = compile_fn(wgrad, setup, cache, "wgrad") if provider == "compile" else wgrad
    return lambda: fn(x, dy)


def make_inputs(cfg: LayerConfig, setup: Setup, fmt: torch.memory_format) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.randn(setup.batch, cfg.channels, cfg.height, cfg.width, device=setup.device, dtype=setup.dtype)
    if cfg.kind == "dwconv_bn_act":
        ho, wo = output_hw(cfg.height, cfg.width, cfg.kernel_size, cfg.stride, cfg.dilation)
    else:
        ho, wo = cfg.height, cfg.width
    dy = torch.randn(setup.batch, cfg.channels, ho, wo, device=setup.device, dtype=setup.dtype)
    return x.contiguous(memory_format=fmt), dy.contiguous(memory_format=fmt)


# ----------------------------------------------------------------------------------------------- timing
@dataclass
class Timer:
    device: torch.device
    quick: bool = False
    warmup_ms: float = 10.0
    rep_ms: float = 40.0

    @property
    def method(self) -> str:
        if self.device.type == "cuda":
            return f"triton do_bench (L2 flushed per rep; warmup {self.warmup_ms:g} ms, rep {self.rep_ms:g} ms)"
        return "time.perf_counter median (CPU, no cache flush)"

    def __call__(self, fn: Callable[[], object]) -> tuple[float, float, float]:
        """(median, 20 % quantile, 80 % quantile) in ms."""
        if self.device.type == "cuda":
            from triton.testing import do_bench

            med, p20, p80 = do_bench(fn, warmup=self.warmup_ms, rep=self.rep_ms, quantiles=[0.5, 0.2, 0.8])
            return med, p20, p80
        min_time = 0.01 if self.quick else self.rep_ms / 1e3 * 5
        med, p20, p80 = quantiles(time_samples(fn, self.device, min_time=min_time, max_reps=200))
        return med, p20, p80


def graph_ms(make_calls: Callable[[], list[Callable[[], object]]], timer: Timer) -> float:
    """Time per call of one CUDA graph replaying the calls (each on its own buffers) back to back.

    The calls are made, warmed up and captured on one side stream: a ``bwd`` call's forward, run when it is made,
    then sits on the stream its backward is captured on."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        calls = make_calls()
        for _ in range(2):
            for c in calls:
                c()
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=stream):
        for c in calls:
            c()
    torch.cuda.synchronize()
    return timer(graph.replay)[0] / len(calls)


# ----------------------------------------------------------------------------------------------- driver
def _fmt(v: float | None, digits: int = 4) -> str:
    return "" if v is None or not math.isfinite(v) else f"{v:.{digits}g}"


def run_case(cfg: LayerConfig, provider: str, mode: str, setup: Setup, timer: Timer, nbytes: int,
             small: bool, graphs: bool) -> dict[str, object]:
    """Time one provider on one layer and mode: {status, reason, ms, ms_p20, ms_p80, graph_ms}."""
    fmt = provider_format(provider, setup)
    native = build_native(cfg, setup, fmt)
    module = build_module(cfg, provider, native)
    x, dy = make_inputs(cfg, setup, fmt)
    cache: dict[str, Callable] = {}
    call = make_call(cfg, provider, mode, module, native, setup, x, dy, nbytes, cache)
    med, p20, p80 = timer(call)
    out: dict[str, object] = {"status": "ok", "reason": "", "ms": med, "ms_p20": p20, "ms_p80": p80}
    if graphs and setup.device.type == "cuda":
        if not small:
            out["graph_ms"] = None
        else:
            per_call = max(nbytes, 1)
            n = max(2, min(64, math.ceil(2 * l2_bytes(setup.device) / per_call)))
            def make_calls() -> list[Callable[[], object]]:
                return [make_call(cfg, provider, mode, module, native, setup, *make_inputs(cfg, setup, fmt), nbytes,
                                  cache) for _ in range(n)]

            try:
                out["graph_ms"] = graph_ms(make_calls, timer)
            except Exception as exc:  # a provider that cannot be captured: say so, keep the eager timing
                out["reason"] = f"graph capture failed: {type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
    return out


class RowWriter:
    """CSV rows written (and flushed) as they are measured, so a run cut short by a timeout keeps its data."""

    def __init__(self, path: pathlib.Path, columns: list[str]) -> None:
        self.file = open(path, "w", newline="")  # noqa: SIM115  (closed in close())
        self.writer = csv.DictWriter(self.file, columns)
        self.writer.writeheader()
        self.file.flush()

    def write(self, row: dict[str, object]) -> None:
        self.writer.writerow(row)
        self.file.flush()

    def close(self) -> None:
        self.file.close()


def parse_args(op: str, argv: list[str] | None, doc: str | None) -> argparse.Namespace:
    op_modes = MODES if op == "dwconv_bn_act" else MODES[:4]
    default_models = ",".join(MODEL_BUILDERS) if op == "dwconv_bn_act" else "mobilenet_v3_large,mobilenet_v3_small"
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=None, help="default: 256 on a GPU, 8 on the CPU, 2 with --quick")
    p.add_argument("--resolution", type=int, default=None, help="model input resolution (default 224; 32 --quick)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default: bf16 on a GPU, fp32 on the CPU")
    p.add_argument("--modes", default=",".join(op_modes), help=f"comma list of {','.join(MODES)}")
    p.add_argument("--providers", default=None, help=f"comma list of {','.join(PROVIDERS)} (default per device)")
    p.add_argument("--models", default=default_models, help=f"comma list of {','.join(MODEL_BUILDERS)}")
    p.add_argument("--layers", default=None, help="comma list of substrings: only layers whose name holds one")
    p.add_argument("--layout", choices=("channels_last", "nchw"), default="channels_last",
                   help="memory format for compile and mnet_ext_* (eager_* fix their own)")
    p.add_argument("--out", default=None, help="output directory (default bench/results/<device>)")
    p.add_argument("--quick", action="store_true", help="tiny CPU smoke sizes: batch 2, resolution 32, short timing")
    p.add_argument("--compile-modes", default=None,
                   help="modes in which the compile provider runs (default: all; others get a skipped row)")
    p.add_argument("--max-autotune", action="store_true", help="compile with mode='max-autotune'")
    p.add_argument("--no-graph", action="store_true", help="skip the CUDA-graph column")
    p.add_argument("--warmup-ms", type=float, default=10.0, help="do_bench warm-up (CUDA)")
    p.add_argument("--rep-ms", type=float, default=40.0, help="do_bench repetition time (CUDA)")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads (default: torch's; 1 with --quick: robust on a loaded 2-core machine)")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


def _split(text: str, allowed: tuple[str, ...], what: str) -> list[str]:
    items = [s.strip() for s in text.split(",") if s.strip()]
    bad = [s for s in items if s not in allowed]
    if bad:
        raise SystemExit(f"--{what}: unknown {bad}; expected some of {allowed}")
    return items


def main(op: str, argv: list[str] | None = None, doc: str | None = None) -> int:
    from tqdm import tqdm

    args = parse_args(op, argv, doc)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    on_gpu = device.type == "cuda"
    if not on_gpu and (args.threads or args.quick):
        torch.set_num_threads(args.threads or 1)
    batch = args.batch or (2 if args.quick else 256 if on_gpu else 8)
    resolution = args.resolution or (32 if args.quick else 224)
    dtype_name = args.dtype or ("bf16" if on_gpu else "fp32")
    modes = _split(args.modes, MODES, "modes")
    providers = _split(args.providers or ",".join(DEFAULT_PROVIDERS[device.type]), PROVIDERS, "providers")
    models = _split(args.models, tuple(MODEL_BUILDERS), "models")
    setup = Setup(device, DTYPES[dtype_name], batch,
                  torch.channels_last if args.layout == "channels_last" else torch.contiguous_format,
                  args.max_autotune)
    timer = Timer(device, args.quick, args.warmup_ms, args.rep_ms)
    env = env_info(device)
    tag = env["device"].replace(" ", "_").replace("/", "_") if on_gpu else "cpu"
    out = pathlib.Path(args.out or ROOT / "bench" / "results" / tag)
    out.mkdir(parents=True, exist_ok=True)

    wanted = [s for s in (args.layers or "").split(",") if s]
    layers = {cfg: uses for cfg, uses in unique_layers(tuple(models), resolution).items()
              if cfg.kind == op and (not wanted or any(w in cfg.name for w in wanted))}
    peak = copy_bandwidth(device, (1 << 30) if on_gpu else (1 << 24) if args.quick else (1 << 27))
    l2 = l2_bytes(device)
    unavailable = {p: provider_unavailable(p, device) for p in providers}
    compile_modes = _split(args.compile_modes, MODES, "compile-modes") if args.compile_modes else modes
    print(f"{op}: {len(layers)} unique layers of {','.join(models)} at {resolution}x{resolution}, batch {batch}, "
          f"{dtype_name}, {args.layout}, on {env['device']}; copy bandwidth {peak:.0f} GB/s; "
          f"timing: {timer.method}", file=sys.stderr)
    for p, why in unavailable.items():
        if why:
            print(f"  skipping {p}: {why}", file=sys.stderr)

    csv_path = out / f"{op}.csv"
    writer = RowWriter(csv_path, COLUMNS)
    all_rows: list[dict[str, object]] = []
    errors = 0
    # mode-major: a run cut short by a timeout has every layer of the first modes
    cases = [(cfg, uses, mode) for mode in modes for cfg, uses in layers.items()]
    bar = tqdm(cases, desc=f"bench {op}", file=sys.stderr, disable=args.no_progress, dynamic_ncols=True)
    for cfg, uses, mode in bar:
        bar.set_postfix_str(f"{cfg.name} {mode}", refresh=False)
        nbytes = mode_bytes(cfg, mode, batch, setup.dtype)
        small = activation_bytes(cfg, batch, setup.dtype)[0] + activation_bytes(cfg, batch, setup.dtype)[1] < l2
        base = {
            "op": op, "layer": cfg.name, "models": ";".join(sorted({u.split(":")[0] for u in uses})),
            "batch": batch, "channels": cfg.channels, "height": cfg.height, "width": cfg.width,
            "kernel": cfg.kernel_size or "", "stride": cfg.stride, "dilation": cfg.dilation,
            "act": cfg.act if cfg.kind == "dwconv_bn_act" else f"{cfg.act}/{cfg.gate}", "dtype": dtype_name,
            "mode": mode, "bytes": nbytes, "copy_peak_gbps": _fmt(peak), "timing": timer.method, **env,
        }
        results: dict[str, dict[str, object]] = {}
        for provider in providers:
            fmt = provider_format(provider, setup)
            row = {**base, "provider": provider,
                   "layout": "n/a" if provider == "copy" else "nchw" if fmt == torch.contiguous_format
                   else "channels_last"}
            why = unavailable[provider] or mode_skip_reason(cfg, mode)
            if not why and provider == "compile" and mode not in compile_modes:
                why = f"compile not run in mode {mode} (--compile-modes {','.join(compile_modes)}: time budget)"
            if why:
                row.update(status="skipped", reason=why)
            else:
                try:
                    row.update(run_case(cfg, provider, mode, setup, timer, nbytes, small, not args.no_graph))
                except Exception as exc:  # recorded in the row, never silent
                    errors += 1
                    row.update(status="error", reason=f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
                               if str(exc) else type(exc).__name__)
                    if on_gpu:
                        torch.cuda.empty_cache()
            results[provider] = row
        copy_ms = results.get("copy", {}).get("ms")
        for provider, row in results.items():
            ms = row.get("ms")
            if row["status"] == "ok" and isinstance(ms, float):
                gbps = nbytes / ms / 1e6
                row["gbps"] = gbps
                row["pct_copy_bw"] = 100 * gbps / peak
                if isinstance(copy_ms, float):
                    row["pct_same_size_copy"] = 100 * copy_ms / ms
                for b in report.BASELINES:
                    b_ms = results.get(b, {}).get("ms")
                    if isinstance(b_ms, float) and b_ms > 0 and provider != "copy":
                        row[f"speedup_vs_{b}"] = b_ms / ms
        for row in results.values():  # formatted only now: the speedups above read the baselines' floats
            for k in ("ms", "ms_p20", "ms_p80", "graph_ms", "gbps", "pct_copy_bw", "pct_same_size_copy",
                      *(f"speedup_vs_{b}" for b in report.BASELINES)):
                v = row.get(k)
                row[k] = _fmt(v) if isinstance(v, float) or v is None else v
            writer.write(row)
            all_rows.append(row)
    writer.close()

    md_path = out / f"{op}.md"
    md_path.write_text(markdown_report(op, [{k: str(v) for k, v in r.items()} for r in all_rows], env, timer,
                                       peak, batch, resolution, dtype_name, args.layout))
    table = report.headline(report.read_rows(csv_path))
    print(report.markdown(table))
    print(f"wrote {csv_path} ({len(all_rows)} rows, {errors} errors) and {md_path}", file=sys.stderr)
    return 0


def markdown_report(op: str, rows: list[dict[str, str]], env: dict[str, str], timer: Timer, peak: float,
                    batch: int, resolution: int, dtype: str, layout: str) -> str:
    lines = [f"# {op}: batch {batch}, {resolution}x{resolution}, {dtype}, {layout}\n",
             f"{env['device']}; torch {env['torch']}, triton {env['triton']}, CUDA {env['cuda']}; "
             f"commit `{env['commit']}`; copy bandwidth {peak:.0f} GB/s; timing: {timer.method}\n",
             "## Geomean speedup per model and mode (over the model's unique layers)\n",
             report.markdown(report.headline(rows)),
             "## Per layer\n"]
    cols = ["layer", "mode", "provider", "status", "ms", "graph_ms", "gbps", "pct_copy_bw",
            "speedup_vs_eager_nchw", "speedup_vs_eager_channels_last", "speedup_vs_compile", "reason"]
    lines.append(report.markdown([{c: r.get(c, "") for c in cols} for r in rows], cols))
    return "\n".join(lines)
