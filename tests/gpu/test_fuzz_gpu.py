"""The fuzzer's programs (tests/fuzz/gen.py, gpu_safe) run on the device against the reference
evaluator: a few hundred row layers and attention blocks, fixed seed, each built, launched on
random inputs with every output poisoned first (NaN, or the int's maximum), and compared.

Tolerances: float outputs by relative error norm, by the program's dtype T (bf16 3e-2, f16
1e-2; f32 1e-4: the kernels use fast intrinsics, __expf, tanhf, and a different summation
order); a NaN where the reference has none never passes; integer and bool outputs are exact
(gpu_safe programs feed no computed float into a comparison, `//`, `%` or a truncating cast).
Attention: the relative error of each sequence's output below 2e-2 (as test_paged_attention),
through the tensor-core and the CUDA-core kernels.

Skipped without a CUDA GPU (tests/gpu/conftest.py). `run_row_case` / `run_attention_case`
also run on CPU tensors (the modules then run the reference itself), which checks this harness.
"""
from __future__ import annotations

import math
import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings

import layerforge as lf
from layerforge.dsl.errors import DSLError
from layerforge.runtime.attention import PagedAttention
from layerforge.runtime.layers import LayerModule

from ..fuzz.gen import Case, attention_blocks, random_tensor, row_layers
from ..seeding import seeded_generator

EXAMPLES = int(os.environ.get("LF_FUZZ_GPU_EXAMPLES", 150))   # per family: a few hundred in all
FUZZ = dict(derandomize=True, deadline=None, database=None, print_blob=True,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
RTOL = {"bf16": 3e-2, "f16": 1e-2, "f32": 1e-4}
ATTN_RTOL = 2e-2


def layer_of(case: Case):
    try:
        return lf.loads(case.source, "fuzz.lf", with_stdlib=False).specialise(case.name, dtype=case.dtype,
                                                                                 **case.bindings)
    except DSLError as e:   # a positioned refusal: tests/fuzz checks these; nothing to run
        assert all(d.span.line > 0 for d in e.diagnostics), str(e)
        return None


def poisoned(shape, dtype, device):
    if dtype.is_floating_point:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    if dtype == torch.bool:
        return torch.ones(shape, dtype=dtype, device=device)   # a bool has no poison; the compare is exact
    return torch.full(shape, torch.iinfo(dtype).max, dtype=dtype, device=device)


def compare(what: str, got: torch.Tensor, ref: torch.Tensor, rtol: float):
    assert got.shape == ref.shape and got.dtype == ref.dtype, what
    if not ref.is_floating_point():
        bad = (got != ref).sum().item()
        assert bad == 0, f"{what}: {bad} of {ref.numel()} integer elements differ"
        return
    ok = ~torch.isnan(ref)
    assert not torch.isnan(got[ok]).any(), f"{what}: NaN in the output"
    g, r = got[ok].double(), ref[ok].double()
    finite = torch.isfinite(r)
    assert torch.equal(g[~finite], r[~finite]), f"{what}: infinities differ"
    g, r = g[finite], r[finite]
    err = (g - r).norm() / r.norm().clamp_min(1e-12)
    assert err <= rtol or (g - r).abs().max() <= 1e-6, f"{what}: relative error {err:.3g} > {rtol}"


def run_row_case(case: Case, device: str = "cuda"):
    layer = layer_of(case)
    if layer is None:
        return
    mod = LayerModule(layer, device=device)
    if device == "cuda":
        assert mod.kernel_reason is None, mod.kernel_reason
    gen = seeded_generator(case.source, case.dtype, tuple(sorted(case.bindings.items())))
    fn = layer.function
    params = {p.name: p for p in fn.params}
    with torch.no_grad():
        for name, attr in mod._weights.items():
            getattr(mod, attr).copy_(random_tensor(params[name].dtype, getattr(mod, attr).shape, gen))
    for n in (1, 5, 130):
        args = []
        for name in mod.input_names:
            p = params[name]
            shape = [int(d) if getattr(d, "is_Integer", False) else n for d in p.shape]
            args.append(random_tensor(p.dtype, shape, gen).to(device))
        ins = dict(zip(mod.input_names, args))
        ins.update({k: getattr(mod, a) for k, a in mod._weights.items()})
        refs = lf.evaluate(fn, {**ins, **mod._scalars})
        if any(r.is_floating_point() and torch.isnan(r).any() for r in refs):
            pytest.skip("the reference gives NaN: a generator defect, counted by tests/fuzz")
        outs = tuple(poisoned(r.shape, r.dtype, device) for r in refs)
        got = mod(*args, out=outs)
        got = got if isinstance(got, tuple) else (got,)
        if device == "cuda":
            torch.cuda.synchronize()
        for i, (g, r) in enumerate(zip(got, refs)):
            compare(f"output {i}, n={n}\n{case.source}", g, r, RTOL[case.dtype])


def _build_cache(ks, vs, page_size, spec, dtype, gen, device):
    """Random page placement, pages poisoned; K rotated at its positions (as the append kernel
    stores it); the same layout as tests/gpu/test_paged_attention.py."""
    from layerforge.dsl.attention_ref import apply_rope
    hkv, d = ks[0].shape[1], ks[0].shape[2]
    pages_per = [max(1, math.ceil(k.shape[0] / page_size)) for k in ks]
    total = sum(pages_per) + 3
    perm = torch.randperm(total, generator=gen).tolist()
    kc = torch.full((total, page_size, hkv, d), float("nan"), dtype=dtype, device=device)
    vc = torch.full_like(kc, float("nan"))
    table = torch.full((len(ks), max(pages_per) + 1), -1, dtype=torch.int32)
    for s, (k, v) in enumerate(zip(ks, vs)):
        n = k.shape[0]
        kr = k.double()
        if spec.rope is not None:
            kr = apply_rope(kr[None], torch.arange(n, device=device)[None], spec.rope, int(spec.rope.rotary_dim))[0]
        for i in range(pages_per[s]):
            pg = perm.pop()
            table[s, i] = pg
            lo, hi = i * page_size, min(n, (i + 1) * page_size)
            kc[pg, : hi - lo] = kr[lo:hi].to(dtype)
            vc[pg, : hi - lo] = v[lo:hi]
    return kc, vc, table.to(device), torch.tensor([k.shape[0] for k in ks], dtype=torch.int32, device=device)


def run_attention_case(case: Case, device: str = "cuda", kernels=("tc", "simt")):
    layer = layer_of(case)
    if layer is None:
        return
    spec = layer.function.outputs[0].arg
    hq, hkv, d = int(spec.num_q_heads), int(spec.num_kv_heads), int(spec.head_dim)
    dtype = layer.function.params[0].dtype.torch
    gen = seeded_generator(case.source, case.dtype, tuple(sorted(case.bindings.items())))
    lens, new = [1, 9, 40, 23], [1, 3, 17, 1]       # decode and chunked prefill, ragged
    width = max(lens)
    ks = [torch.randn(n, hkv, d, generator=gen).to(dtype).to(device) for n in lens]
    vs = [torch.randn(n, hkv, d, generator=gen).to(dtype).to(device) for n in lens]
    qs = [torch.randn(m, hq, d, generator=gen).to(dtype).to(device) for m in new]
    kc, vc, table, seq_lens = _build_cache(ks, vs, 16, spec, dtype, gen, device)
    sizes = {"B": len(lens), "Skv": width, **{k: v for k, v in case.bindings.items() if isinstance(v, int)}}
    params = {p.name: p for p in layer.function.params}
    extra = {}
    for name, (_, dims) in case.tables.items():
        t = random_tensor(params[name].dtype, [sizes[x] for x in dims], gen)
        if name in ("kv_len", "lim"):   # lengths around the sequences' own
            t = (torch.tensor(lens) + torch.randint(-10, 3, (len(lens),), generator=gen)).clamp_min(0).to(t.dtype)
        extra[name] = t.to(device)
    q = torch.cat(qs)
    q_seq = torch.cat([torch.full((m,), s, dtype=torch.int32) for s, m in enumerate(new)]).to(device)
    q_pos = torch.cat([torch.arange(n - m, n, dtype=torch.int32) for n, m in zip(lens, new)]).to(device)
    refs = []
    for s, (n, m) in enumerate(zip(lens, new)):
        ins = {"q": qs[s][None], "k": ks[s][None], "v": vs[s][None]}
        for name, (_, dims) in case.tables.items():   # this sequence's rows, and its keys' columns
            t = extra[name]
            ins[name] = t[tuple(slice(s, s + 1) if x == "B" else slice(0, n) if x == "Skv" else slice(None)
                                for x in dims)]
        ref = lf.evaluate(layer.function, ins, precision="float64",
                          q_positions=torch.arange(n - m, n, device=device)[None],
                          kv_positions=torch.arange(n, device=device)[None], batch_offset=s)[0][0]
        refs.append(ref)
    for kernel in kernels:
        attn = PagedAttention(layer, page_size=16, kernel=kernel)
        out = torch.full_like(q, float("nan"))
        attn(q, kc, vc, table, seq_lens, q_seq, q_pos, max_kv_len=width, extra=extra, out=out)
        if device == "cuda":
            torch.cuda.synchronize()
        assert not torch.isnan(out).any(), f"{kernel}: NaN in the output\n{case.source}"
        start = 0
        for s, (n, m) in enumerate(zip(lens, new)):
            got, ref = out[start:start + m].double(), refs[s]
            start += m
            err = (got - ref).norm() / ref.norm().clamp_min(1e-6)
            assert err < ATTN_RTOL, f"{kernel} seq {s} (len {n}, {m} new): relative error {err:.3g}\n{case.source}"
            if ref.abs().max() == 0:
                assert (got == 0).all(), f"{kernel}: a fully masked row must give zeros\n{case.source}"


@pytest.mark.gpu
@settings(max_examples=EXAMPLES, **FUZZ)
@given(case=row_layers(gpu_safe=True))
def test_fuzzed_row_layers_match_the_reference(case):
    run_row_case(case)


@pytest.mark.gpu
@settings(max_examples=EXAMPLES, **FUZZ)
@given(case=attention_blocks(gpu_safe=True))
def test_fuzzed_attention_hooks_match_the_reference(case):
    run_attention_case(case)


@pytest.mark.gpu
@pytest.mark.parametrize("h", [3, 4096])
def test_i64_row_reductions_beyond_32_bits(h):
    """The fuzzer's i64 reductions (tests/codegen/test_fuzz_regressions.py), on values past 2^32:
    64-bit identities, and 64-bit partials shared across warps."""
    from ..codegen.test_fuzz_regressions import WIDE_I64_REDUCTIONS
    layer = lf.loads(WIDE_I64_REDUCTIONS, with_stdlib=False).specialise("r", H=h)
    mod = LayerModule(layer, device="cuda")
    gen = seeded_generator("i64 reductions", h)
    big = (torch.randint(-2**20, 2**20, (9, h), generator=gen) * 2**21 - 2**41).cuda()
    (ref,) = lf.evaluate(layer.function, {"big": big})
    out = poisoned(ref.shape, ref.dtype, "cuda")
    mod(big, out=(out,))
    torch.cuda.synchronize()
    compare("i64 reductions", out, ref, 0.0)


@pytest.mark.gpu
@pytest.mark.parametrize("h", [1, 8, 4096])
def test_reductions_of_an_h_weight_broadcast_over_the_rows(h):
    """tests/codegen/test_fuzz_regressions.py: a weight's reduction beside a row's."""
    from ..codegen.test_fuzz_regressions import WEIGHT_REDUCTION
    case = Case(WEIGHT_REDUCTION, "fz", {"H": h}, "bf16", "layer")
    run_row_case(case)


@pytest.mark.gpu
def test_true_division_of_integers_and_integer_powers():
    """tests/codegen/test_fuzz_regressions.py: `n / 2`, `kv_pos / 2` are float divisions; `** 2`."""
    from ..codegen.test_fuzz_regressions import INT_HOOK_ARITHMETIC, INT_SCALAR_ROW
    run_row_case(Case(INT_SCALAR_ROW, "fz", {"H": 8}, "f32", "layer"))
    run_attention_case(Case(INT_HOOK_ARITHMETIC, "a", {"Hq": 4, "Hkv": 4, "D": 64}, "bf16", "attention"))
