"""Mixture-of-experts layers (Mixtral, Qwen2-MoE, Qwen3-MoE, DeepSeek-V2/V3) on generated kernels.

    moe = MoE(MoEConfig(hidden=4096, inter=14336, experts=8, top_k=2), dtype=torch.bfloat16, device="cuda")
    moe.load_state_dict(hf_block.state_dict())      # transformers' MixtralSparseMoeBlock names
    y = moe(x)                                      # x [..., H] -> [..., H]

A step of T tokens:
1. router logits x @ gate.weight^T (cuBLAS: E x H is a few hundred KB; in f32 for DeepSeek-V3,
   as transformers computes them), then the routing kernel
   of the standard library (dsl/stdlib/rows.lf): `moe_route` (softmax, top-k, optionally
   renormalised: Mixtral, Qwen) or `moe_route_grouped` (DeepSeek-V3's sigmoid scores, bias,
   kept groups, scaling): weights f32 [T, k] and expert ids i32 [T, k];
2. the permutation (runtime/moe_kernels.py): the T k (token, expert) pairs sorted by expert,
   stably: each expert's first sorted row (offsets [E + 1]), each pair's sorted row (pos) and
   each sorted row's token (src);
3. the expert products over the sorted rows, gate/up with the gated activation as its epilogue,
   then down:
   - decode-sized steps (T <= EXPERT_KERNEL_ROWS): the small-token product kernel in its expert
     form (codegen/gemv.py, `experts`): one launch over every expert's column tiles, a CTA of an
     expert no token chose reads nothing, so a step reads only the chosen experts' weights, each
     once; the gate/up product reads x's rows through src (no gathered copy);
   - longer steps: x's rows gathered in sorted order, then on sm_90 the generated grouped GEMM
     (`grouped_product`, codegen/gemm.py's `groups`: one persistent wgmma launch over every expert's
     tiles, the row counts read by the kernel; the gated activation in gate/up's epilogue) for
     gate/up and down; with GROUPED_KERNEL off, torch's grouped GEMM (`torch._grouped_mm`, bf16)
     with the activation kernel between; elsewhere one torch product an expert. Quantised experts
     are dequantised for it, except f8e4m3 on sm_90: W8A8 on the grouped FP8 GEMM, the gathered x
     and then h quantised per token (one scale a W row) or per token and 128 k (128 x 128 W blocks,
     DeepSeek-V3's) (runtime/quant.quantize_fp8_rows_cuda);
4. the combine kernel: out[t] = sum_s w[t, s] y[pos[t, s]] in f32, plus the shared expert's
   output (Qwen2-MoE: gated by sigmoid(x @ shared_expert_gate^T); DeepSeek: ungated; below), one pass.
CPU tensors and float32 run the same steps with torch operations and the routing layer's reference
evaluator (the semantics the kernels are tested against).

The shared expert (Qwen2-MoE, DeepSeek) is stored in slices of the routed experts' size where its
size is a multiple of theirs (every published config): slice j holds its gate and up rows
j F .. (j + 1) F - 1 and those columns of down, and the permutation gives every token S more
"experts" E .. E + S - 1 (moe_align's fixed experts), so at decode the same two expert launches
read the shared expert's weights beside the routed ones' (overlapped, no launches of its own), and
the combine weighs its rows by the gate (Qwen2-MoE) or 1 (DeepSeek).

State-dict names follow transformers 5 (experts stored as [E, 2F, H] gate-then-up and [E, H, F]
tensors): gate.weight, gate.e_score_correction_bias (grouped routing), experts.gate_up_proj,
experts.down_proj, shared_expert_gate.weight; the shared expert's slices shared_expert.gate_up_proj
[S, 2F, H] and shared_expert.down_proj [S, H, F], or, where its size is not a multiple,
shared_expert.gate_up.weight / .down.weight (a fused GatedMLP). `shared_state_dict` makes either
from transformers' gate_proj / up_proj / down_proj (`from_hf` and the model families' loaders).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..codegen.gemv import GATED, plan_gemv, token_bucket
from ..dsl.program import Program
from .layers import _dtype_name, module
from .linear import GatedMLP, LinearInputError, _packed, device_major, device_properties

__all__ = ["MoEConfig", "MoE", "QuantExperts", "expert_product", "grouped_product", "dequantize_experts",
           "shared_slices",
           "shared_gate_up_slices", "shared_down_slices",
           "shared_state_dict", "config_from_hf", "hf_block_state_dict", "EXPERT_KERNEL_ROWS"]

# steps of at most this many tokens run the expert products on the small-token kernel (an expert
# gets at most T rows: a token chooses an expert once)
EXPERT_KERNEL_ROWS = 16
# the expert kernels' work split (16-column tiles a CTA, warps, stages) by (gated, rows <= 8), where
# set; else the small-token product's defaults (benchmarks/bench_moe.py --expert-split measures)
EXPERT_SPLIT: dict[tuple[bool, bool], tuple[int, int, int]] = {}
# longer steps' expert products on the generated grouped GEMM (grouped_product: gate/up with the
# gated activation as its epilogue, then down; sm_90) instead of torch's grouped GEMM with the
# activation kernel between (benchmarks/bench_moe.py times both: 1.2 x at 256 tokens, even at 4096)
GROUPED_KERNEL = True
# the grouped GEMM's CTAs in clusters of this many sharing W's tiles by TMA multicast (codegen/gemm.py)
GROUPED_CLUSTER = 1
# the grouped GEMM's epilogue by TMA stores from shared memory (codegen/gemm.py tma_store) where a
# warpgroup's 64 rows lie in one group (the groups' last rows: register stores)
GROUPED_TMA_STORE = True
_ACT = {"silu": F.silu, "gelu": F.gelu, "gelu_tanh": lambda t: F.gelu(t, approximate="tanh")}
_GATED_LAYER = {"silu": "swiglu", "gelu": "geglu", "gelu_tanh": "geglu_tanh"}


@dataclass(frozen=True, kw_only=True)
class MoEConfig:
    """One MoE layer. router: "softmax" (softmax over experts, top-k, renormalised when
    norm_topk_prob: Mixtral, Qwen2/3-MoE), "grouped" (DeepSeek-V3's noaux_tc: sigmoid scores +
    e_score_correction_bias, the topk_group best of n_group groups, top-k, renormalised when
    norm_topk_prob, times routed_scaling_factor) or "limited" (DeepSeek-V2's group_limited_greedy,
    and its greedy with n_group = topk_group = 1: softmax scores of f32 logits, the topk_group groups
    of the best experts, top-k, renormalised when norm_topk_prob, times routed_scaling_factor).
    shared_inter: the shared expert's intermediate size (0: none; DeepSeek: moe_intermediate_size x
    n_shared_experts); shared_gate: Qwen2-MoE's sigmoid gate on it."""
    hidden: int
    inter: int
    experts: int
    top_k: int
    router: str = "softmax"
    norm_topk_prob: bool = True
    n_group: int = 1
    topk_group: int = 1
    routed_scaling_factor: float = 1.0
    shared_inter: int = 0
    shared_gate: bool = False
    activation: str = "silu"

    def __post_init__(self):
        for name in ("hidden", "inter", "experts", "top_k"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"MoEConfig: {name} must be a positive int, got {v!r}")
        if self.top_k > self.experts:
            raise ValueError(f"MoEConfig: top_k {self.top_k} > experts {self.experts}")
        if self.router not in ("softmax", "grouped", "limited"):
            raise ValueError(f"MoEConfig: router must be 'softmax', 'grouped' or 'limited', got {self.router!r}")
        if self.router != "softmax" and (self.experts % self.n_group or not 1 <= self.topk_group <= self.n_group):
            raise ValueError(f"MoEConfig: {self.experts} experts in {self.n_group} groups, keeping {self.topk_group}")
        if self.activation not in GATED:
            raise ValueError(f"MoEConfig: activation must be one of {GATED}, got {self.activation!r}")
        if self.shared_gate and not self.shared_inter:
            raise ValueError("MoEConfig: shared_gate without a shared expert (shared_inter = 0)")

    @property
    def shared_slices(self) -> int:
        """The shared expert's slices of the routed experts' size (MoE stores and runs it so), or 0:
        no shared expert, or one whose size is not a multiple of theirs (a GatedMLP of its own)."""
        return self.shared_inter // self.inter if self.shared_inter % self.inter == 0 else 0


class _Router(torch.nn.Module):
    def __init__(self, cfg: MoEConfig, td, device):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.empty(cfg.experts, cfg.hidden, dtype=td, device=device),
                                         requires_grad=False)
        if cfg.router == "grouped":
            self.e_score_correction_bias = torch.nn.Parameter(torch.zeros(cfg.experts, device=device),
                                                              requires_grad=False)


class _Experts(torch.nn.Module):
    def __init__(self, cfg: MoEConfig, td, device):
        super().__init__()
        E, H, Fd = cfg.experts, cfg.hidden, cfg.inter
        self.gate_up_proj = torch.nn.Parameter(torch.empty(E, 2 * Fd, H, dtype=td, device=device), requires_grad=False)
        self.down_proj = torch.nn.Parameter(torch.empty(E, H, Fd, dtype=td, device=device), requires_grad=False)
        self.count = E
        self.quant: tuple[str, int] | None = None   # (wtype, group) once quantize_ ran
        self._shapes: dict[str, tuple] = {}         # projection -> (N, K, activation dtype) of one expert's W

    def quantize_(self, wtype: str, group: int) -> None:
        """Each expert's W quantised by rounding to nearest (runtime/quant.py QuantLinear.from_float:
        u4 per group, i8 per row or group, f8e4m3 per row or 128 x 128 block), in the small-token
        kernel's layout, stacked over the experts: buffers {proj}_q (the packed weights) and
        {proj}_s (their scale pairs or scales), [E, ...] each; the float weights go."""
        from .quant import QuantLinear
        for name in ("gate_up_proj", "down_proj"):
            w = getattr(self, name)
            dt = w.dtype if w.dtype in (torch.bfloat16, torch.float16) else torch.float16   # the pairs' halves
            self.set_quantized(name, [QuantLinear.from_float(w[e].detach(), group, wtype=wtype, dtype=dt).qw
                                      for e in range(w.shape[0])])

    def set_quantized(self, name: str, qws: list) -> None:
        """Projection `name` ("gate_up_proj" / "down_proj") as the experts' quantised weights (one
        QuantWeight an expert, alike in type and layout: quantize_, or a quantised checkpoint's),
        stacked into the buffers {name}_q and {name}_s; its float weight goes."""
        first = qws[0]
        if len(qws) != self.count:
            raise ValueError(f"{name}: {len(qws)} quantised experts for {self.count}")
        if any((w.wtype, w.group, w.n, w.k, w.dtype) != (first.wtype, first.group, first.n, first.k, first.dtype)
               or w.perm is not None for w in qws):
            raise ValueError(f"{name}: the experts' quantised weights differ in type, layout or shape (or carry a "
                             f"column order): one stack serves alike experts")
        if self.quant not in (None, (first.wtype, first.group)):
            raise ValueError(f"{name}: {first.wtype} (group {first.group}) beside the other projection's "
                             f"{self.quant[0]} (group {self.quant[1]})")
        q, sc = (torch.stack(t) for t in zip(*(qw.kernel_tensors for qw in qws)))
        if hasattr(self, name) and isinstance(getattr(self, name), torch.nn.Parameter):
            delattr(self, name)
        self.register_buffer(name + "_q", q.contiguous())
        self.register_buffer(name + "_s", sc.contiguous())
        self._shapes[name] = (first.n, first.k, first.dtype)
        self.quant = (first.wtype, first.group)

    def weights(self, name: str):
        """Projection `name`'s stack: the [E, N, K] parameter, or its QuantExperts once quantised."""
        if name not in self._shapes:
            return getattr(self, name)
        n, k, dt = self._shapes[name]
        return QuantExperts(*self.quant, getattr(self, name + "_q"), getattr(self, name + "_s"), n, k, dt)


class _SharedSlices(torch.nn.Module):
    """A shared expert of intermediate size S F stored as S experts of the routed ones' size F:
    slice j is the gate rows j F .. (j + 1) F - 1, the same up rows, and the same columns of down
    (shared_slices() cuts a [2 S F, H] gate/up and a [H, S F] down so). Its output is the sum of the
    slices' outputs."""

    def __init__(self, S: int, cfg: MoEConfig, td, device):
        super().__init__()
        H, Fd = cfg.hidden, cfg.inter
        self.gate_up_proj = torch.nn.Parameter(torch.empty(S, 2 * Fd, H, dtype=td, device=device), requires_grad=False)
        self.down_proj = torch.nn.Parameter(torch.empty(S, H, Fd, dtype=td, device=device), requires_grad=False)


def shared_slices(gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor, inter: int) -> dict[str, torch.Tensor]:
    """A shared expert's gate / up [S F, H] and down [H, S F] as MoE's slices of size F = inter:
    {"gate_up_proj": [S, 2 F, H], "down_proj": [S, H, F]}."""
    return {"gate_up_proj": shared_gate_up_slices(gate, up, inter), "down_proj": shared_down_slices(down, inter)}


def shared_gate_up_slices(gate: torch.Tensor, up: torch.Tensor, inter: int) -> torch.Tensor:
    """[S F, H] gate and up rows -> [S, 2 F, H]: slice j is gate rows j F .. (j + 1) F - 1, then those up rows."""
    fs, h = gate.shape
    S = fs // inter
    return torch.cat([gate.reshape(S, inter, h), up.reshape(S, inter, h)], 1).contiguous()


def shared_down_slices(down: torch.Tensor, inter: int) -> torch.Tensor:
    """[H, S F] down -> [S, H, F]: slice j is columns j F .. (j + 1) F - 1."""
    h, fs = down.shape
    return down.reshape(h, fs // inter, inter).permute(1, 0, 2).contiguous()


def shared_state_dict(cfg: MoEConfig, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor,
                      prefix: str = "shared_expert.") -> dict[str, torch.Tensor]:
    """The shared expert's tensors under MoE's names for `cfg`: slices (shared_slices) where its
    size cuts into the routed experts', else a fused GatedMLP's gate_up.weight / down.weight."""
    if cfg.shared_slices:
        return {prefix + k: v for k, v in shared_slices(gate, up, down, cfg.inter).items()}
    return {prefix + "gate_up.weight": torch.cat([gate, up]), prefix + "down.weight": down}


class MoE(torch.nn.Module):
    def __init__(self, cfg: MoEConfig, *, dtype: torch.dtype | str = torch.bfloat16, device=None,
                 program: Program | None = None):
        super().__init__()
        self.cfg = cfg
        dname = _dtype_name(dtype)
        td = {"bf16": torch.bfloat16, "f16": torch.float16, "f32": torch.float32}[dname]
        prog = program or Program.stdlib()
        self.gate = _Router(cfg, td, device)
        self.experts = _Experts(cfg, td, device)
        # the shared expert in slices of the routed experts' size where it cuts into them (DeepSeek,
        # Qwen2-MoE's checkpoints): the expert kernels read it as more experts, in the same launch
        self.shared_slices = cfg.shared_slices
        self.shared_expert = (_SharedSlices(self.shared_slices, cfg, td, device) if self.shared_slices else
                              GatedMLP(cfg.hidden, cfg.shared_inter, cfg.activation, device=device, dtype=td)
                              if cfg.shared_inter else None)
        self.shared_expert_gate = (torch.nn.Linear(cfg.hidden, 1, bias=False, device=device, dtype=td)
                                   if cfg.shared_gate else None)
        if cfg.router == "softmax":
            route = module("moe_route", program=prog, dtype=dname, device=device, E=cfg.experts, k=cfg.top_k,
                           renormalize=cfg.norm_topk_prob)
        else:
            # DeepSeek-V2's and V3's routers compute their logits in f32 (transformers' DeepseekV2TopkRouter,
            # DeepseekV3TopkRouter)
            route = module("moe_route_grouped" if cfg.router == "grouped" else "moe_route_limited", program=prog,
                           dtype="f32", device=device, E=cfg.experts, n_group=cfg.n_group, topk_group=cfg.topk_group,
                           k=cfg.top_k, norm_topk_prob=cfg.norm_topk_prob,
                           routed_scaling_factor=float(cfg.routed_scaling_factor))
        if cfg.router == "grouped":   # one tensor: the routing layer reads the router's bias
            route.bias = self.gate.e_score_correction_bias
        # not a submodule: its one weight (the bias) is the router's, saved under the router's name
        self._route = [route]
        self._act = [module(_GATED_LAYER[cfg.activation], program=prog, dtype=dname, device=device,
                            F=cfg.inter)]

    # ---- the steps --------------------------------------------------------------------------
    def route(self, x2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(weights f32 [T, k], ids i32 [T, k]) of the rows x2 [T, H]."""
        if self.cfg.router != "softmax":
            logits = F.linear(x2.float(), self.gate.weight.float())
        else:
            logits = F.linear(x2, self.gate.weight)
        return self._route[0](logits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cfg = self.cfg
        if x.shape[-1] != cfg.hidden:
            raise LinearInputError(f"MoE: x must be [..., {cfg.hidden}], got shape {tuple(x.shape)}")
        w = self.gate.weight
        if x.dtype != w.dtype or x.device != w.device:
            raise LinearInputError(f"MoE: x must be {w.dtype} on {w.device}, got {x.dtype} on {x.device}")
        lead = x.shape[:-1]
        x2 = x.reshape(-1, cfg.hidden)
        if x2.shape[0] == 0:
            return torch.empty_like(x)
        weights, ids = self.route(x2)
        if _kernels_serve(x2):
            y = self._forward_kernels(x2, weights, ids)
        else:
            y = self._forward_torch(x2, weights, ids)
        return y.view(*lead, cfg.hidden)

    def _gate_logit(self, x2: torch.Tensor) -> torch.Tensor | None:
        return None if self.shared_expert_gate is None else F.linear(x2, self.shared_expert_gate.weight).view(-1)

    def _shared_rows(self, x2: torch.Tensor) -> torch.Tensor:
        """The shared expert's slices on every token: [S, T, H] (slice j's output for token t),
        batched torch products with the gated activation kernel between."""
        sh = self.shared_expert
        S, T = self.shared_slices, x2.shape[0]
        gu = torch.matmul(x2, sh.gate_up_proj.transpose(1, 2))             # [S, T, 2F]
        h = self._act[0](gu.view(S * T, -1)).view(S, T, -1)
        return torch.bmm(h, sh.down_proj.transpose(1, 2))                   # [S, T, H]

    def _forward_kernels(self, x2: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        from .moe_kernels import moe_align, moe_combine, moe_gather
        cfg, T = self.cfg, x2.shape[0]
        x2 = _packed(x2, 16)
        wgu, wd = self.experts.weights("gate_up_proj"), self.experts.weights("down_proj")
        decode = T <= EXPERT_KERNEL_ROWS and _expert_kernel_serves(wgu, x2)
        quant = isinstance(wgu, QuantExperts)
        S = self.shared_slices
        # the shared slices as experts E .. E + S - 1 that every token visits: sorted last, rows
        # T k .. T (k + S) - 1 of the products (slice j's rows: the tokens in order)
        # decode: the experts with rows listed too, so the expert kernels launch CTAs for them only
        offsets, pos, src, *act = moe_align(ids, cfg.experts, fixed=S, active=decode)
        active = act[0] if act else None
        g = self._gate_logit(x2)
        if decode and S and not quant:
            sh = self.shared_expert
            h = expert_product(x2, wgu, offsets, src, rows=T, gated=cfg.activation, fixed=sh.gate_up_proj,
                               active=active)
            y = expert_product(h, wd, offsets, None, rows=T, fixed=sh.down_proj, active=active)
            return moe_combine(y, pos, weights, fixed=S, gate_logit=g)
        routed = offsets[: cfg.experts + 1]
        P = T * cfg.top_k
        if decode:   # (the list names the fixed experts too: not for the routed ones alone)
            listed = active if not S else None
            h = expert_product(x2, wgu, routed, src[:P], rows=T, gated=cfg.activation, active=listed)
            y = expert_product(h, wd, routed, None, rows=T, active=listed)
        elif GROUPED_KERNEL and _grouped_fp8_serves(x2, wgu, wd):   # W8A8: x and h quantised per token
            from .quant import quantize_fp8_rows_cuda
            per = 128 if wgu.group else 0   # 128 x 128 W blocks: x per token and 128 k, else per token
            q, s = quantize_fp8_rows_cuda(moe_gather(x2, src[:P]), group=per)
            h = grouped_product(q, wgu, routed, gated=cfg.activation, xscale=s)
            q, s = quantize_fp8_rows_cuda(h, group=per)
            y = grouped_product(q, wd, routed, xscale=s)
        else:
            if quant:   # W dequantised for the grouped GEMM
                wgu, wd = dequantize_experts(wgu), dequantize_experts(wd)
            xs = moe_gather(x2, src[:P])
            if GROUPED_KERNEL and _grouped_kernel_serves(xs, wgu, wd):   # the activation in gate/up's epilogue
                h = grouped_product(xs, wgu, routed, gated=cfg.activation)
                y = grouped_product(h, wd, routed)
            else:
                h = self._act[0](_grouped(xs, wgu, routed))
                y = _grouped(h, wd, routed)
        if S:
            y = torch.cat([y, self._shared_rows(x2).view(S * T, -1)])
            return moe_combine(y, pos, weights, fixed=S, gate_logit=g)
        s = None if self.shared_expert is None else self.shared_expert(x2)
        return moe_combine(y, pos, weights, shared=s, gate_logit=g)

    def _forward_torch(self, x2: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """The same steps in torch: the kernels' permutation (moe_align_reference: each expert's
        rows in token order), each expert's gate/up product and gated activation (f32, rounded to
        the dtype as the kernel's epilogue does) and down product, then the kernels' combine
        (moe_combine_reference: the weighted sum and the shared expert in f32, rounded once)."""
        from .moe_kernels import moe_align_reference, moe_combine_reference
        cfg = self.cfg
        act = _ACT[cfg.activation]
        offsets, pos, src = moe_align_reference(ids, cfg.experts)
        bounds = offsets.tolist()
        wgu, wd = (w if isinstance(w, torch.Tensor) else dequantize_experts(w).to(x2.dtype)
                   for w in (self.experts.weights("gate_up_proj"), self.experts.weights("down_proj")))
        y = x2.new_empty(src.numel(), cfg.hidden)
        for e in range(cfg.experts):
            lo, hi = bounds[e], bounds[e + 1]
            if lo == hi:
                continue
            g, u = F.linear(x2[src[lo:hi].long()], wgu[e]).float().chunk(2, dim=-1)
            y[lo:hi] = F.linear((act(g) * u).to(x2.dtype), wd[e])
        shared = gate = None
        if self.shared_expert is not None:
            if self.shared_slices:   # slice by slice, as the kernels add them
                sh = self.shared_expert
                shared = torch.zeros(x2.shape[0], cfg.hidden, dtype=torch.float32, device=x2.device)
                for j in range(self.shared_slices):
                    g, u = F.linear(x2, sh.gate_up_proj[j]).float().chunk(2, dim=-1)
                    shared += F.linear((act(g) * u).to(x2.dtype), sh.down_proj[j]).float()
            else:
                shared = self.shared_expert(x2).float()
            gate = self._gate_logit(x2)
        return moe_combine_reference(y, pos, weights, shared=shared, gate_logit=gate)

    def capturable(self, tokens: int) -> bool:
        """Whether a step of `tokens` tokens reads nothing back to the host, so that a CUDA graph
        can capture it: the expert kernels (bf16/f16, at most EXPERT_KERNEL_ROWS tokens) or torch's
        grouped GEMM (bf16, sm_90); the torch path (CPU, float32, other GPUs past the kernels' rows)
        reads the experts' row counts."""
        w = self.gate.weight
        if not (w.is_cuda and w.dtype in (torch.bfloat16, torch.float16) and self.cfg.hidden % 8 == 0
                and device_major(w.device) >= 8):
            return False
        if tokens <= EXPERT_KERNEL_ROWS and _expert_kernel_serves(self.experts.weights("gate_up_proj"), w):
            return True
        return w.dtype == torch.bfloat16 and hasattr(torch, "_grouped_mm") and device_major(w.device) == 9

    def quantize_(self, wtype: str = "u4", group_size: int = 128) -> "MoE":
        """Quantise the routed experts' weights in place (round to nearest; u4 per group, i8 per
        row or group, f8e4m3 per row or 128 x 128 block: runtime/quant.py). Decode steps then read
        the packed experts in the expert kernel; longer steps dequantise them for the grouped
        GEMM (f8e4m3 on sm_90: the grouped FP8 GEMM on them as they are). The router and the shared expert stay in the model's dtype. Returns the module."""
        self.experts.quantize_(wtype, group_size)
        return self

    # ---- from transformers ------------------------------------------------------------------
    @classmethod
    def from_hf(cls, block: torch.nn.Module, config=None) -> "MoE":
        """From a transformers MoE block (MixtralSparseMoeBlock, Qwen2MoeSparseMoeBlock,
        Qwen3MoeSparseMoeBlock, DeepseekV3MoE) and its config (read from the block where it keeps
        one): the weights copied, the shared expert's gate/up fused."""
        cfg = config if config is not None else getattr(block, "config", None)
        mcfg = config_from_hf(cfg, block)
        w = block.gate.weight
        moe = cls(mcfg, dtype=w.dtype, device=w.device)
        moe.load_state_dict(hf_block_state_dict(block.state_dict(), mcfg))
        return moe


def config_from_hf(cfg, block=None) -> MoEConfig:
    """An MoEConfig from a transformers config (object or dict) of an MoE family of the model
    registry (mixtral, qwen2_moe, qwen3_moe, deepseek_v2/v3): the registry's reading
    (models/families.py), its errors included, so a block and a model read a config alike.
    (`block` is accepted for the callers that pass the module; the config says everything.)"""
    from ..models.families import spec_from_config
    from ..models.spec import ConfigError
    d = cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg)
    kind = d.get("model_type", "")
    try:
        spec = spec_from_config(d)
    except ConfigError as e:
        raise ValueError(f"MoE: no MoE layer for model_type {kind!r}: {e}") from None
    if spec.moe is None:
        raise ValueError(f"MoE: no MoE layer for model_type {kind!r} (mixtral, qwen2_moe, qwen3_moe, deepseek_v2/v3)")
    return spec.moe


def hf_block_state_dict(sd: dict, cfg: MoEConfig) -> dict:
    """A transformers MoE block's state dict under MoE's names: the shared expert's (DeepSeek's
    shared_experts') gate_proj / up_proj / down_proj as shared_state_dict makes them, everything
    else as transformers 5 names it."""
    out = {}
    for prefix in ("shared_expert.", "shared_experts."):
        if prefix + "gate_proj.weight" in sd:
            out.update(shared_state_dict(cfg, sd[prefix + "gate_proj.weight"], sd[prefix + "up_proj.weight"],
                                         sd[prefix + "down_proj.weight"]))
    for k, v in sd.items():
        if k.startswith(("shared_expert.", "shared_experts.")):
            continue
        out[k] = v
    return out


# ---- the expert products ----------------------------------------------------------------------

_KERNELS: dict[tuple, object] = {}


def _kernels_serve(x2: torch.Tensor) -> bool:
    return (x2.is_cuda and x2.dtype in (torch.bfloat16, torch.float16) and x2.shape[-1] % 8 == 0
            and not torch.compiler.is_compiling() and device_major(x2.device) >= 8)


@dataclass(frozen=True)
class QuantExperts:
    """E quantised W [N, K] stacked in the small-token kernel's layout (runtime/quant.py, codegen/gemv.py):
    q the packed weights [E, ...], s their (scale, zero) pairs or scales [E, ...]; dtype the activations'."""
    wtype: str
    group: int
    q: torch.Tensor
    s: torch.Tensor
    n: int
    k: int
    dtype: torch.dtype

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.q.shape[0], self.n, self.k)

    @property
    def device(self) -> torch.device:
        return self.q.device


def expert_product(x: torch.Tensor, w, offsets: torch.Tensor, src: torch.Tensor | None, *, rows: int,
                   gated: str | None = None, fixed: torch.Tensor | None = None, active: torch.Tensor | None = None,
                   out: torch.Tensor | None = None, cache=None) -> torch.Tensor:
    """y [P, N_out] over the sorted rows of the permutation: sorted row j (of expert e, offsets[e]
    <= j < offsets[e + 1]) is x[src[j]] (or x[j] when src is None) @ w[e]^T, then act(gate) * up over
    the two halves when gated. w: [E, N, K] (bf16/f16, as x) or QuantExperts (u4 / i8 weight-only,
    f8e4m3 W8A8 with x quantised per 128-k chunk inside, sm_89+); fixed: [S, N, K] more experts
    E .. E + S - 1 (a shared expert's slices; offsets then [E + S + 1]); `rows`: at most this many
    rows an expert (the plan's token tiles: 8 to 64; f8e4m3 16); active: moe_align's list of the
    experts with rows (int32 [E (+ S) + 1]): the grid spans only them; `out`: where y goes (else new)."""
    quant = isinstance(w, QuantExperts)
    if not quant and (not isinstance(w, torch.Tensor) or w.dim() != 3):
        raise LinearInputError(f"expert_product: w must be [E, N, K] or QuantExperts, got {type(w).__name__} "
                               f"{tuple(getattr(w, 'shape', ()))}")
    E, n, k = w.shape
    wdt = w.dtype
    S = 0
    if fixed is not None:
        if quant or not isinstance(fixed, torch.Tensor) or fixed.dim() != 3 or tuple(fixed.shape[1:]) != (n, k) \
                or fixed.dtype != wdt or fixed.device != w.device:
            raise LinearInputError(f"expert_product: fixed must be [S, {n}, {k}] {wdt} on {w.device} beside an "
                                   f"unquantised w")
        S = fixed.shape[0]
        E += S
    P = src.numel() if src is not None else x.shape[0]
    if x.dim() != 2 or x.shape[1] != k or x.dtype != wdt or x.device != w.device:
        raise LinearInputError(f"expert_product: x must be [rows, {k}] {wdt} on {w.device}, got "
                               f"{tuple(x.shape)} {x.dtype} on {x.device}")
    if offsets.shape != (E + 1,) or offsets.dtype != torch.int32 or offsets.device != x.device:
        raise LinearInputError(f"expert_product: offsets must be int32 [{E + 1}] on {x.device}")
    if src is not None and (src.dtype != torch.int32 or src.device != x.device or src.dim() != 1):
        raise LinearInputError(f"expert_product: src must be int32 [P] on {x.device}")
    limit = 16 if quant and w.wtype == "f8e4m3" else 64
    if not 1 <= rows <= limit:
        raise LinearInputError(f"expert_product: serves 1 to {limit} rows an expert, got {rows}")
    if active is not None and (active.shape != (E + 1,) or active.dtype != torch.int32 or active.device != x.device):
        raise LinearInputError(f"expert_product: active must be int32 [{E + 1}] on {x.device}")
    tiles = token_bucket(rows)   # (no wtype: an expert product keeps the n8 tile's rows)
    wtype, group = (w.wtype, w.group) if quant else (None, 0)
    key = (x.dtype, E, n, k, tiles, gated, src is not None, x.device.index, wtype, group, S, active is not None,
           EXPERT_SPLIT.get((gated is not None, tiles == 8)))
    launcher = _KERNELS.get(key)
    if launcher is None:
        from .launch import device_arch, load_plan
        rt, warps, stages = EXPERT_SPLIT.get((gated is not None, tiles == 8), (None, None, None)) if not quant \
            else (None, None, None)
        plan = plan_gemv("bf16" if x.dtype == torch.bfloat16 else "f16", n=n, k=k, max_m=tiles, gated=gated,
                         arch=device_arch(x.device), experts=E, gather=src is not None, wtype=wtype, group=group,
                         fixed=S, compact=active is not None, rt=rt, warps=warps, stages=stages)
        launcher = _KERNELS[key] = load_plan(plan, x.device, cache)
    shape = (P, n // 2 if gated else n)
    if out is not None and (tuple(out.shape) != shape or out.dtype != x.dtype or out.device != x.device
                            or not out.is_contiguous() or out.data_ptr() % 16):
        raise LinearInputError(f"expert_product: out must be a contiguous 16-byte aligned {shape} {x.dtype} "
                               f"on {x.device}")
    y = torch.empty(shape, dtype=x.dtype, device=x.device) if out is None else out
    weights = ([_packed(w.q, 16), _packed(w.s, 16)] if quant else
               [_packed(w, 16)] + ([_packed(fixed, 16)] if S else []))
    args = [_packed(x, 16), *weights, y, P, offsets] + ([src] if src is not None else [])
    if active is not None:
        launcher((P,), args + [active])
    else:
        launcher((), args)
    return y


def dequantize_experts(w: QuantExperts, cache=None) -> torch.Tensor:
    """[E, N, K] in the activation dtype: on the GPU by the generated dequantisation kernel (one
    launch over the stack where its rows are one W's: every layout but 128 x 128 blocks with N
    not a multiple of 128), on the CPU the float64 reference rounded."""
    from .quant import QuantWeight, dequantize, dequantize_cuda
    E, n, k = w.shape
    pairs = w.group and w.wtype != "f8e4m3"

    def one(q, s, rows):
        return QuantWeight(w.wtype, w.group, q, s if pairs else None, None if pairs else s, rows, k, w.dtype)

    if not w.q.is_cuda:
        return torch.stack([dequantize(one(w.q[e], w.s[e], n)).to(w.dtype) for e in range(E)])
    if not (w.wtype == "f8e4m3" and w.group and n % 128):
        s = w.s.reshape(E * w.s.shape[1], *w.s.shape[2:]) if w.s.dim() > 2 else w.s.reshape(E * n)
        return dequantize_cuda(one(w.q.reshape(E * n, -1), s, E * n), cache).view(E, n, k)
    out = torch.empty(E, n, k, dtype=w.dtype, device=w.device)
    for e in range(E):
        dequantize_cuda(one(w.q[e], w.s[e], n), cache, out=out[e])
    return out


def _expert_kernel_serves(w, x2: torch.Tensor) -> bool:
    """The expert kernel takes the step: bf16/f16 W, or u4 / i8 on sm_80+, or f8e4m3 on sm_89+."""
    if not isinstance(w, QuantExperts):
        return True
    p = device_properties(x2.device)   # cached: this runs every step
    return w.wtype != "f8e4m3" or (p.major, p.minor) >= (8, 9)


def grouped_product(xs: torch.Tensor, w, offsets: torch.Tensor, *, gated: str | None = None,
                    out: torch.Tensor | None = None, cache=None, xscale: torch.Tensor | None = None) -> torch.Tensor:
    """The generated grouped GEMM (codegen/gemm.py `groups`, sm_90a): y [P, N_out], sorted row j of
    group e (offsets[e] <= j < offsets[e + 1]) = epilogue(xs[j] @ w[e]^T), act(gate) * up over w's
    two row halves when gated, f32 accumulation rounded once. xs [P, K] and w [E, N, K] bf16/f16 on
    one sm_90 device, K a multiple of 8; or W8A8 (codegen/gemm.py fp8): w a QuantExperts of f8e4m3,
    xs float8_e4m3fn with xscale float32 one a row (W per row: runtime/quant.quantize_fp8_rows_cuda(x,
    group=0)) or one a row and 128 k (W per row or 128 x 128 block, N a multiple of 128:
    quantize_fp8_rows_cuda(x)), K a multiple of 16 and N_out of 8, y in the experts' dtype. offsets int32 [E + 1] on the device (never read by the host:
    graph-safe), offsets[0] = 0, non-decreasing, offsets[E] <= P (rows past it are left as they are; the
    kernel clamps offsets into [0, P] and gives a decreasing pair no rows: no access outside xs or out)."""
    from .linear import _capability
    from .tma import tensor_map
    fp8 = isinstance(w, QuantExperts)
    scales = "token"
    if fp8:
        from .quant import fp8_scaling
        E, n, k = w.shape
        ok = (w.wtype == "f8e4m3" and xs.dtype == torch.float8_e4m3fn and xs.dim() == 2 and xs.shape[1] == k
              and xs.device == w.device and xs.is_cuda)
        scales = fp8_scaling(xscale, xs.shape[0], k, w.group, xs.device) if ok else None
        if scales is None or (scales == "k128_blocks" and n % 128):
            raise LinearInputError(f"grouped_product: W8A8 takes f8e4m3 experts (one scale a row, or 128 x 128 blocks "
                                   f"with N a multiple of 128), xs float8_e4m3fn [P, {k}] and xscale float32 one a "
                                   f"row ([P]; and 128 k: [P, {-(-k // 128)}], blocks only that) on their device, got "
                                   f"{w.wtype} group {w.group} N {n}, xs {xs.dtype} {tuple(xs.shape)}, xscale "
                                   f"{None if xscale is None else (xscale.dtype, tuple(xscale.shape))}")
        dtype = w.dtype
    else:
        if not isinstance(w, torch.Tensor) or w.dim() != 3 or xs.dim() != 2 or xs.shape[1] != w.shape[2] \
                or xs.dtype != w.dtype or xs.dtype not in (torch.bfloat16, torch.float16) or xs.device != w.device \
                or not xs.is_cuda or xscale is not None:
            raise LinearInputError(f"grouped_product: xs [P, K] and w [E, N, K] of one bf16/f16 dtype on one CUDA "
                                   f"device (xscale only with f8e4m3 experts), got {tuple(xs.shape)} {xs.dtype} on "
                                   f"{xs.device} and {tuple(w.shape)} {w.dtype} on {w.device}")
        E, n, k = w.shape
        dtype = xs.dtype
    from ..codegen.gemm import MAX_GROUPS, pick_bn, plan_gemm
    if not 1 <= E <= MAX_GROUPS:
        raise LinearInputError(f"grouped_product: 1 to {MAX_GROUPS} groups, got {E}")
    if _capability(xs.device) != (9, 0) or k % (16 if fp8 else 8):
        raise LinearInputError(f"grouped_product: needs an sm_90 device and K a multiple of {16 if fp8 else 8}, got "
                               f"K {k} on sm_{''.join(map(str, _capability(xs.device)))}")
    if gated is not None and (gated not in GATED or n % 2):
        raise LinearInputError(f"grouped_product: gated must be one of {GATED} with N even, "
                               f"got {gated!r} with N {n}")
    if offsets.shape != (E + 1,) or offsets.dtype != torch.int32 or offsets.device != xs.device:
        raise LinearInputError(f"grouped_product: offsets must be int32 [{E + 1}] on {xs.device}")
    P, n_out = xs.shape[0], n // 2 if gated else n
    store = GROUPED_TMA_STORE and GROUPED_CLUSTER == 1 and n_out % 8 == 0
    if fp8 and (GROUPED_CLUSTER != 1 or n_out % 8):
        raise LinearInputError(f"grouped_product: W8A8 stores by TMA: output columns a multiple of 8 and no "
                               f"clusters, got {n_out} columns, GROUPED_CLUSTER {GROUPED_CLUSTER}")
    if out is not None and (tuple(out.shape) != (P, n_out) or out.dtype != dtype or out.device != xs.device
                            or not out.is_contiguous() or out.data_ptr() % 16):
        raise LinearInputError(f"grouped_product: out must be a contiguous 16-byte aligned ({P}, {n_out}) "
                               f"{dtype} on {xs.device}")
    y = torch.empty(P, n_out, dtype=dtype, device=xs.device) if out is None else out
    if P == 0:
        return y
    sms = device_properties(xs.device).multi_processor_count
    # by the mean rows a group; the widths measured on the grouped product (BN 192 is not)
    narrow = fp8 and (k <= 128 or scales != "token")   # one k slice, or two accumulator sets: BN 128
    bn = pick_bn(max(P // E, 1), n_out, gated is not None, sms, widths=(128,) if narrow else (128, 256))
    store = store or fp8
    key = ("grouped_gemm", dtype, E, n, k, gated, xs.device.index, bn, GROUPED_CLUSTER, store, fp8 and scales)
    hit = _KERNELS.get(key)
    if hit is None:
        from .launch import load_plan
        from .linear import persistent_ctas
        plan = plan_gemm("bf16" if dtype == torch.bfloat16 else "f16", n=n, k=k, gated=gated, bn=bn,
                         tma=True, persistent=True, groups=E, cluster=GROUPED_CLUSTER, tma_store=store, fp8=fp8,
                         fp8_scales=scales)
        launcher = load_plan(plan, xs.device, cache)
        hit = _KERNELS[key] = (plan, launcher, persistent_ctas(plan, launcher, sms))
    plan, launcher, ctas = hit
    boxes = plan.tma_boxes
    xs = _packed(xs, 16)
    outs = [tensor_map(y, boxes["out"]), y] if plan.tma_store else [y]   # (the groups' last rows: through y)
    wt = w.q.view(E * n, k) if fp8 else _packed(w, 16).view(E * n, k)
    sc = [_packed(xscale.reshape(P, -1), 16), w.s.reshape(-1)] if fp8 else []
    launcher((P, ctas), [tensor_map(xs, boxes["x"]), tensor_map(wt, boxes["w"]), *sc, *outs, P, offsets])
    return y


def _grouped_fp8_serves(x2: torch.Tensor, wgu, wd) -> bool:
    """The grouped W8A8 products take a step: f8e4m3 experts on an sm_90 device with one scale a row
    (H and F multiples of 16: K and 8 outputs) or per 128 x 128 block (2F and H multiples of 128: a
    group's whole blocks; K already is)."""
    from .linear import _capability
    return (all(isinstance(w, QuantExperts) and w.wtype == "f8e4m3" for w in (wgu, wd))
            and x2.is_cuda and x2.dtype == wgu.dtype and _capability(x2.device) == (9, 0) and GROUPED_CLUSTER == 1
            and wgu.k % 16 == 0 and wd.k % 16 == 0 and wgu.n % (128 if wgu.group else 16) == 0
            and wd.n % (128 if wd.group else 8) == 0)


def _grouped_kernel_serves(xs: torch.Tensor, wgu, wd) -> bool:
    """grouped_product takes both of a step's products: bf16/f16 experts on an sm_90 device, H and F
    multiples of 8."""
    from .linear import _capability
    return (isinstance(wgu, torch.Tensor) and isinstance(wd, torch.Tensor) and xs.is_cuda
            and xs.dtype in (torch.bfloat16, torch.float16) and wgu.dtype == xs.dtype and wd.dtype == xs.dtype
            and _capability(xs.device) == (9, 0) and wgu.shape[2] % 8 == 0 and wd.shape[2] % 8 == 0)


def _grouped(xs: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """xs [P, K] in sorted order @ each expert's w[e]^T over its rows: torch's grouped GEMM where it
    has one (sm_90, bf16), else one product an expert (the row counts read back to the host)."""
    E = w.shape[0]
    if xs.dtype == torch.bfloat16 and hasattr(torch, "_grouped_mm") and device_major(xs.device) == 9:
        return torch._grouped_mm(xs, w.transpose(-2, -1), offs=offsets[1:])
    out = torch.empty(xs.shape[0], w.shape[1], dtype=xs.dtype, device=xs.device)
    bounds = offsets.tolist()
    for e in range(E):
        a, b = bounds[e], bounds[e + 1]
        if b > a:
            torch.matmul(xs[a:b], w[e].t(), out=out[a:b])
    return out
