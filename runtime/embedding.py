"""Token embeddings from the standard library's `embedding` and `prompt_tuning_embedding`
(dsl/stdlib/embedding.lf): torch modules over their generated gather kernels.

    emb = Embedding(32000, 4096, dtype=torch.bfloat16).cuda()
    emb.load_state_dict(hf_model.model.embed_tokens.state_dict())   # `weight` [V, H], as nn.Embedding
    h = emb(input_ids)            # ids of any shape -> [..., H]; CUDA: the kernel, CPU: the reference

    pt = PromptTuningEmbedding(32000, 4096, dtype=torch.bfloat16).cuda()
    h = pt(ids, prompt_table, tasks)   # ids >= 32000: rows of the task's virtual-token table

Out-of-range ids give rows of zeros, on both paths (the kernel never reads outside a table
and cannot raise without a host synchronisation, so nothing checks ids on the host either):
negative ids and ids >= num_embeddings for `Embedding`; for `PromptTuningEmbedding`, negative
ids, ids >= num_embeddings + NV and tasks outside [0, NT). int64 ids (torch's usual) are
converted to int32 first, an extra elementwise launch; pass int32 ids to skip it.
"""
from __future__ import annotations

import torch

from ..dsl.evaluator import LayerInputError
from .layers import LayerModule, _dtype_name

_I32_MAX = 2**31 - 1


def _ids32(name: str, ids: torch.Tensor, what: str = "ids") -> torch.Tensor:
    if not isinstance(ids, torch.Tensor):
        raise LayerInputError(f"{name}: '{what}' must be a torch.Tensor, got {type(ids).__name__}")
    if ids.dtype == torch.int32:
        return ids.reshape(-1).contiguous()
    if ids.dtype in (torch.int64, torch.int16, torch.int8, torch.uint8):
        # clamp first: a cast alone would wrap an id past int32 into the table's range
        return ids.reshape(-1).clamp(-1, _I32_MAX).to(torch.int32)
    raise LayerInputError(f"{name}: '{what}' must be an integer tensor (int32 or int64), got {ids.dtype}")


def _program(program):
    from ..dsl.program import Program
    return program or Program.stdlib()


class Embedding(LayerModule):
    """torch.nn.Embedding's lookup (no padding_idx, max_norm or sparse gradients: inference)
    as the generated `embedding` kernel; `weight` [num_embeddings, embedding_dim]."""

    def __init__(self, num_embeddings: int, embedding_dim: int, dtype: str | torch.dtype = torch.float32, *,
                 device=None, arch: str | None = None, cache=None, program=None):
        layer = _program(program).specialise("embedding", V=num_embeddings, H=embedding_dim, dtype=_dtype_name(dtype))
        super().__init__(layer, arch=arch, cache=cache, device=device)
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        with torch.no_grad():
            self.weight.normal_()   # as torch.nn.Embedding initialises it

    def forward(self, ids: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        flat = _ids32(self.name, ids)
        y = super().forward(flat, out=None if out is None else (out.view(-1, self.embedding_dim),))
        return y.view(*ids.shape, self.embedding_dim) if out is None else out

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, dtype={self.weight.dtype}"


class PromptTuningEmbedding(LayerModule):
    """TensorRT-LLM's PromptTuningEmbedding as the generated `prompt_tuning_embedding` kernel:
    ids < num_embeddings index `weight`; ids >= num_embeddings are virtual tokens, row
    `id - num_embeddings` of the token's task in a run-time prompt table.

    forward(ids, prompt_table, tasks, task_vocab_size=None): `prompt_table` is [NT, NV, H], or
    TensorRT-LLM's flat [NT * NV, H] with `task_vocab_size` = NV, or None (no virtual tokens:
    their rows are zeros); `tasks` holds each token's task (the shape of `ids`) or one task id
    (an int) for all of them.
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, dtype: str | torch.dtype = torch.float32, *,
                 device=None, arch: str | None = None, cache=None, program=None):
        layer = _program(program).specialise("prompt_tuning_embedding", V=num_embeddings, H=embedding_dim,
                                             dtype=_dtype_name(dtype))
        super().__init__(layer, arch=arch, cache=cache, device=device)
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        with torch.no_grad():
            self.weight.normal_()

    def forward(self, ids: torch.Tensor, prompt_table: torch.Tensor | None, tasks: torch.Tensor | int = 0,
                task_vocab_size: int | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
        name, h = self.name, self.embedding_dim
        flat = _ids32(name, ids)
        if isinstance(tasks, int) and not isinstance(tasks, bool):
            task32 = torch.full_like(flat, max(-1, min(tasks, _I32_MAX)))
        else:
            task32 = _ids32(name, tasks, "tasks")
            if task32.numel() == 1 and flat.numel() != 1:
                task32 = task32.expand(flat.shape).contiguous()
            if task32.shape != flat.shape:
                raise LayerInputError(f"{name}: 'tasks' must have the shape of 'ids' {tuple(ids.shape)} "
                                      f"(one task per token) or be one task id, got {tuple(tasks.shape)}")
        table = self._prompt_table(prompt_table, task_vocab_size, flat.device)
        y = super().forward(flat, task32, table, out=None if out is None else (out.view(-1, h),))
        return y.view(*ids.shape, h) if out is None else out

    def _prompt_table(self, table, task_vocab_size, device) -> torch.Tensor:
        name, h = self.name, self.embedding_dim
        if table is None:
            return torch.zeros(1, 1, h, dtype=self.weight.dtype, device=device)
        if not isinstance(table, torch.Tensor):
            raise LayerInputError(f"{name}: 'prompt_table' must be a torch.Tensor or None")
        if table.dim() == 2:
            if task_vocab_size is None or task_vocab_size <= 0 or table.shape[0] % task_vocab_size:
                raise LayerInputError(f"{name}: a flat prompt table [NT * NV, H] {tuple(table.shape)} needs "
                                      f"task_vocab_size = NV > 0 that divides its {table.shape[0]} rows")
            table = table.view(table.shape[0] // task_vocab_size, task_vocab_size, table.shape[1])
        elif table.dim() != 3:
            raise LayerInputError(f"{name}: 'prompt_table' must be [NT, NV, H] or [NT * NV, H], "
                                  f"got {tuple(table.shape)}")
        elif task_vocab_size is not None and task_vocab_size != table.shape[1]:
            raise LayerInputError(f"{name}: task_vocab_size = {task_vocab_size} but the prompt table "
                                  f"{tuple(table.shape)} has {table.shape[1]} virtual tokens per task")
        if table.shape[-1] != h:
            raise LayerInputError(f"{name}: the prompt table's rows have {table.shape[-1]} elements, "
                                  f"expected embedding_dim = {h}")
        if table.shape[0] == 0 or table.shape[1] == 0:   # no virtual rows at all: every one is zeros
            return torch.zeros(1, 1, h, dtype=table.dtype, device=table.device)
        return table

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, dtype={self.weight.dtype}"
