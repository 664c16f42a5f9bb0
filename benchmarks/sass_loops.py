"""A generated kernel's loops as the GPU runs them: its SASS (NVRTC's cubin through cuobjdump), every loop's
instruction count and opcode mix, registers and spills. CPU only: the counts in benchmarks/NOTES.md ("the decode
loop 1240 -> 1062 instructions") come from here, so they can be checked and compared before a GPU runs anything.

    python -m benchmarks.sass_loops "plan_tc_attention(layer('llama_attn', D=128), 'sm_90', mode='decode',
        kv_dtype='fp8_e4m3', tiles=TileConfig(wm=1, wn=4, mt=1, bnw=32, stages=3, min_blocks=2))"
    python -m benchmarks.sass_loops "plan_gemv('bf16', n=6144, k=4096, max_m=16, wtype='u4', group=128)" --all

The plan is a Python expression over the codegen planners (plan_tc_attention, plan_wgmma_attention, plan_gemv,
plan_gemm, plan_gemm_stream, TileConfig, WGTileConfig) and layer(name, dtype='bf16', **dims), a stdlib block
specialised (Llama's GQA 32 / 8 unless dims say otherwise). Without --all only the loop with the most tensor-core
instructions is printed (the main loop of a matrix or attention kernel; the longest loop where there are none).
--replace OLD NEW edits the rendered source before compiling: a uniform branch taken every iteration but the last
(`if (k0 + BN <= k_end) {` -> `if (true) {`) leaves the loop the steady state runs, the count a GPU executes
per iteration there. A loop's count is static: branches inside it (a rescale taken rarely, a masked tile's path)
count in full, so compare two kernels' loops, not a loop with a time.

cuobjdump and the nvdisasm it runs come with the nvidia-cuda-cuobjdump and nvidia-cuda-nvdisasm wheels (the test
extra's), or a CUDA toolkit's bin/ ($CUDA_HOME).
"""
from __future__ import annotations

import argparse
import collections
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

INSTALL = "pip install nvidia-cuda-cuobjdump nvidia-cuda-nvdisasm, or set CUDA_HOME to a CUDA toolkit"
_LINE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)([^;]*);")
_TENSOR = ("HMMA", "HGMMA", "QGMMA", "IMMA", "DMMA")


def cuobjdump() -> str | None:
    """The cuobjdump to use (runtime/nvrtc.cuda_tool), None where it or the nvdisasm it runs (`-sass`) is missing."""
    from layerforge.runtime.nvrtc import cuda_tool
    return cuda_tool("cuobjdump") if cuda_tool("nvdisasm") else None


@dataclass(frozen=True)
class Instr:
    address: int
    opcode: str      # with its modifiers (HMMA.16816.F32.BF16)
    text: str        # the whole instruction, predicate included

    @property
    def op(self) -> str:
        return self.opcode.split(".")[0]


def disassemble(cubin: bytes) -> dict[str, list[Instr]]:
    """Each kernel's instructions in address order, by (mangled) kernel name."""
    exe = cuobjdump()
    if exe is None:
        raise RuntimeError(f"no cuobjdump / nvdisasm: {INSTALL}")
    from layerforge.runtime.nvrtc import cuda_tool
    env = dict(os.environ, NVDISASM_PATH=str(Path(cuda_tool("nvdisasm")).parent))   # cuobjdump -sass runs nvdisasm
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(cubin)
    try:
        run = subprocess.run([exe, "-sass", f.name], capture_output=True, text=True, env=env)
    finally:
        os.unlink(f.name)
    if run.returncode:
        raise RuntimeError(f"cuobjdump -sass failed: {run.stderr.strip()}")
    out = run.stdout
    kernels: dict[str, list[Instr]] = {}
    current = None
    for line in out.splitlines():
        m = re.match(r"\s*Function : (\S+)", line)
        if m:
            current = kernels.setdefault(m.group(1), [])
            continue
        m = _LINE.search(line)
        if m and current is not None:
            current.append(Instr(int(m.group(1), 16), m.group(3), ((m.group(2) or "") + m.group(3) + m.group(4)).strip()))
    return kernels


def loops(code: list[Instr]) -> list[tuple[int, int]]:
    """(first, last) indices of every loop: a branch back to an address at or before its own."""
    at = {ins.address: i for i, ins in enumerate(code)}
    found = []
    for i, ins in enumerate(code):
        if ins.op == "BRA" and "`(" not in ins.text:
            m = re.search(r"0x([0-9a-f]+)", ins.text)
            if m and int(m.group(1), 16) <= ins.address and int(m.group(1), 16) in at:
                found.append((at[int(m.group(1), 16)], i))
    return found


def main_loop(code: list[Instr]) -> tuple[int, int] | None:
    """The loop with the most tensor-core instructions (the shortest of those: the innermost), else the longest;
    None without loops."""
    found = loops(code)
    if not found:
        return None

    def tensor(fl):
        return sum(c.op in _TENSOR for c in code[fl[0]:fl[1] + 1])

    most = max(tensor(fl) for fl in found)
    ties = [fl for fl in found if tensor(fl) == most]
    return (min if most else max)(ties, key=lambda fl: fl[1] - fl[0])


_PARTIAL_WAIT = re.compile(r"WARPGROUP\.DEPBAR\.LE\s+gsb0,\s*0x([0-9a-f]+)")


def empty_groups_waited_behind(code: list[Instr]) -> list[Instr]:
    """The empty wgmma groups (`HGMMA.64x8x16.F16 RZ, gdesc[URZ], ...`: ptxas's commit of a group with no wgmma of its
    own on the path, e.g. a commit after a join one branch of which issued none) from which straight-line code reaches a
    partial wait (`WARPGROUP.DEPBAR.LE gsb0, N`, N > 0). Such a group is one more than the code counted: the wait that
    was to leave the last N groups running leaves only the empty one, and waits for the real work behind it (the
    overlap schedules' softmax under the previous P V). An empty group in a branch of its own (followed by the branch's
    BRA) stands in for the group the other branch commits, and is not reported."""
    out = []
    for i, c in enumerate(code):
        if c.op != "HGMMA" or "gdesc[URZ]" not in c.text:
            continue
        for d in code[i + 1:]:
            if d.op in ("BRA", "EXIT", "RET", "HGMMA"):
                break
            m = _PARTIAL_WAIT.search(d.text)
            if m:
                if int(m.group(1), 16) > 0:
                    out.append(c)
                break
    return out


def sfu_after_full_wait(code: list[Instr]) -> list[int]:
    """For each partial wait (`WARPGROUP.DEPBAR.LE gsb0, N`, N > 0: the overlap schedule's wait for S with the previous
    P V still running), in address order: the MUFU instructions between the next full wait (`gsb0, 0x0`: the P V
    done) and the next wgmma. A softmax all under the P V gives 0; ptxas's early placement of the full wait in the
    block after the second row's max left about half a tile's exponentials behind it. Branches are not followed:
    the count is of the code as laid out, both sides of a branch together."""
    out = []
    for i, c in enumerate(code):
        m = _PARTIAL_WAIT.search(c.text)
        if not m or int(m.group(1), 16) == 0:
            continue
        after, full = 0, False
        for d in code[i + 1:]:
            if d.op == "HGMMA" or d.op in ("EXIT", "RET"):
                break
            w = _PARTIAL_WAIT.search(d.text)
            if w:
                if int(w.group(1), 16) > 0:
                    break
                full = True
            elif full and d.op == "MUFU":
                after += 1
        out.append(after)
    return out


def mix(code: list[Instr], full: bool = False) -> collections.Counter:
    """Opcode counts (without modifiers, or with them: full)."""
    return collections.Counter(c.opcode if full else c.op for c in code)


def _namespace() -> dict:
    import layerforge as lf
    from layerforge.codegen.attention_tc import TileConfig, plan_tc_attention
    from layerforge.codegen.attention_wgmma import WGTileConfig, plan_wgmma_attention
    from layerforge.codegen.gemm import plan_gemm
    from layerforge.codegen.gemm_stream import plan_gemm_stream
    from layerforge.codegen.gemv import plan_gemv
    prog = lf.stdlib()

    def layer(name: str, dtype: str = "bf16", **dims):
        if name.endswith("_attn"):
            dims = {"Hq": 32, "Hkv": 8, "D": 128, **dims}
        return prog.specialise(name, dtype=dtype, **dims)

    return dict(layer=layer, plan_tc_attention=plan_tc_attention, TileConfig=TileConfig,
                plan_wgmma_attention=plan_wgmma_attention, WGTileConfig=WGTileConfig, plan_gemm=plan_gemm,
                plan_gemm_stream=plan_gemm_stream, plan_gemv=plan_gemv)


def report(plan, replace: tuple[tuple[str, str], ...] = (), every: bool = False, full: bool = False,
           top: int = 16) -> list[str]:
    """The lines main() prints for `plan` (a KernelPlan): per kernel, registers / spills and its loops."""
    from layerforge.runtime import nvrtc
    source = plan.source()
    for old, new in replace:
        if old not in source:
            raise ValueError(f"--replace: {old!r} is not in the rendered source of {plan.key}")
        source = source.replace(old, new)
    res = nvrtc.compile_cuda(source, plan.kernel_name, nvrtc.CompileOptions(plan.arch))
    lines = [f"{plan.key} ({plan.arch})"]
    for name, code in disassemble(res.cubin).items():
        r = res.resources.get(name)
        head = f"  {name}: {len(code)} instructions"
        if r is not None:
            head += f", {r.registers} registers, spills {r.spill_stores} / {r.spill_loads} bytes"
        lines.append(head)
        chosen = loops(code) if every else [x for x in [main_loop(code)] if x]
        for first, last in chosen:
            body = code[first:last + 1]
            counts = ", ".join(f"{k} {v}" for k, v in mix(body, full).most_common(top))
            lines.append(f"    loop {body[0].address:#06x}-{body[-1].address:#06x}: {len(body)} instructions: {counts}")
    return lines


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("plan", help="a Python expression giving a kernel plan (see the module's docstring)")
    ap.add_argument("--replace", action="append", nargs=2, default=[], metavar=("OLD", "NEW"),
                    help="edit the rendered source before compiling (repeatable)")
    ap.add_argument("--all", action="store_true", help="every loop, not only the main one")
    ap.add_argument("--full", action="store_true", help="opcodes with their modifiers")
    ap.add_argument("--top", type=int, default=16, help="opcodes shown a loop")
    a = ap.parse_args(argv)
    if cuobjdump() is None:
        print(f"sass_loops: no cuobjdump / nvdisasm: {INSTALL}", file=sys.stderr)
        return 2
    plan = eval(a.plan, _namespace())   # noqa: S307 (a developer's command line)
    print("\n".join(report(plan, tuple(map(tuple, a.replace)), a.all, a.full, a.top)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
