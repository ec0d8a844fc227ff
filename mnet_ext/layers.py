"""The unique fused-layer configurations of the MobileNets, derived from the models themselves (not by hand).

Used by the benchmarks and the GPU tests: every unique depthwise conv+BN+act and SE of MobileNet V1 (alpha=1), V2,
V3-Large and V3-Small at a given resolution, with the input shape (per sample) each one sees.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torchvision
from torch import nn

import mnet_ext

MODEL_BUILDERS = {
    "mobilenet_v1": mnet_ext.models.mobilenet_v1,
    "mobilenet_v2": torchvision.models.mobilenet_v2,
    "mobilenet_v3_large": torchvision.models.mobilenet_v3_large,
    "mobilenet_v3_small": torchvision.models.mobilenet_v3_small,
}


def fused_bytes(kind: str, mode: str, a_in: int, a_out: int) -> int:
    """Bytes the fused kernels must move for one layer, from the bytes of its input (a_in) and output (a_out).

    dwconv_bn_act: eval reads x, writes y; train_fwd adds the statistics pass over x; bwd = reduce pass (dy, x)
    + apply pass (dy, x, writes dx); wgrad counts the (dy, x) reads. squeeze_excite: pool reads x, scale reads x
    and writes y; its backward reads dy and x, then dy again and writes dx.
    """
    if kind == "dwconv_bn_act":
        table = {"eval": a_in + a_out, "train_fwd": 2 * a_in + a_out, "bwd": 3 * a_in + 2 * a_out,
                 "fwd_bwd": 5 * a_in + 3 * a_out, "wgrad": a_in + a_out}
    else:
        table = {"eval": 3 * a_in, "train_fwd": 3 * a_in, "bwd": 4 * a_in, "fwd_bwd": 7 * a_in, "wgrad": 0}
    return table[mode]


@dataclass(frozen=True)
class LayerConfig:
    kind: str  # "dwconv_bn_act" or "squeeze_excite"
    channels: int
    height: int
    width: int
    kernel_size: int = 0  # dwconv only
    stride: int = 1
    dilation: int = 1
    act: str = "none"  # conv activation, or the SE's inner activation
    squeeze: int = 0  # SE only
    gate: str = ""  # SE only

    @property
    def name(self) -> str:
        if self.kind == "dwconv_bn_act":
            return (f"dw_c{self.channels}_{self.height}x{self.width}_k{self.kernel_size}s{self.stride}"
                    f"d{self.dilation}_{self.act}")
        return f"se_c{self.channels}_{self.height}x{self.width}_s{self.squeeze}_{self.act}_{self.gate}"

    def make_native(self) -> nn.Module:
        """A native module of this configuration (conv+BN+act container, or torchvision's SE)."""
        from torchvision.ops import SqueezeExcitation
        from torchvision.ops.misc import Conv2dNormActivation

        acts = {"none": None, "relu": nn.ReLU, "relu6": nn.ReLU6, "hardswish": nn.Hardswish, "silu": nn.SiLU,
                "hardsigmoid": nn.Hardsigmoid, "sigmoid": nn.Sigmoid}
        if self.kind == "dwconv_bn_act":
            return Conv2dNormActivation(self.channels, self.channels, self.kernel_size, self.stride,
                                        groups=self.channels, dilation=self.dilation, activation_layer=acts[self.act])
        return SqueezeExcitation(self.channels, self.squeeze, activation=acts[self.act],
                                 scale_activation=acts[self.gate])


def model_layers(model: nn.Module, resolution: int = 224) -> list[tuple[str, LayerConfig]]:
    """(qualified name, config) of every fusable layer of ``model``, in forward order."""
    report = mnet_ext.explain_fuse(model)
    modules = dict(model.named_modules())
    shapes: dict[str, tuple[int, ...]] = {}
    def record(name: str):
        def hook(module: nn.Module, args: tuple) -> None:
            shapes.setdefault(name, tuple(args[0].shape))
        return hook

    hooks = [modules[e.name].register_forward_pre_hook(record(e.name)) for e in report.fused]
    with torch.no_grad():
        model.eval()(torch.zeros(1, 3, resolution, resolution))
    for h in hooks:
        h.remove()
    out = []
    for e in report.fused:
        m, (_, c, h, w) = modules[e.name], shapes[e.name]
        if e.kind == "dwconv_bn_act":
            conv = m[0]
            act = e.detail.rsplit("act=", 1)[1]
            cfg = LayerConfig(e.kind, c, h, w, conv.kernel_size[0], conv.stride[0], conv.dilation[0], act)
        else:
            act, gate = (part.split("=")[1] for part in e.detail.split()[2:4])
            cfg = LayerConfig(e.kind, c, h, w, act=act, squeeze=m.fc1.out_channels, gate=gate)
        out.append((e.name, cfg))
    return out


def unique_layers(
    models: tuple[str, ...] = tuple(MODEL_BUILDERS), resolution: int = 224
) -> dict[LayerConfig, list[str]]:
    """{config: ["model:layer", ...]} over the given models, in first-seen order."""
    seen: dict[LayerConfig, list[str]] = {}
    for name in models:
        for layer, cfg in model_layers(MODEL_BUILDERS[name](), resolution):
            seen.setdefault(cfg, []).append(f"{name}:{layer}")
    return seen
