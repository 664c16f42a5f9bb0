"""Every default plan fits the shared memory a CTA can have on its arch (codegen/ops.shared_limit): 163 KB on
sm_80, 99 KB on sm_86 / sm_89 / sm_120 (A10, L4, L40S, RTX 30-50), 227 KB on Hopper. A plan past it would only
fail when launched on such a GPU (cuFuncSetAttribute), so the planners shrink the rules' split there (the small-
token product: fewer stages, then warps; tensor-core attention decode: fewer stages, then key warps) and a split
asked for past it is a ValueError naming the arch. Hopper's and sm_80's plans are unchanged where they fit."""
import pytest

from layerforge.codegen import ops
from layerforge.codegen.attention_tc import plan_tc_attention
from layerforge.codegen.gemv import SharedMemoryError, plan_gemv
from layerforge.dsl.program import Program

ARCHS = ["sm_80", "sm_86", "sm_89", "sm_90", "sm_120"]
SHAPES = [(6144, 4096, None), (4096, 4096, None), (28672, 4096, "silu"), (4096, 14336, None), (57344, 8192, "silu"),
          (8192, 28672, None), (1000, 3000, None)]
WTYPES = [(None, 0), ("u4", 128), ("u4", 32), ("i8", 0), ("i8", 128), ("f8e4m3", 0), ("f8e4m3", 128)]


def test_shared_limits_by_arch():
    assert [ops.shared_limit(a) for a in ("sm_80", "sm_86", "sm_87", "sm_89", "sm_90a", "sm_100a", "sm_120")] == [
        166912, 101376, 166912, 101376, 232448, 232448, 101376]
    assert ops.shared_limit("sm_75") == 101376   # not listed: what every part of these has


@pytest.mark.parametrize("arch", ARCHS)
def test_every_default_product_plan_fits_its_arch(arch):
    limit = ops.shared_limit(arch)
    for n, k, gated in SHAPES:
        for m in (1, 2, 4, 8, 16, 32, 64):
            for wtype, group in WTYPES:
                if wtype == "f8e4m3" and ops.arch_number(arch) < 89:
                    continue
                for norm in (None, "rms"):
                    for experts in (0, 8):
                        try:
                            p = plan_gemv("bf16", n=n, k=k, max_m=m, gated=gated, arch=arch, wtype=wtype, group=group,
                                          norm=norm, experts=experts)
                        except ValueError as e:   # combinations the kernel does not take (not shared memory)
                            assert not isinstance(e, SharedMemoryError), e
                            continue
                        assert p.shared_bytes <= limit, (p.key, p.shared_bytes, limit)


def test_hopper_and_a100_plans_keep_their_splits():
    # the rules' splits where they fit (keys the kernel cache and packs hold)
    assert plan_gemv("bf16", n=6144, k=4096, max_m=16, arch="sm_90", wtype="u4", group=128).key == \
        "gemv_n6144_k4096_m16_bf16_u4g128_r2w4s2_sm90"
    assert plan_gemv("bf16", n=28672, k=4096, max_m=16, gated="silu", arch="sm_90").key == \
        "gemv_n28672_k4096_m16_bf16_silu_r1w8s3_sm90"
    assert plan_gemv("bf16", n=28672, k=4096, max_m=16, gated="silu", arch="sm_80").key == \
        "gemv_n28672_k4096_m16_bf16_silu_r1w8s3_sm80"
    # the same product on an L40S: 147 KB of rings do not fit 99 KB; fewer stages first
    p = plan_gemv("bf16", n=28672, k=4096, max_m=16, gated="silu", arch="sm_89")
    assert p.shared_bytes <= 101376 and p.warps == 8 and p.stages == 2


def test_a_split_asked_past_the_arch_is_an_error_naming_it():
    with pytest.raises(SharedMemoryError, match="sm_89"):
        plan_gemv("bf16", n=28672, k=4096, max_m=16, gated="silu", arch="sm_89", warps=8, stages=3)
    assert plan_gemv("bf16", n=28672, k=4096, max_m=16, gated="silu", arch="sm_90", warps=8, stages=3).stages == 3


BLOCKS = [("llama_attn", dict(Hq=32, Hkv=8, D=128)), ("llama_attn", dict(Hq=32, Hkv=8, D=80)),
          ("gemma2_attn", dict(Hq=16, Hkv=8, D=256)), ("bloom_attn", dict(Hq=32, Hkv=32, D=128)),
          ("gpt2_attn", dict(Hq=12, Hkv=12, D=64))]


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("name,dims", BLOCKS)
def test_tensor_core_attention_tiles_fit_their_arch(name, dims, arch):
    prog = Program.stdlib()
    layer = prog.specialise(name, dtype="bf16", **prog.bindings_for(name, dims))
    for mode in ("prefill", "decode"):
        plan = plan_tc_attention(layer, arch, mode=mode)
        assert plan.shared_bytes <= ops.shared_limit(arch), (plan.key, plan.shared_bytes)
        if mode == "decode" and arch in ("sm_80", "sm_90"):   # the candidates' own last tile (no compiler given)
            assert plan.config.wn == 4 and plan.config.stages == (2 if dims["D"] == 256 else 3), plan.key


def test_the_decode_fallback_on_99_kb_parts_compiles_without_spills():
    """With a compiler, an sm_89 decode takes the first shallow tile that compiles spill-free: D128 keeps 4 key
    warps at 2 stages (70 KB), D256 halves the key warps (74 KB)."""
    nvrtc = pytest.importorskip("layerforge.runtime.nvrtc")
    from layerforge.runtime.launch import compile_fn
    prog = Program.stdlib()
    for name, dims, wn in (("llama_attn", dict(Hq=32, Hkv=8, D=128), 4), ("gemma2_attn", dict(Hq=16, Hkv=8, D=256), 2)):
        layer = prog.specialise(name, dtype="bf16", **prog.bindings_for(name, dims))
        plan = plan_tc_attention(layer, "sm_89", mode="decode", compile_fn=compile_fn())
        assert plan.config.wn == wn and plan.config.stages == 2 and plan.shared_bytes <= 101376, plan.key
        res = nvrtc.compile_cuda(plan.source(), plan.kernel_name, nvrtc.CompileOptions("sm_89"))
        main = res.resources[plan.kernel_name]
        assert main.spill_stores == 0 and main.spill_loads == 0, (plan.key, main)


@pytest.mark.parametrize("arch,kw", [
    ("sm_89", dict(n=6144, k=4096, max_m=16, wtype="u4", group=128)),
    ("sm_89", dict(n=28672, k=4096, max_m=8, gated="silu", wtype="i8")),
    ("sm_89", dict(n=28672, k=4096, max_m=16, gated="silu", wtype="f8e4m3", group=128)),
    ("sm_89", dict(n=28672, k=4096, max_m=16, gated="silu")),
    ("sm_86", dict(n=4096, k=14336, max_m=32, wtype="u4", group=128)),
    ("sm_86", dict(n=4096, k=4096, max_m=8, wtype="i8", group=128, norm="rms")),
])
def test_the_shrunk_product_plans_compile_without_spills(arch, kw):
    nvrtc = pytest.importorskip("layerforge.runtime.nvrtc")
    plan = plan_gemv("bf16", arch=arch, **kw)
    assert plan.shared_bytes <= ops.shared_limit(arch)
    res = nvrtc.compile_cuda(plan.source(), plan.kernel_name, nvrtc.CompileOptions(arch))
    (kr,) = res.resources.values()
    assert kr.spill_stores == 0 and kr.spill_loads == 0, (plan.key, kr)
