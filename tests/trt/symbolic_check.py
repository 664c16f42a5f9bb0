"""Run a generated plugin module's shape and launch functions on tensorrt.plugin's own ShapeExprs.

    python symbolic_check.py MODULE.py CASES.json     # prints one JSON line: the mismatches

Run with TensorRT's `tensorrt/plugin` Python sources over the inert stand-in of its C extension
(tests/trt/pack.py run_tensorrt_validators lays them out). The ShapeExprs are TensorRT's classes;
only the IExprBuilder under them is a stand-in that does the arithmetic on ints, so the module's
expressions run through exactly the operators, properties and functions TensorRT's objects have
(ints on the right of an operator only, `is_constant` a property, cdiv / min / max), and
aot_impl's KernelLaunchParams and SymIntExprs are built from the launch. Each case's
input dims are given once as build-time constants and once as symbolic dims (values the builder
knows but reports as not constant); both must give what the same functions give on plain ints.
CASES.json: [[plugin key, [input shapes], [attribute values]], ...]
"""
import importlib.util
import json
import operator
import sys

import tensorrt as trt
import tensorrt.plugin as trtp
from tensorrt.plugin._tensor import SymIntExpr

_OPS = {"SUM": operator.add, "SUB": operator.sub, "PROD": operator.mul, "FLOOR_DIV": operator.floordiv,
        "CEIL_DIV": lambda a, b: -(-a // b), "MIN": min, "MAX": max, "EQUAL": operator.eq, "LESS": operator.lt}


class Dim(trt.IDimensionExpr):
    """An IDimensionExpr with its value; `constant`: whether TensorRT would know it at build time."""

    def __init__(self, value: int, constant: bool):
        self.value, self.constant = int(value), constant

    def is_constant(self):
        return self.constant

    def get_constant_value(self):
        if not self.constant:
            raise RuntimeError("not a build-time constant")
        return self.value


class Builder:
    def constant(self, value):
        return Dim(value, True)

    def operation(self, op, a, b):
        name = next(n for n in _OPS if getattr(trt.DimensionOperation, n) is op)
        return Dim(_OPS[name](a.value, b.value), a.constant and b.constant)


def value(x):
    if isinstance(x, int):
        return x
    e = x._expr
    return e if isinstance(e, int) else e.value


def main(module_path: str, cases_path: str) -> None:
    spec = importlib.util.spec_from_file_location("plugins", module_path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module._ptx = lambda name: b""   # the PTX files are not needed here
    SymIntExpr._exprBuilder = Builder()
    bad, checked = [], 0
    for key, shapes, attributes in json.load(open(cases_path)):
        plugin = module.PLUGINS[key]
        want_shapes = [(list(s), d) for s, d in plugin["shapes"](*shapes)]
        want_launch = plugin["launch"](*shapes, *attributes)
        for constant in (True, False):
            exprs = [tuple(trtp.ShapeExpr(Dim(n, constant)) for n in s) for s in shapes]
            got_shapes = [([value(e) for e in s], d) for s, d in plugin["shapes"](*exprs)]
            got = plugin["launch"](*exprs, *attributes)
            # aot_impl's return: what the module hands TensorRT, built from this launch
            _, _, params, extra = module._aot(key, got)
            got_launch = ([value(params.grid_x), value(params.grid_y), value(params.grid_z)],
                          [value(params.block_x), value(params.block_y), value(params.block_z)],
                          value(params.shared_mem), [value(e) for e in extra])
            want = ([*want_launch.grid], list(want_launch.block), want_launch.shared_mem, list(want_launch.extra_args))
            if got_shapes != want_shapes or got_launch != want:
                bad.append([key, constant, str(got_shapes), str(want_shapes), str(got_launch), str(want)])
            checked += 1
    print(json.dumps({"checked": checked, "mismatches": bad}))


if __name__ == "__main__":
    main(*sys.argv[1:])
