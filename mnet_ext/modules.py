"""Drop-in fused modules whose parameter and buffer names are those of the modules they replace.

``FusedConvBNAct`` replaces a container ``[depthwise Conv2d, BatchNorm2d, activation]`` (torchvision's
``Conv2dNormActivation``) and keeps the children under the container's names, so ``state_dict`` keys do not change
(``0.weight``, ``1.weight``, ``1.running_mean``, ...). The BatchNorm's tensors live in ``BatchNormState``, which is
deliberately not a ``_BatchNorm``: ``nn.SyncBatchNorm.convert_sync_batchnorm`` must not silently swap in a module
our fused forward would bypass.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F  # noqa: N812

from mnet_ext import functional as MF
from mnet_ext._backend import BACKENDS


class BatchNormState(nn.Module):
    """The parameters, buffers and settings of a ``BatchNorm2d`` (same names, no forward of its own)."""

    _version = 2  # as _BatchNorm: checkpoints without num_batches_tracked load (see _load_from_state_dict)

    def __init__(self, bn: nn.BatchNorm2d) -> None:
        super().__init__()
        self.num_features = bn.num_features
        self.eps = bn.eps
        self.momentum = bn.momentum
        self.affine = bn.affine
        self.track_running_stats = bn.track_running_stats
        self.weight = bn.weight
        self.bias = bn.bias
        self.register_buffer("running_mean", bn.running_mean)
        self.register_buffer("running_var", bn.running_var)
        self.register_buffer("num_batches_tracked", bn.num_batches_tracked)

    def to_batchnorm(self) -> nn.BatchNorm2d:
        """A native BatchNorm2d sharing this module's tensors."""
        bn = nn.BatchNorm2d(self.num_features, self.eps, self.momentum, self.affine, self.track_running_stats,
                            device="meta")
        for name in ("weight", "bias"):
            setattr(bn, name, getattr(self, name))
        for name in ("running_mean", "running_var", "num_batches_tracked"):
            bn.register_buffer(name, getattr(self, name))
        bn.train(self.training)
        return bn

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, local_metadata: dict[str, Any],
                              *args: Any, **kwargs: Any) -> None:
        version = local_metadata.get("version")
        key = prefix + "num_batches_tracked"
        if (version is None or version < 2) and self.track_running_stats and key not in state_dict:
            state_dict[key] = torch.tensor(0, dtype=torch.long, device=self.running_mean.device)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, *args, **kwargs)

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, affine={self.affine}, " \
               f"track_running_stats={self.track_running_stats}"

    def forward(self, x: Tensor) -> Tensor:
        raise RuntimeError("BatchNormState holds a fused layer's BatchNorm tensors; call the FusedConvBNAct")


def _check_backend(backend: str | None) -> str | None:
    if backend not in (None, "auto", *BACKENDS):
        raise ValueError(f"backend: expected None, 'auto' or one of {BACKENDS}, got {backend!r}")
    return None if backend == "auto" else backend


def _recomputing() -> bool:
    """A forward run inside autograd's backward is a gradient-checkpointing recomputation: it must not count the
    batch twice (native BatchNorm does; see NOTES.md)."""
    return not torch.compiler.is_compiling() and torch._C._current_graph_task_id() != -1


def _batch_norm_args(bn: BatchNormState, training: bool) -> tuple[Tensor | None, Tensor | None, bool, float]:
    """(running_mean, running_var, use_batch_stats, momentum) for ``F.batch_norm`` and the fused ops, exactly as
    ``nn.BatchNorm2d.forward`` derives them from ``bn``'s settings (and counts the batch in ``num_batches_tracked``),
    except that a gradient-checkpointing recomputation does not count it twice."""
    momentum = 0.0 if bn.momentum is None else bn.momentum
    update = training and bn.track_running_stats and not _recomputing()
    if update and bn.num_batches_tracked is not None:
        bn.num_batches_tracked.add_(1)
        if bn.momentum is None:  # cumulative moving average
            momentum = 1.0 / float(bn.num_batches_tracked)
    running_mean, running_var = bn.running_mean, bn.running_var  # once: a module's __getattr__ costs ~0.3 us
    use_batch_stats = training or (running_mean is None and running_var is None)
    track = not training or update
    return running_mean if track else None, running_var if track else None, use_batch_stats, momentum


def _dwconv_bn_act(x: Tensor, weight: Tensor, bn: BatchNormState, training: bool, stride: int, dilation: int,
                   act: str, backend: str | None, process_group: Any) -> Tensor:
    """Depthwise conv + ``bn`` (its tensors and settings, in ``training`` mode or not) + ``act``, updating the running
    statistics exactly as ``nn.BatchNorm2d`` does."""
    running_mean, running_var, use_batch_stats, momentum = _batch_norm_args(bn, training)
    return MF.dwconv_bn_act(x, weight, running_mean, running_var, bn.weight, bn.bias, use_batch_stats, momentum,
                            bn.eps, stride, dilation, act, backend, process_group if training else None)


class FusedConvBNAct(nn.Module):
    """Depthwise Conv2d + BatchNorm2d + activation in one op; a drop-in for ``Conv2dNormActivation``.

    Built by ``mnet_ext.fuse``; ``original`` is the replaced container, returned (with current tensors) by
    ``unfuse``. Training/eval behaviour, momentum=None, ``track_running_stats=False`` follow ``nn.BatchNorm2d``.
    """

    def __init__(self, original: nn.Sequential, act: str, backend: str | None = None) -> None:
        super().__init__()
        names = list(original._modules)
        conv, bn = original[0], original[1]
        self._conv_name, self._bn_name = names[0], names[1]
        self.add_module(names[0], conv)
        self.add_module(names[1], BatchNormState(bn))
        if len(names) > 2:  # the activation module: no state, kept so the structure reads the same
            self.add_module(names[2], original[2])
        self.act = act
        self.backend = _check_backend(backend)
        self.stride = conv.stride[0]
        self.dilation = conv.dilation[0]
        self.process_group = None  # set by mnet_ext.convert_sync_batchnorm: synchronised batch statistics
        object.__setattr__(self, "_original", original)  # not a child: its tensors are ours
        self.train(original.training)

    @property
    def conv(self) -> nn.Conv2d:
        return self._modules[self._conv_name]

    @property
    def bn(self) -> BatchNormState:
        return self._modules[self._bn_name]

    def forward(self, x: Tensor) -> Tensor:
        return _dwconv_bn_act(x, self.conv.weight, self.bn, self.training, self.stride, self.dilation, self.act,
                              self.backend, self.process_group)

    def unfused(self) -> nn.Sequential:
        """The original container, holding this module's current tensors."""
        original = self._original
        original._modules[self._conv_name] = self.conv
        original._modules[self._bn_name] = self.bn.to_batchnorm()
        return original.train(self.training)

    def extra_repr(self) -> str:
        k = self.conv.kernel_size[0]
        return f"k={k}, stride={self.stride}, dilation={self.dilation}, act={self.act}, backend={self.backend}"


SE_ATTRIBUTES = ("fused_fcs", "fused_act", "fused_gate", "backend")  # a child so named cannot be kept


class FusedSqueezeExcitation(nn.Module):
    """A squeeze-excitation module (torchvision's ``SqueezeExcitation``, timm's ``SqueezeExcite``, or any module
    whose forward ``mnet_ext.fuse`` traced to exactly pool -> fc -> act -> fc -> gate -> multiply) in one op; keeps
    every child under its name, so ``state_dict`` keys do not change."""

    def __init__(self, original: nn.Module, act: str, gate: str, backend: str | None = None,
                 fcs: tuple[str, str] = ("fc1", "fc2")) -> None:
        super().__init__()
        for name, child in original.named_children():
            self.add_module(name, child)
        # Named apart from any child (timm's SE has a child called ``gate``): see SE_ATTRIBUTES
        self.fused_fcs = fcs  # the two FCs' paths below this module (1x1 Conv2d or Linear, each with a bias)
        self.fused_act = act
        self.fused_gate = gate
        self.backend = _check_backend(backend)
        object.__setattr__(self, "_original", original)
        self.train(original.training)

    def _fc(self, name: str) -> nn.Module:
        # Looked up on every call (a replaced child is used), by a dict lookup where the path is a direct child:
        # get_submodule costs ~10 us, a tenth of a small SE layer's work on a CPU.
        fc = self._modules.get(name)
        return self.get_submodule(name) if fc is None else fc

    def forward(self, x: Tensor) -> Tensor:
        fc1, fc2 = self._fc(self.fused_fcs[0]), self._fc(self.fused_fcs[1])
        return MF.squeeze_excite(x, fc1.weight, fc1.bias, fc2.weight, fc2.bias, self.fused_act, self.fused_gate,
                                 self.backend)

    def unfused(self) -> nn.Module:
        original = self._original
        for name, child in self.named_children():
            original._modules[name] = child
        return original.train(self.training)

    def extra_repr(self) -> str:
        return f"act={self.fused_act}, gate={self.fused_gate}, backend={self.backend}"


class FoldedBatchNorm(BatchNormState):
    """Stands where a BatchNorm2d (or timm's ``BatchNormAct2d``) was whose work the module at its conv's name does
    (``FusedDwConvBNAct`` or ``FoldedConvBN``): it holds the BatchNorm's tensors under the same names
    (``state_dict`` keys unchanged) and passes its input through. Built by ``mnet_ext.fuse``; ``unfused`` returns
    the original module holding the current tensors."""

    def __init__(self, bn: nn.BatchNorm2d) -> None:
        super().__init__(bn)
        object.__setattr__(self, "_original", bn)  # not a child: its tensors are ours
        self.train(bn.training)

    def forward(self, x: Tensor) -> Tensor:
        return x

    def unfused(self) -> nn.BatchNorm2d:
        bn = self._original
        for name in ("weight", "bias"):
            setattr(bn, name, getattr(self, name))
        for name in ("running_mean", "running_var", "num_batches_tracked"):
            bn.register_buffer(name, getattr(self, name))
        return bn.train(self.training)

    def extra_repr(self) -> str:
        return f"{type(self._original).__name__} folded into the conv before it; " + super().extra_repr()


class FoldedActivation(nn.Module):
    """Stands where an activation module was that the ``FusedDwConvBNAct`` before it applies; passes its input
    through. ``unfused`` returns the original module."""

    def __init__(self, act: nn.Module) -> None:
        super().__init__()
        object.__setattr__(self, "_original", act)
        self.train(act.training)

    def forward(self, x: Tensor) -> Tensor:
        return x

    def unfused(self) -> nn.Module:
        return self._original.train(self.training)

    def extra_repr(self) -> str:
        return f"{type(self._original).__name__} folded into the fused depthwise conv before it"


class FusedDwConvBNAct(nn.Module):
    """Depthwise Conv2d + BatchNorm + activation in one op, standing where the conv was (``mnet_ext.fuse``'s dataflow
    path, for models whose conv and BatchNorm are not alone in a container, e.g. timm's blocks).

    It registers the conv's ``weight`` under the conv's name; the BatchNorm's tensors stay with the ``FoldedBatchNorm``
    at the BatchNorm's name (referenced here, not a child), so ``state_dict`` keys do not change. Training or eval is
    that BatchNorm's mode, as natively (freezing a BatchNorm with ``.eval()`` works as before).
    """

    def __init__(self, conv: nn.Conv2d, bn: FoldedBatchNorm, act: str, backend: str | None = None) -> None:
        super().__init__()
        self.weight = conv.weight
        self.act = act
        self.backend = _check_backend(backend)
        self.stride = conv.stride[0]
        self.dilation = conv.dilation[0]
        self.process_group = None  # set by mnet_ext.convert_sync_batchnorm: synchronised batch statistics
        object.__setattr__(self, "_original", conv)
        object.__setattr__(self, "bn", bn)
        self.train(conv.training)

    def forward(self, x: Tensor) -> Tensor:
        bn = self.bn
        return _dwconv_bn_act(x, self.weight, bn, bn.training, self.stride, self.dilation, self.act, self.backend,
                              self.process_group)

    def unfused(self) -> nn.Conv2d:
        conv = self._original
        conv.weight = self.weight
        return conv.train(self.training)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, k={self.weight.shape[-1]}, stride={self.stride}, dilation={self.dilation}, " \
               f"act={self.act}, backend={self.backend}"


class FoldedConvBN(nn.Module):
    """A Conv2d and the BatchNorm2d that only it feeds, standing where the conv was (``mnet_ext.fuse``, for the convs
    that are not depthwise: the 1x1 expansions and projections, the stem). In eval the BatchNorm is
    folded into the conv's weight and bias, so the model runs one conv and no BatchNorm pass (what
    ``torch.nn.utils.fuse_conv_bn_eval`` computes, but at call time from the current tensors, so ``state_dict`` and
    training are unchanged); in training it runs the conv, then the BatchNorm with batch statistics, as natively.

    Like ``FusedDwConvBNAct`` it registers the conv's ``weight`` (and ``bias``) under the conv's name and leaves the
    BatchNorm's tensors with the ``FoldedBatchNorm`` at the BatchNorm's name, whose mode (``.train()``/``.eval()``)
    decides. The folded weight and bias are cached while no gradient is recorded, keyed on the tensors' storage and
    version counters, so an in-place update (an optimizer step, ``load_state_dict``) refolds.
    """

    def __init__(self, conv: nn.Conv2d, bn: FoldedBatchNorm) -> None:
        super().__init__()
        self.weight = conv.weight
        self.bias = conv.bias
        self.stride, self.padding, self.dilation, self.groups = conv.stride, conv.padding, conv.dilation, conv.groups
        object.__setattr__(self, "_original", conv)
        object.__setattr__(self, "bn", bn)
        object.__setattr__(self, "_fold_cache", None)  # (key, weight, bias): not state
        self.train(conv.training)

    def _conv(self, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        return F.conv2d(x, weight, bias, self.stride, self.padding, self.dilation, self.groups)

    def _fold(self) -> tuple[Tensor, Tensor]:
        """The conv's weight and bias with the BatchNorm's eval transform folded in (in fp32 at least, then cast to
        the weight's dtype: the conv's own dtype rules, autocast's included, apply to the result as to the weight)."""
        bn, w = self.bn, self.weight
        tensors = [w, self.bias, bn.weight, bn.bias, bn.running_mean, bn.running_var]
        cacheable = not torch.compiler.is_compiling() and not (
            torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)) and not any(
            t is not None and t.is_inference() for t in tensors)
        key = tuple((t.data_ptr(), t._version, t.dtype, t.device) if t is not None else None for t in tensors) \
            + (bn.eps,) if cacheable else None
        if key is not None and self._fold_cache is not None and self._fold_cache[0] == key:
            return self._fold_cache[1], self._fold_cache[2]
        dtype = torch.promote_types(bn.running_var.dtype, torch.float32)
        scale = torch.rsqrt(bn.running_var.to(dtype) + bn.eps)
        if bn.weight is not None:
            scale = scale * bn.weight.to(dtype)
        shift = -bn.running_mean.to(dtype) * scale
        if self.bias is not None:
            shift = shift + self.bias.to(dtype) * scale
        if bn.bias is not None:
            shift = shift + bn.bias.to(dtype)
        weight = (w.to(dtype) * scale.reshape(-1, *(1,) * (w.dim() - 1))).to(w.dtype)
        bias = shift.to(w.dtype)
        if key is not None:
            object.__setattr__(self, "_fold_cache", (key, weight, bias))
        return weight, bias

    def forward(self, x: Tensor) -> Tensor:
        bn = self.bn
        running_mean, running_var, use_batch_stats, momentum = _batch_norm_args(bn, bn.training)
        if not use_batch_stats:
            return self._conv(x, *self._fold())
        return F.batch_norm(self._conv(x, self.weight, self.bias), running_mean, running_var, bn.weight, bn.bias,
                            use_batch_stats, momentum, bn.eps)

    def unfused(self) -> nn.Conv2d:
        conv = self._original
        conv.weight, conv.bias = self.weight, self.bias
        return conv.train(self.training)

    def extra_repr(self) -> str:
        w = self.weight
        return f"{w.shape[1] * self.groups}, {w.shape[0]}, kernel_size={tuple(w.shape[2:])}, stride={self.stride}, " \
               "BatchNorm folded in eval"
