"""The row/pointwise layers of the standard library and how to specialise and feed them,
shared by the CPU compile tests, the GPU correctness tests and the benchmarks."""
from __future__ import annotations

import torch

ROW_LAYERS = ["rms_norm", "gemma_rms_norm", "layer_norm", "layer_norm_nobias", "group_norm", "add_rms_norm",
              "add_layer_norm", "swiglu", "geglu", "geglu_tanh", "gelu_act", "gelu_tanh_act", "silu_act",
              "relu_act", "softmax_rows", "rope", "rope_llama3", "moe_route", "moe_route_sigmoid"]


def bindings(name: str, width: int) -> dict:
    """Dims/consts that make `width` the layer's row width."""
    if name in ("swiglu", "geglu", "geglu_tanh", "gelu_act", "gelu_tanh_act", "silu_act", "relu_act"):
        return {"F": width}
    if name == "group_norm":
        return {"H": width, "G": 4 if width % 4 == 0 else 1}
    if name == "rope":  # full and partial rotary dims, both styles
        return {"D": width, "rotary_dim": width // 2 if width in (64, 256) else width, "neox": width >= 128}
    if name == "rope_llama3":
        return {"D": width}
    if name.startswith("moe_route"):
        return {"E": width, "k": min(8, width)}
    return {"H": width}


def make_inputs(mod, n: int, device, gen: torch.Generator) -> list[torch.Tensor]:
    """Fresh random forward() inputs for a LayerModule (weights are randomised in place too)."""
    fn = mod.function
    args = []
    for name in mod.input_names:
        p = next(q for q in fn.params if q.name == name)
        shape = []
        for d in p.shape:
            d = int(d) if getattr(d, "is_Integer", False) else None
            shape.append(d)
        if name == "pos":
            args.append(torch.randint(0, 32768, (n,), generator=gen, dtype=torch.int64).to(torch.int32).to(device))
            continue
        dyn = [i for i, d in enumerate(shape) if d is None]
        for i in dyn:
            shape[i] = n if i == 0 else 3
        args.append((torch.randn(shape, generator=gen) * 2).to(p.dtype.torch).to(device))
    with torch.no_grad():
        for pname, t in mod.named_parameters():
            t.copy_((torch.randn(t.shape, generator=gen) * 0.5 + (1.0 if pname == "weight" else 0.0)).to(t.dtype))
    return args
