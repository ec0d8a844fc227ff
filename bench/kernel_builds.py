"""Compile every kernel for a GPU that need not be present, and summarise what the compiler made of it.

Used by ``bench.kernel_report``. Two sources, one summary per kernel (``ptxas -v`` resources + ``bench.sass`` path
counts), cached by content hash under a cache directory so that a rerun compiles only what changed:

* CUDA: each ``.cu`` file of the extension, compiled device-only (``nvcc -cubin``) for one architecture with the
  flags ``setup.py`` builds it with (read from the extension object that ``setup.py`` itself constructs, plus the
  flags torch's ``BuildExtension`` adds). Key: nvcc version, flags, architecture, and every file under ``csrc/``.
* Triton: each launch the host launchers of ``triton_kernels/`` make for a layer, captured on meta tensors instead of
  running (tile sizes, warps and grid are the launchers' own choices), specialised exactly as ``JITFunction.run``
  does (the kernel's binder + ``_pack_args``) for every config of the kernel's autotuner, then compiled with
  ``triton.compile`` for the target. Key: Triton's own compile cache key.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import importlib
import io
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys
import tempfile
import types
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor, as_completed
from typing import Any
from unittest import mock

import torch

from bench import sass

ROOT = pathlib.Path(__file__).resolve().parents[1]
# Part of every cache key: the source of the modules that make the summaries (this one and bench/sass.py), so that
# a change to the counting method or the summary format never reads a stale entry.
REPORT_VERSION = hashlib.sha256(pathlib.Path(__file__).read_bytes() + pathlib.Path(sass.__file__).read_bytes()
                                ).hexdigest()[:16]
# SMs of the GPUs the report targets, per architecture (H100/H200: 132, A100: 108): the launchers size their
# stage-1 reduction grids by it.
SMS = {90: 132, 80: 108}
DEFAULT_CACHE = pathlib.Path(os.environ.get("XDG_CACHE_HOME", pathlib.Path.home() / ".cache")) / "mnet_ext" / \
    "kernel_report"


# ------------------------------------------------------------------------------------------------- tools
@dataclasses.dataclass(frozen=True)
class Tools:
    nvdisasm: str
    nvcc: str | None  # None: no CUDA toolkit (the Triton part still works)
    nvcc_version: str  # the whole of ``nvcc --version`` (part of the cache key)
    demangler: str | None

    @property
    def nvcc_release(self) -> str:
        m = re.search(r"release ([\d.]+), (V[\d.]+)", self.nvcc_version)
        return f"{m.group(1)} ({m.group(2)})" if m else "none"


def find_tools(cuda_home: str | None) -> Tools:
    """nvcc from ``cuda_home``; nvdisasm from the toolkit, else the one Triton ships; cu++filt or c++filt."""
    from triton import knobs

    nvcc = os.path.join(cuda_home, "bin", "nvcc") if cuda_home else None
    nvcc = nvcc if nvcc and os.path.isfile(nvcc) else None
    toolkit_disasm = os.path.join(cuda_home, "bin", "nvdisasm") if cuda_home else ""
    nvdisasm = toolkit_disasm if os.path.isfile(toolkit_disasm) else knobs.nvidia.nvdisasm.path
    version = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout if nvcc else "none"
    demangler = shutil.which("cu++filt", path=os.path.join(cuda_home, "bin") if cuda_home else None)
    return Tools(nvdisasm, nvcc, version.strip(), demangler or shutil.which("c++filt"))


# ------------------------------------------------------------------------------------------------- CUDA
@dataclasses.dataclass(frozen=True)
class CudaBuild:
    """How setup.py compiles the .cu files: what ``nvcc`` gets besides the architecture and the file."""

    cuda_home: str | None
    sources: tuple[str, ...]  # relative to ROOT
    flags: tuple[str, ...]


# Run in a fresh interpreter: setup.py must set CUDA_HOME before torch.utils.cpp_extension is first imported (torch
# caches its own guess at import), as it does in a real build.
_PROBE = """
import json, runpy
from unittest import mock
import setuptools
captured = {}
with mock.patch.object(setuptools, "setup", lambda **kw: captured.update(kw)):
    ns = runpy.run_path("setup.py", run_name="mnet_ext_setup_probe")
from torch.utils import cpp_extension
ext = captured["ext_modules"][0]
args = ext.extra_compile_args
print(json.dumps({"cuda_home": ns["_find_cuda_home"](), "sources": ext.sources, "include_dirs": ext.include_dirs,
                  "nvcc": args.get("nvcc") if isinstance(args, dict) else None,
                  "common": cpp_extension.COMMON_NVCC_FLAGS}))
"""


def cuda_build() -> CudaBuild:
    """Run setup.py with ``setuptools.setup`` stubbed out (and no command: nothing is built) and read the
    extension it would build. torch's BuildExtension adds COMMON_NVCC_FLAGS, a C++ standard and two defines to
    every nvcc line: added here the same way."""
    env = {k: v for k, v in os.environ.items() if k != "MNET_EXT_SKIP_CUDA"}
    proc = subprocess.run([sys.executable, "-c", _PROBE], cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"reading setup.py's extension failed:\n{proc.stderr[-4000:]}")
    info = json.loads(proc.stdout.strip().splitlines()[-1])
    if info["nvcc"] is None or info["cuda_home"] is None:
        return CudaBuild(None, (), ())
    std = [] if any(f.startswith("-std=") for f in info["nvcc"]) else ["-std=c++20"]
    flags = (*info["common"], *info["nvcc"], *std, "-DTORCH_API_INCLUDE_EXTENSION_H", "-DTORCH_EXTENSION_NAME=_C",
             *(f"-I{d}" for d in info["include_dirs"]))
    return CudaBuild(info["cuda_home"], tuple(s for s in info["sources"] if s.endswith(".cu")), flags)


def _csrc_digest() -> str:
    h = hashlib.sha256()
    for p in sorted((ROOT / "csrc").rglob("*")):
        if p.suffix in (".h", ".cuh", ".cu", ".hpp"):
            h.update(str(p.relative_to(ROOT)).encode())
            h.update(p.read_bytes())
    return h.hexdigest()


def cuda_jobs(build: CudaBuild, tools: Tools, archs: Iterable[int],
              sources: Iterable[str] | None = None) -> list[dict[str, Any]]:
    """One job per (.cu file, architecture): setup.py's sources, or ``sources`` (relative to ROOT; a file outside
    csrc/ enters the cache key with its own bytes)."""
    if tools.nvcc is None:
        return []
    digest = _csrc_digest()
    jobs = []
    for arch in archs:
        for src in build.sources if sources is None else sources:
            own = "" if src.startswith("csrc/") else hashlib.sha256((ROOT / src).read_bytes()).hexdigest()
            key = hashlib.sha256("\0".join([REPORT_VERSION, tools.nvcc_version, *build.flags, str(arch), src,
                                            digest, *([own] if own else [])]).encode()).hexdigest()
            jobs.append({"kind": "cuda", "key": key, "source": src, "arch": arch, "nvcc": tools.nvcc,
                         "flags": list(build.flags), "nvdisasm": tools.nvdisasm, "demangler": tools.demangler})
    return jobs


def _demangle(names: list[str], demangler: str | None) -> list[str]:
    if not demangler or not names:
        return names
    out = subprocess.run([demangler], input="\n".join(names), capture_output=True, text=True, check=True).stdout
    return out.splitlines()


def _summaries(cubin: str, ptxas_log: str, nvdisasm: str, sass_dir: str | None, tag: str) -> dict[str, dict]:
    """{mangled kernel: resources + path summary} of one cubin."""
    resources = sass.parse_ptxas_log(ptxas_log)
    if sass_dir:
        out = pathlib.Path(sass_dir) / f"{tag}.sass"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(subprocess.run([nvdisasm, "-c", cubin], capture_output=True, text=True, check=True).stdout)
    result = {}
    for name, fn in sass.disassemble(nvdisasm, cubin).items():
        if name not in resources:  # a subroutine section, not a kernel
            continue
        result[name] = {**resources[name], "path": sass.analyse(fn).to_dict()}
    return result


def _run_cuda_job(job: dict[str, Any], sass_dir: str | None) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        cubin = os.path.join(tmp, "k.cubin")
        cmd = [job["nvcc"], "-cubin", f"-arch=sm_{job['arch']}", *job["flags"], "-Xptxas", "-v",
               str(ROOT / job["source"]), "-o", cubin]
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
        if proc.returncode != 0:
            raise RuntimeError(f"nvcc failed ({job['source']}, sm_{job['arch']}):\n{proc.stderr[-4000:]}")
        tag = f"sm_{job['arch']}/cuda/{pathlib.Path(job['source']).stem}"
        funcs = _summaries(cubin, proc.stderr, job["nvdisasm"], sass_dir, tag)
    names = list(funcs)
    for mangled, demangled in zip(names, _demangle(names, job["demangler"]), strict=True):
        funcs[mangled]["name"] = demangled
    return {"functions": funcs}


# ------------------------------------------------------------------------------------------------- Triton
@dataclasses.dataclass
class TritonLaunch:
    """One kernel launch a host launcher made for a layer (not run: captured)."""

    primitive: str  # the launcher, e.g. "dwconv_bn_act_fwd"
    kernel: str  # the kernel's attribute name in its module, e.g. "_fwd_kernel"
    grid: tuple[int, ...]
    values: dict[str, Any]  # every scalar argument and constexpr by name, as the launcher passed them
    jobs: list[dict[str, Any]]  # one compile job per autotune config (num_warps in job["num_warps"])


@contextlib.contextmanager
def _device_as(arch: int) -> Iterator[None]:
    """Launchers ask torch about the current CUDA device (SM count for their grids); answer as a GPU of ``arch``
    would, without one."""
    props = types.SimpleNamespace(multi_processor_count=SMS[arch], major=arch // 10, minor=arch % 10,
                                  name=f"sm_{arch} (report target)", L2_cache_size=50 << 20)
    with mock.patch.object(torch.cuda, "current_device", lambda: 0), \
            mock.patch.object(torch.cuda, "get_device_properties", lambda *a, **k: props):
        yield


class _Recorder:
    """Stands in for a kernel object in its module: ``kernel[grid](*args, **kwargs)`` records instead of launching."""

    def __init__(self, name: str, kernel: Any, calls: list) -> None:
        self.name, self.kernel, self.calls = name, kernel, calls

    def __getitem__(self, grid: tuple[int, ...]) -> Callable[..., None]:
        return lambda *args, **kwargs: self.calls.append((self.name, self.kernel, tuple(grid), args, kwargs))


def capture(module_name: str, launcher_calls: list[tuple[str, tuple]], arch: int) -> list[tuple]:
    """(launcher, kernel name, kernel object, grid, args, kwargs) of every kernel launch that the launcher calls
    ``[(launcher name, args), ...]`` of module ``module_name`` make, in order."""
    from triton.runtime.autotuner import Autotuner
    from triton.runtime.jit import JITFunction

    module = importlib.import_module(module_name)
    calls: list[tuple] = []
    kernels = {n: k for n, k in vars(module).items() if isinstance(k, (JITFunction, Autotuner))}
    cached = [f for f in vars(module).values() if callable(getattr(f, "cache_clear", None))]
    out = []
    with contextlib.ExitStack() as stack:
        stack.enter_context(_device_as(arch))
        for n, k in kernels.items():
            stack.enter_context(mock.patch.object(module, n, _Recorder(n, k, calls)))
        for f in cached:  # e.g. a cached SM count: it must come from this arch, and not stay after
            f.cache_clear()
            stack.callback(f.cache_clear)
        for launcher, args in launcher_calls:
            before = len(calls)
            getattr(module, launcher)(*args)
            out += [(launcher, *c) for c in calls[before:]]
    return out


def triton_launches(module_name: str, launcher_calls: list[tuple[str, tuple]], arch: int) -> list[TritonLaunch]:
    """The launches of ``capture``, each with one compile job per autotune config, specialised as
    ``JITFunction.run`` would specialise them."""
    from triton import knobs
    from triton._C.libtriton import get_cache_invalidating_env_vars
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.autotuner import Autotuner
    from triton.runtime.cache import get_cache_key
    from triton.runtime.jit import create_function_from_signature

    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    launches = []
    for launcher, name, kernel, grid, args, kwargs in capture(module_name, launcher_calls, arch):
        fn = kernel.fn if isinstance(kernel, Autotuner) else kernel
        configs = [c.all_kwargs() for c in kernel.configs] if isinstance(kernel, Autotuner) else [{}]
        binder = create_function_from_signature(fn.signature, fn.params, backend)
        jobs = []
        for cfg in configs:
            # what JITFunction.run adds to the launch's keyword arguments before binding
            kw = {**kwargs, **cfg, "debug": kwargs.get("debug", fn.debug) or knobs.runtime.debug,
                  "instrumentation_mode": knobs.compilation.instrumentation_mode}
            bound, specialization, opts = binder(*args, **kw)
            options, signature, constexprs, attrs = fn._pack_args(backend, kw, bound, specialization, opts)
            src = ASTSource(fn, signature, constexprs, attrs)
            key = get_cache_key(src, backend, options, env_vars=get_cache_invalidating_env_vars())
            jobs.append({"kind": "triton", "key": hashlib.sha256(f"{REPORT_VERSION}-{key}".encode()).hexdigest(),
                         "module": module_name, "kernel": name, "signature": signature, "constexprs": constexprs,
                         "attrs": attrs, "options": dict(options.__dict__), "arch": arch,
                         "num_warps": options.num_warps})
        values = {k: v for k, v in bound.items() if isinstance(v, (bool, int, float))}
        launches.append(TritonLaunch(launcher, name, grid, values, jobs))
    return launches


def _run_triton_job(job: dict[str, Any], nvdisasm: str, sass_dir: str | None) -> dict[str, Any]:
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.runtime.autotuner import Autotuner

    kernel = getattr(importlib.import_module(job["module"]), job["kernel"])
    fn = kernel.fn if isinstance(kernel, Autotuner) else kernel
    log = io.StringIO()
    with tempfile.TemporaryDirectory() as tmp:
        # Triton's own cache in a throwaway directory (ours keeps the summaries, ~1 MB less per kernel), so that
        # ptxas always runs and prints its -v log (dump_ptxas_log), which is what is read here.
        knobs.cache.dir = tmp
        knobs.nvidia.dump_ptxas_log = True
        with contextlib.redirect_stdout(log):
            compiled = triton.compile(ASTSource(fn, job["signature"], job["constexprs"], job["attrs"]),
                                      target=GPUTarget("cuda", job["arch"], 32), options=job["options"])
        cubin = os.path.join(tmp, "k.cubin")
        pathlib.Path(cubin).write_bytes(compiled.asm["cubin"])
        tag = f"sm_{job['arch']}/triton/{job['kernel']}-{job['num_warps']}w-{job['key'][:12]}"
        funcs = _summaries(cubin, log.getvalue(), nvdisasm, sass_dir, tag)
    (summary,) = funcs.values()
    return {**summary, "name": job["kernel"], "shared_dynamic": compiled.metadata.shared}


# ------------------------------------------------------------------------------------------------- running
def _run_job(job: dict[str, Any], nvdisasm: str, sass_dir: str | None) -> dict[str, Any]:
    try:
        if job["kind"] == "cuda":
            return _run_cuda_job(job, sass_dir)
        return _run_triton_job(job, nvdisasm, sass_dir)
    except Exception as exc:  # reported per kernel: one failed compile must not hide the others
        return {"error": f"{type(exc).__name__}: {exc}"}


def run_jobs(jobs: list[dict[str, Any]], tools: Tools, cache_dir: pathlib.Path, workers: int,
             sass_dir: str | None, progress: bool) -> dict[str, dict[str, Any]]:
    """{job key: result} for unique jobs: from the cache, else compiled (``workers`` processes). Errors are
    results with an "error" entry and are not cached. ``sass_dir``: write each disassembly there (bypasses the
    cache, since the cache keeps summaries, not code)."""
    unique = {j["key"]: j for j in jobs}
    results: dict[str, dict[str, Any]] = {}
    todo = []
    for key, job in unique.items():
        path = cache_dir / job["kind"] / f"{key}.json"
        if path.is_file() and not sass_dir:
            results[key] = json.loads(path.read_text())
        else:
            todo.append(job)
    if not todo:
        return results
    from tqdm import tqdm

    bar = tqdm(total=len(todo), desc="compiling", unit="kernel", file=sys.stderr, disable=not progress)
    job_args = (tools.nvdisasm, sass_dir)

    def done(job: dict[str, Any], result: dict[str, Any]) -> None:
        results[job["key"]] = result
        if "error" not in result:
            path = cache_dir / job["kind"] / f"{job['key']}.json"
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps(result))
            tmp.replace(path)  # atomic: a concurrent run never reads half a file
        bar.update()

    # slowest first (CUDA files, then large K) so that the pool does not end on one long compile
    todo.sort(key=lambda j: (j["kind"] != "cuda", -j.get("constexprs", {}).get(_k_path(j), 0)))
    if workers <= 1:
        for job in todo:
            done(job, _run_job(job, *job_args))
    else:
        import multiprocessing

        # spawn, not fork: the parent has torch's thread pools and Triton's state loaded
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            futures = {pool.submit(_run_job, job, *job_args): job for job in todo}
            for fut in as_completed(futures):
                done(futures[fut], fut.result())
    bar.close()
    return results


def _k_path(job: dict[str, Any]) -> tuple[int, ...] | None:
    """The constexpr path of argument ``K`` of a Triton job (None if the kernel has no K)."""
    if job["kind"] != "triton":
        return None
    names = list(job["signature"])
    return (names.index("K"),) if "K" in names else None
