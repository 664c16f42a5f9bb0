import json

import pytest

from .pack import build_trt_pack

pytest.importorskip("layerforge.runtime.nvrtc")


@pytest.fixture(scope="session")
def trt_pack(tmp_path_factory):
    """The example model's pack (every kernel of examples/llama-3-8b), built with --trt."""
    return build_trt_pack(tmp_path_factory.mktemp("trt_pack"))


@pytest.fixture(scope="session")
def manifest(trt_pack):
    return json.loads((trt_pack / "manifest.json").read_text())
