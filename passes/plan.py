"""Plan: for every linear site of a graph, its Segmentation and DualScale decision."""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import networkx as nx
import torch
import torch.fx

from segquant_compile.lowering.site_lowering import ConvGeometry

from . import graph_ops
from .conv_calls import conv_calls, geometry, why_not
from .dualscale import REACHED, activation_source
from .inline import inline_opaque
from .names import param_names
from .segment_graph import segment_graph
from .input_segments import input_segments
from .output_segments import output_segments
from .shapes import as_int, prod, shape
from .sites import OPAQUE_LINEAR_OPS, FloatCall, find_sites, module_name, unusable_calls


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
    """A site: a linear (or a conv2d, with `conv`: the same GEMM contract on im2col rows)."""
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
    conv: ConvGeometry | None = None   # a conv2d site (kind "conv2d"): K = in_channels x kh x kw


@dataclass(frozen=True)
class Plan:
    sites: tuple[LinearSite, ...]
    graphs: tuple[nx.DiGraph, ...] = field(default=(), compare=False, repr=False)
    float_calls: tuple[FloatCall, ...] = ()    # linear calls that cannot be sites, with the reason

    def __iter__(self):
        return iter(self.sites)

    def __len__(self):
        return len(self.sites)

    def __getitem__(self, name: str) -> LinearSite:
        for s in self.sites:
            if s.name == name:
                return s
        raise KeyError(name)


def build_plan(gm: torch.fx.GraphModule, activations=frozenset({"silu", "gelu"}),
               seglinear: bool = True, graph_index: int = 0, names: dict[str, str] | None = None) -> Plan:
    """The plan of one dynamo graph. Opaque calls that hide linears (multi-head attention) are
    inlined into `gm` first, in place, so that the rewrite sees the same nodes as the plan."""
    opaque = inline_opaque(gm)
    names = param_names(gm) if names is None else names
    graph = segment_graph(gm)
    sites = []
    floats = [FloatCall(node.name, name, kind, why, graph_index, weight)
              for node, name, kind, why, weight in unusable_calls(gm, names, opaque)]
    used: dict[str, int] = {}

    def site_name(weight: str) -> str:
        module = module_name(weight)
        used[module] = used.get(module, 0) + 1
        return module if used[module] == 1 else f"{module}#{used[module]}"

    for node, x, w, kind, nk, bias in find_sites(gm, names):
        w_shape = shape(w)
        why = "weight is not 2-D" if w_shape is None or len(w_shape) != 2 else \
            "input shape unknown" if not isinstance(x, torch.fx.Node) or shape(x) is None else None
        if why:
            floats.append(FloatCall(node.name, module_name(names[w.name]), kind, why, graph_index, w.name))
            continue
        n_out, k_in = (as_int(w_shape[0]), as_int(w_shape[1])) if nk else (as_int(w_shape[1]), as_int(w_shape[0]))
        sites.append(_site(graph, node, x, w, bias, kind, site_name(names[w.name]), names[w.name], n_out, k_in,
                           activations, seglinear, graph_index, nk=nk, rows=as_int(prod(shape(x)[:-1]))))
    for node, call in conv_calls(gm):
        why = why_not(call, names)
        if why:
            w = call["weight"]
            known = isinstance(w, torch.fx.Node) and w.name in names
            floats.append(FloatCall(node.name, module_name(names[w.name]) if known else node.name,
                                    graph_ops.name(node).lstrip("_"), why, graph_index, w.name if known else None))
            continue
        conv, w = geometry(call), call["weight"]
        out = shape(node)
        sites.append(_site(graph, node, call["input"], w, call["bias"], "conv2d", site_name(names[w.name]),
                           names[w.name], as_int(shape(w)[0]), conv.in_channels * conv.taps, activations,
                           seglinear, graph_index, conv=conv, rows=as_int(out[0] * out[2] * out[3])))
    _warn_hidden(floats)
    order = {n.name: i for i, n in enumerate(gm.graph.nodes)}
    return Plan(tuple(sorted(sites, key=lambda s: order[s.node])), (graph,), tuple(floats))


def _warn_hidden(floats) -> None:
    """A fused op left in the graph keeps every linear inside it float: said at compile time,
    once per op, not only in the report."""
    hidden: dict[str, list[FloatCall]] = {}
    for c in floats:
        if c.kind in OPAQUE_LINEAR_OPS:
            hidden.setdefault(c.node, []).append(c)
    for calls in hidden.values():
        names = sorted({c.name for c in calls})
        warnings.warn(f"segquant: {len(names)} linear weight(s) of {', '.join(names)} stay float: "
                      f"{calls[0].reason}. Run the model without the fused fast path (for example with "
                      f"masks passed as None, or outside torch.no_grad) to quantize them", stacklevel=2)


def _site(graph, node, x, w, bias, kind: str, name: str, weight: str, n_out: int, k_in: int, activations,
          seglinear: bool, graph_index: int, nk: bool = True, rows: int | None = None,
          conv: ConvGeometry | None = None) -> LinearSite:
    """Segments and DualScale of one site. A conv walks its channel axis (dim 1) in channels;
    its input segments are then scaled to K ranges (channel-major K: one range per segment)."""
    notes: list[str] = []
    out_seg = in_seg = None
    out_ev = in_ev = None
    axis, taps = (1, conv.taps) if conv is not None else (-1, 1)
    if seglinear:
        out_ev = output_segments(node, n_out, axis)
        in_ev = input_segments(x, k_in // taps, axis)
        notes += out_ev.notes + in_ev.notes
        if out_ev.sizes and len(out_ev.sizes) > 1:
            out_seg = Segmentation("output", out_ev.sizes, out_ev.pattern, tuple(out_ev.nodes))
        if in_ev.sizes and len(in_ev.sizes) > 1:   # one piece is no segmentation
            in_seg = Segmentation("input", tuple(c * taps for c in in_ev.sizes), in_ev.pattern, tuple(in_ev.nodes))
    anchor = in_ev.anchor if in_seg is not None else None
    source = activation_source(x, frozenset(activations), anchor)
    n_segments = len(in_seg.sizes) if in_seg is not None else 1
    if source == REACHED:
        sources = tuple(activation_source(i, frozenset(activations)) for i in graph_ops.cat_inputs(anchor))
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
    return LinearSite(
        name=name, weight=weight, node=node.name, kind=kind, in_features=k_in,
        out_features=n_out, bias=bias is not None, output_segments=out_seg, input_segments=in_seg,
        dualscale=DualScale(sources), notes=tuple(dict.fromkeys(notes)),
        input_node=x.name, weight_node=w.name, weight_nk=nk,
        bias_node=bias.name if isinstance(bias, torch.fx.Node) else None,
        rows=rows, neighbourhood=tuple(dict.fromkeys(around)), graph=graph_index, conv=conv)


def merge(plans: list[Plan]) -> Plan:
    """One plan over several graphs (graph breaks); a weight seen twice keeps its first site."""
    sites, graphs, floats, seen = [], [], [], set()
    for i, p in enumerate(plans):
        graphs.extend(p.graphs)
        for s in p.sites:
            key = (s.weight, s.node, s.graph)
            if key not in seen:
                seen.add(key)
                sites.append(s)
        floats.extend(f for f in p.float_calls if f not in floats)
    return Plan(tuple(sites), tuple(graphs), tuple(floats))
