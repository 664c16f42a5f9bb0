"""The `layerforge` command line."""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from .codegen.row import LoweringError
from .dsl.errors import DSLError


def _cmd_check(args) -> int:
    from .dsl.program import Program
    paths = args.files or []
    status = 0
    if not paths:
        Program.stdlib()
        print("standard library: ok")
        return 0
    for path in paths:
        try:
            prog = Program.from_file(path, with_stdlib=not args.no_stdlib)
        except DSLError as e:
            print(e.format(), file=sys.stderr)
            status = 1
            continue
        file = str(Path(path))  # as Program.from_file names it
        own = [n for n in prog.names if prog.definition(n).span.file == file]
        listed = f": {', '.join(own)}" if own else ""
        print(f"{path}: ok ({len(own)} definition{'s' * (len(own) != 1)}{listed})")
    return status


def _cmd_list(args) -> int:
    from .dsl.program import Program
    prog = Program.stdlib()
    for name in prog.names:
        d = prog.definition(name)
        params = ", ".join(p.name for p in d.params)
        print(f"{type(d).__name__.replace('Def', '').lower():9s} {name}({params})")
    return 0


def _cmd_build(args) -> int:
    from .runtime.build import cli_build
    return cli_build(args)


def _cmd_tune(args) -> int:
    import torch
    from .runtime.tune import parse_weights
    parse_weights(args.weights, args.group)   # a misspelt name is an error here too, before the GPU's
    if not torch.cuda.is_available():
        print("error: layerforge tune measures on a CUDA GPU, and none is visible here", file=sys.stderr)
        return 1
    from .runtime.tune import cli_tune
    return cli_tune(args)


def _cmd_show(args) -> int:
    from .codegen.linear_lower import has_matmul, plan_linear
    from .codegen.plan import plan_layer
    from .runtime.build import _default_arch, check_definition_names, program_and_bindings
    prog, bindings = program_and_bindings(args)
    check_definition_names(prog, [args.layer])
    layer = prog.specialise(args.layer, dtype=args.dtype, **prog.bindings_for(args.layer, bindings))
    arch = args.arch or _default_arch()
    if layer.function.kind == "attention":
        if args.kernel == "simt":
            from .codegen.attention import plan_paged_attention
            plan = plan_paged_attention(layer, arch, page_size=args.page_size)
        else:
            from .codegen.attention_tc import plan_tc_attention
            from .runtime.launch import compile_fn
            plan = plan_tc_attention(layer, arch, page_size=args.page_size, mode=args.kernel, compile_fn=compile_fn())
    elif has_matmul(layer.function):   # the small-token product kernel for up to 16 rows
        plan = plan_linear(layer, arch, max_m=16)
    else:
        plan = plan_layer(layer, arch)
    print(plan.source(), end="")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="layerforge", description="A code-generating layer DSL for LLM inference.")
    from . import __version__
    p.add_argument("--version", action="version", version=f"layerforge {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    c = sub.add_parser("check", help="parse and type-check DSL files (no files: the standard library)")
    c.add_argument("files", nargs="*", help="DSL source files (.lf)")
    c.add_argument("--no-stdlib", action="store_true", help="do not make the standard library visible")
    c.set_defaults(func=_cmd_check)
    ls = sub.add_parser("list", help="list the standard library's layers and attention blocks")
    ls.set_defaults(func=_cmd_list)
    b = sub.add_parser("build", help="generate and compile a model's kernels: sources, cubins, manifest")
    b.add_argument("file", nargs="?", help="DSL file (default: the standard library only)")
    b.add_argument("--config", help="a model's config.json (Hugging Face) for the dims")
    b.add_argument("--dims", action="append", help="NAME=VALUE[,NAME=VALUE]: dims and const parameters")
    b.add_argument("--dtype", default="bf16", help="the dtype parameter T (default bf16)")
    b.add_argument("--arch", help="target, e.g. sm_90 (default: this machine's GPU)")
    b.add_argument("--layers", help="comma-separated layer names (default: with a config of a known model_type "
                                    "and no FILE, the definitions that model uses; else all that fit the model)")
    b.add_argument("--page-size", type=int, default=16, help="tokens per KV-cache page (attention kernels)")
    b.add_argument("--kv-dtype", choices=["bf16", "f16"],
                   help="dtype of the attention kernels and their KV cache (default: --dtype)")
    b.add_argument("--kv-cache", choices=["fp8_e4m3"],
                   help="store the KV cache as e4m3 with per-layer scales (default: the kernels' dtype)")
    b.add_argument("--trt", action="store_true",
                   help="also write TensorRT plugin sources (Python AOT plugins, a C++ plugin library) to OUTPUT/trt")
    b.add_argument("-j", "--jobs", type=int, help="parallel compiles")
    b.add_argument("-o", "--output", required=True, help="output folder")
    b.add_argument("-q", "--quiet", action="store_true", help="no progress lines")
    b.set_defaults(func=_cmd_build)
    t = sub.add_parser("tune", help="time the small-token products' work splits on this GPU; record the winners "
                                    "in the tuning table the planner reads")
    t.add_argument("--config", help="a model's config.json (Hugging Face): its decoder layer's products and lm_head")
    t.add_argument("--products", help="N:K[:activation],... more products (W [N, K]; gated: N is gate + up)")
    t.add_argument("--tokens", default="1,8,16",
                   help="token counts (1-16) whose small-token plans to tune (default 1,8,16; '' for none)")
    t.add_argument("--stream-rows", default="",
                   help="u4 / i8 weights on sm_90: row counts (17-128) whose decode-range GEMM plans to tune, e.g. 32,64,128")
    t.add_argument("--gemm-rows", default="",
                   help="bf16 / f16 weights on sm_90: row counts (17 and up) at which the Hopper GEMM is timed "
                        "against cuBLAS, e.g. 64,1024,4096; its wins are recorded")
    t.add_argument("--weights", default="bf16", help="comma-separated: bf16, f16, u4 (group --group), i8 (row scales), "
                                                     "f8 (W8A8 e4m3, row scales; sm_89+), f8b (e4m3, 128 x 128 blocks): x "
                                                     "quantised first, the layer's path past 8 rows; f8r, f8br: x "
                                                     "quantised in the kernel (up to 8 rows, and with a norm prologue)")
    t.add_argument("--dtype", default="bf16", help="activations' dtype of the u4 / i8 products (default bf16)")
    t.add_argument("--group", type=int, default=128, help="u4: k per (scale, zero) pair (default 128)")
    t.add_argument("--margin", type=float, default=0.03,
                   help="record a split only where it beats the rules' plan by more than this fraction (default 0.03)")
    t.add_argument("--table", help="the table to write (default: the user's, <cache dir>/tuning/products.json)")
    t.add_argument("--dry-run", action="store_true", help="measure and print; write nothing")
    t.set_defaults(func=_cmd_tune)
    sh = sub.add_parser("show", help="print the generated CUDA of one layer")
    sh.add_argument("layer")
    sh.add_argument("--file", help="DSL file defining the layer (default: the standard library)")
    sh.add_argument("--config", help="a model's config.json for the dims")
    sh.add_argument("--dims", action="append", help="NAME=VALUE[,NAME=VALUE]")
    sh.add_argument("--dtype", default="bf16")
    sh.add_argument("--arch", help="e.g. sm_90 (default: this machine's GPU)")
    sh.add_argument("--kernel", choices=["prefill", "decode", "simt"], default="prefill",
                    help="attention blocks: the tensor-core prefill or decode kernel, or the CUDA-core one")
    sh.add_argument("--page-size", type=int, default=16, help="attention blocks: tokens per KV-cache page")
    sh.set_defaults(func=_cmd_show)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    try:
        return args.func(args)
    except DSLError as e:
        print(e.format(), file=sys.stderr)
        return 1
    except (LoweringError, ValueError) as e:   # no kernel for this specialisation, bad option values
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # stdout closed early, e.g. `layerforge list | head`
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


if __name__ == "__main__":
    sys.exit(main())
