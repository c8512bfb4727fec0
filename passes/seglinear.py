"""SegLinear: read a linear's output and input segments off the graph (DESIGN.md table).

Both walks track `axes`: the dims of the current tensor that hold the linear's channel axis,
major to minor. Normally one dim (the last); after a reshape that splits the channels into
(k, d) it is two, and a split along the major one is a segmentation into k parts.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch.fx

from . import ops
from .indexing import FULL, bounds, index_map
from .shapes import as_int, group_map, ints, norm_dim, prod, shape


@dataclass
class Evidence:
    """What a walk found: segment sizes, the pattern, the nodes that prove it."""
    sizes: tuple[int, ...] | None = None
    pattern: str = ""
    nodes: list[str] = field(default_factory=list)
    anchor: torch.fx.Node | None = None      # the cat/stack whose inputs are the input segments
    notes: list[str] = field(default_factory=list)
    path: list[str] = field(default_factory=list)


def _contiguous(axes) -> bool:
    return list(axes) == list(range(axes[0], axes[0] + len(axes)))


def _reshape_axes(src_shape, dst_shape, axes):
    if _contiguous(axes):
        return group_map(src_shape, dst_shape, axes)
    mapped = []
    for a in axes:
        g = group_map(src_shape, dst_shape, (a,))
        if g is None or len(g) != 1:
            return None
        mapped.extend(g)
    return tuple(mapped)


def _minor(shape_, axes) -> int | None:
    """Elements per unit of the major channel axis."""
    return as_int(prod([shape_[a] for a in axes[1:]]))


def _shift_after(axes, dim, by):
    return tuple(a + by if a >= dim else a for a in axes)


# ---------------------------------------------------------------- output segments

def output_segments(linear: torch.fx.Node, out_features: int) -> Evidence:
    """Linear output consumed in pieces along its channel axis (chunk/split/unbind/slicing,
    also after a reshape into (k, d) and on the k dim)."""
    ev = Evidence()
    cuts: set[int] = set()
    out_shape = shape(linear)
    start = (linear, (len(out_shape) - 1,))
    seen, queue = {(linear.name, start[1])}, [start]
    patterns: list[str] = []

    def push(node, axes):
        key = (node.name, tuple(axes))
        if key not in seen:
            seen.add(key)
            queue.append((node, tuple(axes)))
            ev.path.append(node.name)

    def cut(node, pieces_major, axes, src_shape, pattern):
        minor = _minor(src_shape, axes)
        if minor is None:
            ev.notes.append(f"{node.name}: segment width is symbolic")
            return
        for lo, hi in pieces_major:
            cuts.update({lo * minor, hi * minor})
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
    n = ops.name(user)
    out_shape = shape(user)
    major = axes[0]
    if n in ops.CASTS or (n in ops.UNARY and out_shape is not None and len(out_shape) == len(src_shape)):
        if out_shape is not None:
            push(user, axes)
        return
    if n in ops.BINARY or n in ops.EXPANDS:
        if out_shape is None:
            return
        off = len(out_shape) - len(src_shape)
        if all(out_shape[a + off] == src_shape[a] for a in axes):
            push(user, [a + off for a in axes])
        return
    if n in ops.RESHAPES:
        if out_shape is None:
            return
        new = _reshape_axes(src_shape, out_shape, axes)
        if new is None:
            ev.notes.append(f"{user.name}: reshape mixes the channel axis with other dims")
        else:
            push(user, new)
        return
    if n in ops.PERMUTES:
        perm = ops.permutation(user, len(src_shape))
        if perm is not None:
            push(user, [perm.index(a) for a in axes])
        return
    if n in ops.SPLITS:
        parts = ops.split_parts(user)
        if parts is None or user.args[0] is not src:
            return
        dim, sizes = parts
        if dim == major:
            sizes = ints(sizes)
            if sizes is None:
                ev.notes.append(f"{user.name}: split sizes are symbolic")
                return
            pieces, pos = [], 0
            for s in sizes:
                pieces.append((pos, pos + s))
                pos += s
            cut(user, pieces, axes, src_shape, n)
        elif dim in axes:
            ev.notes.append(f"{user.name}: split along a minor channel dim (interleaved segments)")
        else:
            new = _shift_after(axes, dim + 1, -1) if n == "unbind" else axes
            for item in user.users:
                if ops.name(item) == "getitem":
                    push(item, new)
        return
    if n == "getitem":
        if user.args[0] is not src:
            return
        imap = index_map(user.args[1], len(src_shape))
        if imap is None:
            return
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
        return
    if n in ("narrow", "select"):
        dim = norm_dim(int(ops.arg(user, 1, "dim")), len(src_shape))
        if dim == major:
            if n == "narrow":
                s, length = as_int_or(ops.arg(user, 2, "start")), as_int_or(ops.arg(user, 3, "length"))
                b = None if s is None or length is None else (s, s + length)
            else:
                size = as_int(src_shape[major])
                i = as_int_or(ops.arg(user, 2, "index"))
                b = None if i is None or size is None else bounds(i, size)
            if b is not None:
                cut(user, [b], axes, src_shape, n)
        elif dim not in axes:
            push(user, _shift_after(axes, dim + 1, -1) if n == "select" else axes)
        return
    if n in ops.CATS:
        dim = ops.cat_dim(user)
        if dim is not None and dim not in axes:
            push(user, axes)
        return
    if n == "stack":
        dim = ops.cat_dim(user)
        if dim is not None:
            push(user, _shift_after(axes, dim, 1))
        return


def as_int_or(x):
    if isinstance(x, int):
        return x
    try:
        return as_int(x)
    except (TypeError, AttributeError):
        return None


# ---------------------------------------------------------------- input segments

def input_segments(x: torch.fx.Node, in_features: int) -> Evidence:
    """Linear input assembled along its channel axis: cat/stack, or a head merge
    (reshape/view/flatten of (..., heads, head_dim), also channel-first with a transpose)."""
    notes: list[str] = []
    path: list[str] = []
    found = _walk_back(x, (len(shape(x)) - 1,), notes, path, in_features)
    distinct = {(e.sizes, e.pattern) for e in found}
    if len(distinct) == 1:
        ev = found[0]
        ev.notes, ev.path = notes, path
        if sum(ev.sizes) != in_features:
            ev.notes.append(f"segments {ev.sizes} do not add up to {in_features}")
            ev.sizes = None
        return ev
    ev = Evidence(notes=notes, path=path)
    if len(distinct) > 1:
        ev.notes.append("conflicting input segmentations: " + "; ".join(
            f"{e.pattern} {e.sizes} at {e.nodes}" for e in found))
    return ev


def _walk_back(x, axes, notes, path, total: int) -> list[Evidence]:
    found: list[Evidence] = []
    seen: set = set()
    stack = [(x, tuple(axes))]
    while stack:
        node, axes = stack.pop()
        if (node.name, axes) in seen:
            continue
        seen.add((node.name, axes))
        path.append(node.name)
        result = _backward_step(node, axes, notes, path, total)
        if isinstance(result, Evidence):
            found.append(result)
        else:
            stack.extend(result)
    return found


def _backward_step(node, axes, notes, path, total: int) -> Evidence | list:
    n = ops.name(node)
    out_shape = shape(node)
    major = axes[0]
    if node.op in ("placeholder", "get_attr") or out_shape is None:
        return []
    src = node.args[0] if node.args and isinstance(node.args[0], torch.fx.Node) else None
    if n in ops.CASTS or (n in ops.UNARY and src is not None and shape(src) is not None
                          and len(shape(src)) == len(out_shape)):
        return [(src, axes)] if src is not None and shape(src) is not None else []
    if n in ops.BINARY or n in ops.EXPANDS:
        nexts = []
        for inp in ops.tensor_inputs(node):
            # follow the full-size operand; broadcast ones (per-channel tables) only add to it
            if shape(inp) == out_shape:
                nexts.append((inp, axes))
        return nexts
    if n in ops.RESHAPES and src is not None:
        src_shape = shape(src)
        mapped = _reshape_axes(out_shape, src_shape, axes)
        if mapped is None:
            notes.append(f"{node.name}: reshape mixes the channel axis with other dims")
            return []
        if len(axes) == 1 and len(mapped) > 1:
            heads = as_int(src_shape[mapped[0]])
            width = _minor(src_shape, mapped)
            # the group holds exactly K elements (the weight fixes K): one size gives the other
            if heads is None and width and total % width == 0:
                heads = total // width
            if width is None and heads and total % heads == 0:
                width = total // heads
            if heads is None or width is None:
                notes.append(f"{node.name}: head merge with symbolic sizes")
                return []
            if heads > 1 and width > 1:
                # a stack/cat on the merged dims is the real evidence (stack + flatten)
                inner = _walk_back(src, mapped, [], path, total)
                if len({(e.sizes, e.pattern) for e in inner}) == 1:
                    return inner[0]
                return Evidence(sizes=(width,) * heads, pattern="head_merge", nodes=[node.name])
        return [(src, mapped)]
    if n in ops.PERMUTES and src is not None:
        perm = ops.permutation(node, len(out_shape))
        return [(src, tuple(perm[a] for a in axes))] if perm is not None else []
    if n == "getitem" and src is not None:
        if isinstance(ops.example(src), (tuple, list)):
            if ops.name(src) not in ops.SPLITS:
                return []
            parts = ops.split_parts(src)
            if parts is None:
                return []
            dim, _ = parts
            src_axes = _shift_after(axes, dim, 1) if ops.name(src) == "unbind" else axes
            if dim in src_axes:
                return []
            return [(src.args[0], src_axes)]
        imap = index_map(node.args[1], len(shape(src)))
        if imap is None:
            return []
        back = {o: (d, sel) for d, o, sel in imap if o is not None}
        if any(a not in back or back[a][1] != FULL for a in axes):
            notes.append(f"{node.name}: slices the channel axis")
            return []
        return [(src, tuple(back[a][0] for a in axes))]
    if n in ops.CATS or n == "stack":
        dim = ops.cat_dim(node)
        inputs = [i for i in ops.cat_inputs(node) if isinstance(i, torch.fx.Node)]
        if dim == major:
            minor = _minor(out_shape, axes)
            widths = [1] * len(inputs) if n == "stack" else [as_int(shape(i)[dim]) for i in inputs]
            if minor is None or any(w is None for w in widths):
                notes.append(f"{node.name}: concatenation widths are symbolic")
                return []
            return Evidence(sizes=tuple(w * minor for w in widths), pattern="stack" if n == "stack" else "cat",
                            nodes=[node.name],
                            anchor=node)
        if dim in axes:
            notes.append(f"{node.name}: {n} along a minor channel dim (interleaved segments)")
            return []
        in_axes = _shift_after(axes, dim + 1, -1) if n == "stack" else axes
        return [(i, in_axes) for i in inputs]
    return []
