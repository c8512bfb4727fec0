"""The two rewrites of a dynamo graph (pt2e style): `prepare` inserts observers before the planned
sites (calibration runs that graph in float); `convert` replaces each site's matmul by one
quantized linear (activation quantize + one segquant GEMM op)."""
from __future__ import annotations

import collections
import copy
import torch.fx

from segquant_compile.lowering.conv import quantized_conv2d
from segquant_compile.lowering.linear import quantized_linear, shared_activation
from segquant_compile.lowering.site_lowering import SiteLowering

from .plan import LinearSite


def extra_fields(lowering: SiteLowering) -> tuple[str, ...]:
    """The per-site tensors `convert`'s graph takes as extra inputs, in order (SiteParams fields)."""
    if lowering.cpu_gemm == "fp32":   # one fp32 GEMM on the dequantized weight (cpu_linear.py)
        weight = ("dequantized",)
    else:
        # zero-point corrections from the weight's column sums; a dynamic conv's depend on which
        # pixels are padding, so its op makes them (lowering/conv.py pixel_column_sums)
        colsum = lowering.asymmetric and not lowering.weight_only and (lowering.conv is None or lowering.static)
        weight = ("packed", "d_w") + (("colsum",) if colsum else ())
    return weight + \
        (("d_pos", "d_neg") if lowering.static else ()) + (("zp",) if lowering.static and lowering.asymmetric else ()) + \
        (("smooth",) if lowering.smooth is not None else ()) + (("l1", "l2") if lowering.low_rank else ())


def _placeholder_after_inputs(graph: torch.fx.Graph, name: str) -> torch.fx.Node:
    last = [n for n in graph.nodes if n.op == "placeholder"][-1]
    with graph.inserting_after(last):
        return graph.placeholder(name)


def activation_key(site: LinearSite, lowering: SiteLowering) -> tuple | None:
    """Sites with equal keys quantize the same tensor the same way: dynamic CPU sites of one input
    with one segmentation and schemes (q/k/v projections), whose steps the graph computes from
    that input by one rule. Static steps are per site (graph inputs): never shared."""
    if lowering.cpu_gemm is None or lowering.static or lowering.smooth is not None or lowering.weight_only:
        return None
    return site.input_node, lowering.k_bounds, lowering.codes, lowering.cpu_gemm


def convert(gm: torch.fx.GraphModule, entries: list[tuple[LinearSite, SiteLowering]]
            ) -> tuple[torch.fx.GraphModule, list[tuple[int, str]]]:
    """Replace each (site, lowering) matmul by `quantized_linear`. Returns the new module and the
    extra inputs it takes after the graph's own: (entry index, QuantState field)."""
    gm = copy.deepcopy(gm)
    graph = gm.graph
    nodes = {n.name: n for n in graph.nodes}
    extras: list[tuple[int, str]] = []
    keys = [activation_key(s, lo) for s, lo in entries]
    counts = collections.Counter(keys)
    position = {n.name: i for i, n in enumerate(graph.nodes)}
    shared = {}   # activation key -> the node computing it, for keys that two or more sites have
    for i, (site, lowering) in enumerate(entries):
        node = nodes[site.node]
        key = keys[i]
        if key is not None and counts[key] > 1 and key not in shared:
            # before the first reader in graph order (no site with this key is rewritten yet)
            first = min((entries[j][0].node for j, k in enumerate(keys) if k == key), key=position.get)
            with graph.inserting_before(nodes[first]):
                shared[key] = graph.call_function(shared_activation, (
                    nodes[site.input_node], lowering.k_bounds, lowering.codes, lowering.cpu_gemm))
        inputs = {}
        for f in extra_fields(lowering):
            inputs[f] = _placeholder_after_inputs(graph, f"sq_{i}_{f}")
            extras.append((i, f))
        bias = nodes[site.bias_node] if site.bias_node else None
        with graph.inserting_before(node):
            if lowering.conv is None:
                w = inputs.get("packed", inputs.get("dequantized"))
                new = graph.call_function(quantized_linear, (
                    nodes[site.input_node], w, inputs.get("d_w"), bias,
                    inputs.get("d_pos"), inputs.get("d_neg"), inputs.get("zp"), inputs.get("smooth"), inputs.get("colsum"),
                    lowering.k_bounds, lowering.codes, lowering.prologue, lowering.format, lowering.cpu_gemm,
                    shared.get(key), lowering.g_bounds), {"l1": inputs.get("l1"), "l2": inputs.get("l2")})
            else:
                new = graph.call_function(quantized_conv2d, (
                    nodes[site.input_node], inputs.get("packed", inputs.get("dequantized")), inputs.get("d_w"), bias,
                    inputs.get("d_pos"), inputs.get("d_neg"), inputs.get("zp"), inputs.get("smooth"), inputs.get("colsum"),
                    lowering.k_bounds, lowering.codes, lowering.prologue, lowering.format),
                    {"conv": tuple(lowering.conv.as_list()), "l1": inputs.get("l1"), "l2": inputs.get("l2")})
        new.meta.update({k: v for k, v in node.meta.items() if k in ("example_value", "val", "stack_trace")})
        node.replace_all_uses_with(new)
        graph.erase_node(node)
        nodes[site.node] = new   # a later site may read this one's output (linear -> linear)
    graph.eliminate_dead_code()
    graph.lint()
    gm.recompile()
    return gm, extras


def prepare(gm: torch.fx.GraphModule, sites: list[LinearSite], observers: list[torch.nn.Module]
            ) -> torch.fx.GraphModule:
    """Insert `observers[i](x, weight)` before site i, as submodules of the graph module (pt2e
    style); each observer finds its weight's state from the weight, so calls share nothing."""
    gm = copy.deepcopy(gm)
    graph = gm.graph
    nodes = {n.name: n for n in graph.nodes}
    for i, (site, observer) in enumerate(zip(sites, observers)):
        name = f"sq_observer_{i}"
        gm.add_submodule(name, observer)
        with graph.inserting_before(nodes[site.node]):
            graph.call_module(name, (nodes[site.input_node], nodes[site.weight_node]))
    gm.recompile()
    return gm
