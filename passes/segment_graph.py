"""The segment graph: a dynamo FX graph as a networkx DiGraph (edges run producer -> user)."""
from __future__ import annotations

import networkx as nx
import torch
import torch.fx

from . import graph_ops
from .shapes import example


def segment_graph(gm: torch.fx.GraphModule) -> nx.DiGraph:
    g = nx.DiGraph()
    for node in gm.graph.nodes:
        value = example(node)
        g.add_node(node.name, op=graph_ops.name(node), kind=node.op,
                   shape=tuple(str(s) for s in value.shape) if isinstance(value, torch.Tensor) else None)
        for inp in node.all_input_nodes:
            g.add_edge(inp.name, node.name)
    return g
