"""A weight brought into the GPU's L2 ahead of the product that reads it (templates/cuda/l2_prefetch.cu.jinja).

    plan = plan_l2_prefetch(arch="sm_90")
    plan.key -> 'l2_prefetch_bulk_c32768_sm90'

A product of few rows reads its weight once, and at 64 rows or fewer it is bound by how many of
those reads are in flight, not by DRAM's bandwidth (cuBLAS reads Mamba2-2.7B's out_proj W at 0.44 of
copy at 64 rows: benchmarks/NOTES.md). Where the kernel before it moves little (a norm), the weight's
bytes can be on their way into L2 already: this kernel only asks for them and returns, and the
product then reads L2. Nothing waits for the prefetches: they are hints (no result, no
completion), so the numbers the product computes are the same with or without them.
    sm_90: each thread asks for a CHUNK-byte run with cp.async.bulk.prefetch.L2 (the copy engine
           brings it; a few dozen CTAs cover tens of MB);
    sm_80 / sm_89: each thread asks for 128-byte lines with prefetch.global.L2, LINES a thread.
A run ends 16 bytes short of a tail that is not a whole 16 bytes (the bulk form moves whole 16-byte
pieces and must not reach past the tensor); the start must be 16-byte aligned (runtime/prefetch.py
checks it).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, ClassVar

from . import ops
from .abi import Arg, KernelABI
from .plan import KernelPlan
from .render import read_template, render

__all__ = ["L2PrefetchPlan", "plan_l2_prefetch", "BULK_MIN_ARCH"]

BULK_MIN_ARCH = 90   # cp.async.bulk.prefetch.L2: sm_90


@dataclass(frozen=True, kw_only=True)
class L2PrefetchPlan(KernelPlan):
    family: ClassVar[str] = "l2_prefetch"
    arch: str
    threads: int = 32     # a CTA
    chunk: int = 32768    # bytes a bulk prefetch asks for (sm_90)
    lines: int = 8        # 128-byte lines a thread asks for in a pass (sm_80 / sm_89)

    def __post_init__(self):
        if ops.arch_number(self.arch) < 80:
            raise ValueError(f"l2 prefetch: sm_80 or newer, not {self.arch}")
        if self.threads not in (32, 64, 128, 256):
            raise ValueError(f"l2 prefetch: threads must be 32, 64, 128 or 256, got {self.threads!r}")
        if not isinstance(self.chunk, int) or self.chunk < 16 or self.chunk % 16 or self.chunk > 1 << 20:
            raise ValueError(f"l2 prefetch: chunk must be a multiple of 16 bytes up to 1 MiB, got {self.chunk!r}")
        if self.lines not in (1, 2, 4, 8, 16):
            raise ValueError(f"l2 prefetch: lines must be 1, 2, 4, 8 or 16, got {self.lines!r}")

    @property
    def bulk(self) -> bool:
        return ops.arch_number(self.arch) >= BULK_MIN_ARCH

    @property
    def bytes_a_thread(self) -> int:
        """What one thread asks for in one pass over its part."""
        return self.chunk if self.bulk else 128 * self.lines

    @property
    def key(self) -> str:
        how = f"bulk_c{self.chunk}" if self.bulk else f"lines{self.lines}"
        return f"l2_prefetch_{how}{'' if self.threads == 32 else f'_t{self.threads}'}_{self.arch.replace('_', '')}"

    @property
    def kernels(self) -> tuple[KernelABI, ...]:
        return (_abi(self),)

    def source(self) -> str:
        return _render(self)

    def describe(self) -> dict[str, Any]:
        return {"threads": self.threads, "chunk": self.chunk, "lines": self.lines}

    def blocks(self, nbytes: int, sms: int) -> int:
        """CTAs for `nbytes`: one pass a thread where that takes at most 4 CTAs an SM, else 4 an SM looping."""
        need = -(-nbytes // (self.threads * self.bytes_a_thread))
        return max(1, min(need, 4 * sms))


@functools.lru_cache(maxsize=16)
def _abi(plan: L2PrefetchPlan) -> KernelABI:
    args = (Arg("src", "const unsigned char* __restrict__", "input"), Arg("nbytes", "long long", "dim"))
    return KernelABI(name=plan.kernel_name, args=args, grid=("blocks",), block=(plan.threads,), problem=("blocks",))


@functools.lru_cache(maxsize=16)
def _render(plan: L2PrefetchPlan) -> str:
    return render("cuda/l2_prefetch.cu.jinja", kernel_name=plan.kernel_name, signature=plan.abi.signature,
                  plan_key=plan.key, common=read_template("cuda/common.cuh"), THREADS=plan.threads, BULK=plan.bulk,
                  CHUNK=plan.chunk, LINES=plan.lines)


def plan_l2_prefetch(*, arch: str, threads: int = 32, chunk: int = 32768, lines: int = 8) -> L2PrefetchPlan:
    return L2PrefetchPlan(arch=arch, threads=threads, chunk=chunk, lines=lines)
