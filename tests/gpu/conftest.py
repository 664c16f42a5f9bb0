import pytest

from ..devices import requires_gpu


def pytest_collection_modifyitems(config, items):
    for item in items:
        if "tests/gpu/" in str(item.fspath).replace("\\", "/"):
            item.add_marker(pytest.mark.gpu)
            item.add_marker(requires_gpu)


@pytest.fixture
def loaded_modes(monkeypatch):
    """The modes PagedAttention loads its kernels for (None, 'prefill', 'decode', 'decode_many'), in call order,
    recorded for the test's duration: which kernel a call took."""
    from layerforge.runtime.attention import PagedAttention
    modes = []
    load = PagedAttention._load

    def spy(self, device, mode=None):
        modes.append(mode)
        return load(self, device, mode)
    monkeypatch.setattr(PagedAttention, "_load", spy)
    return modes
