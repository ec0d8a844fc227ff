"""Packaging (issue 14): what a wheel of mnet_ext installs, what it declares, and a fresh virtual environment in which
every command-line tool runs with nothing but the declared dependencies.

The wheel is built pure-Python (``MNET_EXT_NO_EXT=1``: seconds instead of a C++/CUDA build) from a copy of the
package sources, with ``pip wheel --no-build-isolation``. The fresh environment gets the installed distributions of
the wheel's own ``Requires-Dist`` closure (torch, torchvision, tqdm and what they require) from this interpreter,
linked into a directory on its path: a module a CLI imports without declaring it is missing there, as it would be
for a user.
"""

from __future__ import annotations

import importlib.metadata
import os
import shutil
import subprocess
import sys
import venv
import zipfile
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

import mnet_ext

ROOT = Path(__file__).resolve().parents[1]
SOURCES = ("pyproject.toml", "setup.py", "README.md", "mnet_ext", "triton_kernels")
SCRIPTS = {"mnet-ext-profile": "mnet_ext.profile:main", "mnet-ext-train": "mnet_ext.train:main",
           "mnet-ext-info": "mnet_ext.info:main"}
DIST_INFO = f"mnet_ext-{mnet_ext.__version__}.dist-info"


def _build_wheel(out: Path) -> Path:
    src = out / "src"
    for name in SOURCES:
        path = ROOT / name
        if path.is_dir():  # no built extension, caches or build leftovers: the wheel must come from sources alone
            shutil.copytree(path, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.so", "*.egg-info"))
        else:
            (src / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, src / name)
    env = {**os.environ, "MNET_EXT_NO_EXT": "1"}
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-build-isolation", "--no-deps", "--no-index",
                    "-w", str(out / "dist"), str(src)], env=env, check=True, capture_output=True, timeout=600)
    (wheel,) = (out / "dist").glob("mnet_ext-*.whl")
    return wheel


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _build_wheel(tmp_path_factory.mktemp("wheel"))


def _wheel_text(wheel: Path, member: str) -> str:
    with zipfile.ZipFile(wheel) as z:
        return z.read(f"{DIST_INFO}/{member}").decode()


def test_wheel_adds_no_top_level_name_but_mnet_ext(wheel: Path):
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
    assert {n.split("/")[0] for n in names} == {"mnet_ext", DIST_INFO}
    kernels = {f"mnet_ext/triton_kernels/{p.name}" for p in (ROOT / "triton_kernels").glob("*.py")}
    assert kernels and kernels <= set(names), "triton_kernels/ must be installed as mnet_ext.triton_kernels"
    record = {line.split(",")[0] for line in _wheel_text(wheel, "RECORD").splitlines() if line}
    assert {n.split("/")[0] for n in record} == {"mnet_ext", DIST_INFO}


def test_wheel_declares_dependencies_extras_and_scripts(wheel: Path):
    meta = _wheel_text(wheel, "METADATA")
    requires = {str(Requirement(line.split(":", 1)[1].strip())) for line in meta.splitlines()
                if line.startswith("Requires-Dist:")}
    assert {"torch>=2.11", "torchvision", "tqdm", 'matplotlib; extra == "plot"'} <= requires, requires
    assert "Provides-Extra: plot" in meta
    entry_points = _wheel_text(wheel, "entry_points.txt")
    for script, target in SCRIPTS.items():
        assert f"{script} = {target}" in entry_points


def _closure(requirements: list[Requirement]) -> list[importlib.metadata.Distribution]:
    """The installed distributions that ``requirements`` pull in (markers and extras evaluated, extras followed)."""
    found: dict[str, importlib.metadata.Distribution] = {}
    seen: set[tuple[str, frozenset[str]]] = set()
    todo = list(requirements)
    while todo:
        req = todo.pop()
        key = canonicalize_name(req.name)
        if (key, frozenset(req.extras)) in seen:
            continue
        seen.add((key, frozenset(req.extras)))
        try:
            found[key] = dist = importlib.metadata.distribution(req.name)
        except importlib.metadata.PackageNotFoundError:
            continue  # not installed here, so this interpreter's torch runs without it too
        for line in dist.requires or []:
            sub = Requirement(line)
            if sub.marker is None or any(sub.marker.evaluate({"extra": e}) for e in {"", *req.extras}):
                todo.append(sub)
    return list(found.values())


def _link_distributions(dists: list[importlib.metadata.Distribution], site: Path) -> None:
    """Link every top-level file and folder of ``dists`` (their RECORDs) into ``site``."""
    site.mkdir()
    for dist in dists:
        for top in {f.parts[0] for f in dist.files or [] if f.parts[0] != ".."}:
            target = site / top
            if not target.exists():
                target.symlink_to(Path(dist.locate_file(top)).resolve())


@pytest.fixture(scope="module")
def fresh_venv(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A new virtual environment with the wheel installed and its declared dependencies, nothing else."""
    base = tmp_path_factory.mktemp("venv")
    env_dir = base / "venv"
    venv.create(env_dir, with_pip=False)
    python = env_dir / "bin" / "python"
    purelib = Path(subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                  capture_output=True, text=True, check=True).stdout.strip())
    meta = _wheel_text(wheel, "METADATA")
    declared = [Requirement(line.split(":", 1)[1].strip()) for line in meta.splitlines()
                if line.startswith("Requires-Dist:")]
    _link_distributions(_closure([r for r in declared if r.marker is None]), base / "deps")
    (purelib / "mnet_ext_test_deps.pth").write_text(f"{base / 'deps'}\n")
    before = set(os.listdir(purelib))
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps", "--no-index",
                    str(wheel)], check=True, capture_output=True, timeout=600)
    added = set(os.listdir(purelib)) - before
    assert added == {"mnet_ext", DIST_INFO}, f"installing mnet_ext added top-level names {sorted(added)}"
    return env_dir


def _run(env_dir: Path, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "TRITON_", "MNET_EXT_", "VIRTUAL_ENV"))}
    env.update(PATH=f"{env_dir / 'bin'}{os.pathsep}{env.get('PATH', '')}", OMP_NUM_THREADS="1")
    return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


# Runs in the fresh venv: where mnet_ext comes from, whether a top-level triton_kernels exists, then each CLI's --help
# as ``python -m`` runs it (one interpreter for all: each start imports torch, seconds on a loaded 2-core machine).
_PROBE = """
import contextlib, importlib.util, io, runpy, sys
import mnet_ext
print(mnet_ext.__file__)
print(importlib.util.find_spec("triton_kernels"), importlib.util.find_spec("mnet_ext.triton_kernels").origin)
for module in sys.argv[1:]:
    sys.argv = [module, "--help"]
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.suppress(SystemExit):
        runpy.run_module(module, run_name="__main__", alter_sys=True)
    print(module, "usage:" in out.getvalue())
"""


@pytest.mark.slow
def test_fresh_venv_runs_every_cli(fresh_venv: Path, tmp_path: Path):
    """Every CLI's --help and a tiny run of each (console scripts), outside the source tree."""

    def ok(*args: str) -> str:
        proc = _run(fresh_venv, *args, cwd=tmp_path)
        assert proc.returncode == 0, f"{args}: {proc.stdout[-3000:]}{proc.stderr[-3000:]}"
        return proc.stdout

    modules = [target.split(":")[0] for target in SCRIPTS.values()]
    origin, top_level, *helps = ok("python", "-c", _PROBE, *modules).splitlines()
    assert origin.startswith(str(fresh_venv)), "mnet_ext must come from the fresh venv, not the source tree"
    assert top_level.startswith("None "), top_level
    assert helps == [f"{m} True" for m in modules]
    info = ok("mnet-ext-info")
    assert "extension mnet_ext._C" in info and "backend reference on cpu" in info
    out = ok("mnet-ext-profile", "--model", "mobilenet_v3_small", "--batch", "1", "--resolution", "32", "--device",
             "cpu", "--min-time", "0", "--min-reps", "1")
    assert "dw conv" in out and "whole model" in out
    no_plot = _run(fresh_venv, "mnet-ext-profile", "--plot", "x.png", cwd=tmp_path)
    assert no_plot.returncode == 2 and "pip install 'mnet_ext[plot]'" in no_plot.stderr, no_plot.stderr
    assert len(no_plot.stderr.strip().splitlines()) == 1, "a missing matplotlib is one clear line"
    ok("mnet-ext-train", "--model", "mobilenet_v3_small", "--resolution", "32", "--batch-size", "2",
       "--synthetic-size", "4", "--steps", "2", "--device", "cpu", "--no-progress")
