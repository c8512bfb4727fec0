"""Read `x[...]` indices: which input dim goes where, and what each keeps."""
from __future__ import annotations

import torch.fx

from .shapes import as_int, expr

FULL = slice(None)


def index_map(index, ndim: int) -> list[tuple[int, int | None, object]] | None:
    """For each input dim: (input dim, output dim or None when an int removes it, selection).
    Selections are ints or slices with int bounds. None when the index is not understood
    (tensor indices, symbolic bounds)."""
    items = list(index) if isinstance(index, tuple) else [index]
    if any(isinstance(i, torch.fx.Node) and _is_tensor(i) for i in items):
        return None   # advanced (tensor) indexing
    n_real = sum(1 for i in items if i is not None and i is not Ellipsis)
    if items.count(Ellipsis) > 1 or n_real > ndim:
        return None
    expanded: list = []
    for i in items:
        if i is Ellipsis:
            expanded.extend([FULL] * (ndim - n_real))
        else:
            expanded.append(i)
    expanded.extend([FULL] * (ndim - sum(1 for i in expanded if i is not None)))
    out, in_dim, out_dim = [], 0, 0
    for i in expanded:
        if i is None:
            out_dim += 1
            continue
        if isinstance(i, bool):
            return None
        if isinstance(i, slice):
            parts = [as_int_or_none(b) if b is not None else None for b in (i.start, i.stop, i.step)]
            symbolic = any(b is None and raw is not None for b, raw in zip(parts, (i.start, i.stop, i.step)))
            # a symbolic bound is fine on dims we do not track: it is partial, bounds unknown
            out.append((in_dim, out_dim, SYMBOLIC if symbolic else slice(*parts)))
            out_dim += 1
        else:
            value = as_int_or_none(i)
            out.append((in_dim, None, SYMBOLIC if value is None else value))
        in_dim += 1
    return out


class _Symbolic:
    """A selection whose bounds are symbolic: not the full dim, extent unknown."""

    def __repr__(self):
        return "SYMBOLIC"


SYMBOLIC = _Symbolic()


def _is_tensor(node) -> bool:
    import torch
    return isinstance(node.meta.get("example_value"), torch.Tensor)


def as_int_or_none(x):
    if isinstance(x, int):
        return x
    try:
        return as_int(expr(x))
    except (TypeError, ValueError):
        return None


def bounds(sel, size: int) -> tuple[int, int] | None:
    """[start, stop) an int or a unit-step slice keeps along a dim of `size`; None for strided
    or symbolic selections."""
    if sel is SYMBOLIC:
        return None
    if isinstance(sel, int):
        i = sel % size
        return i, i + 1
    start, stop, step = sel.indices(size)
    return (start, max(start, stop)) if step == 1 else None
