"""The Llama decoder layer on CUDA (generated RMSNorm, add+RMSNorm, SwiGLU and attention
kernels) against transformers' LlamaDecoderLayer; the case is in tests/llama_decoder_case.py."""
import pytest

pytest.importorskip("transformers")

from ..llama_decoder_case import prefill_then_decode  # noqa: E402


def test_decoder_layer_matches_transformers():
    prefill_then_decode("cuda")
