"""explain(): the plan for a model before compiling; report(): the plan as a compiled model runs."""
from __future__ import annotations

import warnings

import torch

from segquant_compile import registry
from segquant_compile.capture import capture_graphs
from segquant_compile.compiled import unwrap
from segquant_compile.config import QuantConfig
from segquant_compile.options import resolve_options
from segquant_compile.lowering.site_lowering import KeptFloat
from segquant_compile.passes import build_plan, merge
from segquant_compile.passes.site_rules import lower_site, skip_pattern
from segquant_compile.report import Report

OUTSIDE_BLOCKS = ("outside the blocks compiled in place (regional compilation compiles the repeated blocks "
                  "only): runs in float")
UNREACHED = ("never reached a segquant graph: dynamo ran this module's frame eagerly (a graph break "
             "it could not resume from, a skipped frame, or the recompile limit)")


def explain(model, *args, options: dict | None = None, **kwargs) -> Report:
    """Trace `model(*args, **kwargs)` with dynamo and report every linear site: its SegLinear
    segments, DualScale decision and the graph evidence. Works on `meta`-device models. A
    segquant-compiled model is planned with the options it was compiled with."""
    if not callable(model):
        raise TypeError(f"segquant_compile.explain needs a callable model (an nn.Module or function), "
                        f"got {type(model).__name__}")
    model, options = unwrap(model, options)
    config = resolve_options(options)
    graphs = capture_graphs(model, args, kwargs)
    plan = merge([build_plan(gm, config.activation_set, config.seglinear, graph_index=i)
                  for i, (gm, _) in enumerate(graphs)])
    lowered = {s.name: lower_site(s, config) for s in plan}
    fallbacks = {name: lo.reason for name, lo in lowered.items() if isinstance(lo, KeptFloat)}
    _warn_unused_skips(config, [s.name for s in plan])
    return Report(plan, config, n_graphs=len(graphs), model=type(model).__name__, fallbacks=fallbacks,
                  planned={name: lo for name, lo in lowered.items() if not isinstance(lo, KeptFloat)})


def report(compiled) -> Report:
    """The plan of a segquant-compiled model as it runs: every site of every graph compiled so
    far under its full module path, which are quantized (format, steps, SQNR on calibration data)
    and why the others stay float, including linear modules that never reached a segquant graph."""
    from segquant_compile.compiled import find
    from segquant_compile.passes import Plan
    found = find(compiled)
    config = found.config or (found.runners[0].config if found.runners else QuantConfig())
    plan = Plan(tuple(row.site for row in found.rows),
                tuple(g for r in found.runners for g in r.plan.graphs), tuple(found.float_calls))
    # one reason per module: a module a graph kept float is listed with that reason only
    reached = {id(row.weight) for row in found.rows} | found.float_weights
    kinds = {name: "linear" if isinstance(m, torch.nn.Linear) else "conv2d" for name, m in found.model.named_modules()
             if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)) and id(m.weight) not in reached}
    unreached = dict.fromkeys(kinds, OUTSIDE_BLOCKS if found.regional else UNREACHED)
    names = [row.site.name for row in found.rows] + list(unreached)
    _warn_unused_skips(config, names)
    return Report(plan, config, n_graphs=len(found.runners), model=type(found.model).__name__,
                  fallbacks={row.site.name: row.reason for row in found.rows if row.reason is not None},
                  states={row.site.name: row.state for row in found.rows if row.state is not None},
                  unreached=unreached, unreached_kinds=kinds, calibration=registry.SUMMARIES.get(found.model))


def _warn_unused_skips(config: QuantConfig, names) -> None:
    for pattern in config.skip:
        if not any(skip_pattern(n, (pattern,)) for n in names):
            warnings.warn(f"segquant: skip pattern {pattern!r} matches no linear site", stacklevel=3)
