"""DualScale: does a linear's input (or an input segment) come straight from an activation
with a narrow negative range? Only ops that change no value may stand in between."""
from __future__ import annotations

import numbers

import torch.fx

from . import ops
from .transparency import Transparency as T
from .transparency import classify, source

REACHED = "reached"  # the walk met the input-segment anchor (a cat): decide per segment


def activation_source(node: torch.fx.Node, activations: frozenset[str],
                      anchor: torch.fx.Node | None = None, _depth: int = 0) -> str | None:
    """The activation (config name, with GELU's approximation) that produced `node`'s values,
    through value-preserving ops; REACHED when the walk meets `anchor`; None otherwise."""
    if _depth > 64 or not isinstance(node, torch.fx.Node):
        return None
    if node is anchor:
        return REACHED
    act = ops.activation(node)
    if act is not None:
        base = act.split("(")[0]
        return act if base in activations else None
    kind = classify(node)
    if kind is T.CAT:
        found = {activation_source(i, activations, anchor, _depth + 1) for i in ops.cat_inputs(node)}
        return found.pop() if len(found) == 1 else None
    src = source(node)
    if kind is T.PIECE:    # one piece of a split: look at what was split
        src = source(src)
    elif not kind.keeps_values:
        src = ops.tensor_inputs(node)[0] if kind is T.POINTWISE and _positive_scaling(node) else None
    return activation_source(src, activations, anchor, _depth + 1) if src is not None else None


def _positive_scaling(node: torch.fx.Node) -> bool:
    """x * c or x / c with one tensor and a positive Python number: the sign pattern survives."""
    n = ops.name(node)
    tensors = ops.tensor_inputs(node)
    numbers_ = [a for a in node.args if isinstance(a, numbers.Number) and not isinstance(a, bool)]
    if n not in ("mul", "multiply", "div", "truediv", "divide") or len(tensors) != 1 or len(numbers_) != 1:
        return False
    return numbers_[0] > 0 and (n in ("mul", "multiply") or node.args[0] is tensors[0])
