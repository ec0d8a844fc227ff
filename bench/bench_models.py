"""End-to-end MobileNet benchmark: inference and one training step (forward, backward, SGD step).

Providers, each on its own copy of the model: ``eager`` (native torchvision / mnet_ext V1), ``fused``
(``mnet_ext.fuse``, default backend unless ``--backend``), ``compile`` (``torch.compile`` of the native model,
default mode) and ``fused_compile`` (``torch.compile`` of the fused model). Autocast (bf16 by default on a GPU) and
channels_last by default. One CSV row per model/task/batch/provider: ms per iteration (median, 20/80 % quantiles
of synchronised wall times), images/s, speedup over eager, and peak memory: ``torch.cuda.max_memory_allocated``
during the timed iterations on a GPU (model, optimizer state and activations); ``n/a`` on the CPU (the process'
peak RSS cannot be attributed to one case).

    python -m bench.bench_models --models mobilenet_v3_large --batch 256 --out bench/results/h100
    python -m bench.bench_models --quick          # CPU smoke: batch 2, resolution 32, eager and fused
"""

from __future__ import annotations

import argparse
import copy
import pathlib
import sys

if __package__ in (None, ""):  # run as a file: make `bench` importable
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

import mnet_ext  # noqa: E402
from bench import common, report  # noqa: E402
from mnet_ext._backend import resolve  # noqa: E402
from mnet_ext._timing import quantiles, sync, time_samples  # noqa: E402
from mnet_ext.layers import MODEL_BUILDERS  # noqa: E402

PROVIDERS = ("eager", "fused", "compile", "fused_compile")
DEFAULT_PROVIDERS = {"cuda": PROVIDERS, "cpu": ("eager", "fused")}
TASKS = ("infer", "train")
AUTOCAST = {"bf16": torch.bfloat16, "fp16": torch.float16, "none": None}
COLUMNS = [
    "model", "task", "provider", "batch", "resolution", "autocast", "layout", "backend", "status", "reason", "ms",
    "ms_p20", "ms_p80", "images_per_s", "speedup_vs_eager", "peak_mem_mb", "peak_mem_source", "timing", "device",
    "torch", "triton", "cuda", "commit",
]


def build(model_name: str, provider: str, device: torch.device, fmt: torch.memory_format,
          backend: str | None) -> nn.Module:
    torch.manual_seed(0)
    model = MODEL_BUILDERS[model_name]().to(device=device, memory_format=fmt)
    if provider in ("fused", "fused_compile"):
        model = mnet_ext.fuse(copy.deepcopy(model), backend=backend)
    return model


def make_step(model: nn.Module, task: str, provider: str, x: torch.Tensor, labels: torch.Tensor,
              amp: torch.dtype | None):
    run = torch.compile(model) if provider.endswith("compile") else model
    autocast = lambda: torch.autocast(x.device.type, dtype=amp, enabled=amp is not None)  # noqa: E731
    if task == "infer":
        model.eval()

        def infer() -> object:
            with torch.no_grad(), autocast():
                return run(x)
        return infer
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

    def train() -> object:
        with autocast():
            loss = F.cross_entropy(run(x), labels)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss
    return train


def run_case(args: argparse.Namespace, model_name: str, task: str, provider: str, batch: int,
             device: torch.device) -> dict[str, object]:
    fmt = torch.channels_last if args.layout == "channels_last" else torch.contiguous_format
    if provider.endswith("compile"):
        torch._dynamo.reset()
    model = build(model_name, provider, device, fmt, args.backend)
    x = torch.randn(batch, 3, args.resolution, args.resolution, device=device).contiguous(memory_format=fmt)
    labels = torch.randint(0, 1000, (batch,), device=device)
    step = make_step(model, task, provider, x, labels, AUTOCAST[args.autocast])
    for _ in range(args.warmup):  # compiles here, outside the timed and the memory-measured iterations
        step()
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = time_samples(step, device, min_time=args.min_time, max_reps=args.max_reps, warmup=0)
    med, p20, p80 = quantiles(times)
    out: dict[str, object] = {"status": "ok", "reason": "", "ms": med, "ms_p20": p20, "ms_p80": p80,
                              "images_per_s": batch / med * 1e3}
    if device.type == "cuda":
        out["peak_mem_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
        out["peak_mem_source"] = "torch.cuda.max_memory_allocated"
    else:
        out["peak_mem_mb"], out["peak_mem_source"] = "n/a", "n/a (CPU: peak RSS is per process, not per case)"
    return out


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default=",".join(MODEL_BUILDERS), help=f"comma list of {','.join(MODEL_BUILDERS)}")
    p.add_argument("--batch", default=None, help="comma list (default 32,128,256 on a GPU, 8 on CPU, 2 --quick)")
    p.add_argument("--resolution", type=int, default=None, help="default 224 (32 with --quick)")
    p.add_argument("--tasks", default=",".join(TASKS), help="comma list of infer,train")
    p.add_argument("--providers", default=None, help=f"comma list of {','.join(PROVIDERS)} (default per device)")
    p.add_argument("--compile-tasks", default=None,
                   help="tasks in which compile/fused_compile run (default: all; others get a skipped row)")
    p.add_argument("--backend", choices=("auto", *mnet_ext._backend.BACKENDS), default="auto",
                   help="backend of the fused providers")
    p.add_argument("--autocast", choices=sorted(AUTOCAST), default=None,
                   help="default bf16 on a GPU, none on the CPU (CPU bf16 convolutions are emulated: minutes)")
    p.add_argument("--layout", choices=("channels_last", "nchw"), default="channels_last")
    p.add_argument("--warmup", type=int, default=3, help="untimed iterations first (compilation happens here)")
    p.add_argument("--min-time", type=float, default=None, help="seconds timed per case (default 1.0; 0.02 --quick)")
    p.add_argument("--max-reps", type=int, default=100)
    p.add_argument("--out", default=None, help="output directory (default bench/results/<device>)")
    p.add_argument("--quick", action="store_true", help="CPU smoke sizes: batch 2, resolution 32, short timing")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads (default: torch's; 1 with --quick: robust on a loaded 2-core machine)")
    p.add_argument("--device", default=None)
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    if args.quick:
        args.warmup = min(args.warmup, 1)
    args.autocast = args.autocast or ("bf16" if torch.cuda.is_available() and args.device != "cpu" else "none")
    args.resolution = args.resolution or (32 if args.quick else 224)
    args.min_time = args.min_time if args.min_time is not None else 0.02 if args.quick else 1.0
    args.backend = None if args.backend == "auto" else args.backend
    return args


def main(argv: list[str] | None = None) -> int:
    from tqdm import tqdm

    args = parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    on_gpu = device.type == "cuda"
    if not on_gpu and (args.threads or args.quick):
        torch.set_num_threads(args.threads or 1)
    batches = [int(b) for b in (args.batch or ("2" if args.quick else "32,128,256" if on_gpu else "8")).split(",")]
    models = common._split(args.models, tuple(MODEL_BUILDERS), "models")
    tasks = common._split(args.tasks, TASKS, "tasks")
    providers = common._split(args.providers or ",".join(DEFAULT_PROVIDERS[device.type]), PROVIDERS, "providers")
    compile_tasks = common._split(args.compile_tasks, TASKS, "compile-tasks") if args.compile_tasks else tasks
    env = common.env_info(device)
    tag = env["device"].replace(" ", "_").replace("/", "_") if on_gpu else "cpu"
    out = pathlib.Path(args.out or common.ROOT / "bench" / "results" / tag)
    out.mkdir(parents=True, exist_ok=True)
    backend = resolve(args.backend, device.type)
    timing = "synchronised time.perf_counter, median of the timed iterations"
    writer = common.RowWriter(out / "models.csv", COLUMNS)
    rows: list[dict[str, object]] = []
    cases = [(m, t, b) for m in models for t in tasks for b in batches]
    for model_name, task, batch in tqdm(cases, desc="bench models", file=sys.stderr, disable=args.no_progress):
        results = {}
        for provider in providers:
            row: dict[str, object] = {
                "model": model_name, "task": task, "provider": provider, "batch": batch,
                "resolution": args.resolution, "autocast": args.autocast, "layout": args.layout,
                "backend": backend if provider.startswith("fused") else "", "timing": timing, **env}
            if provider.endswith("compile") and task not in compile_tasks:
                row.update(status="skipped", reason=f"{provider} not run for task {task} (--compile-tasks "
                           f"{','.join(compile_tasks)}: time budget)")
            else:
                try:
                    row.update(run_case(args, model_name, task, provider, batch, device))
                except Exception as exc:  # recorded in the row, never silent
                    row.update(status="error", reason=f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
                               if str(exc) else type(exc).__name__)
            if on_gpu:
                torch.cuda.empty_cache()
            results[provider] = row
        eager_ms = results.get("eager", {}).get("ms")
        for row in results.values():
            ms = row.get("ms")
            if isinstance(ms, float) and isinstance(eager_ms, float):
                row["speedup_vs_eager"] = eager_ms / ms
            for k in ("ms", "ms_p20", "ms_p80", "images_per_s", "speedup_vs_eager", "peak_mem_mb"):
                v = row.get(k)
                row[k] = common._fmt(v) if isinstance(v, float) or v is None else v
            writer.write(row)
            rows.append(row)
    writer.close()
    cols = ["model", "task", "batch", "provider", "status", "ms", "images_per_s", "speedup_vs_eager",
            "peak_mem_mb", "reason"]
    table = report.markdown([{c: r.get(c, "") for c in cols} for r in rows], cols)
    header = (f"# Models: {args.resolution}x{args.resolution}, autocast {args.autocast}, {args.layout}, fused backend "
              f"{backend}\n\n{env['device']}; torch {env['torch']}, triton {env['triton']}, CUDA {env['cuda']}; "
              f"commit `{env['commit']}`; timing: {timing}\n\n")
    (out / "models.md").write_text(header + table)
    print(table)
    n_err = sum(r["status"] == "error" for r in rows)
    print(f"wrote {out / 'models.csv'} ({len(rows)} rows, {n_err} errors)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
