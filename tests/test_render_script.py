"""scripts/render_tc_attention.py (the tensor-core attention sources of a tree, one file a plan key, for diffing two
trees): it renders the narrowed set, the same bytes twice, every fp8 form among them (CPU only, nothing compiled)."""
import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def load():
    spec = importlib.util.spec_from_file_location("render_tc_attention", ROOT / "scripts" / "render_tc_attention.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_renders_the_same_sources_twice(tmp_path):
    mod = load()
    args = ["--layers", "llama_attn", "--dims", "128"]
    assert mod.main([str(tmp_path / "a"), *args]) == 0 and mod.main([str(tmp_path / "b"), *args]) == 0
    a = sorted(p.name for p in (tmp_path / "a").glob("*.cu"))
    assert a == sorted(p.name for p in (tmp_path / "b").glob("*.cu")) and len(a) > 20
    assert all((tmp_path / "a" / n).read_bytes() == (tmp_path / "b" / n).read_bytes() for n in a)
    keys = " ".join(a)
    assert "sm80" in keys and "sm90" in keys and "decode" in keys and "prefill" in keys and "fp8" in keys.lower()
