"""Embedding and PromptTuningEmbedding (runtime/embedding.py) on CPU tensors, where they run
the reference evaluator: torch.nn.Embedding's lookup, TensorRT-LLM's prompt-tuning semantics,
rows of zeros for out-of-range ids, and clear errors for bad inputs."""
import pytest
import torch

import layerforge as lf
from layerforge import LayerInputError


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(5,), (2, 7), (0,)])
def test_embedding_matches_torch(dtype, shape):
    g = torch.Generator().manual_seed(0)
    ref = torch.nn.Embedding(50, 12).to(dtype)
    emb = lf.Embedding(50, 12, dtype=dtype)
    emb.load_state_dict(ref.state_dict())          # state-dict compatible: `weight` [V, H]
    ids = torch.randint(0, 50, shape, generator=g)
    for i in (ids, ids.to(torch.int32)):
        y = emb(i)
        assert y.shape == (*shape, 12) and y.dtype == dtype
        assert torch.equal(y, torch.nn.functional.embedding(ids, ref.weight))


def test_embedding_state_dict_round_trip():
    emb = lf.Embedding(10, 4, dtype="bf16")
    assert set(emb.state_dict()) == {"weight"} and emb.weight.shape == (10, 4)
    ref = torch.nn.Embedding(10, 4).to(torch.bfloat16)
    ref.load_state_dict(emb.state_dict())
    assert torch.equal(ref.weight, emb.weight)


def test_out_of_range_ids_give_zero_rows():
    emb = lf.Embedding(8, 3)
    ids = torch.tensor([0, 7, 8, -1, 2**40, -2**40, 2**31 + 3])   # int64 past int32 does not wrap into range
    y = emb(ids)
    assert torch.equal(y[:2], emb.weight[[0, 7]])
    assert torch.equal(y[2:], torch.zeros(5, 3))


def test_out_param():
    emb = lf.Embedding(8, 3)
    out = torch.empty(2, 2, 3)
    ids = torch.tensor([[1, 2], [3, 4]])
    assert emb(ids, out=out) is out and torch.equal(out, emb.weight[ids])


def test_embedding_bad_inputs():
    emb = lf.Embedding(8, 3)
    with pytest.raises(LayerInputError, match="integer tensor"):
        emb(torch.tensor([1.0, 2.0]))
    with pytest.raises(LayerInputError, match="torch.Tensor"):
        emb([1, 2])
    with pytest.raises(RuntimeError, match="size mismatch"):
        emb.load_state_dict({"weight": torch.zeros(9, 3)})


def reference_prompt_tuning(w, table, ids, tasks):
    """TensorRT-LLM's PromptTuningEmbedding, with zeros for ids outside both tables."""
    V, (NT, NV, H) = w.shape[0], table.shape
    out = torch.zeros(len(ids), H, dtype=w.dtype)
    for n, (i, t) in enumerate(zip(ids.tolist(), tasks.tolist())):
        if 0 <= i < V:
            out[n] = w[i]
        elif V <= i < V + NV and 0 <= t < NT:
            out[n] = table[t, i - V]
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_prompt_tuning_semantics(dtype):
    g = torch.Generator().manual_seed(1)
    V, H, NT, NV = 20, 6, 3, 4
    pt = lf.PromptTuningEmbedding(V, H, dtype=dtype)
    table = torch.randn(NT, NV, H, generator=g).to(dtype)
    ids = torch.tensor([0, 19, 20, 23, 21, 24, -1, 22, 5])
    tasks = torch.tensor([2, 0, 0, 2, 1, 0, 0, 3, -1])
    y = pt(ids, table, tasks)
    assert torch.equal(y, reference_prompt_tuning(pt.weight, table, ids, tasks))
    assert torch.equal(y[2], table[0, 0]) and torch.equal(y[3], table[2, 3]) and torch.equal(y[4], table[1, 1])
    assert not y[5:8].any()                      # past V + NV, negative, task out of range
    assert torch.equal(y[8], pt.weight[5])       # vocabulary ids ignore the task
    # TensorRT-LLM's flat table [NT * NV, H] with task_vocab_size
    assert torch.equal(pt(ids, table.reshape(NT * NV, H), tasks, task_vocab_size=NV), y)
    # ids of any shape, one task for all tokens
    y2 = pt(ids.view(3, 3), table, 1)
    assert y2.shape == (3, 3, H)
    assert torch.equal(y2.view(9, H), reference_prompt_tuning(pt.weight, table, ids, torch.ones(9, dtype=torch.long)))


def test_prompt_tuning_without_a_table():
    pt = lf.PromptTuningEmbedding(10, 4)
    ids = torch.tensor([3, 10, 12])
    y = pt(ids, None)
    assert torch.equal(y[0], pt.weight[3]) and not y[1:].any()
    assert torch.equal(pt(ids, torch.zeros(0, 5, 4), 0), y)


def test_prompt_tuning_state_dict_is_an_embeddings():
    pt = lf.PromptTuningEmbedding(10, 4)
    ref = torch.nn.Embedding(10, 4)
    pt.load_state_dict(ref.state_dict())
    assert torch.equal(pt(torch.arange(10), None), ref.weight)


def test_prompt_tuning_bad_inputs():
    pt = lf.PromptTuningEmbedding(10, 4)
    ids = torch.tensor([1, 11])
    with pytest.raises(LayerInputError, match="task_vocab_size"):
        pt(ids, torch.zeros(6, 4), 0)
    with pytest.raises(LayerInputError, match="task_vocab_size"):
        pt(ids, torch.zeros(6, 4), 0, task_vocab_size=4)
    with pytest.raises(LayerInputError, match="embedding_dim"):
        pt(ids, torch.zeros(2, 3, 5), 0)
    with pytest.raises(LayerInputError, match="shape of 'ids'"):
        pt(ids, torch.zeros(2, 3, 4), torch.tensor([0, 1, 1]))
    with pytest.raises(LayerInputError, match="must be f32"):
        pt(ids, torch.zeros(2, 3, 4, dtype=torch.float16), 0)
    with pytest.raises(LayerInputError, match="integer tensor"):
        pt(ids, torch.zeros(2, 3, 4), torch.tensor([0.0, 1.0]))


def test_dsl_row_lookup_errors():
    with pytest.raises(lf.DSLError, match="an index must be an integer"):
        lf.loads("dims V, H\ndynamic N\nlayer e(ids: f32[N], w: f32[V, H]) -> f32[N, H] { return w[ids] }\n")
    with pytest.raises(lf.DSLError, match="has 2 dims but 3 indices"):
        lf.loads("dims V, H\ndynamic N\nlayer e(ids: i32[N], w: f32[V, H]) -> f32[N, H] { return w[ids, ids, ids] }\n")
    with pytest.raises(lf.DSLError, match="only tensor parameters can be indexed"):
        lf.loads("dims V, H\ndynamic N\nlayer e(ids: i32[N], w: f32[V, H]) -> f32[N, H] { return (w * 2.0)[ids] }\n")
