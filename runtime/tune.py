"""Tuning the small-token products on this machine's GPU: `layerforge tune`.

    results = tune_products(model_products("config.json"), tokens=(1, 8, 16), wtype="u4", group=128)

For every product of a model (q/k/v, o, gate/up with its gated activation, down, lm_head) and every
token bucket its calls fall in, each work split of the small-token kernel (codegen/gemv.py: 16-row
column tiles a CTA, warps, ring stages) that compiles without spills is timed beside the plan the
rules give (plan_gemv(..., tuned=False)), in the same run, on cold weights: each timed graph cycles
through enough copies of W that none of it is in L2 when read, as in a model's step, where a
layer's weights are read once. A split that beats the rules' plan by more than `margin` is written
to the tuning table (codegen/tuning.py; by default the user's, which plan_gemv reads from then
on); where none does, the problem's entry is removed, so the table holds only measured wins. For bf16 / f16
weights torch's product (cuBLAS, the epilogue in torch) is timed too, and where it beats every split a "route"
entry sends those calls to torch (runtime/linear.torch_route). Past 16 rows on an sm_90 GPU (`--gemm-rows`,
tune_gemm) the Hopper GEMM's variants and tile widths are timed against torch's product, and a "gemm" entry sends
a row bucket's calls to the Hopper GEMM only where it won (runtime/linear.gemm_table_route).
"""
from __future__ import annotations

import itertools
import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

__all__ = ["graph_time", "cold_copy_count", "model_products", "parse_products", "tune_products", "tune_stream",
           "tune_gemm", "gemm_candidates", "DEFAULT_GEMM_ROWS",
           "TuneResult", "CANDIDATES", "STREAM_CANDIDATES", "DEFAULT_TOKENS", "DEFAULT_STREAM_ROWS", "cli_tune",
           "parse_weights", "WEIGHTS", "tune_fp8_paths"]

DEFAULT_TOKENS = (1, 8, 16)
TORCH = "torch"   # what a measure times for torch's product (bf16 / f16 weights)
# (16-column tiles a CTA, warps, stages): what the sweeps in benchmarks/bench_gemv.py time
CANDIDATES = {None: tuple(itertools.product((1, 2), (2, 4, 8), (3, 4, 6))),
              "quant": tuple(itertools.product((1, 2, 4), (2, 4, 8, 16), (2, 3, 4, 6)))}


WARM_S = 0.05   # graph_time's untimed replays before the timed ones (seconds)


def graph_time(fn, calls: int = 20, replays: int = 10) -> float:
    """Seconds per call of `fn`, the median over `replays` replays of a CUDA graph of `calls` calls. `fn` may be a
    list of callables (the same product on different copies of its weights, see cold_copy_count): the graph
    calls them in turn, so each call reads weights the calls before it did not bring into L2."""
    import torch
    fns = list(fn) if isinstance(fn, (list, tuple)) else [fn]
    calls = len(fns) * -(-calls // len(fns))
    for f in fns:
        f()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for i in range(calls):
            fns[i % len(fns)]()
    # replays until WARM_S have passed before any is timed: after seconds of an idle GPU (compiles, weights
    # quantised on the host) the first ~10-20 ms of work ran up to 18 % slow on an H100 (its clocks climbing, as we
    # read it; not profiled), and the median of 10 replays of a 2 ms graph fell inside that (benchmarks/NOTES.md,
    # "The tune's first timing")
    t0 = time.perf_counter()
    while True:
        g.replay()
        torch.cuda.synchronize()
        if time.perf_counter() - t0 >= WARM_S:
            break
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(replays):
        start.record()
        g.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3 / calls)
    return sorted(times)[len(times) // 2]


def cold_copy_count(nbytes: int, device=None) -> int:
    """How many copies of a product's weights (`nbytes` each) a timed graph cycles through so that L2 holds none of
    a copy when it is read again (3 x L2 of other bytes between two reads of one copy); at most 32."""
    import torch
    l2 = torch.cuda.get_device_properties(device).L2_cache_size
    return min(32, max(1, -(-3 * l2 // max(1, nbytes))))


def model_products(config) -> list[tuple[str, int, int, str | None]]:
    """(name, N, K, gated activation or None) of each distinct product a model's decoder layer and lm_head run,
    from a Hugging Face config (dict, path or object: models/families.spec_from_config)."""
    from ..codegen.gemv import GATED
    from ..models.families import canonical_shapes, spec_from_config
    spec = spec_from_config(config)
    shapes = canonical_shapes(spec)
    if getattr(spec, "tie_word_embeddings", False) and "embed.weight" in shapes and "lm_head.weight" not in shapes:
        shapes["lm_head.weight"] = shapes["embed.weight"]   # the tied head: the embedding's rows
    out: dict[tuple, str] = {}
    for name, shape in shapes.items():
        if len(shape) != 2 or not name.endswith(".weight") or name.startswith(("embed", "pos_embed")):
            continue
        if name.startswith("layers.") and not name.startswith("layers.0."):
            continue
        short = name.removeprefix("layers.0.").removesuffix(".weight")
        if short.endswith((".gate", "shared_expert_gate")) or shape[0] < 64:
            continue   # a MoE router's or a shared expert's gate logits: a few outputs, not a weight stream
        gated = spec.activation if short.endswith("gate_up") and spec.gated else None
        if gated is not None and gated not in GATED:
            continue   # the kernel's epilogue has no such activation: the product runs without it
        out.setdefault((shape[0], shape[1], gated), short)
    return [(name, n, k, g) for (n, k, g), name in out.items()]


def parse_products(text: str) -> list[tuple[str, int, int, str | None]]:
    """'N:K[:act],...' (e.g. '6144:4096,28672:4096:silu') as model_products gives them."""
    out = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        f = part.split(":")
        if len(f) not in (2, 3) or not all(v.isdigit() for v in f[:2]):
            raise ValueError(f"tune: a product is N:K[:activation], got {part!r}")
        out.append((part, int(f[0]), int(f[1]), f[2] if len(f) == 3 else None))
    return out


@dataclass
class TuneResult:
    """One problem's measurement: the rules' plan and the fastest split, us, and whether the table now has it."""
    name: str
    n: int
    k: int
    gated: str | None
    wtype: str | None
    bucket: int
    rules: dict
    rules_us: float
    best: dict
    best_us: float
    recorded: bool
    timings: dict = field(default_factory=dict)   # "r{rt}w{warps}s{stages}" -> us
    torch_us: float | None = None                 # torch's product (bf16 / f16 weights; stream: bf16 cuBLAS)
    torch_route: bool = False                     # recorded: torch's product beat every split by the margin
    label: Callable = field(default=None, repr=False)   # a split's short name
    peer: str = "torch"
    kind: str | None = None                       # the weights' name in the line (default: wtype, or bf16)

    def line(self) -> str:
        name = self.label or _label
        kind = self.kind or self.wtype or "bf16"
        verdict = "recorded" if self.recorded else "rules kept"
        peer = "" if self.torch_us is None else (
            f"  {self.peer} {self.torch_us:8.2f} us ({self.torch_us / self.best_us:.3f}x ours)"
            + ("  -> torch's product" if self.torch_route else ""))
        return (f"{self.name:14s} {kind:5s} {self.bucket:>3d} rows  rules {name(self.rules)} {self.rules_us:8.2f} us"
                f"  best {name(self.best)} {self.best_us:8.2f} us  ({self.rules_us / self.best_us:.3f}x)  {verdict}"
                + peer)


def _label(split: dict) -> str:
    return f"r{split['rt']}w{split['warps']}s{split['stages']}"


def _split(plan) -> dict:
    return {"rt": plan.rt, "warps": plan.warps, "stages": plan.stages}


class _GpuMeasure:
    """Times gemv plans of one problem on the GPU (cold weights, `rows` rows of x); None for a plan that spills."""

    def __init__(self, n, k, gated, rows, dtype, wtype, group, device, x_e4m3=False):
        import torch
        from .quant import QuantLinear, quantize_fp8_rows_cuda
        tdt = torch.bfloat16 if dtype == "bf16" else torch.float16
        self.device, self.rows, self.gated = device, rows, gated
        w = (torch.randn(n, k, device=device) / k ** 0.5).to(tdt)
        if wtype is None:
            ws = [w] + [w.clone() for _ in range(cold_copy_count(w.numel() * w.element_size(), device) - 1)]
            self.weights = [[wi] for wi in ws]
        else:
            first = QuantLinear.from_float(w, group, wtype=wtype)
            count = cold_copy_count(first.qw.nbytes(), device)
            self.weights = [first.qw.kernel_tensors] + [
                QuantLinear.from_float(w, group, wtype=wtype).qw.kernel_tensors for _ in range(count - 1)]
        self.x = torch.randn(rows, k, device=device, dtype=tdt)
        # x quantised beforehand (the W8A8 layer's path past 8 rows, runtime/quant.fp8_gemv): its e4m3 bytes and scales
        # a token and 128 k, as quantize_fp8_rows_cuda makes them; the quantiser's own time is not the split's
        self.xq = quantize_fp8_rows_cuda(self.x) if x_e4m3 else None
        self.y = torch.empty(rows, n // 2 if gated else n, device=device, dtype=tdt)

    def __call__(self, plan, spills_ok: bool = False) -> float | None:
        from .launch import compile_plan, load_kernels
        if plan == TORCH:   # torch's product (cuBLAS) with the same epilogue, as gemv runs it (linear._torch_product)
            from .linear import _torch_product
            x, gated = self.x, self.gated
            return graph_time([lambda ts=ts: _torch_product(x, ts[0], None, gated, None) for ts in self.weights])
        res = compile_plan(plan)
        if not spills_ok and any(r.spill_stores or r.spill_loads for r in res.resources.values()):
            return None
        launch = load_kernels(res.cubin, plan.kernels, self.device)[plan.kernel_name]
        x, y, m = self.x, self.y, self.rows
        if self.xq is not None:
            q, s = self.xq
            return graph_time([lambda ts=ts: launch((), [q, *ts, s, y, m]) for ts in self.weights])
        return graph_time([lambda ts=ts: launch((), [x, *ts, y, m]) for ts in self.weights])


def tune_products(products: Iterable[tuple[str, int, int, str | None]], *, tokens: Iterable[int] = DEFAULT_TOKENS,
                  dtype: str = "bf16", wtype: str | None = None, group: int = 128, arch: str | None = None,
                  table: str | Path | None = None, margin: float = 0.03, write: bool = True,
                  candidates: Iterable[tuple[int, int, int]] | None = None, measure_factory: Callable | None = None,
                  command: str | None = None, device_name: str | None = None, x_e4m3: bool = False,
                  log=print) -> list[TuneResult]:
    """Time each product's splits at each token bucket against the rules' plan (the module's docstring) and
    record the winners in `table` (default: codegen/tuning.user_table_path()); write=False measures only.
    x_e4m3 (f8e4m3 W): the kernel over x quantised beforehand (a token and 128 k: the W8A8 layer's path past 8 rows,
    runtime/quant.fp8_gemv), recorded as the "gemv_x8" family; else x quantised in the kernel's registers (the path
    of calls up to 8 rows, of a norm prologue, and of every call with LAYERFORGE_FP8_QUANT_X_FIRST=0), the "gemv"
    family as u4's.
    measure_factory(n, k, gated, rows) -> measure(plan, spills_ok=False) -> seconds or None (a plan that spills,
    unless spills_ok: the rules' plan is timed as it runs; measure(TORCH): torch's product) replaces the GPU's timing
    (tests); then `arch` must be given."""
    from ..codegen import tuning
    from ..codegen.gemv import token_bucket
    if wtype not in (None, "u4", "i8", "f8e4m3"):
        raise ValueError(f"tune: weights bf16 (None), 'u4', 'i8' or 'f8e4m3', got {wtype!r}")
    if margin < 0:
        raise ValueError(f"tune: margin must be >= 0, got {margin}")
    if wtype == "f8e4m3" and group not in (0, 128):
        raise ValueError(f"tune: f8e4m3 weights have one scale a row (group 0) or 128 x 128 blocks (128), got {group}")
    group = 0 if wtype in (None, "i8") else group
    if x_e4m3 and wtype != "f8e4m3":
        raise ValueError(f"tune: x quantised beforehand (x_e4m3) is the f8e4m3 weights' path, not {wtype or 'bf16'}'s")
    xq = {}
    if x_e4m3:   # x's scales a token and 128 k, as quantize_fp8_rows_cuda makes them on the layer's path
        from .quant import FP8_BLOCK
        xq = dict(x_e4m3=True, x_group=FP8_BLOCK)
    family = "gemv_x8" if x_e4m3 else "gemv"
    gpu = measure_factory is None
    if gpu:
        device, arch, device_name = _this_gpu(arch, device_name)

        def measure_factory(n, k, gated, rows):
            return _GpuMeasure(n, k, gated, rows, dtype, wtype, group, device, x_e4m3)
    elif arch is None:
        raise ValueError("tune: a measure_factory needs the arch its plans are for")
    table = Path(table) if table is not None else tuning.user_table_path()
    cands = tuple(candidates) if candidates is not None else CANDIDATES["quant" if wtype else None]
    buckets = sorted({token_bucket(t, wtype) for t in tokens})
    products = list(products)
    if gpu:   # every plan compiled first, a process a core (hundreds of plans; the timing loop then loads them)
        _precompile([p for _, n, k, gated in products for bucket in buckets
                     for p in _plans(dtype, cands, dict(n=n, k=k, max_m=bucket, gated=gated, arch=arch, wtype=wtype,
                                                        group=group, **xq))])
    results = []
    for name, n, k, gated in products:
        for bucket in buckets:
            plans = _plans(dtype, cands, dict(n=n, k=k, max_m=bucket, gated=gated, arch=arch, wtype=wtype, group=group,
                                              **xq))
            measure = measure_factory(n, k, gated, bucket)
            rules, rules_s, best, best_s, timings = _race(plans, measure, _split, _label)
            key = dict(arch=arch, dtype=dtype, wtype=wtype, group=group, gated=gated, n=n, k=k, bucket=bucket)
            win = _record(table, family, key, rules, rules_s, best, best_s, margin, write, device_name, command)
            torch_s = measure(TORCH) if wtype is None else None
            route = torch_s is not None and torch_s < best_s * (1 - margin)
            route_key = dict(key, wtype=None, group=0)
            if write and wtype is None and (route or _shadowed(table, "route", route_key, device_name or "",
                                                               {"cublas": 0})):
                # a route, or {"cublas": 0} where another card's route would otherwise send this card's calls to torch
                tuning.write_entry(table, "route", {"cublas": int(route)}, measured={
                    "us": round(torch_s * 1e6, 2), "kernel_us": round(best_s * 1e6, 2), "kernel": best,
                    "device": device_name or "", "command": command or ""}, **route_key)
            elif write and wtype is None:
                tuning.remove_entry(table, "route", device=device_name or "", **route_key)
            r = TuneResult(name, n, k, gated, wtype, bucket, rules, rules_s * 1e6, best, best_s * 1e6, win, timings,
                           None if torch_s is None else torch_s * 1e6, bool(write and route),
                           kind=_kind(wtype, group, x_e4m3))
            log(r.line())
            results.append(r)
    return results


class _GpuPathMeasure:
    """Times gemv_quant's W8A8 call of one problem on the GPU (cold weights, `rows` rows of x) on one path: x
    quantised first (the row kernel, then the product) or in the product's registers, the switch set for the call."""

    def __init__(self, n, k, gated, rows, dtype, group, device):
        import torch
        from .quant import QuantLinear
        tdt = torch.bfloat16 if dtype == "bf16" else torch.float16
        w = (torch.randn(n, k, device=device) / k ** 0.5).to(tdt)
        first = QuantLinear.from_float(w, group, wtype="f8e4m3", dtype=tdt).qw
        self.weights = [first] + [QuantLinear.from_float(w, group, wtype="f8e4m3", dtype=tdt).qw
                                  for _ in range(cold_copy_count(first.nbytes(), device) - 1)]
        self.x = torch.randn(rows, k, device=device, dtype=tdt)
        self.y = torch.empty(rows, n // 2 if gated else n, device=device, dtype=tdt)
        self.gated = gated

    def __call__(self, x_first: bool, spills_ok: bool = False) -> float:
        from ..codegen.plan import switch_set
        from .quant import gemv_quant
        x, y, gated = self.x, self.y, self.gated
        with switch_set("LAYERFORGE_FP8_QUANT_X_FIRST", x_first):
            return graph_time([lambda qw=qw: gemv_quant(x, qw, gated=gated, out=y) for qw in self.weights])


def _this_gpu(arch: str | None, device_name: str | None):
    """The GPU tune measures on: (device, `arch` or the device's, `device_name` or the device's); an error where none
    is visible."""
    import torch
    from .launch import device_arch
    if not torch.cuda.is_available():
        raise RuntimeError("tune: measuring needs a CUDA GPU, and none is visible")
    device = torch.device("cuda", torch.cuda.current_device())
    return device, arch or device_arch(device), device_name or torch.cuda.get_device_name(device)


def _path_label(split: dict) -> str:
    return "x-first" if split["x_first"] else "in-regs"


def tune_fp8_paths(products: Iterable[tuple[str, int, int, str | None]], *, tokens: Iterable[int] = DEFAULT_TOKENS,
                   dtype: str = "bf16", group: int = 0, arch: str | None = None, table: str | Path | None = None,
                   margin: float = 0.03, write: bool = True, measure_factory: Callable | None = None,
                   command: str | None = None, device_name: str | None = None, log=print) -> list[TuneResult]:
    """Time gemv_quant's W8A8 call (f8e4m3 W, one scale a row or 128 x 128 blocks: `group` 0 / 128) of each product
    at each token bucket on both paths, x quantised first and in the product's registers, each with the splits the
    tables give it now; where the path runtime/quant.FP8_REGISTER_MAX_ROWS's rule does not take beats the rule's by
    the margin, record it ("fp8_path" family: {"x_first": 0 or 1}, which gemv_quant then follows for exactly that
    problem), else remove the card's entry (as _record does). measure_factory(n, k, gated, rows) -> measure(x_first,
    spills_ok=False) -> seconds replaces the GPU's timing (tests); then `arch` must be given."""
    from ..codegen.gemv import token_bucket
    from .quant import FP8_REGISTER_MAX_ROWS
    if group not in (0, 128):
        raise ValueError(f"tune: f8e4m3 weights have one scale a row (group 0) or 128 x 128 blocks (128), got {group}")
    if measure_factory is None:
        device, arch, device_name = _this_gpu(arch, device_name)

        def measure_factory(n, k, gated, rows):
            return _GpuPathMeasure(n, k, gated, rows, dtype, group, device)
    elif arch is None:
        raise ValueError("tune: a measure_factory needs the arch its plans are for")
    from ..codegen import tuning
    table = Path(table) if table is not None else tuning.user_table_path()
    results = []
    for name, n, k, gated in products:
        for bucket in sorted({token_bucket(t, "f8e4m3") for t in tokens}):
            rule = bucket > FP8_REGISTER_MAX_ROWS
            measure = measure_factory(n, k, gated, bucket)
            rules, rules_s, best, best_s, timings = _race([rule, not rule], measure,
                                                          lambda p: {"x_first": int(p)}, _path_label)
            key = dict(arch=arch, dtype=dtype, wtype="f8e4m3", group=group, gated=gated, n=n, k=k, bucket=bucket)
            win = _record(table, "fp8_path", key, rules, rules_s, best, best_s, margin, write, device_name, command)
            r = TuneResult(name, n, k, gated, "f8e4m3", bucket, rules, rules_s * 1e6, best, best_s * 1e6, win,
                           timings, label=_path_label, kind="f8" + ("b" if group else "") + "pth")
            log(r.line())
            results.append(r)
    return results


# the decode-range GEMM's splits for quantised W (codegen/gemm_stream.py): (rb, cw, ctas, stages; None: as many
# as fit); its units are 256 k, W packed
STREAM_CANDIDATES = tuple(itertools.product((1, 2), (1, 2), (1, 2), (None, 3, 4)))
DEFAULT_STREAM_ROWS = (32, 64, 128)


def _stream_split(plan) -> dict:
    return {"rb": plan.rb, "cw": plan.cw, "stages": plan.stages, "ctas": plan.ctas, "ka": plan.ka,
            "packed": int(plan.packed)}


def _stream_label(split: dict) -> str:
    return f"r{split['rb']}w{split['cw']}s{split['stages']}c{split['ctas']}"


def _stream_plans(dtype: str, cands, common: dict) -> list:
    """The rules' decode-range plan and every candidate's that builds (distinct keys), for one problem."""
    from ..codegen.gemm_stream import plan_gemm_stream
    plans = {}
    rules = plan_gemm_stream(dtype, tuned=False, **common)
    plans[rules.key] = rules
    for rb, cw, ctas, stages in cands:
        try:
            p = plan_gemm_stream(dtype, rb=rb, cw=cw, ctas=ctas, stages=stages, **common)
        except ValueError:
            continue
        plans.setdefault(p.key, p)
    return list(plans.values())


class _GpuStreamMeasure:
    """Times decode-range plans of one quantised problem on the GPU (cold weights: each copy packed for the plan);
    None for a plan that spills; TORCH: bf16 cuBLAS on the unquantised W (the peer the issue names)."""

    def __init__(self, n, k, gated, rows, dtype, wtype, group, device):
        import torch
        from .quant import QuantLinear
        tdt = torch.bfloat16 if dtype == "bf16" else torch.float16
        self.device, self.rows, self.gated, self.wtype = device, rows, gated, wtype
        self.w = (torch.randn(n, k, device=device) / k ** 0.5).to(tdt)
        first = QuantLinear.from_float(self.w, group, wtype=wtype)
        self.qws = [first.qw] + [QuantLinear.from_float(self.w, group, wtype=wtype).qw
                                 for _ in range(cold_copy_count(first.qw.nbytes(), device) - 1)]
        self.x = torch.randn(rows, k, device=device, dtype=tdt)
        self.y = torch.empty(rows, n // 2 if gated else n, device=device, dtype=tdt)

    def __call__(self, plan, spills_ok: bool = False) -> float | None:
        import torch
        from .launch import compile_plan, load_kernels
        from .linear import _StreamLauncher, _torch_product
        from .quant import pack_stream_i8, pack_stream_u4
        x, y, m = self.x, self.y, self.rows
        if plan == TORCH:
            ws = [self.w] + [self.w.clone() for _ in range(cold_copy_count(self.w.numel() * 2, self.device) - 1)]
            return graph_time([lambda w=w: _torch_product(x, w, None, self.gated, None) for w in ws])
        res = compile_plan(plan)
        if not spills_ok and any(r.spill_stores or r.spill_loads for r in res.resources.values()):
            return None
        kernel = load_kernels(res.cubin, plan.kernels, self.device)[plan.kernel_name]
        launch = _StreamLauncher(plan, kernel, torch.cuda.get_device_properties(self.device).multi_processor_count,
                                 self.device)
        pack = pack_stream_u4 if self.wtype == "u4" else pack_stream_i8
        weights = [[pack(qw, plan)] + ([qw.wscale] if self.wtype == "i8" else []) for qw in self.qws]
        return graph_time([lambda ws=ws: launch(m, [x, *ws, y, m]) for ws in weights])


def tune_stream(products: Iterable[tuple[str, int, int, str | None]], *, rows: Iterable[int] = DEFAULT_STREAM_ROWS,
                dtype: str = "bf16", wtype: str = "u4", group: int = 128, table: str | Path | None = None,
                margin: float = 0.03, write: bool = True, candidates=None, measure_factory: Callable | None = None,
                command: str | None = None, device_name: str | None = None, log=print) -> list[TuneResult]:
    """The decode-range GEMM's splits for a quantised W (u4 with groups, i8 with row scales) at each token tile of
    `rows`, against the rules' plan (plan_gemm_stream(..., tuned=False)), recorded as tune_products records the
    small-token kernel's; bf16 cuBLAS on the unquantised W is timed beside for the report (torch_us)."""
    from ..codegen import tuning
    from ..codegen.gemm_stream import max_rows, token_tile
    if wtype not in ("u4", "i8"):
        raise ValueError(f"tune: the decode-range GEMM's quantised weights are 'u4' or 'i8', got {wtype!r}")
    group = 0 if wtype == "i8" else group
    arch = "sm_90a"   # the kernel's (wgmma, TMA)
    gpu = measure_factory is None
    if gpu:
        device, device_name = _sm90_gpu("the decode-range GEMM", device_name)

        def measure_factory(n, k, gated, rows):
            return _GpuStreamMeasure(n, k, gated, rows, dtype, wtype, group, device)
    table = Path(table) if table is not None else tuning.user_table_path()
    cands = tuple(candidates) if candidates is not None else STREAM_CANDIDATES
    products = list(products)
    tiles = sorted({token_tile(r) for r in rows})
    if gpu:
        _precompile([p for _, n, k, gated in products for mt in tiles if mt <= max_rows(gated, wtype)
                     for p in _stream_plans(dtype, cands, dict(n=n, k=k, mt=mt, gated=gated, wtype=wtype,
                                                               group=group))])
    results = []
    for name, n, k, gated in products:
        for mt in tiles:
            if mt > max_rows(gated, wtype):
                continue
            plans = _stream_plans(dtype, cands, dict(n=n, k=k, mt=mt, gated=gated, wtype=wtype, group=group))
            measure = measure_factory(n, k, gated, mt)
            rules, rules_s, best, best_s, timings = _race(plans, measure, _stream_split, _stream_label)
            key = dict(arch=arch, dtype=dtype, wtype=wtype, group=group, gated=gated, n=n, k=k, bucket=mt)
            win = _record(table, "gemm_stream", key, rules, rules_s, best, best_s, margin, write, device_name,
                          command)
            peer = measure(TORCH)
            r = TuneResult(name, n, k, gated, wtype, mt, rules, rules_s * 1e6, best, best_s * 1e6, win, timings,
                           None if peer is None else peer * 1e6, False, label=_stream_label, peer="bf16 cuBLAS")
            log(r.line())
            results.append(r)
    return results


DEFAULT_GEMM_ROWS = (32, 64, 128, 256, 512, 1024, 2048, 4096, 8192)
CUBLAS = {"wgmma": 0, "tail": 0, "bn": 0}   # a "gemm" split: torch's product


def _gemm_label(split: dict) -> str:
    if not split["wgmma"]:
        return "cuBLAS"
    from .linear import GEMM_TABLE_VARIANTS
    return f"{GEMM_TABLE_VARIANTS[split['tail']]}/bn{split['bn']}"


def gemm_candidates(gated: str | None) -> list[dict]:
    """The Hopper GEMM splits tune_gemm times: each table variant (the persistent schedule, its tail in up to 8 or
    16 K parts) at each tile width the problem's plan takes (gated: 128 and 256, whole 64-column output boxes)."""
    from ..codegen.gemm import BN_COST, GATED_BN
    from .linear import GEMM_TABLE_VARIANTS
    widths = GATED_BN if gated else tuple(sorted(BN_COST))
    return [{"wgmma": 1, "tail": tail, "bn": bn} for tail in GEMM_TABLE_VARIANTS for bn in widths]


class _GpuGemmMeasure:
    """Times one problem's calls at `rows` rows on the GPU, cold weights: torch's product with its epilogue
    (TORCH; what gemv runs past 16 rows without an entry: linear._torch_product) or the Hopper GEMM at a split
    (gemm_candidates); None for a split whose plan the problem cannot take or that spills."""

    def __init__(self, n, k, gated, rows, dtype, device):
        import torch
        tdt = torch.bfloat16 if dtype == "bf16" else torch.float16
        self.n, self.k, self.gated, self.rows, self.device = n, k, gated, rows, device
        w = (torch.randn(n, k, device=device) / k ** 0.5).to(tdt)
        self.weights = [w] + [w.clone() for _ in range(cold_copy_count(w.numel() * w.element_size(), device) - 1)]
        self.x = torch.randn(rows, k, device=device, dtype=tdt)
        self.y = torch.empty(rows, n // 2 if gated else n, device=device, dtype=tdt)

    def __call__(self, split, spills_ok: bool = False) -> float | None:
        from .launch import compile_plan
        from .linear import GEMM_TABLE_VARIANTS, _torch_product, gemm_plan, launch_gemv
        x, y, n, k, gated = self.x, self.y, self.n, self.k, self.gated
        if split == TORCH:
            return graph_time([lambda w=w: _torch_product(x, w, None, gated, None) for w in self.weights])
        variant = GEMM_TABLE_VARIANTS[split["tail"]]
        try:
            plan = gemm_plan(x.dtype, n, k, gated, False, False, variant, split["bn"])
        except ValueError:
            return None
        res = compile_plan(plan)
        if not spills_ok and any(r.spill_stores or r.spill_loads for r in res.resources.values()):
            return None
        return graph_time([lambda w=w: launch_gemv(x, [w], n, k, None, gated, None, None, 0.0, y, wgmma=variant,
                                                   gemm_bn=split["bn"]) for w in self.weights])


def tune_gemm(products: Iterable[tuple[str, int, int, str | None]], *, rows: Iterable[int] = DEFAULT_GEMM_ROWS,
              dtype: str = "bf16", table: str | Path | None = None, margin: float = 0.03, write: bool = True,
              candidates: Iterable[dict] | None = None, measure_factory: Callable | None = None,
              command: str | None = None, device_name: str | None = None, log=print) -> list[TuneResult]:
    """Past 16 rows (bf16 / f16 weights, sm_90): each product at each row bucket of `rows` (token_bucket: 32, 64,
    ... rows, timed at the bucket's top) on the Hopper GEMM's splits (gemm_candidates) against torch's product with
    its epilogue (linear._torch_product), which gemv runs there without an entry. torch's is timed first and again
    after the others (the faster kept: a GPU's first timing after the compiles can read slow), the fastest split
    again (its slower time kept). Where that split beats torch's by more than `margin`, a "gemm" entry sends the
    calls of the bucket to it (runtime/linear.gemm_table_route); else the card's entry goes, or, where another
    card's entry would serve this card, {"wgmma": 0} (torch's product) is written for it (tune_products's _race and
    _record: the result's "rules" are torch's product).
    measure_factory(n, k, gated, rows) -> measure(split or TORCH, spills_ok=False) -> seconds or None replaces the
    GPU's timing (tests)."""
    from ..codegen import tuning
    if dtype not in ("bf16", "f16"):
        raise ValueError(f"tune: the Hopper GEMM's weights are bf16 or f16, got {dtype!r}")
    if margin < 0:
        raise ValueError(f"tune: margin must be >= 0, got {margin}")
    rows = list(rows)
    if rows and min(rows) <= 16:
        raise ValueError(f"tune: the GEMM's rows are past 16 (the small-token kernel's), got {rows}")
    from ..codegen.gemv import token_bucket
    gpu = measure_factory is None
    if gpu:
        device, device_name = _sm90_gpu("the Hopper GEMM", device_name)

        def measure_factory(n, k, gated, rows):
            return _GpuGemmMeasure(n, k, gated, rows, dtype, device)
    table = Path(table) if table is not None else tuning.user_table_path()
    # each product with its candidate splits
    work = [(p, list(candidates) if candidates is not None else gemm_candidates(p[3])) for p in products]
    buckets = sorted({token_bucket(r) for r in rows})
    if gpu:   # every plan the problems take compiled first, a process a core
        import torch
        from .linear import GEMM_TABLE_VARIANTS, gemm_plan
        tdt = torch.bfloat16 if dtype == "bf16" else torch.float16
        plans = []
        for (_, n, k, gated), cands in work:
            for c in cands:
                try:
                    plans.append(gemm_plan(tdt, n, k, gated, False, False, GEMM_TABLE_VARIANTS[c["tail"]], c["bn"]))
                except ValueError:
                    pass
        _precompile(plans)
    card = device_name or ""
    results = []
    for (name, n, k, gated), cands in work:
        for bucket in buckets:
            measure = measure_factory(n, k, gated, bucket)
            rules, torch_s, best, best_s, timings = _race([TORCH, *cands], measure,
                                                          lambda p: CUBLAS if p == TORCH else p, _gemm_label)
            key = dict(arch="sm_90a", dtype=dtype, wtype=None, group=0, gated=gated, n=n, k=k, bucket=bucket)
            win = _record(table, "gemm", key, rules, torch_s, best, best_s, margin, write, card, command)
            r = TuneResult(name, n, k, gated, None, bucket, rules, torch_s * 1e6, best, best_s * 1e6, win, timings,
                           label=_gemm_label, kind=dtype)
            log(r.line())
            results.append(r)
    return results


def _sm90_gpu(kernel: str, device_name: str | None):
    """(device, `device_name` or its name) of the current sm_90 GPU a Hopper kernel is timed on; an error naming
    `kernel` where none is visible."""
    import torch
    if not torch.cuda.is_available() or torch.cuda.get_device_capability() != (9, 0):
        raise RuntimeError(f"tune: {kernel} runs on an sm_90 GPU, and none is visible")
    device = torch.device("cuda", torch.cuda.current_device())
    return device, device_name or torch.cuda.get_device_name(device)


def _race(plans: list, measure: Callable, split_of: Callable, label_of: Callable):
    """Time plans[0] (the rules', which the product runs now: timed even where it spills) and the others of a
    different split: (rules' split, its s, best split, its s, {label: us}); a candidate that spills (measure gives
    None) is passed over. The rules' plan is timed first and again after the others, and the faster kept: the
    first timing after the compiles (seconds of an idle GPU) ran up to 18 % slow on an H100 (the clocks climbing,
    as we read it; benchmarks/NOTES.md, "The tune's first timing"), which made candidates look faster than they
    are. The fastest candidate is then timed once more and its slower time kept, so one lucky timing does not make
    a winner; where it is then no faster than the rules', the rules stand."""
    rules = split_of(plans[0])
    first = measure(plans[0], True)
    others = []   # (split, s, plan) of the candidates that ran
    for plan in plans[1:]:
        split = split_of(plan)
        if split == rules:
            continue
        t = measure(plan)
        if t is not None:
            others.append((split, t, plan))
    rules_s = min(first, measure(plans[0], True))
    timings = {label_of(rules): rules_s * 1e6} | {label_of(split): t * 1e6 for split, t, _ in others}
    best, best_s, best_plan = rules, rules_s, None
    for split, t, plan in others:
        if t < best_s:
            best, best_s, best_plan = split, t, plan
    if best_plan is not None:
        again = measure(best_plan)
        best_s = max(best_s, again if again is not None else float("inf"))
        timings[label_of(best)] = best_s * 1e6
        if best_s >= rules_s:
            best, best_s = rules, rules_s
    return rules, rules_s, best, best_s, timings


def _record(table: Path, family: str, key: dict, rules: dict, rules_s: float, best: dict, best_s: float,
            margin: float, write: bool, device_name, command) -> bool:
    """Write the best split where it beat the rules' by the margin, else remove the problem's entry (write=False:
    neither); whether it was written."""
    from ..codegen import tuning
    win = best != rules and best_s < rules_s * (1 - margin)
    card = device_name or ""
    if write and (win or _shadowed(table, family, key, card, rules)):
        # a win, or the rules' split where another card's entry would otherwise serve this card (codegen/tuning.py)
        tuning.write_entry(table, family, best if win else rules, measured={
            "us": round((best_s if win else rules_s) * 1e6, 2), "rules_us": round(rules_s * 1e6, 2), "rules": rules,
            "device": card, "command": command or ""}, **key)
    elif write:   # this card's entry only: another card's measurement stands for that card
        tuning.remove_entry(table, family, device=card, **key)
    return bool(write and win)


def _shadowed(table: Path, family: str, key: dict, card: str, rules: dict) -> bool:
    """Whether, without an entry of its own in `table`, `card` would take a split of the problem other than `rules`
    (route: a route, rules {"cublas": 0}) from the other entries: another card's, or this card's in another table
    (the packaged table's, when a user's tune on that card finds the rules faster)."""
    from ..codegen import tuning
    other = tuning.split_without(family, card, table=table, **key)
    return other is not None and other != rules


def _plans(dtype: str, cands, common: dict) -> list:
    """The rules' plan and every candidate split's that a CTA can hold, for one problem."""
    from ..codegen.gemv import plan_gemv
    plans = [plan_gemv(dtype, tuned=False, **common)]
    for rt, warps, stages in cands:
        try:   # a split past the arch's shared memory is an error here
            plans.append(plan_gemv(dtype, rt=rt, warps=warps, stages=stages, **common))
        except ValueError:
            continue
    return plans


def _compile(plan) -> None:
    from .launch import compile_plan
    compile_plan(plan)


def _precompile(plans) -> None:
    """Fill the kernel cache from a process per core."""
    import concurrent.futures as cf
    import os
    todo = list({p.key: p for p in plans}.values())
    with cf.ProcessPoolExecutor(max_workers=min(len(todo), os.cpu_count() or 4) or 1) as ex:
        list(ex.map(_compile, todo))


# --weights names: (activations' dtype or None for --dtype's, weight type, group or None for --group's, x quantised
# beforehand); f8 / f8b time the W8A8 layer's path past FP8_REGISTER_MAX_ROWS rows (x quantised first,
# runtime/quant.fp8_gemv), f8r / f8br the kernel quantising x in its registers (the layer's path up to those rows, a
# norm prologue's at every count)
WEIGHTS = {"bf16": ("bf16", None, 0, False), "f16": ("f16", None, 0, False), "u4": (None, "u4", None, False),
           "i8": (None, "i8", 0, False), "f8": (None, "f8e4m3", 0, True), "f8b": (None, "f8e4m3", 128, True),
           "f8r": (None, "f8e4m3", 0, False), "f8br": (None, "f8e4m3", 128, False)}


def _kind(wtype: str | None, group: int, x_e4m3: bool) -> str | None:
    """The --weights name (WEIGHTS) of a tuned problem's weights, where the weight type alone does not say it
    (f8e4m3)."""
    if wtype != "f8e4m3":
        return None
    return next(name for name, (_, w, g, x) in WEIGHTS.items() if (w, g, x) == (wtype, group, x_e4m3))


def parse_weights(spec: str, group: int = 128) -> list[tuple[str | None, str | None, int, bool]]:
    """`tune --weights`: (activations' dtype or None for --dtype's, weight type, group, x quantised beforehand)
    each: bf16 / f16 (W in that dtype), u4 (groups of `group` k), i8 (one scale a row), f8 (W8A8 e4m3, one scale a
    row) and f8b (e4m3 with 128 x 128 block scales) over x quantised first (the layer's path past
    runtime/quant.FP8_REGISTER_MAX_ROWS rows), f8r / f8br the same weights with x quantised in the kernel's
    registers (the layer's path up to those rows, a norm prologue's at every count)."""
    names = [w.strip() for w in spec.split(",") if w.strip()]
    bad = [w for w in names if w not in WEIGHTS]
    if bad:
        raise ValueError(f"tune: --weights are {', '.join(WEIGHTS)}, got {bad}")
    return [(d, w, group if g is None else g, x) for d, w, g, x in (WEIGHTS[n] for n in names)]


def cli_tune(args) -> int:
    """`layerforge tune`: the products of --config (or --products) at --tokens, per weight type in --weights."""
    if not args.config and not args.products:
        raise ValueError("tune: give --config (a model's config.json) or --products N:K[:act],...")
    products = (model_products(args.config) if args.config else []) + (
        parse_products(args.products) if args.products else [])
    tokens = [int(t) for t in args.tokens.split(",") if t.strip()]
    if tokens and (min(tokens) < 1 or max(tokens) > 16):
        raise ValueError(f"tune: --tokens are 1 to 16 (the small-token kernel's rows), got {args.tokens!r}")
    stream_rows = [int(t) for t in (args.stream_rows or "").split(",") if t.strip()]
    if stream_rows and (min(stream_rows) < 17 or max(stream_rows) > 128):
        raise ValueError(f"tune: --stream-rows are 17 to 128 (the decode-range GEMM's quantised rows), got "
                         f"{args.stream_rows!r}")
    gemm_rows = [int(t) for t in (getattr(args, "gemm_rows", "") or "").split(",") if t.strip()]
    if gemm_rows and min(gemm_rows) < 17:
        raise ValueError(f"tune: --gemm-rows are past 16 (the Hopper GEMM against cuBLAS), got {args.gemm_rows!r}")
    if not tokens and not stream_rows and not gemm_rows:
        raise ValueError("tune: nothing to tune (--tokens, --stream-rows and --gemm-rows all empty)")
    weights = parse_weights(args.weights, args.group)
    if any(w == "f8e4m3" for _, w, _, _ in weights):
        import torch
        from ..codegen.gemv import FP8_MIN_ARCH
        if torch.cuda.get_device_capability() < divmod(FP8_MIN_ARCH, 10):
            raise ValueError(f"tune: f8 / f8b weights run the e4m3 tensor cores of sm_{FP8_MIN_ARCH} and newer, not "
                             "this GPU's")
    command = "layerforge " + " ".join(shlex.quote(a) for a in sys.argv[1:]) if sys.argv[1:] else "layerforge tune"
    table = Path(args.table) if args.table else None
    for dtype, wtype, group, x_e4m3 in weights:
        dtype = dtype or args.dtype
        if tokens:
            tune_products(products, tokens=tokens, dtype=dtype, wtype=wtype, group=group, table=table,
                          margin=args.margin, write=not args.dry_run, command=command, x_e4m3=x_e4m3)
        if stream_rows and wtype in ("u4", "i8"):
            tune_stream(products, rows=stream_rows, dtype=dtype, wtype=wtype, group=group, table=table,
                        margin=args.margin, write=not args.dry_run, command=command)
        if gemm_rows and wtype is None:
            tune_gemm(products, rows=gemm_rows, dtype=dtype, table=table, margin=args.margin,
                      write=not args.dry_run, command=command)
    # the W8A8 layer's two paths, each with the splits just tuned: the faster recorded where it is not the rows' rule's
    for dtype, group in dict.fromkeys((d or args.dtype, g) for d, w, g, _ in weights if w == "f8e4m3" and tokens):
        tune_fp8_paths(products, tokens=tokens, dtype=dtype, group=group, table=table, margin=args.margin,
                       write=not args.dry_run, command=command)
    if not args.dry_run:
        from ..codegen.tuning import user_table_path
        print(f"table: {table or user_table_path()}")
    return 0
