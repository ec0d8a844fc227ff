"""The dataflow graph ``mnet_ext.fuse`` reads candidates from: torch.fx symbolic tracing, or, where tracing fails
(control flow on tensor values, unsupported Python), a recorded forward on a small example input.

Both give the same small graph: a node per leaf-module call (convs, linears, BatchNorms and every ``torch.nn``
module but containers), per function or tensor method call (named by what it computes: ``relu6`` for
``F.relu6``, ``torch.nn.functional.hardtanh(x, 0, 6)`` stays ``hardtanh``), the model's input, constants and
output; each node knows the module calls it sits in (its scope), its users and, when an example input ran, its
output shape. Only functions identified by identity are named (a user function called ``relu`` is not ``relu``).
"""

from __future__ import annotations

import operator
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import Tensor, nn
from torch.fx.passes.shape_prop import ShapeProp
from torch.nn.modules.batchnorm import _BatchNorm
from torch.overrides import TorchFunctionMode


@dataclass(eq=False)
class Node:
    op: str  # "input", "module", "call", "const" (a tensor from elsewhere: a parameter, a constant) or "output"
    target: str | None  # module: its qualified name; call: canonical op name (see _FUNCTIONS, _METHODS)
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    scope: tuple[str, ...]  # qualified names of the (non-leaf) module calls it runs in, outermost first
    users: list[Node] = field(default_factory=list)
    shape: tuple[int, ...] | None = None

    def __repr__(self) -> str:
        return f"{self.op}:{self.target}"


@dataclass
class Graph:
    nodes: list[Node]
    method: str  # how it was obtained, for the report

    def module_calls(self) -> dict[str, list[Node]]:
        calls: dict[str, list[Node]] = {}
        for n in self.nodes:
            if n.op == "module":
                calls.setdefault(n.target, []).append(n)
        return calls


def _canonical_functions() -> dict[Callable[..., Any], str]:
    table: dict[Callable[..., Any], str] = {
        operator.mul: "mul", torch.mul: "mul", torch.mean: "mean", F.adaptive_avg_pool2d: "adaptive_avg_pool2d",
        torch.flatten: "flatten", torch.reshape: "reshape", torch.squeeze: "squeeze", torch.unsqueeze: "unsqueeze",
        F.relu: "relu", torch.relu: "relu", F.relu_: "relu", torch.relu_: "relu", F.relu6: "relu6",
        F.hardtanh: "hardtanh", F.hardswish: "hardswish", F.silu: "silu", F.hardsigmoid: "hardsigmoid",
        torch.sigmoid: "sigmoid", F.sigmoid: "sigmoid", F.gelu: "gelu", F.mish: "mish", F.elu: "elu",
        F.leaky_relu: "leaky_relu", F.softplus: "softplus", torch.tanh: "tanh", F.tanh: "tanh", F.selu: "selu",
        F.celu: "celu", F.prelu: "prelu", operator.getitem: "getitem", getattr: "getattr",
    }
    # timm's activation functions (its gate functions among them) compute exactly torch's; known only when timm is
    # already imported (it is no dependency of this package)
    timm_acts = sys.modules.get("timm.layers.activations")
    if timm_acts is not None:
        for fn_name, canon in (("hard_sigmoid", "hardsigmoid"), ("sigmoid", "sigmoid"), ("swish", "silu"),
                               ("hard_swish", "hardswish")):
            if callable(fn := getattr(timm_acts, fn_name, None)):
                table[fn] = canon
    return table


_METHODS = {
    "mul": "mul", "__mul__": "mul", "__rmul__": "mul", "mean": "mean", "view": "view", "reshape": "reshape",
    "flatten": "flatten", "squeeze": "squeeze", "unsqueeze": "unsqueeze", "expand_as": "expand_as",
    "expand": "expand", "relu": "relu", "relu_": "relu", "sigmoid": "sigmoid", "sigmoid_": "sigmoid",
    "tanh": "tanh", "size": "size", "__getitem__": "getitem",
}
ACTIVATION_OPS = frozenset({"relu", "relu6", "hardtanh", "hardswish", "silu", "hardsigmoid", "sigmoid", "gelu",
                            "mish", "elu", "leaky_relu", "softplus", "tanh", "selu", "celu", "prelu"})
RESHAPE_OPS = frozenset({"view", "reshape", "flatten", "squeeze", "unsqueeze"})
SHAPE_OPS = frozenset({"size", "getitem", "getattr"})


def _canonical(func: Any, functions: dict[Callable[..., Any], str], methods: dict[Any, str]) -> str:
    try:
        if func in functions:
            return functions[func]
        if func in methods:
            return methods[func]
    except TypeError:  # unhashable
        pass
    return f"other:{getattr(func, '__qualname__', func)!s}"


def is_leaf(module: nn.Module, extra_leaves: frozenset[int]) -> bool:
    """Leaf modules are called as a whole (their code is checked by class, not traced): convs, linears, BatchNorms
    (timm's BatchNormAct2d too), torch.nn's own modules except containers, and the given ones (fused modules)."""
    if id(module) in extra_leaves or isinstance(module, (nn.Conv2d, nn.Linear, _BatchNorm)):
        return True
    return type(module).__module__.startswith("torch.nn") and not isinstance(module, nn.Sequential)


def _map(obj: Any, fn: Callable[[Any], Any]) -> Any:
    if isinstance(obj, tuple):
        return tuple(_map(o, fn) for o in obj)
    if isinstance(obj, list):
        return [_map(o, fn) for o in obj]
    if isinstance(obj, dict):
        return {k: _map(v, fn) for k, v in obj.items()}
    return fn(obj)


def _iter_nodes(obj: Any) -> Iterator[Node]:
    if isinstance(obj, Node):
        yield obj
    elif isinstance(obj, (tuple, list)):
        for o in obj:
            yield from _iter_nodes(o)
    elif isinstance(obj, dict):
        for o in obj.values():
            yield from _iter_nodes(o)


def _link(nodes: list[Node]) -> None:
    for n in nodes:
        for a in {id(a): a for a in _iter_nodes((n.args, n.kwargs))}.values():
            a.users.append(n)


class _Tracer(fx.Tracer):
    def __init__(self, extra_leaves: frozenset[int]) -> None:
        timm_acts = sys.modules.get("timm.layers.activations")
        wrapped = tuple(getattr(timm_acts, n) for n in ("hard_sigmoid", "sigmoid", "swish", "hard_swish")
                        if timm_acts is not None and callable(getattr(timm_acts, n, None)))
        super().__init__(autowrap_functions=wrapped)
        self._extra_leaves = extra_leaves

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return is_leaf(m, self._extra_leaves)


def _fx_graph(model: nn.Module, extra_leaves: frozenset[int]) -> tuple[Graph, fx.Graph, dict[fx.Node, Node]]:
    fx_graph = _Tracer(extra_leaves).trace(model)
    functions = _canonical_functions()
    nodes: list[Node] = []
    of: dict[fx.Node, Node] = {}
    for n in fx_graph.nodes:
        scope = tuple(q for q, _ in n.meta.get("nn_module_stack", {}).values())
        target: str | None = None
        if n.op == "call_module":
            op, target = "module", n.target
            scope = scope[:-1] if scope and scope[-1] == n.target else scope
        elif n.op == "call_function":
            op, target = "call", _canonical(n.target, functions, {})
        elif n.op == "call_method":
            op, target = "call", _METHODS.get(n.target, f"other:{n.target}")
        elif n.op == "placeholder":
            op = "input"
        elif n.op == "get_attr":
            op = "const"
        else:
            op = "output"
        node = Node(op, target, _map(n.args, lambda a: of.get(a, a) if isinstance(a, fx.Node) else a),
                    _map(dict(n.kwargs), lambda a: of.get(a, a) if isinstance(a, fx.Node) else a), scope)
        of[n] = node
        nodes.append(node)
    _link(nodes)
    return Graph(nodes, "torch.fx"), fx_graph, of


class _Frozen:
    """Eval mode and no_grad for an example forward, every module's training flag restored afterwards: the
    forward must not change the model (eval BatchNorms update no statistics)."""

    def __init__(self, model: nn.Module) -> None:
        self._model = model
        self._flags = [(m, m.training) for m in model.modules()]
        self._no_grad = torch.no_grad()

    def __enter__(self) -> None:
        self._model.eval()
        self._no_grad.__enter__()

    def __exit__(self, *exc: object) -> None:
        self._no_grad.__exit__(*exc)
        for m, flag in self._flags:
            m.training = flag


def add_shapes(model: nn.Module, fx_graph: fx.Graph, of: dict[fx.Node, Node], example: Tensor) -> None:
    """Output shapes of the fx graph's nodes on ``example``."""
    gm = fx.GraphModule(model, fx_graph)
    with _Frozen(model):
        ShapeProp(gm).propagate(example)
    for n, node in of.items():
        meta = n.meta.get("tensor_meta")
        if meta is not None and hasattr(meta, "shape"):
            node.shape = tuple(meta.shape)


class _Recorder(TorchFunctionMode):
    """Records every torch function / tensor method call and leaf-module call of one forward as graph nodes. Values
    are tensors by identity (each kept alive so ids stay unique); an in-place op gives its tensor a new node."""

    def __init__(self, names: dict[int, str], extra_leaves: frozenset[int]) -> None:
        super().__init__()
        self.names, self.extra_leaves = names, extra_leaves
        self.functions = _canonical_functions()
        self.methods = {getattr(torch.Tensor, n): c for n, c in _METHODS.items() if hasattr(torch.Tensor, n)}
        self.nodes: list[Node] = []
        self.values: dict[int, Node] = {}
        self.alive: list[Tensor] = []
        self.scope: list[str] = []
        self.frames: list[tuple[str, str | None, Any]] = []
        self.leaf_depth = 0
        self.busy = False

    def node_of(self, obj: Any) -> Any:
        if not isinstance(obj, Tensor):
            return obj
        node = self.values.get(id(obj))
        if node is None:
            node = self.define(obj, "const", None, (), {})
        return node

    def define(self, out: Any, op: str, target: str | None, args: Any, kwargs: Any) -> Node | None:
        tensors = [t for t in _map(out, lambda o: o) if isinstance(t, Tensor)] if isinstance(out, (tuple, list)) \
            else [out] if isinstance(out, Tensor) else []
        first = None
        for i, t in enumerate(tensors):
            name = target if len(tensors) == 1 or target is None else f"{target}[{i}]"
            node = Node(op, name, args, kwargs, tuple(self.scope), shape=tuple(t.shape))
            self.nodes.append(node)
            self.values[id(t)] = node
            self.alive.append(t)
            first = first or node
        return first

    def __torch_function__(self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if self.leaf_depth or self.busy:
            return func(*args, **kwargs)
        self.busy = True
        arg_nodes, kwarg_nodes = _map(args, self.node_of), _map(kwargs, self.node_of)
        self.busy = False
        out = func(*args, **kwargs)
        self.busy = True
        self.define(out, "call", _canonical(func, self.functions, self.methods), arg_nodes, kwarg_nodes)
        self.busy = False
        return out

    def pre_hook(self, module: nn.Module, args: tuple[Any, ...]) -> None:
        if self.leaf_depth:
            self.frames.append(("inner", None, None))
            return
        name = self.names.get(id(module))
        if is_leaf(module, self.extra_leaves):
            self.busy = True
            self.frames.append(("leaf", name, _map(args, self.node_of)))
            self.busy = False
            self.leaf_depth += 1
        else:
            self.frames.append(("scope", name, None))
            if name is not None:
                self.scope.append(name)

    def post_hook(self, module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        kind, name, arg_nodes = self.frames.pop()
        if kind == "leaf":
            self.leaf_depth -= 1
            self.busy = True
            self.define(output, "module", name, arg_nodes, {})
            self.busy = False
        elif kind == "scope" and name is not None:
            self.scope.pop()


def recorded_graph(model: nn.Module, example: Tensor, extra_leaves: frozenset[int]) -> Graph:
    """The graph of one eval, no_grad forward of ``model`` on ``example`` (see _Recorder)."""
    names = {id(m): q for q, m in model.named_modules() if q}  # the root's own call is no scope (as in torch.fx)
    recorder = _Recorder(names, extra_leaves)
    recorder.define(example, "input", None, (), {})
    hooks = [nn.modules.module.register_module_forward_pre_hook(recorder.pre_hook),
             nn.modules.module.register_module_forward_hook(recorder.post_hook)]
    try:
        with _Frozen(model), recorder:
            out = model(example)
    finally:
        for h in hooks:
            h.remove()
    output = Node("output", None, (_map(out, recorder.node_of),), {}, ())
    recorder.nodes.append(output)
    _link(recorder.nodes)
    return Graph(recorder.nodes, "recorded forward")


def example_input_for(model: nn.Module) -> Tensor:
    """A small image batch for ``model``: [1, C, 64, 64] with C the first Conv2d's input channels, on the device and
    in the dtype of the model's first parameter; the same every time."""
    conv = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    param = next(model.parameters(), None)
    if conv is None or param is None:
        raise ValueError("example_input: required for a model without a Conv2d")
    # a generator of its own: fusing must not move the global random state (training runs draw from it)
    generator = torch.Generator(param.device).manual_seed(0)
    return torch.randn(1, conv.in_channels, 64, 64, device=param.device, dtype=param.dtype, generator=generator)


def build_graph(model: nn.Module, extra_leaves: frozenset[int], example: Tensor | None,
                needs_shapes: Callable[[Graph], bool]) -> Graph:
    """torch.fx first (shapes added from an example forward only when ``needs_shapes`` says so); a recorded forward
    where tracing fails. Raises when neither works, with both reasons."""
    try:
        graph, fx_graph, of = _fx_graph(model, extra_leaves)
    except Exception as e:  # noqa: BLE001  (any tracing failure: the recorded forward is the fallback)
        why = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:160]
        try:
            graph = recorded_graph(model, example if example is not None else example_input_for(model),
                                   extra_leaves)
        except Exception as e2:
            raise RuntimeError(f"torch.fx could not trace the model ({why}) and a forward on the example input "
                               f"failed ({type(e2).__name__}: {e2}); pass example_input=") from e2
        graph.method = f"recorded forward (torch.fx failed: {why})"
        return graph
    if needs_shapes(graph):
        add_shapes(model, fx_graph, of, example if example is not None else example_input_for(model))
    return graph
