"""layerforge layers are PyTorch custom ops (runtime/ops.py) when traced: a model made of them
compiles with torch.compile(fullgraph=True), exports with torch.export and runs in CUDA graphs,
matching its eager self; eager calls keep the direct launch. On the CPU the ops' real
implementations are the reference evaluator behind the same modules, so everything but the
CUDA graphs and the host timings is checked here without a GPU."""
import time

import pytest
import torch
from torch.library import opcheck

import layerforge as lf
from layerforge.runtime import ops
from layerforge.runtime.attention import PagedAttention
from layerforge.runtime.layers import module

from ..devices import DEVICES, requires_gpu

HQ, HKV, D, F = 8, 2, 64, 128
PAGE, PAGES, MAX_PAGES = 16, 16, 4


def backend(device: str) -> str:
    # the CPU runs the graphs through AOT autograd without Inductor's C++ codegen (fast, and
    # what matters here: functionalisation and the fake implementations)
    return "inductor" if device == "cuda" else "aot_eager"


class Block(torch.nn.Module):
    """RMSNorm -> attention over a paged cache (per-token form) -> projection -> SwiGLU."""

    def __init__(self, device):
        super().__init__()
        dtype = torch.bfloat16
        self.norm = module("rms_norm", H=HQ * D, dtype="bf16", eps=1e-5, device=device)
        self.attn = PagedAttention(lf.stdlib().specialise("llama_attn", Hq=HQ, Hkv=HKV, D=D, dtype="bf16"),
                                   page_size=PAGE)
        self.up = torch.nn.Linear(HQ * D, 2 * F, bias=False, device=device, dtype=dtype)
        self.act = module("swiglu", F=F, dtype="bf16", device=device)
        with torch.no_grad():
            self.norm.weight.uniform_(0.5, 1.5)
            self.up.weight.normal_(0.0, 0.05)
        self.requires_grad_(False)   # inference: the ops have no backward

    def forward(self, x, k_cache, v_cache, page_table, seq_lens, q_seq, q_pos):
        T = x.shape[0]
        h = self.norm(x).view(T, HQ, D)
        o = self.attn(h, k_cache, v_cache, page_table, seq_lens, q_seq, q_pos, max_kv_len=MAX_PAGES * PAGE)
        return self.act(self.up(o.view(T, HQ * D)))


def block_inputs(device, T=3):
    """Random K/V in the pages of T sequences of different lengths, one query token each (decode)."""
    kc = torch.randn(PAGES, PAGE, HKV, D, device=device).bfloat16()
    vc = torch.randn(PAGES, PAGE, HKV, D, device=device).bfloat16()
    table = torch.arange(T * MAX_PAGES, dtype=torch.int32, device=device).view(T, MAX_PAGES)
    lens = torch.tensor([5, 33, 64][:T], dtype=torch.int32, device=device)
    x = torch.randn(T, HQ * D, device=device).bfloat16()
    q_seq = torch.arange(T, dtype=torch.int32, device=device)
    return x, kc, vc, table, lens, q_seq, lens - 1


def assert_matches(got, want, device):
    """Exact on the CPU (the same evaluator runs); on CUDA within bf16 rounding, since the
    compiler may pick its own kernels for the torch operations between the layers."""
    tol = 0 if device == "cpu" else 2e-2
    torch.testing.assert_close(got, want, rtol=tol, atol=tol)


def layerforge_ops(gm: torch.fx.GraphModule) -> list[str]:
    return [str(n.target) for n in gm.graph.nodes if str(n.target).startswith("layerforge.")]


# ---- the ops themselves ----------------------------------------------------------------
def test_row_op_passes_torch_library_opcheck():
    """Schema, fake tensor and AOT-dispatch checks of torch.library, on real CPU tensors."""
    norm = module("rms_norm", H=64, dtype="f32", eps=1e-5)
    x = torch.randn(5, 64)
    opcheck(torch.ops.layerforge.row_layer.default, (ops.handle(norm), [x, norm.weight], [1e-5]))
    out = torch.empty(5, 64)
    opcheck(torch.ops.layerforge.row_layer_out.default, (ops.handle(norm), [x, norm.weight], [1e-5], [out]))


def test_attention_ops_pass_torch_library_opcheck():
    block = Block("cpu")
    x, kc, vc, table, lens, q_seq, q_pos = block_inputs("cpu")
    q = torch.randn(3, HQ, D).bfloat16()
    h = ops.handle(block.attn)
    opcheck(torch.ops.layerforge.paged_attention.default, (h, q, kc, vc, table, lens, q_seq, q_pos, 64, None, [], []))
    # without q_seq / q_pos (token t is sequence t, at its last position): the schema's optional arguments
    opcheck(torch.ops.layerforge.paged_attention.default, (h, q, kc, vc, table, lens, None, None, 64, None, [], []))
    cu = torch.tensor([0, 1, 2, 3], dtype=torch.int32)
    opcheck(torch.ops.layerforge.paged_prefill.default, (h, q, kc, vc, table, lens, cu, 1, 64, None, [], []))


def test_kv_append_op_passes_opcheck_and_declares_its_writes():
    """opcheck's schema test fails an op that writes a tensor it does not declare as mutated
    (or declares one it never writes): the append writes the cache tensors it is given."""
    from layerforge.runtime.kv_cache import PagedKVCache
    cache = PagedKVCache(PAGES, PAGE, HKV, D, torch.bfloat16, "cpu", max_seqs=2, max_pages_per_seq=MAX_PAGES)
    cache.allocate(0, 16)
    k, v = torch.randn(2, 1, HKV, D).bfloat16()
    page_table, seq_lens = ops.cache_tables(cache)
    args = (ops.handle(cache), k, v, torch.tensor([0]), torch.tensor([3]), None, cache.k_cache, cache.v_cache,
            page_table, seq_lens)
    positions, q_seq, q_pos = torch.ops.layerforge.kv_append(*args)
    assert positions.tolist() == [3] and q_seq.tolist() == [0] and q_pos.tolist() == [3]
    assert cache.seq_len(0) == 4 and seq_lens.tolist() == [4, 0]
    torch.testing.assert_close(cache.gather(0)[1][3], v[0], rtol=0, atol=0)
    opcheck(torch.ops.layerforge.kv_append.default, args)   # (runs it again, on copies of the tensors)


@pytest.mark.parametrize("name,dims,inputs,outputs", [
    ("rms_norm", dict(H=64), [(7, 64)], [(7, 64)]),
    ("swiglu", dict(F=48), [(7, 96)], [(7, 48)]),
    ("add_rms_norm", dict(H=64), [(7, 64), (7, 64)], [(7, 64), (7, 64)]),
])
def test_fake_implementation_shapes_outputs_from_the_interface(name, dims, inputs, outputs):
    """Under fake tensors no kernel and no evaluator runs: shapes and dtypes come from the
    layer's interface, with the dynamic dim bound from the inputs."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    m = module(name, dtype="bf16", **dims)
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        args = [torch.empty(s, dtype=torch.bfloat16) for s in inputs]
        weights = [mode.from_tensor(p) for p in m.parameters()]
        got = torch.ops.layerforge.row_layer(ops.handle(m), [*args, *weights], [1e-5] * len(m._scalars))
    assert [tuple(t.shape) for t in got] == outputs
    assert all(t.dtype == torch.bfloat16 for t in got)


def test_fake_implementation_rejects_a_wrong_dtype_when_tracing():
    norm = module("rms_norm", H=64, dtype="bf16", eps=1e-5)
    with pytest.raises(Exception, match="'x' must be torch.bfloat16"):
        torch.compile(norm, fullgraph=True, backend="aot_eager")(torch.randn(3, 64))


def test_handles_name_modules_and_a_freed_module_is_a_clear_error():
    norm = module("rms_norm", H=64, dtype="f32", eps=1e-5)
    h = ops.handle(norm)
    assert h.startswith("rms_norm#") and ops.handle(norm) == h
    w = norm.weight
    del norm
    import gc
    gc.collect()
    with pytest.raises(LookupError, match="names no live module"):
        torch.ops.layerforge.row_layer(h, [torch.randn(2, 64), w], [1e-5])


def test_a_copied_module_gets_its_own_handle():
    import copy
    norm = module("rms_norm", H=64, dtype="f32", eps=1e-5)
    twin = copy.deepcopy(norm)
    assert ops.handle(twin) != ops.handle(norm)


def test_eager_calls_take_the_direct_path(monkeypatch):
    """Outside tracing no op is dispatched (the host cost of a decode call stays as it was)."""
    def refuse(*args, **kwargs):
        raise AssertionError("eager call went through the custom op")
    monkeypatch.setattr(ops, "row_layer", refuse)
    norm = module("rms_norm", H=64, dtype="f32", eps=1e-5)
    norm(torch.randn(2, 64))


# ---- models of layerforge layers, traced ---------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
def test_block_compiles_fullgraph_and_matches_eager(device):
    """One graph (fullgraph=True: a break is an error) holding one op per layerforge layer."""
    block = Block(device)
    inputs = block_inputs(device)
    want = block(*inputs)
    graphs = []

    def record(gm, example_inputs):
        graphs.append(gm)
        return torch._dynamo.backends.registry.lookup_backend(backend(device))(gm, example_inputs)

    got = torch.compile(block, fullgraph=True, backend=record)(*inputs)
    assert len(graphs) == 1
    assert layerforge_ops(graphs[0]) == ["layerforge.row_layer", "layerforge.paged_attention", "layerforge.row_layer"]
    assert_matches(got, want, device)


class IdentityBlock(Block):
    """The block's decode step of every sequence in order, without q_seq / q_pos."""

    def forward(self, x, k_cache, v_cache, page_table, seq_lens):
        T = x.shape[0]
        h = self.norm(x).view(T, HQ, D)
        o = self.attn(h, k_cache, v_cache, page_table, seq_lens, max_kv_len=MAX_PAGES * PAGE)
        return self.act(self.up(o.view(T, HQ * D)))


@pytest.mark.parametrize("device", DEVICES)
def test_identity_decode_compiles_fullgraph_and_matches_spelled_out(device):
    """q_seq / q_pos None travel through the op (its schema's optional arguments): one graph,
    matching eager and the block given arange / seq_lens - 1."""
    block = IdentityBlock(device)
    x, kc, vc, table, lens, q_seq, q_pos = block_inputs(device)
    want = Block.forward(block, x, kc, vc, table, lens, q_seq, q_pos)
    assert_matches(block(x, kc, vc, table, lens), want, device)
    graphs = []

    def record(gm, example_inputs):
        graphs.append(gm)
        return torch._dynamo.backends.registry.lookup_backend(backend(device))(gm, example_inputs)

    got = torch.compile(block, fullgraph=True, backend=record)(x, kc, vc, table, lens)
    assert len(graphs) == 1
    assert layerforge_ops(graphs[0]) == ["layerforge.row_layer", "layerforge.paged_attention", "layerforge.row_layer"]
    assert_matches(got, want, device)


@pytest.mark.parametrize("device", DEVICES)
def test_block_exports_and_the_program_matches_eager(device):
    block = Block(device)
    inputs = block_inputs(device)
    want = block(*inputs)
    T = torch.export.Dim("T", min=1, max=MAX_PAGES)
    tokens = {0: T}
    ep = torch.export.export(block, inputs, dynamic_shapes=(tokens, None, None, {0: T}, {0: T}, {0: T}, {0: T}))
    assert [str(n.target) for n in ep.graph.nodes if "layerforge" in str(n.target)] == [
        "layerforge.row_layer.default", "layerforge.paged_attention.default", "layerforge.row_layer.default"]
    assert_matches(ep.module()(*inputs), want, device)
    # the dynamic token count: the program serves another batch size
    fewer = block_inputs(device, T=2)
    assert_matches(ep.module()(*fewer), block(*fewer), device)


@pytest.mark.parametrize("device", DEVICES)
def test_out_argument_is_written_under_compile(device):
    norm = module("add_rms_norm", H=64, dtype="bf16", eps=1e-5, device=device)
    x, res = torch.randn(2, 4, 64, device=device).bfloat16()
    outs = (torch.empty(4, 64, device=device).bfloat16(), torch.empty(4, 64, device=device).bfloat16())

    def step(x, res, a, b):
        norm(x, res, out=(a, b))
        return a + 0

    got = torch.compile(step, fullgraph=True, backend=backend(device))(x, res, *outs)
    want_norm, want_sum = norm(x, res)
    torch.testing.assert_close(outs[0], want_norm, rtol=0, atol=0)
    torch.testing.assert_close(outs[1], want_sum, rtol=0, atol=0)
    torch.testing.assert_close(got, want_norm, rtol=0, atol=0)


@pytest.mark.parametrize("device", DEVICES)
def test_llama_attention_with_cache_appends_compiles_fullgraph(device):
    """The Llama attention layer (projections, KV append through its op, attention) compiled
    with fullgraph=True: a prefill and three decode steps match an eager twin on its own
    cache, and the host bookkeeping advances at every call of the compiled program."""
    transformers = pytest.importorskip("transformers")
    from layerforge.runtime.llama_attention import LlamaPagedAttention
    cfg = transformers.LlamaConfig(hidden_size=256, num_attention_heads=HQ, num_key_value_heads=HKV, head_dim=D,
                                   vocab_size=11, num_hidden_layers=1, intermediate_size=32, rope_theta=500000.0)
    layer = LlamaPagedAttention(cfg, page_size=PAGE).to(device).to(torch.bfloat16)
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_(0.0, 0.06)
    layer.requires_grad_(False)
    caches = [layer.make_cache(num_pages=PAGES, max_seqs=2, max_pages_per_seq=MAX_PAGES) for _ in range(2)]
    for cache in caches:
        cache.allocate(0, 40)
        cache.allocate(1, 40)
    compiled = torch.compile(layer, fullgraph=True, backend=backend(device))
    steps = [[0] * 5 + [1] * 3] + [[0, 1]] * 3
    for seq_ids in steps:
        x = torch.randn(len(seq_ids), 256, device=device).bfloat16()
        want = layer(x, seq_ids=seq_ids, cache=caches[0])
        got = compiled(x, seq_ids=seq_ids, cache=caches[1])
        torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2)   # max_kv_len differs: see _traced_forward
    assert caches[1].seq_len(0) == 8 and caches[1].seq_len(1) == 6
    assert_matches(caches[1].k_cache, caches[0].k_cache, device)


@pytest.mark.parametrize("device", DEVICES)
def test_llama_decoder_layer_compiles_fullgraph(device):
    """The decoder layer needs nothing of its own: its norms, attention, append and SwiGLU
    route themselves, so the whole layer is one graph."""
    transformers = pytest.importorskip("transformers")
    from layerforge.runtime.llama_decoder import LlamaPagedDecoderLayer
    cfg = transformers.LlamaConfig(hidden_size=256, num_attention_heads=HQ, num_key_value_heads=HKV, head_dim=D,
                                   vocab_size=11, num_hidden_layers=1, intermediate_size=96, rope_theta=500000.0)
    layer = LlamaPagedDecoderLayer(cfg, page_size=PAGE).to(device).to(torch.bfloat16).requires_grad_(False)
    with torch.no_grad():
        for name, p in layer.named_parameters():
            if "layernorm" not in name:
                p.normal_(0.0, 0.06)
    caches = [layer.make_cache(num_pages=PAGES, max_seqs=1, max_pages_per_seq=MAX_PAGES) for _ in range(2)]
    for cache in caches:
        cache.allocate(0, 32)
    compiled = torch.compile(layer, fullgraph=True, backend=backend(device))
    for seq_ids in ([0] * 6, [0], [0]):
        x = torch.randn(len(seq_ids), 256, device=device).bfloat16()
        want = layer(x, seq_ids=seq_ids, cache=caches[0])
        torch.testing.assert_close(compiled(x, seq_ids=seq_ids, cache=caches[1]), want, rtol=2e-2, atol=2e-2)


# ---- the device: CUDA graphs and the host cost ----------------------------------------------
@pytest.mark.gpu
@requires_gpu
def test_block_runs_in_a_cuda_graph_eager_and_compiled():
    """Captured once, replayed over new inputs copied into the captured buffers: the eager
    block (direct launches) and the compiled one (the ops) both match eager."""
    block = Block("cuda")
    static = block_inputs("cuda")
    compiled = torch.compile(block, fullgraph=True)
    for fn in (block, compiled):
        fn(*static)      # loads the kernels and compiles before capture
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            captured = fn(*static)
        for _ in range(2):
            fresh = block_inputs("cuda")
            for s, f in zip(static, fresh):
                s.copy_(f)
            graph.replay()
            assert_matches(captured, block(*fresh), "cuda")


def _host_us(fn, calls=2000) -> float:
    for _ in range(50):
        fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / calls * 1e6


@pytest.mark.gpu
@requires_gpu
def test_host_cost_per_call_op_path_vs_direct():
    """Host microseconds per call of 1-token calls (host-bound: the kernels take ~2-3 us):
    the direct launch (what eager runs), the op dispatched eagerly, and the compiled graph.
    Printed for benchmarks/NOTES.md; asserted only loosely (eager pays for one flag check)."""
    norm = module("rms_norm", H=4096, dtype="bf16", eps=1e-5, device="cuda")
    x = torch.randn(1, 4096, device="cuda").bfloat16()
    h = ops.handle(norm)
    direct = _host_us(lambda: norm(x))
    op = _host_us(lambda: torch.ops.layerforge.row_layer(h, [x, norm.weight], [1e-5]))
    compiled_norm = torch.compile(norm, fullgraph=True)
    compiled = _host_us(lambda: compiled_norm(x))
    flag = _host_us(torch.compiler.is_compiling, calls=100000)

    block = Block("cuda")
    inputs = block_inputs("cuda")
    q = torch.randn(3, HQ, D, device="cuda").bfloat16()
    attn_args = (q, *inputs[1:])
    attn_direct = _host_us(lambda: block.attn(*attn_args, max_kv_len=64))
    h = ops.handle(block.attn)
    attn_op = _host_us(lambda: torch.ops.layerforge.paged_attention(h, *attn_args, 64, None, [], []))
    compiled_block = torch.compile(block, fullgraph=True)
    block_eager = _host_us(lambda: block(*inputs), calls=1000)
    block_compiled = _host_us(lambda: compiled_block(*inputs), calls=1000)
    graph = torch.cuda.CUDAGraph()
    block(*inputs)
    torch.cuda.synchronize()
    with torch.cuda.graph(graph):
        block(*inputs)
    block_graph = _host_us(graph.replay, calls=1000)
    print(f"\nrms_norm 1x4096 bf16, us per call: direct {direct:.2f}, op (eager dispatch) {op:.2f}, "
          f"compiled fullgraph {compiled:.2f}; torch.compiler.is_compiling() {flag:.3f}")
    print(f"paged decode T=3 (Hq 8, Hkv 2, D 64), us per call: direct {attn_direct:.2f}, op {attn_op:.2f}")
    print(f"block (rms_norm, paged decode T=3, linear, swiglu), us per call: eager {block_eager:.2f}, "
          f"compiled fullgraph {block_compiled:.2f}, CUDA graph replay {block_graph:.2f}")
    assert flag < 0.5 and direct < op + 5
