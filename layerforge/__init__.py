"""layerforge: a code-generating layer DSL for LLM inference.

    import layerforge as lf
    prog = lf.stdlib()                                   # or lf.load("my_layers.lf")
    norm = prog.specialise("rms_norm", H=4096, dtype="bf16")
    (y,) = lf.evaluate(norm.function, {"x": x, "w": w})  # the reference semantics
"""
from __future__ import annotations

import os as _os

# In a source checkout the stage folders (dsl/, codegen/, runtime/, grammars/, templates/)
# sit beside this package rather than inside it; make them its subpackages, as the wheel does.
_here = _os.path.dirname(_os.path.abspath(__file__))
_root = _os.path.dirname(_here)
if not _os.path.isdir(_os.path.join(_here, "dsl")) and _os.path.isfile(_os.path.join(_root, "dsl", "program.py")):
    __path__.append(_root)  # noqa: F821 (module __path__)

from importlib.metadata import PackageNotFoundError, version as _version

from .dsl.errors import DSLError
from .dsl.program import Layer, Program, dims_from_config

try:
    __version__ = _version("layerforge")
except PackageNotFoundError:  # running from a source tree without installation
    __version__ = "0.0.0+local"


def load(path, *, with_stdlib: bool = True) -> Program:
    """Load and check a DSL file; its definitions may call the standard library's."""
    return Program.from_file(path, with_stdlib=with_stdlib)


def loads(text: str, file: str = "<string>", *, with_stdlib: bool = True) -> Program:
    return Program.from_source(text, file, with_stdlib=with_stdlib)


def stdlib() -> Program:
    """The standard library (norms, activations, linear layers, RoPE, MoE routing, LoRA, attention variants)."""
    return Program.stdlib()


# The reference evaluator (torch) and the runtime (NVRTC, CUDA driver) load on first use, so
# `import layerforge` stays light: `layerforge check` and `list` never import torch.
_LAZY = {
    "evaluate": ("dsl.evaluator", "evaluate"),
    "LayerInputError": ("dsl.evaluator", "LayerInputError"),
    "evaluate_states": ("dsl.evaluator", "evaluate_states"),
    "module": ("runtime.layers", "module"),
    "LayerModule": ("runtime.layers", "LayerModule"),
    "PagedAttention": ("runtime.attention", "PagedAttention"),
    "PagedKVCache": ("runtime.kv_cache", "PagedKVCache"),
    "load_pack": ("runtime.pack", "load_pack"),
    "LlamaPagedAttention": ("runtime.llama_attention", "LlamaPagedAttention"),
    "LlamaPagedDecoderLayer": ("runtime.llama_decoder", "LlamaPagedDecoderLayer"),
    "Embedding": ("runtime.embedding", "Embedding"),
    "PromptTuningEmbedding": ("runtime.embedding", "PromptTuningEmbedding"),
    "Linear": ("runtime.linear", "Linear"),
    "MLAAttention": ("runtime.mla", "MLAAttention"),
    "MultiLoRA": ("runtime.lora", "MultiLoRA"),
    "LoRALinear": ("runtime.lora", "LoRALinear"),
    "attach_adapters": ("models.lora", "attach_adapters"),
    "from_pretrained": ("models.loading", "from_pretrained"),
    "DecoderModel": ("models.model", "DecoderModel"),
    "Engine": ("models.engine", "Engine"),
    "generate": ("models.engine", "generate"),
    "spec_from_config": ("models.families", "spec_from_config"),
    "init_parallel": ("runtime.parallel", "init_parallel"),
    "ColumnLinear": ("runtime.parallel", "ColumnLinear"),
    "RowLinear": ("runtime.parallel", "RowLinear"),
    "VocabParallelEmbedding": ("runtime.parallel", "VocabParallelEmbedding"),
    "ParallelLMHead": ("runtime.parallel", "ParallelLMHead"),
    "MambaModel": ("models.mamba", "MambaModel"),
    "MambaMixer": ("runtime.mamba", "MambaMixer"),
    "Mamba2Mixer": ("runtime.mamba", "Mamba2Mixer"),
    "MambaStateCache": ("runtime.mamba", "MambaStateCache"),
    "ssd_scan": ("runtime.ssd", "ssd_scan"),
    "ssd_state_update": ("runtime.ssd", "ssd_state_update"),
    "gated_rms_norm": ("runtime.ssd", "gated_rms_norm"),
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib
        mod, attr = _LAZY[name]
        return getattr(importlib.import_module(f"{__name__}.{mod}"), attr)
    raise AttributeError(f"module 'layerforge' has no attribute '{name}'")


__all__ = ["DSLError", "LayerInputError", "Layer", "Program", "evaluate", "load", "loads", "stdlib",
           "dims_from_config", "module", "load_pack", "LayerModule", "PagedAttention", "PagedKVCache", "LlamaPagedAttention",
           "LlamaPagedDecoderLayer", "Embedding", "PromptTuningEmbedding", "Linear", "MLAAttention",
           "MultiLoRA", "LoRALinear", "attach_adapters", "from_pretrained", "DecoderModel", "Engine", "generate", "spec_from_config",
           "MambaModel", "MambaMixer", "Mamba2Mixer", "MambaStateCache", "ssd_scan", "ssd_state_update", "gated_rms_norm",
           "evaluate_states",
           "init_parallel", "ColumnLinear", "RowLinear", "VocabParallelEmbedding", "ParallelLMHead", "__version__"]
