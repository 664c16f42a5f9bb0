import pytest

from ..devices import requires_gpu


def pytest_collection_modifyitems(config, items):
    for item in items:
        if "tests/gpu/" in str(item.fspath).replace("\\", "/"):
            item.add_marker(pytest.mark.gpu)
            item.add_marker(requires_gpu)


@pytest.fixture
def tuning_table(tmp_path, monkeypatch):
    """The planner's tuning tables on, with an empty user table of the test's own (returned: the path `layerforge tune`
    and tuning.write_entry fill) beside the packaged one, and no launcher made before it reused."""
    from layerforge.codegen import tuning
    from layerforge.runtime import linear, quant
    monkeypatch.setenv("LAYERFORGE_TUNING", "1")
    monkeypatch.setenv("LAYERFORGE_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("LAYERFORGE_TUNING_TABLE", raising=False)
    monkeypatch.setattr(linear, "_KERNELS", {})   # launchers made before the table: not reused
    monkeypatch.setattr(quant, "_DEQUANT", {})
    tuning.clear_cache()
    yield tuning.user_table_path()
    tuning.clear_cache()


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
