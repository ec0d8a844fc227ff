"""One generic structural walk that swaps fused modules into any model (no per-model code).

A container whose children are exactly ``[depthwise Conv2d, BatchNorm2d]`` or ``[depthwise Conv2d, BatchNorm2d,
activation]`` becomes a ``FusedConvBNAct``; torchvision's ``SqueezeExcitation`` becomes a
``FusedSqueezeExcitation``. Settings (kernel, stride, dilation, eps, momentum, activation) are read from the
modules. A swap replaces the modules' own code, so it happens only when that code is the native one: no class on
the way overrides ``forward`` (a ``Sequential`` subclass adding a residual, a look-alike SE that doubles its
output), and no module carries hooks (``weight_norm``'s pre-hook recomputes the weight). Every depthwise conv and
SE-like module (one with ``avgpool``, ``fc1``, ``fc2``) that is left alone is reported with the reason.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch.distributed as dist
from torch import nn
from torchvision.ops import SqueezeExcitation

from mnet_ext.modules import FusedConvBNAct, FusedSqueezeExcitation, _check_backend
from mnet_ext.reference import DILATIONS, KERNEL_SIZES, STRIDES, padding_for


@dataclass
class FuseEntry:
    name: str  # qualified module name
    kind: str  # "dwconv_bn_act" or "squeeze_excite"
    fused: bool
    detail: str  # configuration when fused, the reason when not


@dataclass
class FuseReport:
    entries: list[FuseEntry] = field(default_factory=list)

    @property
    def fused(self) -> list[FuseEntry]:
        return [e for e in self.entries if e.fused]

    @property
    def skipped(self) -> list[FuseEntry]:
        return [e for e in self.entries if not e.fused]

    def __str__(self) -> str:
        width = max([len(e.name) for e in self.entries] + [6])
        lines = [f"mnet_ext.fuse: {len(self.fused)} fused, {len(self.skipped)} left native"]
        for e in self.entries:
            lines.append(f"  {'fused ' if e.fused else 'native'}  {e.name:<{width}}  {e.kind:<14}  {e.detail}")
        return "\n".join(lines)


def _overridden(module: nn.Module, base: type, *methods: str) -> list[str]:
    """The ``methods`` that ``module``'s class defines differently from ``base``'s (a fused forward skips them)."""
    return [name for name in methods if getattr(type(module), name) is not getattr(base, name)]


def _hooked(modules: dict[str, nn.Module | None]) -> list[str]:
    """Problems for the modules that carry forward or backward hooks: a fused forward would never run them."""
    return [f"{name} has forward/backward hooks" for name, m in modules.items() if m is not None and (
        m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks)]


def _act_name(module: nn.Module | None, allowed: dict[type, str]) -> str | None:
    if module is None or type(module) is nn.Identity:
        return "none" if nn.Identity in allowed else None
    if isinstance(module, nn.Hardtanh) and not _overridden(module, nn.Hardtanh, "forward") \
            and (module.min_val, module.max_val) == (0.0, 6.0):
        return allowed.get(nn.ReLU6)
    return allowed.get(type(module))


_CONV_ACTS = {nn.Identity: "none", nn.ReLU: "relu", nn.ReLU6: "relu6", nn.Hardswish: "hardswish", nn.SiLU: "silu"}
_SE_ACTS = {nn.ReLU: "relu", nn.SiLU: "silu"}
_SE_GATES = {nn.Hardsigmoid: "hardsigmoid", nn.Sigmoid: "sigmoid"}


def _is_depthwise(m: nn.Module) -> bool:
    return isinstance(m, nn.Conv2d) and m.groups == m.in_channels == m.out_channels and m.groups > 1


def _conv_bn_act(container: nn.Module) -> tuple[str | None, str] | None:
    """None if not a candidate; else (activation name or None if unfusable, detail or reason)."""
    if not isinstance(container, nn.Sequential) or len(container) not in (2, 3) or not _is_depthwise(container[0]):
        return None
    conv, bn = container[0], container[1]
    k, s, d = conv.kernel_size[0], conv.stride[0], conv.dilation[0]
    problems = [f"{type(container).__name__} overrides {name}"
                for name in _overridden(container, nn.Sequential, "forward")]
    problems += [f"conv {type(conv).__name__} overrides {name}"
                 for name in _overridden(conv, nn.Conv2d, "forward", "_conv_forward")]
    if conv.kernel_size != (k, k) or k not in KERNEL_SIZES:
        problems.append(f"kernel {conv.kernel_size} (supported: square {KERNEL_SIZES})")
    if conv.stride != (s, s) or s not in STRIDES:
        problems.append(f"stride {conv.stride} (supported: {STRIDES})")
    if conv.dilation != (d, d) or d not in DILATIONS:
        problems.append(f"dilation {conv.dilation} (supported: {DILATIONS})")
    if not problems and conv.padding != (padding_for(k, d),) * 2:
        problems.append(f"padding {conv.padding} (supported: (k-1)//2*dilation)")
    if conv.padding_mode != "zeros":
        problems.append(f"padding_mode {conv.padding_mode!r}")
    if conv.bias is not None:
        problems.append("conv has a bias")
    if type(bn) is not nn.BatchNorm2d:
        problems.append(f"followed by {type(bn).__name__}, not BatchNorm2d")
    elif bn.num_features != conv.out_channels:
        problems.append("BatchNorm2d size differs from the conv's channels")
    act = _act_name(container[2] if len(container) == 3 else None, _CONV_ACTS)
    if act is None:
        problems.append(f"activation {type(container[2]).__name__} unsupported")
    problems += _hooked({"container": container, "conv": conv, "norm": bn,
                         "activation": container[2] if len(container) == 3 else None})
    if problems:
        return None, "; ".join(problems)
    return act, f"C={conv.out_channels} k={k} s={s} d={d} act={act}"


def _squeeze_excite(module: nn.Module) -> tuple[tuple[str, str] | None, str] | None:
    """None if not SE-like; else ((act, gate) or None if unfusable, detail or reason)."""
    fc1, fc2, pool = (getattr(module, n, None) for n in ("fc1", "fc2", "avgpool"))
    if not (isinstance(fc1, nn.Conv2d) and isinstance(fc2, nn.Conv2d) and isinstance(pool, nn.AdaptiveAvgPool2d)):
        return None
    if isinstance(module, SqueezeExcitation):
        problems = [f"{type(module).__name__} overrides {name}"
                    for name in _overridden(module, SqueezeExcitation, "forward", "_scale")]
    else:  # the same attributes say nothing of what its forward computes
        problems = [f"{type(module).__name__} is not torchvision's SqueezeExcitation"]
    problems += [f"{name} {type(m).__name__} overrides {method}"
                 for name, m, base, methods in (("avgpool", pool, nn.AdaptiveAvgPool2d, ("forward",)),
                                                ("fc1", fc1, nn.Conv2d, ("forward", "_conv_forward")),
                                                ("fc2", fc2, nn.Conv2d, ("forward", "_conv_forward")))
                 for method in _overridden(m, base, *methods)]
    if pool.output_size not in (1, (1, 1)):
        problems.append(f"avgpool output size {pool.output_size}")
    for name, fc in (("fc1", fc1), ("fc2", fc2)):
        if fc.kernel_size != (1, 1) or fc.groups != 1 or fc.bias is None or fc.stride != (1, 1):
            problems.append(f"{name} is not a 1x1 conv with bias")
    if fc1.out_channels != fc2.in_channels or fc2.out_channels != fc1.in_channels:
        problems.append("fc1/fc2 channel counts do not chain")
    act = _act_name(getattr(module, "activation", None), _SE_ACTS)
    gate = _act_name(getattr(module, "scale_activation", None), _SE_GATES)
    if act is None:
        problems.append(f"activation {type(getattr(module, 'activation', None)).__name__} unsupported")
    if gate is None:
        problems.append(f"scale_activation {type(getattr(module, 'scale_activation', None)).__name__} unsupported")
    problems += _hooked({"module": module, "avgpool": pool, "fc1": fc1, "fc2": fc2,
                         "activation": getattr(module, "activation", None),
                         "scale_activation": getattr(module, "scale_activation", None)})
    if problems:
        return None, "; ".join(problems)
    return (act, gate), f"C={fc1.in_channels} S={fc1.out_channels} act={act} gate={gate}"


def _walk(model: nn.Module, backend: str | None, apply: bool) -> FuseReport:
    report = FuseReport()
    claimed: set[int] = set()  # depthwise convs inside fused (or fusable) containers

    def visit(parent: nn.Module, prefix: str) -> None:
        for name, child in list(parent.named_children()):
            qual = f"{prefix}{name}"
            if isinstance(child, (FusedConvBNAct, FusedSqueezeExcitation)):
                claimed.update(id(m) for m in child.modules())
                continue
            found = _conv_bn_act(child)
            if found is not None:
                act, detail = found
                report.entries.append(FuseEntry(qual, "dwconv_bn_act", act is not None, detail))
                claimed.add(id(child[0]))
                if act is not None:
                    if apply:
                        parent._modules[name] = FusedConvBNAct(child, act, backend)
                    continue
            se = _squeeze_excite(child)
            if se is not None:
                acts, detail = se
                report.entries.append(FuseEntry(qual, "squeeze_excite", acts is not None, detail))
                if acts is not None:
                    if apply:
                        parent._modules[name] = FusedSqueezeExcitation(child, *acts, backend)
                    continue
            visit(child, qual + ".")

    visit(model, "")
    for qual, m in model.named_modules():
        if _is_depthwise(m) and id(m) not in claimed:
            report.entries.append(FuseEntry(qual, "dwconv_bn_act", False,
                                            "not in its own [conv, BatchNorm2d, act] container"))
    return report


def fuse(model: nn.Module, backend: str | None = None, verbose: bool = False) -> nn.Module:
    """Swap fused modules into ``model`` in place and return it; ``state_dict`` keys are unchanged.

    ``backend`` pins the fused modules to one backend (default: chosen per call, see ``use_backend``).
    ``verbose`` prints the report of what was fused and what was left native and why (``explain_fuse``).
    """
    report = _walk(model, _check_backend(backend), apply=True)
    if verbose:
        print(report)
    return model


def explain_fuse(model: nn.Module) -> FuseReport:
    """What ``fuse`` would swap, and what it would leave and why; changes nothing."""
    return _walk(model, None, apply=False)


def unfuse(model: nn.Module) -> nn.Module:
    """Restore native modules in place (sharing the fused modules' tensors) and return ``model``."""
    if isinstance(model, (FusedConvBNAct, FusedSqueezeExcitation)):
        return model.unfused()
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, (FusedConvBNAct, FusedSqueezeExcitation)):
                parent._modules[name] = child.unfused()
    return model


def convert_sync_batchnorm(model: nn.Module, process_group: object = None) -> nn.Module:
    """For DDP: fused layers synchronise their batch statistics over ``process_group`` (default: the whole world)
    between their passes; remaining native BatchNorms become ``nn.SyncBatchNorm``. In place; returns the model."""
    group = process_group if process_group is not None else dist.group.WORLD
    for m in model.modules():
        if isinstance(m, FusedConvBNAct):
            m.process_group = group
    return nn.SyncBatchNorm.convert_sync_batchnorm(model, process_group)
