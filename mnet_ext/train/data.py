"""Training and validation data: a synthetic set or an ImageFolder tree, per-sample seeded augmentation, and a
sampler whose position (epoch, batch) is all a resumed run needs to continue the data order exactly."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler

from mnet_ext.train.config import TrainConfig
from mnet_ext.train.rng import mix_seed

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


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
    ``start_batch`` of the epoch and covering whole batches only (``steps_per_epoch * batch_size`` samples).

    Sharded like ``DistributedSampler`` (``rank`` of ``world_size``; ``set_position`` is its ``set_epoch`` plus a
    start within the epoch, which DistributedSampler cannot do): step ``s`` of an epoch takes the global batch
    ``order[s * B * W : (s + 1) * B * W]`` and rank ``r`` its slice ``r * B : (r + 1) * B`` (``B``: ``batch_size``
    per rank, ``W`` ranks). So the ranks together see exactly the batches of one process with batch ``B * W``, and
    nothing is padded or repeated."""

    def __init__(self, size: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1) -> None:
        if size < batch_size * world_size:
            per_rank = f" ({world_size} ranks x {batch_size})" if world_size > 1 else ""
            raise ValueError(f"the training set has {size} samples, fewer than one batch of "
                             f"{batch_size * world_size}{per_rank}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in a world of {world_size}")
        self.size, self.batch_size, self.seed = size, batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.epoch, self.start_batch = 0, 0

    @property
    def steps_per_epoch(self) -> int:
        return self.size // (self.batch_size * self.world_size)

    def set_position(self, epoch: int, start_batch: int) -> None:
        self.epoch, self.start_batch = epoch, start_batch

    def __len__(self) -> int:
        return (self.steps_per_epoch - self.start_batch) * self.batch_size

    def __iter__(self) -> Iterator[tuple[int, int]]:
        order = torch.randperm(self.size, generator=torch.Generator().manual_seed(mix_seed(self.seed, 4, self.epoch)))
        global_batch = self.batch_size * self.world_size
        for step in range(self.start_batch, self.steps_per_epoch):
            begin = step * global_batch + self.rank * self.batch_size
            for index in order[begin:begin + self.batch_size].tolist():
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

    if not os.path.isdir(config.data):
        raise FileNotFoundError(f"--data: {config.data!r} is not a directory")
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
