"""explain(): the plan for a model, before compiling anything."""
from __future__ import annotations

from segquant_compile.capture import capture_graphs
from segquant_compile.config import QuantConfig
from segquant_compile.passes import build_plan, merge
from segquant_compile.report import Report
from segquant_compile.state import REGISTRY, fallback_reason, skip_pattern


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
    skipped = {s.name for s in plan if skip_pattern(s.name, config)}
    fallbacks = {s.name: r for s in plan if (r := fallback_reason(s, None, config)) is not None}
    return Report(plan, config, n_graphs=len(graphs), skipped=skipped, model=type(model).__name__,
                  fallbacks=fallbacks)


def report(compiled) -> Report:
    """The plan of a segquant-compiled model as it runs: every graph compiled so far, which sites
    are quantized (format, steps, SQNR on calibration data) and why the others stay float."""
    from segquant_compile.calibration import compiled_options
    from segquant_compile.config import QuantConfig
    from segquant_compile.runtime import RUNNERS
    model = getattr(compiled, "_orig_mod", compiled)
    tensors = [*model.parameters(), *model.buffers()]
    backend, options = compiled_options(compiled)
    wanted = QuantConfig.from_options(options) if backend == "segquant" else None
    runners = sorted((r for r in RUNNERS if (wanted is None or r.config == wanted) and r.saw(tensors)), key=id)
    if not runners:
        raise RuntimeError("segquant_compile.report(): no segquant graph has run for this model yet; "
                           "call the compiled model once (or use explain() before compiling)")
    plan = merge([r.plan for r in runners])
    config = runners[0].config
    fallbacks = {name: why for r in runners for name, why in r.fallbacks.items()}
    states = {st.name: st for st in REGISTRY.states_for(tensors) if st.config == config}
    skipped = {s.name for s in plan if skip_pattern(s.name, config)}
    return Report(plan, config, n_graphs=len(runners), skipped=skipped,
                  model=type(model).__name__, fallbacks=fallbacks, states=states)

