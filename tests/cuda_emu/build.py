"""Builds the host emulator of the CUDA kernels (tests/cuda_emu/emu.h): g++ compiles the real kernels
(csrc/dwconv_bn_act/kernels.cuh, csrc/common) and the real launchers (csrc/dwconv_bn_act/*.cu), whose
``kernel<<<grid, block, smem, stream>>>(args)`` launches are rewritten into calls of the emulator, so the launch
geometry (grid, block, shared memory, the kernel chosen) is the GPU's. The binary is cached under
build/cuda_emu/ (objects by the hash of their inputs)."""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CSRC = ROOT / "csrc"
HERE = Path(__file__).resolve().parent
# The launchers' translation units (bwd_apply.cu only sizes the workspace and dispatches; the kernels are
# instantiated per dtype in bwd_apply_{f32,f16,bf16}.cu).
KERNEL_UNITS = ("fwd.cu", "stats.cu", "bwd_reduce.cu", "bwd_apply.cu", "bwd_apply_f32.cu", "bwd_apply_bf16.cu",
                "bwd_apply_f16.cu")
# MNET_MMA_MIN_BLOCKS: the tensor-core forward's plan (mma_tile.h) puts several tiles in a block only while >= 1024
# blocks remain, which no emulated shape reaches; at 2 the small shapes run blocks of 2-8 tiles (the tile loop).
# MNET_APPLY_MIN_BLOCKS: likewise the backward apply's (tile.h: band_plan): at 2, shapes of several images or bands
# walk several (image, band) items per block (the block's dweight sums across items), single-band single-image ones
# one item per block.
FLAGS = ("-x", "c++", "-std=c++17", "-O0", "-DWITH_CUDA", "-Wno-unknown-pragmas", "-Wno-attributes",
         "-DMNET_MMA_MIN_BLOCKS=2", "-DMNET_APPLY_MIN_BLOCKS=2")
# `name<targs><<<launch>>>(` -> `::emu::Launch(launch)(&name<targs>, `: the kernel expression is a (qualified)
# name with optional template arguments, as every launch in csrc/ is written.
LAUNCH = re.compile(r"([A-Za-z_][\w:]*(?:<[^;{}()<>]*>)?)\s*<<<(.*?)>>>\s*\(\s*(\)?)", re.S)


def cuda_include() -> Path | None:
    """The CUDA toolkit's include directory (cuda_runtime.h, cuda_bf16.h): CUDA_HOME, nvcc's, or /usr/local/cuda."""
    homes = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    if nvcc := shutil.which("nvcc"):
        homes.append(str(Path(nvcc).resolve().parents[1]))
    homes.append("/usr/local/cuda")
    for home in filter(None, homes):
        if (Path(home) / "include" / "cuda_bf16.h").is_file():
            return Path(home) / "include"
    return None


def rewrite_launches(text: str) -> str:
    def launch(m: re.Match) -> str:
        return f"::emu::Launch({m.group(2)})(&{m.group(1)}" + (")" if m.group(3) else ", ")

    out = LAUNCH.sub(launch, text)
    if "<<<" in out:
        raise RuntimeError("a kernel launch the emulator's rewrite does not recognise (build.py: LAUNCH)")
    return out


def _headers() -> list[Path]:
    files = [*(CSRC / "common").iterdir(), *(CSRC / "dwconv_bn_act").iterdir(), *HERE.glob("*.h")]
    return sorted(f for f in files if f.suffix not in (".cpp", ".py"))


def _digest(parts: list[bytes]) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(len(p).to_bytes(8, "little") + p)
    return h.hexdigest()[:16]


def build(full: bool = False, jobs: int = 2) -> Path:
    """Path of the emulator binary, compiled unless the cache has it (objects are cached by the hash of their
    source, every header and the flags). full: every dtype (emu.h: the default build runs fp32 and bf16). Raises
    RuntimeError without the CUDA headers or g++."""
    include = cuda_include()
    if include is None or shutil.which("g++") is None:
        raise RuntimeError("the CUDA emulator needs g++ and the CUDA toolkit's headers (cuda_bf16.h)")
    flags = (*FLAGS, "-DMNET_EMU_ALL_DTYPES") if full else FLAGS
    version = subprocess.run(["g++", "--version"], capture_output=True, text=True, check=True).stdout
    common = [" ".join(flags).encode(), str(include).encode(), version.encode()]
    common += [f.name.encode() + b"\0" + f.read_bytes() for f in _headers()]
    cache = ROOT / "build" / "cuda_emu"
    # Sources: the launchers with their launches rewritten (a header with launches, bwd_apply.cuh, shadows the real
    # one through the include order), and the emulator's runtime and driver.
    texts: dict[str, str] = {}
    for f in sorted((CSRC / "dwconv_bn_act").iterdir()):
        if f.suffix in (".cu", ".cuh") and "<<<" in f.read_text():
            texts[f.name] = rewrite_launches(f.read_text())
    if not texts:
        raise RuntimeError("no kernel launch found in csrc/dwconv_bn_act")
    units = [u for u in KERNEL_UNITS if full or u != "bwd_apply_f16.cu"]
    sources = {u: texts.get(u) or (CSRC / "dwconv_bn_act" / u).read_text() for u in units}
    sources.update({u: (HERE / u).read_text() for u in ("emu.cpp", "driver.cpp", "selftest.cpp")})
    gen_headers = {n: t for n, t in texts.items() if n.endswith(".cuh")}
    common += [n.encode() + b"\0" + t.encode() for n, t in sorted(gen_headers.items())]
    keys = {u: _digest([*common, u.encode(), src.encode()]) for u, src in sources.items()}
    exe = cache / _digest([k.encode() for k in keys.values()]) / "emu"
    if exe.is_file():
        return exe
    work = cache / f"tmp{os.getpid()}"
    shutil.rmtree(work, ignore_errors=True)
    (work / "gen" / "dwconv_bn_act").mkdir(parents=True)
    for n, t in gen_headers.items():
        (work / "gen" / "dwconv_bn_act" / n).write_text(t)
    base = ["nice", "-n", "19", "g++", *flags, f"-I{work / 'gen'}", f"-I{CSRC}", f"-I{HERE}", f"-I{include}",
            "-include", str(HERE / "emu.h")]
    (cache / "obj").mkdir(parents=True, exist_ok=True)

    def compile_one(unit: str) -> Path:
        obj = cache / "obj" / f"{unit}-{keys[unit]}.o"
        if obj.is_file():
            return obj
        src = work / unit
        src.write_text(sources[unit])
        tmp_obj = work / (unit + ".o")
        r = subprocess.run([*base, "-c", str(src), "-o", str(tmp_obj)], capture_output=True, text=True)
        if r.returncode:
            raise RuntimeError(f"g++ failed on {unit}:\n{r.stderr[-6000:]}")
        tmp_obj.replace(obj)
        return obj

    try:
        with ThreadPoolExecutor(jobs) as pool:
            objs = list(pool.map(compile_one, sources))
        tmp_exe = work / "emu"
        r = subprocess.run(["g++", "-rdynamic", *map(str, objs), "-o", str(tmp_exe), "-ldl"], capture_output=True,
                           text=True)
        if r.returncode:
            raise RuntimeError(f"linking the emulator failed:\n{r.stderr[-6000:]}")
        exe.parent.mkdir(parents=True, exist_ok=True)
        tmp_exe.replace(exe)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return exe


if __name__ == "__main__":
    print(build())
