"""GPU tests (marked ``cuda``; skipped with a reason without a GPU, run by scripts/gpu_run.sh).

Every unique depthwise and SE layer of MobileNet V1/V2/V3-L/V3-S (derived from the models) on each GPU backend
against the reference, whole fused models against native, torch.compile and CUDA-graph capture.
"""

from __future__ import annotations

import copy
import itertools

import pytest
import torch
import torchvision

import mnet_ext
from mnet_ext.layers import unique_layers
from tests import test_dwconv_bn_act as dw
from tests import test_squeeze_excite as se
from tests.helpers import backend_param, scaled_error

pytestmark = pytest.mark.cuda
GPU_BACKENDS = [backend_param("cuda", "cuda"), backend_param("triton", "cuda")]
LAYERS = list(unique_layers())
# Default: each batch size, dtype and layout at least once, and the configuration the targets are stated for.
# The full product (batch 1/32/256 x fp32/bf16 x NCHW/NHWC) is the exhaustive variant: every distinct
# (k, stride, act, layout, dtype) costs Triton compilations, which the 10-minute GPU run cannot all afford.
CASES = [(1, "fp32", "nchw"), (1, "bf16", "nhwc"), (32, "fp32", "nhwc"), (32, "bf16", "nchw"), (256, "bf16", "nhwc")]
ALL_CASES = list(itertools.product((1, 32, 256), ("fp32", "bf16"), ("nchw", "nhwc")))


def _check_layer(backend, cfg, batch, dtype, layout):
    shape = (batch, cfg.channels, cfg.height, cfg.width)
    if cfg.kind == "dwconv_bn_act":
        dw.check_primitives(backend, shape, cfg.kernel_size, cfg.stride, cfg.dilation, cfg.act, layout,
                            dw.DTYPES[dtype], device="cuda")
    else:
        se.check_primitives(backend, shape, dw.DTYPES[dtype], layout, device="cuda")


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("cfg", LAYERS, ids=lambda c: c.name)
@pytest.mark.parametrize("batch,dtype,layout", CASES)
def test_every_mobilenet_layer(backend, cfg, batch, dtype, layout):
    _check_layer(backend, cfg, batch, dtype, layout)


@pytest.mark.exhaustive
@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("cfg", LAYERS, ids=lambda c: c.name)
@pytest.mark.parametrize("batch,dtype,layout", ALL_CASES)
def test_every_mobilenet_layer_exhaustive(backend, cfg, batch, dtype, layout):
    _check_layer(backend, cfg, batch, dtype, layout)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("name", ["mobilenet_v1", "mobilenet_v2", "mobilenet_v3_large", "mobilenet_v3_small"])
def test_fused_model_on_gpu(backend, name):
    """Eval logits and one training step (logits, running stats) against native, fp32 on the GPU."""
    torch.manual_seed(0)
    native = mnet_ext.layers.MODEL_BUILDERS[name](num_classes=10).cuda().to(memory_format=torch.channels_last)
    fused = mnet_ext.fuse(copy.deepcopy(native), backend=backend)
    x = torch.randn(8, 3, 96, 96, device="cuda").to(memory_format=torch.channels_last)
    with torch.no_grad():
        assert scaled_error(fused.eval()(x), native.eval()(x)) <= 2e-4
    for m in (native, fused):
        m.train()
        torch.manual_seed(1)
        m(x).square().mean().backward()
    for (key, t_f), t_n in zip(fused.state_dict().items(), native.state_dict().values(), strict=True):
        if "running" in key:
            assert scaled_error(t_f, t_n) <= 2e-4, key


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_compile_fullgraph_on_gpu(backend):
    model = mnet_ext.fuse(torchvision.models.mobilenet_v3_small(num_classes=10), backend=backend).cuda()
    compiled = torch.compile(model, fullgraph=True)
    x = torch.randn(4, 3, 64, 64, device="cuda")
    model.eval()
    with torch.no_grad():
        assert scaled_error(compiled(x), model(x)) <= 1e-4


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_cuda_graph_capture(backend):
    """Forward and backward of a fused layer replay from a CUDA graph (no host sync, current stream)."""
    native = next(iter(unique_layers(("mobilenet_v3_large",)))).make_native()
    layer = mnet_ext.fuse(torch.nn.Sequential(native), backend=backend)[0].cuda().train()
    x = torch.randn(8, layer.conv.in_channels, 32, 32, device="cuda", requires_grad=True)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):  # warm-up (autotuning, lazy init) outside the capture
            layer(x).sum().backward()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = layer(x)
        y.sum().backward()
    graph.replay()
    torch.cuda.synchronize()
    expected = layer(x.detach())
    assert scaled_error(y, expected) <= 1e-4


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_training_converges_like_native_on_gpu(backend):
    """40 steps of MobileNetV3-Small, bf16 autocast, channels_last on the GPU: fused and native reach the same loss
    (tail means within 5%, as in the CPU test: step-by-step curves are chaotic), and the fused run's images/s and
    peak memory are printed beside native's (the benchmarks, not this test, judge speed)."""
    from mnet_ext import train as T

    cfg = dict(model="mobilenet_v3_small", width_mult=0.5, num_classes=10, resolution=64, synthetic_size=256,
               batch_size=32, steps=40, lr=0.2, label_smoothing=0.0, amp="bf16", channels_last=True, seed=0,
               device="cuda", progress=False)
    native = T.train(T.TrainConfig(**cfg, fused=False))
    fused = T.train(T.TrainConfig(**cfg, fused=True, backend=backend))
    tail_n, tail_f = (sum(r["loss_history"][-10:]) / 10 for r in (native, fused))
    print(f"{backend}: images/s fused {fused['images_per_sec']:.0f} native {native['images_per_sec']:.0f}; "
          f"peak MB fused {fused['peak_memory_bytes'] / 2**20:.0f} native {native['peak_memory_bytes'] / 2**20:.0f}")
    assert tail_f == pytest.approx(tail_n, rel=0.05)
    assert tail_f < fused["loss_history"][0]
