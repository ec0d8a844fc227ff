"""Fused SyncBatchNorm across 2 gloo ranks on CPU, against native BatchNorm over the concatenated global batch
(which is what ``nn.SyncBatchNorm`` computes; it refuses CPU tensors itself)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torchvision.ops import SqueezeExcitation
from torchvision.ops.misc import Conv2dNormActivation

import mnet_ext
from tests.dist_helpers import spawn
from tests.helpers import ROUNDING_TOL, scaled_error

SPLIT = (3, 2)  # uneven per-rank batch sizes


def _layer(dtype=torch.float32) -> nn.Module:
    torch.manual_seed(0)
    native = Conv2dNormActivation(6, 6, 3, 2, groups=6, activation_layer=nn.Hardswish)
    with torch.no_grad():
        native[1].weight.uniform_(0.5, 1.5)
        native[1].bias.uniform_(-0.5, 0.5)
    return native.to(dtype)


def _slices(rank: int) -> slice:
    start = sum(SPLIT[:rank])
    return slice(start, start + SPLIT[rank])


def _layer_check(rank: int) -> None:
    native = _layer()
    fused = mnet_ext.convert_sync_batchnorm(mnet_ext.fuse(nn.Sequential(copy.deepcopy(native))))[0]
    torch.manual_seed(1)
    for step in range(2):  # two steps: running statistics compound
        x_all = torch.randn(sum(SPLIT), 6, 9, 8)
        g_all = torch.randn(sum(SPLIT), 6, 5, 4)
        x_n = x_all.clone().requires_grad_()
        native.zero_grad()
        y_n = native.train()(x_n)
        y_n.backward(g_all)
        x_f = x_all[_slices(rank)].clone().requires_grad_()
        fused.zero_grad()
        y_f = fused.train()(x_f)
        y_f.backward(g_all[_slices(rank)])
        tol = ROUNDING_TOL[torch.float32]
        assert scaled_error(y_f, y_n[_slices(rank)]) <= tol, f"y step {step}"
        assert scaled_error(x_f.grad, x_n.grad[_slices(rank)]) <= tol, f"dx step {step}"
        for (name, p_f), p_n in zip(fused.named_parameters(), native.parameters(), strict=True):
            total = p_f.grad.clone()
            dist.all_reduce(total)  # per-rank contributions sum to the global-batch gradient
            assert scaled_error(total, p_n.grad) <= 4 * tol, f"d{name} step {step}"
        for (name, b_f), b_n in zip(fused.state_dict().items(), native.state_dict().values(), strict=True):
            assert scaled_error(b_f.float(), b_n.float()) <= tol, f"{name} step {step}"


def test_fused_sync_batchnorm_matches_global_batchnorm():
    spawn(_layer_check)


def _empty_rank_check(rank: int) -> None:
    """Rank 0 gets an empty batch, rank 1 three images: rank 1's results are native BatchNorm's over its own batch;
    both ranks' running statistics are the group's (those of rank 1's batch); rank 0 gets an empty result and zero
    gradients, as with nn.SyncBatchNorm, whose empty ranks join the collectives with a count of 0."""
    native = _layer()
    fused = mnet_ext.convert_sync_batchnorm(mnet_ext.fuse(nn.Sequential(copy.deepcopy(native))))[0]
    tol = ROUNDING_TOL[torch.float32]
    torch.manual_seed(1)
    for step in range(2):  # two steps: running statistics compound
        x = torch.randn(3, 6, 9, 8)
        g = torch.randn(3, 6, 5, 4)
        x_n = x.clone().requires_grad_()
        native.zero_grad()
        y_n = native.train()(x_n)
        y_n.backward(g)
        x_f = x[: 3 * rank].clone().requires_grad_()
        fused.zero_grad()
        y_f = fused.train()(x_f)
        y_f.backward(g[: 3 * rank])
        assert scaled_error(y_f, y_n[: 3 * rank]) <= tol, f"y step {step}"
        assert scaled_error(x_f.grad, x_n.grad[: 3 * rank]) <= tol, f"dx step {step}"
        for (name, p_f), p_n in zip(fused.named_parameters(), native.parameters(), strict=True):
            expected = p_n.grad if rank else torch.zeros_like(p_n.grad)
            assert scaled_error(p_f.grad, expected) <= 4 * tol, f"d{name} step {step}"
        for (name, b_f), b_n in zip(fused.state_dict().items(), native.state_dict().values(), strict=True):
            assert scaled_error(b_f.float(), b_n.float()) <= tol, f"{name} step {step}"


def test_fused_sync_batchnorm_rank_with_empty_batch():
    spawn(_empty_rank_check, timeout=120)


def _tiny_mobilenet() -> nn.Module:
    """Stem conv, two depthwise blocks (one with SE), head: every BatchNorm is fused, so native BN over the global
    batch in one process is the exact reference for 2-rank SyncBN."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, 2, 1),
        Conv2dNormActivation(8, 8, 3, 1, groups=8, activation_layer=nn.ReLU6),
        nn.Conv2d(8, 16, 1),
        Conv2dNormActivation(16, 16, 5, 2, groups=16, activation_layer=nn.Hardswish),
        SqueezeExcitation(16, 8, scale_activation=nn.Hardsigmoid),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 4),
    ).double()


def _ddp_check(rank: int) -> None:
    native = _tiny_mobilenet()
    fused = mnet_ext.convert_sync_batchnorm(mnet_ext.fuse(copy.deepcopy(native)))
    ddp = DistributedDataParallel(fused)
    opt_n = torch.optim.SGD(native.parameters(), lr=0.1, momentum=0.9)
    opt_f = torch.optim.SGD(ddp.parameters(), lr=0.1, momentum=0.9)
    torch.manual_seed(2)
    for _ in range(3):
        x_all = torch.randn(4, 3, 16, 16, dtype=torch.float64)
        labels = torch.randint(0, 4, (4,))
        opt_n.zero_grad()
        nn.functional.cross_entropy(native(x_all), labels).backward()
        opt_n.step()
        mine = slice(2 * rank, 2 * rank + 2)  # equal halves: DDP's gradient mean equals the global-batch mean
        opt_f.zero_grad()
        nn.functional.cross_entropy(ddp(x_all[mine]), labels[mine]).backward()
        opt_f.step()
    for (name, t_f), t_n in zip(fused.state_dict().items(), native.state_dict().values(), strict=True):
        assert scaled_error(t_f, t_n) <= 1e-9, name


@pytest.mark.slow
def test_ddp_training_fused_sync_matches_native_global_batch():
    spawn(_ddp_check)
