"""The training loop: one step, the run from the current step to the stop (progress, checkpoints, timing),
evaluation, and ``train``, which puts data, model, checkpoints and (under torchrun) the ranks together.

Several ranks (``mnet_ext.train.distributed``): each trains a DDP replica on its slice of every global batch;
losses, accuracies and validation sums are reduced over the ranks, so every rank holds the same numbers (and
stops together on a non-finite loss); rank 0 alone draws the progress bar and writes checkpoints, which carry every
rank's RNG states."""

from __future__ import annotations

import math
import sys
import time
import warnings
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from mnet_ext.train import distributed
from mnet_ext.train.checkpoint import TrainState, checkpoint_dict, load_checkpoint, save_atomic
from mnet_ext.train.config import AMP_DTYPES, TrainConfig, resolve_device, total_steps, validate_config
from mnet_ext.train.data import ResumableSampler, build_datasets, build_loader, resolved_workers
from mnet_ext.train.distributed import SINGLE_PROCESS, Distributed
from mnet_ext.train.model import LRFactor, build_ema, build_model, build_optimizer
from mnet_ext.train.rng import mix_seed, rng_state, seed_everything


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
def evaluate(model: nn.Module, dataset: Dataset, config: TrainConfig, device: torch.device,
             job: Distributed = SINGLE_PROCESS) -> dict[str, float]:
    """Mean loss, top-1 (``acc``) and top-5 accuracy over the whole set. With several ranks each takes every
    ``world_size``-th sample (no padding, unlike DistributedSampler: each sample counts once) and the sums are
    reduced, so every rank returns the numbers of the whole set."""
    if job.world_size > 1:
        dataset = Subset(dataset, range(job.rank, len(dataset), job.world_size))  # type: ignore[arg-type]
    loader = DataLoader(dataset, batch_size=config.batch_size, num_workers=resolved_workers(config),
                        pin_memory=device.type == "cuda")
    was_training = model.training
    model.eval()
    sums = torch.zeros(4, dtype=torch.float64, device=device)  # loss, top-1 correct, top-5 correct, count
    for images, labels in loader:
        images, labels = to_device(images, labels, device, config.channels_last)
        with autocast(config, device):
            logits = model(images).float()
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices
        hits = top == labels[:, None]
        sums += torch.stack([nn.functional.cross_entropy(logits, labels, reduction="sum").double(),
                             hits[:, 0].sum().double(), hits.any(dim=1).sum().double(),
                             torch.tensor(labels.numel(), dtype=torch.float64, device=device)])
    model.train(was_training)
    loss_sum, correct, correct5, count = distributed.all_reduce_sum(sums, job).tolist()
    count = max(count, 1)
    return {"loss": loss_sum / count, "acc": correct / count, "top5": correct5 / count}


class Meter:
    """Per-step losses and correct counts kept on the device and synced only every ``log_every`` steps."""

    def __init__(self, history: list[float], job: Distributed = SINGLE_PROCESS) -> None:
        self.history, self.job = history, job
        self.pending: list[tuple[torch.Tensor, torch.Tensor, int]] = []
        self.window_loss, self.window_acc = float("nan"), float("nan")

    def add(self, loss: torch.Tensor, correct: torch.Tensor, count: int) -> None:
        self.pending.append((loss, correct, count))

    def flush(self, first_step: int) -> None:
        """Move pending values to the history; raise if a loss is not finite (``first_step``: step of the first)."""
        if not self.pending:
            return
        losses = torch.stack([p[0].float() for p in self.pending])
        correct = torch.stack([p[1] for p in self.pending]).sum()
        count = sum(p[2] for p in self.pending)
        self.pending.clear()
        if self.job.world_size > 1:  # the global batch's loss: every rank logs (and stops on) the same values
            totals = distributed.all_reduce_sum(torch.cat([losses.double(), correct.double().view(1)]), self.job)
            losses, correct, count = totals[:-1] / self.job.world_size, totals[-1], count * self.job.world_size
        losses, correct = losses.tolist(), correct.item()
        for i, value in enumerate(losses):
            if not math.isfinite(value):
                raise FloatingPointError(f"loss is {value} at step {first_step + i + 1}")
        self.history.extend(losses)
        self.window_loss, self.window_acc = sum(losses) / len(losses), correct / count


def build_state(config: TrainConfig, device: torch.device, steps: int, train_size: int,
                job: Distributed = SINGLE_PROCESS) -> TrainState:
    model = build_model(config, device)
    # The EMA copies the model before the SyncBatchNorm conversion: it is only evaluated, and a process group
    # cannot be deep-copied.
    ema = build_ema(model, config.ema_decay)
    if config.sync_bn:
        if job.world_size > 1:
            distributed.convert_sync_batchnorm(model, device)
        else:
            warnings.warn("--sync-bn has no effect in a single process (run under torchrun with several ranks)",
                          stacklevel=2)
    optimizer = build_optimizer(model, config, job.world_size)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, LRFactor(config.warmup_steps, steps))
    scaler = torch.amp.GradScaler(device.type, enabled=config.amp == "fp16")
    return TrainState(model, optimizer, scheduler, scaler, ema, train_size)


def train(config: TrainConfig) -> dict[str, Any]:
    """Train as ``config`` says; returns the metrics (``loss_history``: every step's loss since step 0, including
    the steps before a resume, the global batch's under torchrun; ``images_per_sec`` of the global batch;
    ``peak_memory_bytes`` on CUDA, this rank's, and ``peak_memory_bytes_per_rank``; ``val``/``ema_val`` with a
    validation set) and, for callers, the trained ``model``, ``ema`` (or None) and ``optimizer``.

    Under torchrun (``RANK``/``WORLD_SIZE`` in the environment, more than one rank) it starts the process group and
    ends it on return; a process group the caller started is used and left alone."""
    job = distributed.init(resolve_device(config.device).type)
    try:
        return _train(config, job)
    finally:
        distributed.shutdown(job)


def _train(config: TrainConfig, job: Distributed) -> dict[str, Any]:
    # Nothing in this block talks to the other ranks: a rank that fails here (a bad path, a bad checkpoint) ends
    # every rank with its error instead of leaving them waiting in DDP's first broadcast.
    with distributed.all_or_none(job, "setup"):
        validate_config(config)
        device = distributed.rank_device(resolve_device(config.device), job)
        if config.threads is not None:
            torch.set_num_threads(config.threads)
        seed_everything(config.seed)
        train_set, val_set = build_datasets(config)
        sampler = ResumableSampler(len(train_set), config.batch_size, config.seed,  # type: ignore[arg-type]
                                   job.rank, job.world_size)
        steps = total_steps(config, sampler.steps_per_epoch)
        state = build_state(config, device, steps, sampler.size, job)
        if job.world_size > 1:  # the model above is the same on every rank; dropout masks must not be
            seed_everything(mix_seed(config.seed, 5, job.rank))
        if config.resume:
            load_checkpoint(config.resume, state, config, job.rank, job.world_size)
    stop = min(steps, config.stop_after) if config.stop_after is not None else steps
    model = distributed.wrap(state.model, device, job)
    forward = torch.compile(model) if config.compile else model
    criterion = nn.CrossEntropyLoss(label_smoothing=config.label_smoothing)
    loader = build_loader(train_set, sampler, config, device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    state.model.train()
    images_per_sec = run_steps(forward, state, criterion, loader, sampler, config, device, stop, job)
    distributed.broadcast_buffers(state.model, job)
    if state.ema is not None:
        distributed.broadcast_buffers(state.ema, job)
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    metrics: dict[str, Any] = {"steps": state.step, "total_steps": steps, "loss_history": state.loss_history,
                               "images_per_sec": images_per_sec, "device": str(device), "world_size": job.world_size,
                               "peak_memory_bytes": peak,
                               "peak_memory_bytes_per_rank": distributed.all_gather(peak, job)}
    if val_set is not None:
        metrics["val"] = evaluate(state.model, val_set, config, device, job)
        if state.ema is not None:
            metrics["ema_val"] = evaluate(state.ema.module, val_set, config, device, job)
    metrics.update(model=state.model, ema=state.ema, optimizer=state.optimizer)
    return metrics


def run_steps(forward: nn.Module, state: TrainState, criterion: nn.Module, loader: DataLoader,
              sampler: ResumableSampler, config: TrainConfig, device: torch.device, stop: int,
              job: Distributed = SINGLE_PROCESS) -> float:
    """Train from ``state.step`` to ``stop``, checkpointing as configured; returns images/s of the global batch
    (timed from the end of the first step of this run, which includes compilation and warm-up; over all steps if
    there is only one)."""
    from tqdm import tqdm

    meter = Meter(state.loss_history, job)
    global_batch = config.batch_size * job.world_size
    bar = tqdm(total=stop, initial=state.step, desc="train", unit="step", disable=not (config.progress and job.is_main),
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
                rate = (state.step - timed_from) * global_batch / elapsed if elapsed > 0 else float("nan")
                bar.set_postfix(loss=f"{meter.window_loss:.4f}", acc=f"{meter.window_acc:.3f}", img_s=f"{rate:.1f}")
            if config.checkpoint and (state.step == stop or (config.checkpoint_every
                                                             and state.step % config.checkpoint_every == 0)):
                meter.flush(state.step - len(meter.pending))
                # One file for all ranks, written atomically by rank 0, with every rank's RNG states: per-rank
                # files could not be replaced together, so a crash between two writes would leave a mixed set.
                rng_states = distributed.gather_to_main(rng_state(), job)
                with distributed.all_or_none(job, "writing the checkpoint"):
                    if job.is_main:
                        save_atomic(checkpoint_dict(state, config, rng_states), config.checkpoint)
            if state.step >= stop:
                break
    meter.flush(state.step - len(meter.pending))
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    bar.close()
    elapsed = time.perf_counter() - t0
    return (state.step - timed_from) * global_batch / elapsed if state.step > timed_from and elapsed > 0 else 0.0
