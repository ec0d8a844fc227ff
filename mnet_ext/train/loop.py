"""The training loop: one step, the run from the current step to the stop (progress, checkpoints, timing),
evaluation, and ``train``, which puts data, model and checkpoints together."""

from __future__ import annotations

import math
import sys
import time
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from mnet_ext.train.checkpoint import TrainState, checkpoint_dict, load_checkpoint, save_atomic
from mnet_ext.train.config import AMP_DTYPES, TrainConfig, resolve_device, total_steps, validate_config
from mnet_ext.train.data import ResumableSampler, build_datasets, build_loader, resolved_workers
from mnet_ext.train.model import LRFactor, build_ema, build_model, build_optimizer
from mnet_ext.train.rng import seed_everything


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
