"""SegLinear: read a linear's output and input segments off the graph (DESIGN.md table).

Both walks track `axes`: the dims of the current tensor that hold the linear's channel axis,
major to minor. Normally one dim (the last); after a reshape that splits the channels into
(k, d) it is two, and a split along the major one is a segmentation into k parts.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch.fx

from .shapes import as_int, group_map, prod


@dataclass
class Evidence:
    """What a walk found: segment sizes, the pattern, the nodes that prove it."""
    sizes: tuple[int, ...] | None = None
    pattern: str = ""
    nodes: list[str] = field(default_factory=list)
    anchor: torch.fx.Node | None = None      # the cat/stack whose inputs are the input segments
    notes: list[str] = field(default_factory=list)
    path: list[str] = field(default_factory=list)


def contiguous_axes(axes) -> bool:
    return list(axes) == list(range(axes[0], axes[0] + len(axes)))


def reshape_axes(src_shape, dst_shape, axes):
    if contiguous_axes(axes):
        return group_map(src_shape, dst_shape, axes)
    mapped = []
    for a in axes:
        g = group_map(src_shape, dst_shape, (a,))
        if g is None or len(g) != 1:
            return None
        mapped.extend(g)
    return tuple(mapped)


def minor_size(shape_, axes) -> int | None:
    """Elements per unit of the major channel axis."""
    return as_int(prod([shape_[a] for a in axes[1:]]))


def shift_after(axes, dim, by):
    return tuple(a + by if a >= dim else a for a in axes)


def as_int_or(x):
    if isinstance(x, int):
        return x
    try:
        return as_int(x)
    except (TypeError, AttributeError):
        return None


def cuts(sizes) -> list[int]:
    out, pos = [], 0
    for s_ in sizes[:-1]:
        pos += s_
        out.append(pos)
    return out
