"""On-disk cache of compiled kernels, safe for concurrent processes.

Layout: `<root>/<layerforge version>/nvrtc-<major.minor>/<arch>/<key>.{cubin,ptx,cu,json}` where
`key = <readable prefix>-<sha256[:16]>`, the hash covering source, name, options, arch, NVRTC
and layerforge versions. The JSON is written last and holds the checksums of the other files,
so an entry is valid only once complete; a torn or corrupt one is rebuilt.

Contract (after FlashInfer's JIT): look up -> on a miss take a per-key file lock -> look up
again (another process may have built it meanwhile) -> compile -> write atomically. With
`LAYERFORGE_NO_JIT=1` (or `KernelCache(allow_jit=False)`) a miss raises `KernelNotCachedError`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import json
import os
import re
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .. import __version__
from . import nvrtc as _nvrtc
from .nvrtc import CompileOptions, CompileResult, KernelResources

try:
    import fcntl
except ImportError:  # not POSIX: atomic writes still keep entries whole; builds may duplicate
    fcntl = None

FORMAT_VERSION = 1  # bump when the entry layout or key recipe changes
_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]+")

Compiler = Callable[..., CompileResult]
_CORRUPT = object()


@functools.cache
def _header_versions() -> list:
    """The CUDA header versions the compiles include (they change the cubin as NVRTC does);
    empty where none are found (a machine that only reads its cache)."""
    try:
        return [list(_nvrtc.cuda_header_version(d)) for d in _nvrtc.find_cuda_include_dirs()]
    except _nvrtc.NVRTCError:
        return []


def layerforge_version() -> str:
    return __version__   # one definition (layerforge/__init__.py); packs check it too


def default_cache_dir() -> Path:
    if os.environ.get("LAYERFORGE_CACHE_DIR"):
        return Path(os.environ["LAYERFORGE_CACHE_DIR"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(xdg).expanduser() / "layerforge"


def jit_allowed_by_env() -> bool:
    return os.environ.get("LAYERFORGE_NO_JIT", "").strip().lower() in ("", "0", "false", "no")


class KernelNotCachedError(RuntimeError):
    """A kernel was missing from the cache while compiling at run time is forbidden."""


@dataclass
class CacheStats:
    memory_hits: int = 0
    disk_hits: int = 0
    misses: int = 0  # compiles done by this process
    corrupt: int = 0  # entries found damaged and rebuilt


class KernelCache:
    def __init__(self, root: str | os.PathLike | None = None, *, allow_jit: bool | None = None,
                 compiler: Compiler = None):
        self.root = Path(root) if root is not None else default_cache_dir()
        self.allow_jit = allow_jit  # None: follow $LAYERFORGE_NO_JIT at each miss
        self._compile = compiler or _nvrtc.compile_cuda
        self._memory: dict[str, CompileResult] = {}  # key -> result, for repeated lookups
        self.stats = CacheStats()
        # keys this object compiled: stats.misses counts every thread's compiles, so a caller that
        # shares the cache across threads asks `compiled_keys()` about its own kernels instead
        self._compiled: set[str] = set()
        self._stats_lock = threading.Lock()

    # -- keys and paths -------------------------------------------------------------------
    def key(self, source: str, name: str, options: CompileOptions, key_prefix: str | None = None
            ) -> str:
        recipe = json.dumps({
            "format": FORMAT_VERSION, "name": name, "options": dataclasses.asdict(options),
            "arch": options.arch, "nvrtc": _nvrtc.nvrtc_version(), "layerforge": layerforge_version(),
            "headers": _header_versions(),
        }, sort_keys=True)
        digest = hashlib.sha256(recipe.encode() + b"\0" + source.encode()).hexdigest()
        prefix = _UNSAFE.sub("_", key_prefix or name)[:96].strip("_.") or "kernel"
        return f"{prefix}-{digest[:16]}"

    def directory(self, options: CompileOptions) -> Path:
        major, minor = _nvrtc.nvrtc_version()
        return self.root / layerforge_version() / f"nvrtc-{major}.{minor}" / options.arch

    # -- the contract ---------------------------------------------------------------------
    def lookup(self, source: str, name: str, options: CompileOptions, key_prefix: str | None = None,
               *, want_ptx: bool = False) -> CompileResult | None:
        """The cached result, or None; never compiles."""
        key = self.key(source, name, options, key_prefix)
        return self._lookup(key, self.directory(options), options, want_ptx)

    def get_or_compile(self, source: str, name: str, options: CompileOptions,
                       key_prefix: str | None = None, *, want_ptx: bool = False) -> CompileResult:
        key = self.key(source, name, options, key_prefix)
        folder = self.directory(options)
        hit = self._lookup(key, folder, options, want_ptx)
        if hit is not None:
            return hit
        if not (self.allow_jit if self.allow_jit is not None else jit_allowed_by_env()):
            raise KernelNotCachedError(
                f"kernel {key} ({name}, {options.arch}) is not in the cache at {folder} and "
                "compiling at run time is disabled (LAYERFORGE_NO_JIT=1 or allow_jit=False); "
                "build it ahead of time (e.g. `layerforge build`) or allow JIT")
        folder.mkdir(parents=True, exist_ok=True)
        # flock excludes other processes and, through separate open()s, other threads too
        with _file_lock(folder / f"{key}.lock"):
            hit = self._lookup(key, folder, options, want_ptx, final=True)  # built meanwhile?
            if hit is not None:
                return hit
            result = self._compile(source, name, options, want_ptx=want_ptx)
            self._write(key, folder, source, result)
        with self._stats_lock:
            self.stats.misses += 1
            self._compiled.add(key)
        self._memory[key] = result
        return result

    def compiled_keys(self) -> frozenset[str]:
        """The keys of the entries this object compiled (rather than found in the cache) so far."""
        with self._stats_lock:
            return frozenset(self._compiled)

    # -- entries --------------------------------------------------------------------------
    def _lookup(self, key: str, folder: Path, options: CompileOptions, want_ptx: bool,
                final: bool = False) -> CompileResult | None:
        hit = self._memory.get(key)
        if hit is not None and (hit.ptx is not None or not want_ptx):
            self.stats.memory_hits += 1
            return hit
        hit = self._read(key, folder, options)
        if hit is _CORRUPT:
            self.stats.corrupt += final  # counted once, by the lookup that decides to rebuild
            return None
        if hit is None or (want_ptx and hit.ptx is None):  # built without PTX: rebuild with it
            return None
        self.stats.disk_hits += 1
        self._memory[key] = hit
        return hit

    def _read(self, key: str, folder: Path, options: CompileOptions):
        """The entry, None if absent, or _CORRUPT if present but damaged."""
        try:
            text = (folder / f"{key}.json").read_bytes()
        except FileNotFoundError:
            return None
        try:
            meta = json.loads(text)
            cubin = (folder / f"{key}.cubin").read_bytes()
            ptx = (folder / f"{key}.ptx").read_bytes() if meta["ptx_sha256"] else None
            if (meta["key"] != key or _sha(cubin) != meta["cubin_sha256"]
                    or (ptx is not None and _sha(ptx) != meta["ptx_sha256"])):
                return _CORRUPT
            return CompileResult(
                name=meta["name"], options=options, cubin=cubin,
                ptx=ptx.decode() if ptx is not None else None, log=meta["log"],
                resources={k: KernelResources(**v) for k, v in meta["resources"].items()},
                lowered_names=meta["lowered_names"], compile_seconds=meta["compile_seconds"])
        except (OSError, ValueError, KeyError, TypeError):  # ValueError: bad JSON / UTF-8
            return _CORRUPT

    def _write(self, key: str, folder: Path, source: str, result: CompileResult) -> None:
        ptx = result.ptx.encode() if result.ptx is not None else None
        _write_if_changed(folder / f"{key}.cu", source.encode())  # for people, not for lookups
        _atomic_write(folder / f"{key}.cubin", result.cubin)
        if ptx is not None:
            _atomic_write(folder / f"{key}.ptx", ptx)
        meta = {
            "key": key, "name": result.name, "options": dataclasses.asdict(result.options),
            "nvrtc": list(_nvrtc.nvrtc_version()), "layerforge": layerforge_version(),
            "cubin_sha256": _sha(result.cubin), "ptx_sha256": _sha(ptx) if ptx is not None else None,
            "log": result.log, "lowered_names": result.lowered_names,
            "resources": {k: dataclasses.asdict(v) for k, v in result.resources.items()},
            "compile_seconds": result.compile_seconds,
        }
        _atomic_write(folder / f"{key}.json", json.dumps(meta, indent=1).encode())  # commit point


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _atomic_write(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _write_if_changed(path: Path, data: bytes) -> None:
    with contextlib.suppress(OSError):
        if path.read_bytes() == data:
            return
    _atomic_write(path, data)


@contextlib.contextmanager
def _file_lock(path: Path):
    if fcntl is None:
        yield
        return
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # released when closed, also if the process dies
        yield
    finally:
        os.close(fd)


_default: KernelCache | None = None


def default_cache() -> KernelCache:
    """The process-wide cache at `default_cache_dir()` (re-created if that changes)."""
    global _default
    if _default is None or _default.root != default_cache_dir():
        _default = KernelCache()
    return _default
