"""Ahead-of-time builds: a model's layers -> CUDA sources, cubins and a manifest.

    layerforge build --config config.json --dtype bf16 --arch sm_90 -o out/llama

writes `<key>.cu` and `<key>.cubin` per kernel and `manifest.json` (what each kernel is, its
launch shape and argument layout, resources, checksums). Kernels compile in parallel through
the disk cache, so a second build is nearly free; a pack loads without NVRTC.
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable

from ..codegen.families import plans_for_layer
from ..codegen.linear_lower import match_linear
from ..codegen.plan import KernelPlan, LoweringError, layer_interface
from ..dsl.ast import AttentionDef
from ..dsl.errors import DSLError
from ..dsl.program import Program, dims_from_config
from ..dsl.types import DType
from .pack import MANIFEST_FORMAT



def plans_for_model(program: Program, bindings: dict[str, Any], dtype: str, arch: str,
                    names: list[str] | None = None, page_size: int = 16, cache=None,
                    kv_dtype: str | None = None, progress: Callable[[str], None] | None = None,
                    definitions: list[tuple[str, dict[str, Any]]] | None = None, kv_cache: str | None = None,
                    products: dict[str, list[dict[str, Any]]] | None = None) -> tuple[list, dict[str, str]]:
    """Plans for every definition whose dims the bindings cover (codegen.families decides
    which kernels a definition needs; shared ones, like a KV append, appear once); the others
    with the reason. Attention blocks and their KV cache take `kv_dtype` (default: `dtype`);
    `kv_cache` ("fp8_e4m3") stores the cache in another format, read by the attention kernels.
    An unknown name in `names` is a ValueError before anything is planned. Planning an
    attention block compiles its tile candidates, which takes seconds: `progress` gets a line
    per definition.

    `definitions` (instead of `names`): (name, bindings) pairs, each specialised with its own
    bindings over `bindings` (models.families.definitions_for: a model's definitions, an
    attention block once per const set); a name given twice is reported as `name[i]`.

    `products`, when given, receives for each small-token product plan (a product layer's kernel
    for up to 8 or up to 16 rows) the layers it serves: name, dims, consts, interface and the
    fused pattern (codegen/linear_lower.py), what a pack needs to make their modules."""
    from .launch import compile_fn
    if definitions is None:
        names = list(names) if names else program.names
        definitions = [(n, {}) for n in names]
    elif names:
        raise ValueError("plans_for_model: give names or definitions, not both")
    check_definition_names(program, [n for n, _ in definitions])
    say = progress or (lambda s: None)
    plans, skipped = [], {}
    seen: set[str] = set()
    tile_compile = compile_fn(cache)
    counts: dict[str, int] = {}
    for n, _ in definitions:
        counts[n] = counts.get(n, 0) + 1
    index: dict[str, int] = {}
    for i, (name, own) in enumerate(definitions, 1):
        t0 = time.perf_counter()
        label = name
        if counts[name] > 1:
            index[name] = index.get(name, 0) + 1
            label = f"{name}[{index[name]}]"
        try:
            is_attention = isinstance(program.definition(name), AttentionDef)
            t = (kv_dtype or dtype) if is_attention else dtype
            layer = program.specialise(name, dtype=t, **program.bindings_for(name, {**bindings, **own}))
            for plan in plans_for_layer(layer, arch, page_size=page_size, compile_fn=tile_compile,
                                        kv_cache=kv_cache if is_attention else None):
                if plan.key not in seen:
                    seen.add(plan.key)
                    plans.append(plan)
                if products is not None and plan.family == "gemv":   # a product layer's (linear_plans)
                    products.setdefault(plan.key, []).append(
                        {"layer": name, "dims": dict(layer.dims), "consts": dict(layer.consts),
                         "interface": layer_interface(layer), "linear": match_linear(layer).to_json()})
        except DSLError as e:
            skipped[label] = f"not specialisable for this model: {e.diagnostics[0].message}"
        except LoweringError as e:
            skipped[label] = str(e)
        say(f"[plan {i}/{len(definitions)}] {label:40s} "
            + ("skipped" if label in skipped else f"{time.perf_counter() - t0:5.2f} s"))
    return plans, skipped


def check_definition_names(program: Program, names: list[str]) -> None:
    """A ValueError naming the first name that is no definition of `program` (with close names)."""
    for name in names:
        try:
            program.definition(name)
        except KeyError as e:
            raise ValueError(e.args[0]) from None


def manifest_entry(plan: KernelPlan) -> dict[str, Any]:
    """A kernel's manifest entry: family, key, its kernels' ABIs, and the family's fields."""
    return {"key": plan.key, "family": plan.family, "arch": plan.arch, "kernels": [k.to_json() for k in plan.kernels],
            **plan.describe()}


def build(program: Program, bindings: dict[str, Any], *, dtype: str, arch: str, out_dir: str | os.PathLike,
          names: list[str] | None = None, jobs: int | None = None, cache=None, page_size: int = 16,
          kv_dtype: str | None = None, progress: Callable[[str], None] | None = None, trt: bool = False,
          definitions: list[tuple[str, dict[str, Any]]] | None = None, kv_cache: str | None = None,
          extra_plans: tuple[list[KernelPlan], dict[str, str]] | None = None) -> dict:
    """`extra_plans`: (plans, skipped) of kernels no DSL definition describes (model_plans), built
    with the definitions' plans."""
    t0 = time.perf_counter()
    from .cache import default_cache, layerforge_version
    from .launch import compile_plan, plan_cache_key
    from .nvrtc import nvrtc_version

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cache = cache or default_cache()
    say = progress or (lambda s: None)
    already_compiled = cache.compiled_keys()   # by this process, before this build
    products: dict[str, list[dict[str, Any]]] = {}
    plans, skipped = plans_for_model(program, bindings, dtype, arch, names, page_size, cache, kv_dtype, say,
                                     definitions, kv_cache, products)
    if extra_plans is not None:
        keys = {p.key for p in plans}
        plans += [p for p in extra_plans[0] if p.key not in keys]
        skipped.update(extra_plans[1])

    def one(plan):
        src = plan.source()
        res = compile_plan(plan, cache)
        _write_if_changed(out / f"{plan.key}.cu", src.encode())
        _write_if_changed(out / f"{plan.key}.cubin", res.cubin)
        # compiled by this build, here or while its tile search probed it during planning
        return plan, res, plan_cache_key(plan, cache) in cache.compiled_keys() - already_compiled

    entries = []
    done = 0
    with ThreadPoolExecutor(max_workers=jobs or min(8, os.cpu_count() or 2)) as pool:
        for plan, res, compiled in pool.map(one, plans):
            done += 1
            spilled = sum(r.spill_stores for r in res.resources.values())
            regs = max((r.registers for r in res.resources.values()), default=0)
            say(f"[{done}/{len(plans)}] {plan.key:48s} {f'{res.compile_seconds:5.2f} s' if compiled else 'cached':>7}"
                f"  {regs} regs, {spilled} B spilled")
            entries.append({
                **manifest_entry(plan), "source": f"{plan.key}.cu", "cubin": f"{plan.key}.cubin",
                "cubin_sha256": hashlib.sha256(res.cubin).hexdigest(), "registers": regs, "spill_bytes": spilled,
                "compile_seconds": round(res.compile_seconds, 4) if compiled else 0.0, "cached": not compiled,
                **({"layers": products[plan.key]} if plan.key in products else {}),
            })
    if trt:
        write_trt_plugins(plans, out / "trt", arch, cache)
    manifest = {
        "format": MANIFEST_FORMAT, "layerforge": layerforge_version(), "nvrtc": ".".join(map(str, nvrtc_version())),
        "arch": arch, "dtype": dtype, "kv_dtype": kv_dtype or dtype, "kv_cache": kv_cache, "page_size": page_size,
        "bindings": bindings, "kernels": entries,
        "skipped": skipped, "build_seconds": round(time.perf_counter() - t0, 3),   # planning (tile searches) included
    }
    _write_if_changed(out / "manifest.json", (json.dumps(manifest, indent=1, sort_keys=True) + "\n").encode())
    return manifest


def write_trt_plugins(plans: list[KernelPlan], folder: Path, arch: str, cache) -> None:
    """`build --trt`: TensorRT plugin sources for the plans (codegen/trt_render.py) in `folder`;
    the AOT entries' PTX comes through the disk cache like every compile."""
    from ..codegen.trt_render import plugin_files
    from .nvrtc import CompileOptions

    def compile_ptx(source: str, name: str, key: str) -> str:
        return cache.get_or_compile(source, name, CompileOptions(arch), key, want_ptx=True).ptx
    folder.mkdir(parents=True, exist_ok=True)
    files = plugin_files(plans, arch=arch, cubin_files={p.key: f"{p.key}.cubin" for p in plans}, compile_ptx=compile_ptx)
    for name, text in files.items():
        _write_if_changed(folder / name, text.encode())


def _write_if_changed(path: Path, data: bytes) -> None:
    if path.exists() and path.read_bytes() == data:
        return
    tmp = path.with_suffix(path.suffix + f".tmp{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def program_and_bindings(args) -> tuple[Program, dict[str, Any]]:
    """The CLI's `FILE --config config.json --dims NAME=VALUE,...`: the program and its bindings.
    A config that cannot be read or is no JSON object, and a `--dims` name that is no static dim
    or const parameter of the program, are ValueErrors naming it."""
    program = Program.from_file(args.file, with_stdlib=True) if args.file else Program.stdlib()
    bindings: dict[str, Any] = dims_from_config(read_config(args.config)) if args.config else {}
    bindings.update(explicit_dims(program, args))
    return program, bindings


def explicit_dims(program: Program, args) -> dict[str, Any]:
    """`--dims NAME=VALUE,...` as a dict (names checked against the program)."""
    out: dict[str, Any] = {}
    for item in args.dims or []:
        for part in item.split(","):
            if not part.strip():
                continue
            if "=" not in part:
                raise SystemExit(f"--dims takes NAME=VALUE pairs, got {part!r}")
            k, v = part.split("=", 1)
            out[_bindable_name(program, k.strip())] = _number(v.strip())
    return out


def model_definitions(program: Program, args) -> list[tuple[str, dict[str, Any]]] | None:
    """What `build --config` builds without --layers or a DSL file, for a config whose model_type
    models/families.py knows: the definitions that model uses (definitions_for), each with its
    bindings and `--dims` over them; None otherwise (every definition the bindings fit)."""
    if not args.config or args.layers or args.file:
        return None
    from ..models import families
    config = read_config(args.config)
    if config.get("model_type") not in (*families.FAMILIES, *families.SSM_FAMILIES):
        return None
    extra = explicit_dims(program, args)
    return [(name, {**b, **extra}) for name, b in families.definitions_for(families.spec_from_config(config))]


def model_plans(config: dict[str, Any], dtype: str, arch: str) -> tuple[list[KernelPlan], dict[str, str]]:
    """(plans, skipped) of the kernels a model's modules launch that no DSL definition describes
    yet, for a config whose model_type models/families.py knows, each as the mixer launches it
    (runtime/mamba.py: weights and conv bias in the model dtype; A, D and the Δ bias in f32):
    Mamba's causal conv (a first prompt chunk and a continued one), its decode step over the
    K-wide state, the selective scan at every tiling a prompt length picks (scan_tiles), with and
    without carried states, and the state update; Mamba2's channels-last conv (read inside
    in_proj's output), its decode step, and the SSD kernels (codegen/ssd.py: the chunk states,
    the state passing without and with an initial state, the chunk scan with the D skip and no z,
    the decode update). Nothing for other models."""
    from ..models import families
    kind = config.get("model_type")
    if kind not in ("mamba", "mamba2"):
        return [], {}
    from ..codegen.scan import plan_conv, plan_conv_update, plan_selective_scan, plan_state_update, scan_tilings
    m = families.spec_from_config(config).mixer
    channels = m.intermediate_size if kind == "mamba" else m.conv_dim
    conv = dict(channels=channels, width=m.conv_kernel, dtype=dtype, weight_dtype=dtype,
                bias=dtype if m.use_conv_bias else None, silu=True, arch=arch)
    layout = {}
    if kind == "mamba2":   # xBC read inside in_proj's output: 16-byte vectors when its columns and rows allow
        size = DType[dtype].itemsize
        row = m.intermediate_size + m.conv_dim + m.num_heads
        layout = dict(channels_last=True, vector=m.conv_dim * size % 16 == 0 and row * size % 16 == 0
                      and m.intermediate_size * size % 16 == 0)
    try:
        plans = [plan_conv(**conv, initial=initial, **layout) for initial in (False, True)]
        plans.append(plan_conv_update(**conv, state_dtype=dtype))
    except ValueError as e:
        return [], {f"scan conv ({kind}'s causal conv)": f"not served for this model: {e}"}
    if kind == "mamba":
        scan = dict(channels=m.intermediate_size, state=m.state_size, dtype=dtype, a_dtype="f32", d_dtype="f32",
                    bias_dtype="f32", gate=True, softplus=True, arch=arch)
        try:
            plans += [plan_selective_scan(**scan, initial=carry, final=carry, threads=threads, items=n)
                      for threads, n in scan_tilings() for carry in (False, True)]
            # the decode step's: A_log, D and dt_proj's bias in the model dtype, A = -exp(A_log) inside
            plans.append(plan_state_update(**{**scan, "a_dtype": dtype, "d_dtype": dtype, "bias_dtype": dtype},
                                           a_log=True))
        except ValueError as e:
            return plans, {"selective scan (Mamba's scan)": f"not served for this model: {e}"}
        return plans, {}
    from ..codegen.ssd import (cb_table_default, plan_ssd_chunk_cb, plan_ssd_chunk_scan, plan_ssd_chunk_state,
                               plan_ssd_state_passing, plan_ssd_state_update)
    dims = dict(heads=m.num_heads, head_dim=m.head_dim, state=m.state_size, dtype=dtype, arch=arch)
    ssd = dict(dims, groups=m.n_groups, dt_bias=True, softplus=True)
    cb = dtype != "f32" and cb_table_default()
    try:
        plans += [plan_ssd_chunk_state(**ssd, chunk=m.chunk_size),
                  plan_ssd_state_passing(**dims, initial=False), plan_ssd_state_passing(**dims, initial=True),
                  plan_ssd_chunk_scan(**ssd, chunk=m.chunk_size, skip=True, gate=False),
                  # the scores' table and the chunk scan that reads it (LAYERFORGE_SSD_CB, the default at bf16 /
                  # f16: what the mixer runs); the form above computes the scores itself, for the TensorRT
                  # plugins (codegen/trt.py serves no pair of launches sharing a table) and LAYERFORGE_SSD_CB=0
                  *([plan_ssd_chunk_scan(**ssd, chunk=m.chunk_size, skip=True, gate=False, cb_table=True),
                     plan_ssd_chunk_cb(groups=m.n_groups, state=m.state_size, chunk=m.chunk_size, dtype=dtype,
                                       arch=arch)] if cb else []),
                  # the decode step's: z, A_log, D and dt_bias read as the mixer holds them
                  plan_ssd_state_update(**ssd, skip=True, gate=True, params=dtype, a_log=True)]
    except ValueError as e:
        return plans, {"ssd (Mamba2's chunked scan)": f"not served for this model: {e}"}
    return plans, {}


def read_config(path: str) -> dict[str, Any]:
    """A config.json as a dict; a missing file, bad JSON or a JSON value that is no object is a
    ValueError naming the file."""
    try:
        config = json.loads(Path(path).read_text())
    except OSError as e:
        raise ValueError(f"cannot read --config {path}: {e.strerror}") from None
    except ValueError as e:   # bad JSON or bad UTF-8
        raise ValueError(f"--config {path} is not JSON: {e}") from None
    if not isinstance(config, dict):
        raise ValueError(f"--config {path} must hold a JSON object (a model's config.json), "
                         f"not a {type(config).__name__}")
    return config


def _bindable_name(program: Program, name: str) -> str:
    """`name` if `--dims` can bind it: a static dim or a const parameter of some definition."""
    info = program.info
    if name in info.static_dims or any(name in program.const_params(d) for d in program.names):
        return name
    if name in info.dynamic_dims:
        raise ValueError(f"--dims {name}: '{name}' is a dynamic dim, bound at run time from the inputs' shapes")
    import difflib
    known = sorted(set(info.static_dims) | {c for d in program.names for c in program.const_params(d)})
    close = difflib.get_close_matches(name, known, n=3)
    raise ValueError(f"--dims {name}: no dim or const parameter of that name"
                     + (f"; did you mean {', '.join(close)}?" if close else ""))


def cli_build(args) -> int:
    program, bindings = program_and_bindings(args)
    arch = args.arch or _default_arch()
    names = args.layers.split(",") if args.layers else None
    if names:
        check_definition_names(program, names)
    _check_writable(Path(args.output))
    definitions = model_definitions(program, args)
    extra = model_plans(read_config(args.config), args.dtype, arch) if definitions is not None else None
    show = (lambda s: print(s, file=sys.stderr, flush=True)) if not args.quiet else None
    m = build(program, bindings, dtype=args.dtype, arch=arch, out_dir=args.output, names=names, jobs=args.jobs,
              page_size=args.page_size, kv_dtype=args.kv_dtype, progress=show, trt=args.trt,
              definitions=definitions, kv_cache=args.kv_cache, extra_plans=extra)
    n = len(m["kernels"])
    print(f"built {n} kernel{'s' * (n != 1)} for {arch} in {m['build_seconds']:.2f} s -> {args.output}/manifest.json")
    for name, why in m["skipped"].items():
        print(f"  skipped {name}: {why}")
    return 0 if n else 1


def _check_writable(folder: Path) -> None:
    """`-o`: made if missing; a ValueError naming it if it cannot be made or written to, before
    any (slow) planning."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        if not os.access(folder, os.W_OK | os.X_OK):
            raise PermissionError(13, "Permission denied")
    except OSError as e:
        raise ValueError(f"cannot write the output folder {folder}: {e.strerror or e}") from None


def _number(v: str):
    low = v.lower()
    if low in ("true", "false"):
        return low == "true"
    try:
        return int(v)
    except ValueError:
        return float(v)


def _default_arch() -> str:
    from .nvrtc import default_arch
    try:
        return default_arch()
    except RuntimeError:
        raise SystemExit("no GPU here: pass --arch (e.g. --arch sm_90)") from None
