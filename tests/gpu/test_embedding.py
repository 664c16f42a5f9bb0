"""The generated embedding kernels against the reference evaluator and torch, on a GPU:
outputs poisoned first, bf16/f16/f32, widths with and without 16-byte vectors, token counts
from 1 to past a block's rows, out-of-range ids, prompt tuning across tasks, int64 ids,
unaligned tables (a narrower plan) and CUDA graph capture."""
import pytest
import torch

import layerforge as lf
from layerforge.dsl.evaluator import evaluate

from ..seeding import seeded_generator

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
WIDTHS = [7, 100, 1000, 4096, 5120]
TOKENS = [1, 33, 4097]


def poison(shape, dtype):
    return torch.full(shape, float("nan"), dtype=dtype, device="cuda")


@pytest.mark.parametrize("tokens", TOKENS)
@pytest.mark.parametrize("width", WIDTHS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_embedding_kernel(dtype, width, tokens):
    g = seeded_generator(f"emb-{dtype}-{width}-{tokens}")
    V = 1000
    emb = lf.Embedding(V, width, dtype=dtype).cuda()
    assert emb.kernel_reason is None
    with torch.no_grad():
        emb.weight.copy_(torch.randn(V, width, generator=g).to(dtype))
    ids = torch.randint(-5, V + 5, (tokens,), generator=g, dtype=torch.int32)   # a few out of range
    out = poison((tokens, width), dtype)
    got = emb(ids.cuda(), out=out)
    torch.cuda.synchronize()
    (ref,) = evaluate(emb.function, {"ids": ids, "w": emb.weight.cpu()})
    assert not torch.isnan(got).any()
    assert torch.equal(got.cpu(), ref)                      # a copy: bit-exact
    ok = (ids >= 0) & (ids < V)
    assert torch.equal(got.cpu()[ok], torch.nn.functional.embedding(ids[ok].long(), emb.weight.cpu()))
    assert not got.cpu()[~ok].any()


@pytest.mark.parametrize("dtype", DTYPES)
def test_embedding_int64_ids_and_shapes(dtype):
    ref = torch.nn.Embedding(32000, 4096).to(dtype).cuda()
    emb = lf.Embedding(32000, 4096, dtype=dtype).cuda()
    emb.load_state_dict(ref.state_dict())
    ids = torch.randint(0, 32000, (4, 77), device="cuda")
    assert torch.equal(emb(ids), ref(ids))


def test_embedding_unaligned_table_picks_a_narrower_plan():
    emb = lf.Embedding(64, 4096, dtype=torch.bfloat16).cuda()
    w = torch.randn(64 * 4096 + 1, device="cuda").to(torch.bfloat16)[1:].view(64, 4096)   # 2-byte aligned
    with torch.no_grad():
        emb.weight.data = w
    ids = torch.randint(0, 64, (100,), device="cuda", dtype=torch.int32)
    assert torch.equal(emb(ids), w[ids.long()])


@pytest.mark.parametrize("width", [7, 4096, 5120])
@pytest.mark.parametrize("dtype", DTYPES)
def test_prompt_tuning_kernel(dtype, width):
    g = seeded_generator(f"pt-{dtype}-{width}")
    V, NT, NV, N = 500, 3, 10, 2049
    pt = lf.PromptTuningEmbedding(V, width, dtype=dtype).cuda()
    with torch.no_grad():
        pt.weight.copy_(torch.randn(V, width, generator=g).to(dtype))
    table = torch.randn(NT, NV, width, generator=g).to(dtype)
    ids = torch.randint(-3, V + NV + 3, (N,), generator=g, dtype=torch.int32)
    tasks = torch.randint(-1, NT + 1, (N,), generator=g, dtype=torch.int32)
    out = poison((N, width), dtype)
    got = pt(ids.cuda(), table.cuda(), tasks.cuda(), out=out)
    torch.cuda.synchronize()
    (ref,) = evaluate(pt.function, {"ids": ids, "tasks": tasks, "w": pt.weight.cpu(), "prompt": table})
    assert not torch.isnan(got).any()
    assert torch.equal(got.cpu(), ref)
    virt = (ids >= V) & (ids < V + NV) & (tasks >= 0) & (tasks < NT)
    assert torch.equal(got.cpu()[virt], table[tasks[virt].long(), (ids[virt] - V).long()])
    # TensorRT-LLM's flat table
    flat = pt(ids.cuda(), table.reshape(NT * NV, width).cuda(), tasks.cuda(), task_vocab_size=NV)
    assert torch.equal(flat.cpu(), ref)


def test_embedding_in_a_cuda_graph():
    emb = lf.Embedding(1000, 4096, dtype=torch.bfloat16).cuda()
    ids = torch.randint(0, 1000, (64,), device="cuda", dtype=torch.int32)
    out = torch.empty(64, 4096, dtype=torch.bfloat16, device="cuda")
    emb(ids, out=out)   # warm: compile and load before capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        emb(ids, out=out)
    out.fill_(float("nan"))
    ids.copy_(torch.randint(0, 1000, (64,), device="cuda", dtype=torch.int32))
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, emb.weight[ids.long()])
