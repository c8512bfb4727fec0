"""Conv sites: which conv2d calls of a graph become sites (a LinearSite with a ConvGeometry), and
which convolution calls stay float (FloatCall, with the reason). DESIGN.md, Convolutions.

A conv2d with a parameter weight is an implicit GEMM: K = in_channels x kh x kw in channel-major
order (c, i, j), M = output pixels. Channel segments (a skip concatenation) are found by the
SegLinear walk on the channel axis (dim 1) and scaled to K ranges: with channel-major K a
channel segment is one contiguous K range, so the linear GEMM contract holds unchanged.
"""
from __future__ import annotations

import torch
import torch.fx

from segquant_compile.lowering.site_lowering import ConvGeometry

from . import graph_ops
from .shapes import as_int, shape

def _pair(v) -> tuple[int, int] | None:
    v = (v, v) if isinstance(v, int) else tuple(v) if isinstance(v, (list, tuple)) else None
    if v is None or len(v) != 2 or not all(isinstance(i, int) for i in v):
        return None
    return v


def conv_call(node: torch.fx.Node) -> dict | None:
    """The arguments of a convolution call (input, weight, bias, stride, padding, dilation,
    groups, transposed, dims), or None when the node is no convolution."""
    if node.op != "call_function":
        return None
    n = graph_ops.name(node)
    if node.target is torch.convolution or n in ("convolution", "_convolution"):
        names = ("input", "weight", "bias", "stride", "padding", "dilation", "transposed", "output_padding", "groups")
        call = {k: graph_ops.arg(node, i, k) for i, k in enumerate(names)}
        w = shape(call["weight"])
        return {**call, "dims": len(w) - 2 if w is not None else None}
    if n in ("conv1d", "conv2d", "conv3d"):
        names = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
        defaults = (None, None, None, 1, 0, 1, 1)
        transposed = False
    elif n in ("conv_transpose1d", "conv_transpose2d", "conv_transpose3d"):
        names = ("input", "weight", "bias", "stride", "padding", "output_padding", "groups", "dilation")
        defaults, transposed = (None, None, None, 1, 0, 0, 1, 1), True
    else:
        return None
    call = {k: graph_ops.arg(node, i, k, d) for i, (k, d) in enumerate(zip(names, defaults))}
    return {**call, "transposed": transposed, "dims": int(n[-2])}


def why_not(call: dict, names: dict[str, str]) -> str | None:
    """Why a conv call cannot be a site (None: it can)."""
    w = call["weight"]
    if not isinstance(w, torch.fx.Node) or w.name not in names:
        return "weight is not a parameter"
    if call["dims"] != 2:
        return f"conv{call['dims']}d: only conv2d is lowered"
    if call["transposed"]:
        return "transposed convolution is not lowered"
    if call["groups"] != 1:
        return f"groups={call['groups']} (grouped/depthwise convolution is not lowered)"
    if isinstance(call["padding"], str):
        return f"padding={call['padding']!r} (only explicit integer padding is lowered)"
    dilation = _pair(call["dilation"])
    if dilation != (1, 1):
        return f"dilation={call['dilation']} (only dilation 1 is lowered)"
    if _pair(call["stride"]) is None or _pair(call["padding"]) is None:
        return "stride or padding is not a pair of ints"
    x = call["input"]
    if not isinstance(x, torch.fx.Node) or shape(x) is None or len(shape(x)) != 4:
        return "input is not a 4-D (batched NCHW) tensor"
    w_shape = shape(w)
    if w_shape is None or any(as_int(s) is None for s in w_shape):
        return "weight shape unknown"
    return None


def geometry(call: dict) -> ConvGeometry:
    w = [as_int(s) for s in shape(call["weight"])]
    return ConvGeometry(w[1], (w[2], w[3]), _pair(call["stride"]), _pair(call["padding"]))


def conv_calls(gm: torch.fx.GraphModule):
    """(node, call arguments) for every convolution of the graph."""
    for node in gm.graph.nodes:
        call = conv_call(node)
        if call is not None:
            yield node, call
