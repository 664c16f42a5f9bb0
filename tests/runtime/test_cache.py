import hashlib
import json
import multiprocessing
import os
import re
import time
from pathlib import Path

import pytest

import layerforge.runtime.cache as cache_mod
import layerforge.runtime.nvrtc as nvrtc_mod
from layerforge.runtime.cache import KernelCache, KernelNotCachedError, default_cache_dir
from layerforge.runtime.nvrtc import CompileOptions, compile_cuda

from .kernels import SAXPY

SM90 = CompileOptions("sm_90")
PREFIX = "saxpy_n4096_f32_sm90"


class CountingCompiler:
    """compile_cuda that appends one line per compile to a marker file (shared by processes)."""

    def __init__(self, marker: Path, delay: float = 0.0):
        self.marker, self.delay = marker, delay

    def __call__(self, source, name, options, **kwargs):
        with open(self.marker, "a") as f:
            f.write(f"{os.getpid()}\n")
        time.sleep(self.delay)  # widens the window in which a racing process could also compile
        return compile_cuda(source, name, options, **kwargs)

    @property
    def count(self) -> int:
        return len(self.marker.read_text().splitlines()) if self.marker.exists() else 0


@pytest.fixture
def compiler(tmp_path):
    return CountingCompiler(tmp_path / "compiles.txt")


@pytest.fixture
def root(tmp_path):
    return tmp_path / "cache"


def build(root, compiler, options=SM90, source=SAXPY, **kwargs):
    return KernelCache(root, compiler=compiler, **kwargs).get_or_compile(
        source, "saxpy", options, PREFIX)


def entry_files(root, suffix):
    return list(Path(root).rglob(f"*{suffix}"))


# -- hits and misses -------------------------------------------------------------------------

def test_miss_compiles_then_hits_from_disk_and_memory(root, compiler):
    first = KernelCache(root, compiler=compiler)
    built = first.get_or_compile(SAXPY, "saxpy", SM90, PREFIX)
    assert compiler.count == 1 and first.stats.misses == 1

    second = KernelCache(root, compiler=compiler)  # a new process would start like this
    hit = second.get_or_compile(SAXPY, "saxpy", SM90, PREFIX)
    assert compiler.count == 1 and second.stats.disk_hits == 1 and second.stats.misses == 0
    assert hit.cubin == built.cubin and hit.resources == built.resources and hit.log == built.log

    assert second.get_or_compile(SAXPY, "saxpy", SM90, PREFIX) is hit
    assert second.stats.memory_hits == 1


def test_compiled_keys_name_the_entries_this_object_compiled_whatever_the_thread(root, compiler):
    """stats.misses counts every thread's compiles; compiled_keys() says which entries were compiled
    (a build's thread pool asks it about its own kernel)."""
    from concurrent.futures import ThreadPoolExecutor
    sm80 = CompileOptions("sm_80")
    KernelCache(root, compiler=compiler).get_or_compile(SAXPY, "saxpy", sm80, PREFIX)   # on disk already
    cache = KernelCache(root, compiler=compiler)
    with ThreadPoolExecutor(2) as pool:
        list(pool.map(lambda o: cache.get_or_compile(SAXPY, "saxpy", o, PREFIX), [SM90, sm80]))
    assert cache.compiled_keys() == {cache.key(SAXPY, "saxpy", SM90, PREFIX)}
    assert cache.stats.misses == 1 and cache.stats.disk_hits == 1


def test_lookup_never_compiles(root, compiler):
    cache = KernelCache(root, compiler=compiler)
    assert cache.lookup(SAXPY, "saxpy", SM90, PREFIX) is None
    cache.get_or_compile(SAXPY, "saxpy", SM90, PREFIX)
    assert KernelCache(root).lookup(SAXPY, "saxpy", SM90, PREFIX).cubin[:4] == b"\x7fELF"
    assert compiler.count == 1


def test_entries_are_laid_out_by_version_nvrtc_and_arch(root, compiler):
    build(root, compiler)
    major, minor = nvrtc_mod.nvrtc_version()
    folder = root / cache_mod.layerforge_version() / f"nvrtc-{major}.{minor}" / "sm_90"
    names = sorted(p.name for p in folder.iterdir())
    key = names[0].rsplit(".", 1)[0]
    assert re.fullmatch(rf"{PREFIX}-[0-9a-f]{{16}}", key)
    assert names == [f"{key}.{ext}" for ext in ("cu", "cubin", "json", "lock")]
    meta = json.loads((folder / f"{key}.json").read_text())
    assert meta["cubin_sha256"] == hashlib.sha256((folder / f"{key}.cubin").read_bytes()).hexdigest()
    assert (folder / f"{key}.cu").read_text() == SAXPY
    assert not entry_files(root, ".tmp")


def test_ptx_is_cached_on_request_and_an_entry_without_it_is_rebuilt(root, compiler):
    build(root, compiler)
    result = KernelCache(root, compiler=compiler).get_or_compile(SAXPY, "saxpy", SM90, PREFIX,
                                                                 want_ptx=True)
    assert compiler.count == 2 and ".target sm_90" in result.ptx
    again = KernelCache(root, compiler=compiler).get_or_compile(SAXPY, "saxpy", SM90, PREFIX,
                                                                want_ptx=True)
    assert compiler.count == 2 and again.ptx == result.ptx


# -- what the key covers ---------------------------------------------------------------------

def key(**overrides):
    args = dict(source=SAXPY, name="saxpy", options=SM90, key_prefix=PREFIX) | overrides
    return KernelCache("/unused").key(**args)


def test_key_is_stable_and_readable():
    assert key() == key()
    assert key().startswith(PREFIX + "-")
    assert key(key_prefix="add rms/norm h4096").startswith("add_rms_norm_h4096-")


@pytest.mark.parametrize("change", [
    dict(source=SAXPY + "\n// edited\n"),
    dict(name="saxpy2"),
    dict(options=CompileOptions("sm_80")),
    dict(options=CompileOptions("sm_90a")),
    dict(options=CompileOptions("sm_90", use_fast_math=True)),
    dict(options=CompileOptions("sm_90", max_registers=64)),
    dict(options=CompileOptions("sm_90", extra=("-DX=1",))),
])
def test_key_changes_with_every_input(change):
    assert key(**change) != key()


def test_key_changes_with_nvrtc_version(monkeypatch):
    before = key()
    monkeypatch.setattr(nvrtc_mod, "nvrtc_version", lambda: (99, 1))
    assert key() != before
    assert "nvrtc-99.1" in str(KernelCache("/c").directory(SM90))


def test_key_changes_with_layerforge_version(monkeypatch):
    before = key()
    monkeypatch.setattr(cache_mod, "layerforge_version", lambda: "9.9.9")
    assert key() != before
    assert KernelCache("/c").directory(SM90).parts[2] == "9.9.9"


# -- concurrency -----------------------------------------------------------------------------

def _build_in_child(root, marker, barrier, results):
    cache = KernelCache(root, compiler=CountingCompiler(marker, delay=0.5))
    barrier.wait()  # all processes ask at once
    result = cache.get_or_compile(SAXPY, "saxpy", SM90, PREFIX)
    results.put(hashlib.sha256(result.cubin).hexdigest())


# fork is cheap and needs no importable target; the children touch only NVRTC and files, so
# Python's warning about forking a process that has threads (torch's, CUDA's) does not apply.
@pytest.mark.filterwarnings("ignore:This process .* is multi-threaded:DeprecationWarning")
def test_processes_racing_for_one_kernel_compile_it_once(root, compiler):
    ctx = multiprocessing.get_context("fork")
    n = 4
    barrier, results = ctx.Barrier(n), ctx.Queue()
    procs = [ctx.Process(target=_build_in_child, args=(root, compiler.marker, barrier, results))
             for _ in range(n)]
    for p in procs:
        p.start()
    digests = [results.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    assert compiler.count == 1
    assert len(set(digests)) == 1
    assert digests[0] == hashlib.sha256(entry_files(root, ".cubin")[0].read_bytes()).hexdigest()


# -- damaged entries -------------------------------------------------------------------------

def _truncate_cubin(root):
    f = entry_files(root, ".cubin")[0]
    f.write_bytes(f.read_bytes()[:100])


def _flip_a_cubin_byte(root):
    f = entry_files(root, ".cubin")[0]
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0xFF
    f.write_bytes(bytes(data))


def _delete_cubin(root):
    entry_files(root, ".cubin")[0].unlink()


def _garble_metadata(root):
    f = entry_files(root, ".json")[0]
    f.write_text(f.read_text()[:40])


@pytest.mark.parametrize("damage", [_truncate_cubin, _flip_a_cubin_byte, _delete_cubin,
                                    _garble_metadata])
def test_damaged_entry_is_detected_and_rebuilt(root, compiler, damage):
    good = build(root, compiler).cubin
    damage(root)
    cache = KernelCache(root, compiler=compiler)
    rebuilt = cache.get_or_compile(SAXPY, "saxpy", SM90, PREFIX)
    assert compiler.count == 2 and cache.stats.corrupt == 1
    assert rebuilt.cubin == good
    assert entry_files(root, ".cubin")[0].read_bytes() == good  # repaired on disk
    assert KernelCache(root).lookup(SAXPY, "saxpy", SM90, PREFIX).cubin == good


# -- no JIT ----------------------------------------------------------------------------------

def test_no_jit_env_raises_on_miss_and_serves_hits(root, compiler, monkeypatch):
    monkeypatch.setenv("LAYERFORGE_NO_JIT", "1")
    with pytest.raises(KernelNotCachedError, match="LAYERFORGE_NO_JIT") as info:
        build(root, compiler)
    assert PREFIX in str(info.value)
    assert compiler.count == 0

    monkeypatch.delenv("LAYERFORGE_NO_JIT")
    built = build(root, compiler)
    monkeypatch.setenv("LAYERFORGE_NO_JIT", "1")
    assert build(root, compiler).cubin == built.cubin
    assert compiler.count == 1


@pytest.mark.parametrize("value", ["0", "", "false"])
def test_no_jit_env_off_values_allow_compiling(root, compiler, monkeypatch, value):
    monkeypatch.setenv("LAYERFORGE_NO_JIT", value)
    build(root, compiler)
    assert compiler.count == 1


def test_allow_jit_flag_overrides_the_environment(root, compiler, monkeypatch):
    with pytest.raises(KernelNotCachedError):
        build(root, compiler, allow_jit=False)
    monkeypatch.setenv("LAYERFORGE_NO_JIT", "1")
    build(root, compiler, allow_jit=True)
    assert compiler.count == 1


# -- where the cache lives -------------------------------------------------------------------

def test_cache_dir_prefers_layerforge_env_then_xdg_then_home(monkeypatch, tmp_path):
    monkeypatch.setenv("LAYERFORGE_CACHE_DIR", str(tmp_path / "lf"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == tmp_path / "lf"
    monkeypatch.delenv("LAYERFORGE_CACHE_DIR")
    assert default_cache_dir() == tmp_path / "xdg" / "layerforge"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_cache_dir() == tmp_path / "home" / ".cache" / "layerforge"


def test_default_cache_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("LAYERFORGE_CACHE_DIR", str(tmp_path / "a"))
    assert cache_mod.default_cache().root == tmp_path / "a"
    assert cache_mod.default_cache() is cache_mod.default_cache()
    monkeypatch.setenv("LAYERFORGE_CACHE_DIR", str(tmp_path / "b"))
    assert cache_mod.default_cache().root == tmp_path / "b"
