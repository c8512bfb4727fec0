"""SegLinear: read a linear's output and input segments off the graph (DESIGN.md table).

Both walks track `axes`: the dims of the current tensor that hold the linear's channel axis,
major to minor. Normally one dim (the last); after a reshape that splits the channels into
(k, d) it is two, and a split along the major one is a segmentation into k parts.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch.fx

from . import graph_ops
from .indexing import FULL, bounds, index_map
from .shapes import as_int, group_map, ints, norm_dim, prod, same, shape
from .transparency import Transparency as T
from .transparency import classify, source


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
        minor = _minor(src_shape, axes)
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
            push(user, _shift_after(axes, dim, 1))
        elif dim not in axes:
            push(user, axes)
        return
    if source(user) is not src:     # src is not the operand whose elements move (view_as(src), ...)
        return
    if kind is T.RESHAPE:
        new = _reshape_axes(src_shape, out_shape, axes)
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
        new = _shift_after(axes, dim + 1, -1) if graph_ops.name(user) == "unbind" and dim not in axes else axes
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
        push(user, _shift_after(axes, dim + 1, -1) if n == "select" else axes)


def as_int_or(x):
    if isinstance(x, int):
        return x
    try:
        return as_int(x)
    except (TypeError, AttributeError):
        return None


# ---------------------------------------------------------------- input segments

def input_segments(x: torch.fx.Node, in_features: int, axis: int = -1) -> Evidence:
    """Linear input assembled along its channel axis: cat/stack, or a head merge
    (reshape/view/flatten of (..., heads, head_dim), also channel-first with a transpose).
    `axis`: the channel dim (1 for a conv's NCHW input)."""
    notes: list[str] = []
    path: list[str] = []
    found = _walk_back(x, (norm_dim(axis, len(shape(x))),), notes, path, in_features)
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


def _all_operands_agree(node, operands, notes, path, total: int) -> Evidence | list:
    """Several full-size operands (x + y): their sum is segmented only if every operand is, the
    same way. Accepting one operand's evidence would make the plan depend on the batch size: a
    (1, T, D) table is full-size at batch 1 and broadcast at batch 2."""
    results = [_walk_back(inp, axes, [], path, total) for inp, axes in operands]
    kinds = [{(e.sizes, e.pattern) for e in r} for r in results]
    if all(len(k) == 1 for k in kinds) and len(set().union(*kinds)) == 1:
        return results[0][0]
    if any(kinds):
        notes.append(f"{node.name}: only some operands are assembled in segments: not a segmentation")
    return []


def _backward_step(node, axes, notes, path, total: int) -> Evidence | list:
    kind = classify(node)
    out_shape = shape(node)
    src = source(node)
    if kind is T.MIXING and out_shape is not None:
        spatial = channel_transparent(node, axes)
        if spatial is not None:
            return spatial(node, axes, notes, path, total)
    if kind is T.MIXING or out_shape is None:
        return []
    if kind in (T.RESHAPE, T.PERMUTE, T.INDEX) and shape(src) is None:
        return []
    if kind is T.VALUE:
        return [(src, axes)] if shape(src) is not None else []
    if kind in (T.POINTWISE, T.BROADCAST, T.EXPAND):
        # follow the full-size operands; broadcast ones (per-channel tables) only add to them
        full = [(inp, axes) for inp in graph_ops.tensor_inputs(node) if shape(inp) == out_shape]
        return full if len(full) < 2 else _all_operands_agree(node, full, notes, path, total)
    if kind is T.RESHAPE:
        return _backward_reshape(node, src, axes, notes, path, total)
    if kind is T.PERMUTE:
        perm = graph_ops.permutation(node, len(out_shape))
        return [(src, tuple(perm[a] for a in axes))] if perm is not None else []
    if kind is T.PIECE:
        dim, sizes = graph_ops.split_parts(src) or (None, ())
        src_axes = _shift_after(axes, dim, 1) if graph_ops.name(src) == "unbind" else axes
        if dim is None or (dim in src_axes and len(sizes) > 1):
            return []
        return [(source(src), src_axes)]
    if kind is T.INDEX:
        return _backward_index(node, src, axes, notes)
    return _backward_cat(node, axes, notes)


def _backward_reshape(node, src, axes, notes, path, total: int) -> Evidence | list:
    src_shape = shape(src)
    mapped = _reshape_axes(shape(node), src_shape, axes)
    if mapped is None and len(axes) == 1:
        folded = _folded_heads(shape(node), src_shape, axes[0])
        if folded is not None:
            heads, width, dim = folded
            notes.append(f"{node.name}: head merge of {heads} heads of {width} folded into dim {dim} of {src.name}")
            return Evidence(sizes=(width,) * heads, pattern="head_merge", nodes=[node.name])
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


def _folded_heads(dst_shape, src_shape, axis: int) -> tuple[int, int, int] | None:
    """(heads, head width, src dim holding the heads) when the reshape src -> dst assembles the
    channel axis `axis` of dst from heads folded into an earlier dim of src: (N*heads, d, T) ->
    (N, heads*d, T), the channel-first head merge of 1x1-conv attention (ADM/guided-diffusion's
    QKVAttention). Read row-major, channel c = h*d + j of dst row n is element j of src row
    n*heads + h: the head index is the minor factor of the src dim just before the head width, so
    each d-wide channel range comes from one head. None for any other regrouping."""
    channels = as_int(dst_shape[axis])
    for end in range(1, len(src_shape) + 1):          # src[:end] holds dst[:axis + 1]
        if not same(prod(src_shape[:end]), prod(dst_shape[:axis + 1])):
            continue
        if end < 2:
            return None
        width, folded = as_int(src_shape[end - 1]), end - 2
        if channels is None or width is None or width < 2 or width == channels or channels % width:
            return None
        heads = channels // width
        for start in range(axis + 1):                  # src[:folded] == dst[:start], the outer dims
            if same(prod(src_shape[:folded]), prod(dst_shape[:start])):
                inner = prod(dst_shape[start:axis]) * heads
                return (heads, width, folded) if heads > 1 and same(src_shape[folded], inner) else None
        return None
    return None


def _backward_index(node, src, axes, notes) -> list:
    src_shape = shape(src)
    if graph_ops.name(node) == "getitem":
        imap = index_map(node.args[1], len(src_shape))
        if imap is None:
            return []
        back = {o: (d, sel) for d, o, sel in imap if o is not None}
        if any(a not in back for a in axes):     # x[:, None]: nothing was assembled along it
            notes.append(f"{node.name}: the channel axis is a new dim (indexing with None)")
            return []
        if any(back[a][1] != FULL for a in axes):
            notes.append(f"{node.name}: slices the channel axis")
            return []
        return [(src, tuple(back[a][0] for a in axes))]
    # narrow / select along another dim: the channel axis passes through
    dim = norm_dim(int(graph_ops.arg(node, 1, "dim")), len(src_shape))
    src_axes = _shift_after(axes, dim, 1) if graph_ops.name(node) == "select" else axes
    return [] if dim in src_axes else [(src, src_axes)]


def _backward_cat(node, axes, notes) -> Evidence | list:
    n = graph_ops.name(node)
    out_shape = shape(node)
    dim = graph_ops.cat_dim(node)
    inputs = [i for i in graph_ops.cat_inputs(node) if isinstance(i, torch.fx.Node)]
    if dim == axes[0]:
        minor = _minor(out_shape, axes)
        widths = [1] * len(inputs) if n == "stack" else [as_int(shape(i)[dim]) for i in inputs]
        if minor is None or any(w is None for w in widths):
            notes.append(f"{node.name}: concatenation widths are symbolic")
            return []
        return Evidence(sizes=tuple(w * minor for w in widths), pattern="stack" if n == "stack" else "cat",
                        nodes=[node.name], anchor=node)
    if dim in axes:
        notes.append(f"{node.name}: {n} along a minor channel dim (interleaved segments)")
        return []
    in_axes = _shift_after(axes, dim + 1, -1) if n == "stack" else axes
    return [(i, in_axes) for i in inputs]


# ---------------------------------------------------------------- NCHW ops that keep the channel axis

# ops on the spatial dims (2, 3, ...) of an NCHW tensor: every element stays in its channel
SPATIAL_OPS = {"interpolate", "upsample_nearest2d", "upsample_bilinear2d", "pad", "constant_pad_nd"}


def channel_transparent(node, axes):
    """How the backward walk passes an op that mixes other dims but keeps the tracked channel
    axis in place (a conv's dim 1), or None: spatial ops (resampling, padding) pass it as is;
    GroupNorm mixes channels only inside its groups, so it passes a segmentation whose
    boundaries fall between groups and ends the walk when a group straddles one."""
    src = source(node)
    if axes != (1,) or len(shape(node)) < 3 or shape(src) is None or shape(src)[:2] != shape(node)[:2]:
        return None
    n = graph_ops.name(node)
    if n in SPATIAL_OPS:
        return lambda node, axes, notes, path, total: [(source(node), axes)]
    if n == "group_norm":
        return _through_group_norm
    return None


def _through_group_norm(node, axes, notes, path, total: int) -> Evidence | list:
    groups = graph_ops.arg(node, 1, "num_groups")
    channels = as_int(shape(node)[1])
    found = _walk_back(source(node), axes, notes, path, total)
    if not isinstance(groups, int) or not channels or len({(e.sizes, e.pattern) for e in found}) != 1:
        return []
    ev, width = found[0], channels // groups      # segment sizes count channels here (minor = 1)
    where = f"GroupNorm {node.name} ({groups} groups of {width} channels)"
    if any(b % width for b in _cuts(ev.sizes)):
        notes.append(f"{where} straddles the {ev.pattern} boundary at channel(s) {_cuts(ev.sizes)}: "
                     f"its output mixes the segments")
        return []
    notes.append(f"{where} keeps the {ev.pattern} segments: every group lies inside one")
    ev.nodes = [*ev.nodes, node.name]
    return ev


def _cuts(sizes) -> list[int]:
    out, pos = [], 0
    for s_ in sizes[:-1]:
        pos += s_
        out.append(pos)
    return out
