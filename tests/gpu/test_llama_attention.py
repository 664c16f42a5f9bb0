"""The Llama attention layer on CUDA (the generated kernels) against transformers'
LlamaAttention; the case itself is in tests/llama_attention_case.py."""
import pytest

pytest.importorskip("transformers")

from ..llama_attention_case import CASE_IDS, CASES, prefill_then_decode  # noqa: E402


@pytest.mark.parametrize("hq,hkv,rope", CASES, ids=CASE_IDS)
def test_prefill_then_decode_matches_transformers(hq, hkv, rope):
    prefill_then_decode("cuda", hq, hkv, rope)
