"""Fused SyncBatchNorm: batch statistics of a fused layer reduced across the ranks of a process group.

The op contract's decomposition makes this a matter of two collectives on ``[C]`` tensors:

* forward: per-rank ``stats`` pass -> all-gather (count, mean, biased var) -> combine (Chan) -> ``fwd`` pass;
* backward: per-rank ``bwd_reduce`` pass -> all-reduce (sum g, sum g*xhat) -> ``bwd_apply`` pass.

Semantics are those of ``torch.nn.SyncBatchNorm``: uneven per-rank batch sizes weigh by their counts, running
statistics get the global mean and unbiased global variance, and dgamma/dbeta (like the conv's dW) are each
rank's own contribution, to be averaged by DDP like every other gradient. A rank with an empty batch takes part
in both collectives with a count of 0 (so the others do not wait for it), gets an empty result and zero
gradients, and updates its running statistics with the group's, as ``nn.SyncBatchNorm`` does.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from mnet_ext._backend import load
from mnet_ext.ops._common import dense_like, new_output
from mnet_ext.reference import acc_dtype, output_hw


def combine_stats(counts: Tensor, means: Tensor, variances: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Chan's parallel combine of per-rank (count [R, 1], mean [R, C], biased var [R, C]) -> global ones."""
    total = counts.sum()
    mean = (counts * means).sum(0) / total
    var = (counts * (variances + (means - mean) ** 2)).sum(0) / total
    return total, mean, var


class _SyncDwconvBnAct(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, gamma, beta, eps, stride, dilation, act, backend, group):
        impl, weight = load(backend), weight.contiguous()
        n, c, h, w = x.shape
        ho, wo = output_hw(h, w, weight.shape[-1], stride, dilation)
        if x.numel() == 0:  # count 0, mean 0, var 0: no weight in the combine
            local = x.new_zeros(1 + 2 * c, dtype=acc_dtype(x.dtype))
        else:
            mean, var = impl.dwconv_bn_stats(x, weight, stride, dilation)
            local = torch.cat([torch.full((1,), n * ho * wo, dtype=mean.dtype, device=mean.device), mean, var])
        gathered = [torch.empty_like(local) for _ in range(dist.get_world_size(group))]
        dist.all_gather(gathered, local, group=group)
        table = torch.stack(gathered)
        total, mean, var = combine_stats(table[:, :1], table[:, 1:1 + c], table[:, 1 + c:])
        invstd = torch.rsqrt(var + eps)
        if x.numel() == 0:
            y = new_output(x, (n, c, ho, wo))
        else:
            y = impl.dwconv_bn_act_fwd(x, weight, mean, invstd, gamma, beta, stride, dilation, act)
        ctx.save_for_backward(x, weight, gamma, beta, mean, invstd)
        ctx.args = (stride, dilation, act, backend, group, total)
        ctx.mark_non_differentiable(mean, var, total)
        return y, mean, var, total

    @staticmethod
    def backward(ctx, grad_y, _grad_mean, _grad_var, _grad_total):
        x, weight, gamma, beta, mean, invstd = ctx.saved_tensors
        stride, dilation, act, backend, group, total = ctx.args
        impl, c = load(backend), mean.numel()
        grad_y = dense_like(grad_y, x)
        bn = (mean, invstd, gamma, beta)
        if x.numel() == 0:  # the others still wait for this rank's (zero) sums
            dist.all_reduce(torch.zeros(2 * c, dtype=mean.dtype, device=mean.device), group=group)
            zero = torch.zeros_like(mean)
            return (new_output(x, x.shape), torch.zeros_like(weight), zero, zero.clone(), None, None, None, None,
                    None, None)
        sum_g, sum_g_xhat = impl.dwconv_bn_act_bwd_reduce(grad_y, x, weight, *bn, stride, dilation, act)
        sums = torch.cat([sum_g, sum_g_xhat])
        dist.all_reduce(sums, group=group)
        dx, dweight = impl.dwconv_bn_act_bwd_apply(
            grad_y, x, weight, *bn, sums[:c] / total, sums[c:] / total, stride, dilation, act)
        return dx, dweight, sum_g_xhat, sum_g, None, None, None, None, None, None


def sync_dwconv_bn_act_train(x: Tensor, weight: Tensor, gamma: Tensor, beta: Tensor, eps: float, stride: int,
                             dilation: int, act: str, backend: str, group: Any) -> tuple[Tensor, ...]:
    """Training forward with statistics over ``group``: (y, global mean, global biased var, global count [1])."""
    return _SyncDwconvBnAct.apply(x, weight, gamma, beta, eps, stride, dilation, act, backend, group)


def needs_sync(group: Any) -> bool:
    """True when ``group`` names a process group of more than one rank in an initialised job."""
    return group is not None and dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1
