"""The device parameter of tests that hold one layer to the same checks on the CPU (the
reference evaluator behind the layer) and on CUDA (the generated kernels). The cuda case is
marked `gpu` (`pytest -m gpu` selects it) and skips, saying why, on a machine without a GPU."""
import pytest
import torch

requires_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU on this machine")

DEVICES = [pytest.param("cpu", id="cpu"),
           pytest.param("cuda", id="cuda", marks=(pytest.mark.gpu, requires_gpu))]
