"""``mnet_ext.train``: train a MobileNet (V1, V2, V3-Large, V3-Small), fused or native; ``python -m mnet_ext.train``.

One module per concern, each readable and testable alone:

* ``config``: ``TrainConfig`` (every setting), defaults, checks, the learning rate and device it resolves to;
* ``rng``: seeds and every RNG state;
* ``data``: synthetic / ImageFolder data, seeded augmentation, the resumable sampler and loader;
* ``model``: the model, optimizer, learning-rate schedule and EMA;
* ``checkpoint``: the training state, atomic checkpoints and exact resumption;
* ``loop``: the step, the run loop, evaluation and ``train``;
* ``distributed``: torchrun / DDP: the process group, per-rank devices, SyncBatchNorm, failures that end every rank;
* ``cli``: the command line (``main``).

The names below are the package's public interface (tests and other modules import them from here).
"""

from mnet_ext.train.checkpoint import (
    CHECKPOINT_VERSION,
    TrainState,
    check_resume_config,
    checkpoint_dict,
    load_checkpoint,
    save_atomic,
)
from mnet_ext.train.cli import build_parser, config_from_args, main, summary_line
from mnet_ext.train.config import (
    AMP_DTYPES,
    DEFAULT_LR,
    DEFAULT_WD,
    OPTIMIZERS,
    TrainConfig,
    resolve_device,
    resolved_lr,
    total_steps,
    validate_config,
)
from mnet_ext.train.data import (
    ResumableSampler,
    SeededTransform,
    SyntheticImages,
    build_datasets,
    build_loader,
    eval_transform,
    resolved_workers,
    train_transform,
)
from mnet_ext.train.distributed import CPUSyncBatchNorm, Distributed, RankFailedError
from mnet_ext.train.loop import Meter, autocast, build_state, evaluate, run_steps, to_device, train, train_step
from mnet_ext.train.model import (
    MODELS,
    LRFactor,
    build_ema,
    build_model,
    build_optimizer,
    ema_avg_fn,
    lr_factor,
    param_groups,
)
from mnet_ext.train.rng import mix_seed, rng_state, seed_everything, set_rng_state

__all__ = [
    "AMP_DTYPES", "autocast", "build_datasets", "build_ema", "build_loader", "build_model", "build_optimizer",
    "build_parser", "build_state", "check_resume_config", "checkpoint_dict", "CHECKPOINT_VERSION", "config_from_args",
    "CPUSyncBatchNorm", "DEFAULT_LR", "DEFAULT_WD", "Distributed", "ema_avg_fn", "eval_transform", "evaluate",
    "load_checkpoint", "lr_factor", "LRFactor", "main", "Meter", "mix_seed", "MODELS", "OPTIMIZERS", "param_groups",
    "RankFailedError", "resolve_device", "resolved_lr", "resolved_workers", "ResumableSampler", "rng_state",
    "run_steps", "save_atomic", "seed_everything", "SeededTransform", "set_rng_state", "summary_line",
    "SyntheticImages", "to_device", "total_steps", "train", "train_step", "train_transform", "TrainConfig",
    "TrainState", "validate_config",
]
