"""The training run's settings (``TrainConfig``), their defaults and checks, and values derived from them."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mnet_ext._backend import BACKENDS

OPTIMIZERS = ("sgd", "rmsprop", "adamw")
# Defaults per optimizer; the learning rate is for a global batch of 256 and scales linearly with the global batch
# (--batch-size per rank x the number of ranks: the "linear scaling rule", Goyal et al. 2017).
DEFAULT_LR = {"sgd": 0.1, "rmsprop": 0.016, "adamw": 1e-3}
DEFAULT_WD = {"sgd": 4e-5, "rmsprop": 1e-5, "adamw": 0.05}
AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


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
    dropout: float | None = None  # the classifier's dropout; None: the model's default
    channels_last: bool = False
    compile: bool = False
    sync_bn: bool = False  # under torchrun: batch statistics over every rank (mnet_ext.convert_sync_batchnorm)
    optimizer: str = "sgd"
    lr: float | None = None  # None: DEFAULT_LR[optimizer] * global batch / 256 (global: batch_size * ranks)
    weight_decay: float | None = None  # None: DEFAULT_WD[optimizer]
    label_smoothing: float = 0.1
    warmup_steps: int = 0
    ema_decay: float | None = None
    clip_grad_norm: float | None = None
    steps: int | None = None
    epochs: int | None = None  # used when steps is None (default: 1 epoch)
    stop_after: int | None = None  # stop at this global step (the schedule still spans the whole run)
    batch_size: int = 64  # per rank
    workers: int | None = None  # None: min(8, CPUs) with --data, 0 for synthetic data
    threads: int | None = None  # torch CPU threads (torch.set_num_threads); None: leave as is
    seed: int = 0
    device: str | None = None
    checkpoint: str | None = None
    checkpoint_every: int = 0
    resume: str | None = None
    log_every: int = 10
    progress: bool = True


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
    if config.dropout is not None and not 0.0 <= config.dropout < 1.0:
        raise ValueError(f"--dropout: expected a number in [0, 1), got {config.dropout}")
    if config.sync_bn and config.compile:
        raise ValueError("--sync-bn with --compile: the fused SyncBatchNorm is eager only (torch.compile does not "
                         "capture its collectives)")


def resolved_lr(config: TrainConfig, world_size: int = 1) -> float:
    """``--lr`` as given (the rate of one optimizer step, whatever the number of ranks), else the optimizer's default
    scaled by the global batch."""
    if config.lr is not None:
        return config.lr
    return DEFAULT_LR[config.optimizer] * config.batch_size * world_size / 256


def resolve_device(name: str | None) -> torch.device:
    return torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))


def total_steps(config: TrainConfig, steps_per_epoch: int) -> int:
    if config.steps is not None:
        return config.steps
    return (config.epochs or 1) * steps_per_epoch
