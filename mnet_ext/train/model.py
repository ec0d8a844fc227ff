"""What is trained: the model (fused or native), the optimizer and its parameter groups, the learning-rate
schedule and the EMA of the weights."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torchvision
from torch import nn
from torch.optim.swa_utils import AveragedModel

import mnet_ext
from mnet_ext.train.config import DEFAULT_WD, OPTIMIZERS, TrainConfig, resolved_lr

MODELS: dict[str, Callable[..., nn.Module]] = {
    "mobilenet_v1": mnet_ext.models.mobilenet_v1,
    "mobilenet_v2": torchvision.models.mobilenet_v2,
    "mobilenet_v3_large": torchvision.models.mobilenet_v3_large,
    "mobilenet_v3_small": torchvision.models.mobilenet_v3_small,
}


def build_model(config: TrainConfig, device: torch.device) -> nn.Module:
    if config.model not in MODELS:
        raise ValueError(f"--model: expected one of {sorted(MODELS)}, got {config.model!r}")
    dropout = {} if config.dropout is None else {"dropout": config.dropout}
    model = MODELS[config.model](width_mult=config.width_mult, num_classes=config.num_classes, **dropout)
    if config.fused:
        # fuse may run the model (its dataflow pass traces a forward on random inputs): keep it off the global RNG,
        # so fused and native runs with one seed draw the same dropout masks and data.
        with torch.random.fork_rng(devices=[]):
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


def build_optimizer(model: nn.Module, config: TrainConfig, world_size: int = 1) -> torch.optim.Optimizer:
    wd = config.weight_decay if config.weight_decay is not None else DEFAULT_WD[config.optimizer]
    groups, lr = param_groups(model, wd), resolved_lr(config, world_size)
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
