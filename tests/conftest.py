import pytest
import torch

from .seeding import stable_seed


@pytest.fixture(autouse=True)
def seed_per_test(request):
    """torch's global generators (CPU and CUDA) start every test from a seed of its node id,
    so inputs drawn without an explicit generator are fresh per test and reproducible."""
    torch.manual_seed(stable_seed(request.node.nodeid))


def pytest_configure(config):
    """The planner's tuning tables (codegen/tuning.py) stay out of the tests unless a test puts one in: a table a
    developer's `layerforge tune` wrote under the cache folder would otherwise change the plans the tests expect
    (tests/codegen/test_tuning.py switches them on; it also compiles every packaged entry)."""
    import os
    os.environ.setdefault("LAYERFORGE_TUNING", "0")
