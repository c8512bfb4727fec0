"""explain(): the plan for a model, before compiling anything."""
from __future__ import annotations

import fnmatch

from segquant_compile.capture import capture_graphs
from segquant_compile.config import QuantConfig
from segquant_compile.passes import build_plan, merge
from segquant_compile.report import Report


def explain(model, *args, options: dict | None = None, **kwargs) -> Report:
    """Trace `model(*args, **kwargs)` with dynamo and report every linear site: its SegLinear
    segments, DualScale decision and the graph evidence. Works on `meta`-device models."""
    if not callable(model):
        raise TypeError(f"segquant_compile.explain needs a callable model (an nn.Module or function), "
                        f"got {type(model).__name__}")
    config = QuantConfig.from_options(options)
    graphs = capture_graphs(model, args, kwargs)
    plans = [build_plan(gm, config.activation_set, config.seglinear, graph_index=i)
             for i, (gm, _) in enumerate(graphs)]
    plan = merge(plans)
    skipped = {s.name for s in plan if any(fnmatch.fnmatch(s.name, p) for p in config.skip)}
    return Report(plan, config, n_graphs=len(graphs), skipped=skipped,
                  model=type(model).__name__)
