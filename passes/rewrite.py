"""Rewrite planned linear sites of a dynamo graph: quantized (one GEMM op each) or observed."""
from __future__ import annotations

import copy
from typing import Callable

import torch.fx

from segquant_compile.lowering.linear import quantized_linear

# per-site tensors the wrapper passes as extra graph inputs, in this order
EXTRA_INPUTS = ("packed", "d_w", "d_x", "d_neg", "smooth")


def _placeholder_after_inputs(graph: torch.fx.Graph, name: str) -> torch.fx.Node:
    last = [n for n in graph.nodes if n.op == "placeholder"][-1]
    with graph.inserting_after(last):
        return graph.placeholder(name)


def quantize_sites(gm: torch.fx.GraphModule, sites: list, static: bool, fmt: str = "int8"
                   ) -> tuple[torch.fx.GraphModule, list]:
    """Replace each site's matmul by `quantized_linear`. `sites` are (LinearSite, k_bounds, dual,
    has_smooth, prologue). Returns the new module and the extra inputs it takes: (site name, field)."""
    gm = copy.deepcopy(gm)
    graph = gm.graph
    nodes = {n.name: n for n in graph.nodes}
    extras: list[tuple[str, str]] = []
    for site, k_bounds, dual, has_smooth, prologue in sites:
        node = nodes[site.node]
        fields = ["packed", "d_w"] + (["d_x", "d_neg"] if static else []) + (["smooth"] if has_smooth else [])
        inputs = {}
        for f in fields:
            inputs[f] = _placeholder_after_inputs(graph, f"sq_{len(extras)}_{f}")
            extras.append((site.name, f))
        bias = nodes[site.bias_node] if site.bias_node else None
        with graph.inserting_before(node):
            new = graph.call_function(quantized_linear, (
                nodes[site.input_node], inputs["packed"], inputs["d_w"], bias,
                inputs.get("d_x"), inputs.get("d_neg"), inputs.get("smooth"),
                tuple(k_bounds), tuple(dual), bool(prologue), fmt))
        new.meta.update({k: v for k, v in node.meta.items() if k in ("example_value", "val", "stack_trace")})
        node.replace_all_uses_with(new)
        graph.erase_node(node)
    graph.eliminate_dead_code()
    graph.lint()
    gm.recompile()
    return gm, extras


def observe_sites(gm: torch.fx.GraphModule, sites: list, observe: Callable) -> torch.fx.GraphModule:
    """Insert `observe(site_name, x)` before each site (calibration runs this graph in float)."""
    gm = copy.deepcopy(gm)
    graph = gm.graph
    nodes = {n.name: n for n in graph.nodes}
    for site in sites:
        node = nodes[site.node]
        with graph.inserting_before(node):
            graph.call_function(observe, (site.name, nodes[site.input_node]))
    gm.recompile()
    return gm
