"""runtime/ssd.py on the CPU: the chunked SSD reference against transformers' Mamba2 torch formulas
(segment-sum chunked scan, selective state update, MambaRMSNormGated) and against a naive
token-by-token recurrence written here; short last chunks, initial and final states, prefill then
decode steps equal to a longer prefill, and the input checks. (tests/gpu/test_ssd_gpu.py runs
the kernels against the same references.)"""
from __future__ import annotations

import math

import pytest
import torch

from layerforge.runtime.ssd import SSDInputError, gated_rms_norm, ssd_scan, ssd_state_update

from ..seeding import seeded_generator

F64 = torch.float64


def ssd_inputs(bt, length, heads, hp, groups, n, *, dtype=torch.float32, seed=(), device="cpu", state=True):
    """Fresh inputs as Mamba2 feeds them: dt before its bias and softplus, dt_bias from the model's
    init range (softplus(dt_bias) in [1e-3, 1e-1]), A = -exp(...) in [-16, -1), unit-scale x, B, C, z;
    D [H] and an initial state (float32). A dict of ssd_scan's keyword names."""
    g = seeded_generator("ssd", bt, length, heads, hp, groups, n, str(dtype), *seed)

    def r(*shape, scale=1.0, shift=0.0):
        return (torch.randn(*shape, generator=g, dtype=F64) * scale + shift)

    step = torch.exp(torch.rand(heads, generator=g, dtype=F64) * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3))
    out = dict(x=r(bt, length, heads, hp).to(dtype), dt=r(bt, length, heads, scale=0.5).to(dtype),
               A=-torch.exp(torch.rand(heads, generator=g, dtype=F64) * math.log(16.0)).float(),
               B=r(bt, length, groups, n).to(dtype), C=r(bt, length, groups, n).to(dtype),
               D=r(heads).float(), dt_bias=(step + torch.log(-torch.expm1(-step))).float(),
               z=r(bt, length, heads, hp).to(dtype))
    if state:
        out["initial_state"] = r(bt, heads, hp, n, scale=0.5).float()
    return {k: v.to(device) for k, v in out.items()}


def naive_ssd(x, dt, A, B, C, *, D=None, z=None, dt_bias=None, dt_softplus=True, dt_limit=(0.0, math.inf),
              initial_state=None):
    """The recurrence token by token in float64: h = exp(dt A) h + dt x B^T, y = h C + D x, * silu(z)."""
    bt, length, heads, hp = x.shape
    rep = heads // B.shape[2]
    x, B, C = x.double(), B.double().repeat_interleave(rep, 2), C.double().repeat_interleave(rep, 2)
    dt = dt.double() + (dt_bias.double() if dt_bias is not None else 0.0)
    if dt_softplus:
        dt = torch.log1p(torch.exp(dt))
    dt = dt.clamp(*dt_limit)
    h = initial_state.double().clone() if initial_state is not None else torch.zeros(bt, heads, hp, B.shape[-1], dtype=F64)
    ys = []
    for t in range(length):
        h = torch.exp(dt[:, t] * A.double())[..., None, None] * h + \
            (dt[:, t, :, None] * x[:, t])[..., None] * B[:, t, :, None, :]
        y = (h * C[:, t, :, None, :]).sum(-1)
        if D is not None:
            y = y + D.double()[:, None] * x[:, t]
        if z is not None:
            y = y * z[:, t].double() * torch.sigmoid(z[:, t].double())
        ys.append(y)
    return torch.stack(ys, 1), h


def f64(inputs):
    return {k: (v.double() if v.is_floating_point() else v) for k, v in inputs.items()}


# ---- the scan ----------------------------------------------------------------------------------
@pytest.mark.parametrize("length,groups", [(1, 1), (37, 2), (64, 1), (100, 4)])
def test_scan_matches_transformers_chunked_torch_formulas(length, groups):
    mamba2 = pytest.importorskip("transformers.models.mamba2.modeling_mamba2")
    inp = ssd_inputs(2, length, 4, 8, groups, 16, seed=("hf",))
    inp.pop("z")
    lim = (0.0, math.inf) if length != 37 else (0.004, 0.05)   # one case with the time-step clamp on
    ref, ref_state = mamba2.mamba2_chunk_scan(
        inp["x"], inp["dt"], inp["A"], inp["B"], inp["C"], chunk_size=16, D=inp["D"], dt_bias=inp["dt_bias"],
        initial_states=inp["initial_state"], dt_softplus=True, dt_limit=lim, return_final_states=True)
    y, state = ssd_scan(**inp, dt_limit=lim, chunk_size=16, return_final_state=True)
    assert y.dtype == torch.float32 and state.dtype == torch.float32 and state.shape == (2, 4, 8, 16)
    torch.testing.assert_close(y, ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(state, ref_state, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("length,chunk", [(1, 8), (13, 8), (40, 8), (29, 64)])
def test_scan_float64_matches_the_token_by_token_recurrence(length, chunk):
    inp = f64(ssd_inputs(2, length, 6, 4, 3, 8, seed=("naive",)))
    y, state = ssd_scan(**inp, chunk_size=chunk, return_final_state=True)
    ref_y, ref_state = naive_ssd(**inp)
    assert y.dtype == F64 and state.dtype == F64
    torch.testing.assert_close(y, ref_y, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(state, ref_state, rtol=1e-10, atol=1e-10)


def test_scan_without_options_is_the_plain_recurrence_from_zero():
    inp = f64(ssd_inputs(1, 21, 2, 4, 1, 8, seed=("plain",), state=False))
    for k in ("D", "dt_bias", "z"):
        inp.pop(k)
    inp["dt"] = inp["dt"].abs() * 0.1   # a step used as given: no bias, no softplus
    y = ssd_scan(**inp, dt_softplus=False, chunk_size=8)
    ref_y, _ = naive_ssd(**inp, dt_softplus=False)
    torch.testing.assert_close(y, ref_y, rtol=1e-10, atol=1e-10)


def test_scan_does_not_depend_on_the_chunk_size():
    inp = f64(ssd_inputs(1, 50, 4, 4, 2, 8, seed=("chunks",)))
    ys = [ssd_scan(**inp, chunk_size=q, return_final_state=True) for q in (1, 7, 16, 64)]
    for y, s in ys[1:]:
        torch.testing.assert_close(y, ys[0][0], rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(s, ys[0][1], rtol=1e-10, atol=1e-10)


def test_scan_bf16_inputs_give_bf16_outputs_near_the_float64_result():
    inp = ssd_inputs(1, 45, 4, 8, 1, 16, dtype=torch.bfloat16, seed=("bf16",))
    y, state = ssd_scan(**inp, chunk_size=16, return_final_state=True)
    ref_y, ref_state = naive_ssd(**inp)
    assert y.dtype == torch.bfloat16 and state.dtype == torch.float32
    torch.testing.assert_close(y.double(), ref_y, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(state.double(), ref_state, rtol=1e-4, atol=1e-4)


def test_prefill_then_decode_steps_equal_one_longer_prefill():
    length, steps = 27, 5
    inp = f64(ssd_inputs(2, length + steps, 4, 4, 2, 8, seed=("steps",)))
    y_all, state_all = ssd_scan(**inp, chunk_size=8, return_final_state=True)
    head = {k: (v[:, :length] if v.dim() >= 3 and k != "initial_state" else v) for k, v in inp.items()}
    y, state = ssd_scan(**head, chunk_size=8, return_final_state=True)
    torch.testing.assert_close(y, y_all[:, :length], rtol=1e-10, atol=1e-10)
    for t in range(length, length + steps):
        yt = ssd_state_update(state, inp["x"][:, t], inp["dt"][:, t], inp["A"], inp["B"][:, t], inp["C"][:, t],
                              D=inp["D"], z=inp["z"][:, t], dt_bias=inp["dt_bias"])
        torch.testing.assert_close(yt, y_all[:, t], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(state, state_all, rtol=1e-10, atol=1e-10)


def test_prefill_from_a_carried_state_equals_the_prefill_of_both_parts():
    inp = f64(ssd_inputs(1, 40, 2, 4, 1, 8, seed=("two",)))
    y_all, s_all = ssd_scan(**inp, chunk_size=16, return_final_state=True)
    first = {k: (v[:, :23] if v.dim() >= 3 and k != "initial_state" else v) for k, v in inp.items()}
    second = {k: (v[:, 23:] if v.dim() >= 3 and k != "initial_state" else v) for k, v in inp.items()}
    y1, s1 = ssd_scan(**first, chunk_size=16, return_final_state=True)
    second["initial_state"] = s1
    y2, s2 = ssd_scan(**second, chunk_size=16, return_final_state=True)
    torch.testing.assert_close(torch.cat([y1, y2], 1), y_all, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(s2, s_all, rtol=1e-10, atol=1e-10)


# ---- the decode step ---------------------------------------------------------------------------
def test_state_update_matches_transformers_selective_state_update():
    mamba2 = pytest.importorskip("transformers.models.mamba2.modeling_mamba2")
    bt, heads, hp, groups, n = 3, 4, 8, 2, 16
    inp = ssd_inputs(bt, 1, heads, hp, groups, n, seed=("hf_step",))
    x, dt, B, C = inp["x"][:, 0], inp["dt"][:, 0], inp["B"][:, 0], inp["C"][:, 0]
    state = inp["initial_state"].clone()
    ref_state = state.clone()
    # the mixer's call: per-(head, head_dim) expansions of dt, A, D and dt_bias
    ref = mamba2.mamba2_selective_state_update(
        ref_state, x, dt[:, :, None].expand(-1, -1, hp), inp["A"][:, None, None].expand(-1, hp, n), B, C,
        inp["D"][:, None].expand(-1, hp), z=inp["z"][:, 0], dt_bias=inp["dt_bias"][:, None].expand(-1, hp),
        dt_softplus=True)
    y = ssd_state_update(state, x, dt, inp["A"], B, C, D=inp["D"], z=inp["z"][:, 0], dt_bias=inp["dt_bias"])
    torch.testing.assert_close(state, ref_state, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)


def test_state_update_keeps_a_float32_state_and_the_input_dtype():
    inp = ssd_inputs(2, 1, 2, 8, 1, 16, dtype=torch.bfloat16, seed=("dtypes",))
    state = inp["initial_state"]
    before = state.clone()
    y = ssd_state_update(state, inp["x"][:, 0], inp["dt"][:, 0], inp["A"], inp["B"][:, 0], inp["C"][:, 0])
    assert y.dtype == torch.bfloat16 and state.dtype == torch.float32 and not torch.equal(state, before)
    _, ref_state = naive_ssd(inp["x"], inp["dt"], inp["A"], inp["B"], inp["C"], initial_state=before)
    torch.testing.assert_close(state.double(), ref_state, rtol=1e-5, atol=1e-5)


# ---- the gated norm ----------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("groups,gate", [(1, True), (4, True), (2, False)])
def test_gated_rms_norm_matches_transformers_MambaRMSNormGated(dtype, groups, gate):
    mamba2 = pytest.importorskip("transformers.models.mamba2.modeling_mamba2")
    f = 64
    g = seeded_generator("gated_norm", groups, gate, str(dtype))
    gated_norm = getattr(mamba2, "Mamba2RMSNormGated", None) or mamba2.MambaRMSNormGated   # renamed in 5.25
    norm = gated_norm(f, group_size=f // groups, eps=1e-5).to(dtype)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(f, generator=g) * 0.5 + 1.0)
    x = torch.randn(2, 5, f, generator=g).to(dtype)
    z = torch.randn(2, 5, f, generator=g).to(dtype) if gate else None
    with torch.no_grad():
        ref = norm(x, z)
    got = gated_rms_norm(x, z, norm.weight.detach(), 1e-5, group_size=f // groups)
    assert got.dtype == dtype
    torch.testing.assert_close(got, ref, rtol=0, atol=0)


# ---- input checks ------------------------------------------------------------------------------
def _scan_case():
    return ssd_inputs(1, 9, 4, 4, 2, 8, seed=("errors",))


@pytest.mark.parametrize("change,message", [
    (lambda d: d.update(x=d["x"][..., :3]), "z must be shaped"),
    (lambda d: d.update(dt=d["dt"][:, :5]), "dt must be shaped"),
    (lambda d: d.update(B=d["B"].bfloat16()), "B must be one of"),
    (lambda d: d.update(C=d["C"][:, :, :1]), "C must be shaped"),
    (lambda d: d.update(B=d["B"][:, :, :1].expand(-1, -1, 3, -1), C=d["C"][:, :, :1].expand(-1, -1, 3, -1)),
     "split evenly"),
    (lambda d: d.update(A=d["A"].half() if d["x"].dtype != torch.float16 else d["A"].bfloat16()),
     "A must be one of"),   # f32, f64 or x's dtype
    (lambda d: d.update(D=d["D"][:2]), "D must be shaped"),
    (lambda d: d.update(initial_state=d["initial_state"].bfloat16()), "initial_state must be one of"),
    (lambda d: d.update(dt_limit=(0.1, 0.01)), "dt_limit"),
    (lambda d: d.update(chunk_size=0), "chunk_size"),
    (lambda d: d.update(x=d["x"][0]), "x must be a"),
    (lambda d: d.update(dt_bias=d["dt_bias"].to("meta")), "dt_bias is on meta"),
])
def test_scan_rejects_bad_inputs_with_a_clear_error(change, message):
    inp = _scan_case()
    change(inp)
    with pytest.raises(SSDInputError, match=message):
        ssd_scan(**inp)


def test_state_update_rejects_bad_inputs_before_touching_the_state():
    inp = _scan_case()
    x, dt, B, C = inp["x"][:, 0], inp["dt"][:, 0], inp["B"][:, 0], inp["C"][:, 0]
    state = inp["initial_state"]
    before = state.clone()
    with pytest.raises(SSDInputError, match="state must be one of"):
        ssd_state_update(state.bfloat16(), x, dt, inp["A"], B, C)
    with pytest.raises(SSDInputError, match="state must be shaped"):
        ssd_state_update(state[..., :4], x, dt, inp["A"], B, C)
    with pytest.raises(SSDInputError, match="x must be a"):
        ssd_state_update(state, inp["x"], dt, inp["A"], B, C)
    with pytest.raises(SSDInputError, match="z must be shaped"):
        ssd_state_update(state, x, dt, inp["A"], B, C, z=inp["z"][:, 0, :2])
    assert torch.equal(state, before)


def test_scan_out_must_start_where_the_kernel_can_store_vectors():
    """The chunk scan stores y's rows as 16-byte vectors (bf16 / f16): an `out` view starting at an odd
    element is refused before any launch, and nothing is written into it."""
    inp = ssd_inputs(1, 40, 4, 16, 2, 16, dtype=torch.bfloat16, seed=("out-align",))
    buf = torch.zeros(1 * 40 * 4 * 16 + 8, dtype=torch.bfloat16)
    out = buf[1:2561].view(1, 40, 4, 16)
    with pytest.raises(SSDInputError, match="16-byte aligned"):
        ssd_scan(inp["x"], inp["dt"], inp["A"], inp["B"], inp["C"], out=out)
    assert not buf.any()
    ssd_scan(inp["x"], inp["dt"], inp["A"], inp["B"], inp["C"], out=buf[8:].view(1, 40, 4, 16))   # 16 bytes in


def test_state_update_with_a_log_takes_a_as_minus_exp_of_it():
    """a_log=True: the A argument holds A_log and the update uses A = -exp(A_log) (the CPU path;
    the kernel's is tests/gpu/test_ssd_gpu.py's)."""
    inp = _scan_case()
    x, dt, B, C, z = inp["x"][:, 0], inp["dt"][:, 0], inp["B"][:, 0], inp["C"][:, 0], inp["z"][:, 0]
    s1, s2 = inp["initial_state"].clone(), inp["initial_state"].clone()
    got = ssd_state_update(s1, x, dt, torch.log(-inp["A"]), B, C, D=inp["D"], z=z, a_log=True)
    want = ssd_state_update(s2, x, dt, inp["A"], B, C, D=inp["D"], z=z)
    torch.testing.assert_close(s1, s2, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_gated_rms_norm_rejects_groups_that_do_not_divide_and_mismatched_gates():
    x = torch.randn(3, 12)
    with pytest.raises(SSDInputError, match="group_size must divide"):
        gated_rms_norm(x, None, torch.ones(12), 1e-5, group_size=5)
    with pytest.raises(SSDInputError, match="z must be shaped"):
        gated_rms_norm(x, torch.randn(3, 6), torch.ones(12), 1e-5)
    with pytest.raises(SSDInputError, match="weight must be shaped"):
        gated_rms_norm(x, None, torch.ones(6), 1e-5)


# ---- the launches' arguments, against the kernels' ABIs (no GPU: a recording launcher) -------------
_CTYPES = {torch.bfloat16: "__nv_bfloat16", torch.float16: "__half", torch.float32: "float"}


@pytest.fixture
def recorded_launches(monkeypatch):
    """runtime/ssd.py's CUDA path on CPU tensors, the kernel loader replaced by one whose launcher
    checks each argument against the plan's ABI (pointer types, ints, floats, their order) and
    records them."""
    import layerforge.runtime.launch as launch
    import layerforge.runtime.ssd as ssd_module
    calls = []

    def load_plan(plan, device, cache=None):
        def run(problem, args):
            abi = plan.abi
            assert len(args) == len(abi.args) and len(problem) == len(abi.problem), plan.key
            for a, v in zip(abi.args, args):
                if a.launch_type == "ptr":
                    assert isinstance(v, torch.Tensor) and _CTYPES[v.dtype] in a.ctype, (plan.key, a.name, v.dtype)
                    assert v.is_contiguous() or a.name in ("x", "B", "C", "z", "dt"), (plan.key, a.name)
                elif a.launch_type in ("i32", "i64"):
                    assert isinstance(v, int) and not isinstance(v, bool), (plan.key, a.name, v)
                else:
                    assert a.launch_type == "f32" and isinstance(v, float), (plan.key, a.name, v)
            calls.append((plan, dict(zip((a.name for a in abi.args), args)), abi.grid_for(*problem)))
        return run
    monkeypatch.setattr(launch, "load_plan", load_plan)
    monkeypatch.setattr(launch, "device_arch", lambda device: "sm_90")
    monkeypatch.setattr(ssd_module, "_KERNELS", {})
    monkeypatch.setattr(ssd_module, "_use_kernel", lambda t: True)
    return calls


def test_scan_launches_pass_what_the_kernels_declare(recorded_launches, monkeypatch):
    # the form that computes the scores (three launches); the score table's four: the test after the next
    monkeypatch.setenv("LAYERFORGE_SSD_CB", "0")
    wide = torch.randn(2, 70, 4 * 16 + 2 * 2 * 16 + 8, dtype=torch.bfloat16)   # x | B | C | 8 more: one row
    x, B, C = (t.unflatten(-1, s) for t, s in zip(wide[..., :128].split([64, 32, 32], -1), [(4, 16), (2, 16), (2, 16)]))
    inp = ssd_inputs(2, 70, 4, 16, 2, 16, dtype=torch.bfloat16, seed=("abi",))
    y, final = ssd_scan(x, inp["dt"], inp["A"], B, C, D=inp["D"].bfloat16(), z=inp["z"], dt_bias=inp["dt_bias"],
                        dt_limit=(0.001, 0.2), chunk_size=32, initial_state=inp["initial_state"],
                        return_final_state=True)
    (state, s_args, s_grid), (passing, p_args, p_grid), (scan, c_args, c_grid) = recorded_launches
    assert [p.family for p in (state, passing, scan)] == ["ssd_chunk_state", "ssd_state_passing", "ssd_chunk_scan"]
    assert scan.skip and scan.gate and passing.initial and state.dt_bias and state.chunk == 32
    nc = 3   # 70 tokens in chunks of 32
    assert s_grid == (nc, 4, 2) and c_grid == (nc, 4, 2) and p_grid == (1, 4, 2)
    assert s_args["x_sb"] == 70 * 136 and s_args["x_sl"] == 136 and c_args["C_sl"] == 136
    assert s_args["states"].shape == (2, nc, 4, 16, 16) and s_args["s_last"].shape == (2, 4, nc)
    assert p_args["states"] is s_args["states"] and p_args["start"] is c_args["start"]
    assert c_args["start"].dtype == torch.bfloat16 and p_args["final_state"] is final
    assert c_args["y"] is y and y.shape == (2, 70, 4, 16) and c_args["seqlen"] == 70 and c_args["nc"] == nc
    assert (c_args["dt_lo"], c_args["dt_hi"]) == (0.001, 0.2) and c_args["D"].dtype == torch.float32


def test_state_update_launch_passes_what_the_kernel_declares(recorded_launches):
    inp = ssd_inputs(3, 1, 4, 16, 2, 16, dtype=torch.float16, seed=("abi_step",))
    state = inp["initial_state"].clone()
    out = torch.empty(3, 4, 16, dtype=torch.float16)
    y = ssd_state_update(state, inp["x"][:, 0], inp["dt"][:, 0], inp["A"], inp["B"][:, 0], inp["C"][:, 0],
                         z=inp["z"][:, 0], out=out)
    ((plan, args, grid),) = recorded_launches
    assert plan.gate and not plan.skip and not plan.dt_bias and grid == (4, 3, 1)
    assert args["state"] is state and args["y"] is out and y is out
    assert args["x_sb"] == 4 * 16 and args["B_sb"] == 2 * 16 and args["dt_sb"] == 4
    assert args["dt_hi"] == math.inf


def test_kernel_path_refuses_sizes_no_kernel_takes(recorded_launches):
    inp = ssd_inputs(1, 10, 2, 12, 1, 16, dtype=torch.bfloat16, seed=("nokernel",))   # head_dim 12
    with pytest.raises(SSDInputError, match="no SSD kernel.*head_dim = 12"):
        ssd_scan(**inp)


@pytest.mark.parametrize("cb", ["0", "1"])
def test_scan_launches_hand_each_kernel_its_abi(monkeypatch, cb):
    """runtime/ssd._scan_cuda's launches without a GPU (the loaded kernels replaced by checkers of their plans'
    ABIs, on CPU tensors): each launch gets its ABI's arguments in order (pointers as tensors of the declared
    element type, dims and scalars as numbers), and with LAYERFORGE_SSD_CB=1 the scores' kernel runs first and
    the chunk scan takes its table in place of B."""
    from layerforge.runtime import ssd as rs
    monkeypatch.setenv("LAYERFORGE_SSD_CB", cb)
    launched = []

    def fake_launcher(key, device, make_plan, cache=None):
        plan = make_plan("sm_90")

        def launch(problem, args):
            names = [a.name for a in plan.abi.args]
            assert len(args) == len(names), (plan.key, names, len(args))
            for a, v in zip(plan.abi.args, args):
                if "*" in a.ctype:
                    want = {"float": torch.float32, "__nv_bfloat16": torch.bfloat16}[
                        a.ctype.replace("const ", "").split("*")[0].strip()]
                    assert isinstance(v, torch.Tensor) and v.dtype == want, (plan.key, a.name, a.ctype, v.dtype)
                else:
                    assert isinstance(v, (int, float)) and not isinstance(v, bool), (plan.key, a.name, v)
            launched.append((plan.family, names, dict(zip(names, args))))
        return launch
    monkeypatch.setattr(rs, "_launcher", fake_launcher)
    inp = ssd_inputs(2, 300, 8, 16, 2, 16, dtype=torch.bfloat16, seed=("abi", cb))
    rs._scan_cuda(inp["x"], inp["dt"], inp["A"], inp["B"], inp["C"], inp["D"], inp["z"], inp["dt_bias"], True,
                  (0.0, math.inf), 64, inp["initial_state"], None)
    families = [f for f, _, _ in launched]
    if cb == "1":
        assert families == ["ssd_chunk_state", "ssd_state_passing", "ssd_chunk_cb", "ssd_chunk_scan"]
        table = launched[2][2]["cb"]
        assert table.shape == (2, 5, 2, 64, 64) and launched[3][2]["cb"] is table and "B" not in launched[3][1]
    else:
        assert families == ["ssd_chunk_state", "ssd_state_passing", "ssd_chunk_scan"]
        assert launched[2][2]["B"] is inp["B"] and "cb" not in launched[2][1]
