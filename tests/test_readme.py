"""Every ```python block of README.md runs as written, in order, in one namespace (later
blocks use what earlier ones defined), on the CPU: layerforge modules run the reference
evaluator behind CPU tensors. A block whose first line is `# needs: REQ[, REQ...]` runs only
where each requirement holds: `cuda` (a CUDA GPU) or a path relative to the repository root
that must exist (e.g. a built pack); elsewhere it is skipped, with the reason."""
from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
FENCE = re.compile(r"^```python[ \t]*\n(.*?)^```[ \t]*$", re.S | re.M)


def python_blocks(text: str) -> list[tuple[int, str]]:
    """(line number, code) of each ```python block."""
    return [(text[:m.start()].count("\n") + 1, m.group(1)) for m in FENCE.finditer(text)]


def unmet(code: str) -> list[str]:
    first = code.lstrip().splitlines()[0] if code.strip() else ""
    m = re.match(r"#\s*needs:\s*(.*)", first)
    if not m:
        return []
    reqs = [r.split("(")[0].strip() for r in m.group(1).split(",")]
    out = []
    for r in filter(None, reqs):
        if r == "cuda":
            if not torch.cuda.is_available():
                out.append("a CUDA GPU")
        elif not (ROOT / r).exists():
            out.append(f"{r} (not built)")
    return out


def test_readme_has_python_blocks():
    blocks = python_blocks(README.read_text())
    assert len(blocks) >= 2
    # the DSL tour is not Python: it is fenced as `lf`, not `python`
    assert not any(code.lstrip().startswith(("dims ", "layer ")) for _, code in blocks)


def test_needs_marker_parsing():
    assert unmet("x = 1\n") == []
    assert unmet("# needs: no/such/dir (built by x)\n") == ["no/such/dir (not built)"]


BLOCKS = python_blocks(README.read_text())


@pytest.fixture(scope="module")
def namespace(tmp_path_factory):
    """One namespace for all blocks, run in the README's order, from the repository root."""
    old = os.getcwd()
    os.chdir(ROOT)
    saved = os.environ.get("LAYERFORGE_CACHE_DIR")
    os.environ.setdefault("LAYERFORGE_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))
    torch.manual_seed(0)
    yield {"__name__": "__readme__"}
    os.chdir(old)
    if saved is None:
        os.environ.pop("LAYERFORGE_CACHE_DIR", None)


@pytest.mark.parametrize("line,code", BLOCKS, ids=[f"line{line}" for line, _ in BLOCKS])
def test_readme_python_block_runs(namespace, line, code):
    missing = unmet(code)
    if missing:
        pytest.skip(f"README.md:{line} needs {', '.join(missing)}")
    # the blocks before this one first, where this process has not run them (pytest-xdist may hand a
    # block to a worker that did not get the ones before it)
    done = namespace.setdefault("__readme_done__", set())
    for earlier, code_before in BLOCKS:
        if earlier < line and earlier not in done and not unmet(code_before):
            exec(compile(code_before, f"README.md:{earlier}", "exec"), namespace)
            done.add(earlier)
    exec(compile(code, f"README.md:{line}", "exec"), namespace)
    done.add(line)
