"""The decoder-layer benchmark runs end to end on the CPU with a tiny config (ours through the
reference evaluator, the torch peer eager), so a GPU run does not discover a broken script."""
import json

import pytest


def test_decoder_benchmark_smoke(tmp_path, capsys):
    from benchmarks.bench_decoder import main
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps({"hidden_size": 64, "intermediate_size": 96, "num_attention_heads": 4,
                               "num_key_value_heads": 2, "head_dim": 16, "rope_theta": 10000.0,
                               "rms_norm_eps": 1e-5}))
    out = tmp_path / "r.json"
    assert main(["--device", "cpu", "--config", str(cfg), "--cases", "decode:2:40,prefill:2:24", "--no-compile",
                 "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["mode"] for r in rows] == ["decode", "prefill"] and all(r["ours_s"] > 0 for r in rows)
    assert "decode 2 x 40" in capsys.readouterr().out


def test_lora_benchmark_smoke(tmp_path, capsys):
    from benchmarks.bench_lora import main
    out = tmp_path / "r.json"
    assert main(["--device", "cpu", "--dims", "64,64,16,96", "--cases", "decode:8,prefill:24", "--adapters", "2",
                 "--rank", "8", "--route", "grouped", "--breakdown", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["mode"] for r in rows] == ["decode", "prefill"] and all(r["rel_err"] < 2e-2 for r in rows)
    text = capsys.readouterr().out
    assert "prefill 24" in text and "prefill 24, base products: the kernel breakdown needs a CUDA device" in text
    with pytest.raises(SystemExit):   # a misspelt mode is an error, not a label
        main(["--device", "cpu", "--cases", "engine-prefil:8"])
    assert "'engine-prefil:8' is not mode:tokens" in capsys.readouterr().err


def test_decode_kernels_benchmark_arguments(capsys):
    """bench_decode_kernels refuses a malformed case before touching a device, and says so without one."""
    import torch

    from benchmarks.bench_decode_kernels import main
    with pytest.raises(SystemExit):
        main(["--cases", "16x1024,64by512"])
    assert "'64by512' is not BATCHxCONTEXT" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--once", "0x512"])
    if not torch.cuda.is_available():
        assert main(["--cases", "1x64"]) == 2
        assert "needs a CUDA device" in capsys.readouterr().err


def test_ssd_chain_probe_compiles_and_needs_a_gpu(capsys):
    """The look-back probe's kernel compiles for sm_90 without spills (its acquire / release flags and the
    bf16 starts), and the script says plainly that it needs a GPU here."""
    import torch

    from benchmarks.probe_ssd_chain import SOURCE, main
    from layerforge.runtime import nvrtc
    res = nvrtc.compile_cuda(SOURCE, "ssd_chain_probe.cu", nvrtc.CompileOptions("sm_90"), want_ptx=True)
    assert "ld.acquire.gpu.global.b32" in res.ptx and "st.release.gpu.global.b32" in res.ptx
    assert res.resources["ssd_chain_probe"].spill_stores == 0
    if not torch.cuda.is_available():
        assert main(["--work", "0"]) == 1
        assert "no CUDA GPU" in capsys.readouterr().err


def test_fp8_widen_probe_compiles_and_needs_a_gpu(capsys):
    """The e4m3 widening probe's kernel compiles for sm_90 without spills, its cvt kind is the hardware's F2FP and
    its raw kind the integer placement, and the script says plainly that it needs a GPU here."""
    import torch

    from benchmarks.probe_fp8_widen import SOURCE, main
    from layerforge.runtime import nvrtc
    res = nvrtc.compile_cuda(SOURCE, "fp8_widen_probe.cu", nvrtc.CompileOptions("sm_90"), want_ptx=True)
    assert "cvt.rn.f16x2.e4m3x2" in res.ptx and "prmt.b32" in res.ptx
    assert res.resources["fp8_widen_probe"].spill_stores == 0
    if not torch.cuda.is_available():
        assert main(["--iters", "1"]) == 1
        assert "no CUDA GPU" in capsys.readouterr().err


def test_ab_switch_must_be_read_by_a_plan():
    """bench_attention's / probe_short_prefill's A / B of a switch (env_switch_set): a name that no plan made inside
    the block reads is an error naming it (before, a misspelt name measured the same kernel twice); a switch that a
    plan reads passes, and the environment is restored either way."""
    import os

    import layerforge as lf
    from benchmarks.bench_attention import env_switch_set
    from layerforge.codegen.attention_wgmma import plan_wgmma_attention
    from layerforge.codegen.attention_wgmma import default_options
    layer = lf.stdlib().specialise("llama_attn", Hq=8, Hkv=2, D=128, dtype="bf16")
    with pytest.raises(SystemExit, match="LAYERFORGE_WGMMA_PERSITS: no kernel plan read"):
        with env_switch_set("LAYERFORGE_WGMMA_PERSITS", True):
            plan_wgmma_attention(layer, **default_options())
    assert "LAYERFORGE_WGMMA_PERSITS" not in os.environ
    for on in (False, True):
        with env_switch_set("LAYERFORGE_WGMMA_PERSIST", on):
            assert default_options()["persist"] is on
    assert "LAYERFORGE_WGMMA_PERSIST" not in os.environ


def test_sass_loops_counts_a_kernels_main_loop(capsys):
    """benchmarks/sass_loops (the SASS loop counts NOTES cites) finds the tensor-core loop of a small product, reports
    its registers, takes an edit of the rendered source, and refuses an edit whose text is not there."""
    from benchmarks import sass_loops
    if sass_loops.cuobjdump() is None:
        pytest.skip(f"no cuobjdump / nvdisasm ({sass_loops.INSTALL})")
    expr = "plan_gemv('bf16', n=256, k=512, max_m=8, arch='sm_90')"
    assert sass_loops.main([expr]) == 0
    out = capsys.readouterr().out
    assert "registers, spills 0 / 0 bytes" in out and "HMMA" in out.split("loop", 1)[1]
    plan = eval(expr, sass_loops._namespace())
    with pytest.raises(ValueError, match="not in the rendered source"):
        sass_loops.report(plan, (("no such text", ""),))
    assert sass_loops.main([expr, "--replace", "for (", "for ("]) == 0


def test_mla_bound_probe_edits_apply_and_compile(capsys):
    """probe_mla_bound's variants are edits of the MLA decode plan's own source: each applies to today's template
    (an edit that no longer matches stops the probe with a message) and compiles for sm_90a without spills; the
    probe says so and exits where there is no GPU. ncu_source_top reads ncu's source-page CSV."""
    import torch

    nvrtc = pytest.importorskip("layerforge.runtime.nvrtc")
    from benchmarks.probe_mla_bound import _edit, main
    from layerforge.codegen.mla import plan_mla_decode
    base = plan_mla_decode(num_heads=128, arch="sm_90")
    for plan, variant in ((base, "noload+s1+pv1"), (base, "nosync+nopg"),
                          (plan_mla_decode(num_heads=128, arch="sm_90", evict=True), "evict+noload"),
                          (plan_mla_decode(num_heads=128, arch="sm_90", fine=True), "fine+noload"),
                          (plan_mla_decode(num_heads=128, arch="sm_90", pair=True), "pair+noload")):
        src = _edit(plan.source(), variant)
        assert src != plan.source()
    for option in ("default", "evict", "noevict", "fine", "pair", "staged", "unstaged"):   # plan options: no edit
        assert _edit(base.source(), option) == base.source()
        res = nvrtc.compile_cuda(src, "mla_probe.cu", nvrtc.CompileOptions("sm_90a"))
        assert res.resources[plan.kernel_name].spill_stores == 0, variant
    with pytest.raises(SystemExit, match="expected 1"):
        _edit("no kernel here", "noload")
    if not torch.cuda.is_available():
        assert main([]) == 0 and "no CUDA GPU" in capsys.readouterr().err


def test_ncu_source_top_reads_the_source_page(tmp_path, capsys):
    from benchmarks.ncu_source_top import main
    csv = tmp_path / "sass.csv"
    csv.write_text('"Kernel Name","k",\n'
                   '"Address","Source","Warp Stall Sampling (All Samples)","Warp Stall Sampling (Not-issued Samples)",'
                   '"stall_barrier","stall_long_sb","stall_barrier (Not Issued)"\n'
                   '"0x10","  BAR.SYNC 0x3, 0x100","300","290","280","20","270"\n'
                   '"0x20","  LDS R5, [R0]","100","10","0","90","0"\n')
    assert main([str(csv), "--top", "1"]) == 0
    out = capsys.readouterr().out
    assert "400 samples" in out and "75.0%" in out and "BAR.SYNC" in out and "barrier 93%" in out
    assert "LDS" not in out


def test_ncu_source_top_phases_split_at_the_wgmmas(tmp_path, capsys):
    """--phases: the samples before the first HGMMA, from it to the last, and after, each with its reasons."""
    from benchmarks.ncu_source_top import main
    head = ('"Address","Source","Warp Stall Sampling (All Samples)","Warp Stall Sampling (Not-issued Samples)",'
            '"stall_barrier","stall_long_sb"\n')
    body = ['"0x10","  LDGSTS.E [R1], [R2]","50","40","0","50"',
            '"0x20","  HGMMA.64x128x16.F32.BF16 R24, gdesc[UR4], RZ","200","100","0","0"',
            '"0x30","  MUFU.EX2 R3, R4","100","20","0","0"',
            '"0x40","  HGMMA.64x128x16.F32.BF16 R24, gdesc[UR8], R24","100","50","0","0"',
            '"0x50","  BAR.SYNC 0x3, 0x100","50","50","40","0"']
    csv = tmp_path / "sass.csv"
    csv.write_text(head + "\n".join(body) + "\n")
    assert main([str(csv), "--top", "0", "--phases"]) == 0
    lines = capsys.readouterr().out.splitlines()
    pro, span, after = (next(ln for ln in lines if ln.strip().startswith(w)) for w in ("prologue", "wgmma", "after"))
    assert "1 instructions" in pro and "50 samples" in pro and "10.0%" in pro and "long_sb 100%" in pro
    assert "3 instructions" in span and "400 samples" in span and "80.0%" in span
    assert "1 instructions" in after and "barrier 80%" in after


def test_bench_masks_ab_switch_runs_every_setting_in_turns(capsys, monkeypatch):
    """bench_masks --ab-switch: each 0 / 1 setting of the switches, in turns over the rounds, the environment
    restored."""
    from benchmarks.bench_masks import ab_lines

    class Attn:
        def __init__(self, label):
            self.label = label

        def tc_plan(self, mode):
            return type("P", (), {"key": f"x_p64_{self.label}"})()

    seen = []
    monkeypatch.setenv("LAYERFORGE_B", "7")
    monkeypatch.delenv("LAYERFORGE_A", raising=False)

    def run():   # a plan reads the switches as env_switch does
        from layerforge.codegen.plan import env_switch
        a, b = (str(int(env_switch(n, False))) for n in ("LAYERFORGE_A", "LAYERFORGE_B"))
        seen.append(a + b)
        return (1e-3 * (1 + int(a) + 2 * int(b)), None, None, Attn(a + b))

    ab_lines(["LAYERFORGE_A", "LAYERFORGE_B"], run, lambda out: 0.0, t_flex=2e-3, rounds=2)
    import os
    assert seen == ["00", "01", "10", "11"] * 2
    assert "LAYERFORGE_A" not in os.environ and os.environ["LAYERFORGE_B"] == "7"
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].strip() == "A=0,B=0: 1.000 / 1.000 ms, 2.00x Flex, err 0.0000  00"
    assert lines[3].strip().startswith("A=1,B=1: 4.000 / 4.000 ms, 0.50x Flex")
    # a switch no plan reads (misspelt) is an error naming it, not the same kernel measured twice
    with pytest.raises(SystemExit, match="LAYERFORGE_NOT_READ_ANYWHERE: no kernel plan read"):
        ab_lines(["LAYERFORGE_NOT_READ_ANYWHERE"], lambda: (1e-3, None, None, Attn("x")), lambda out: 0.0,
                 t_flex=2e-3, rounds=1)
    assert "LAYERFORGE_NOT_READ_ANYWHERE" not in os.environ


def test_ab_switch_settings_in_turn_per_switch():
    """--ab-switch NAME (0 then 1) and NAME=V,V... (those values), each repetition's settings after the last's."""
    from benchmarks.bench_attention import ab_settings
    assert ab_settings("LAYERFORGE_X") == [("LAYERFORGE_X", False), ("LAYERFORGE_X", True)]
    assert ab_settings("LAYERFORGE_Y=0,2,0") == [("LAYERFORGE_Y", "0"), ("LAYERFORGE_Y", "2"), ("LAYERFORGE_Y", "0")]


def test_ab_switch_takes_whole_number_settings():
    """bench_attention --ab-switch NAME=V,V...: env_switch_set with a string sets that value (env_int reads it); a
    whole-number setting that is not one is an error naming it."""
    import os

    import layerforge as lf
    from benchmarks.bench_attention import env_switch_set
    from layerforge.codegen.attention_wgmma import default_options
    layer = lf.stdlib().specialise("gpt2_attn", Hq=8, Hkv=8, D=64, dtype="bf16")
    for v in ("0", "2", "4"):
        with env_switch_set("LAYERFORGE_WGMMA_POLY_EXP", v):
            assert default_options(layer)["poly"] == int(v)
    assert "LAYERFORGE_WGMMA_POLY_EXP" not in os.environ
    with env_switch_set("LAYERFORGE_WGMMA_POLY_EXP", "two"), pytest.raises(ValueError, match="POLY_EXP='two'"):
        default_options(layer)


def test_empty_groups_waited_behind_reads_the_sass_shapes():
    """sass_loops.empty_groups_waited_behind on SASS as ptxas writes it (no GPU or cuobjdump needed): an empty wgmma
    group that falls through to a partial wait is reported (the overlap schedule's old turn: its softmax waited for
    the P V); one in a branch of its own (followed by the BRA over the other branch's wgmmas) or before a full wait
    is not."""
    from benchmarks.sass_loops import Instr, empty_groups_waited_behind

    def code(*texts):
        return [Instr(16 * i, t.split()[0] if not t.startswith("@") else t.split()[1], t) for i, t in enumerate(texts)]

    dummy = "HGMMA.64x8x16.F16 RZ, gdesc[URZ], RZ, !UPT, gsb0"
    s = "HGMMA.64x128x16.F32.BF16 R24, gdesc[UR16], R24, gsb0"
    pv = "HGMMA.64x128x16.F32.BF16 R88, R156, gdesc[UR16].tnspB, R88, gsb0"
    old = code(s, "@!P0 BRA 0x60", "WARPGROUP.ARRIVE", pv, "WARPGROUP.ARRIVE", dummy, "BAR.ARV R11, 0x100",
               "WARPGROUP.DEPBAR.LE gsb0, 0x1")
    assert [i.address for i in empty_groups_waited_behind(old)] == [80]
    new = code(s, "@P0 BRA 0x40", "WARPGROUP.ARRIVE", dummy, "BRA 0x70", "WARPGROUP.ARRIVE", pv,
               "WARPGROUP.DEPBAR.LE gsb0, 0x1")
    assert empty_groups_waited_behind(new) == []
    full = code(pv, "WARPGROUP.ARRIVE", dummy, "WARPGROUP.DEPBAR.LE gsb0, 0x0")
    assert empty_groups_waited_behind(full) == []
