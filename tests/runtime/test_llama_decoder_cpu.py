"""The Llama decoder layer on CPU tensors against transformers' LlamaDecoderLayer; the case
is shared with the GPU test (tests/llama_decoder_case.py)."""
import pytest

pytest.importorskip("transformers")

from ..llama_decoder_case import prefill_then_decode  # noqa: E402


def test_decoder_layer_matches_transformers_on_cpu():
    prefill_then_decode("cpu")
