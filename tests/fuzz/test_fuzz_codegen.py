"""Differential fuzzing of the code generator on the CPU: hypothesis writes well-typed row
layers and attention blocks (tests/fuzz/gen.py); each is checked, specialised, planned,
rendered and compiled with NVRTC for sm_90, and run through the reference evaluator on small
random inputs.

The property: a program either builds (NVRTC compiles every kernel of every plan) and
evaluates, or it is refused with a positioned error (a DSLError whose diagnostics carry
file:line:col). Never a KeyError, an AssertionError, an NVRTC compile error or another crash.
A LoweringError (a layer no kernel family lowers) is tolerated but counted: the generator
writes only what the families are meant to lower, and the tests bound how often it happens.

Bounded for CI: a fixed derandomized seed, a fixed number of examples per family, no deadline
(NVRTC takes ~0.1-1 s a kernel). LF_FUZZ_EXAMPLES overrides the count, LF_FUZZ_SEED the
seed and LF_FUZZ_DEPTH the expression depth, for longer local hunts.
"""
from __future__ import annotations

import os
from collections import Counter

import pytest
import torch
from hypothesis import HealthCheck, given, seed, settings

import layerforge as lf
from layerforge.codegen.families import plans_for_layer
from layerforge.codegen.row import LoweringError
from layerforge.dsl.errors import DSLError

from .gen import Case, attention_blocks, random_tensor, row_layers

nvrtc = pytest.importorskip("layerforge.runtime.nvrtc")

ARCH = "sm_90"
ROW_EXAMPLES = int(os.environ.get("LF_FUZZ_EXAMPLES", 60))
ATTN_EXAMPLES = int(os.environ.get("LF_FUZZ_EXAMPLES", 40))
SEED = os.environ.get("LF_FUZZ_SEED")   # another fixed seed, for longer local hunts
DEPTH = int(os.environ.get("LF_FUZZ_DEPTH", 3))   # expression depth
FUZZ = dict(derandomize=SEED is None, deadline=None, database=None, print_blob=True,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much])

STATS: dict[str, Counter] = {"layer": Counter(), "attention": Counter()}


def positioned(err: DSLError) -> bool:
    return bool(err.diagnostics) and all(d.span.line > 0 and d.span.col > 0 for d in err.diagnostics)


def specialise(case: Case):
    """The case's layer, or None when the checker refuses it with a positioned error."""
    stats = STATS[case.kind]
    try:
        prog = lf.loads(case.source, "fuzz.lf", with_stdlib=False)
        layer = prog.specialise(case.name, dtype=case.dtype, **case.bindings)
    except DSLError as e:
        assert positioned(e), f"a DSLError without a position:\n{e}"
        stats["rejected"] += 1
        return None
    stats["checked"] += 1
    return layer


def compile_all(plans):
    for plan in plans:
        res = nvrtc.compile_cuda(plan.source(), plan.kernel_name, nvrtc.CompileOptions(plan.arch))   # sm_90a: wgmma
        assert {k.name for k in plan.kernels} <= set(res.resources), plan.key


# ---- reference inputs ----------------------------------------------------------------------

def row_inputs(layer, n: int, gen) -> dict:
    """Inputs of a specialised row layer: dynamic dims (N) bound to n, static ones as given."""
    out = {}
    for p in layer.function.params:
        if p.kind == "tensor":
            shape = [int(d) if getattr(d, "is_Integer", False) else n for d in p.shape]
            out[p.name] = random_tensor(p.dtype, shape, gen)
        elif p.kind == "scalar":
            out[p.name] = p.default if p.default is not None else 0.5
    return out


def attention_inputs(layer, case: Case, b: int, s: int, skv: int, gen) -> dict:
    spec = layer.function.outputs[0].arg
    hq, hkv, d = int(spec.num_q_heads), int(spec.num_kv_heads), int(spec.head_dim)
    dt = layer.function.params[0].dtype.torch
    ins = {"q": torch.randn(b, s, hq, d, generator=gen).to(dt), "k": torch.randn(b, skv, hkv, d, generator=gen).to(dt),
           "v": torch.randn(b, skv, hkv, d, generator=gen).to(dt)}
    sizes = {"B": b, "Skv": skv, **{k: v for k, v in case.bindings.items() if isinstance(v, int)}}
    for name, (tdt, dims) in case.tables.items():
        p = next(p for p in layer.function.params if p.name == name)
        t = random_tensor(p.dtype, [sizes[x] for x in dims], gen)
        if name in ("kv_len", "lim"):
            t = torch.randint(0, skv + 2, t.shape, generator=gen).to(t.dtype)
        ins[name] = t
    return ins


def reference_runs(layer, case: Case):
    gen = torch.Generator().manual_seed(0)
    if case.kind == "layer":
        for n in (1, 3):
            outs = lf.evaluate(layer.function, row_inputs(layer, n, gen))
            assert len(outs) == len(layer.function.outputs)
    else:
        (out,) = lf.evaluate(layer.function, attention_inputs(layer, case, 2, 3, 7, gen))
        assert out.shape[:2] == (2, 3) and not torch.isnan(out).any(), "NaN from the reference"


# ---- the properties ----------------------------------------------------------------------

def seeded(test):
    return seed(int(SEED))(test) if SEED is not None else test


@seeded
@settings(max_examples=ROW_EXAMPLES, **FUZZ)
@given(case=row_layers(max_depth=DEPTH))
def test_row_layers_build_or_fail_with_a_position(case):
    layer = specialise(case)
    if layer is None:
        return
    reference_runs(layer, case)
    try:
        plans = plans_for_layer(layer, ARCH)
    except LoweringError:
        STATS["layer"]["not lowered"] += 1
        raise
    compile_all(plans)
    STATS["layer"]["built"] += 1


@seeded
@settings(max_examples=ATTN_EXAMPLES, **FUZZ)
@given(case=attention_blocks(max_depth=DEPTH))
def test_attention_hooks_build_or_fail_with_a_position(case):
    layer = specialise(case)
    if layer is None:
        return
    reference_runs(layer, case)
    # every kernel the block needs: tensor-core prefill and decode (the safest tiles, as a build
    # without a compile function picks), the CUDA-core paged kernel and the KV append
    compile_all(plans_for_layer(layer, ARCH))
    STATS["attention"]["built"] += 1


def test_most_generated_programs_are_accepted():
    """The generator writes well-typed programs: refusals must stay rare, or it tests nothing."""
    for kind, c in STATS.items():
        total = c["checked"] + c["rejected"]
        if total:
            assert c["rejected"] <= 0.2 * total, f"{kind}: {dict(c)}"
