"""Checkpoints: the training state, atomic writes, and exact resumption (config compatibility checks, every
state restored)."""

from __future__ import annotations

import dataclasses
import os
import tempfile
import warnings
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel

from mnet_ext.train.config import TrainConfig
from mnet_ext.train.rng import rng_state, set_rng_state

# 2: "rng" is a list with every rank's RNG states (rank order) and "world_size" its length; 1: one dict, one process.
CHECKPOINT_VERSION = 2
# Config fields a checkpoint cannot be resumed under if they change (shapes, optimizer state, data order).
_RESUME_MUST_MATCH = ("model", "width_mult", "num_classes", "optimizer", "batch_size", "seed", "synthetic_size",
                      "ema_decay")


def save_atomic(obj: Any, path: str) -> None:
    """``torch.save`` to a temporary file in the same directory, fsync, then ``os.replace`` over ``path``: a reader
    (or a crash) sees the old checkpoint or the new one, never a partial file."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    try:  # make the rename itself durable
        dir_fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dir_fd)
    except OSError:
        pass
    finally:
        os.close(dir_fd)


@dataclass
class TrainState:
    model: nn.Module  # the module itself, not the torch.compile wrapper
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    ema: AveragedModel | None
    train_size: int = 0  # samples in the training set (the data order depends on it)
    step: int = 0
    loss_history: list[float] = dataclasses.field(default_factory=list)


def checkpoint_dict(state: TrainState, config: TrainConfig, rng_states: list[dict[str, Any]] | None = None
                    ) -> dict[str, Any]:
    """Everything a run needs to continue exactly. ``rng_states``: every rank's RNG states (default: this process's
    only). The model's state_dict is the bare module's (never DDP's ``module.``-prefixed one), so the file is the
    same for any number of ranks."""
    rng = rng_states if rng_states is not None else [rng_state()]
    return {
        "version": CHECKPOINT_VERSION,
        "config": dataclasses.asdict(config),
        "step": state.step,
        "model": state.model.state_dict(),
        "optimizer": state.optimizer.state_dict(),
        "scheduler": state.scheduler.state_dict(),
        "scaler": state.scaler.state_dict(),
        "ema": state.ema.state_dict() if state.ema is not None else None,
        "rng": rng,
        "world_size": len(rng),
        "loss_history": list(state.loss_history),
        "train_size": state.train_size,
    }


def check_resume_config(saved: dict[str, Any], config: TrainConfig) -> None:
    current = dataclasses.asdict(config)
    for key in _RESUME_MUST_MATCH:
        if saved.get(key) != current[key]:
            raise ValueError(f"cannot resume: checkpoint has {key}={saved.get(key)!r}, this run {current[key]!r}")
    ignore = {"resume", "checkpoint", "checkpoint_every", "stop_after", "progress", "log_every", "workers", "threads",
              "device", "data"}
    defaults = dataclasses.asdict(TrainConfig())  # for settings added after the checkpoint was written
    saved = {k: saved.get(k, defaults[k]) for k in current}
    changed = [k for k in current if k not in ignore and k not in _RESUME_MUST_MATCH and saved[k] != current[k]]
    if changed:
        warnings.warn(f"resuming with changed settings (the run will not match an uninterrupted one): "
                      f"{', '.join(f'{k}: {saved[k]!r} -> {current[k]!r}' for k in changed)}", stacklevel=2)


def load_checkpoint(path: str, state: TrainState, config: TrainConfig, rank: int = 0, world_size: int = 1) -> None:
    """Restore ``state`` and this rank's RNG states from ``path``. Written by any number of ranks, it loads into any
    number; only the same number continues exactly (the global batch, hence the data position, and the ranks' random
    streams depend on it): a different one is warned about, and a rank without a saved RNG state keeps its own."""
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    if ckpt.get("version") not in (1, CHECKPOINT_VERSION):
        raise ValueError(f"{path}: checkpoint version {ckpt.get('version')!r}, expected {CHECKPOINT_VERSION} (or 1)")
    check_resume_config(ckpt["config"], config)
    if ckpt["train_size"] != state.train_size:
        raise ValueError(f"cannot resume: the checkpoint's training set had {ckpt['train_size']} samples, this one "
                         f"{state.train_size} (the data order would differ)")
    state.model.load_state_dict(ckpt["model"])
    state.optimizer.load_state_dict(ckpt["optimizer"])
    state.scheduler.load_state_dict(ckpt["scheduler"])
    if ckpt["scaler"]:
        state.scaler.load_state_dict(ckpt["scaler"])
    if state.ema is not None:
        state.ema.load_state_dict(ckpt["ema"])
    state.step = ckpt["step"]
    state.loss_history = list(ckpt["loss_history"])
    rng = ckpt["rng"] if ckpt["version"] == CHECKPOINT_VERSION else [ckpt["rng"]]
    if len(rng) != world_size:
        warnings.warn(f"{path} was written by {len(rng)} rank(s), this run has {world_size}: it continues from step "
                      f"{state.step} with a different global batch, data order and random streams than an "
                      f"uninterrupted run", stacklevel=2)
    if rank < len(rng):
        set_rng_state(rng[rank])
