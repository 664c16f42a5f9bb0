import pytest
import torch

from .seeding import stable_seed


@pytest.fixture(autouse=True)
def seed_per_test(request):
    """torch's global generators (CPU and CUDA) start every test from a seed of its node id,
    so inputs drawn without an explicit generator are fresh per test and reproducible."""
    torch.manual_seed(stable_seed(request.node.nodeid))
