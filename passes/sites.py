"""Which calls of a graph are linear sites, and which linear calls cannot be (FloatCall)."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx

from . import graph_ops
from .names import source_to_name
from .shapes import example
from .transparency import Transparency as T
from .transparency import classify, source

# fused ops that run linears inside them; the plan can only report those
OPAQUE_LINEAR_OPS = {"multi_head_attention_forward", "transformer_encoder_layer_fwd",
                     "native_multi_head_attention"}


@dataclass(frozen=True)
class FloatCall:
    """A linear/matmul call with a parameter operand that is no site: it stays float."""
    node: str                      # FX node of the call
    name: str                      # module path when known, else the node name
    kind: str                      # linear | matmul | mm | addmm | the opaque op's name
    reason: str
    graph: int = 0
    weight: str | None = None      # FX placeholder of the parameter behind it: the report knows it by identity


def module_name(weight: str) -> str:
    """`a.b.weight` -> `a.b`; `a.in_proj_weight` -> `a.in_proj` (nn.MultiheadAttention)."""
    path, _, leaf = weight.rpartition(".")
    if leaf == "weight" and path:
        return path
    if leaf.endswith("_weight") and leaf != "_weight":
        return f"{path}.{leaf[:-len('_weight')]}" if path else leaf[:-len("_weight")]
    return weight


def find_sites(gm: torch.fx.GraphModule, names: dict[str, str]):
    """(node, x, weight node, kind, weight stored [N, K], bias node) for every matmul with a
    parameter weight."""
    for node in gm.graph.nodes:
        site = _site(node, names)
        if site is not None:
            yield site


def _site(node: torch.fx.Node, names: dict[str, str]):
    if node.op == "call_function" and node.target in graph_ops.LINEAR_TARGETS:
        x, w = node.args[0], graph_ops.arg(node, 1, "weight")
        if isinstance(w, torch.fx.Node) and w.name in names:
            return node, x, w, "linear", True, graph_ops.arg(node, 2, "bias")
        return None
    n = graph_ops.name(node)
    if n not in graph_ops.MATMUL_NAMES or node.op not in ("call_function", "call_method"):
        return None
    x, other = (node.args[1], node.args[2]) if n == "addmm" else (node.args[0], node.args[1])
    found = _weight_of(other, names) if isinstance(other, torch.fx.Node) else None
    if found is None:
        return None
    w, nk = found
    # `x @ W` with W stored [K, N] reads as transposed relative to linear's [N, K]
    return node, x, w, n, not nk, node.args[0] if n == "addmm" else None


def _weight_of(node: torch.fx.Node, names: dict[str, str]) -> tuple[torch.fx.Node, bool] | None:
    """The parameter behind a matmul operand, and whether it is stored [N, K] (True) or [K, N]."""
    transposed = False
    cur = node
    for _ in range(4):
        if cur.name in names:
            return cur, not transposed
        kind = classify(cur)
        if kind not in (T.VALUE, T.PERMUTE) or source(cur) is None:
            return None
        transposed ^= kind is T.PERMUTE
        cur = source(cur)
    return None


def unusable_calls(gm: torch.fx.GraphModule, names: dict[str, str], opaque: dict[str, str] | None = None):
    """(node, readable name, kind, reason, the placeholder of a parameter behind it or None) for
    every linear call whose weight is no parameter,
    matmul with a parameter operand that find_sites does not take, and opaque op running
    linears on parameters (`opaque`: node name -> why it was not inlined)."""
    for node in gm.graph.nodes:
        if node.op not in ("call_function", "call_method") or _site(node, names) is not None:
            continue
        n = graph_ops.name(node)
        if node.op == "call_function" and node.target in graph_ops.LINEAR_TARGETS:
            params = _params_behind(graph_ops.arg(node, 1, "weight"), names)
            why = "weight is not a parameter (" + ("computed in the graph)" if params else "a graph input)")
            yield node, _readable(node, params, names), "linear", why, params[0].name if params else None
        elif n in graph_ops.MATMUL_NAMES:
            left, right = node.args[1:3] if n == "addmm" else node.args[:2]
            right_params = _params_behind(right, names)
            params = right_params or _params_behind(left, names)
            if params:
                why = "weight is computed in the graph" if right_params else "the parameter is the left operand"
                yield node, _readable(node, params, names), n, why, params[0].name
        elif n in OPAQUE_LINEAR_OPS:
            why = f"inside the opaque op {n}" + (f" ({opaque[node.name]})" if node.name in (opaque or {}) else "")
            for w in node.all_input_nodes:
                if w.name in names and _ndim(w) == 2:
                    yield node, module_name(names[w.name]), n, why, w.name


def _params_behind(node, names: dict[str, str], limit: int = 32) -> list[torch.fx.Node]:
    """The parameters a tensor is computed from, when it depends on nothing else (no activation)."""
    if not isinstance(node, torch.fx.Node):
        return []
    found, seen, stack = [], set(), [node]
    while stack:
        cur = stack.pop()
        if cur in seen:
            continue
        seen.add(cur)
        if cur.name in names:
            found.append(cur)
        elif cur.op == "placeholder" or len(seen) > limit:
            return []          # an activation (graph input) or too far to tell
        else:
            stack.extend(cur.all_input_nodes)
    return found


def _readable(node: torch.fx.Node, params: list, names: dict[str, str]) -> str:
    if params:
        return module_name(names[params[0].name])
    stack = node.meta.get("nn_module_stack") or {}
    if stack:
        return source_to_name(str(list(stack.values())[-1][0])) or node.name
    return node.name


def _ndim(node: torch.fx.Node) -> int | None:
    value = example(node)
    return value.dim() if isinstance(value, torch.Tensor) else None
