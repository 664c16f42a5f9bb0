"""TensorRT plugin sources from PluginSpecs (codegen/trt.py), through templates/trt/.

    entry = aot_entry(spec, plan.source())        # the kernel under TensorRT's AOT calling convention
    files = render_plugins(specs, excluded, arch=..., entries=..., cubins=...)   # file name -> text

Two deployments of the same kernels:
  * `layerforge_trt_plugins.py`: TensorRT Quickly-Deployable Plugins (`tensorrt.plugin`,
    TensorRT >= 10.9): `register` (output shapes and dtypes), `autotune` (the dtypes) and
    `aot_impl` (PTX, launch grid/block/shared memory as symbolic expressions, extra arguments).
    TensorRT launches an AOT kernel as `kernel(inputs..., extra int32 arguments..., outputs...)`,
    so each kernel gets an entry (`aot_entry`): a `__global__` function in that order that calls
    the plan's kernel body, made a `__device__` function of the same source, with the int32
    extras widened (`long long` dims) or reinterpreted (`float` scalars travel as their bits).
  * `layerforge_plugins.cpp` + `CMakeLists.txt`: IPluginV3 plugins (OneCore/OneBuild/OneRuntime)
    and their IPluginCreatorV3One, launching the pack's own cubin with the driver API and the
    kernel's own argument order: no entry needed.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Callable

from . import trt_exprs as ex
from .render import render
from .plan import KernelPlan
from .trt import NAMESPACE, TRT_DTYPES, PluginSpec, plugin_specs

__all__ = ["AotEntry", "aot_entry", "plugin_files", "render_plugins", "PYTHON_MODULE", "CPP_SOURCE", "CompilePtx"]

# (CUDA source, kernel symbol, cache key) -> PTX; given by the runtime (codegen never imports it)
CompilePtx = Callable[[str, str, str], str]

PYTHON_MODULE = "layerforge_trt_plugins.py"
CPP_SOURCE = "layerforge_plugins.cpp"


@dataclass(frozen=True)
class AotEntry:
    name: str          # extern "C" symbol TensorRT launches
    source: str        # CUDA C: the plan's source, its main kernel as a device function, and the entry
    extras: tuple      # (kernel argument, Python expression of its int32 value), in order


def aot_entry(spec: PluginSpec, plan_source: str) -> AotEntry:
    abi = spec.kernel
    decl = re.compile(r'extern "C" __global__ void (__launch_bounds__\([^()]*\))\s*' + re.escape(abi.name) + r"\(")
    found = decl.findall(plan_source)
    if len(found) != 1:
        raise ValueError(f"{abi.name}: expected one declaration of the kernel in its source, found {len(found)}")
    body = decl.sub(f"static __device__ __forceinline__ void {abi.name}_body(", plan_source)
    by_source = {spec.source_of(a): a for a in abi.args}
    inputs = [by_source.get(("input", i)) for i in range(len(spec.inputs))]
    outputs = [by_source.get(("output", i)) for i in range(len(spec.outputs))]
    extras = [a for a in abi.args if spec.source_of(a)[0] in ("size", "attribute")]
    params = [f"{a.ctype} {a.name}" if a else f"const void* __restrict__ lf_unused_in{i}" for i, a in enumerate(inputs)]
    params += [f"int {a.name}" for a in extras]
    params += [f"{a.ctype} {a.name}" if a else f"void* __restrict__ lf_unused_out{i}" for i, a in enumerate(outputs)]
    name = abi.name + "_trt"
    source = render("trt/aot_entry.cu.jinja", kernel_source=body, body_name=abi.name + "_body", entry_name=name,
                    launch_bounds=found[0], params=params, call_args=[_call_arg(spec, a) for a in abi.args],
                    plugin=spec.name)
    return AotEntry(name=name, source=source, extras=tuple((a.name, _extra_value(spec, a)) for a in extras))


def _call_arg(spec: PluginSpec, a) -> str:
    kind, _ = spec.source_of(a)
    if kind == "null":
        return "nullptr"
    ctype = a.ctype.replace("const ", "").strip()
    if kind in ("input", "output") or ctype == "int":
        return a.name
    return f"__int_as_float({a.name})" if ctype == "float" else f"({ctype}){a.name}"


def _extra_value(spec: PluginSpec, a) -> str:
    kind, ref = spec.source_of(a)
    if kind == "attribute":
        return f"_f32_bits({ref})" if a.ctype.strip() == "float" else f"int({ref})"
    return ex.python(ref)


def plugin_files(plans: list[KernelPlan], *, arch: str, cubin_files: dict[str, str], compile_ptx: CompilePtx
                 ) -> dict[str, str]:
    """Every file of a pack's `trt/` folder: the AOT entries' sources and PTX, the Python
    module, the C++ library source, its CMakeLists.txt and a README. `cubin_files` names
    each plan's cubin in the pack."""
    specs, excluded = plugin_specs(plans)
    sources = {p.key: p for p in plans}
    entries, files = {}, {}
    for s in specs:
        if s.qdp_reason is None:
            entry = entries[s.name] = aot_entry(s, sources[s.name].source())
            files[f"{s.name}.trt.cu"] = entry.source
            files[f"{s.name}.trt.ptx"] = compile_ptx(entry.source, entry.name, s.name + "_trt")
    files.update(render_plugins(specs, excluded, arch=arch, entries=entries,
                                cubins={s.name: cubin_files[s.name] for s in specs}))
    return files


def render_plugins(specs: list[PluginSpec], excluded: dict[str, str], *, arch: str, entries: dict[str, AotEntry],
                   cubins: dict[str, str]) -> dict[str, str]:
    """The plugin sources: file name -> text. `entries` holds the AOT entry of each spec the
    Python module serves (its PTX file is `<key>.trt.ptx`); `cubins` the cubin file of every
    spec (embedded by the C++ library's build)."""
    qdp = [_python_context(s, entries[s.name]) for s in specs if s.name in entries]
    not_qdp = {s.name: s.qdp_reason for s in specs if s.name not in entries}
    cpp = [_cpp_context(s, cubins[s.name]) for s in specs]
    return {
        PYTHON_MODULE: render("trt/qdp_plugins.py.jinja", namespace=NAMESPACE, arch=arch, plugins=qdp,
                              excluded={**excluded, **not_qdp}),
        CPP_SOURCE: render("trt/plugins.cpp.jinja", namespace=NAMESPACE, arch=arch, plugins=cpp, excluded=excluded),
        "CMakeLists.txt": render("trt/CMakeLists.txt.jinja", arch=arch, cubins=[c["cubin"] for c in cpp]),
        "README.md": render("trt/README.md.jinja", namespace=NAMESPACE, arch=arch,
                            python=[(s.name, s.form) for s in specs if s.name in entries],
                            cpp=[(s.name, s.form) for s in specs], excluded=excluded, not_qdp=not_qdp),
    }


# ---- template contexts -----------------------------------------------------------------------
def _python_context(spec: PluginSpec, entry: AotEntry) -> dict:
    abi = spec.kernel
    return {
        "key": spec.name, "form": spec.form, "entry": entry.name, "ptx": f"{spec.name}.trt.ptx",
        "inputs": [t.name for t in spec.inputs], "attributes": [(a.name, "float" if a.dtype == "f32" else "int", a.default)
                                                                for a in spec.attributes],
        "dims": [f"v_{d} = {spec.inputs[i].name}[{axis}]" for d, i, axis in spec.dims],
        "static": [(t.name, axis, int(e)) for t in spec.inputs for axis, e in enumerate(t.shape) if e.isdigit()],
        "sizes": [f"v_{n} = {ex.python(e)}" for n, e in spec.sizes],
        "limits": [(ex.python(e), least, "None" if most is None else most, e) for e, least, most in spec.limits],
        "outputs": [(_py_tuple(ex.python(e) for e in t.shape), TRT_DTYPES[t.dtype][0]) for t in spec.outputs],
        "grid": [ex.python(g) for g in abi.grid], "block": list(abi.block), "shared_mem": abi.shared_bytes,
        "extras": _py_tuple(v for _, v in entry.extras), "extra_names": [n for n, _ in entry.extras],
        "io_types": ", ".join(TRT_DTYPES[t.dtype][1] for t in (*spec.inputs, *spec.outputs)),
        "aliased": [spec.inputs[i].name for i in spec.aliases if i >= 0],   # outputs written into these inputs
        "tensor_params": [f"{t.name}: TensorDesc" for t in spec.inputs],
        "attribute_params": [f"{a.name}: {'float' if a.dtype == 'f32' else 'int'}" for a in spec.attributes],
        "shape_args": [f"{t.name}.shape_expr" for t in spec.inputs],
        "desc_type": "TensorDesc" if len(spec.outputs) == 1 else f"Tuple[{', '.join(['TensorDesc'] * len(spec.outputs))}]",
    }


def _py_tuple(items) -> str:
    items = list(items)
    return "(" + ", ".join(items) + ("," if len(items) == 1 else "") + ")"


def _c_default(value) -> tuple[str, str] | None:
    """An attribute's default as C++ (float, int32) literals; None: the network must give it."""
    if value is None:
        return None
    f = float(value)
    if math.isinf(f):
        return ("-" if f < 0 else "") + "std::numeric_limits<float>::infinity()", "0"
    return f"{f!r}f", str(int(value) if not math.isinf(f) else 0)


def _cpp_context(spec: PluginSpec, cubin_file: str) -> dict:
    abi = spec.kernel
    args = []
    for a in abi.args:
        kind, ref = spec.source_of(a)
        ctype = a.ctype.replace("const ", "").replace("__restrict__", "").strip()
        if kind == "input":
            args.append(("void const*", f"inputs[{ref}]"))
        elif kind == "output":
            args.append(("void*", f"outputs[{ref}]"))
        elif kind == "null":
            args.append(("void*", "nullptr"))
        elif kind == "attribute":
            args.append((ctype, f"static_cast<{ctype}>(mAttrs[{[x.name for x in spec.attributes].index(ref)}].value())"))
        else:
            args.append((ctype, f"static_cast<{ctype}>(v_{ref})"))
    checks = [(i, axis, int(e)) for i, t in enumerate(spec.inputs) for axis, e in enumerate(t.shape) if e.isdigit()]
    bound = {(i, axis) for _, i, axis in spec.dims}
    agree = [(i, axis, ex.c_int(e)) for i, t in enumerate(spec.inputs) for axis, e in enumerate(t.shape)
             if not e.isdigit() and (i, axis) not in bound]   # e.g. a second input's N, a table's B
    return {
        "key": spec.name, "cls": "Plugin_" + spec.name, "form": spec.form, "kernel": abi.name,
        "cubin": cubin_file, "cubin_symbol": "lf_cubin_" + spec.name,
        "inputs": spec.inputs, "nb_outputs": len(spec.outputs),
        "types": [TRT_DTYPES[t.dtype][2] for t in (*spec.inputs, *spec.outputs)],
        "ranks": [len(t.shape) for t in spec.inputs], "checks": checks, "agree": agree,
        "aliases": list(spec.aliases) or [-1] * len(spec.outputs),
        "attributes": [(a.name, "kFLOAT32" if a.dtype == "f32" else "kINT32", _c_default(a.default))
                       for a in spec.attributes],
        "limits": [(ex.c_int(e), least, most) for e, least, most in spec.limits],
        "expr_dims": [f"IDimensionExpr const* e_{d} = inputs[{i}].d[{axis}];" for d, i, axis in spec.dims],
        "expr_sizes": [f"IDimensionExpr const* e_{n} = {ex.c_expr(e)};" for n, e in spec.sizes],
        "out_shapes": [[ex.c_expr(e) for e in t.shape] for t in spec.outputs],
        "int_dims": [f"int64_t const v_{d} = inputDesc[{i}].dims.d[{axis}];" for d, i, axis in spec.dims],
        "int_sizes": [f"int64_t const v_{n} = {ex.c_int(e)};" for n, e in spec.sizes],
        "grid": [ex.c_int(g) for g in abi.grid], "block": list(abi.block), "shared_bytes": abi.shared_bytes,
        "args": args,
    }
