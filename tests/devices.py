"""The device parameter of tests that hold one layer to the same checks on the CPU (the
reference evaluator behind the layer) and on CUDA (the generated kernels). The cuda case is
marked `gpu` (`pytest -m gpu` selects it) and skips, saying why, on a machine without a GPU."""
import pytest
import torch

requires_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU on this machine")

DEVICES = [pytest.param("cpu", id="cpu"),
           pytest.param("cuda", id="cuda", marks=(pytest.mark.gpu, requires_gpu))]


def record_tc_launches(monkeypatch, attn, plan) -> list:
    """Replace PagedAttention `attn`'s tensor-core kernels by a recorder of `plan`'s launches (no GPU): each call of
    the main kernel appends (problem sizes, grid, {argument name: value}); the device's properties stand in for an
    H100-class part (132 SMs, sm_90)."""
    from operator import itemgetter
    from types import SimpleNamespace

    from layerforge.runtime import linear
    calls = []

    class Recorder:
        abi = plan.abi

        def grid(self, *problem):
            return plan.abi.grid_for(*problem)

        def __call__(self, problem, args):
            calls.append((problem, self.grid(*problem), dict(zip((a.name for a in plan.abi.args), args))))

    getter = itemgetter(*(a.ref for a in plan.abi.args))
    monkeypatch.setattr(attn, "_load", lambda dev, mode: (Recorder(), None, getter, None, plan.config.keys))
    monkeypatch.setitem(linear._PROPS, None, SimpleNamespace(multi_processor_count=132, major=9, minor=0))
    return calls
