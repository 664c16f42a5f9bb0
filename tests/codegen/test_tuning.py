"""The planner's tuning tables (codegen/tuning.py) and `layerforge tune`'s choice (runtime/tune.py): a table's
split replaces the rules' for exactly its problem; unusable entries and switched-off tables leave the rules;
the tuner records only splits that beat the rules' plan by the margin and removes entries the rules beat; every
packaged entry compiles without spills. Timing is faked here (tests/gpu/test_tune_gpu.py measures on a GPU)."""
import json

import pytest

from layerforge.codegen import tuning
from layerforge.codegen.gemv import plan_gemv
from layerforge.runtime.tune import model_products, parse_products, tune_products

KEY = dict(arch="sm_90", dtype="bf16", wtype="u4", group=128, gated=None, n=6144, k=4096, bucket=16)


@pytest.fixture
def tables(tmp_path, monkeypatch):
    """Tuning on, the user's table under tmp_path (not the real cache folder), no extra table."""
    monkeypatch.setenv("LAYERFORGE_TUNING", "1")
    monkeypatch.setenv("LAYERFORGE_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("LAYERFORGE_TUNING_TABLE", raising=False)
    monkeypatch.setattr(tuning, "_DEVICES", {})   # no card planned for yet (a GPU test before may have noted one)
    tuning.clear_cache()
    yield tmp_path
    tuning.clear_cache()


def _u4_16(**kw):
    return plan_gemv("bf16", n=6144, k=4096, max_m=16, arch="sm_90", wtype="u4", group=128, **kw)


def test_a_table_split_replaces_the_rules_for_exactly_its_problem(tables, monkeypatch):
    rules = _u4_16(tuned=False)
    split = {"rt": 1, "warps": 4, "stages": 3}
    assert (rules.rt, rules.warps, rules.stages) != (1, 4, 3)
    tuning.write_entry(tuning.user_table_path(), "gemv", split, measured={"us": 1.0}, **KEY)
    tuned = _u4_16()
    assert (tuned.rt, tuned.warps, tuned.stages) == (1, 4, 3) and tuned.key != rules.key
    # other problems keep the rules: another bucket, N, weight type, arch
    assert plan_gemv("bf16", n=6144, k=4096, max_m=8, arch="sm_90", wtype="u4", group=128).key == plan_gemv(
        "bf16", n=6144, k=4096, max_m=8, arch="sm_90", wtype="u4", group=128, tuned=False).key
    assert plan_gemv("bf16", n=4096, k=4096, max_m=16, arch="sm_90", wtype="u4", group=128).key == plan_gemv(
        "bf16", n=4096, k=4096, max_m=16, arch="sm_90", wtype="u4", group=128, tuned=False).key
    assert plan_gemv("bf16", n=6144, k=4096, max_m=16, arch="sm_80", wtype="u4", group=128).key == plan_gemv(
        "bf16", n=6144, k=4096, max_m=16, arch="sm_80", wtype="u4", group=128, tuned=False).key
    assert plan_gemv("bf16", n=6144, k=4096, max_m=16, arch="sm_90").key == plan_gemv(
        "bf16", n=6144, k=4096, max_m=16, arch="sm_90", tuned=False).key
    # the same problem with a bias / residual / norm takes the split too (they do not change its shared memory
    # beyond the norm's row)
    assert _u4_16(bias=True).stages == 3 and _u4_16(norm="rms").stages == 3
    # an explicit split, tuned=False and LAYERFORGE_TUNING=0 ignore the table
    assert _u4_16(rt=2, warps=4, stages=2).key == rules.key
    monkeypatch.setenv("LAYERFORGE_TUNING", "0")
    assert _u4_16().key == rules.key


def test_a_later_table_replaces_an_earlier_entry(tables, monkeypatch):
    tuning.write_entry(tuning.user_table_path(), "gemv", {"rt": 1, "warps": 4, "stages": 3}, **KEY)
    extra = tables / "extra.json"
    tuning.write_entry(extra, "gemv", {"rt": 1, "warps": 2, "stages": 4}, **KEY)
    monkeypatch.setenv("LAYERFORGE_TUNING_TABLE", str(extra))
    assert tuning.lookup("gemv", **KEY) == {"rt": 1, "warps": 2, "stages": 4}
    assert tuning.remove_entry(extra, "gemv", **KEY) and not tuning.remove_entry(extra, "gemv", **KEY)
    assert tuning.lookup("gemv", **KEY) == {"rt": 1, "warps": 4, "stages": 3}


H100, H200 = "NVIDIA H100 80GB HBM3", "NVIDIA H200"


def test_a_retune_on_the_card_of_another_tables_entry_sees_that_entry(tables, monkeypatch, tmp_path):
    """split_without (what tune's _record asks before it drops a card's entry): the split this card would take were the
    written table's own entry gone. Another table read beside it (here LAYERFORGE_TUNING_TABLE's; the packaged table's
    alike) with this card's entry counts; a table not read here (written to ship) counts other cards' entries only;
    the written table's own entry for this card never."""
    user, extra, ship = tuning.user_table_path(), tmp_path / "extra.json", tmp_path / "ship.json"
    split100, old100, split200 = ({"rt": 1, "warps": 4, "stages": 3}, {"rt": 2, "warps": 8, "stages": 2},
                                  {"rt": 2, "warps": 2, "stages": 4})
    tuning.write_entry(extra, "gemv", old100, measured={"device": H100}, **KEY)
    monkeypatch.setenv("LAYERFORGE_TUNING_TABLE", str(extra))
    tuning.write_entry(user, "gemv", split100, measured={"device": H100}, **KEY)
    assert tuning.split_without("gemv", H100, table=user, **KEY) == old100     # read beside the user's table
    tuning.write_entry(ship, "gemv", split100, measured={"device": H100}, **KEY)
    assert tuning.split_without("gemv", H100, table=ship, **KEY) is None       # ship is not read: to replace it
    tuning.write_entry(ship, "gemv", split200, measured={"device": H200}, **KEY)
    assert tuning.split_without("gemv", H100, table=ship, **KEY) == split200   # another card's still serves
    assert tuning.split_without("gemv", H200, table=ship, **KEY) == split100   # the H100's, read last
    monkeypatch.delenv("LAYERFORGE_TUNING_TABLE")
    assert tuning.split_without("gemv", H100, table=user, **KEY) is None       # extra no longer read


def test_an_entry_serves_its_card_first_and_a_sibling_card_where_that_has_none(tables):
    """Two cards of one arch (an H100 and an H200 are both sm_90): each takes its own entry of a problem; an entry
    naming no card serves every card (of a card's own and those, the one read last); a card with neither takes
    another card's (the one read last); with no card known (a build without a GPU) the entry read last serves."""
    user = tuning.user_table_path()
    split100, split200, every = ({"rt": 1, "warps": 4, "stages": 3}, {"rt": 2, "warps": 2, "stages": 4},
                                 {"rt": 1, "warps": 8, "stages": 2})
    tuning.write_entry(user, "gemv", split100, measured={"device": H100}, **KEY)
    assert tuning.lookup("gemv", device=H200, **KEY) == split100   # a sibling's measurement, none of its own
    tuning.write_entry(user, "gemv", split200, measured={"device": H200}, **KEY)   # H100's entry kept beside it
    assert tuning.split_without("gemv", H200, table=user, **KEY) == split100   # what each would take without its own
    assert tuning.split_without("gemv", H100, table=user, **KEY) == split200
    assert tuning.lookup("gemv", device=H100, **KEY) == split100
    assert tuning.lookup("gemv", device=H200, **KEY) == split200
    assert tuning.lookup("gemv", device="NVIDIA H20", **KEY) == split200   # neither: the entry read last
    assert tuning.lookup("gemv", **KEY) == split200        # no card known: the entry read last
    # the runtime names the card it plans for (runtime/launch.device_arch): lookups of its arch take that card's
    # entries, the "a" arch of the Hopper kernels included; a plan of the problem then takes the card's split
    gen = tuning.generation()
    tuning.note_device("sm_90", H100)
    assert tuning.generation() != gen                      # cached lookups were taken for no card
    assert tuning.lookup("gemv", **KEY) == split100 and tuning.device_for("sm_90a") == H100
    assert (_u4_16().rt, _u4_16().warps, _u4_16().stages) == (1, 4, 3)
    assert tuning.lookup("gemv", **(KEY | {"arch": "sm_80"})) is None and tuning.device_for("sm_80") is None
    # an entry naming no card serves every card: the one read last of it and the card's own
    tuning.write_entry(user, "gemv", every, **KEY)
    assert tuning.lookup("gemv", **KEY) == every and tuning.lookup("gemv", device=H200, **KEY) == every
    tuning.write_entry(user, "gemv", split100, measured={"device": H100}, **KEY)   # measured again: read last
    assert tuning.lookup("gemv", **KEY) == split100 and tuning.lookup("gemv", device=H200, **KEY) == every
    # two cards of one arch in a process: the card is unknown again, the entry read last serves
    tuning.note_device("sm_90", H200)
    assert tuning.device_for("sm_90") is None and tuning.lookup("gemv", **KEY) == split100
    # removing one card's entry keeps the others'
    assert tuning.remove_entry(user, "gemv", device=H100, **KEY)
    assert not tuning.remove_entry(user, "gemv", device=H100, **KEY)
    assert tuning.lookup("gemv", device=H100, **KEY) == every
    assert tuning.remove_entry(user, "gemv", device="", **KEY)   # the entry naming no card
    assert tuning.lookup("gemv", device=H100, **KEY) == split200 == tuning.lookup("gemv", device=H200, **KEY)
    assert tuning.remove_entry(user, "gemv", **KEY) and tuning.lookup("gemv", device=H200, **KEY) is None


def test_the_tuner_on_a_second_card_records_its_own_entry_beside_the_first_cards(tables):
    """Tuning one problem on an H200 where the rules win records the rules' split for the H200 (the H100's entry
    would serve it otherwise) and keeps the H100's measured win for H100s; tuning the H100 again where the rules win
    there removes its entry (the H200's, the rules' split, would give it the rules anyway), and then the H200's own
    on its next run (no other card's left to shadow)."""
    table = tuning.user_table_path()
    common = dict(tokens=(16,), arch="sm_90", table=table, candidates=[(1, 4, 3)], wtype="u4", group=128,
                  log=lambda s: None)
    rules = _u4_16(tuned=False)
    rsplit = {"rt": rules.rt, "warps": rules.warps, "stages": rules.stages}
    assert tuple(rsplit.values()) != (1, 4, 3)
    wins, loses = _fake({(1, 4, 3): 8.0, tuple(rsplit.values()): 10.0}), _fake({(1, 4, 3): 11.0,
                                                                                tuple(rsplit.values()): 10.0})
    (res,) = tune_products([("qkv", 6144, 4096, None)], measure_factory=wins[0], device_name=H100, **common)
    assert res.recorded
    (res,) = tune_products([("qkv", 6144, 4096, None)], measure_factory=loses[0], device_name=H200, **common)
    assert not res.recorded
    assert tuning.lookup("gemv", device=H100, **KEY) == {"rt": 1, "warps": 4, "stages": 3}
    assert tuning.lookup("gemv", device=H200, **KEY) == rsplit          # its own measurement: the rules
    assert sorted(e["device"] for e in tuning.read_table(table)) == [H100, H200]
    tune_products([("qkv", 6144, 4096, None)], measure_factory=loses[0], device_name=H100, **common)
    assert [e["device"] for e in tuning.read_table(table)] == [H200]    # the H100's entry gone, the H200's stays
    tune_products([("qkv", 6144, 4096, None)], measure_factory=loses[0], device_name=H200, **common)
    assert tuning.read_table(table) == [] and tuning.lookup("gemv", device=H200, **KEY) is None


def test_a_route_measured_on_one_card_is_countermanded_on_another(tables):
    """bf16: torch's product faster on an H100 records a route; on an H200 where the kernel wins, a {"cublas": 0}
    entry keeps the H200's calls on the kernel (runtime/linear.torch_route reads the flag)."""
    table = tuning.user_table_path()
    key = dict(arch="sm_90", dtype="bf16", wtype=None, group=0, gated=None, n=4096, k=4096, bucket=16)
    common = dict(tokens=(16,), arch="sm_90", table=table, candidates=[(1, 2, 3)], log=lambda s: None)
    tune_products([("o", 4096, 4096, None)], measure_factory=_fake({(1, 2, 3): 9.0, "torch": 8.0})[0],
                  device_name=H100, **common)
    (res,) = tune_products([("o", 4096, 4096, None)], measure_factory=_fake({(1, 2, 3): 9.0, "torch": 9.5})[0],
                           device_name=H200, **common)
    assert not res.torch_route
    assert tuning.lookup("route", device=H100, **key) == {"cublas": 1}
    assert tuning.lookup("route", device=H200, **key) == {"cublas": 0}


def test_a_misspelt_extra_table_is_an_error(tables, monkeypatch):
    monkeypatch.setenv("LAYERFORGE_TUNING_TABLE", str(tables / "no-such-table.json"))
    with pytest.raises(ValueError, match="LAYERFORGE_TUNING_TABLE=.*no such file"):
        tuning.lookup("gemv", **KEY)


def test_an_entry_the_plan_cannot_take_leaves_the_rules(tables):
    # 64 warps x 6 stages of a 16-token u4 ring pass any CTA's shared memory: the rules decide
    tuning.write_entry(tuning.user_table_path(), "gemv", {"rt": 4, "warps": 64, "stages": 6}, **KEY)
    assert _u4_16().key == _u4_16(tuned=False).key
    # fits sm_90's 227 KB but not sm_80's 163 KB: an sm_80 entry of it is passed over
    big = {"rt": 2, "warps": 8, "stages": 2}
    assert 163 * 1024 < _u4_16(**big).shared_bytes <= 227 * 1024
    tuning.write_entry(tuning.user_table_path(), "gemv", big, **(KEY | {"arch": "sm_80"}))
    sm80 = dict(n=6144, k=4096, max_m=16, arch="sm_80", wtype="u4", group=128)
    assert plan_gemv("bf16", **sm80).key == plan_gemv("bf16", **sm80, tuned=False).key


@pytest.mark.parametrize("text,needle", [
    ("[]", "is {'version'"),
    ('{"version": 2, "entries": []}', "is {'version'"),
    ('{"version": 1, "entries": [{"family": "gemv"}]}', "entry 0"),
    ('{"version": 1, "entries": [{"family": "gemv", "arch": "sm_90", "dtype": "bf16", "wtype": null, "group": 0, '
     '"gated": null, "n": 8, "k": 8, "bucket": 8, "split": {"rt": 1, "warps": -1, "stages": 2}}]}', "non-negative ints"),
    ("{not json", "not a tuning table"),
])
def test_a_bad_table_is_an_error_naming_its_file(tables, monkeypatch, text, needle):
    bad = tables / "bad.json"
    bad.write_text(text)
    monkeypatch.setenv("LAYERFORGE_TUNING_TABLE", str(bad))
    with pytest.raises(ValueError, match="bad.json") as e:
        tuning.lookup("gemv", **KEY)
    assert needle in str(e.value)


def test_the_packaged_table_loads_and_every_entry_compiles_without_spills(tables):
    """Each packaged entry (measured beside the rules on the card it names) is the plan the planner gives its
    problem on that card with the tables on (a gemv_x8 entry: its plan over x quantised first; the in-register plan
    of the same problem reads the gemv family's), and compiles without spills. An entry is faster than the rules on
    its card, or is the rules' split recorded for its card over another card's entry of the problem."""
    nvrtc = pytest.importorskip("layerforge.runtime.nvrtc")
    entries = tuning.read_table(tuning.PACKAGED_TABLE)
    assert json.loads(tuning.PACKAGED_TABLE.read_text())["version"] == tuning.TABLE_VERSION
    from layerforge.codegen.gemm_stream import plan_gemm_stream
    cards = {}
    for e in entries:
        cards.setdefault(tuning._entry_key(e), []).append(e.get("device"))
    for e in entries:
        shadow = e["split"] == e.get("rules")
        assert e["family"] in ("gemv", "gemv_x8", "gemm_stream", "fp8_path", "gemm") and e.get("device"), e
        assert len(cards[tuning._entry_key(e)]) > 1 if shadow else e.get("us", 0) < e.get("rules_us", 0), e
        if e["family"] == "gemm":   # the Hopper GEMM past 16 rows (or cuBLAS: wgmma 0, over another card's entry)
            if not e["split"]["wgmma"]:
                continue
            import torch

            from layerforge.runtime.linear import GEMM_TABLE_VARIANTS, gemm_plan
            plan = gemm_plan(torch.bfloat16 if e["dtype"] == "bf16" else torch.float16, e["n"], e["k"], e["gated"],
                             False, False, GEMM_TABLE_VARIANTS[e["split"]["tail"]], e["split"]["bn"])
            res = nvrtc.compile_cuda(plan.source(), plan.kernel_name, nvrtc.CompileOptions(plan.arch))
            (kr,) = res.resources.values()
            assert kr.spill_stores == 0 and kr.spill_loads == 0, (plan.key, kr)
            continue
        if e["family"] == "fp8_path":   # a W8A8 path, not a split: the other path than the rows' rule takes
            from layerforge.runtime.quant import FP8_REGISTER_MAX_ROWS
            assert shadow or e["split"] == {"x_first": int(e["bucket"] <= FP8_REGISTER_MAX_ROWS)}, e
            continue
        tuning._DEVICES.clear()
        tuning.note_device(e["arch"], e["device"])   # planned for the card the entry names
        common = dict(n=e["n"], k=e["k"], gated=e["gated"], arch=e["arch"], wtype=e["wtype"], group=e["group"])
        if e["family"] == "gemv_x8":   # W8A8 over x quantised first (a token and 128 k: the layer's path)
            assert e["wtype"] == "f8e4m3", e
            common.update(x_e4m3=True, x_group=128)
        if e["family"] in ("gemv", "gemv_x8"):
            plan = plan_gemv(e["dtype"], max_m=e["bucket"], **common, **e["split"])
            assert plan.key == plan_gemv(e["dtype"], max_m=e["bucket"], **common).key
            assert shadow or plan.key != plan_gemv(e["dtype"], max_m=e["bucket"], **common, tuned=False).key
        else:
            plan = plan_gemm_stream(e["dtype"], mt=e["bucket"], **common,
                                    **(e["split"] | {"packed": bool(e["split"]["packed"])}))
            assert plan.key == plan_gemm_stream(e["dtype"], mt=e["bucket"], **common).key
            assert shadow or plan.key != plan_gemm_stream(e["dtype"], mt=e["bucket"], **common, tuned=False).key
        res = nvrtc.compile_cuda(plan.source(), plan.kernel_name, nvrtc.CompileOptions(e["arch"]))
        (kr,) = res.resources.values()
        assert kr.spill_stores == 0 and kr.spill_loads == 0, (plan.key, kr)


def _fake(times: dict, spills=()):
    """measure_factory whose plans take times[(rt, warps, stages)] us (1000 for any other; torch's product
    times["torch"]), None for `spills`."""
    seen = []

    def factory(n, k, gated, rows):
        def measure(plan, spills_ok=False):
            if plan == "torch":   # torch's product (bf16 / f16 problems)
                return None if "torch" not in times else times["torch"] * 1e-6
            split = (plan.rt, plan.warps, plan.stages)
            seen.append((rows, split))
            return None if split in spills and not spills_ok else times.get(split, 1000.0) * 1e-6
        return measure
    return factory, seen


def test_the_tuner_records_a_split_only_past_the_margin_and_removes_what_the_rules_beat(tables):
    table = tables / "t.json"
    rules = _u4_16(tuned=False)
    r = (rules.rt, rules.warps, rules.stages)
    cands = [(1, 4, 3), (2, 2, 4), (4, 2, 2), r]
    common = dict(tokens=(16,), wtype="u4", group=128, arch="sm_90", table=table, candidates=cands, log=lambda s: None)
    # (2, 2, 4) 5 % faster than the rules, (4, 2, 2) spills (never chosen, however fast its fake time)
    factory, seen = _fake({r: 10.0, (1, 4, 3): 9.8, (2, 2, 4): 9.5, (4, 2, 2): 1.0}, spills={(4, 2, 2)})
    (res,) = tune_products([("qkv", 6144, 4096, None)], measure_factory=factory, **common)
    assert res.recorded and res.best == {"rt": 2, "warps": 2, "stages": 4} and res.bucket == 16
    assert {rows for rows, _ in seen} == {16} and seen[0][1] == r   # the rules' plan first, at the bucket's rows
    (e,) = tuning.read_table(table)
    assert e["split"] == {"rt": 2, "warps": 2, "stages": 4} and e["us"] == 9.5 and e["rules_us"] == 10.0
    assert {f: e[f] for f in tuning.KEY_FIELDS[1:]} == KEY
    # within the margin: nothing recorded, and the earlier entry goes
    factory, _ = _fake({r: 10.0, (2, 2, 4): 9.8})
    (res,) = tune_products([("qkv", 6144, 4096, None)], measure_factory=factory, **common)
    assert not res.recorded and res.best == {"rt": 2, "warps": 2, "stages": 4}
    assert tuning.read_table(table) == []
    # write=False measures and writes nothing
    factory, _ = _fake({r: 10.0, (2, 2, 4): 5.0})
    (res,) = tune_products([("qkv", 6144, 4096, None)], measure_factory=factory, write=False, **common)
    assert not res.recorded and not table.exists() or tuning.read_table(table) == []


def test_the_tuner_times_each_bucket_of_the_tokens_and_the_table_then_serves_the_planner(tables):
    table = tuning.user_table_path()
    factory, seen = _fake({(1, 2, 3): 1.0})   # a split faster than every rule at each bucket
    res = tune_products([("down", 4096, 14336, None)], tokens=(1, 3, 8, 9, 16), arch="sm_90", table=table,
                        candidates=[(1, 2, 3)], measure_factory=factory, log=lambda s: None)
    assert [r.bucket for r in res] == [8, 16] and all(r.recorded for r in res)
    for m in (8, 16):
        p = plan_gemv("bf16", n=4096, k=14336, max_m=m, arch="sm_90")
        assert (p.rt, p.warps, p.stages) == (1, 2, 3)


def test_model_products_are_a_decoder_layers_and_the_lm_head():
    cfg = {"model_type": "llama", "hidden_size": 4096, "intermediate_size": 14336, "num_attention_heads": 32,
           "num_key_value_heads": 8, "num_hidden_layers": 4, "vocab_size": 128256, "rms_norm_eps": 1e-5,
           "tie_word_embeddings": False}
    got = {(n, k, g) for _, n, k, g in model_products(cfg)}
    assert got == {(6144, 4096, None), (4096, 4096, None), (28672, 4096, "silu"), (4096, 14336, None),
                   (128256, 4096, None)}
    tied = dict(cfg, tie_word_embeddings=True, vocab_size=32000)
    assert (32000, 4096, None) in {(n, k, g) for _, n, k, g in model_products(tied)}
    moe = {"model_type": "qwen2_moe", "hidden_size": 2048, "intermediate_size": 5632, "moe_intermediate_size": 1408,
           "shared_expert_intermediate_size": 5632, "num_attention_heads": 16, "num_key_value_heads": 16,
           "num_hidden_layers": 2, "vocab_size": 1000, "num_experts": 60, "num_experts_per_tok": 4,
           "tie_word_embeddings": False}
    names = {name for name, *_ in model_products(moe)}
    assert names == {"attn.qkv", "attn.o", "lm_head"}   # no router logits; the experts are stacks (the MoE kernels')
    assert parse_products("6144:4096, 28672:4096:silu") == [("6144:4096", 6144, 4096, None),
                                                           ("28672:4096:silu", 28672, 4096, "silu")]
    for bad in ("6144", "a:b", "1:2:3:4"):
        with pytest.raises(ValueError, match="N:K"):
            parse_products(bad)


def test_tune_without_a_gpu_is_a_clear_error(capsys):
    from layerforge.cli import main
    import torch
    if torch.cuda.is_available():
        pytest.skip("a CUDA GPU is present: tests/gpu/test_tune_gpu.py runs the tuner")
    assert main(["tune", "--products", "6144:4096"]) == 1
    assert "tune measures on a CUDA GPU, and none is visible" in capsys.readouterr().err
    assert main(["tune", "--products", "6144:4096", "--weights", "f8x"]) == 1   # the name first, on any machine
    assert "--weights are bf16, f16, u4, i8, f8, f8b, f8r, f8br, got ['f8x']" in capsys.readouterr().err


def test_torch_product_faster_than_every_split_routes_the_calls_to_it(tables):
    """bf16 problems: where torch's product (cuBLAS) beats the best split by the margin, a route entry sends the
    calls there (runtime/linear.torch_route reads it); where it does not, the entry goes."""
    table = tuning.user_table_path()
    key = dict(arch="sm_90", dtype="bf16", wtype=None, group=0, gated=None, n=4096, k=4096, bucket=16)
    common = dict(tokens=(16,), arch="sm_90", table=table, candidates=[(1, 2, 3)], log=lambda s: None)
    factory, _ = _fake({(1, 2, 3): 9.0, "torch": 8.0})
    (res,) = tune_products([("o", 4096, 4096, None)], measure_factory=factory, **common)
    assert res.torch_route and res.torch_us == 8.0 and res.recorded   # the split is kept for calls with a norm
    assert tuning.lookup("route", **key) == {"cublas": 1}
    factory, _ = _fake({(1, 2, 3): 9.0, "torch": 8.9})
    (res,) = tune_products([("o", 4096, 4096, None)], measure_factory=factory, **common)
    assert not res.torch_route and tuning.lookup("route", **key) is None
    # u4 problems never time torch's product (it would dequantise W first)
    factory, seen = _fake({"torch": 0.1})
    (res,) = tune_products([("o", 4096, 4096, None)], measure_factory=factory, wtype="u4",
                           **(common | {"candidates": []}))
    assert res.torch_us is None and not res.torch_route and all(s != "torch" for _, s in seen)


def test_the_decode_range_gemm_takes_a_table_split_and_the_stream_tuner_records_wins(tables):
    from layerforge.codegen.gemm_stream import plan_gemm_stream
    from layerforge.runtime.tune import tune_stream
    common = dict(n=4096, k=4096, mt=64, wtype="u4", group=128)
    rules = plan_gemm_stream("bf16", tuned=False, **common)
    # a fake timing: the rules' plan 10 us, 2 CTAs an SM of one row block and warpgroup 9 us, the rest 20 us; the
    # two-warpgroup, two-block plans spill
    seen = []

    def factory(n, k, gated, rows):
        def measure(plan, spills_ok=False):
            if plan == "torch":
                return 12e-6
            seen.append((rows, plan.key))
            if plan.key == rules.key:
                return 10e-6
            if (plan.rb, plan.cw) == (2, 2):
                return None
            return 9e-6 if (plan.ctas, plan.rb, plan.cw, plan.stages) == (2, 1, 1, 2) else 20e-6
        return measure
    table = tuning.user_table_path()
    (res,) = tune_stream([("o", 4096, 4096, None)], rows=(64,), table=table, measure_factory=factory,
                         log=lambda s: None, device_name=H100)
    assert res.recorded and res.best["ctas"] == 2 and res.best["stages"] == 2 and res.torch_us == 12.0
    # each plan once, the rules' twice (first, and after the others: the faster kept), then the fastest again
    keys = [k for _, k in seen]
    assert "bf16 cuBLAS" in res.line() and keys[0] == keys[-2] == rules.key and len(set(keys)) == len(keys) - 2
    assert keys.count(keys[-1]) == 2 and keys[-1] == plan_gemm_stream("bf16", **common).key   # the winner's
    plan = plan_gemm_stream("bf16", **common)
    assert (plan.ctas, plan.stages, plan.ka, plan.packed) == (2, 2, 4, True) and plan.key != rules.key
    assert plan_gemm_stream("bf16", **common, tuned=False).key == rules.key
    assert plan_gemm_stream("bf16", **(common | {"mt": 128})).key == plan_gemm_stream(
        "bf16", **(common | {"mt": 128}), tuned=False).key
    # the rules win now on the card that recorded it: the rules serve it from here on. The user's table drops its
    # entry, or, where another table read beside it (the packaged one) has an entry of this problem for this card,
    # holds the rules' split over it
    (res,) = tune_stream([("o", 4096, 4096, None)], rows=(64,), table=table, log=lambda s: None, device_name=H100,
                         measure_factory=lambda *a: (lambda p, spills_ok=False: 12e-6 if p == "torch" else
                                                     10e-6 if p.key == rules.key else 11e-6))
    assert not res.recorded and plan_gemm_stream("bf16", **common).key == rules.key
    mine = [e for e in tuning.read_table(table) if e["family"] == "gemm_stream"]
    assert all(e["split"] == e["rules"] and e["device"] == H100 for e in mine)
    with pytest.raises(ValueError, match="'u4' or 'i8'"):
        tune_stream([("o", 4096, 4096, None)], wtype=None, measure_factory=factory)


def test_the_stream_tuners_candidates_build_and_the_rules_plans_compile_without_spills():
    """The stream tuner's candidates build at the 8B shapes (one that spills is skipped when tuning, not an error),
    and the rules' plans compile without spills (tune_stream raises on a spilling rules' plan)."""
    nvrtc = pytest.importorskip("layerforge.runtime.nvrtc")
    from layerforge.runtime.tune import STREAM_CANDIDATES, _stream_plans
    for n, k, gated in ((6144, 4096, None), (4096, 4096, None), (28672, 4096, "silu"), (4096, 14336, None)):
        plans = _stream_plans("bf16", STREAM_CANDIDATES, dict(n=n, k=k, mt=64, gated=gated, wtype="u4", group=128))
        assert len(plans) >= 4
        rules = plans[0]
        res = nvrtc.compile_cuda(rules.source(), rules.kernel_name, nvrtc.CompileOptions("sm_90a"))
        (kr,) = res.resources.values()
        assert kr.spill_stores == 0 and kr.spill_loads == 0, (rules.key, kr)


def test_the_rules_plan_is_timed_first_and_last_and_the_faster_kept(tables):
    """The first timing of a problem (after the compiles: an idle GPU's clocks climbing) can read slow; a candidate
    must beat the rules' plan as it runs once warm, so the rules' plan is timed again after the others."""
    from layerforge.runtime.tune import _race
    calls = []

    def measure(plan, spills_ok=False):
        calls.append(plan)
        if plan == "rules":
            return 12e-6 if calls.count("rules") == 1 else 9.9e-6   # slow first, warm last
        return {"a": 10e-6, "b": 11e-6}[plan]
    rules, rules_s, best, best_s, timings = _race(["rules", "a", "b"], measure, lambda p: p, lambda p: p)
    assert calls == ["rules", "a", "b", "rules"] and rules_s == 9.9e-6 and best == "rules" and best_s == 9.9e-6
    assert timings == {"rules": 9.9, "a": 10.0, "b": 11.0}


def test_the_fastest_candidate_is_timed_again_and_its_slower_time_kept(tables):
    """One lucky timing makes no winner: the fastest candidate is timed once more, its slower time kept; where that
    is no faster than the rules', the rules stand; where it still is, it wins with that time."""
    from layerforge.runtime.tune import _race

    def race(times):
        calls = []

        def measure(plan, spills_ok=False):
            calls.append(plan)
            return times[plan][min(calls.count(plan), len(times[plan])) - 1]   # seconds
        return calls, _race(["rules", "a", "b"], measure, lambda p: p, lambda p: p)
    calls, (_, rules_s, best, best_s, timings) = race({"rules": [10e-6], "a": [9e-6, 10.5e-6], "b": [9.8e-6]})
    assert calls == ["rules", "a", "b", "rules", "a"] and best == "rules" and best_s == rules_s == 10e-6
    assert timings["a"] == pytest.approx(10.5)
    calls, (_, _, best, best_s, timings) = race({"rules": [10e-6], "a": [9e-6, 9.2e-6], "b": [9.8e-6]})
    assert best == "a" and best_s == 9.2e-6 and timings["a"] == pytest.approx(9.2)


def test_tune_weights_names():
    from layerforge.runtime.tune import parse_weights
    assert parse_weights("bf16, u4,i8,f8,f8b,f8r,f8br", group=64) == [
        ("bf16", None, 0, False), (None, "u4", 64, False), (None, "i8", 0, False), (None, "f8e4m3", 0, True),
        (None, "f8e4m3", 128, True), (None, "f8e4m3", 0, False), (None, "f8e4m3", 128, False)]
    with pytest.raises(ValueError, match="--weights are bf16, f16, u4, i8, f8, f8b, f8r, f8br"):
        parse_weights("u4,fp8")


@pytest.mark.parametrize("x_e4m3", [True, False], ids=["x_first", "x_in_registers"])
@pytest.mark.parametrize("group", [0, 128])
def test_the_tuner_takes_fp8_weights_and_the_planner_then_serves_their_split(tables, group, x_e4m3):
    """W8A8 e4m3 (one scale a row, or 128 x 128 blocks): x quantised beforehand (x_e4m3, the layer's default path:
    the gemv_x8 family) or in the kernel's loop (gemv's): the tuned path's plan takes the recorded split, the other
    path keeps the rules'; the split compiles without spills, as the rules' plan does (N 5120: a problem the packaged
    table has no entry of)."""
    from layerforge.runtime import nvrtc
    table = tuning.user_table_path()
    common = dict(n=5120, k=4096, max_m=16, arch="sm_90", wtype="f8e4m3", group=group)
    tuned_path = dict(common, x_e4m3=True, x_group=128) if x_e4m3 else common
    other_path = common if x_e4m3 else dict(common, x_e4m3=True, x_group=128)
    rules = plan_gemv("bf16", tuned=False, **tuned_path)
    assert (rules.rt, rules.warps, rules.stages) != (1, 8, 2)
    factory, seen = _fake({(rules.rt, rules.warps, rules.stages): 10.0, (1, 8, 2): 8.0})
    (res,) = tune_products([("qkv", 5120, 4096, None)], tokens=(16,), wtype="f8e4m3", group=group, arch="sm_90",
                           table=table, candidates=[(1, 8, 2), (1, 4, 3)], measure_factory=factory,
                           x_e4m3=x_e4m3, log=lambda s: None)
    assert res.recorded and res.best == {"rt": 1, "warps": 8, "stages": 2}
    assert res.line().split()[1] == ("f8" + ("b" if group else "") + ("" if x_e4m3 else "r"))
    (e,) = tuning.read_table(table)
    assert (e["family"], e["wtype"], e["group"], e["bucket"]) == ("gemv_x8" if x_e4m3 else "gemv", "f8e4m3", group, 16)
    plan = plan_gemv("bf16", **tuned_path)
    assert (plan.rt, plan.warps, plan.stages) == (1, 8, 2) and plan.key != rules.key and plan.x_e4m3 == x_e4m3
    assert plan_gemv("bf16", **other_path).key == plan_gemv("bf16", tuned=False, **other_path).key
    for p in (plan, rules):
        (kr,) = nvrtc.compile_cuda(p.source(), p.kernel_name, nvrtc.CompileOptions(p.arch)).resources.values()
        assert kr.spill_stores == 0 and kr.spill_loads == 0, (p.key, kr)
    with pytest.raises(ValueError, match="group 0"):
        tune_products([("qkv", 6144, 4096, None)], tokens=(16,), wtype="f8e4m3", group=64, arch="sm_90", table=table,
                      measure_factory=factory, log=lambda s: None)
    with pytest.raises(ValueError, match="x_e4m3"):
        tune_products([("qkv", 6144, 4096, None)], tokens=(16,), wtype="u4", arch="sm_90", table=table,
                      measure_factory=factory, x_e4m3=True, log=lambda s: None)


def test_the_fp8_path_tuner_records_the_faster_path_and_gemv_quant_follows_it(tables, monkeypatch):
    """tune_fp8_paths times the W8A8 layer's call on both paths at each bucket; where the path the rows' rule does not
    take (runtime/quant.FP8_REGISTER_MAX_ROWS: in registers up to 8 rows, x first past them) is faster by the margin
    it is recorded, and gemv_quant's route then follows it for exactly that problem; where the rule's path wins the
    entry goes; a set LAYERFORGE_FP8_QUANT_X_FIRST decides over the table."""
    import torch
    from layerforge.runtime import launch, quant
    from layerforge.runtime.quant import pack_fp8, quantize_fp8
    from layerforge.runtime.tune import tune_fp8_paths
    assert quant.FP8_REGISTER_MAX_ROWS == 8
    table = tuning.user_table_path()
    common = dict(tokens=(1, 16), arch="sm_90", table=table, group=0, device_name=H100, log=lambda s: None)
    key = dict(arch="sm_90", dtype="bf16", wtype="f8e4m3", group=0, gated=None, n=4096, k=4096)
    times = {(8, True): 10.0, (8, False): 8.5, (16, True): 11.0, (16, False): 9.8}   # us: in registers faster at both

    def factory(n, k, gated, rows):
        return lambda x_first, spills_ok=False: times[(rows, x_first)] * 1e-6
    res = tune_fp8_paths([("o", 4096, 4096, None)], measure_factory=factory, **common)
    assert [(r.bucket, r.rules, r.best, r.recorded) for r in res] == [
        (8, {"x_first": 0}, {"x_first": 0}, False), (16, {"x_first": 1}, {"x_first": 0}, True)]
    assert "in-regs" in res[1].line() and "x-first" in res[1].line()
    assert tuning.lookup("fp8_path", bucket=16, **key) == {"x_first": 0}
    assert tuning.lookup("fp8_path", bucket=8, **key) is None
    # gemv_quant's choice (the GPU checks faked): the table at 16 rows, the rule at 8 and for another problem
    monkeypatch.setattr(quant, "_gpu_ok", lambda x, qw: True)
    monkeypatch.setattr(launch, "device_arch", lambda device=None: "sm_90")
    monkeypatch.delenv("LAYERFORGE_FP8_QUANT_X_FIRST", raising=False)
    qw = pack_fp8(*quantize_fp8(torch.randn(4096, 4096) / 64), None)
    other = pack_fp8(*quantize_fp8(torch.randn(4096 + 128, 4096) / 64), None)
    x = torch.randn(16, 4096).to(torch.bfloat16)
    assert not quant._fp8_gemv_ok(x, qw, 16) and not quant._fp8_gemv_ok(x[:8], qw, 8)
    assert quant._fp8_gemv_ok(x, other, 16) and quant._fp8_gemv_ok(x, qw, 16, gated="silu")   # not its problem
    assert quant._fp8_gemv_ok(x, qw, 16, per_token=True)      # the per-token layer stays x first
    monkeypatch.setenv("LAYERFORGE_FP8_QUANT_X_FIRST", "1")   # set: decides every call
    assert quant._fp8_gemv_ok(x, qw, 16) and quant._fp8_gemv_ok(x[:8], qw, 8)
    monkeypatch.delenv("LAYERFORGE_FP8_QUANT_X_FIRST")
    # measured again, the rule's path now faster: the entry goes, the rule decides
    times[(16, True)] = 9.0
    res = tune_fp8_paths([("o", 4096, 4096, None)], measure_factory=factory, **common)
    assert not res[1].recorded and tuning.lookup("fp8_path", bucket=16, **key) in (None, {"x_first": 1})
    assert quant._fp8_gemv_ok(x, qw, 16)


def test_the_gemm_tuner_records_the_hopper_gemm_only_where_it_beats_torch_and_gemv_follows_the_table(tables,
                                                                                                     monkeypatch):
    """`tune --gemm-rows` (tune_gemm): past 16 rows each row bucket's Hopper GEMM splits against torch's product (the
    fastest timed again, its slower time kept); a win past the margin is a "gemm" entry, which
    runtime/linear.gemm_table_route turns into the call's variant and tile width; within the margin the card's
    entry goes, and where another card's entry would serve this card, cuBLAS's split is written for it."""
    import torch

    from layerforge.runtime import linear
    from layerforge.runtime.tune import CUBLAS, gemm_candidates, tune_gemm
    table = tuning.user_table_path()
    key = dict(arch="sm_90a", dtype="bf16", wtype=None, group=0, gated=None, n=10576, k=2560)
    seen = []
    times = {"torch": 20.0, (16, 256): 17.0, (8, 256): 18.0, (0, 128): 40.0}   # us; the rest 30

    def factory(n, k, gated, rows):
        def measure(split, spills_ok=False):
            seen.append((rows, "torch" if split == "torch" else (split["tail"], split["bn"])))
            return times.get(seen[-1][1], 30.0) * 1e-6
        return measure
    res = tune_gemm([("in_proj", 10576, 2560, None)], rows=(64, 100), measure_factory=factory, device_name=H100,
                    log=lambda s: None)
    assert [(r.bucket, r.recorded, r.best) for r in res] == [(64, True, {"wgmma": 1, "tail": 16, "bn": 256}),
                                                             (128, True, {"wgmma": 1, "tail": 16, "bn": 256})]
    assert res[0].rules == CUBLAS and res[0].rules_us == 20.0 and "cuBLAS" in res[0].line()
    assert "wgmma_split16/bn256" in res[0].line()
    # torch's first and after the splits, every candidate once, then the fastest again
    first = [s for r, s in seen if r == 64]
    assert first[0] == first[-2] == "torch" and first[-1] == (16, 256)
    assert len(first) == len(gemm_candidates(None)) + 3
    assert tuning.lookup("gemm", bucket=64, **key) == {"wgmma": 1, "tail": 16, "bn": 256}
    (e,) = [e for e in tuning.read_table(table) if e["bucket"] == 64]
    assert (e["us"], e["rules_us"], e["device"]) == (17.0, 20.0, H100)
    x = torch.empty(64, 2560, dtype=torch.bfloat16)
    assert linear.gemm_table_route(x, 10576, 2560, 64, None) == ("wgmma_split16", 256)
    assert linear.gemm_table_route(x, 10576, 2560, 33, None) == ("wgmma_split16", 256)   # bucket 64
    assert linear.gemm_table_route(x, 10576, 2560, 300, None) is None                    # bucket 512: no entry
    assert linear.gemm_table_route(x, 10576, 2560, 64, "silu") is None                   # another problem
    # within the margin now: the card's entry goes and torch's product serves it again
    times[(16, 256)] = times[(8, 256)] = 19.8
    (res,) = tune_gemm([("in_proj", 10576, 2560, None)], rows=(64,), measure_factory=factory, device_name=H100,
                       log=lambda s: None)
    assert not res.recorded and tuning.lookup("gemm", bucket=64, **key) is None
    assert linear.gemm_table_route(x, 10576, 2560, 64, None) is None
    # another card's win read beside this card's loss: cuBLAS's split written for this card
    other = tables / "other.json"
    tuning.write_entry(other, "gemm", {"wgmma": 1, "tail": 8, "bn": 128}, {"device": H200}, bucket=64, **key)
    monkeypatch.setenv("LAYERFORGE_TUNING_TABLE", str(other))
    tuning.clear_cache()
    tuning.note_device("sm_90a", H100)
    assert linear.gemm_table_route(x, 10576, 2560, 64, None) == ("wgmma_split", 128)   # the H200's, for want of one
    (res,) = tune_gemm([("in_proj", 10576, 2560, None)], rows=(64,), measure_factory=factory, device_name=H100,
                       log=lambda s: None)
    assert not res.recorded and tuning.lookup("gemm", bucket=64, **key) == CUBLAS
    assert linear.gemm_table_route(x, 10576, 2560, 64, None) is None
    with pytest.raises(ValueError, match="past 16"):
        tune_gemm([("o", 4096, 4096, None)], rows=(16,), measure_factory=factory)
    with pytest.raises(ValueError, match="bf16 or f16"):
        tune_gemm([("o", 4096, 4096, None)], dtype="f32", measure_factory=factory)


def test_a_gemm_entry_the_problems_plan_cannot_take_leaves_torchs_product(tables):
    import torch

    from layerforge.runtime import linear
    table = tuning.user_table_path()
    key = dict(arch="sm_90a", dtype="bf16", wtype=None, group=0, gated="silu", n=2 * 1024, k=4096, bucket=64)
    tuning.write_entry(table, "gemm", {"wgmma": 1, "tail": 8, "bn": 192}, **key)   # gated takes 128 / 256 only
    x = torch.empty(64, 4096, dtype=torch.bfloat16)
    assert linear.gemm_table_route(x, 2048, 4096, 64, "silu") is None
    tuning.write_entry(table, "gemm", {"wgmma": 1, "tail": 4, "bn": 128}, **key)    # no variant of 4 parts
    assert linear.gemm_table_route(x, 2048, 4096, 64, "silu") is None
    tuning.write_entry(table, "gemm", {"wgmma": 1, "tail": 0, "bn": 128}, **key)
    assert linear.gemm_table_route(x, 2048, 4096, 64, "silu") == ("wgmma_persistent", 128)
