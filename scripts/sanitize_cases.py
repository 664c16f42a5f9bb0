"""Small launches for compute-sanitizer (memcheck): a row kernel, MoE routing, a ragged prefill
(tensor-core prefill tiles), a chunked prefill and a split-KV decode step (tensor-core and
CUDA-core kernels), the same kernels on corrupt page tables, lengths and offsets, and a KV
append. Run by scripts/gpu-check.sh as
    compute-sanitizer --tool memcheck --report-api-errors no python scripts/sanitize_cases.py"""
import torch

import layerforge as lf
from layerforge.runtime.attention import PagedAttention
from layerforge.runtime.kv_cache import PagedKVCache
from layerforge.runtime.layers import module


def main():
    torch.manual_seed(0)  # the same launches every run, so a report reproduces
    prog = lf.stdlib()
    bf = torch.bfloat16
    norm = module("add_rms_norm", H=5120, dtype="bf16", device="cuda", eps=1e-5)
    x = torch.randn(7, 5120, device="cuda", dtype=bf)
    norm(x, x.clone())
    route = module("moe_route", E=64, k=8, dtype="f32", device="cuda")
    route(torch.randn(33, 64, device="cuda"))

    layer = prog.specialise("llama_attn", Hq=32, Hkv=8, D=128, dtype="bf16")
    rope = layer.function.outputs[0].arg.rope
    cache = PagedKVCache(64, 16, 8, 128, dtype=bf, device="cuda", max_seqs=4, max_pages_per_seq=16)
    lens = {0: 1, 1: 37, 3: 100}
    for s, n in lens.items():
        cache.allocate(s, n + 1)
        cache.append([s] * n, torch.randn(n, 8, 128, device="cuda", dtype=bf),
                     torch.randn(n, 8, 128, device="cuda", dtype=bf), rope)
    attn = PagedAttention(layer, page_size=16)          # tensor-core kernels
    simt = PagedAttention(layer, page_size=16, kernel="simt")
    # ragged prefill (tensor-core prefill tiles): each sequence's cached tokens as new queries
    cu = torch.tensor([0, 1, 38, 38, 138], dtype=torch.int32, device="cuda")
    qr = torch.randn(138, 32, 128, device="cuda", dtype=bf)
    attn.prefill(qr, cache.k_cache, cache.v_cache, cache.page_table, cache.seq_lens, cu, max_q_len=100,
                 max_kv_len=100)
    # chunked prefill: the last tokens of each sequence attend to the cache
    q_seq = torch.tensor([0, 1, 1, 1, 3, 3], dtype=torch.int32, device="cuda")
    q_pos = torch.tensor([0, 34, 35, 36, 98, 99], dtype=torch.int32, device="cuda")
    q = torch.randn(6, 32, 128, device="cuda", dtype=bf)
    attn(q, cache.k_cache, cache.v_cache, cache.page_table, cache.seq_lens, q_seq, q_pos, max_kv_len=100)
    simt(q, cache.k_cache, cache.v_cache, cache.page_table, cache.seq_lens, q_seq, q_pos, max_kv_len=100)
    # decode step with split-KV
    ids = [0, 1, 3]
    pos = cache.append(ids, torch.randn(3, 8, 128, device="cuda", dtype=bf),
                       torch.randn(3, 8, 128, device="cuda", dtype=bf), rope)
    q = torch.randn(3, 32, 128, device="cuda", dtype=bf)
    attn(q, cache.k_cache, cache.v_cache, cache.page_table, cache.seq_lens,
         torch.tensor(ids, dtype=torch.int32, device="cuda"), pos.cuda(), max_kv_len=101, num_splits=4)
    # corrupt inputs the host cannot check without a sync: page ids past the cache and
    # negative, lengths past the page table, a sequence id out of range, offsets past q.
    # The kernels clamp them: wrong numbers, never an out-of-bounds access.
    bad_table = cache.page_table.clone()
    bad_table[1, 0] = 10**6
    bad_table[3, 2] = -5
    bad_lens = torch.tensor([1, 10**6, 0, 5000], dtype=torch.int32, device="cuda")
    bad_seq = torch.tensor([0, 7, 3], dtype=torch.int32, device="cuda")
    for kernel in (attn, simt):
        kernel(q, cache.k_cache, cache.v_cache, bad_table, bad_lens, bad_seq, pos.cuda(), max_kv_len=256)
    bad_cu = torch.tensor([0, 1, 500, 38, 10**6], dtype=torch.int32, device="cuda")
    attn.prefill(qr, cache.k_cache, cache.v_cache, bad_table, bad_lens, bad_cu, max_q_len=100, max_kv_len=256)
    torch.cuda.synchronize()
    print("sanitize cases ran")


if __name__ == "__main__":
    main()
