"""Mamba (v1)'s scan kernels (runtime/scan.py) beside torch eager, same run, same card, bf16.

    python -m benchmarks.bench_scan [--dims 5120,16,4] [--cases prefill:1:8192,prefill:8:2048,decode:64]
                                    [--json out.json] [--device cuda]

Dims: Mamba-2.8B's mixer (D = intermediate_size 5120, N = state_size 16, K = conv_kernel 4).
Rows, per case:
- conv: the causal depthwise conv + SiLU (prefill: causal_conv1d with its final state; decode:
  causal_conv1d_update of the K-wide state in place);
- scan: the selective scan (prefill: from a state, Δ bias + softplus, D skip, z gate, final state;
  decode: selective_state_update in place);
columns: ours (do_bench median; the decode kernels replayed from a CUDA graph), torch eager (the
prefill conv is F.conv1d grouped + SiLU; the prefill scan is transformers' MambaMixer slow path's
loop over the sequence in f32, timed once after a warm-up, it takes seconds; decode the same
formulas once), ours' bytes over its time against the device-to-device copy ceiling measured in
the same run ("of copy": every input read once, every output and state written once).
`--device cpu` runs the references through the same API (a smoke run, no timings that matter).
"""
from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F

from layerforge.runtime import scan

DIMS = (5120, 16, 4)
CASES = "prefill:1:8192,prefill:8:2048,decode:64"


def timed(fn, device: str, reps_ms: int = 200) -> float:
    if device != "cuda":
        fn()
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0
    from .bench_rows import bench
    return bench(fn, reps_ms)


def once(fn, device: str) -> float:
    """Seconds of one call after a warm-up (for the slow eager loops)."""
    fn()
    if device == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def mixer_tensors(b: int, d: int, n: int, k: int, length: int, device: str, dtype=torch.bfloat16) -> dict:
    g = torch.Generator(device="cpu").manual_seed(0)

    def r(*shape, scale=1.0, shift=0.0, dt=dtype):
        return (torch.randn(*shape, generator=g) * scale + shift).to(dt).to(device)
    A = -torch.arange(1, n + 1, dtype=torch.float32).repeat(d, 1).to(device)   # -exp(A_log) of Mamba's init
    return dict(x=r(b, d, length), w=r(d, k, scale=0.3), cb=r(d), u=r(b, d, length), delta=r(b, d, length, shift=-2.0),
                A=A, B=r(b, n, length), C=r(b, n, length), D=r(d, dt=torch.float32), z=r(b, d, length),
                bias=r(d, scale=0.1, dt=torch.float32), h=r(b, d, n, dt=torch.float32),
                conv=r(b, d, k - 1))


def eager_scan(t: dict) -> torch.Tensor:
    """transformers' MambaMixer.slow_forward's scan, in f32, one step of the sequence at a time."""
    u, dt = t["u"].float(), F.softplus(t["delta"].float() + t["bias"][:, None])
    dA = torch.exp(t["A"][None, :, None, :] * dt[..., None])
    dBu = dt[..., None] * t["B"].float().transpose(1, 2)[:, None] * u[..., None]
    h, ys = t["h"].clone(), []
    for i in range(u.shape[-1]):
        h = dA[:, :, i] * h + dBu[:, :, i]
        ys.append((h @ t["C"].float()[:, :, i, None])[..., 0])
    y = torch.stack(ys, -1) + u * t["D"][:, None]
    return (y * F.silu(t["z"].float())).to(t["u"].dtype)


def prefill_rows(b: int, length: int, dims, device: str, ceiling: float | None) -> list[dict]:
    d, n, k = dims
    t = mixer_tensors(b, d, n, k, length, device)
    el = t["x"].element_size()
    rows = []
    conv = lambda: scan.causal_conv1d(t["x"], t["w"], t["cb"], initial_state=t["conv"], return_final_state=True)  # noqa: E731
    torch_conv = lambda: F.silu(F.conv1d(t["x"], t["w"][:, None], t["cb"], padding=k - 1, groups=d)[..., :length])  # noqa: E731
    conv_bytes = 2 * b * d * length * el + b * d * (k - 1) * el * 2 + d * (k + 1) * el
    rows.append(dict(kernel="conv", mode="prefill", batch=b, length=length, ours_s=timed(conv, device),
                     torch_s=timed(torch_conv, device), bytes=conv_bytes))
    ssm = lambda: scan.selective_scan(t["u"], t["delta"], t["A"], t["B"], t["C"], t["D"], t["z"], t["bias"],  # noqa: E731
                                      initial_state=t["h"], return_final_state=True)
    scan_bytes = (4 * b * d * length + 2 * b * n * length) * el + 2 * b * d * n * 4 + d * (n + 2) * 4
    rows.append(dict(kernel="scan", mode="prefill", batch=b, length=length, ours_s=timed(ssm, device),
                     torch_s=once(lambda: eager_scan(t), device), bytes=scan_bytes))
    return rows


def decode_rows(b: int, dims, device: str, ceiling: float | None) -> list[dict]:
    d, n, k = dims
    t = mixer_tensors(b, d, n, k, 1, device)
    x, dt, z, B, C = (t[name][..., 0].contiguous() for name in ("x", "delta", "z", "B", "C"))
    conv_state = torch.cat([t["conv"], t["x"]], -1).contiguous()
    el = x.element_size()

    def torch_conv():
        conv_state.copy_(torch.roll(conv_state, -1, -1))
        conv_state[..., -1] = x
        return F.silu((conv_state * t["w"]).sum(-1) + t["cb"])

    def torch_ssm():
        d_t = F.softplus(dt.float() + t["bias"])
        t["h"].mul_(torch.exp(d_t[..., None] * t["A"])).add_((d_t * x.float())[..., None] * B.float()[:, None])
        y = (t["h"] @ C.float()[..., None])[..., 0] + x.float() * t["D"]
        return (y * F.silu(z.float())).to(x.dtype)

    conv = lambda: scan.causal_conv1d_update(x, conv_state, t["w"], t["cb"])  # noqa: E731
    ssm = lambda: scan.selective_state_update(t["h"], x, dt, t["A"], B, C, t["D"], z, t["bias"])  # noqa: E731
    if device == "cuda":
        from .bench_gemv import graph_time
        ours_conv, ours_ssm = graph_time(conv), graph_time(ssm)
    else:
        ours_conv, ours_ssm = timed(conv, device), timed(ssm, device)
    return [dict(kernel="conv", mode="decode", batch=b, length=1, ours_s=ours_conv, torch_s=timed(torch_conv, device),
                 bytes=2 * b * d * k * el + 2 * b * d * el + d * (k + 1) * el),
            dict(kernel="scan", mode="decode", batch=b, length=1, ours_s=ours_ssm, torch_s=timed(torch_ssm, device),
                 bytes=2 * b * d * n * 4 + 4 * b * d * el + 2 * b * n * el + d * (n + 2) * 4)]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dims", default=",".join(map(str, DIMS)), help="D,N,K")
    ap.add_argument("--cases", default=CASES, help="prefill:batch:length and decode:batch, comma-separated")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--json")
    a = ap.parse_args(argv)
    dims = tuple(int(v) for v in a.dims.split(","))
    ceiling = None
    if a.device == "cuda":
        from .bench_rows import copy_ceiling
        ceiling = copy_ceiling()
        print(f"{torch.cuda.get_device_name()}: copy ceiling {ceiling / 1e12:.2f} TB/s")
    rows = []
    for case in a.cases.split(","):
        kind, *sizes = case.split(":")
        with torch.no_grad():
            rows += (prefill_rows(int(sizes[0]), int(sizes[1]), dims, a.device, ceiling) if kind == "prefill"
                     else decode_rows(int(sizes[0]), dims, a.device, ceiling))
    print(f"D {dims[0]}, N {dims[1]}, K {dims[2]}, bf16")
    print(f"{'kernel':6s} {'case':18s} {'ours us':>10s} {'torch us':>11s} {'x torch':>8s} {'of copy':>8s}")
    for r in rows:
        r["of_copy"] = r["bytes"] / r["ours_s"] / ceiling if ceiling else None
        case = f"{r['mode']} {r['batch']} x {r['length']}"
        copy = f"{r['of_copy']:8.2f}" if r["of_copy"] is not None else f"{'-':>8s}"
        print(f"{r['kernel']:6s} {case:18s} {r['ours_s'] * 1e6:10.1f} {r['torch_s'] * 1e6:11.1f} "
              f"{r['torch_s'] / r['ours_s']:8.1f} {copy}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"device": a.device if a.device != "cuda" else torch.cuda.get_device_name(),
                       "copy_TBps": ceiling / 1e12 if ceiling else None, "dims": dims, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
