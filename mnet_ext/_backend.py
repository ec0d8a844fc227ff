"""The backend registry: ``cuda`` (the C++ extension; its host twin serves CPU tensors), ``triton`` and
``reference``.

Choice, first match wins: the module's own ``backend`` (``fuse(model, backend=...)``), then the innermost
``use_backend(...)`` context, then the ``MNET_EXT_BACKEND`` environment variable, then the fastest backend
available for the tensor's device. A backend that cannot serve the device falls back to the next one in
that order of speed with a single warning saying why.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import types
import warnings
from collections.abc import Iterator

import torch

BACKENDS = ("cuda", "triton", "reference")
_MODULES = {
    "cuda": "mnet_ext.backends.cuda",
    "triton": "mnet_ext.backends.triton",
    "reference": "mnet_ext.reference",
}
_override: list[str] = []
_warned: set[tuple[str, str]] = set()
_loaded: dict[str, types.ModuleType] = {}


def _check_name(name: str, what: str) -> str:
    if name not in BACKENDS and name != "auto":
        raise ValueError(f"{what}: expected one of {BACKENDS + ('auto',)}, got {name!r}")
    return name


def _env_backend() -> str | None:
    name = os.environ.get("MNET_EXT_BACKEND") or None
    return None if name is None else _check_name(name, "MNET_EXT_BACKEND")


def load(name: str) -> types.ModuleType:
    """The module implementing backend ``name``'s primitives (the functions of ``mnet_ext.reference``)."""
    module = _loaded.get(name)  # every fused layer's call asks: the import machinery costs microseconds
    if module is None:
        module = _loaded[name] = importlib.import_module(_MODULES[_check_name(name, "backend")])
    return module


def unavailable_reason(name: str, device_type: str) -> str | None:
    """None when backend ``name`` can run on tensors of ``device_type``; otherwise why not."""
    if name == "reference":
        return None
    try:
        module = load(name)
    except Exception as exc:  # an import error is the reason, whatever its type
        return f"it failed to import ({type(exc).__name__}: {exc})"
    return module.unavailable_reason(device_type)


@torch.compiler.assume_constant_result
def resolve(requested: str | None, device_type: str) -> str:
    """The backend that will run, given the module's request (or None) and the tensors' device type."""
    if requested in (None, "auto"):
        requested = _override[-1] if _override else _env_backend()
    if requested not in (None, "auto"):
        reason = unavailable_reason(requested, device_type)
        if reason is None:
            return requested
        fallback = next(b for b in BACKENDS if unavailable_reason(b, device_type) is None)
        if (requested, device_type) not in _warned:
            _warned.add((requested, device_type))
            warnings.warn(
                f"mnet_ext: backend {requested!r} is unavailable for {device_type} tensors because {reason}; "
                f"using {fallback!r} instead",
                stacklevel=3,
            )
        return fallback
    return next(b for b in BACKENDS if unavailable_reason(b, device_type) is None)


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Run the fused ops inside this block on backend ``name`` (``cuda``, ``triton``, ``reference`` or ``auto``).

    Takes effect for modules fused without an explicit backend. Under ``torch.compile`` the choice is fixed when a
    graph is traced.
    """
    _override.append(_check_name(name, "use_backend(name)"))
    try:
        yield
    finally:
        _override.pop()


def available_backends(device_type: str) -> dict[str, str | None]:
    """{backend: None if usable on ``device_type`` else the reason}."""
    return {name: unavailable_reason(name, device_type) for name in BACKENDS}
