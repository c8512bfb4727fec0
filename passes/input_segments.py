"""SegLinear's input segments: a linear's input assembled along its channel axis (cat/stack,
a head merge), found by walking back from the input (seglinear.py: the walk's state)."""
from __future__ import annotations

import torch.fx

from . import graph_ops
from .indexing import FULL, index_map
from .seglinear import Evidence, cuts, minor_size, reshape_axes, shift_after
from .shapes import as_int, norm_dim, prod, same, shape
from .transparency import Transparency as T
from .transparency import classify, source


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
        src_axes = shift_after(axes, dim, 1) if graph_ops.name(src) == "unbind" else axes
        if dim is None or (dim in src_axes and len(sizes) > 1):
            return []
        return [(source(src), src_axes)]
    if kind is T.INDEX:
        return _backward_index(node, src, axes, notes)
    return _backward_cat(node, axes, notes)


def _backward_reshape(node, src, axes, notes, path, total: int) -> Evidence | list:
    src_shape = shape(src)
    mapped = reshape_axes(shape(node), src_shape, axes)
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
        width = minor_size(src_shape, mapped)
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
    src_axes = shift_after(axes, dim, 1) if graph_ops.name(node) == "select" else axes
    return [] if dim in src_axes else [(src, src_axes)]


def _backward_cat(node, axes, notes) -> Evidence | list:
    n = graph_ops.name(node)
    out_shape = shape(node)
    dim = graph_ops.cat_dim(node)
    inputs = [i for i in graph_ops.cat_inputs(node) if isinstance(i, torch.fx.Node)]
    if dim == axes[0]:
        minor = minor_size(out_shape, axes)
        widths = [1] * len(inputs) if n == "stack" else [as_int(shape(i)[dim]) for i in inputs]
        if minor is None or any(w is None for w in widths):
            notes.append(f"{node.name}: concatenation widths are symbolic")
            return []
        return Evidence(sizes=tuple(w * minor for w in widths), pattern="stack" if n == "stack" else "cat",
                        nodes=[node.name], anchor=node)
    if dim in axes:
        notes.append(f"{node.name}: {n} along a minor channel dim (interleaved segments)")
        return []
    in_axes = shift_after(axes, dim + 1, -1) if n == "stack" else axes
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
    if any(b % width for b in cuts(ev.sizes)):
        notes.append(f"{where} straddles the {ev.pattern} boundary at channel(s) {cuts(ev.sizes)}: "
                     f"its output mixes the segments")
        return []
    notes.append(f"{where} keeps the {ev.pattern} segments: every group lies inside one")
    ev.nodes = [*ev.nodes, node.name]
    return ev
