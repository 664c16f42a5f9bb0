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
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from ..codegen.plan import KernelPlan, LoweringError, plan_layer
from ..dsl.errors import DSLError
from ..dsl.program import Program, dims_from_config


@dataclass
class BuiltKernel:
    plan: KernelPlan
    seconds: float
    cached: bool
    registers: int
    spills: int


def plans_for_model(program: Program, bindings: dict[str, Any], dtype: str, arch: str,
                    names: list[str] | None = None, page_size: int = 16, cache=None) -> tuple[list, dict[str, str]]:
    """Plans for every definition whose dims the bindings cover; the others with the reason.

    Layers give row kernels; attention blocks give the tensor-core prefill and decode kernels,
    the CUDA-core paged kernel and, for the model's cache, the KV-append kernel (RoPE fused
    when the block rotates)."""
    from ..codegen.attention import plan_paged_attention
    from ..codegen.attention_tc import plan_tc_attention
    from ..codegen.kv_append import plan_kv_append
    plans, skipped = [], {}
    seen: set[str] = set()
    for name in names or program.names:
        d = program.definition(name)
        is_attention = type(d).__name__ == "AttentionDef"
        try:
            layer = program.specialise(name, dtype=dtype, **program.bindings_for(name, bindings))
            if not is_attention:
                plans.append(plan_layer(layer, arch))
                continue
            for mode in ("prefill", "decode"):
                plans.append(plan_tc_attention(layer, arch, page_size=page_size, mode=mode, cache=cache))
            plan = plan_paged_attention(layer, arch, page_size=page_size)
            plans.append(plan)
            spec = plan.spec
            append = plan_kv_append(dtype, int(spec.num_kv_heads), int(spec.head_dim), page_size, spec.rope, arch)
            if append.key not in seen:
                seen.add(append.key)
                plans.append(append)
        except DSLError as e:
            skipped[name] = f"not specialisable for this model: {e.diagnostics[0].message}"
        except LoweringError as e:
            skipped[name] = str(e)
    return plans, skipped


def _describe(plan) -> dict:
    """Manifest fields that depend on the kernel family."""
    from ..codegen.attention import PagedAttentionPlan
    from ..codegen.attention_tc import TCAttentionPlan
    if isinstance(plan, TCAttentionPlan):
        c = plan.config
        return {"family": "tc_attention", "mode": plan.mode, "layer": plan.layer.name, "dims": dict(plan.layer.dims),
                "consts": {k: v for k, v in plan.layer.consts}, "dtype": str(plan.layer.dtype),
                "kernels": [plan.kernel_name, plan.merge_name], "page_size": plan.page_size,
                "block": [c.threads, 1, 1], "shared_bytes": plan.shared_bytes,
                "tiles": {"rows": c.rows, "keys": c.keys, "warps": [c.wm, c.wn], "stages": c.stages}}
    if isinstance(plan, KernelPlan):
        k = plan.lowered()
        return {"family": "row", "layer": plan.layer.name, "dims": dict(plan.layer.dims),
                "consts": {c: v for c, v in plan.layer.consts}, "dtype": str(plan.layer.dtype),
                "kernels": [plan.kernel_name], "block": [k.tpr, k.rpb, 1],
                "args": [{"name": a.name, "kind": a.kind, "ref": a.ref, "ctype": a.ctype} for a in k.args]}
    if isinstance(plan, PagedAttentionPlan):
        return {"family": "paged_attention", "layer": plan.layer.name, "dims": dict(plan.layer.dims),
                "consts": {c: v for c, v in plan.layer.consts}, "dtype": str(plan.layer.dtype),
                "kernels": [plan.kernel_name, plan.merge_name], "page_size": plan.page_size,
                "block": [plan.warps * 32, 1, 1], "heads_per_cta": plan.heads_per_cta}
    return {"family": "kv_append", "layer": None, "dtype": plan.dtype, "kernels": [plan.kernel_name],
            "page_size": plan.page_size, "num_kv_heads": plan.num_kv_heads, "head_dim": plan.head_dim,
            "rope": {"style": plan.rope_style, "theta": plan.rope_theta, "rotary_dim": plan.rotary_dim}}


def build(program: Program, bindings: dict[str, Any], *, dtype: str, arch: str, out_dir: str | os.PathLike,
          names: list[str] | None = None, jobs: int | None = None, cache=None, page_size: int = 16,
          progress: Callable[[str], None] | None = None) -> dict:
    from .cache import default_cache
    from .nvrtc import CompileOptions, nvrtc_version

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cache = cache or default_cache()
    plans, skipped = plans_for_model(program, bindings, dtype, arch, names, page_size, cache)
    options = CompileOptions(arch)
    say = progress or (lambda s: None)
    t0 = time.perf_counter()

    def one(plan):
        src = plan.source()
        before = cache.stats.misses
        t = time.perf_counter()
        res = cache.get_or_compile(src, plan.kernel_name, options, plan.key)
        dt = time.perf_counter() - t
        _write_if_changed(out / f"{plan.key}.cu", src.encode())
        _write_if_changed(out / f"{plan.key}.cubin", res.cubin)
        kr = next(iter(res.resources.values()), None)
        return plan, res, dt, cache.stats.misses == before, kr

    entries = []
    done = 0
    with ThreadPoolExecutor(max_workers=jobs or min(8, os.cpu_count() or 2)) as pool:
        for plan, res, dt, hit, kr in pool.map(one, plans):
            done += 1
            spilled = sum(r.spill_stores for r in res.resources.values())
            regs = max((r.registers for r in res.resources.values()), default=0)
            say(f"[{done}/{len(plans)}] {plan.key:48s} {'cached' if hit else f'{dt:5.2f} s'}"
                f"  {regs} regs, {spilled} B spilled")
            entries.append({
                "key": plan.key, **_describe(plan), "arch": arch, "source": f"{plan.key}.cu",
                "cubin": f"{plan.key}.cubin", "cubin_sha256": hashlib.sha256(res.cubin).hexdigest(),
                "registers": regs, "spill_bytes": spilled, "compile_seconds": round(dt, 4), "cached": hit,
            })
    from .cache import layerforge_version
    manifest = {
        "layerforge": layerforge_version(), "nvrtc": ".".join(map(str, nvrtc_version())), "arch": arch,
        "dtype": dtype, "bindings": bindings, "kernels": entries, "skipped": skipped,
        "build_seconds": round(time.perf_counter() - t0, 3),
    }
    _write_if_changed(out / "manifest.json", (json.dumps(manifest, indent=1, sort_keys=True) + "\n").encode())
    return manifest


def _write_if_changed(path: Path, data: bytes) -> None:
    if path.exists() and path.read_bytes() == data:
        return
    tmp = path.with_suffix(path.suffix + f".tmp{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def program_and_bindings(args) -> tuple[Program, dict[str, Any]]:
    """The CLI's `FILE --config config.json --dims NAME=VALUE,...`: the program and its bindings."""
    program = Program.from_file(args.file, with_stdlib=True) if args.file else Program.stdlib()
    bindings: dict[str, Any] = dims_from_config(args.config) if args.config else {}
    for item in args.dims or []:
        for part in item.split(","):
            if not part.strip():
                continue
            if "=" not in part:
                raise SystemExit(f"--dims takes NAME=VALUE pairs, got {part!r}")
            k, v = part.split("=", 1)
            bindings[k.strip()] = _number(v.strip())
    return program, bindings


def cli_build(args) -> int:
    program, bindings = program_and_bindings(args)
    arch = args.arch or _default_arch()
    names = args.layers.split(",") if args.layers else None
    show = (lambda s: print(s, file=sys.stderr, flush=True)) if not args.quiet else None
    m = build(program, bindings, dtype=args.dtype, arch=arch, out_dir=args.output, names=names, jobs=args.jobs,
              progress=show)
    n = len(m["kernels"])
    print(f"built {n} kernel{'s' * (n != 1)} for {arch} in {m['build_seconds']:.2f} s -> {args.output}/manifest.json")
    for name, why in m["skipped"].items():
        print(f"  skipped {name}: {why}")
    return 0 if n else 1


def _number(v: str):
    low = v.lower()
    if low in ("true", "false"):
        return low == "true"
    try:
        return int(v)
    except ValueError:
        return float(v)


def _default_arch() -> str:
    try:
        import torch
        if torch.cuda.is_available():
            return "sm_%d%d" % torch.cuda.get_device_capability()
    except Exception:
        pass
    raise SystemExit("no GPU here: pass --arch (e.g. --arch sm_90)")
