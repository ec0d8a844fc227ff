"""Build the optional C++/CUDA extension ``mnet_ext._C`` and map the package folders; the package metadata
(name, version, dependencies, extras, console scripts) lives in pyproject.toml's ``[project]`` table.

    pip install --no-build-isolation .        # or -e . ; torch must already be installed
    pip install -v --no-build-isolation .     # -v shows the build's progress: one line per compiled file

What gets built (decided here, never by ``torch.cuda.is_available()``, so a GPU-less build machine works):

* torch is a CUDA build (``torch.version.cuda``) and a CUDA toolkit is found -> CPU host twin + CUDA kernels
  (``CUDAExtension``, ``-DWITH_CUDA``);
* otherwise -> the CPU host twin only (``CppExtension``);
* the extension fails to build (no compiler, ...) -> a warning, and the package installs as pure Python
  (backends ``triton`` / ``reference``).

The source folder ``triton_kernels/`` is installed as ``mnet_ext.triton_kernels``: a top-level ``triton_kernels``
would shadow Triton's own package of that name (used by vLLM/SGLang) and the ``triton-kernels`` distribution.

Environment switches:

    MNET_EXT_NO_EXT=1         no extension at all: a pure-Python install in seconds (torch not needed to build)
    MNET_EXT_SKIP_CUDA=1      build the CPU part only
    MNET_EXT_REQUIRE_EXT=1    a failed extension build is fatal (CI)
    TORCH_CUDA_ARCH_LIST      default "8.0;9.0+PTX": sm_80 code also runs on sm_86/sm_89 (same major version),
                              sm_90 is Hopper, PTX for later GPUs; half the device compiles of "8.0;8.6;8.9;9.0+PTX"
                              (measured on 2 cores: see NOTES.md, "Build times")
    MAX_JOBS                  parallel compile jobs, default = CPU count
    CUDA_HOME / CUDA_PATH     the toolkit; otherwise resolved from the real path of ``nvcc`` or /usr/local/cuda*
"""

from __future__ import annotations

import glob
import importlib.util
import os
import shutil
import sys
import time

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))
DEFAULT_ARCHS = "8.0;9.0+PTX"
# The package folders: mnet_ext and its subpackages, plus triton_kernels/ mapped into its namespace.
PACKAGE_DIR = {"mnet_ext.triton_kernels": "triton_kernels"}
PACKAGES = [*find_packages(include=["mnet_ext", "mnet_ext.*"]), *PACKAGE_DIR]


def _flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _log(msg: str) -> None:
    print(f"mnet_ext setup: {msg}", file=sys.stderr, flush=True)


def _is_toolkit(path: str | None) -> bool:
    return (
        bool(path)
        and os.path.isfile(os.path.join(path, "bin", "nvcc"))
        and os.path.isfile(os.path.join(path, "include", "cuda_runtime.h"))
    )


def _find_cuda_home() -> str | None:
    """The CUDA toolkit root. ``nvcc`` on PATH may be a wrapper script (then torch's own guess,
    dirname(dirname(which nvcc)), is wrong), so follow symlinks, read ``exec`` lines of wrapper scripts,
    and fall back to /usr/local/cuda*."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            return os.environ[var]  # the user's choice wins, checked by torch
    candidates: list[str] = []
    nvcc = shutil.which("nvcc")
    if nvcc:
        real = os.path.realpath(nvcc)
        candidates.append(os.path.dirname(os.path.dirname(real)))
        try:  # a small shell wrapper: look for the absolute path of the real nvcc in it
            if os.path.getsize(real) < 16384:
                with open(real, errors="ignore") as f:
                    for token in f.read().replace('"', " ").replace("'", " ").split():
                        if token.startswith("/") and token.endswith("/bin/nvcc"):
                            candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(token))))
        except OSError:
            pass
    candidates.append("/usr/local/cuda")
    candidates += sorted(glob.glob("/usr/local/cuda-*"), reverse=True)
    for c in candidates:
        if _is_toolkit(c):
            return os.path.realpath(c)
    return None


def _nvidia_include_dirs() -> list[str]:
    """Headers shipped in torch's nvidia-* wheels (cublas_v2.h, cusparse.h, ...) that a system toolkit may
    lack; c10/ATen CUDA headers can pull them in."""
    dirs: list[str] = []
    spec = importlib.util.find_spec("nvidia")
    if spec is None or not spec.submodule_search_locations:
        return dirs
    for base in spec.submodule_search_locations:
        for inc in sorted(glob.glob(os.path.join(base, "*", "include"))):
            if os.path.isfile(os.path.join(inc, "cublas_v2.h")) or os.path.isfile(os.path.join(inc, "cusparse.h")):
                dirs.append(inc)
    return dirs


# ------------------------------------------------------------------------------------------------
# Decide what to build. CUDA_HOME must be set before torch.utils.cpp_extension is imported.
# ------------------------------------------------------------------------------------------------
CMDS = {"build_ext", "build", "install", "develop", "bdist_wheel", "editable_wheel", "bdist_egg"}
building = any(a in CMDS for a in sys.argv[1:])
torch = None
if _flag("MNET_EXT_NO_EXT"):
    _log("MNET_EXT_NO_EXT set: no C++/CUDA extension, a pure-Python install (backends triton and reference)")
else:
    try:
        import torch
    except ImportError:
        pass
if torch is None and not _flag("MNET_EXT_NO_EXT"):
    msg = (
        "PyTorch is not importable in the build environment. mnet_ext builds against the torch you already "
        "have: install torch (2.11-2.14) first, then run `pip install --no-build-isolation .` (or `-e .`); or set "
        "MNET_EXT_NO_EXT=1 for a pure-Python install without the extension."
    )
    if building:
        raise SystemExit("mnet_ext setup: " + msg)
    _log(msg)

ext_modules = []
cmdclass = {}
if torch is not None:
    with_cuda = False
    cuda_home = None
    if _flag("MNET_EXT_SKIP_CUDA"):
        _log("MNET_EXT_SKIP_CUDA set: building the CPU part only")
    elif torch.version.cuda is None:
        _log(f"torch {torch.__version__} is not a CUDA build: building the CPU part only")
    else:
        cuda_home = _find_cuda_home()
        if cuda_home is None:
            _log("no CUDA toolkit found (nvcc, CUDA_HOME): building the CPU part only")
        else:
            os.environ.setdefault("CUDA_HOME", cuda_home)
            with_cuda = True
    if with_cuda:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_ARCHS)
    os.environ.setdefault("MAX_JOBS", str(os.cpu_count() or 1))
    # ninja's progress line per compiled file, with the elapsed time (shown by `pip install -v`)
    os.environ.setdefault("NINJA_STATUS", "[%f/%t files, %e s] ")

    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    def _rel(pattern: str) -> list[str]:
        return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern), recursive=True))

    cpp_sources = _rel("csrc/**/*.cpp")
    cu_sources = _rel("csrc/**/*.cu")
    archs = os.environ.get("TORCH_CUDA_ARCH_LIST", "") if with_cuda else ""
    archs_token = ",".join(a for a in archs.replace(";", " ").replace(",", " ").split()) or "none"
    define_archs = f"-DMNET_EXT_CUDA_ARCHS={archs_token}"
    cxx_flags = ["-O3", "-g0", "-fopenmp", define_archs]  # -g0: Python's CFLAGS carry -g (slow, big)
    include_dirs = [os.path.join(ROOT, "csrc")]
    if with_cuda:
        cxx_flags.append("-DWITH_CUDA")
        include_dirs += _nvidia_include_dirs()
        nvcc_flags = ["-O3", "-lineinfo", "-DWITH_CUDA"]  # nvcc splits -D values at commas
        ext = CUDAExtension(
            "mnet_ext._C",
            cpp_sources + cu_sources,
            include_dirs=include_dirs,
            extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags},
            extra_link_args=["-fopenmp"],
        )
    else:
        ext = CppExtension(
            "mnet_ext._C",
            cpp_sources,
            include_dirs=include_dirs,
            extra_compile_args={"cxx": cxx_flags},
            extra_link_args=["-fopenmp"],
        )
    ext_modules = [ext]
    what = f"CPU + CUDA ({archs}, CUDA_HOME={cuda_home})" if with_cuda else "CPU only"
    n_cu = len(cu_sources) if with_cuda else 0
    _log(f"extension mnet_ext._C: {what}; {len(cpp_sources)} .cpp, {n_cu} .cu, MAX_JOBS={os.environ['MAX_JOBS']}")

    class OptionalBuildExt(BuildExtension):
        """BuildExtension that degrades to a pure-Python install when the extension cannot be built
        (unless MNET_EXT_REQUIRE_EXT=1)."""

        def run(self):
            start = time.time()
            if not _flag("MNET_EXT_REQUIRE_EXT") and shutil.which(os.environ.get("CXX", "c++")) is None:
                self._skip("no C++ compiler found (c++ / $CXX)")
                return
            try:
                super().run()
            except (Exception, SystemExit) as exc:  # distutils errors subclass Exception; ninja may exit
                if _flag("MNET_EXT_REQUIRE_EXT"):
                    raise
                self._skip(f"{type(exc).__name__}: {exc}")
                return
            _log(f"extension built in {time.time() - start:.0f} s")

        def _skip(self, why: str) -> None:
            _log(
                "WARNING: the C++/CUDA extension mnet_ext._C was NOT built (" + why + "). Installing the pure-"
                "Python package: backends 'triton' and 'reference' only. Set MNET_EXT_REQUIRE_EXT=1 to make this "
                "an error."
            )
            self.extensions = []

        def get_outputs(self):
            return super().get_outputs() if self.extensions else []

        def get_output_mapping(self):
            return super().get_output_mapping() if self.extensions else {}

    cmdclass = {
        "build_ext": OptionalBuildExt.with_options(
            use_ninja=shutil.which("ninja") is not None or importlib.util.find_spec("ninja") is not None
        )
    }

setup(packages=PACKAGES, package_dir=PACKAGE_DIR, ext_modules=ext_modules, cmdclass=cmdclass)
