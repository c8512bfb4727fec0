"""DualScale: does a linear's input (or an input segment) come straight from an activation
with a narrow negative range? Only ops that change no value may stand in between."""
from __future__ import annotations

import numbers

import torch.fx

from . import ops

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
    n = ops.name(node)
    src = node.args[0] if node.args and isinstance(node.args[0], torch.fx.Node) else None
    if n == "getitem" and src is not None and isinstance(ops.example(src), (tuple, list)):
        if ops.name(src) in ops.SPLITS:
            return activation_source(src.args[0], activations, anchor, _depth + 1)
        return None
    if src is not None and (n in ops.CASTS or n in ops.RESHAPES or n in ops.PERMUTES
                            or n in ops.EXPANDS or n in ("getitem", "narrow", "select")):
        return activation_source(src, activations, anchor, _depth + 1)
    if n in ("mul", "div", "truediv", "multiply", "divide") and _positive_scaling(node):
        tensor = ops.tensor_inputs(node)[0]
        return activation_source(tensor, activations, anchor, _depth + 1)
    if n in ops.CATS or n == "stack":
        found = {activation_source(i, activations, anchor, _depth + 1) for i in ops.cat_inputs(node)}
        return found.pop() if len(found) == 1 else None
    return None


def _positive_scaling(node: torch.fx.Node) -> bool:
    """x * c or x / c with one tensor and a positive Python number: the sign pattern survives."""
    tensors = ops.tensor_inputs(node)
    numbers_ = [a for a in node.args if isinstance(a, numbers.Number) and not isinstance(a, bool)]
    return len(tensors) == 1 and len(numbers_) == 1 and numbers_[0] > 0 and \
        (ops.name(node) in ("mul", "multiply") or node.args[0] is tensors[0])
