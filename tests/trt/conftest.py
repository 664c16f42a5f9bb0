import importlib.util
import json

import pytest

from layerforge.codegen.trt import plugin_specs
from layerforge.codegen.trt_render import PYTHON_MODULE, aot_entry, render_plugins

from .pack import ARCH, build_trt_pack

pytest.importorskip("layerforge.runtime.nvrtc")


@pytest.fixture(scope="session")
def trt_pack(tmp_path_factory):
    """The example model's pack (every kernel of examples/llama-3-8b), built with --trt."""
    return build_trt_pack(tmp_path_factory.mktemp("trt_pack"))


@pytest.fixture(scope="session")
def manifest(trt_pack):
    return json.loads((trt_pack / "manifest.json").read_text())


# ---- the other families' plugins (tests/trt/families.py) ---------------------------------------
@pytest.fixture(scope="session")
def cases():
    from .families import family_cases   # the runtime's launch code: imported after the importorskip above
    return family_cases()


@pytest.fixture(scope="session")
def specs(cases):
    plans = {c.plan.key: c.plan for c in cases}
    got, excluded = plugin_specs(plans.values())
    assert not excluded, excluded   # every case's plan is served
    return {s.name: s for s in got}


@pytest.fixture(scope="session")
def rendered(cases, specs, tmp_path_factory):
    """The plugin sources of every case's plan, written to a folder, and the imported module."""
    plans = {c.plan.key: c.plan for c in cases}
    entries = {k: aot_entry(s, plans[k].source()) for k, s in specs.items() if s.qdp_reason is None}
    files = render_plugins(list(specs.values()), {}, arch=ARCH, entries=entries,
                           cubins={k: f"{k}.cubin" for k in specs})
    folder = tmp_path_factory.mktemp("family_plugins")
    for name, text in files.items():
        (folder / name).write_text(text)
    spec = importlib.util.spec_from_file_location("family_trt_plugins", folder / PYTHON_MODULE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return folder, module, entries
