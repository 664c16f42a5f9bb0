"""Measured work splits: the table the product planner reads before its rules.

    entry = lookup("gemv", arch="sm_90", dtype="bf16", wtype="u4", group=128, gated=None, n=6144, k=4096, bucket=16)
    entry -> {"rt": 2, "warps": 4, "stages": 3} or None
    lookup("route", arch="sm_90", dtype="bf16", wtype=None, group=0, gated=None, n=4096, k=4096, bucket=16)
    -> {"cublas": 1} where torch's product measured faster than the kernel ({"cublas": 0}: a card that measured
       the kernel faster where another card's route exists), else None
    lookup("gemm", arch="sm_90a", dtype="bf16", wtype=None, group=0, gated=None, n=10576, k=2560, bucket=64)
    -> {"wgmma": 1, "tail": 16, "bn": 256} where the Hopper GEMM measured faster than torch's product past 16 rows

codegen/gemv.plan_gemv's default split (rt, warps, stages) comes from rules written from sweeps on
one card. Where a table holds a split measured faster for the exact problem (family, arch, dtype,
weight type and group, gated activation, N, K, the plan's token bucket), the planner takes it
instead. `layerforge tune` (runtime/tune.py) measures the splits on the machine's GPU, each against
the rules' plan in the same run, and records a split only where it beat that plan by a margin; where
the rules' plan wins it removes the problem's entry, so a table never makes a product slower than the
rules as measured on that card. Where torch's product (cuBLAS, with the epilogue in torch) beat every split,
it records a "route" entry too, and runtime/linear.gemv then sends those calls to torch: a table never
makes a product slower than the better of the two as measured.

Tables are JSON files, {"version": 1, "entries": [...]}, each entry the key's fields, "split"
(the plan's fields), and what was measured ("us", "rules_us", "device", "date", "command"). An entry is a
measurement on one card, its "device" (torch.cuda.get_device_name: "NVIDIA H100 80GB HBM3" and "NVIDIA H200" are
both sm_90, with other bandwidths and clocks). Where the runtime plans for a GPU it tells the tables which card an
arch is (note_device; runtime/launch.device_arch does), and a problem takes the entry measured on that card, or
one that names no device (of those, the one read last); only where neither exists does another card's entry of the
arch serve (a sibling's measurement, a better guess than rules never timed at that shape). `layerforge tune` on a
card records that card's own entry: where the rules win there and another entry of the problem with another split
would serve it (another card's, or this card's in another table read beside the one written: the packaged table's
under a user's table), it records the rules' split for its card (so that one no longer does), else it removes its
card's entry (split_without). Planned without a GPU (a build on a CPU machine for an arch, or a process with two
cards of one arch), the card is unknown and the entry read last of any card serves. Read in order, a later entry
replacing an earlier one of the same key and card:
  1. the packaged table, codegen/tables/products.json (splits measured on the cards its entries name);
  2. the user's, <cache dir>/tuning/products.json (runtime/cache.default_cache_dir), which
     `layerforge tune` writes by default;
  3. LAYERFORGE_TUNING_TABLE, a path (one more table, e.g. a pack's; a path that is not a file is an error).
LAYERFORGE_TUNING=0 reads none: the rules alone. An entry whose split a problem's plan cannot take
(a norm prologue's extra shared-memory row past the budget, say) is passed over for the rules.
"""
from __future__ import annotations

import datetime
import functools
import json
import os
from pathlib import Path
from typing import Any

__all__ = ["TABLE_VERSION", "PACKAGED_TABLE", "user_table_path", "table_paths", "lookup", "problem_key", "read_table",
           "write_entry", "remove_entry", "clear_cache", "generation", "SPLIT_FIELDS", "note_device", "device_for",
           "split_without"]

TABLE_VERSION = 1
PACKAGED_TABLE = Path(__file__).resolve().parent / "tables" / "products.json"
KEY_FIELDS = ("family", "arch", "dtype", "wtype", "group", "gated", "n", "k", "bucket")
# gemv: the small-token kernel's work split; route: {"cublas": 1} where torch's product (cuBLAS, the epilogue in torch)
# was measured faster than every split of the kernel (runtime/linear.torch_route; bf16 / f16 weights, no norm prologue;
# 0: not, on a card where another card's route is read)
# gemm_stream: the decode-range GEMM's (codegen/gemm_stream.py; u4 / i8 at 17-128 rows), packed 0 / 1; gemv_x8: the
# small-token kernel's over x quantised beforehand (f8e4m3 W, x e4m3: runtime/quant.fp8_gemv, the W8A8 layer's path);
# fp8_path: the W8A8 layer's path where measured against runtime/quant.FP8_REGISTER_MAX_ROWS's rule, x_first 1 (x
# quantised by the row kernel first) or 0 (in the product's registers) (runtime/tune.tune_fp8_paths);
# gemm: past 16 rows on sm_90, bf16 / f16 weights, the Hopper GEMM (codegen/gemm.py) where measured faster than
# torch's product at the row bucket (32, 64, ... rows): wgmma 1, its last round's tiles split in at most `tail` K parts
# (0: not split; runtime/linear.GEMM_TABLE_VARIANTS), tile width bn; wgmma 0 (tail, bn 0): torch's product, on a card
# where another card's entry is read (runtime/tune.tune_gemm, runtime/linear.gemm_table_route)
SPLIT_FIELDS = {"gemv": ("rt", "warps", "stages"), "gemv_x8": ("rt", "warps", "stages"), "route": ("cublas",),
                "gemm_stream": ("rb", "cw", "stages", "ctas", "ka", "packed"), "fp8_path": ("x_first",),
                "gemm": ("wgmma", "tail", "bn")}
_GENERATION = [0]   # bumped whenever the tables read are forgotten (callers caching lookups key on it)
_DEVICES: dict[str, set[str]] = {}   # arch (no "a" suffix) -> the names of the cards the runtime planned for


def _base_arch(arch: str) -> str:
    return arch[:-1] if arch.endswith("a") else arch


def note_device(arch: str, name: str) -> None:
    """The runtime plans for a card `name` of `arch` in this process: lookups of that arch take the entries
    measured on it (the module's docstring). A second card's name for one arch makes the card unknown again."""
    names = _DEVICES.setdefault(_base_arch(arch), set())
    if name not in names:
        names.add(name)
        _GENERATION[0] += 1   # cached lookups (runtime/linear.torch_route) were taken for another card


def device_for(arch: str) -> str | None:
    """The card the runtime plans `arch` for in this process (note_device), or None where it is unknown (no GPU
    planned for yet, or two cards of the arch)."""
    names = _DEVICES.get(_base_arch(arch), ())
    return next(iter(names)) if len(names) == 1 else None


def user_table_path() -> Path:
    """The table `layerforge tune` writes by default: <cache dir>/tuning/products.json."""
    from ..runtime.cache import default_cache_dir
    return default_cache_dir() / "tuning" / "products.json"


def table_paths() -> list[Path]:
    """The tables lookup reads, in order (a later entry of a key replaces an earlier one); none where
    LAYERFORGE_TUNING=0."""
    from .plan import env_switch
    if not env_switch("LAYERFORGE_TUNING", True):
        return []
    paths = [PACKAGED_TABLE, user_table_path()]
    extra = os.environ.get("LAYERFORGE_TUNING_TABLE", "").strip()
    if extra:
        path = Path(extra).expanduser()
        if not path.is_file():   # a misspelt path is an error, not a table silently left out
            raise ValueError(f"LAYERFORGE_TUNING_TABLE={extra!r}: no such file")
        paths.append(path)
    return paths


def problem_key(family: str, *, arch: str, dtype: str, wtype: str | None, group: int, gated: str | None, n: int,
                k: int, bucket: int) -> tuple:
    """The key of one problem: what the planner knows when it picks a split."""
    if family not in SPLIT_FIELDS:
        raise ValueError(f"tuning: no table for the {family!r} family (known: {sorted(SPLIT_FIELDS)})")
    return (family, arch, dtype, wtype, int(group), gated, int(n), int(k), int(bucket))


def _entry_key(e: dict) -> tuple:
    return problem_key(e["family"], **{f: e.get(f) for f in KEY_FIELDS[1:]})


def _entry_card(e: dict) -> str:
    """The card an entry was measured on ("" where it names none: an entry for every card)."""
    return str(e.get("device") or "")


def read_table(path: Path) -> list[dict]:
    """A table's entries (none where the file does not exist); an unreadable table, a table of another
    version or an entry missing a field is an error naming the file (a table is data the planner trusts)."""
    path = Path(path)
    if not path.exists():
        return []
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: not a tuning table ({e})") from None
    if not isinstance(data, dict) or data.get("version") != TABLE_VERSION or not isinstance(data.get("entries"), list):
        raise ValueError(f"{path}: a tuning table is {{'version': {TABLE_VERSION}, 'entries': [...]}}")
    for i, e in enumerate(data["entries"]):
        missing = [f for f in (*KEY_FIELDS, "split") if f not in e]
        fields = SPLIT_FIELDS.get(e.get("family"))
        if missing or fields is None or sorted(e["split"]) != sorted(fields) or not all(
                isinstance(e["split"][f], int) and not isinstance(e["split"][f], bool) and e["split"][f] >= 0
                for f in fields):
            raise ValueError(f"{path}: entry {i} is not a split of a known family (needs {list(KEY_FIELDS)} and a "
                             f"'split' of non-negative ints: {fields}): {e}")
    return data["entries"]


def _merge(paths, keep=None) -> dict[tuple, dict[str, dict]]:
    """key -> {card: split} over the tables at `paths` (those entries e of table p where keep(p, e), if given), each
    key's cards in the order last read (a later entry of a key and card moves it last)."""
    table: dict[tuple, dict[str, dict]] = {}
    for p in paths:
        for e in read_table(p):
            if keep is not None and not keep(p, e):
                continue
            cards = table.setdefault(_entry_key(e), {})
            cards.pop(_entry_card(e), None)
            cards[_entry_card(e)] = dict(e["split"])
    return table


@functools.cache
def _merged(paths: tuple[Path, ...]) -> dict[tuple, dict[str, dict]]:
    """_merge of every entry of the tables at `paths`, kept until clear_cache."""
    return _merge(paths)


def _pick(by_card: dict[str, dict], card: str | None) -> dict:
    """A problem's split for `card` from its {card: split} (non-empty): that card's entry or one naming none (the one
    read last), else another card's (the one read last); with no card (None), the entry read last of any."""
    mine = [split for c, split in by_card.items() if card is None or c in (card, "")]
    return dict(mine[-1] if mine else list(by_card.values())[-1])


def clear_cache() -> None:
    """Forget the tables read so far (after a table is written, or the environment changed)."""
    _merged.cache_clear()
    _GENERATION[0] += 1


def generation() -> int:
    """A number that changes whenever clear_cache runs: a cache of lookups keyed on it stays true to the tables."""
    return _GENERATION[0]


def lookup(family: str, *, device: str | None = None, **key: Any) -> dict | None:
    """The measured split of the problem (problem_key's fields) for the card `device` (default: the one the runtime
    plans key["arch"] for, device_for): that card's entry or one naming none, else another card's; None where no
    table has the problem. With no card known, the entry read last of any card (the module's docstring)."""
    paths = tuple(table_paths())
    if not paths:
        return None
    by_card = _merged(paths).get(problem_key(family, **key))
    if not by_card:
        return None
    return _pick(by_card, device if device is not None else device_for(key["arch"]))


def split_without(family: str, card: str, *, table: Path, **key: Any) -> dict | None:
    """The split a lookup for `card` would take were `table`'s own entry of the problem for `card` gone: an entry
    naming none, else another card's (from the tables read and `table`), and, where `table` is among the tables read
    (the user's table, LAYERFORGE_TUNING_TABLE's), this card's entry in another of them (the packaged table's, read
    beside it); None where no such entry is left. A `table` not read here (one written to ship as the packaged table,
    or to point at later) does not count this card's entries elsewhere: it is to replace them, or they it."""
    read = [Path(p) for p in table_paths()]
    table = Path(table)
    paths = read if table in read else [*read, table]
    pk = problem_key(family, **key)

    def keep(p: Path, e: dict) -> bool:
        return _entry_key(e) == pk and not (_entry_card(e) == card and (Path(p) == table or table not in read))
    by_card = _merge(paths, keep).get(pk)
    return _pick(by_card, card) if by_card else None


def _write(path: Path, entries: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    entries = sorted(entries, key=lambda e: tuple(str(v) for v in _entry_key(e)))
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"version": TABLE_VERSION, "entries": entries}, indent=1) + "\n")
    os.replace(tmp, path)   # readers see the old table or the new one, never half of one
    clear_cache()


def write_entry(path: Path, family: str, split: dict, measured: dict | None = None, **key: Any) -> dict:
    """Record `split` for the problem in the table at `path` (created if missing), replacing the key's
    entry; `measured` (times, device, command) is kept beside it for the reader."""
    fields = SPLIT_FIELDS[family]
    if sorted(split) != sorted(fields):
        raise ValueError(f"tuning: a {family} split has the fields {fields}, got {sorted(split)}")
    k = problem_key(family, **key)
    entry = dict(zip(KEY_FIELDS, k)) | {"split": {f: int(split[f]) for f in fields}}
    entry |= {"date": datetime.date.today().isoformat()} | dict(measured or {})
    card = _entry_card(entry)   # the card's entry of the key is replaced, another card's kept
    entries = [e for e in read_table(path) if (_entry_key(e), _entry_card(e)) != (k, card)] + [entry]
    _write(Path(path), entries)
    return entry


def remove_entry(path: Path, family: str, *, device: str | None = None, **key: Any) -> bool:
    """Drop the problem's entry measured on the card `device` ("": the entry that names none; None: every card's)
    from the table at `path`; whether there was one."""
    k = problem_key(family, **key)
    entries = read_table(path)
    kept = [e for e in entries if _entry_key(e) != k or (device is not None and _entry_card(e) != device)]
    if len(kept) == len(entries):
        return False
    _write(Path(path), kept)
    return True
