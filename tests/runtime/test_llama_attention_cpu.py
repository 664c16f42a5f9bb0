"""The Llama attention layer on CPU tensors (the reference evaluator behind the same layer,
cache and append path) against transformers' LlamaAttention; the case is shared with the
GPU test (tests/llama_attention_case.py)."""
import pytest

pytest.importorskip("transformers")

from ..llama_attention_case import CASE_IDS, CASES, prefill_then_decode  # noqa: E402


@pytest.mark.parametrize("hq,hkv,rope", CASES, ids=CASE_IDS)
def test_prefill_then_decode_matches_transformers_on_cpu(hq, hkv, rope):
    prefill_then_decode("cpu", hq, hkv, rope)
