"""Seeds and random-number-generator states (python, numpy, torch CPU and CUDA) for exact resumption."""

from __future__ import annotations

import random
import warnings
from typing import Any

import torch


def mix_seed(*values: int) -> int:
    """A well-mixed 63-bit seed from non-negative integers (splitmix64 steps), for independent per-sample streams."""
    h = 0x9E3779B97F4A7C15
    for v in values:
        h = (h ^ (v & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        h = (h ^ (h >> 31)) * 0x94D049BB133111EB & 0xFFFFFFFFFFFFFFFF
        h ^= h >> 29
    return h & 0x7FFFFFFFFFFFFFFF


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device
    try:
        import numpy as np
    except ImportError:
        return
    np.random.seed(seed % 2**32)


def rng_state() -> dict[str, Any]:
    """Every global RNG state (python, numpy, torch CPU, each CUDA device), in types ``torch.load`` accepts safely."""
    state: dict[str, Any] = {"python": random.getstate(), "torch": torch.get_rng_state()}
    try:
        import numpy as np
    except ImportError:
        pass
    else:
        kind, keys, pos, has_gauss, gauss = np.random.get_state()
        state["numpy"] = (kind, keys.tolist(), int(pos), int(has_gauss), float(gauss))
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "numpy" in state:
        import numpy as np

        kind, keys, pos, has_gauss, gauss = state["numpy"]
        np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, gauss))
    if "cuda" in state and torch.cuda.is_available():
        if len(state["cuda"]) != torch.cuda.device_count():
            warnings.warn("checkpoint CUDA RNG states are for a different number of GPUs; not restored", stacklevel=2)
        else:
            torch.cuda.set_rng_state_all(state["cuda"])
