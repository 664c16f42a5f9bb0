"""Mixture-of-experts blocks (runtime/moe.py) beside transformers' blocks and beside torch's grouped
GEMM pipeline, same run, same card, bf16.

    python -m benchmarks.bench_moe [--tokens 1,16,256,4096] [--only mixtral] [--json out.json]

Blocks: Mixtral-8x7B's (H 4096, F 14336, 8 experts, top-2) and Qwen1.5-MoE-A2.7B's (Qwen2-MoE:
H 2048, F 1408, 60 experts, top-4, a gated shared expert of 5632), random weights.
Columns:
- ours: the MoE module, replayed from a CUDA graph (launch cost out; the module never syncs);
- grouped_mm: torch routing (softmax, topk, renormalise), a stable argsort of the expert ids, the
  rows gathered, `torch._grouped_mm` for gate/up and down with SiLU * up between, the weighted rows
  added back with index_add_ (and the shared expert by torch ops), also graph-replayed;
- transformers: the transformers block, eager (it reads the chosen experts back to the host, so it
  cannot be captured);
- of copy: the bytes of the experts the step's tokens chose (and the shared expert, the router)
  over ours' time, against the device-to-device copy ceiling measured in the same run;
at the token counts past the expert kernels' (16), the block again with the other long-step route
(runtime/moe.GROUPED_KERNEL flipped: the generated grouped GEMM with the activation in its epilogue,
or torch's grouped GEMM with the activation kernel between), and the two products alone on the
same sorted rows (gate/up + activation, down; TFLOP/s over the routed rows);
then every token count again with the experts quantised (--quant: u4 group 128, f8e4m3
128 x 128 blocks; f8e4m3:0 for one scale a row, the grouped FP8 GEMM's at prefill): at decode counts
"of copy" on the packed bytes and scales, past them the time against the bf16 experts'.
"""
from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F

from .bench_gemv import graph_time
from .bench_rows import bench, copy_ceiling

BLOCKS = {
    "mixtral": dict(model_type="mixtral", hidden_size=4096, intermediate_size=14336, num_local_experts=8,
                    num_experts_per_tok=2, hidden_act="silu"),
    "qwen2_moe": dict(model_type="qwen2_moe", hidden_size=2048, moe_intermediate_size=1408, num_experts=60,
                      num_experts_per_tok=4, shared_expert_intermediate_size=5632, norm_topk_prob=False,
                      hidden_act="silu"),
}
TOKENS = (1, 16, 256, 4096)


def hf_block(name: str, device, dtype):
    import transformers
    cfg = dict(BLOCKS[name])
    kind = cfg.pop("model_type")
    if kind == "mixtral":
        from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock as Block
        conf = transformers.MixtralConfig(**cfg)
    else:
        from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeSparseMoeBlock as Block
        conf = transformers.Qwen2MoeConfig(**cfg)
    with torch.device(device):
        blk = Block(conf).to(dtype)
    with torch.no_grad():
        for p in blk.parameters():
            p.normal_(0.0, 0.02)
    return blk.eval(), conf


def grouped_pipeline(blk, cfg: dict):
    """torch's best composition: routing in torch, one grouped GEMM per projection."""
    E, k = (cfg.get("num_local_experts") or cfg["num_experts"]), cfg["num_experts_per_tok"]
    renorm = cfg["model_type"] == "mixtral" or cfg.get("norm_topk_prob", False)
    wgu = blk.experts.gate_up_proj.transpose(-2, -1)
    wd = blk.experts.down_proj.transpose(-2, -1)
    shared = getattr(blk, "shared_expert", None)

    def run(x):
        logits = F.linear(x, blk.gate.weight)
        p = torch.softmax(logits.float(), dim=-1)
        w, ids = torch.topk(p, k, dim=-1)
        if renorm:
            w = w / w.sum(-1, keepdim=True)
        flat = ids.view(-1)
        order = torch.argsort(flat, stable=True)
        counts = torch.zeros(E, dtype=torch.int32, device=x.device).index_add_(
            0, flat, torch.ones_like(flat, dtype=torch.int32))
        offs = torch.cumsum(counts, 0, dtype=torch.int32)
        tok = order // k
        xs = x[tok]
        gu = torch._grouped_mm(xs, wgu, offs=offs)
        g, u = gu.chunk(2, dim=-1)
        y = torch._grouped_mm(F.silu(g) * u, wd, offs=offs)
        out = torch.zeros(x.shape[0], x.shape[1], dtype=torch.float32, device=x.device)
        out.index_add_(0, tok, y.float() * w.view(-1)[order].unsqueeze(-1))
        if shared is not None:
            out += shared(x).float() * torch.sigmoid(F.linear(x, blk.shared_expert_gate.weight).float())
        return out.to(x.dtype)
    return run


def chosen_bytes(moe, x) -> int:
    """Weight bytes a step over x reads at best: each chosen expert once, the shared expert, the router."""
    _, ids = moe.route(x)
    n = int(torch.unique(ids).numel())
    e = moe.experts
    per = sum(t[0].numel() * t[0].element_size() for name, t in e.named_buffers()) if e.quant else \
        (e.gate_up_proj[0].numel() + e.down_proj[0].numel()) * e.gate_up_proj.element_size()
    rest = moe.gate.weight.numel() * moe.gate.weight.element_size()
    if moe.shared_expert is not None:
        rest += sum(p.numel() * p.element_size() for p in moe.shared_expert.parameters())
    return n * per + rest


def breakdown(moe, x, label: str) -> None:
    """Each kernel's GPU time in one step (the mean of 20), from torch.profiler."""
    from .bench_rows import kernel_times
    with torch.no_grad():
        rows = kernel_times(lambda: moe(x), calls=20, warmup=3)
    total = sum(t for _, t, _ in rows)
    print(f"  {label}: {total:.1f} us of kernels a step")
    for key, t, _ in rows:
        print(f"    {t:8.1f} us  {key[:100]}")


def long_routes(moe, x, ref, name: str, t: int) -> list[dict]:
    """The block with the other long-step route, then each route's two products alone."""
    from layerforge.runtime import moe as moe_mod
    from layerforge.runtime.moe_kernels import moe_align, moe_gather
    label = {True: "generated grouped GEMM", False: "torch _grouped_mm + activation"}
    default = moe_mod.GROUPED_KERNEL
    out = []
    try:
        moe_mod.GROUPED_KERNEL = not default
        with torch.no_grad():
            got = moe(x)
            err = ((got.float() - ref.float()).abs().max() / ref.float().abs().max().clamp_min(1e-6)).item()
            other = graph_time(lambda: moe(x))
    finally:
        moe_mod.GROUPED_KERNEL = default
    print(f"{'':10} {t:6d} {other * 1e6:9.1f}  the block with the {label[not default]} (max rel err {err:.1e})")
    out.append(dict(block=name, tokens=t, route=label[not default], ours_s=other, rel_err=err))
    cfg = moe.cfg
    with torch.no_grad():
        _, ids = moe.route(x)
        offsets, _pos, src = moe_align(ids, cfg.experts)[:3]
        routed = offsets[: cfg.experts + 1]
        xs = moe_gather(x, src[: t * cfg.top_k])
        wgu, wd = moe.experts.weights("gate_up_proj"), moe.experts.weights("down_proj")
        act = moe._act[0]
        h = act(moe_mod._grouped(xs, wgu, routed))
        P, H, F2 = xs.shape[0], wgu.shape[2], wgu.shape[1]
        flops = {"gate/up": 2 * P * H * F2, "down": 2 * P * H * F2 // 2}
        cases = {"gate/up": (lambda: act(moe_mod._grouped(xs, wgu, routed)),
                             lambda: moe_mod.grouped_product(xs, wgu, routed, gated=cfg.activation)),
                 "down": (lambda: moe_mod._grouped(h, wd, routed), lambda: moe_mod.grouped_product(h, wd, routed))}
        for what, (torch_fn, ours_fn) in cases.items():
            a, b = torch_fn(), ours_fn()
            err = ((a.float() - b.float()).abs().max() / a.float().abs().max().clamp_min(1e-6)).item()
            ta, tb = graph_time(torch_fn), graph_time(ours_fn)
            print(f"{'':10} {t:6d}  {what:8} generated {tb * 1e6:8.1f} us ({flops[what] / tb / 1e12:5.0f} TFLOP/s)  "
                  f"torch {ta * 1e6:8.1f} us ({flops[what] / ta / 1e12:5.0f})  x torch {ta / tb:5.2f}  "
                  f"(max rel diff {err:.1e})")
            out.append(dict(block=name, tokens=t, product=what, generated_s=tb, torch_s=ta, rel_diff=err))
    return out


def main(argv=None) -> int:
    from layerforge.runtime import moe as moe_mod
    from layerforge.runtime.moe import MoE
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", default=",".join(map(str, TOKENS)))
    ap.add_argument("--only", choices=sorted(BLOCKS), default=None)
    ap.add_argument("--no-hf", action="store_true", help="skip transformers' eager block")
    ap.add_argument("--quant", default="u4:128,f8e4m3:128",
                    help="quantised experts timed at every token count (wtype:group,...; '' for none)")
    ap.add_argument("--breakdown", action="store_true",
                    help="also print each kernel's GPU time of one step (torch.profiler) at the decode token counts")
    ap.add_argument("--expert-split", default="",
                    help="work splits of the expert kernels to time at the decode token counts: "
                         "'rt.warps.stages/rt.warps.stages,...' (gate/up / down), e.g. 1.4.3/1.8.2")
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    dev, dt = "cuda", torch.bfloat16
    ceiling = copy_ceiling()
    print(f"{torch.cuda.get_device_name()}  copy ceiling {ceiling / 1e12:.2f} TB/s")
    rows = []
    for name in ([a.only] if a.only else list(BLOCKS)):
        blk, conf = hf_block(name, dev, dt)
        moe = MoE.from_hf(blk, conf)
        peer = grouped_pipeline(blk, BLOCKS[name])
        bf16_us = {}
        print(f"\n{name}: {'tokens':>6} {'ours us':>9} {'grouped_mm':>11} {'transformers':>13} "
              f"{'x grouped':>10} {'x hf':>7} {'of copy':>8}")
        for t in map(int, a.tokens.split(",")):
            x = torch.randn(t, conf.hidden_size, device=dev, dtype=dt)
            with torch.no_grad():
                ref = blk(x.view(1, t, -1)).view(t, -1)
                got = moe(x)
                err = ((got.float() - ref.float()).abs().max() / ref.float().abs().max().clamp_min(1e-6)).item()
                ours = graph_time(lambda: moe(x))
                grouped = graph_time(lambda: peer(x))
                hf = float("nan") if a.no_hf else bench(lambda: blk(x.view(1, t, -1)))
            frac = chosen_bytes(moe, x) / ours / ceiling
            print(f"{'':10} {t:6d} {ours * 1e6:9.1f} {grouped * 1e6:11.1f} {hf * 1e6:13.1f} "
                  f"{grouped / ours:10.2f} {hf / ours:7.2f} {frac:8.2f}   (max rel err vs transformers {err:.1e})")
            rows.append(dict(block=name, tokens=t, ours_s=ours, grouped_mm_s=grouped, transformers_s=hf,
                             of_copy=frac, rel_err=err))
            bf16_us[t] = ours * 1e6
            if t > moe_mod.EXPERT_KERNEL_ROWS:
                rows.extend(long_routes(moe, x, ref, name, t))
        for spec in filter(None, a.expert_split.split(",")):
            gu, dn = (tuple(map(int, part.split("."))) for part in spec.split("/"))
            for t in (n for n in map(int, a.tokens.split(",")) if n <= 16):
                moe_mod.EXPERT_SPLIT.clear()
                moe_mod.EXPERT_SPLIT.update({(True, t <= 8): gu, (False, t <= 8): dn})
                x = torch.randn(t, conf.hidden_size, device=dev, dtype=dt)
                with torch.no_grad():
                    ours = graph_time(lambda: moe(x))
                frac = chosen_bytes(moe, x) / ours / ceiling
                print(f"{'':10} {t:6d} {ours * 1e6:9.1f}  expert split gate/up {gu} down {dn}: {frac:.2f} of copy")
                rows.append(dict(block=name, tokens=t, split=spec, ours_s=ours, of_copy=frac))
                if a.breakdown:
                    breakdown(moe, x, f"{name} {t} token(s), split {spec}")
            moe_mod.EXPERT_SPLIT.clear()
        if a.breakdown:
            for t in (n for n in map(int, a.tokens.split(",")) if n <= 16):
                breakdown(moe, torch.randn(t, conf.hidden_size, device=dev, dtype=dt), f"{name} {t} token(s)")
        for spec in filter(None, a.quant.split(",")):
            wtype, group = spec.split(":")
            qmoe = MoE.from_hf(blk, conf).quantize_(wtype, int(group))
            for t in map(int, a.tokens.split(",")):
                x = torch.randn(t, conf.hidden_size, device=dev, dtype=dt)
                with torch.no_grad():
                    ours = graph_time(lambda: qmoe(x))
                frac = chosen_bytes(qmoe, x) / ours / ceiling
                if t > moe_mod.EXPERT_KERNEL_ROWS:   # prefill: against the same block's bf16 experts
                    print(f"{'':10} {t:6d} {ours * 1e6:9.1f}  {wtype} group {group} experts ({bf16_us[t] / (ours * 1e6):.2f} "
                          f"x the bf16 experts' {bf16_us[t]:.1f} us)")
                else:
                    print(f"{'':10} {t:6d} {ours * 1e6:9.1f}  {wtype} group {group} experts: {frac:.2f} of copy on the "
                          f"packed bytes")
                rows.append(dict(block=name, tokens=t, wtype=wtype, group=int(group), ours_s=ours, of_copy=frac))
            qmoe = None
        blk = moe = peer = None   # the next block's weights in their place
        torch.cuda.empty_cache()
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "copy_TBps": ceiling / 1e12, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
