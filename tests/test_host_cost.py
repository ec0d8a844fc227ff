"""bench/host_cost.py: the host-cost table of the GPU code paths runs on the CPU, and its stubs do not leak."""

from __future__ import annotations

import pytest

from bench import host_cost
from mnet_ext import functional as MF
from tests.helpers import backend_param

pytestmark = pytest.mark.parametrize("backends", [pytest.param(None, marks=[*backend_param("cuda").marks,
                                                                           *backend_param("triton").marks])])


def test_table_has_a_time_per_layer_mode_and_provider(backends):
    rows = host_cost.table(rounds=1, per_round=2).splitlines()[2:]
    assert [r.split(" | ")[:2] for r in rows] == [
        ["| dwconv_bn_act k3 hardswish", "eval"], ["| dwconv_bn_act k3 hardswish", "train step"],
        ["| squeeze_excite c16 s8", "eval"], ["| squeeze_excite c16 s8", "train step"]]
    for r in rows:
        times = [float(v) for v in r.strip(" |").split(" | ")[2:]]
        assert len(times) == len(host_cost.PROVIDERS) and all(0 < t < 1e6 for t in times)


def test_gpu_path_restores_what_it_stubs(backends):
    from triton.runtime import interpreter

    one_call, run = MF._in_one_call, interpreter.InterpretedFunction.run
    with pytest.raises(RuntimeError, match="inside"), host_cost.gpu_path("triton"):
        assert MF._in_one_call is not one_call and interpreter.InterpretedFunction.run is not run
        raise RuntimeError("inside")
    assert MF._in_one_call is one_call and interpreter.InterpretedFunction.run is run
