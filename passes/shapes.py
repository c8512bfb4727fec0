"""Sizes of FX nodes, with SymInts resolved through sympy where they are provably constant."""
from __future__ import annotations

import math

import sympy
import torch
import torch.fx


def example(node) -> object:
    return node.meta.get("example_value") if isinstance(node, torch.fx.Node) else None


def shape(node) -> tuple | None:
    """The node's shape as sympy expressions, or None when it is not a single tensor."""
    value = example(node)
    if not isinstance(value, torch.Tensor):
        return None
    return tuple(expr(s) for s in value.shape)


def expr(size) -> sympy.Expr:
    if isinstance(size, torch.SymInt):
        return sympy.sympify(size.node.expr)
    return sympy.Integer(int(size))


def as_int(size) -> int | None:
    """A concrete int when the size is provably constant, else None."""
    e = expr(size) if not isinstance(size, sympy.Basic) else size
    return int(e) if e.is_number else None


def same(a, b) -> bool:
    return sympy.simplify(expr_of(a) - expr_of(b)) == 0


def expr_of(x) -> sympy.Expr:
    return x if isinstance(x, sympy.Basic) else expr(x)


def prod(sizes) -> sympy.Expr:
    return sympy.Mul(*sizes) if sizes else sympy.Integer(1)


def norm_dim(dim: int, ndim: int) -> int:
    if not -max(ndim, 1) <= dim < max(ndim, 1):
        raise IndexError(f"dim {dim} out of range for {ndim} dims")
    return dim % max(ndim, 1)


def group_map(src: tuple, dst: tuple, group: tuple[int, ...]) -> tuple[int, ...] | None:
    """Map a contiguous group of dims of `src` to the dims of `dst` holding the same elements
    after a row-major reshape; None when the reshape mixes the group with other dims."""
    if not group or list(group) != list(range(group[0], group[-1] + 1)):
        return None
    before = prod(src[: group[0]])
    inside = prod(src[group[0]: group[-1] + 1])
    start = _prefix_index(dst, before)
    stop = _prefix_index(dst, before * inside)
    if start is None or stop is None:
        return None
    # size-1 dims at the edges belong to neither side: trim them off the group
    while start < stop and as_int(dst[start]) == 1 and stop - start > 1:
        start += 1
    while stop > start + 1 and as_int(dst[stop - 1]) == 1:
        stop -= 1
    return tuple(range(start, stop)) if stop > start else None


def _prefix_index(sizes: tuple, target) -> int | None:
    acc = sympy.Integer(1)
    if sympy.simplify(acc - target) == 0:
        return 0
    for i, s in enumerate(sizes):
        acc = acc * s
        if sympy.simplify(acc - target) == 0:
            return i + 1
    return None


def ints(sizes) -> tuple[int, ...] | None:
    out = tuple(as_int(s) for s in sizes)
    return None if any(v is None for v in out) else out


def numel(sizes) -> int:
    return math.prod(sizes)
