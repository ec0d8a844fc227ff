"""``python -m mnet_ext.train``: train a MobileNet (V1, V2, V3-Large, V3-Small), fused or native.

Data: ``--data DIR`` is a torchvision ``ImageFolder`` tree (``DIR/train`` and optional ``DIR/val``; ``DIR`` itself
when it has no ``train/``) with the standard MobileNet augmentation, or, without ``--data``, a deterministic synthetic
data set (class-dependent coarse patterns plus noise, so the loss can fall) built from ``--seed``.

Runs resume exactly: a checkpoint holds the model, optimizer, scheduler, grad scaler, EMA, every RNG state and the
step counter; the data order is a pure function of (seed, epoch) and each sample's augmentation is seeded by
(seed, epoch, index), so the loader position is just the step within the epoch. On the CPU, N steps + resume + N
steps end with bit-identical parameters to 2N steps straight (tests/test_train.py).

Several GPUs or nodes: run it under ``torchrun`` (DistributedDataParallel, one GPU per process; gloo on CPU).
``--batch-size`` is per process, and the default learning rate scales with the global batch (batch-size x
processes) / 256; an explicit ``--lr`` is taken as the rate for the global batch. Rank 0 alone prints and writes
checkpoints; a checkpoint loads under any number of processes and continues exactly under the same number.

Examples::

    python -m mnet_ext.train --model mobilenet_v3_small --steps 100                     # synthetic, fused
    python -m mnet_ext.train --data /imagenet --epochs 1 --amp bf16 --channels-last --compile \\
        --checkpoint ckpt.pt --checkpoint-every 1000
    python -m mnet_ext.train --data /imagenet --epochs 1 --resume ckpt.pt --checkpoint ckpt.pt
    torchrun --nproc_per_node=8 -m mnet_ext.train --data /imagenet --epochs 1 --sync-bn --checkpoint ckpt.pt
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from typing import Any

from mnet_ext._backend import BACKENDS
from mnet_ext.train import distributed
from mnet_ext.train.config import DEFAULT_LR, DEFAULT_WD, OPTIMIZERS, TrainConfig, resolve_device, resolved_lr
from mnet_ext.train.loop import train
from mnet_ext.train.model import MODELS


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
    g.add_argument("--dropout", type=float, default=None, help="the classifier's dropout (default: the model's)")
    g = p.add_argument_group("data")
    g.add_argument("--data", default=None, help="ImageFolder root (train/ and optional val/); default: synthetic")
    g.add_argument("--resolution", type=int, default=d.resolution)
    g.add_argument("--synthetic-size", type=int, default=d.synthetic_size, help="images in the synthetic set")
    g.add_argument("--batch-size", type=int, default=d.batch_size, help="per process (under torchrun)")
    g.add_argument("--workers", type=int, default=None,
                   help="DataLoader worker processes (default: min(8, CPUs) with --data, else 0)")
    g = p.add_argument_group("precision and speed")
    g.add_argument("--amp", choices=("none", "bf16", "fp16"), default=d.amp, help="autocast (fp16 adds GradScaler)")
    g.add_argument("--channels-last", action="store_true")
    g.add_argument("--compile", action="store_true", help="torch.compile the model")
    g = p.add_argument_group("optimization")
    g.add_argument("--optimizer", choices=OPTIMIZERS, default=d.optimizer)
    g.add_argument("--lr", type=float, default=None,
                   help=f"default: {DEFAULT_LR} per optimizer, times the global batch / 256 (global batch: "
                        f"batch-size x processes)")
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
    g = p.add_argument_group("several processes (torchrun)")
    g.add_argument("--sync-bn", action="store_true",
                   help="BatchNorm statistics over every process (fused layers and native BatchNorms)")
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
    world = metrics.get("world_size", 1)
    batch = f"batch {batch_size}" if world == 1 else f"global batch {batch_size * world} = {world} x {batch_size}"
    line = (f"done: {metrics['steps']}/{metrics['total_steps']} steps, loss (mean of last {len(tail)}) "
            f"{sum(tail) / len(tail):.4f}, {metrics['images_per_sec']:.1f} images/s ({batch}, {metrics['device']})")
    peaks = metrics.get("peak_memory_bytes_per_rank") or [metrics["peak_memory_bytes"]]
    if peaks[0] is not None:
        line += f", peak memory {', '.join(f'{p / 2**30:.2f}' for p in peaks)} GiB"
        line += " (per rank)" if len(peaks) > 1 else ""
    for key in ("val", "ema_val"):
        if key in metrics:
            line += (f"; {key} loss {metrics[key]['loss']:.4f} top-1 {metrics[key]['acc']:.4f} "
                     f"top-5 {metrics[key]['top5']:.4f}")
    return line


def main(argv: list[str] | None = None) -> int:
    config = config_from_args(build_parser().parse_args(argv))
    job = distributed.environment()  # under torchrun only rank 0 prints
    device = resolve_device(config.device)
    kind = f"fused (backend {config.backend})" if config.fused else "native"
    ranks = f" x {job.world_size} processes" if job.world_size > 1 else ""
    sync = ", SyncBatchNorm" if config.sync_bn and job.world_size > 1 else ""
    if job.is_main:
        print(f"{config.model} x{config.width_mult} {kind}, "
              f"{'data ' + config.data if config.data else 'synthetic data'}, {config.resolution}px, "
              f"batch {config.batch_size}{ranks}{sync}, amp {config.amp}, {config.optimizer} "
              f"lr {resolved_lr(config, job.world_size):g}, on {device}", flush=True)
    try:
        metrics = train(config)
    except FloatingPointError as exc:  # every rank raises it at the same step (the losses are reduced)
        if job.is_main:
            print(f"ERROR: {exc}", file=sys.stderr)
        return 1
    except distributed.RankFailedError as exc:
        if job.is_main or job.rank in exc.failed_ranks:
            print(f"ERROR (rank {job.rank}): {exc}", file=sys.stderr)
        return 1
    if job.is_main:
        print(summary_line(metrics, config.batch_size))
    return 0
