"""Load a pack with NVRTC hidden, then (on a GPU) run its row, product, attention and KV-append
kernels against the reference. Run as a script: `python -m tests.runtime.pack_case PACK [--run]`.

Importing NVRTC (cuda.bindings.nvrtc, layerforge.runtime.nvrtc or the nvrtc wheel) raises
ImportError here, and the DSL parser refuses to run until the pack's kernels have run, so
a pass shows that packs need neither."""
import importlib.abc
import sys

BLOCKED = ("cuda.bindings.nvrtc", "cuda.bindings._bindings.cynvrtc", "layerforge.runtime.nvrtc", "nvidia.cuda_nvrtc")


class _HideNVRTC(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.startswith(BLOCKED):
            raise ImportError(f"{name} is hidden: a pack must load without NVRTC")
        return None


sys.meta_path.insert(0, _HideNVRTC())

import torch  # noqa: E402

import layerforge as lf  # noqa: E402
from layerforge.dsl import parser as _parser, program as _program  # noqa: E402

_parse = _parser.parse
_allow_parse = False


def _guarded(*a, **k):
    if not _allow_parse:
        raise AssertionError("the DSL was parsed while loading or running a pack")
    return _parse(*a, **k)


_parser.parse = _program.parse = _guarded


def main(pack_dir: str, run: bool) -> None:
    global _allow_parse
    pack = lf.load_pack(pack_dir)
    norm = pack.layer("rms_norm", eps=1e-5)
    act = pack.layer("swiglu")
    mlp = pack.layer("rms_norm_gate_up_swiglu", eps=1e-5)   # a product layer: the pack's small-token kernels
    attn = pack.attention("llama_attn")
    assert norm.input_names == ["x"] and tuple(norm.weight.shape) == (pack.manifest["bindings"]["H"],)
    assert attn.hq == pack.manifest["bindings"]["Hq"] and attn.rope is not None
    print("loaded", pack.layers, pack.attention_blocks)
    if not run:
        assert not any(m.startswith(BLOCKED) for m in sys.modules)
        return
    from tests.seeding import seeded_generator
    dev = torch.device("cuda")
    g = seeded_generator("pack_case")
    H, F = norm.weight.shape[0], pack.manifest["bindings"]["F"]
    x = torch.randn(37, H, generator=g).to(dev, torch.bfloat16)
    w = torch.randn(H, generator=g).to(dev, torch.bfloat16)
    gu = torch.randn(37, 2 * F, generator=g).to(dev, torch.bfloat16)
    norm = norm.to(dev)
    norm.weight.data.copy_(w)
    y_norm, y_act = norm(x), act(gu)
    mlp = mlp.to(dev)
    mlp.gamma.data.copy_(w)
    mlp.weight.data.copy_((torch.randn(2 * F, H, generator=g) * H ** -0.5).to(dev, torch.bfloat16))
    ys_mlp = {m: mlp(x[:m]) for m in (1, 7, 16, 37)}   # the 8- and 16-row kernels; torch's product past 16

    # a decode step over a cache filled by the pack's append kernel (RoPE fused)
    hkv, d, hq = attn.hkv, attn.d, attn.hq
    cache = pack.kv_cache("llama_attn", num_pages=64, max_seqs=2, max_pages_per_seq=32, device=dev)
    lens = [300, 77]
    ks = [torch.randn(n, hkv, d, generator=g).to(dev, torch.bfloat16) for n in lens]
    vs = [torch.randn(n, hkv, d, generator=g).to(dev, torch.bfloat16) for n in lens]
    for s, n in enumerate(lens):
        cache.allocate(s, n)
        cache.append([s] * n, ks[s], vs[s], attn.rope)
    q = torch.randn(2, hq, d, generator=g).to(dev, torch.bfloat16)
    q_seq = torch.tensor([0, 1], dtype=torch.int32, device=dev)
    q_pos = torch.tensor([n - 1 for n in lens], dtype=torch.int32, device=dev)
    out = torch.full_like(q, float("nan"))
    attn(q, cache.k_cache, cache.v_cache, cache.page_table, cache.seq_lens, q_seq, q_pos, max_kv_len=max(lens), out=out)
    # a ragged prefill of each sequence's last 40 tokens (the pack's prefill kernel: wgmma on sm_90)
    new = 40
    qp = torch.randn(2 * new, hq, d, generator=g).to(dev, torch.bfloat16)
    cu = torch.tensor([0, new, 2 * new], dtype=torch.int32, device=dev)
    out_p = torch.full_like(qp, float("nan"))
    attn.prefill(qp, cache.k_cache, cache.v_cache, cache.page_table, cache.seq_lens, cu, max_q_len=new,
                 max_kv_len=max(lens), out=out_p)
    torch.cuda.synchronize()
    assert not any(m.startswith(BLOCKED) for m in sys.modules), "NVRTC was imported"

    # the reference: the DSL's evaluator (CPU), now that the pack has run
    _allow_parse = True
    prog = lf.stdlib()
    b = pack.manifest["bindings"]
    ref_norm = lf.evaluate(prog.specialise("rms_norm", H=H, dtype="bf16").function,
                           {"x": x.cpu(), "w": w.cpu(), "eps": 1e-5}, precision="float64")[0]
    ref_act = lf.evaluate(prog.specialise("swiglu", F=F, dtype="bf16").function, {"gu": gu.cpu()},
                          precision="float64")[0]
    fn = prog.specialise("rms_norm_gate_up_swiglu", H=H, F=F, dtype="bf16").function
    ref_mlp = {m: lf.evaluate(fn, {"x": x[:m].cpu(), "gamma": mlp.gamma.detach().cpu(),
                                                      "w": mlp.weight.detach().cpu(), "eps": 1e-5}, precision="float64")[0]
               for m in ys_mlp}
    checks = [(y_norm, ref_norm, "rms_norm"), (y_act, ref_act, "swiglu")]
    checks += [(ys_mlp[m], ref_mlp[m], f"rms_norm_gate_up_swiglu, {m} rows") for m in ys_mlp]
    for got, want, what in checks:
        err = (got.cpu().double() - want.double()).norm() / want.double().norm()
        assert not torch.isnan(got).any() and err < 1e-2, (what, float(err))
    ref_cache = lf.PagedKVCache(64, pack.page_size, hkv, d, "bf16", "cpu", 2, 32)
    for s, n in enumerate(lens):
        ref_cache.allocate(s, n)
        ref_cache.append([s] * n, ks[s].cpu(), vs[s].cpu(), attn.rope)
    for s in range(2):
        kg, vg = cache.gather(s)
        kr, vr = ref_cache.gather(s)
        err = (kg.cpu().double() - kr.double()).norm() / kr.double().norm()   # K rotated: bf16 rounding apart
        assert torch.equal(vg.cpu(), vr) and err < 1e-2, ("kv append", float(err))
    layer = prog.specialise("llama_attn", dtype="bf16", **prog.bindings_for("llama_attn", b))
    ref = lf.PagedAttention(layer, page_size=pack.page_size)
    want = ref(q.cpu(), ref_cache.k_cache, ref_cache.v_cache, ref_cache.page_table, ref_cache.seq_lens,
               q_seq.cpu(), q_pos.cpu(), max_kv_len=max(lens))
    err = (out.cpu().double() - want.double()).norm() / want.double().norm()
    assert not torch.isnan(out).any() and err < 2e-2, float(err)
    want_p = ref.prefill(qp.cpu(), ref_cache.k_cache, ref_cache.v_cache, ref_cache.page_table, ref_cache.seq_lens,
                         cu.cpu(), max_q_len=new, max_kv_len=max(lens))
    err = (out_p.cpu().double() - want_p.double()).norm() / want_p.double().norm()
    assert not torch.isnan(out_p).any() and err < 2e-2, ("prefill", float(err))
    print("ran rms_norm, swiglu, rms_norm_gate_up_swiglu, kv append and llama_attn decode and prefill from the "
          "pack: ok")


if __name__ == "__main__":
    main(sys.argv[1], "--run" in sys.argv)
