"""Plan: for every linear site of a graph, its Segmentation and DualScale decision."""
from __future__ import annotations

from dataclasses import dataclass, field

import networkx as nx
import torch
import torch.fx

from . import ops
from .dualscale import REACHED, activation_source
from .names import param_names
from .segment_graph import segment_graph
from .seglinear import input_segments, output_segments
from .shapes import as_int, prod, shape


@dataclass(frozen=True)
class Segmentation:
    """Contiguous segments of one axis of a linear's weight: output (N) or input (K)."""
    axis: str                      # "output" | "input"
    sizes: tuple[int, ...]
    pattern: str                   # chunk, split, slice, cat, stack, head_merge, ...
    evidence: tuple[str, ...]      # FX node names that prove it

    @property
    def bounds(self) -> tuple[int, ...]:
        out, pos = [0], 0
        for s in self.sizes:
            pos += s
            out.append(pos)
        return tuple(out)

    def describe(self) -> str:
        sizes = self.sizes
        body = f"{len(sizes)}x{sizes[0]}" if len(set(sizes)) == 1 else "[" + ", ".join(map(str, sizes)) + "]"
        return f"{body} ({self.pattern})"


@dataclass(frozen=True)
class DualScale:
    """Per input segment: the activation that makes it DualScale, or None."""
    sources: tuple[str | None, ...]

    @property
    def any(self) -> bool:
        return any(s is not None for s in self.sources)

    @property
    def all(self) -> bool:
        return all(s is not None for s in self.sources)


@dataclass(frozen=True)
class LinearSite:
    name: str                      # module path, e.g. "transformer_blocks.0.norm1.linear"
    weight: str                    # parameter name
    node: str                      # FX node of the matmul
    kind: str                      # linear | addmm | matmul
    in_features: int
    out_features: int
    bias: bool
    output_segments: Segmentation | None
    input_segments: Segmentation | None
    dualscale: DualScale
    notes: tuple[str, ...] = ()
    input_node: str = ""           # FX node of the activation
    weight_node: str = ""          # FX placeholder/get_attr of the weight
    weight_nk: bool = True         # weight stored [N, K] (linear) or [K, N] (x @ W)
    bias_node: str | None = None
    rows: int | None = None        # M of the GEMM in the traced call (None when symbolic)
    neighbourhood: tuple[str, ...] = ()   # nodes the walks visited, for the report's drawing
    graph: int = 0                 # which captured graph (graph breaks give several)


@dataclass(frozen=True)
class Plan:
    sites: tuple[LinearSite, ...]
    graphs: tuple[nx.DiGraph, ...] = field(default=(), compare=False, repr=False)

    def __iter__(self):
        return iter(self.sites)

    def __len__(self):
        return len(self.sites)

    def __getitem__(self, name: str) -> LinearSite:
        for s in self.sites:
            if s.name == name:
                return s
        raise KeyError(name)


def _weight_of(node: torch.fx.Node, names: dict[str, str]) -> tuple[torch.fx.Node, bool] | None:
    """The parameter behind a matmul operand, and whether it is stored [N, K] (True) or [K, N]."""
    transposed = False
    cur = node
    for _ in range(4):
        if cur.name in names:
            return cur, not transposed
        n = ops.name(cur)
        if n in ("t", "transpose", "permute", "T", "mT") and cur.args:
            transposed = not transposed
            cur = cur.args[0]
        elif n in ops.CASTS and cur.args:
            cur = cur.args[0]
        else:
            return None
        if not isinstance(cur, torch.fx.Node):
            return None
    return None


def find_sites(gm: torch.fx.GraphModule, names: dict[str, str]):
    """(node, x, weight node, kind, weight stored [N, K], bias node) for every matmul with a
    parameter weight."""
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target in ops.LINEAR_TARGETS:
            x, w = node.args[0], ops.arg(node, 1, "weight")
            bias = ops.arg(node, 2, "bias")
            if isinstance(w, torch.fx.Node) and w.name in names:
                yield node, x, w, "linear", True, bias
            continue
        n = ops.name(node)
        if n not in ops.MATMUL_NAMES or node.op not in ("call_function", "call_method"):
            continue
        args = node.args
        x, other = (args[1], args[2]) if n == "addmm" else (args[0], args[1])
        if not isinstance(other, torch.fx.Node):
            continue
        found = _weight_of(other, names)
        if found is None:
            continue
        w, nk = found
        # `x @ W` with W stored [K, N] reads as transposed relative to linear's [N, K]
        yield node, x, w, n, not nk, args[0] if n == "addmm" else None


def build_plan(gm: torch.fx.GraphModule, activations=frozenset({"silu", "gelu"}),
               seglinear: bool = True, graph_index: int = 0, names: dict[str, str] | None = None) -> Plan:
    names = param_names(gm) if names is None else names
    graph = segment_graph(gm)
    sites = []
    used: dict[str, int] = {}
    for node, x, w, kind, nk, bias in find_sites(gm, names):
        w_shape = shape(w)
        if w_shape is None or len(w_shape) != 2 or not isinstance(x, torch.fx.Node) or shape(x) is None:
            continue
        n_out, k_in = (as_int(w_shape[0]), as_int(w_shape[1])) if nk else (as_int(w_shape[1]), as_int(w_shape[0]))
        weight = names[w.name]
        module = weight[: -len(".weight")] if weight.endswith(".weight") else weight
        used[module] = used.get(module, 0) + 1
        site_name = module if used[module] == 1 else f"{module}#{used[module]}"
        notes: list[str] = []
        out_seg = in_seg = None
        out_ev = in_ev = None
        if seglinear:
            out_ev = output_segments(node, n_out)
            in_ev = input_segments(x, k_in)
            notes += out_ev.notes + in_ev.notes
            if out_ev.sizes:
                out_seg = Segmentation("output", out_ev.sizes, out_ev.pattern, tuple(out_ev.nodes))
            if in_ev.sizes:
                in_seg = Segmentation("input", in_ev.sizes, in_ev.pattern, tuple(in_ev.nodes))
        anchor = in_ev.anchor if in_seg is not None else None
        source = activation_source(x, frozenset(activations), anchor)
        n_segments = len(in_seg.sizes) if in_seg is not None else 1
        if source == REACHED:
            sources = tuple(activation_source(i, frozenset(activations)) for i in ops.cat_inputs(anchor))
            if len(sources) != n_segments:
                sources = (None,) * n_segments
        else:
            sources = (source,) * n_segments
        around = [node.name, x.name, w.name]
        for ev in (out_ev, in_ev):
            if ev is not None:
                around += ev.path[:24] + ev.nodes
                for n in ev.nodes:   # what the evidence node splits into or assembles from
                    around += list(graph.predecessors(n))[:8] + list(graph.successors(n))[:8]
        sites.append(LinearSite(
            name=site_name, weight=weight, node=node.name, kind=kind, in_features=k_in,
            out_features=n_out, bias=bias is not None, output_segments=out_seg, input_segments=in_seg,
            dualscale=DualScale(sources), notes=tuple(dict.fromkeys(notes)),
            input_node=x.name, weight_node=w.name, weight_nk=nk,
            bias_node=bias.name if isinstance(bias, torch.fx.Node) else None,
            rows=as_int(prod(shape(x)[:-1])),
            neighbourhood=tuple(dict.fromkeys(around)), graph=graph_index))
    return Plan(tuple(sites), (graph,))


def merge(plans: list[Plan]) -> Plan:
    """One plan over several graphs (graph breaks); a weight seen twice keeps its first site."""
    sites, graphs, seen = [], [], set()
    for i, p in enumerate(plans):
        graphs.extend(p.graphs)
        for s in p.sites:
            key = (s.weight, s.node, s.graph)
            if key not in seen:
                seen.add(key)
                sites.append(s)
    return Plan(tuple(sites), tuple(graphs))
