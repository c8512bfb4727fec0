"""DualScale: does a linear's input (or an input segment) come straight from an activation
with a narrow negative range? Only ops that change no value may stand in between."""
from __future__ import annotations

import numbers

import torch.fx

from . import graph_ops
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
    act = graph_ops.activation(node)
    if act is not None:
        base = act.split("(")[0]
        return act if base in activations else None
    if _keeps_range(node):   # pooled or upsampled: still inside the activation's range
        return activation_source(source(node), activations, anchor, _depth + 1)
    kind = classify(node)
    if kind is T.CAT:
        found = {activation_source(i, activations, anchor, _depth + 1) for i in graph_ops.cat_inputs(node)}
        return found.pop() if len(found) == 1 else None
    src = source(node)
    if kind is T.PIECE:    # one piece of a split: look at what was split
        src = source(src)
    elif not kind.keeps_values:
        src = graph_ops.tensor_inputs(node)[0] if kind is T.POINTWISE and _positive_scaling(node) else None
    return activation_source(src, activations, anchor, _depth + 1) if src is not None else None


def _positive_scaling(node: torch.fx.Node) -> bool:
    """x * c or x / c with one tensor and a positive Python number: the sign pattern survives."""
    n = graph_ops.name(node)
    tensors = graph_ops.tensor_inputs(node)
    numbers_ = [a for a in node.args if isinstance(a, numbers.Number) and not isinstance(a, bool)]
    if n not in ("mul", "multiply", "div", "truediv", "divide") or len(tensors) != 1 or len(numbers_) != 1:
        return False
    return numbers_[0] > 0 and (n in ("mul", "multiply") or node.args[0] is tensors[0])


# Spatial ops whose every output element is one input element of its channel (nearest upsampling,
# max pooling) or an average of them (average pooling, (bi)linear upsampling, zero padding as an
# average with 0, which lies in every activation's range): the output's range lies inside the
# input's, so the narrow negative side DualScale is for survives. UNets resample after SiLU
# (guided-diffusion's ResBlock up/down). Bicubic weights go negative: it can leave the range.
_RANGE_KEEPING = {"avg_pool1d", "avg_pool2d", "avg_pool3d", "adaptive_avg_pool1d", "adaptive_avg_pool2d",
                  "adaptive_avg_pool3d", "max_pool1d", "max_pool2d", "max_pool3d", "adaptive_max_pool1d",
                  "adaptive_max_pool2d", "adaptive_max_pool3d", "upsample_nearest1d", "upsample_nearest2d",
                  "upsample_nearest3d", "upsample_bilinear2d", "upsample_linear1d", "upsample_trilinear3d"}
_INTERPOLATE_MODES = {"nearest", "nearest-exact", "linear", "bilinear", "trilinear", "area"}


def _keeps_range(node: torch.fx.Node) -> bool:
    n = graph_ops.name(node)
    if node.op not in ("call_function", "call_method") or source(node) is None:
        return False
    if n == "interpolate":
        return graph_ops.arg(node, 3, "mode", "nearest") in _INTERPOLATE_MODES
    if n in ("pad", "constant_pad_nd"):
        mode = graph_ops.arg(node, 2, "mode", "constant") if n == "pad" else "constant"
        value = graph_ops.arg(node, 3 if n == "pad" else 2, "value", 0)
        return mode in ("constant", "replicate", "reflect", "circular") and (mode != "constant" or not value)
    if n in ("avg_pool2d", "avg_pool3d") and graph_ops.arg(node, 6, "divisor_override") is not None:
        return False      # a sum over the window divided by something else: no longer an average
    return n in _RANGE_KEEPING
