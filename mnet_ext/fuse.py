"""Swap fused modules into any model, in place, without per-model code: two passes.

1. Containers: one whose children are exactly ``[depthwise Conv2d, BatchNorm2d(, activation)]`` becomes a
   ``FusedConvBNAct``; torchvision's ``SqueezeExcitation`` a ``FusedSqueezeExcitation`` (when its code is native).
2. Dataflow (``mnet_ext.fuse_graph``: torch.fx, or a recorded forward where tracing fails): every other depthwise
   conv whose only consumer is a BatchNorm2d (or timm's ``BatchNormAct2d``), with the activation right after it,
   becomes a ``FusedDwConvBNAct`` at the conv's name, the BatchNorm (and an activation module) an identity
   ``FoldedBatchNorm`` (``FoldedActivation``) that keeps its tensors, so keys and the model's class do not change;
   an activation applied by code stays native. A module whose traced forward is exactly pool -> fc -> act -> fc ->
   gate -> multiply (1x1 convs or Linears) becomes a ``FusedSqueezeExcitation``. Every non-depthwise conv whose
   only consumer is a plain BatchNorm2d (the 1x1 expansions and projections, the stem) becomes a ``FoldedConvBN``: in
   eval the BatchNorm is folded into the conv's weight and bias, in training both run as natively
   (``fold_batchnorm=False`` leaves them alone). These are listed apart (``FuseReport.folded``), not as candidates.

A swap replaces the modules' own code, so it happens only when that code is the native one (no class on the way
overrides ``forward``, no hooks, each module called once and registered once). Every depthwise conv and SE-like
product left alone is reported with the reason (``explain_fuse``).
"""

from __future__ import annotations

import gc
import inspect
import sys
from dataclasses import dataclass, field
from typing import Any

import torch.distributed as dist
from torch import Tensor, nn
from torchvision.ops import SqueezeExcitation

from mnet_ext.fuse_graph import ACTIVATION_OPS, RESHAPE_OPS, SHAPE_OPS, Graph, Node, build_graph
from mnet_ext.modules import (
    SE_ATTRIBUTES,
    BatchNormState,
    FoldedActivation,
    FoldedBatchNorm,
    FoldedConvBN,
    FusedConvBNAct,
    FusedDwConvBNAct,
    FusedSqueezeExcitation,
    _check_backend,
)
from mnet_ext.reference import DILATIONS, KERNEL_SIZES, STRIDES, padding_for

_FUSED = (FusedConvBNAct, FusedSqueezeExcitation, FusedDwConvBNAct, FoldedBatchNorm, FoldedActivation, FoldedConvBN)


@dataclass
class FuseEntry:
    name: str  # qualified module name
    kind: str  # "dwconv_bn_act" or "squeeze_excite"
    fused: bool
    detail: str  # configuration when fused, the reason when not


@dataclass
class FuseReport:
    entries: list[FuseEntry] = field(default_factory=list)
    folded: list[str] = field(default_factory=list)  # convs whose BatchNorm is folded into them in eval
    method: str = ""  # how the dataflow pass saw the model (torch.fx, a recorded forward, or why neither worked)

    @property
    def fused(self) -> list[FuseEntry]:
        return [e for e in self.entries if e.fused]

    @property
    def skipped(self) -> list[FuseEntry]:
        return [e for e in self.entries if not e.fused]

    def __str__(self) -> str:
        width = max([len(e.name) for e in self.entries] + [6])
        lines = [f"mnet_ext.fuse: {len(self.fused)} fused, {len(self.skipped)} left native"
                 + (f" (dataflow: {self.method})" if self.method else "")]
        for e in self.entries:
            lines.append(f"  {'fused ' if e.fused else 'native'}  {e.name:<{width}}  {e.kind:<14}  {e.detail}")
        if self.folded:
            lines.append(f"  and the BatchNorm of {len(self.folded)} other convs folded into them in eval")
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


def _conv_problems(conv: nn.Conv2d) -> list[str]:
    """Why the fused op cannot compute ``conv`` (a depthwise Conv2d), if it cannot."""
    k, s, d = conv.kernel_size[0], conv.stride[0], conv.dilation[0]
    problems = [f"conv {type(conv).__name__} overrides {name}"
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
    return problems


def _conv_detail(conv: nn.Conv2d, act: str) -> str:
    return f"C={conv.out_channels} k={conv.kernel_size[0]} s={conv.stride[0]} d={conv.dilation[0]} act={act}"


def _conv_bn_act(container: nn.Module) -> tuple[str | None, str] | None:
    """None if not a candidate; else (activation name or None if unfusable, detail or reason)."""
    if not isinstance(container, nn.Sequential) or len(container) not in (2, 3) or not _is_depthwise(container[0]):
        return None
    conv, bn = container[0], container[1]
    problems = [f"{type(container).__name__} overrides {name}"
                for name in _overridden(container, nn.Sequential, "forward")]
    problems += _conv_problems(conv)
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
    return act, _conv_detail(conv, act)


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


# ------------------------------------------------------------------------------------------------------------------
# The dataflow pass: candidates found in the traced graph (mnet_ext.fuse_graph), wherever the modules sit
# ------------------------------------------------------------------------------------------------------------------
_SUPPORTED_CALL_ACTS = {"relu": "relu", "relu6": "relu6", "hardswish": "hardswish", "silu": "silu"}


def _bn_act_class() -> type | None:
    """timm's BatchNormAct2d (BatchNorm2d, then its ``drop`` and ``act`` modules), when timm is imported."""
    norm_act = sys.modules.get("timm.layers.norm_act")
    return getattr(norm_act, "BatchNormAct2d", None)


def _is_activation_module(m: nn.Module) -> bool:
    return type(m).__module__ == "torch.nn.modules.activation" or isinstance(m, tuple(_CONV_ACTS))


def _call_act(node: Node, supported: dict[str, str]) -> str | None:
    """The supported activation a call node computes on its first argument, else None."""
    if node.target == "hardtanh":
        bounds = (*node.args[1:3], node.kwargs.get("min_val", -1.0), node.kwargs.get("max_val", 1.0))[:2]
        return supported.get("relu6") if tuple(map(float, bounds)) == (0.0, 6.0) else None
    return supported.get(node.target)


def _describe(nodes: list[Node]) -> str:
    return ", ".join(f"{n.op} {n.target}" if n.target else n.op for n in nodes) or "nothing"


class _Dataflow:
    def __init__(self, model: nn.Module, graph: Graph, backend: str | None, apply: bool, report: FuseReport) -> None:
        self.model, self.graph, self.backend, self.apply, self.report = model, graph, backend, apply, report
        self.modules = dict(model.named_modules())
        self.names = {id(m): q for q, m in self.modules.items()}
        self.aliases = {}
        for m in dict(model.named_modules(remove_duplicate=False)).values():
            self.aliases[id(m)] = self.aliases.get(id(m), 0) + 1
        self.calls = graph.module_calls()

    def module(self, node: Node, kind: type | tuple[type, ...] | None = None) -> nn.Module | None:
        """The module a node calls (of ``kind``), else None."""
        if node.op != "module" or node.target not in self.modules:
            return None
        m = self.modules[node.target]
        return m if kind is None or isinstance(m, kind) else None

    def once(self, name: str, what: str) -> list[str]:
        problems = []
        if len(self.calls.get(name, [])) != 1:
            problems.append(f"{what} {name} is called {len(self.calls.get(name, []))} times")
        if self.aliases.get(id(self.modules[name]), 0) > 1:
            problems.append(f"{what} {name} is registered under several names")
        return problems

    def replace(self, name: str, new: nn.Module) -> None:
        parent, _, leaf = name.rpartition(".")
        self.model.get_submodule(parent)._modules[leaf] = new

    def skip_identity(self, v: Node) -> Node:
        """Follow ``v`` through nn.Identity calls that are its only user (they pass the same value on)."""
        while len(v.users) == 1 and (m := self.module(v.users[0])) is not None and type(m) is nn.Identity \
                and not _hooked({"": m}) and v.users[0].args == (v,):
            v = v.users[0]
        return v

    # -- depthwise conv + BatchNorm + activation -------------------------------------------------------------
    def depthwise(self, name: str, conv: nn.Conv2d) -> None:
        calls = self.calls.get(name, [])
        if not calls:
            self.report.entries.append(FuseEntry(name, "dwconv_bn_act", False, "not called by the traced forward"))
            return
        node = calls[0]
        problems = self.once(name, "conv") + _conv_problems(conv)
        user = node.users[0] if len(node.users) == 1 else None
        bn = self.module(user, nn.BatchNorm2d) if user is not None and user.args == (node,) else None
        if bn is None:
            problems.append(f"its output feeds {_describe(node.users)}, not only a BatchNorm2d")
            self.report.entries.append(FuseEntry(name, "dwconv_bn_act", False, "; ".join(problems)))
            return
        bn_name, act, act_name, note = user.target, "none", None, ""
        problems += self.once(bn_name, "BatchNorm")
        bn_act = _bn_act_class()
        inner: dict[str, nn.Module | None] = {}
        if bn_act is not None and type(bn) is bn_act:
            inner = {"drop": bn.drop, "act": bn.act}
            if type(bn.drop) is not nn.Identity:
                problems.append(f"{bn_name} applies {type(bn.drop).__name__} (unsupported)")
            act = _act_name(bn.act, _CONV_ACTS)
            if act is None:
                problems.append(f"activation {type(bn.act).__name__} (in {bn_name}) unsupported")
        elif type(bn) is not nn.BatchNorm2d:
            problems.append(f"followed by {type(bn).__name__}, not BatchNorm2d (or timm's BatchNormAct2d)")
        if bn.num_features != conv.out_channels:
            problems.append("BatchNorm2d size differs from the conv's channels")
        if act == "none":  # an activation right after the BatchNorm: a module is folded in, a function stays
            v = self.skip_identity(user)
            after = v.users[0] if len(v.users) == 1 and v.users[0].args[:1] == (v,) else None
            if after is not None and (m := self.module(after)) is not None and _is_activation_module(m):
                found = _act_name(m, _CONV_ACTS)
                if found is None:
                    problems.append(f"activation {type(m).__name__} ({after.target}) unsupported")
                elif self.once(after.target, "activation") or _hooked({"": m}) or after.args != (v,) \
                        or after.kwargs:
                    note = f"; activation {after.target} left native (shared, hooked or called with extra args)"
                else:
                    act, act_name = found, after.target
            elif after is not None and after.op == "call" and after.target in ACTIVATION_OPS:
                found = _call_act(after, _SUPPORTED_CALL_ACTS)
                where = f"{after.scope[-1]}.forward" if after.scope else "the model's forward"
                if found is None:
                    problems.append(f"activation {after.target} (applied in {where}) unsupported")
                else:
                    note = f"; {after.target} is applied by code in {where}: left native"
        problems += _hooked({"conv": conv, "norm": bn, **inner,
                             "activation": self.modules[act_name] if act_name else None})
        if problems:
            self.report.entries.append(FuseEntry(name, "dwconv_bn_act", False, "; ".join(problems)))
            return
        parts = " + ".join(p for p in (name, bn_name, act_name) if p)
        self.report.entries.append(FuseEntry(name, "dwconv_bn_act", True,
                                             f"{_conv_detail(conv, act)} ({parts}){note}"))
        if self.apply:
            folded = FoldedBatchNorm(bn)
            self.replace(bn_name, folded)
            if act_name:
                self.replace(act_name, FoldedActivation(self.modules[act_name]))
            self.replace(name, FusedDwConvBNAct(conv, folded, act, self.backend))

    # -- any other conv + BatchNorm: the BatchNorm folded into the conv in eval ----------------------------------
    def conv_bn(self, name: str, conv: nn.Conv2d) -> None:
        """A conv whose only consumer is a plain BatchNorm2d becomes a ``FoldedConvBN`` and the BatchNorm a
        ``FoldedBatchNorm``. Not a reported candidate: a pair left native loses nothing the fused kernels give."""
        calls = self.calls.get(name, [])
        if len(calls) != 1 or self.once(name, "conv") or self.model.get_submodule(name) is not conv:
            return  # not called once, or already fused as a depthwise layer
        node = calls[0]
        user = node.users[0] if len(node.users) == 1 else None
        if user is None or user.args != (node,) or user.kwargs:
            return
        bn = self.module(user)
        if type(bn) is not nn.BatchNorm2d or bn.num_features != conv.out_channels or self.once(user.target, "BN") \
                or _overridden(conv, nn.Conv2d, "forward", "_conv_forward") or conv.padding_mode != "zeros" \
                or _hooked({"conv": conv, "norm": bn}):
            return
        self.report.folded.append(name)
        if self.apply:
            folded = FoldedBatchNorm(bn)
            self.replace(user.target, folded)
            self.replace(name, FoldedConvBN(conv, folded))

    # -- squeeze-excitation -----------------------------------------------------------------------------------
    def back(self, v: Node, path: list[Node]) -> Node:
        """Walk from ``v`` to its producer through reshapes, expands and nn.Identity calls (recorded in ``path``)."""
        while isinstance(v, Node) and ((v.op == "call" and v.target in RESHAPE_OPS | {"expand", "expand_as"})
                                       or type(self.module(v)) is nn.Identity) and v.args:
            path.append(v)
            v = v.args[0]
        return v

    def role(self, v: Any, path: list[Node], what: str) -> Node:
        v = self.back(v, path)
        if not isinstance(v, Node):
            raise _NoMatch(f"no {what}")
        path.append(v)
        return v

    def se_chain(self, x: Node, g: Node) -> tuple[dict[str, Node], list[Node]]:
        """The SE roles gate(fc2(act(fc1(pool(x))))) ending in ``g``, and every node on the way."""
        path: list[Node] = []
        roles = {"gate": self.role(g, path, "gate")}
        if not self._gate(roles["gate"]):
            raise _NoMatch("not a gate", gate=False)
        for what, prev in (("fc2", "gate"), ("act", "fc2"), ("fc1", "act"), ("pool", "fc1")):
            roles[what] = self.role(roles[prev].args[0] if roles[prev].args else None, path, what)
        if roles["pool"].args[:1] != (x,):
            raise _NoMatch("the gate is not computed from a pool of the tensor it scales")
        return roles, path

    def _gate(self, n: Node) -> str | None:
        m = self.module(n)
        if m is not None:
            return _act_name(m, _SE_GATES)
        return n.target if n.op == "call" and n.target in ("hardsigmoid", "sigmoid") else None

    def _pools_of(self, x: Node, g: Node) -> bool:
        """Whether ``g`` depends (within a few steps) on a global pool of ``x``: an SE-like gate."""
        frontier, seen = [g], set()
        for _ in range(12):
            nxt = []
            for v in frontier:
                if not isinstance(v, Node) or id(v) in seen or v is x:
                    continue
                seen.add(id(v))
                if v.args[:1] == (x,) and (v.target in ("mean", "adaptive_avg_pool2d")
                                           or isinstance(self.module(v), nn.AdaptiveAvgPool2d)):
                    return True
                nxt += [a for a in v.args if isinstance(a, Node)]
            frontier = nxt
        return False

    def squeeze_excite(self, mul: Node) -> None:
        a, b = (mul.args + (None, None))[:2]
        if not (isinstance(a, Node) and isinstance(b, Node)) or mul.kwargs or len(mul.args) != 2:
            return
        found, why = None, None
        for x, g in ((a, b), (b, a)):
            try:
                found = (x, g, *self.se_chain(x, g))
                break
            except _NoMatch as e:
                if e.gate and self._pools_of(x, g):
                    why = why or f"{x} scaled by a gate of its pool that is not fc -> act -> fc -> gate ({e})"
        if found is None:
            if why:
                where = mul.scope[-1] if mul.scope else "the model"
                self.report.entries.append(FuseEntry(f"{where} (inline)", "squeeze_excite", False,
                                                     f"an attention variant: {why}"))
            return
        x, g, roles, path = found
        owner, problems = self._se_owner(x, mul, path)
        entry_name = owner if owner else f"{mul.scope[-1] if mul.scope else 'the model'} (inline)"
        problems += self._se_problems(x, mul, roles, path, owner)
        if problems:
            self.report.entries.append(FuseEntry(entry_name, "squeeze_excite", False, "; ".join(problems)))
            return
        fc1 = self.modules[roles["fc1"].target]
        act = _act_name(self.module(roles["act"]), _SE_ACTS) if roles["act"].op == "module" \
            else _call_act(roles["act"], {"relu": "relu", "silu": "silu"})
        gate = self._gate(roles["gate"])
        c, sq = (fc1.in_channels, fc1.out_channels) if isinstance(fc1, nn.Conv2d) else (fc1.in_features,
                                                                                            fc1.out_features)
        self.report.entries.append(FuseEntry(owner, "squeeze_excite", True, f"C={c} S={sq} act={act} gate={gate}"))
        if self.apply:
            fcs = tuple(roles[r].target[len(owner) + 1:] for r in ("fc1", "fc2"))
            self.replace(owner, FusedSqueezeExcitation(self.modules[owner], act, gate, self.backend, fcs))

    def _se_owner(self, x: Node, mul: Node, path: list[Node]) -> tuple[str, list[str]]:
        """The module whose forward is exactly this SE (x in, the product out), and why there is none."""
        nodes = {id(n) for n in [*path, mul]}
        scopes = [n.scope for n in [*path, mul]]
        common = scopes[0]
        for sc in scopes[1:]:
            common = common[:next((i for i, (p, q) in enumerate(zip(common, sc, strict=False)) if p != q),
                                  min(len(common), len(sc)))]
        if not common:
            return "", ["computed inline in the model's forward (no module to swap)"]
        owner = common[-1]
        inside = [n for n in self.graph.nodes if owner in n.scope or (n.op == "module" and
                                                                      n.target.startswith(owner + "."))]
        helpers = {id(n) for n in inside if n.op == "call" and n.target in SHAPE_OPS}
        extra = [n for n in inside if id(n) not in nodes and id(n) not in helpers]
        problems = []
        if extra or x.op != "input" and owner in x.scope or any(owner in u.scope for u in mul.users):
            problems.append(f"computed in {owner}.forward among other operations ({_describe(extra[:3])}): "
                            "no module computes exactly the SE")
        owner_module = self.modules.get(owner)
        if owner_module is not None:
            params = [p for p in inspect.signature(owner_module.forward).parameters.values()
                      if p.default is inspect.Parameter.empty and p.kind in (p.POSITIONAL_ONLY,
                                                                              p.POSITIONAL_OR_KEYWORD)]
            if len(params) != 1:
                problems.append(f"{owner}.forward takes {len(params)} arguments")
            problems += self.once_scope(owner)
        return owner, problems

    def once_scope(self, owner: str) -> list[str]:
        m = self.modules[owner]
        return [f"{owner} is registered under several names"] if self.aliases.get(id(m), 0) > 1 else []

    def _se_problems(self, x: Node, mul: Node, roles: dict[str, Node], path: list[Node], owner: str) -> list[str]:
        problems: list[str] = []
        pool = roles["pool"]
        if pool.op == "module":
            pm = self.module(pool)
            if type(pm) is not nn.AdaptiveAvgPool2d or pm.output_size not in (1, (1, 1)):
                problems.append(f"pool {pool.target} is not a global average pool")
        elif pool.target == "mean":
            dims = pool.args[1] if len(pool.args) > 1 else pool.kwargs.get("dim")
            dims = (dims,) if isinstance(dims, int) else tuple(dims or ())
            if sorted(d % 4 for d in dims) != [2, 3]:
                problems.append(f"mean over dims {dims}, not (2, 3)")
        elif pool.target == "adaptive_avg_pool2d":
            size = pool.args[1] if len(pool.args) > 1 else pool.kwargs.get("output_size")
            if size not in (1, (1, 1), [1, 1]):
                problems.append(f"adaptive_avg_pool2d to {size}, not 1")
        else:
            problems.append(f"pool {_describe([pool])} is not a global average pool")
        fcs = []
        for r in ("fc1", "fc2"):
            m = self.module(roles[r], (nn.Conv2d, nn.Linear))
            if m is None:
                problems.append(f"{r} is {_describe([roles[r]])}, not a Conv2d or Linear")
                continue
            fcs.append(m)
            problems += self.once(roles[r].target, r)
            base = nn.Conv2d if isinstance(m, nn.Conv2d) else nn.Linear
            problems += [f"{roles[r].target} {type(m).__name__} overrides {meth}"
                         for meth in _overridden(m, base, "forward", *(("_conv_forward",) if base is nn.Conv2d
                                                                        else ()))]
            if m.bias is None:
                problems.append(f"{roles[r].target} has no bias")
            if isinstance(m, nn.Conv2d) and (m.kernel_size != (1, 1) or m.stride != (1, 1) or m.groups != 1
                                             or m.padding != (0, 0) or m.padding_mode != "zeros"):
                problems.append(f"{roles[r].target} is not a plain 1x1 conv (kernel {m.kernel_size}, stride "
                                f"{m.stride}, padding {m.padding}, groups {m.groups})")
        if len(fcs) == 2:
            ins = [f.in_channels if isinstance(f, nn.Conv2d) else f.in_features for f in fcs]
            outs = [f.out_channels if isinstance(f, nn.Conv2d) else f.out_features for f in fcs]
            if outs[0] != ins[1] or outs[1] != ins[0]:
                problems.append("fc1/fc2 channel counts do not chain")
            if x.shape is not None and (len(x.shape) != 4 or x.shape[1] != ins[0]):
                problems.append(f"scales a tensor of shape {x.shape}, not [N, {ins[0]}, H, W]")
        act = roles["act"]
        if act.op == "module":
            am = self.module(act)
            if am is None or _act_name(am, _SE_ACTS) is None:
                problems.append(f"activation {type(am).__name__} unsupported (relu, silu)")
            else:
                problems += self.once(act.target, "activation")
        elif act.op != "call" or _call_act(act, {"relu": "relu", "silu": "silu"}) is None:
            problems.append(f"activation {_describe([act])} unsupported (relu, silu)")
        gate = roles["gate"]
        if gate.op == "module":
            problems += self.once(gate.target, "gate")
        for n in path:
            if n is not roles["gate"] and len(n.users) != 1:
                problems.append(f"{_describe([n])} is also used elsewhere")
        problems += _hooked({n.target: self.modules[n.target] for n in path if n.op == "module"})
        if owner in self.modules:
            problems += _hooked({owner: self.modules[owner]})
            problems += [f"{owner} has a child named {n!r} (the fused module's own attribute)"
                         for n in SE_ATTRIBUTES if n in self.modules[owner]._modules]
        reshapes = [n for n in path if n.op == "call"] + [r for r in path if isinstance(self.module(r), nn.Linear)]
        if reshapes:
            problems += self._se_shapes(x, mul, path)
        return problems

    def _se_shapes(self, x: Node, mul: Node, path: list[Node]) -> list[str]:
        """Reshapes only add or drop size-1 dimensions and the gate broadcasts as [N, C, 1, 1] (needs shapes)."""
        if any(n.shape is None for n in [x, mul, *path]):
            return ["reshapes its vectors, and no example forward ran to check them (pass example_input=)"]
        problems = []
        n_, c = x.shape[:2]
        for n in path:
            src = n.args[0] if n.args and isinstance(n.args[0], Node) else None
            if n.op != "call" or n.target not in RESHAPE_OPS | {"expand", "expand_as"} or src is None \
                    or src.shape is None:
                continue
            if n.target in ("expand", "expand_as"):
                if src.shape != (n_, c, 1, 1) or n.shape != x.shape:
                    problems.append(f"{n.target} from {src.shape} to {n.shape}")
            elif [d for d in src.shape if d != 1] != [d for d in n.shape if d != 1]:
                problems.append(f"{n.target} from {src.shape} to {n.shape}")
        gate_in = next(a for a in mul.args if a is not x)
        if gate_in.shape not in ((n_, c, 1, 1), x.shape) or mul.shape != x.shape:
            problems.append(f"the gate has shape {gate_in.shape}, not [{n_}, {c}, 1, 1]")
        return problems


class _NoMatch(Exception):  # noqa: N818  (control flow inside the SE matcher, never raised to users)
    def __init__(self, why: str, gate: bool = True) -> None:
        super().__init__(why)
        self.gate = gate


def _dataflow_pass(model: nn.Module, backend: str | None, apply: bool, example: Tensor | None,
                   report: FuseReport, claimed: set[int], fold_batchnorm: bool) -> None:
    depthwise = [(q, m) for q, m in model.named_modules() if _is_depthwise(m) and id(m) not in claimed]
    convs = [(q, m) for q, m in model.named_modules() if isinstance(m, nn.Conv2d) and not _is_depthwise(m)
             and id(m) not in claimed] if fold_batchnorm else []  # a depthwise conv left native stays native
    leaves = frozenset(claimed | {id(m) for m in model.modules() if isinstance(m, (*_FUSED, BatchNormState))})
    modules = dict(model.named_modules())

    def needs_shapes(graph: Graph) -> bool:  # an SE-like product may reshape its vectors (Linear FCs, views)
        if not depthwise and not any(n.op == "call" and n.target == "mul" for n in graph.nodes):
            return False  # nothing left to decide: no forward is run (it would call the fused layers' kernels)
        return any((n.op == "call" and n.target in RESHAPE_OPS | {"expand", "expand_as"})
                   or isinstance(modules.get(n.target), nn.Linear) for n in graph.nodes)

    try:
        graph = build_graph(model, leaves, example, needs_shapes)
    except Exception as e:  # noqa: BLE001  (the report says why; the container pass's swaps stand)
        report.method = f"unavailable: {e}"
        report.entries += [FuseEntry(q, "dwconv_bn_act", False, f"the model could not be traced: {e}")
                           for q, _ in depthwise]
        return
    report.method = graph.method
    flow = _Dataflow(model, graph, backend, apply, report)
    for q, conv in depthwise:
        flow.depthwise(q, conv)
    for q, conv in convs:
        flow.conv_bn(q, conv)
    for n in list(graph.nodes):
        if n.op == "call" and n.target == "mul":
            flow.squeeze_excite(n)


def _container_pass(model: nn.Module, backend: str | None, apply: bool, report: FuseReport) -> set[int]:
    """torchvision's containers and SqueezeExcitation; returns the ids of every module it decided on (fused or
    not) and of the depthwise convs inside them: the dataflow pass leaves them alone."""
    claimed: set[int] = set()

    def visit(parent: nn.Module, prefix: str) -> None:
        for name, child in list(parent.named_children()):
            qual = f"{prefix}{name}"
            if isinstance(child, _FUSED):
                claimed.update(id(m) for m in child.modules())
                continue
            found = _conv_bn_act(child)
            if found is not None:
                act, detail = found
                report.entries.append(FuseEntry(qual, "dwconv_bn_act", act is not None, detail))
                claimed.update((id(child), id(child[0])))
                if act is not None:
                    if apply:
                        parent._modules[name] = FusedConvBNAct(child, act, backend)
                    continue
            se = _squeeze_excite(child)
            if se is not None:
                acts, detail = se
                report.entries.append(FuseEntry(qual, "squeeze_excite", acts is not None, detail))
                claimed.add(id(child))
                if acts is not None:
                    if apply:
                        parent._modules[name] = FusedSqueezeExcitation(child, *acts, backend)
                    continue
            visit(child, qual + ".")

    visit(model, "")
    return claimed


def _walk(model: nn.Module, backend: str | None, apply: bool, example: Tensor | None,
          fold_batchnorm: bool = True) -> FuseReport:
    # torch.fx's tracing leaves reference cycles that hold the model (Proxy.__iter__ keeps its frames; the tracer's
    # recursive closures keep the tracer and its root). Uncollected, they keep the model past its last reference
    # (GPU memory held; a process group its layers hold torn down at interpreter exit, which can abort a torchrun
    # worker after its job is done). The collector pauses during the walk, so none of them leaves the youngest
    # generation and collecting that one frees them all (a full collection costs ~0.1 s with torch loaded).
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        report = FuseReport()
        claimed = _container_pass(model, backend, apply, report)
        _dataflow_pass(model, backend, apply, example, report, claimed, fold_batchnorm)
    finally:
        if was_enabled:
            gc.enable()
    gc.collect(0)
    return report


def fuse(model: nn.Module, backend: str | None = None, verbose: bool = False,
         example_input: Tensor | None = None, fold_batchnorm: bool = True) -> nn.Module:
    """Swap fused modules into ``model`` in place and return it; ``state_dict`` keys and the model's class are
    unchanged.

    ``backend`` pins the fused modules to one backend (default: chosen per call, see ``use_backend``).
    ``verbose`` prints the report of what was fused and what was left native and why (``explain_fuse``).
    ``example_input`` is used only where torch.fx cannot trace the model (then one eval forward is recorded) or a
    squeeze-excitation reshapes its vectors (shapes are checked); default: ``[1, C, 64, 64]`` random.
    ``fold_batchnorm``: also fold the BatchNorm after every other conv into it for eval (``FoldedConvBN``; training
    and ``state_dict`` unchanged).
    """
    if not isinstance(fold_batchnorm, bool):
        raise TypeError(f"fold_batchnorm: expected a bool, got {type(fold_batchnorm).__name__}")
    report = _walk(model, _check_backend(backend), True, _check_example(example_input), fold_batchnorm)
    if verbose:
        print(report)
    return model


def explain_fuse(model: nn.Module, example_input: Tensor | None = None) -> FuseReport:
    """What ``fuse`` would swap, and what it would leave and why; changes nothing."""
    return _walk(model, None, False, _check_example(example_input))


def _check_example(example: Tensor | None) -> Tensor | None:
    if example is not None and not isinstance(example, Tensor):
        raise TypeError(f"example_input: expected a torch.Tensor or None, got {type(example).__name__}")
    return example


def unfuse(model: nn.Module) -> nn.Module:
    """Restore native modules in place (sharing the fused modules' tensors) and return ``model``."""
    if isinstance(model, _FUSED):
        return model.unfused()
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, _FUSED):
                parent._modules[name] = child.unfused()
    return model


def _unfold_conv_bn(model: nn.Module) -> None:
    """Native conv and BatchNorm back in place of every ``FoldedConvBN`` pair (its BatchNorm can then be synced)."""
    bns = {id(m.bn) for m in model.modules() if isinstance(m, FoldedConvBN)}
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, FoldedConvBN) or id(child) in bns:
                parent._modules[name] = child.unfused()


def convert_sync_batchnorm(model: nn.Module, process_group: object = None) -> nn.Module:
    """For DDP: fused layers synchronise their batch statistics over ``process_group`` (default: the whole world)
    between their passes; folded conv + BatchNorm pairs (``FoldedConvBN``) go back to native and, with the remaining
    native BatchNorms, become conv + ``nn.SyncBatchNorm``. In place; returns the model."""
    group = process_group if process_group is not None else dist.group.WORLD
    _unfold_conv_bn(model)
    for m in model.modules():
        if isinstance(m, (FusedConvBNAct, FusedDwConvBNAct)):
            m.process_group = group
    return nn.SyncBatchNorm.convert_sync_batchnorm(model, process_group)
