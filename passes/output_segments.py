"""SegLinear's output segments: a linear's output consumed in pieces along its channel axis,
found by walking forward from the linear (seglinear.py: the walk's state)."""
from __future__ import annotations

import torch.fx

from . import graph_ops
from .indexing import FULL, bounds, index_map
from .seglinear import Evidence, as_int_or, cuts, minor_size, reshape_axes, shift_after
from .shapes import as_int, ints, norm_dim, shape
from .transparency import Transparency as T
from .transparency import classify, source


def output_segments(linear: torch.fx.Node, out_features: int, axis: int = -1) -> Evidence:
    """Linear output consumed in pieces along its channel axis (chunk/split/unbind/slicing,
    also after a reshape into (k, d) and on the k dim). `axis`: the channel dim (1 for a conv)."""
    ev = Evidence()
    cuts: set[int] = set()
    out_shape = shape(linear)
    start = (linear, (norm_dim(axis, len(out_shape)),))
    seen, queue = {(linear.name, start[1])}, [start]
    patterns: list[str] = []

    def push(node, axes):
        key = (node.name, tuple(axes))
        if key not in seen:
            seen.add(key)
            queue.append((node, tuple(axes)))
            ev.path.append(node.name)

    def cut(node, pieces_major, axes, src_shape, pattern):
        minor = minor_size(src_shape, axes)
        if minor is None:
            ev.notes.append(f"{node.name}: segment width is symbolic")
            return
        inner = {c * minor for piece in pieces_major for c in piece if 0 < c * minor < out_features}
        if inner:   # a piece that is the whole output cuts nothing
            cuts.update(inner)
            patterns.append(pattern)
            ev.nodes.append(node.name)

    while queue:
        node, axes = queue.pop(0)
        src_shape = shape(node)
        for user in list(node.users):
            _forward_step(user, node, axes, src_shape, push, cut, ev)
    cuts |= {0, out_features}
    cuts = sorted(c for c in cuts if 0 <= c <= out_features)
    sizes = tuple(b - a for a, b in zip(cuts, cuts[1:]) if b > a)
    if len(sizes) > 1:
        ev.sizes = sizes
        ev.pattern = "+".join(sorted(set(patterns)))
    return ev


def _forward_step(user, src, axes, src_shape, push, cut, ev: Evidence):
    kind = classify(user)
    n = graph_ops.name(user)
    out_shape = shape(user)
    if kind is T.POINTWISE or (kind is T.VALUE and source(user) is src):
        push(user, axes)
        return
    if kind is T.BROADCAST or (kind is T.EXPAND and source(user) is src):
        off = len(out_shape) - len(src_shape)
        if all(out_shape[a + off] == src_shape[a] for a in axes):
            push(user, [a + off for a in axes])
        return
    if kind is T.CAT:
        dim = graph_ops.cat_dim(user)
        if n == "stack":
            push(user, shift_after(axes, dim, 1))
        elif dim not in axes:
            push(user, axes)
        return
    if source(user) is not src:     # src is not the operand whose elements move (view_as(src), ...)
        return
    if kind is T.RESHAPE:
        new = reshape_axes(src_shape, out_shape, axes)
        if new is None:
            ev.notes.append(f"{user.name}: reshape mixes the channel axis with other dims")
        else:
            push(user, new)
    elif kind is T.PERMUTE:
        perm = graph_ops.permutation(user, len(src_shape))
        if perm is not None:
            push(user, [perm.index(a) for a in axes])
    elif kind is T.SPLIT:
        _forward_split(user, axes, src_shape, push, cut, ev)
    elif kind is T.INDEX and n == "getitem":
        _forward_getitem(user, axes, src_shape, push, cut, ev)
    elif kind is T.INDEX:
        _forward_narrow(user, axes, src_shape, push, cut)


def _forward_split(user, axes, src_shape, push, cut, ev: Evidence):
    parts = graph_ops.split_parts(user)
    if parts is None:
        return
    dim, sizes = parts
    if dim == axes[0] and len(sizes) > 1:
        sizes = ints(sizes)
        if sizes is None:
            ev.notes.append(f"{user.name}: split sizes are symbolic")
            return
        pieces, pos = [], 0
        for s in sizes:
            pieces.append((pos, pos + s))
            pos += s
        cut(user, pieces, axes, src_shape, graph_ops.name(user))
    elif dim in axes and len(sizes) > 1:
        ev.notes.append(f"{user.name}: split along a minor channel dim (interleaved segments)")
    else:   # along another dim, or a single piece: every piece keeps the channel axis
        new = shift_after(axes, dim + 1, -1) if graph_ops.name(user) == "unbind" and dim not in axes else axes
        for item in user.users:
            if classify(item) is T.PIECE:
                push(item, new)


def _forward_getitem(user, axes, src_shape, push, cut, ev: Evidence):
    imap = index_map(user.args[1], len(src_shape))
    if imap is None:
        return
    major = axes[0]
    picked = {d: sel for d, _, sel in imap if sel != FULL}
    if major in picked and not any(a in picked for a in axes[1:]):
        size = as_int(src_shape[major])
        b = bounds(picked[major], size) if size is not None else None
        if b is None:
            ev.notes.append(f"{user.name}: strided or symbolic slice of the channel axis")
            return
        cut(user, [b], axes, src_shape, "slice")
        return
    if any(a in picked for a in axes):
        ev.notes.append(f"{user.name}: slices a minor channel dim")
        return
    where = {d: o for d, o, _ in imap}
    push(user, [where[a] for a in axes])


def _forward_narrow(user, axes, src_shape, push, cut):
    n = graph_ops.name(user)
    major = axes[0]
    dim = norm_dim(int(graph_ops.arg(user, 1, "dim")), len(src_shape))
    if dim == major:
        if n == "narrow":
            s, length = as_int_or(graph_ops.arg(user, 2, "start")), as_int_or(graph_ops.arg(user, 3, "length"))
            b = None if s is None or length is None else (s, s + length)
        else:
            size = as_int(src_shape[major])
            i = as_int_or(graph_ops.arg(user, 2, "index"))
            b = None if i is None or size is None else bounds(i, size)
        if b is not None:
            cut(user, [b], axes, src_shape, n)
    elif dim not in axes:
        push(user, shift_after(axes, dim + 1, -1) if n == "select" else axes)
