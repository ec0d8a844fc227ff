"""``python -m mnet_ext.train``: train a MobileNet (V1, V2, V3-Large, V3-Small), fused or native.

Data: ``--data DIR`` is a torchvision ``ImageFolder`` tree (``DIR/train`` and optional ``DIR/val``; ``DIR`` itself
when it has no ``train/``) with the standard MobileNet augmentation, or, without ``--data``, a deterministic synthetic
data set (class-dependent coarse patterns plus noise, so the loss can fall) built from ``--seed``.

Runs resume exactly: a checkpoint holds the model, optimizer, scheduler, grad scaler, EMA, every RNG state and the
step counter; the data order is a pure function of (seed, epoch) and each sample's augmentation is seeded by
(seed, epoch, index), so the loader position is just the step within the epoch. On the CPU, N steps + resume + N
steps end with bit-identical parameters to 2N steps straight (tests/test_train.py).

Examples::

    python -m mnet_ext.train --model mobilenet_v3_small --steps 100                     # synthetic, fused
    python -m mnet_ext.train --data /imagenet --epochs 1 --amp bf16 --channels-last --compile \\
        --checkpoint ckpt.pt --checkpoint-every 1000
    python -m mnet_ext.train --data /imagenet --epochs 1 --resume ckpt.pt --checkpoint ckpt.pt
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import random
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torchvision
from torch import nn
from torch.optim.swa_utils import AveragedModel
from torch.utils.data import DataLoader, Dataset, Sampler

import mnet_ext
from mnet_ext._backend import BACKENDS

MODELS: dict[str, Callable[..., nn.Module]] = {
    "mobilenet_v1": mnet_ext.models.mobilenet_v1,
    "mobilenet_v2": torchvision.models.mobilenet_v2,
    "mobilenet_v3_large": torchvision.models.mobilenet_v3_large,
    "mobilenet_v3_small": torchvision.models.mobilenet_v3_small,
}
OPTIMIZERS = ("sgd", "rmsprop", "adamw")
# Defaults per optimizer; the learning rate is for batch 256 and scales linearly with --batch-size.
DEFAULT_LR = {"sgd": 0.1, "rmsprop": 0.016, "adamw": 1e-3}
DEFAULT_WD = {"sgd": 4e-5, "rmsprop": 1e-5, "adamw": 0.05}
AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
CHECKPOINT_VERSION = 1
# Config fields a checkpoint cannot be resumed under if they change (shapes, optimizer state, data order).
_RESUME_MUST_MATCH = ("model", "width_mult", "num_classes", "optimizer", "batch_size", "seed", "synthetic_size",
                      "ema_decay")


@dataclass
class TrainConfig:
    model: str = "mobilenet_v3_large"
    width_mult: float = 1.0
    num_classes: int = 1000
    data: str | None = None
    resolution: int = 224
    synthetic_size: int = 1024
    fused: bool = True
    backend: str = "auto"
    amp: str = "none"
    channels_last: bool = False
    compile: bool = False
    optimizer: str = "sgd"
    lr: float | None = None  # None: DEFAULT_LR[optimizer] * batch_size / 256
    weight_decay: float | None = None  # None: DEFAULT_WD[optimizer]
    label_smoothing: float = 0.1
    warmup_steps: int = 0
    ema_decay: float | None = None
    clip_grad_norm: float | None = None
    steps: int | None = None
    epochs: int | None = None  # used when steps is None (default: 1 epoch)
    stop_after: int | None = None  # stop at this global step (the schedule still spans the whole run)
    batch_size: int = 64
    workers: int | None = None  # None: min(8, CPUs) with --data, 0 for synthetic data
    threads: int | None = None  # torch CPU threads (torch.set_num_threads); None: leave as is
    seed: int = 0
    device: str | None = None
    checkpoint: str | None = None
    checkpoint_every: int = 0
    resume: str | None = None
    log_every: int = 10
    progress: bool = True


# ---------------------------------------------------------------------------------------------------------- seeding


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


# ------------------------------------------------------------------------------------------------------------- data


class SyntheticImages(Dataset):
    """``size`` deterministic (image, label) pairs from ``seed``: a per-class coarse 8x8 pattern, upsampled, plus
    noise. Indexed by ``(epoch, index)`` like ``SeededTransform`` (the epoch is ignored: no augmentation)."""

    def __init__(self, size: int, num_classes: int, resolution: int, seed: int) -> None:
        self.size, self.num_classes, self.resolution, self.seed = size, num_classes, resolution, seed
        self.labels = torch.randint(num_classes, (size,), generator=torch.Generator().manual_seed(mix_seed(seed, 1)))

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, key: tuple[int, int]) -> tuple[torch.Tensor, int]:
        index = key[1]
        label = int(self.labels[index])
        pattern = torch.randn(1, 3, 8, 8, generator=torch.Generator().manual_seed(mix_seed(self.seed, 2, label)))
        pattern = nn.functional.interpolate(pattern, size=(self.resolution,) * 2, mode="bilinear")[0]
        noise_gen = torch.Generator().manual_seed(mix_seed(self.seed, 3, index))
        return pattern + torch.randn(pattern.shape, generator=noise_gen), label


class SeededTransform(Dataset):
    """Wraps a dataset of PIL images: item ``(epoch, index)`` is ``base[index]`` transformed under a torch RNG seeded
    by (seed, epoch, index), so augmentation does not depend on workers, batch position or resumption."""

    def __init__(self, base: Dataset, transform: Callable[[Any], torch.Tensor], seed: int) -> None:
        self.base, self.transform, self.seed = base, transform, seed

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def __getitem__(self, key: tuple[int, int]) -> tuple[torch.Tensor, int]:
        epoch, index = key
        image, label = self.base[index]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(mix_seed(self.seed, epoch, index))
            return self.transform(image), label


class ResumableSampler(Sampler):
    """Yields ``(epoch, index)`` for a permutation that is a pure function of (seed, epoch), starting at batch
    ``start_batch`` of the epoch and covering whole batches only (``steps_per_epoch * batch_size`` samples)."""

    def __init__(self, size: int, batch_size: int, seed: int) -> None:
        if size < batch_size:
            raise ValueError(f"the training set has {size} samples, fewer than one batch of {batch_size}")
        self.size, self.batch_size, self.seed = size, batch_size, seed
        self.epoch, self.start_batch = 0, 0

    @property
    def steps_per_epoch(self) -> int:
        return self.size // self.batch_size

    def set_position(self, epoch: int, start_batch: int) -> None:
        self.epoch, self.start_batch = epoch, start_batch

    def __len__(self) -> int:
        return (self.steps_per_epoch - self.start_batch) * self.batch_size

    def __iter__(self) -> Iterator[tuple[int, int]]:
        order = torch.randperm(self.size, generator=torch.Generator().manual_seed(mix_seed(self.seed, 4, self.epoch)))
        start, stop = self.start_batch * self.batch_size, self.steps_per_epoch * self.batch_size
        for index in order[start:stop].tolist():
            yield self.epoch, index


def train_transform(resolution: int) -> Callable[[Any], torch.Tensor]:
    from torchvision import transforms as T

    return T.Compose([T.RandomResizedCrop(resolution), T.RandomHorizontalFlip(), T.ToTensor(),
                      T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


def eval_transform(resolution: int) -> Callable[[Any], torch.Tensor]:
    from torchvision import transforms as T

    return T.Compose([T.Resize(round(resolution / 0.875)), T.CenterCrop(resolution), T.ToTensor(),
                      T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


def build_datasets(config: TrainConfig) -> tuple[Dataset, Dataset | None]:
    """(training set indexed by (epoch, index), validation set or None)."""
    if config.data is None:
        return SyntheticImages(config.synthetic_size, config.num_classes, config.resolution, config.seed), None
    from torchvision.datasets import ImageFolder

    train_dir = os.path.join(config.data, "train")
    if not os.path.isdir(train_dir):
        train_dir = config.data
    train_set = SeededTransform(ImageFolder(train_dir), train_transform(config.resolution), config.seed)
    val_dir = os.path.join(config.data, "val")
    val_set = ImageFolder(val_dir, eval_transform(config.resolution)) if os.path.isdir(val_dir) else None
    return train_set, val_set


def resolved_workers(config: TrainConfig) -> int:
    if config.workers is not None:
        return config.workers
    return min(8, os.cpu_count() or 1) if config.data else 0


def build_loader(dataset: Dataset, sampler: ResumableSampler, config: TrainConfig, device: torch.device) -> DataLoader:
    # A generator of its own: otherwise each new iterator draws its worker base seed from the global torch RNG, and a
    # resumed run (which starts one more iterator) would drift from a straight one.
    workers = resolved_workers(config)
    return DataLoader(dataset, batch_size=config.batch_size, sampler=sampler, drop_last=True, num_workers=workers,
                      pin_memory=device.type == "cuda", persistent_workers=workers > 0,
                      generator=torch.Generator().manual_seed(config.seed))


# ----------------------------------------------------------------------------------------------------------- model


def build_model(config: TrainConfig, device: torch.device) -> nn.Module:
    if config.model not in MODELS:
        raise ValueError(f"--model: expected one of {sorted(MODELS)}, got {config.model!r}")
    model = MODELS[config.model](width_mult=config.width_mult, num_classes=config.num_classes)
    if config.fused:
        mnet_ext.fuse(model, backend=None if config.backend == "auto" else config.backend)
    model = model.to(device)
    if config.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Weight decay on conv/linear weights only: no decay on BatchNorm parameters and biases (all the 1-D ones)."""
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim <= 1]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def resolved_lr(config: TrainConfig) -> float:
    return config.lr if config.lr is not None else DEFAULT_LR[config.optimizer] * config.batch_size / 256


def build_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    wd = config.weight_decay if config.weight_decay is not None else DEFAULT_WD[config.optimizer]
    groups, lr = param_groups(model, wd), resolved_lr(config)
    if config.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=0.9, nesterov=True)
    if config.optimizer == "rmsprop":  # the MobileNet (TF) recipe
        return torch.optim.RMSprop(groups, lr=lr, alpha=0.9, eps=0.0316, momentum=0.9)
    if config.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=lr)
    raise ValueError(f"--optimizer: expected one of {OPTIMIZERS}, got {config.optimizer!r}")


def lr_factor(step: int, warmup_steps: int, total_steps: int) -> float:
    """Multiplier of the base learning rate for 0-based ``step``: linear warm-up to 1, then cosine to 0."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


class LRFactor:
    """Picklable schedule (``LambdaLR`` saves a callable object's ``__dict__``; both runs rebuild it from config)."""

    def __init__(self, warmup_steps: int, total_steps: int) -> None:
        self.warmup_steps, self.total_steps = warmup_steps, total_steps

    def __call__(self, step: int) -> float:
        return lr_factor(step, self.warmup_steps, self.total_steps)


def ema_avg_fn(decay: float) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]:
    """``avg_fn`` for ``AveragedModel``: exponential moving average of floating tensors (parameters and BN running
    stats); integer buffers (``num_batches_tracked``) follow the model."""

    def avg(averaged: torch.Tensor, current: torch.Tensor, num_averaged: torch.Tensor) -> torch.Tensor:
        if not averaged.is_floating_point():
            return current
        return averaged * decay + current * (1.0 - decay)

    return avg


def build_ema(model: nn.Module, decay: float | None) -> AveragedModel | None:
    if decay is None:
        return None
    if not 0.0 < decay < 1.0:
        raise ValueError(f"--ema-decay: expected a number in (0, 1), got {decay}")
    return AveragedModel(model, avg_fn=ema_avg_fn(decay), use_buffers=True)


# ------------------------------------------------------------------------------------------------------ checkpoints


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


def checkpoint_dict(state: TrainState, config: TrainConfig) -> dict[str, Any]:
    return {
        "version": CHECKPOINT_VERSION,
        "config": dataclasses.asdict(config),
        "step": state.step,
        "model": state.model.state_dict(),
        "optimizer": state.optimizer.state_dict(),
        "scheduler": state.scheduler.state_dict(),
        "scaler": state.scaler.state_dict(),
        "ema": state.ema.state_dict() if state.ema is not None else None,
        "rng": rng_state(),
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
    changed = [k for k in current if k not in ignore and k not in _RESUME_MUST_MATCH and saved.get(k) != current[k]]
    if changed:
        warnings.warn(f"resuming with changed settings (the run will not match an uninterrupted one): "
                      f"{', '.join(f'{k}: {saved.get(k)!r} -> {current[k]!r}' for k in changed)}", stacklevel=2)


def load_checkpoint(path: str, state: TrainState, config: TrainConfig) -> None:
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    if ckpt.get("version") != CHECKPOINT_VERSION:
        raise ValueError(f"{path}: checkpoint version {ckpt.get('version')!r}, expected {CHECKPOINT_VERSION}")
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
    set_rng_state(ckpt["rng"])


# -------------------------------------------------------------------------------------------------------- training


def resolve_device(name: str | None) -> torch.device:
    return torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))


def total_steps(config: TrainConfig, steps_per_epoch: int) -> int:
    if config.steps is not None:
        return config.steps
    return (config.epochs or 1) * steps_per_epoch


def autocast(config: TrainConfig, device: torch.device) -> torch.autocast:
    dtype = AMP_DTYPES.get(config.amp, torch.bfloat16)
    return torch.autocast(device.type, dtype=dtype, enabled=config.amp != "none")


def to_device(images: torch.Tensor, labels: torch.Tensor, device: torch.device,
              channels_last: bool) -> tuple[torch.Tensor, torch.Tensor]:
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    images = images.to(device, non_blocking=True).contiguous(memory_format=fmt)
    return images, labels.to(device, non_blocking=True)


def train_step(forward: nn.Module, state: TrainState, criterion: nn.Module, images: torch.Tensor,
               labels: torch.Tensor, config: TrainConfig, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimizer step; returns (loss, number of correct top-1 predictions) as device tensors (no sync)."""
    with autocast(config, device):
        logits = forward(images)
        loss = criterion(logits.float(), labels)
    state.optimizer.zero_grad(set_to_none=True)
    state.scaler.scale(loss).backward()
    if config.clip_grad_norm is not None:
        state.scaler.unscale_(state.optimizer)
        nn.utils.clip_grad_norm_(state.model.parameters(), config.clip_grad_norm)
    state.scaler.step(state.optimizer)
    state.scaler.update()
    state.scheduler.step()
    if state.ema is not None:
        state.ema.update_parameters(state.model)
    correct = (logits.detach().argmax(dim=1) == labels).sum()
    return loss.detach(), correct


@torch.no_grad()
def evaluate(model: nn.Module, dataset: Dataset, config: TrainConfig, device: torch.device) -> dict[str, float]:
    loader = DataLoader(dataset, batch_size=config.batch_size, num_workers=resolved_workers(config),
                        pin_memory=device.type == "cuda")
    was_training = model.training
    model.eval()
    loss_sum, correct, count = torch.zeros((), device=device), torch.zeros((), device=device), 0
    for images, labels in loader:
        images, labels = to_device(images, labels, device, config.channels_last)
        with autocast(config, device):
            logits = model(images).float()
        loss_sum += nn.functional.cross_entropy(logits, labels, reduction="sum")
        correct += (logits.argmax(dim=1) == labels).sum()
        count += labels.numel()
    model.train(was_training)
    return {"loss": loss_sum.item() / max(count, 1), "acc": correct.item() / max(count, 1)}


class Meter:
    """Per-step losses and correct counts kept on the device and synced only every ``log_every`` steps."""

    def __init__(self, history: list[float]) -> None:
        self.history = history
        self.pending: list[tuple[torch.Tensor, torch.Tensor, int]] = []
        self.window_loss, self.window_acc = float("nan"), float("nan")

    def add(self, loss: torch.Tensor, correct: torch.Tensor, count: int) -> None:
        self.pending.append((loss, correct, count))

    def flush(self, first_step: int) -> None:
        """Move pending values to the history; raise if a loss is not finite (``first_step``: step of the first)."""
        if not self.pending:
            return
        losses = torch.stack([p[0].float() for p in self.pending]).tolist()
        correct = torch.stack([p[1] for p in self.pending]).sum().item()
        count = sum(p[2] for p in self.pending)
        self.pending.clear()
        for i, value in enumerate(losses):
            if not math.isfinite(value):
                raise FloatingPointError(f"loss is {value} at step {first_step + i + 1}")
        self.history.extend(losses)
        self.window_loss, self.window_acc = sum(losses) / len(losses), correct / count


def build_state(config: TrainConfig, device: torch.device, steps: int, train_size: int) -> TrainState:
    model = build_model(config, device)
    optimizer = build_optimizer(model, config)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, LRFactor(config.warmup_steps, steps))
    scaler = torch.amp.GradScaler(device.type, enabled=config.amp == "fp16")
    return TrainState(model, optimizer, scheduler, scaler, build_ema(model, config.ema_decay), train_size)


def validate_config(config: TrainConfig) -> None:
    if config.amp not in ("none", *AMP_DTYPES):
        raise ValueError(f"--amp: expected none, bf16 or fp16, got {config.amp!r}")
    if config.optimizer not in OPTIMIZERS:
        raise ValueError(f"--optimizer: expected one of {OPTIMIZERS}, got {config.optimizer!r}")
    if config.backend not in ("auto", *BACKENDS):
        raise ValueError(f"--backend: expected one of {('auto', *BACKENDS)}, got {config.backend!r}")
    if config.steps is not None and config.epochs is not None:
        raise ValueError("give --steps or --epochs, not both")
    if config.checkpoint_every and not config.checkpoint:
        raise ValueError("--checkpoint-every needs --checkpoint PATH")


def train(config: TrainConfig) -> dict[str, Any]:
    """Train as ``config`` says; returns the metrics (``loss_history``: every step's loss since step 0, including
    the steps before a resume; ``images_per_sec``; ``peak_memory_bytes`` on CUDA; ``val``/``ema_val`` with a
    validation set) and, for callers, the trained ``model``, ``ema`` (or None) and ``optimizer``."""
    validate_config(config)
    device = resolve_device(config.device)
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    seed_everything(config.seed)
    train_set, val_set = build_datasets(config)
    sampler = ResumableSampler(len(train_set), config.batch_size, config.seed)  # type: ignore[arg-type]
    steps = total_steps(config, sampler.steps_per_epoch)
    state = build_state(config, device, steps, sampler.size)
    if config.resume:
        load_checkpoint(config.resume, state, config)
    stop = min(steps, config.stop_after) if config.stop_after is not None else steps
    forward = torch.compile(state.model) if config.compile else state.model
    criterion = nn.CrossEntropyLoss(label_smoothing=config.label_smoothing)
    loader = build_loader(train_set, sampler, config, device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    state.model.train()
    images_per_sec = run_steps(forward, state, criterion, loader, sampler, config, device, stop)
    metrics: dict[str, Any] = {"steps": state.step, "total_steps": steps, "loss_history": state.loss_history,
                               "images_per_sec": images_per_sec, "device": str(device),
                               "peak_memory_bytes": torch.cuda.max_memory_allocated(device)
                               if device.type == "cuda" else None}
    if val_set is not None:
        metrics["val"] = evaluate(state.model, val_set, config, device)
        if state.ema is not None:
            metrics["ema_val"] = evaluate(state.ema.module, val_set, config, device)
    metrics.update(model=state.model, ema=state.ema, optimizer=state.optimizer)
    return metrics


def run_steps(forward: nn.Module, state: TrainState, criterion: nn.Module, loader: DataLoader,
              sampler: ResumableSampler, config: TrainConfig, device: torch.device, stop: int) -> float:
    """Train from ``state.step`` to ``stop``, checkpointing as configured; returns images/s (timed from the end of
    the first step of this run, which includes compilation and warm-up; over all steps if there is only one)."""
    from tqdm import tqdm

    meter = Meter(state.loss_history)
    bar = tqdm(total=stop, initial=state.step, desc="train", unit="step", disable=not config.progress,
               file=sys.stderr, dynamic_ncols=True)
    start_step, timed_from, t0 = state.step, state.step, time.perf_counter()
    while state.step < stop:
        epoch, position = divmod(state.step, sampler.steps_per_epoch)
        sampler.set_position(epoch, position)
        for images, labels in loader:
            images, labels = to_device(images, labels, device, config.channels_last)
            loss, correct = train_step(forward, state, criterion, images, labels, config, device)
            meter.add(loss, correct, labels.numel())
            state.step += 1
            bar.update(1)
            if state.step == start_step + 1 and stop - start_step > 1:
                meter.flush(state.step - 1)  # syncs: the timed region starts after the first step
                timed_from, t0 = state.step, time.perf_counter()
            if state.step % config.log_every == 0 or state.step == stop:
                meter.flush(state.step - len(meter.pending))
                elapsed = time.perf_counter() - t0
                rate = (state.step - timed_from) * config.batch_size / elapsed if elapsed > 0 else float("nan")
                bar.set_postfix(loss=f"{meter.window_loss:.4f}", acc=f"{meter.window_acc:.3f}", img_s=f"{rate:.1f}")
            if config.checkpoint and (state.step == stop or (config.checkpoint_every
                                                             and state.step % config.checkpoint_every == 0)):
                meter.flush(state.step - len(meter.pending))
                save_atomic(checkpoint_dict(state, config), config.checkpoint)
            if state.step >= stop:
                break
    meter.flush(state.step - len(meter.pending))
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    bar.close()
    elapsed = time.perf_counter() - t0
    return (state.step - timed_from) * config.batch_size / elapsed if state.step > timed_from and elapsed > 0 else 0.0


# ------------------------------------------------------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m mnet_ext.train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    d = TrainConfig()
    g = p.add_argument_group("model")
    g.add_argument("--model", choices=sorted(MODELS), default=d.model)
    g.add_argument("--width-mult", type=float, default=d.width_mult)
    g.add_argument("--num-classes", type=int, default=d.num_classes)
    fused = g.add_mutually_exclusive_group()
    fused.add_argument("--fused", dest="fused", action="store_true", default=True, help="mnet_ext.fuse (default)")
    fused.add_argument("--native", dest="fused", action="store_false", help="plain torchvision/PyTorch modules")
    g.add_argument("--backend", choices=("auto", *BACKENDS), default=d.backend, help="backend of the fused modules")
    g = p.add_argument_group("data")
    g.add_argument("--data", default=None, help="ImageFolder root (train/ and optional val/); default: synthetic")
    g.add_argument("--resolution", type=int, default=d.resolution)
    g.add_argument("--synthetic-size", type=int, default=d.synthetic_size, help="images in the synthetic set")
    g.add_argument("--batch-size", type=int, default=d.batch_size)
    g.add_argument("--workers", type=int, default=None,
                   help="DataLoader worker processes (default: min(8, CPUs) with --data, else 0)")
    g = p.add_argument_group("precision and speed")
    g.add_argument("--amp", choices=("none", "bf16", "fp16"), default=d.amp, help="autocast (fp16 adds GradScaler)")
    g.add_argument("--channels-last", action="store_true")
    g.add_argument("--compile", action="store_true", help="torch.compile the model")
    g = p.add_argument_group("optimization")
    g.add_argument("--optimizer", choices=OPTIMIZERS, default=d.optimizer)
    g.add_argument("--lr", type=float, default=None,
                   help=f"default: {DEFAULT_LR} per optimizer, times batch-size/256")
    g.add_argument("--weight-decay", type=float, default=None,
                   help=f"default: {DEFAULT_WD}; never on BatchNorm parameters or biases")
    g.add_argument("--label-smoothing", type=float, default=d.label_smoothing)
    g.add_argument("--warmup-steps", type=int, default=d.warmup_steps, help="linear warm-up, then cosine to 0")
    g.add_argument("--ema-decay", type=float, default=None, help="keep an EMA of weights and BN buffers")
    g.add_argument("--clip-grad-norm", type=float, default=None)
    length = g.add_mutually_exclusive_group()
    length.add_argument("--steps", type=int, default=None)
    length.add_argument("--epochs", type=int, default=None, help="default: 1 epoch when --steps is not given")
    g.add_argument("--stop-after", type=int, default=None,
                   help="stop (checkpointing) at this global step; the schedule still spans the whole run")
    g.add_argument("--seed", type=int, default=d.seed)
    g.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    g.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    g = p.add_argument_group("checkpoints and output")
    g.add_argument("--checkpoint", default=None, help="checkpoint path (written atomically; also at the end)")
    g.add_argument("--checkpoint-every", type=int, default=0, metavar="N", help="save every N steps")
    g.add_argument("--resume", default=None, metavar="PATH", help="resume exactly from a checkpoint")
    g.add_argument("--log-every", type=int, default=d.log_every, help="sync and update the progress bar every N")
    g.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    return p


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    return TrainConfig(**{k: v for k, v in vars(args).items() if k in names})


def summary_line(metrics: dict[str, Any], batch_size: int) -> str:
    losses = metrics["loss_history"]
    tail = losses[-min(10, len(losses)):] if losses else [float("nan")]
    line = (f"done: {metrics['steps']}/{metrics['total_steps']} steps, loss (mean of last {len(tail)}) "
            f"{sum(tail) / len(tail):.4f}, {metrics['images_per_sec']:.1f} images/s (batch {batch_size}, "
            f"{metrics['device']})")
    if metrics["peak_memory_bytes"] is not None:
        line += f", peak memory {metrics['peak_memory_bytes'] / 2**30:.2f} GiB"
    for key in ("val", "ema_val"):
        if key in metrics:
            line += f"; {key} loss {metrics[key]['loss']:.4f} top-1 {metrics[key]['acc']:.4f}"
    return line


def main(argv: list[str] | None = None) -> int:
    config = config_from_args(build_parser().parse_args(argv))
    device = resolve_device(config.device)
    kind = f"fused (backend {config.backend})" if config.fused else "native"
    print(f"{config.model} x{config.width_mult} {kind}, {'data ' + config.data if config.data else 'synthetic data'}, "
          f"{config.resolution}px, "
          f"batch {config.batch_size}, amp {config.amp}, {config.optimizer} lr {resolved_lr(config):g}, on {device}")
    try:
        metrics = train(config)
    except FloatingPointError as exc:
        print(f"ERROR: {exc}", file=sys.stderr)
        return 1
    print(summary_line(metrics, config.batch_size))
    return 0


if __name__ == "__main__":
    sys.exit(main())
