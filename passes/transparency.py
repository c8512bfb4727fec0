"""What an FX node does to the channel (last) dimension of the tensor flowing through it.

One classifier for every walk (SegLinear forward and backward, DualScale). Structural ops are
named (their arguments must be read to follow the channel axis); elementwise ops are recognised
by torch's own `pointwise` tag on the aten op of the same name; shapes confirm both.
"""
from __future__ import annotations

import enum
import functools

import torch
import torch.fx

from . import graph_ops
from .shapes import example, shape


class Transparency(enum.Enum):
    VALUE = "value"          # casts, copies, dropout: same values at the same positions
    POINTWISE = "pointwise"  # elementwise on one tensor (scalars allowed): positions kept
    BROADCAST = "broadcast"  # elementwise on several tensors: positions kept where sizes match
    EXPAND = "expand"        # expand/repeat: elements copied along broadcast dims
    RESHAPE = "reshape"      # view/reshape/flatten/squeeze/...: row-major regrouping of dims
    PERMUTE = "permute"      # permute/transpose/movedim: dims reordered
    SPLIT = "split"          # chunk/split/unbind: a tuple of pieces along one dim
    PIECE = "piece"          # getitem on a split's tuple
    CAT = "cat"              # cat/stack of two or more tensors
    INDEX = "index"          # x[...], narrow, select
    MIXING = "mixing"        # norms, softmax, reductions, matmuls, anything unknown: the walk ends

    @property
    def keeps_values(self) -> bool:
        """Every output element is some input element, unchanged (DualScale may look through)."""
        return self not in (Transparency.POINTWISE, Transparency.BROADCAST, Transparency.MIXING)


T = Transparency
_FAMILIES = {
    T.VALUE: {"to", "type", "type_as", "float", "half", "bfloat16", "double", "contiguous", "clone",
              "detach", "dropout", "alpha_dropout", "feature_alpha_dropout", "requires_grad_"},
    T.RESHAPE: {"view", "reshape", "flatten", "unflatten", "squeeze", "unsqueeze", "view_as",
                "reshape_as", "unsafe_view"},
    T.PERMUTE: {"permute", "transpose", "swapaxes", "swapdims", "t", "movedim", "moveaxis"},
    T.EXPAND: {"expand", "expand_as", "broadcast_to", "repeat"},
    T.SPLIT: {"chunk", "split", "split_with_sizes", "tensor_split", "unbind"},
    T.CAT: {"cat", "concat", "concatenate", "stack"},
    T.INDEX: {"narrow", "select"},
}
_BY_NAME = {n: kind for kind, names in _FAMILIES.items() for n in names}

# torch-level spellings (operator module, aliases) whose aten op has another name
_ATEN_NAME = {"truediv": "div", "itruediv": "div", "iadd": "add", "isub": "sub", "imul": "mul",
              "mod": "remainder", "multiply": "mul", "divide": "div", "subtract": "sub"}
# elementwise, but not tagged pointwise in every torch version
_UNTAGGED_POINTWISE = {"hardswish", "floor_divide", "floordiv"}


def classify(node: torch.fx.Node) -> Transparency:
    if node.op not in ("call_function", "call_method"):
        return T.MIXING
    n = graph_ops.name(node)
    if n == "getitem":
        src = source(node)
        if isinstance(example(src), torch.Tensor):
            return T.INDEX
        return T.PIECE if src is not None and _BY_NAME.get(graph_ops.name(src)) is T.SPLIT else T.MIXING
    kind = _BY_NAME.get(n)
    if kind is T.CAT and len(graph_ops.cat_inputs(node)) < 2:
        # a one-piece cat is a copy, a one-piece stack an unsqueeze: no segments
        kind = T.VALUE if n != "stack" else T.RESHAPE
    if kind is not None:
        return kind if _shape_ok(node, kind) else T.MIXING
    if graph_ops.activation(node) or _pointwise(n):
        tensors = graph_ops.tensor_inputs(node)
        if len(tensors) == 1:
            return T.POINTWISE if shape(tensors[0]) == shape(node) else T.MIXING
        return T.BROADCAST if tensors and shape(node) is not None else T.MIXING
    return T.MIXING


def source(node: torch.fx.Node) -> torch.fx.Node | None:
    """The operand whose elements flow to the output (the input of a copy, view, split...)."""
    if _BY_NAME.get(graph_ops.name(node)) is T.CAT:
        pieces = graph_ops.cat_inputs(node)
        return pieces[0] if len(pieces) == 1 and isinstance(pieces[0], torch.fx.Node) else None
    first = node.args[0] if node.args else node.kwargs.get("input", node.kwargs.get("self"))
    return first if isinstance(first, torch.fx.Node) else None


def _shape_ok(node: torch.fx.Node, kind: Transparency) -> bool:
    """Value-preserving ops must keep the shape; the others must at least produce tensors."""
    if kind is T.SPLIT:
        return isinstance(example(node), (tuple, list))
    out = shape(node)
    if out is None:
        return False
    return kind is not T.VALUE or shape(source(node)) == out


@functools.lru_cache(maxsize=None)
def _pointwise(name: str) -> bool:
    n = _ATEN_NAME.get(name, name)
    if n in _UNTAGGED_POINTWISE:
        return True
    packet = getattr(torch.ops.aten, n, None) or getattr(torch.ops.aten, n.rstrip("_"), None)
    if not isinstance(packet, torch._ops.OpOverloadPacket):
        return False
    return any(torch.Tag.pointwise in getattr(packet, o).tags for o in packet.overloads())
