"""Data-parallel training under ``torchrun``: the process group, one device per local rank, failures that end every
rank, rank-0-only output, SyncBatchNorm, and the few collectives the loop needs.

``torchrun`` describes the job in the environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``,
``MASTER_PORT``); with a world of one process (or a plain ``python -m mnet_ext.train``) nothing here starts a
process group and every helper is the single-process identity, so that path is exactly the one of a run without
this module.

Backends: ``cpu:gloo,cuda:nccl`` for CUDA (NCCL for the tensors of the model, gloo for the small objects the
status checks exchange, so a rank whose device failed can still report), ``gloo`` for CPU.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.parallel import DistributedDataParallel

import mnet_ext


class RankFailedError(RuntimeError):
    """One or more ranks failed in a stage that the others would otherwise wait on forever."""

    def __init__(self, message: str, failed_ranks: list[int]) -> None:
        super().__init__(message)
        self.failed_ranks = failed_ranks


@dataclass(frozen=True)
class Distributed:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    owns_group: bool = False  # this process started the process group (and ends it)

    @property
    def is_main(self) -> bool:
        return self.rank == 0


SINGLE_PROCESS = Distributed()


def environment() -> Distributed:
    """The job this process belongs to, without starting anything: an initialised process group's, else torchrun's
    environment variables, else a single process."""
    if dist.is_available() and dist.is_initialized():
        rank = dist.get_rank()
        return Distributed(rank, dist.get_world_size(), int(os.environ.get("LOCAL_RANK", rank)))
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return Distributed(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", 0)))
    return SINGLE_PROCESS


def init(device_type: str) -> Distributed:
    """Join the job: start the process group torchrun describes (env://) unless the caller already has one, or the
    world is a single process."""
    job = environment()
    if job.world_size == 1 or dist.is_initialized():
        return job
    if not dist.is_available():
        raise RuntimeError(f"WORLD_SIZE={job.world_size} but this torch build has no torch.distributed")
    dist.init_process_group("cpu:gloo,cuda:nccl" if device_type == "cuda" else "gloo")
    return Distributed(dist.get_rank(), dist.get_world_size(), job.local_rank, owns_group=True)


def shutdown(job: Distributed) -> None:
    if job.owns_group and dist.is_initialized():
        dist.destroy_process_group()


def rank_device(device: torch.device, job: Distributed) -> torch.device:
    """This rank's device: ``cuda:LOCAL_RANK`` (made current) for CUDA jobs of several ranks, else ``device``."""
    if job.world_size == 1 or device.type != "cuda":
        return device
    if device.index is not None:
        raise ValueError(f"--device: give the device type ('cuda'), not {device}, under torchrun: each rank uses "
                         f"cuda:LOCAL_RANK")
    if job.local_rank >= torch.cuda.device_count():
        raise ValueError(f"LOCAL_RANK={job.local_rank}, but this node has {torch.cuda.device_count()} CUDA devices "
                         f"(torchrun --nproc_per_node must not exceed them)")
    device = torch.device("cuda", job.local_rank)
    torch.cuda.set_device(device)
    return device


@contextmanager
def all_or_none(job: Distributed, stage: str) -> Iterator[None]:
    """Run a block that every rank runs up to the same point: if it raises on any rank, every rank raises
    ``RankFailedError`` naming the failed ranks and their errors, instead of the others waiting forever in their next
    collective. A single process sees its own exception unchanged."""
    if job.world_size == 1:
        yield
        return
    error: BaseException | None = None
    try:
        yield
    except Exception as exc:  # reported to every rank below, then raised there
        error = exc
    messages: list[str | None] = [None] * job.world_size
    dist.all_gather_object(messages, None if error is None else f"{type(error).__name__}: {error}")
    failed = [r for r, m in enumerate(messages) if m is not None]
    if failed:
        details = "; ".join(f"rank {r}: {messages[r]}" for r in failed)
        raise RankFailedError(f"{stage} failed on {len(failed)} of {job.world_size} ranks: {details}",
                              failed) from error


def all_reduce_sum(tensor: torch.Tensor, job: Distributed) -> torch.Tensor:
    """Sum over ranks (a new tensor; the input itself for a single process)."""
    if job.world_size == 1:
        return tensor
    total = tensor.clone()
    dist.all_reduce(total)
    return total


def broadcast_buffers(module: nn.Module, job: Distributed) -> None:
    """Rank 0's buffers on every rank. Without SyncBatchNorm each replica's running statistics follow its own
    batches between DDP's per-forward broadcasts; after the last step this makes the replicas (and EMAs), hence
    the evaluation, rank 0's: the checkpoint's."""
    if job.world_size == 1:
        return
    for buffer in module.buffers():
        dist.broadcast(buffer, src=0)


def gather_to_main(obj: Any, job: Distributed) -> list[Any] | None:
    """Every rank's ``obj`` in rank order on rank 0, None elsewhere."""
    if job.world_size == 1:
        return [obj]
    gathered: list[Any] | None = [None] * job.world_size if job.is_main else None
    dist.gather_object(obj, gathered, dst=0)
    return gathered


def all_gather(obj: Any, job: Distributed) -> list[Any]:
    if job.world_size == 1:
        return [obj]
    gathered: list[Any] = [None] * job.world_size
    dist.all_gather_object(gathered, obj)
    return gathered


class _AllReduceSum(torch.autograd.Function):
    """Sum over ranks with a gradient: every rank's input feeds every rank's output, so the input's gradient is the
    sum of the outputs' gradients over the ranks (torch.distributed.nn's all_reduce, which 2.14 deprecates)."""

    @staticmethod
    def forward(ctx: Any, tensor: torch.Tensor, group: Any) -> torch.Tensor:
        ctx.group = group
        total = tensor.clone()
        dist.all_reduce(total, group=group)
        return total

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return _AllReduceSum.apply(grad.contiguous(), ctx.group), None


class CPUSyncBatchNorm(_BatchNorm):
    """``nn.SyncBatchNorm`` for CPU tensors (gloo), which ``nn.SyncBatchNorm`` refuses (and DDP refuses a CPU module
    holding one: hence not a subclass of it).

    In training the global count, mean and biased variance come from two differentiable all-reduces
    (the mean first, then the sum of squared deviations from it, so no E[x²] - E[x]²
    cancellation); autograd all-reduces their gradients, which is what ``nn.SyncBatchNorm``'s backward does, and
    weight/bias gradients are each rank's contribution for DDP to average. Running statistics take the global mean
    and unbiased global variance. Same parameters and buffers as ``nn.BatchNorm2d`` (the state_dict does not change);
    in eval, or without a process group, it is plain BatchNorm."""

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1, affine: bool = True,
                 track_running_stats: bool = True, process_group: Any = None) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats)
        self.process_group = process_group

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected an input of at least 2 dimensions (N, C, ...), got {input.dim()}")

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if not self.training or not dist.is_initialized():
            return super().forward(input)
        if input.device.type != "cpu":
            raise ValueError(f"CPUSyncBatchNorm runs on CPU tensors, got one on {input.device}")
        self._check_input_dim(input)
        group = self.process_group or dist.group.WORLD
        c = input.shape[1]
        dims = [d for d in range(input.dim()) if d != 1]
        shape = [1, c] + [1] * (input.dim() - 2)
        x = input.float() if input.dtype in (torch.float16, torch.bfloat16) else input
        count = torch.full((1,), input.numel() // c, dtype=x.dtype)
        sums = _AllReduceSum.apply(torch.cat([x.sum(dims), count]), group)
        total = sums[c].item()
        if total <= 1:
            raise ValueError(f"SyncBatchNorm: expected more than 1 value per channel over all ranks, got {total:g}")
        mean = sums[:c] / total
        centered = x - mean.view(shape)
        var = _AllReduceSum.apply((centered * centered).sum(dims), group) / total
        y = centered * torch.rsqrt(var + self.eps).view(shape)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        if self.track_running_stats:
            self.num_batches_tracked.add_(1)
            factor = 1.0 / self.num_batches_tracked.item() if self.momentum is None else self.momentum
            with torch.no_grad():  # native BatchNorm's update: (1 - f) * running + f * batch statistic
                self.running_mean.mul_(1 - factor).add_(mean.to(self.running_mean.dtype), alpha=factor)
                unbiased = var * (total / (total - 1))
                self.running_var.mul_(1 - factor).add_(unbiased.to(self.running_var.dtype), alpha=factor)
        return y.to(input.dtype)


def convert_sync_batchnorm(model: nn.Module, device: torch.device) -> nn.Module:
    """``mnet_ext.convert_sync_batchnorm`` (fused layers and native BatchNorms); on CPU the native ones become
    ``CPUSyncBatchNorm``. In place; returns the model."""
    model = mnet_ext.convert_sync_batchnorm(model)
    if device.type == "cpu":
        for parent in list(model.modules()):
            for name, child in list(parent.named_children()):
                if type(child) is nn.SyncBatchNorm:
                    parent._modules[name] = _cpu_sync(child)
    return model


def _cpu_sync(bn: nn.SyncBatchNorm) -> CPUSyncBatchNorm:
    new = CPUSyncBatchNorm(bn.num_features, bn.eps, bn.momentum, bn.affine, bn.track_running_stats, bn.process_group)
    for name, tensor in [*bn._parameters.items(), *bn._buffers.items()]:
        setattr(new, name, tensor)  # the same tensors (dtype, device, optimizer references), as nn's conversion does
    new.train(bn.training)
    return new


def wrap(model: nn.Module, device: torch.device, job: Distributed) -> nn.Module:
    """DistributedDataParallel over ``model`` for several ranks (it broadcasts rank 0's parameters and buffers);
    the model itself for one."""
    if job.world_size == 1:
        return model
    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
