"""torch.nn.Linear whose decode-sized calls run a generated kernel.

    lin = Linear(4096, 6144, bias=False, dtype=torch.bfloat16, device="cuda")
    y = lin(x)                       # x [..., 4096]; <= 16 rows on CUDA: the generated kernel
    gu = Linear(4096, 2 * 14336, bias=False, dtype=torch.bfloat16, device="cuda")
    h = gu(x, gated="silu")          # silu(x W_gate^T) * (x W_up^T): [..., 14336], fused
    y = lin(x, residual=r)           # x W^T (+ b) + r, fused
    y = lin(x, norm=(gamma, 1e-5))   # rms_norm(x) * gamma, then the product: the norm fused

Parameters, state-dict names and initialisation are torch.nn.Linear's, so Hugging Face weights
load unchanged. A call runs the generated small-token kernel (codegen/gemv.py) when it has at
most 16 rows, is on a CUDA GPU of sm_80 or newer, in bf16/f16 with the weight's dtype, K a
multiple of 8 and 16-byte aligned rows; anything else (more rows, f32, CPU, torch.compile
tracing) runs torch's own product (cuBLAS) with the same epilogue in torch. The row limit is
where the kernel stops being weight-bandwidth bound (issue 12 has the GEMM family for more).
Past 16 rows on an sm_90 GPU, a "gemm" entry of the tuning tables (codegen/tuning.py, written by
`layerforge tune --gemm-rows`) for the problem's row bucket sends the call to the Hopper GEMM
variant it measured faster than cuBLAS there (gemm_table_route); without one, cuBLAS.
"""
from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F

from ..codegen.gemm import pick_bn, plan_gemm
from ..codegen.gemm_stream import max_rows as stream_max_rows, plan_gemm_stream, token_tile
from ..codegen.gemv import GATED, plan_gemv, token_bucket, xshare_default, xshare_split
from .tma import tensor_map

# Calls of at most this many rows run the generated kernel (the plans serve up to 64: at 32 and
# 64 tokens the kernel is a GEMM tile in registers, measured in benchmarks/bench_gemv.py)
KERNEL_MAX_ROWS = 16
# Calls of at least this many rows run the Hopper GEMM (codegen/gemm.py) on sm_90; off (a row
# count no call has) until it is measured at least as fast as cuBLAS (benchmarks/bench_gemm.py)
WGMMA_MIN_ROWS = 1 << 62
# The Hopper GEMM's variants, by gemv's `kernel` name: the plan options each sets (codegen/gemm.py;
# measured in benchmarks/NOTES.md: the persistent one is the fastest, the GEMM route's default)
GEMM_KERNELS = {"wgmma": {}, "wgmma_tma": {"tma": True}, "wgmma_persistent": {"tma": True, "persistent": True},
                "wgmma_cluster": {"tma": True, "persistent": True, "cluster": 2},
                "wgmma_split": {"tma": True, "persistent": True, "tail_split": 8},
                "wgmma_split16": {"tma": True, "persistent": True, "tail_split": 16},
                "wgmma_skew": {"tma": True, "persistent": True, "skew": 2},
                "wgmma_split_skew": {"tma": True, "persistent": True, "tail_split": 8, "skew": 2}}
# The decode-range Hopper GEMM (codegen/gemm_stream.py: W's rows as the wgmma M, stream-K over the
# SMs) by its gemv `kernel` name; calls of STREAM_ROWS[0] .. STREAM_ROWS[1] rows take it on sm_90
# (off, an empty range, until measured faster than cuBLAS there: benchmarks/bench_gemv.py --stream)
STREAM_KERNEL = "stream"
STREAM_ROWS = (1, 0)
# the small-token kernel reads a row-strided W in place (its plan's ldw) instead of a packed copy a
# call (tests/gpu/test_gemv.py's strided case; runtime/lora.py's K-extended storage needs it: its
# decode reads W and the A rows K + S slots R apart)
STRIDED_W = True
_PROPS: dict[int, object] = {}   # device index -> torch.cuda's device properties (no driver call per step)
GEMM_BN: int | None = None   # the Hopper GEMM's tile width; None: codegen/gemm.pick_bn per call
# The persistent Hopper GEMM's epilogue by TMA stores from a shared staging tile (codegen/gemm.py
# tma_store), where the output's rows take a tensor map (columns a multiple of 8) and no residual is added
GEMM_TMA_STORE = True
# (the variants it applies to: the persistent ones without clusters)
TMA_STORE_VARIANTS = tuple(v for v, o in GEMM_KERNELS.items() if o.get("persistent") and o.get("cluster", 1) == 1)
# A "gemm" table entry's variant by its split's "tail" (the most K parts of the last round's tiles; 0: none):
# the persistent schedule, alone or with its tail split (runtime/tune.tune_gemm times these)
GEMM_TABLE_VARIANTS = {0: "wgmma_persistent", 8: "wgmma_split", 16: "wgmma_split16"}

__all__ = ["Linear", "GatedMLP", "gemv", "rms_norm", "device_major", "LinearInputError", "KERNEL_MAX_ROWS",
           "check_call", "launch_gemv", "GEMM_KERNELS"]


class LinearInputError(ValueError):
    """Inputs a product cannot take (shape, dtype, device), raised before any launch."""


_ACT = {"silu": F.silu, "gelu": lambda t: F.gelu(t), "gelu_tanh": lambda t: F.gelu(t, approximate="tanh")}
_KERNELS: dict[tuple, object] = {}   # (dtype, n, k, 8/16/32/64 rows, gated, bias, residual, norm, device, wtype, group) -> launcher


def _tiles(rows: int) -> int:
    """The token tile of the plan that serves `rows`: 8, 16, 32 or 64 rows."""
    return token_bucket(rows)


# u4 products whose plans serve these token buckets take the shared-x layout (codegen/gemv.py xshare) where
# LAYERFORGE_GEMV_XSHARE=1 (off: measured slower than the default on an H100, benchmarks/NOTES.md)
XSHARE_BUCKETS = (16,)


class _SplitGemvLauncher:
    """A loaded small-token kernel of the shared-x layout with K split over CTAs, with its workspace (the CTAs'
    f32 sums and one counter a row block, zero: the kernel leaves them zero), allocated once a launcher, so calls
    through one launcher must be ordered (one stream)."""

    __slots__ = ("launcher", "part", "counts")

    def __init__(self, plan, launcher, device: torch.device):
        floats, counters = plan.workspace()
        self.launcher = launcher
        self.part = torch.empty(floats, dtype=torch.float32, device=device)
        self.counts = torch.zeros(counters, dtype=torch.int32, device=device)

    def __call__(self, problem, args: list) -> None:
        self.launcher(problem, [*args, self.part, self.counts])


def xshare_plan(dtype: str, *, n: int, k: int, max_m: int, gated, bias: bool, residual: bool, arch: str, group: int,
                cache=None):
    """The shared-x u4 plan the runtime runs: xshare_split's K split, and the most CTAs an SM (plan_gemv's
    min_blocks default, then fewer) whose kernel compiles without spills (NVRTC 13.0 spills 8 bytes of 70B qkv's at
    128 registers where 13.5 does not)."""
    from .launch import compile_plan
    plan = plan_gemv(dtype, n=n, k=k, max_m=max_m, gated=gated, bias=bias, residual=residual, arch=arch, wtype="u4",
                     group=group, xshare=xshare_split(n, k, gated))
    for blocks in range(plan.min_blocks, 1, -1):
        cand = dataclasses.replace(plan, min_blocks=blocks)
        if not any(r.spill_stores or r.spill_loads for r in compile_plan(cand, cache).resources.values()):
            return cand
    return dataclasses.replace(plan, min_blocks=1)


def _launcher(x: torch.Tensor, n: int, k: int, rows: int, gated, bias: bool, residual: bool, norm_offset, cache=None,
              wtype: str | None = None, group: int = 0, ldw: int = 0):
    tiles = token_bucket(rows, wtype)
    share = (wtype == "u4" and norm_offset is None and not ldw and tiles in XSHARE_BUCKETS and xshare_default())
    key = (x.dtype, n, k, tiles, gated, bias, residual, norm_offset, x.device.index, wtype, group, ldw, share)
    hit = _KERNELS.get(key)
    if hit is None:
        from .launch import device_arch, load_plan
        dt = "bf16" if x.dtype == torch.bfloat16 else "f16"
        plan = xshare_plan(dt, n=n, k=k, max_m=tiles, gated=gated, bias=bias, residual=residual,
                           arch=device_arch(x.device), group=group, cache=cache) if share else plan_gemv(
            dt, n=n, k=k, max_m=tiles, gated=gated, bias=bias, residual=residual,
            norm=None if norm_offset is None else "rms", norm_offset=norm_offset or 0.0, arch=device_arch(x.device),
            wtype=wtype, group=group, ldw=ldw)
        hit = load_plan(plan, x.device, cache)
        hit = _KERNELS[key] = _SplitGemvLauncher(plan, hit, x.device) if plan.xshare > 1 else hit
    return hit


def rms_norm(x: torch.Tensor, gamma: torch.Tensor, eps: float, offset: float = 0.0) -> torch.Tensor:
    """x * rsqrt(mean(x^2) + eps) * (gamma + offset), in float32, cast back to x's dtype."""
    xf = x.float()
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * (gamma.float() + offset)
    return y.to(x.dtype)


def _reference(x, weight, bias, gated, residual, norm=None, norm_offset=0.0):
    """torch's product and the same prologue and epilogue, rounded where the unfused layers round."""
    if norm is not None:
        x = rms_norm(x, norm[0], norm[1], norm_offset)
    return _epilogue(F.linear(x, weight, bias), gated, residual)


def _epilogue(y, gated, residual):
    """_reference's epilogue on a product y (bias already in it), in y's dtype: act(gate) * up in
    float32 over y's halves, then the residual add."""
    if gated:
        g, u = y.chunk(2, dim=-1)
        y = (_ACT[gated](g.float()) * u.float()).to(y.dtype)
    return y if residual is None else y + residual


_GATED_LAYERS = {"silu": "swiglu", "gelu": "geglu", "gelu_tanh": "geglu_tanh"}   # dsl/stdlib/activations.lf
_GATED_ROWS: dict[tuple, object] = {}   # (act, output columns, dtype, device) -> the gated row kernel's module


def _torch_product(x, weight, bias, gated, residual, norm=None, norm_offset=0.0, cache=None):
    """What gemv runs where no generated product serves the call: _reference, except that a gated call on an sm_80+
    GPU (bf16 / f16, not traced) takes act(gate) * up from the generated row kernel of the stdlib's swiglu / geglu /
    geglu_tanh (the same meaning: the product rounded to x's dtype, the activation in float32, rounded back) in one
    pass over the product, where torch's epilogue makes five (the halves to float32, the activation, the multiply,
    the cast). Where autograd records the call (grad enabled and x or W requiring it), torch's epilogue, which it
    can differentiate; where the row kernel is neither cached nor may be compiled (LAYERFORGE_NO_JIT=1), torch's
    too. `cache`: the kernel cache the row kernel is loaded from (gemv's)."""
    grad = torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)   # torch's, differentiable
    if grad or not (gated and x.is_cuda and x.dtype in (torch.bfloat16, torch.float16) and x.numel() > 0
                    and not torch.compiler.is_compiling() and device_major(x.device) >= 8):
        return _reference(x, weight, bias, gated, residual, norm, norm_offset)
    if norm is not None:
        x = rms_norm(x, norm[0], norm[1], norm_offset)
    y = F.linear(x, weight, bias)
    f = y.shape[-1] // 2
    key = (gated, f, y.dtype, y.device.index)
    module = _GATED_ROWS.get(key)
    if module is None:
        from ..dsl.program import Program
        from .layers import LayerModule
        dtype = "bf16" if y.dtype == torch.bfloat16 else "f16"
        module = _GATED_ROWS[key] = LayerModule(Program.stdlib().specialise(_GATED_LAYERS[gated], F=f, dtype=dtype),
                                                device=y.device, cache=cache)
    if module is False:
        return _epilogue(y, gated, residual)
    from .cache import KernelNotCachedError
    try:
        h = module(y.reshape(-1, 2 * f)).view(*y.shape[:-1], f)
    except KernelNotCachedError:   # compiling at run time is off and no cache holds the kernel: torch's epilogue
        _GATED_ROWS[key] = False
        return _epilogue(y, gated, residual)
    return h if residual is None else h + residual


def _kernel_ok(x: torch.Tensor, weight: torch.Tensor, rows: int) -> bool:
    return (x.is_cuda and x.dtype in (torch.bfloat16, torch.float16) and weight.dtype == x.dtype
            and weight.device == x.device and 1 <= rows <= KERNEL_MAX_ROWS and x.shape[-1] % 8 == 0
            and not torch.compiler.is_compiling() and device_major(x.device) >= 8)


_ROUTES: dict[tuple, bool] = {}   # (tables' generation, dtype, n, k, bucket, gated, device) -> torch's product


def torch_route(x: torch.Tensor, n: int, k: int, rows: int, gated) -> bool:
    """Whether the tuning tables (codegen/tuning.py, `layerforge tune`) measured torch's product (cuBLAS, the epilogue
    in torch) faster than every split of the small-token kernel for this problem: then gemv sends the call there."""
    if not x.is_cuda:
        return False
    from ..codegen import tuning
    bucket = token_bucket(rows)
    key = (tuning.generation(), x.dtype, n, k, bucket, gated, x.device.index)
    hit = _ROUTES.get(key)
    if hit is None:
        from .launch import device_arch
        route = tuning.lookup(
            "route", arch=device_arch(x.device), dtype="bf16" if x.dtype == torch.bfloat16 else "f16", wtype=None,
            group=0, gated=gated, n=n, k=k, bucket=bucket)
        hit = _ROUTES[key] = bool(route and route["cublas"])   # {"cublas": 0}: a card that measured the kernel faster
    return hit


_GEMM_ROUTES: dict[tuple, tuple[str, int] | None] = {}   # (generation, dtype, n, k, bucket, gated, device) -> route


def gemm_table_route(x: torch.Tensor, n: int, k: int, rows: int, gated) -> tuple[str, int] | None:
    """(Hopper GEMM variant, tile width) where the tuning tables hold a "gemm" entry measured faster than torch's
    product (cuBLAS and its epilogue: _torch_product) for this problem and row bucket (token_bucket: 32, 64, ...
    rows), else None (torch's product: no entry, an entry of {"wgmma": 0}, or a split this build cannot take). The
    caller has checked _gemm_ok (an sm_90 GPU, bf16 / f16) and rows > KERNEL_MAX_ROWS."""
    from ..codegen import tuning
    bucket = token_bucket(rows)
    key = (tuning.generation(), x.dtype, n, k, bucket, gated, x.device.index)
    if key in _GEMM_ROUTES:
        return _GEMM_ROUTES[key]
    if x.is_cuda:   # the tables learn which card this is (its own entries first; a new card: a new generation)
        from .launch import device_arch
        device_arch(x.device)
        key = (tuning.generation(), *key[1:])
    split = tuning.lookup("gemm", arch="sm_90a", dtype="bf16" if x.dtype == torch.bfloat16 else "f16", wtype=None,
                          group=0, gated=gated, n=n, k=k, bucket=bucket)
    hit = None
    if split and split["wgmma"] and split["tail"] in GEMM_TABLE_VARIANTS:
        variant, bn = GEMM_TABLE_VARIANTS[split["tail"]], split["bn"]
        try:   # a width the problem's plan cannot take (a gated 192, say) leaves torch's product
            gemm_plan(x.dtype, n, k, gated, False, False, variant, bn)
            hit = (variant, bn)
        except ValueError:
            hit = None
    _GEMM_ROUTES[key] = hit
    return hit


def _gemm_ok(x: torch.Tensor, weight: torch.Tensor) -> bool:
    return (x.is_cuda and x.dtype in (torch.bfloat16, torch.float16) and weight.dtype == x.dtype
            and weight.device == x.device and x.shape[-1] % 8 == 0 and x.numel() > 0
            and not torch.compiler.is_compiling() and _capability(x.device) == (9, 0))


def device_properties(device: torch.device):
    """torch's properties of a CUDA device (capability, SM count), read once a device."""
    p = _PROPS.get(device.index)
    if p is None:
        p = _PROPS[device.index] = torch.cuda.get_device_properties(device)
    return p


def gemm_route(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether gemv sends x @ weight^T (no norm prologue) to the Hopper GEMM: at least
    WGMMA_MIN_ROWS rows (off by default: cuBLAS is as fast or faster for most shapes,
    benchmarks/NOTES.md) and operands it takes."""
    return x.numel() // max(x.shape[-1], 1) >= WGMMA_MIN_ROWS and _gemm_ok(x, weight)


def _capability(device: torch.device) -> tuple[int, int]:
    p = device_properties(device)
    return p.major, p.minor


_SPLIT_WS: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}   # device index -> tail_split's (part, counts)


def split_workspace(device: torch.device, floats: int, ints: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The workspace of the Hopper GEMM's split tail (codegen/gemm.py tail_split, GemmPlan.workspace's sizes),
    one a device: f32 partial sums and int32 counters (zero; the kernels leave them zero). Launchers of the
    device share it, as cuBLAS's calls share its workspace: calls must be ordered (one stream). A plan wanting
    more gets a larger one; the launchers made before keep theirs (and graphs captured through them stay valid)."""
    part, counts = _SPLIT_WS.get(device.index, (None, None))
    if part is None or part.numel() < floats:
        part = torch.empty(floats, dtype=torch.float32, device=device)
    if counts is None or counts.numel() < ints:
        counts = torch.zeros(ints, dtype=torch.int32, device=device)
    _SPLIT_WS[device.index] = (part, counts)
    return part, counts


class _GemmLauncher:
    """A loaded Hopper GEMM and what its variant adds per call: tensor maps of x and W in place
    of their pointers (tma; runtime/tma.py caches them), the device's SM count (persistent), the
    split tail's workspace (tail_split)."""

    __slots__ = ("plan", "launcher", "sms", "ws")

    def __init__(self, plan, launcher, sms: int, device: torch.device | None = None):
        self.plan, self.launcher, self.sms = plan, launcher, persistent_ctas(plan, launcher, sms)
        self.ws = split_workspace(device, *plan.workspace(self.sms)) if getattr(plan, "tail_split", 0) else ()

    def __call__(self, rows: int, args: list) -> None:
        if self.plan.tma:
            boxes = self.plan.tma_boxes
            args = [tensor_map(args[0], boxes["x"]), tensor_map(args[1], boxes["w"]), *args[2:]]
            if self.plan.tma_store:   # out (the call's y: contiguous, 16-byte aligned) by its map
                args[-2] = tensor_map(args[-2], boxes["out"])
        self.launcher((rows, self.sms) if self.plan.persistent else (rows,), [*args, *self.ws])


def persistent_ctas(plan, launcher, sms: int) -> int:
    """The CTAs a persistent Hopper GEMM's grid may hold (its ABI's SMS): one an SM, or for a
    cluster plan the CTAs of as many clusters as the device holds at once (the driver's count:
    clusters are placed within GPCs, so fewer than SMs / 2 pairs may fit)."""
    if getattr(plan, "cluster", 1) == 1:
        return sms
    c = plan.cluster
    return c * max(1, launcher.function.max_active_clusters(c, plan.abi.block[0], plan.shared_bytes))


def gemm_plan(dtype: torch.dtype, n: int, k: int, gated, bias: bool, residual: bool, variant: str, bn: int):
    """The Hopper GEMM's plan of a gemv call on `variant` (GEMM_KERNELS) at tile width `bn`: the variant's options,
    TMA stores where it has them (GEMM_TMA_STORE; no residual, 16-byte output rows). ValueError where the plan
    cannot take the problem."""
    opts = dict(GEMM_KERNELS[variant])
    if (GEMM_TMA_STORE and variant in TMA_STORE_VARIANTS and not residual
            and (n // 2 if gated else n) % 8 == 0):
        opts["tma_store"] = True
    return plan_gemm("bf16" if dtype == torch.bfloat16 else "f16", n=n, k=k, gated=gated, bias=bias,
                     residual=residual, bn=bn, **opts)


def _gemm_launcher(x: torch.Tensor, n: int, k: int, gated, bias: bool, residual: bool, cache=None,
                   variant: str = "wgmma", rows: int = 0, bn: int = 0) -> _GemmLauncher:
    sms = device_properties(x.device).multi_processor_count
    bn = bn or GEMM_BN or pick_bn(rows, n // 2 if gated else n, bool(gated), sms)
    key = ("gemm", x.dtype, n, k, gated, bias, residual, x.device.index, variant, bn, GEMM_TMA_STORE)
    hit = _KERNELS.get(key)
    if hit is None:
        from .launch import load_plan
        plan = gemm_plan(x.dtype, n, k, gated, bias, residual, variant, bn)
        hit = _KERNELS[key] = _GemmLauncher(plan, load_plan(plan, x.device, cache), sms, x.device)
    return hit


class _StreamLauncher:
    """A loaded decode-range GEMM with its tensor maps and its workspace: the partial sums of
    split tiles (f32, two slots a CTA) and the per-tile counters (zero; the kernel leaves them
    zero), allocated once a launcher, so calls through one launcher must be ordered (one stream)."""

    __slots__ = ("plan", "launcher", "sms", "part", "counts")

    def __init__(self, plan, launcher, sms: int, device: torch.device):
        self.plan, self.launcher, self.sms = plan, launcher, sms
        grid = plan.abi.grid_for(plan.mt, sms)[0]
        self.part = torch.empty(plan.workspace_floats(grid), dtype=torch.float32, device=device)
        self.counts = torch.zeros(plan.tiles, dtype=torch.int32, device=device)

    def __call__(self, rows: int, args: list) -> None:
        boxes = self.plan.tma_boxes   # a packed plan's W is already in codegen/gemm_stream.pack_weight's layout
        w = args[1] if self.plan.packed else tensor_map(args[1], boxes["w"])
        args = [tensor_map(args[0], boxes["x"]), w, *args[2:], self.part, self.counts]
        self.launcher((rows, self.sms), args)


def _stream_launcher(x: torch.Tensor, n: int, k: int, gated, bias: bool, residual: bool, cache=None,
                     rows: int = 0, **split) -> _StreamLauncher:
    from ..codegen.tuning import generation
    mt = token_tile(rows)
    # the tables' generation: a quantised W is packed for the plan plan_gemm_stream gives now (runtime/quant.py)
    key = ("gemm_stream", x.dtype, n, k, mt, gated, bias, residual, x.device.index, tuple(sorted(split.items())),
           generation())
    hit = _KERNELS.get(key)
    if hit is None:
        from .launch import load_plan
        plan = plan_gemm_stream("bf16" if x.dtype == torch.bfloat16 else "f16", n=n, k=k, mt=mt, gated=gated,
                                bias=bias, residual=residual, **split)
        hit = _KERNELS[key] = _StreamLauncher(plan, load_plan(plan, x.device, cache),
                                              device_properties(x.device).multi_processor_count, x.device)
    return hit


def stream_route(x: torch.Tensor, weight: torch.Tensor, gated: str | None) -> bool:
    """Whether gemv sends x @ weight^T (no norm prologue) to the decode-range GEMM: STREAM_ROWS
    rows and operands it takes."""
    rows = x.numel() // max(x.shape[-1], 1)
    return STREAM_ROWS[0] <= rows <= min(STREAM_ROWS[1], stream_max_rows(gated)) and _gemm_ok(x, weight)


def device_major(device: torch.device) -> int:
    """The compute capability's major number of a CUDA device (cached: no driver call per step)."""
    return _capability(device)[0]


def gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *, gated: str | None = None,
         residual: torch.Tensor | None = None, norm: tuple[torch.Tensor, float] | None = None,
         norm_offset: float = 0.0, out: torch.Tensor | None = None, cache=None, kernel: str | None = None,
         kernels: dict | None = None) -> torch.Tensor:
    """rms_norm(x) (when `norm` = (gamma [K], eps): x * rsqrt(mean(x^2) + eps) * (gamma +
    norm_offset)), then x [..., K] @ weight[N, K]^T (+ bias), then act(gate) * up over the two
    output halves when `gated`, then + residual [..., N_out]; the generated kernel where it
    serves the call (see the module's docstring), torch otherwise. kernel="wgmma" runs the
    Hopper GEMM (codegen/gemm.py) whatever the rows (an error where it cannot); "wgmma_tma" and
    "wgmma_persistent" its TMA and persistent variants (GEMM_KERNELS); "stream" the decode-range
    Hopper GEMM (codegen/gemm_stream.py; at most 256 rows, 128 gated), which calls of STREAM_ROWS
    rows also take when that range is set. `kernels`: loaded small-token
    kernels by the rows they take ({8: ..., 16: ...}, a pack's) instead of compiled ones; the
    calls they do not serve run torch's product, never a compile."""
    if kernel is not None and kernel not in GEMM_KERNELS and kernel != STREAM_KERNEL:
        raise LinearInputError(f"kernel must be None or one of {sorted(GEMM_KERNELS) + [STREAM_KERNEL]}, "
                               f"got {kernel!r}")
    if weight.dim() != 2:
        raise LinearInputError(f"weight must be [N, K], got shape {tuple(weight.shape)}")
    n, k = weight.shape
    rows = check_call(x, n, k, bias, gated, residual, norm, norm_offset, out)
    if kernel == STREAM_KERNEL and rows > stream_max_rows(gated):
        raise LinearInputError(f"kernel={kernel!r} takes at most {stream_max_rows(gated)} rows"
                               f"{' gated' if gated else ''}, got {rows}")
    if kernel is None and norm is None and kernels is None and stream_route(x, weight, gated):
        kernel = STREAM_KERNEL
    gemm_bn = 0
    if kernel is None and norm is None and kernels is None and rows > KERNEL_MAX_ROWS and _gemm_ok(x, weight):
        measured = gemm_table_route(x, n, k, rows, gated)   # a tuning table's measured Hopper GEMM
        if measured is not None:
            kernel, gemm_bn = measured
    wgmma = norm is None and kernels is None and (_gemm_ok(x, weight) if kernel is not None else gemm_route(x, weight))
    if kernel is not None and not wgmma:
        raise LinearInputError(f"kernel={kernel!r} needs bf16/f16 CUDA tensors on an sm_90 GPU, K a multiple of 8 "
                               "and no norm")
    if not wgmma and (not _kernel_ok(x, weight, rows) or (
            kernel is None and norm is None and kernels is None and torch_route(x, n, k, rows, gated))):
        y = _torch_product(x, weight, bias, gated, residual, norm, norm_offset, cache)
        return y if out is None else out.copy_(y)
    # the small-token kernel reads W's rows where they are: a row-strided view of a wider buffer
    # (16-byte aligned rows) needs no copy; the GEMMs take W packed
    ldw = _row_stride(weight) if STRIDED_W and not wgmma and kernels is None else 0
    return launch_gemv(x, [weight if ldw else _packed(weight, 16)], n, k, bias, gated, residual, norm, norm_offset,
                       out, cache, wgmma=(kernel or "wgmma_persistent") if wgmma else None, kernels=kernels, ldw=ldw,
                       gemm_bn=gemm_bn)


def _row_stride(w: torch.Tensor) -> int:
    """W's row stride where W is a view whose rows are apart by more than K (unit column stride,
    16-byte aligned start and rows): what the small-token kernel's ldw takes; else 0."""
    n, k = w.shape
    s = w.stride(0)
    return s if (n > 1 and s > k and w.stride(1) == 1 and s % 8 == 0 and w.data_ptr() % 16 == 0) else 0


def check_call(x: torch.Tensor, n: int, k: int, bias, gated, residual, norm, norm_offset, out) -> int:
    """The shape checks of a product of x [..., K] and an [N, K] weight (LinearInputError);
    returns the rows of x."""
    if gated is not None and gated not in GATED:
        raise LinearInputError(f"gated must be one of {GATED} or None, got {gated!r}")
    if norm_offset not in (0.0, 1.0):
        raise LinearInputError(f"norm_offset must be 0 or 1, got {norm_offset!r}")
    if x.shape[-1] != k:
        raise LinearInputError(f"x's last dim {x.shape[-1]} is not the weight's K = {k}")
    if gated and n % 2:
        raise LinearInputError(f"a gated product needs an even number of weight rows (gate then up), got {n}")
    n_out = n // 2 if gated else n
    lead = tuple(x.shape[:-1])
    if bias is not None and tuple(bias.shape) != (n,):
        raise LinearInputError(f"bias must be [{n}], got shape {tuple(bias.shape)}")
    if residual is not None and tuple(residual.shape) != lead + (n_out,):
        raise LinearInputError(f"residual must be {list(lead + (n_out,))}, got {list(residual.shape)}")
    if out is not None and tuple(out.shape) != lead + (n_out,):
        raise LinearInputError(f"out must be {list(lead + (n_out,))}, got {list(out.shape)}")
    if norm is not None:
        gamma, eps = norm
        if tuple(gamma.shape) != (k,):
            raise LinearInputError(f"the norm's weight must be [{k}], got shape {tuple(gamma.shape)}")
        if not isinstance(eps, (int, float)) or isinstance(eps, bool) or eps < 0:
            raise LinearInputError(f"the norm's eps must be a number >= 0, got {eps!r}")
    return x.numel() // k if k else 0


def _packed(t: torch.Tensor, align: int) -> torch.Tensor:
    """t, or a fresh copy where it is not contiguous or its first element is not `align`-byte
    aligned (the kernels read and write rows in 4- to 16-byte vectors; .contiguous() of a
    contiguous view at an odd offset would return the view itself)."""
    return t if t.is_contiguous() and t.data_ptr() % align == 0 else t.clone(memory_format=torch.contiguous_format)


def launch_gemv(x: torch.Tensor, weights: list[torch.Tensor], n: int, k: int, bias, gated, residual, norm,
                norm_offset, out, cache=None, wtype: str | None = None, group: int = 0,
                wgmma: str | None = None, kernels: dict | None = None, ldw: int = 0, gemm_bn: int = 0) -> torch.Tensor:
    """Run the generated kernel on a call check_call accepted and the kernel serves; `weights`
    are W's tensors in the ABI's order (W; a quantised W's then its pairs or row scales);
    `wgmma`: the Hopper GEMM variant (GEMM_KERNELS) instead of the small-token kernel; `ldw`: W's
    row stride where it is a wider buffer's view (the small-token kernel; 0: K, W packed); `gemm_bn`: the Hopper
    GEMM's tile width (0: GEMM_BN or codegen/gemm.pick_bn's)."""
    n_out = n // 2 if gated else n
    lead = tuple(x.shape[:-1])
    rows = x.numel() // k
    gamma, eps = norm if norm is not None else (None, None)
    for name, t in (("bias", bias), ("residual", residual), ("norm weight", gamma), ("out", out)):
        if t is not None and (t.device != x.device or t.dtype != x.dtype):
            raise LinearInputError(f"{name} must be {x.dtype} on {x.device}, got {t.dtype} on {t.device}")
    x2 = _packed(x.reshape(rows, k), 16)
    res = None if residual is None else _packed(residual.reshape(rows, n_out), 16)
    direct = out is not None and out.is_contiguous() and out.data_ptr() % 16 == 0
    y = out.view(rows, n_out) if direct else torch.empty(rows, n_out, dtype=x.dtype, device=x.device)
    args = ([x2, *weights] + ([_packed(bias, 16)] if bias is not None else []) + ([res] if res is not None else [])
            + ([_packed(gamma, 16)] if gamma is not None else []) + [y, rows] + ([float(eps)] if gamma is not None else []))
    if wgmma == STREAM_KERNEL:   # a quantised W (u4) is already in pack_stream_u4's layout
        _stream_launcher(x, n, k, gated, bias is not None, res is not None, cache, rows,
                         **({"wtype": wtype, "group": group} if wtype else {}))(rows, args)
    elif wgmma:
        _gemm_launcher(x, n, k, gated, bias is not None, res is not None, cache, wgmma, rows, gemm_bn)(rows, args)
    elif kernels is not None:   # a pack's kernels (plans for 8 and 16 rows: runtime/build.py)
        kernels[_tiles(rows)]((), args)
    else:
        _launcher(x, n, k, rows, gated, bias is not None, res is not None,
                  None if gamma is None else float(norm_offset), cache, wtype, group, ldw)((), args)
    if out is not None and not direct:
        out.copy_(y.view(out.shape))
        return out
    return y.view(*lead, n_out) if out is None else out


class Linear(torch.nn.Linear):
    """torch.nn.Linear (same parameters, state dict and initialisation) with the generated
    small-token kernel for decode-sized CUDA calls, a fused gated activation and a fused
    residual add (see the module's docstring)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None, dtype=None, *,
                 cache=None):
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self._cache = cache

    def forward(self, x: torch.Tensor, *, gated: str | None = None, residual: torch.Tensor | None = None,
                norm: tuple[torch.Tensor, float] | None = None, norm_offset: float = 0.0) -> torch.Tensor:
        return gemv(x, self.weight, self.bias, gated=gated, residual=residual, norm=norm, norm_offset=norm_offset,
                    cache=self._cache)


class GatedMLP(torch.nn.Module):
    """TensorRT-LLM's GatedMLP (Llama's MLP): residual + down(act(x W_gate^T) * (x W_up^T)), with
    the gate and up weights as one [2 F, H] projection (`gate_up.weight`: the gate rows, then the
    up rows) and `down.weight` [H, F]. Decode-sized CUDA calls run two generated products: the
    gated activation in the first one's epilogue (and an optional RMSNorm of x in its prologue),
    the residual add in the down product's epilogue; other calls run torch's products with the
    same meaning. From a transformers LlamaMLP: `GatedMLP.from_llama(mlp)` (gate_proj, up_proj,
    down_proj)."""

    def __init__(self, hidden_size: int, intermediate_size: int, activation: str = "silu", bias: bool = False,
                 device=None, dtype=None, *, cache=None):
        super().__init__()
        if activation not in GATED:
            raise ValueError(f"activation must be one of {GATED}, got {activation!r}")
        self.activation = activation
        self.gate_up = Linear(hidden_size, 2 * intermediate_size, bias=bias, device=device, dtype=dtype, cache=cache)
        self.down = Linear(intermediate_size, hidden_size, bias=bias, device=device, dtype=dtype, cache=cache)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None, *,
                norm: tuple[torch.Tensor, float] | None = None, norm_offset: float = 0.0) -> torch.Tensor:
        h = self.gate_up(x, gated=self.activation, norm=norm, norm_offset=norm_offset)
        return self.down(h, residual=residual)

    @classmethod
    def from_llama(cls, mlp: torch.nn.Module, activation: str = "silu") -> "GatedMLP":
        """From a module with gate_proj, up_proj and down_proj linears (transformers' LlamaMLP,
        MistralMLP, Qwen2MLP): the weights are copied into the fused layout."""
        g, u, d = mlp.gate_proj, mlp.up_proj, mlp.down_proj
        w = g.weight
        out = cls(g.in_features, g.out_features, activation, bias=g.bias is not None, device=w.device, dtype=w.dtype)
        with torch.no_grad():
            out.gate_up.weight.copy_(torch.cat([g.weight, u.weight]))
            out.down.weight.copy_(d.weight)
            if g.bias is not None:
                out.gate_up.bias.copy_(torch.cat([g.bias, u.bias]))
                out.down.bias.copy_(d.bias)
        return out
