"""sensitivity(): for every site and format, the model output error when only that site is
quantized (Qua2SeDiMo, arXiv 2412.14628, with the error measured instead of predicted by a GNN),
and the site's own output SQNR on its real input rows.

The model is compiled once with a private backend whose callable per dynamo graph (`_Graph`) runs
the float graph, or, while a Probe's target names one of its sites, that graph converted with
just this site lowered at one format (cached): no recompile per (site, format), and every other
op runs the same float graph module as the reference (no Inductor), so the difference is that
site's alone."""
from __future__ import annotations

import dataclasses

import torch
from torch.utils._pytree import tree_leaves

from segquant_compile.capture import lifted_recompile_limits, private_compile
from segquant_compile.compiled import module_paths, site_path, unwrap
from segquant_compile.config import QuantConfig
from segquant_compile.options import resolve_options
from segquant_compile.lowering.formats import Format, FormatChoice
from segquant_compile.lowering.site_lowering import KeptFloat, SiteLowering
from segquant_compile.op_types import block_of, op_type
from segquant_compile.passes import build_plan
from segquant_compile.passes.site_rules import lower_site
from segquant_compile.passes.rewrite import convert, prepare
from segquant_compile.sensitivity_report import Sensitivity, SiteSensitivity
from segquant_compile.site_params import float_weight
from segquant_compile.site_states import placeholder_index
from segquant_compile.state import QuantState

__all__ = ["DEFAULT_FORMATS", "Probe", "Sensitivity", "sensitivity"]

DEFAULT_FORMATS = ("int8", "w4a8")


def sensitivity(model, inputs=None, formats=DEFAULT_FORMATS, options: dict | None = None,
                progress: bool = True, run=None) -> Sensitivity:
    """Measure every quantizable site of `model` at every format, one site at a time.

    `inputs`: one call's positional args (a tuple; a dict is taken as keyword args), or a list of
    such calls (e.g. several timesteps). Per (site, format): `error`, the relative noise power of
    the model output, sum ||y_q - y_f||^2 / sum ||y_f||^2 over the floating output tensors of a
    call, averaged over the calls, with every other site float; and the site's own output SQNR
    on its sampled input rows. A format the site cannot take is recorded with the reason.

    `run` instead of `inputs`: a function of the model (e.g. a whole sampling run) whose floating
    outputs are compared. The error is then that of the final samples, every step's error
    compounded through the sampler, the measure a mixed allocation is judged by: one call's
    output error ranks sites differently (a single-call error weighs nothing of the propagation).
    Activations are measured dynamic (per token), whatever the options ask. Needs real weights. A
    segquant-compiled model is measured with the options it was compiled with (unless given)."""
    model, options = unwrap(model, options)
    model = _real_module(model)
    formats = tuple(formats)
    unknown = [f for f in formats if not FormatChoice.valid(f)]
    if unknown or not formats:
        raise ValueError(f"segquant.sensitivity: unknown format(s) {unknown}; formats: {list(Format.values())}, "
                         f"each optionally with a low-rank branch ('w4a8+r32')")
    formats = tuple(str(FormatChoice.parse(f)) for f in formats)
    config = resolve_options(options)
    notes = ["activations measured dynamic (per token)" +
             ("; the options ask static: static steps need calibration, not measured here"
              if config.activations == "static" else "")]
    # each site measured alone at each format: per-site formats and GPTQ's calibration do not apply
    # (format: each one in turn, _format_config)
    config = config.replace(activations="dynamic", smooth=None, format="int8", formats=(), budget=(),
                            sensitivity=None, weight_rounding="rtn")
    if (inputs is None) == (run is None):
        raise ValueError("segquant.sensitivity: give `inputs` (the calls) or `run` (a function of the model), one of them")
    if run is not None and not callable(run):
        raise TypeError(f"segquant.sensitivity: `run` must be a function of the model, got {type(run).__name__}")
    calls = _calls(inputs) if run is None else [run]
    if run is not None:
        notes.append("error measured on the outputs of `run` (a whole run per site and format)")
    from tqdm.auto import tqdm
    with lifted_recompile_limits(), torch.no_grad():
        probe = Probe(model, config, formats)
        reference = probe.record(calls)
        pairs = [(name, f) for name in probe.sites for f in formats if probe.measurable(name, f)]
        error: dict[tuple[str, str], float] = {}
        for name, fmt in tqdm(pairs, desc="segquant sensitivity", unit="site x format", disable=not progress):
            error[name, fmt] = relative_error(reference, probe.outputs(name, fmt, calls))
        rows = [_row(probe, name, site, numel, formats, error) for name, (site, numel) in probe.sites.items()]
        probe.close()
    return Sensitivity(model=type(model).__name__, formats=formats, calls=len(calls), sites=rows,
                       notes=tuple(notes))


def _row(probe: "Probe", name: str, site, numel: int, formats, error) -> SiteSensitivity:
    measured = [f for f in formats if (name, f) in error]
    return SiteSensitivity(
        name=name, op_type=op_type(name), block=block_of(name), kind=site.kind, in_features=site.in_features,
        out_features=site.out_features, weight_numel=numel, error={f: error[name, f] for f in measured},
        site_sqnr_db={f: probe.site_sqnr(name, f) for f in measured},
        seconds={f: probe.seconds(name, f) for f in ([*measured, "float"] if measured else [])},
        not_applicable={f: probe.reason(name, f) for f in formats if f not in measured})


def min_seconds(fn, repeats: int = 3) -> float:
    """The fastest of a few timed calls after one warm-up (a cost model's GEMM time)."""
    import time
    fn()
    best = float("inf")
    for _ in range(repeats):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t)
    return best


def relative_error(reference: list[list[torch.Tensor]], outputs: list[list[torch.Tensor]]) -> float:
    """The mean over calls of sum ||y_q - y_f||^2 / sum ||y_f||^2 over the call's output tensors
    (float64). Per call, then averaged: every timestep weighs the same, where pooled sums would
    be ruled by the calls whose output is largest (with EDM preconditioning, one end of the
    noise schedule)."""
    errors = []
    for fs, qs in zip(reference, outputs):
        noise = sum(float((q.double() - f.double()).pow(2).sum()) for f, q in zip(fs, qs))
        power = sum(float(f.double().pow(2).sum()) for f in fs)
        errors.append(noise / power if power > 0 else (0.0 if noise == 0 else float("inf")))
    return sum(errors) / len(errors)


def _real_module(model) -> torch.nn.Module:
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"segquant.sensitivity needs an nn.Module (its module paths name the sites), got "
                        f"{type(model).__name__}")
    meta = next((n for n, t in (*model.named_parameters(), *model.named_buffers()) if t.is_meta), None)
    if meta is not None:
        raise ValueError(f"segquant.sensitivity needs real weights: {meta} is on the meta device (it measures "
                         f"quantization error by running the model; explain() and `segquant inspect` work on meta)")
    return model


def _calls(inputs) -> list:
    """One function of the model per call: a tuple (positional args) or dict (keyword args) is one
    call, a list is several."""
    def one(c):
        if isinstance(c, dict):
            return lambda m: m(**c)
        if isinstance(c, tuple):
            return lambda m: m(*c)
        raise TypeError(f"segquant.sensitivity: a call's inputs are a tuple of positional args (or a dict of "
                        f"keyword args), got {type(c).__name__}")
    calls = [one(c) for c in inputs] if isinstance(inputs, list) else [one(inputs)]
    if not calls:
        raise ValueError("segquant.sensitivity: no inputs (give at least one call)")
    return calls


def _format_config(config: QuantConfig, fmt: str) -> QuantConfig | KeptFloat:
    """The options at this format, or why they cannot take it (e.g. asymmetric with fp8)."""
    choice = FormatChoice.parse(fmt)   # a low-rank variant: the format with its branch
    try:
        return config.replace(format=choice.format, low_rank=choice.low_rank)
    except ValueError as e:
        return KeptFloat(str(e))


def _floats(out) -> list[torch.Tensor]:
    return [t.detach() for t in tree_leaves(out) if isinstance(t, torch.Tensor) and t.is_floating_point()]


class Probe:
    """`model` compiled once with a private backend (no registered name): `record` runs it float,
    sampling every site's input rows; `outputs(name, fmt, calls)` runs it with that one site
    quantized. A call is a function of the model (`_calls`, or sensitivity's `run`). Sites are named by full module path (`site_path` of the weight's name)."""

    def __init__(self, model: torch.nn.Module, config: QuantConfig, formats: tuple[str, ...]):
        self.config = config
        self.configs = {f: _format_config(config, f) for f in formats}
        self.paths = module_paths(model)
        self.recording = False
        self.target: tuple[str, str] | None = None        # (site name, format) being measured
        self.sites: dict[str, tuple] = {}                 # name -> (LinearSite, weight numel), in graph order
        # (name, format) -> {lowering: state}: one lowering unless a weight's sites in two graphs differ
        self.states: dict[tuple[str, str], dict[SiteLowering, QuantState]] = {}
        self.reasons: dict[tuple[str, str], str] = {}
        self.biases: dict[int, torch.Tensor | None] = {}   # id(state) -> its site's bias (the SQNR's reference)
        self.timings: dict[tuple[str, str], float] = {}    # (name, format or "float") -> GEMM seconds
        self.graphs: list[_Graph] = []
        self.compiled = private_compile(model, self._backend, dynamic=False)

    def _backend(self, gm, example_inputs, **_):
        graph = _Graph(self, gm, example_inputs)
        self.graphs.append(graph)
        return graph

    def name(self, site, weight: torch.Tensor) -> str | None:
        """The full module path of the site (its suffix `#2` kept), None for a weight not the model's."""
        path = self.paths.get(id(weight))
        return None if path is None else site_path(path) + (site.name[site.name.index("#"):] if "#" in site.name
                                                            else "")

    def run(self, call) -> list[torch.Tensor]:
        """The floating outputs of `call`, a function of the model (one call, or a whole run)."""
        return _floats(call(self.compiled))

    def record(self, calls) -> list[list[torch.Tensor]]:
        """The float outputs of every call; every site's states observe their input rows, then
        choose their schemes (dualscale="auto") and measure their own SQNR on them."""
        self.recording = True
        try:
            reference = [self.run(c) for c in calls]
        finally:
            self.recording = False
        for (name, fmt), states in self.states.items():
            for state in states.values():
                bias = self.biases.get(id(state))
                rows = state.measure(bias)
                self.timings[name, fmt] = min_seconds(lambda: state.run_rows(rows, bias))
                if (name, "float") not in self.timings:
                    w = float_weight(state.weight(), state.site)
                    self.timings[name, "float"] = min_seconds(lambda: rows @ w.t())
                state.discard_statistics()
        return reference

    def meet(self, graph: "_Graph", args) -> None:
        """States for the sites of this call's weights (created on first sight, with the bias that
        their SQNR needs), and the reasons of the formats a site cannot take."""
        for i, site in enumerate(graph.plan):
            w = graph.weights[i]
            name = self.name(site, args[w]) if w is not None else None
            if name is None:
                continue
            self.sites.setdefault(name, (site, args[w].numel()))
            for fmt, lowering in graph.lowerings[i].items():
                if isinstance(lowering, KeptFloat):
                    self.reasons.setdefault((name, fmt), lowering.reason)
                    continue
                states = self.states.setdefault((name, fmt), {})
                if lowering not in states:
                    states[lowering] = QuantState(dataclasses.replace(site, name=name), lowering, args[w])
                    b = graph.biases[i]
                    self.biases[id(states[lowering])] = args[b] if b is not None else None

    def measurable(self, name: str, fmt: str) -> bool:
        return (name, fmt) in self.states

    def reason(self, name: str, fmt: str) -> str:
        return self.reasons[name, fmt]

    def site_sqnr(self, name: str, fmt: str) -> float:
        return next(iter(self.states[name, fmt].values())).sqnr

    def seconds(self, name: str, fmt: str) -> float:
        """The site's GEMM at `fmt` ("float": the float matmul), activation quantization
        included, on its sampled rows, timed on this machine."""
        return self.timings[name, fmt]

    def state(self, name: str, fmt: str, lowering: SiteLowering) -> QuantState:
        return self.states[name, fmt][lowering]

    def outputs(self, name: str, fmt: str, calls) -> list[list[torch.Tensor]]:
        self.target = (name, fmt)
        try:
            return [self.run(c) for c in calls]
        finally:
            self.target = None

    def close(self) -> None:
        """Drop packed weights and converted graphs: dynamo's cache keeps the graphs alive."""
        self.states.clear()
        self.biases.clear()
        for graph in self.graphs:
            graph.converted.clear()


class _Recorder(torch.nn.Module):
    """Inserted before site `index` (passes.rewrite.prepare): its states observe the input rows."""

    def __init__(self, probe: Probe, graph: "_Graph", index: int):
        super().__init__()
        self.probe, self.graph, self.index = probe, graph, index

    def forward(self, x, weight):
        name = self.probe.name(self.graph.plan.sites[self.index], weight)
        for fmt in self.graph.lowerings[self.index]:
            for state in self.probe.states.get((name, fmt), {}).values():
                state.observe(x)


class _Graph:
    """The private backend's callable for one dynamo graph: float, observed while recording, or
    with the probe's target site quantized (the converted graph cached per site and lowering)."""

    def __init__(self, probe: Probe, gm: torch.fx.GraphModule, example_inputs):
        self.probe, self.gm = probe, gm
        self.plan = build_plan(gm, probe.config.activation_set, probe.config.seglinear)   # inlines into gm
        index = placeholder_index(gm)
        self.weights = [index.get(s.weight_node) for s in self.plan]
        self.biases = [index.get(s.bias_node) if s.bias_node else None for s in self.plan]
        self.lowerings = [self._lower(s, w, example_inputs) for s, w in zip(self.plan, self.weights)]
        self.observed = prepare(gm, list(self.plan), [_Recorder(probe, self, i) for i in range(len(self.plan))])
        self.converted: dict[tuple[int, SiteLowering], tuple] = {}

    def _lower(self, site, w: int | None, example_inputs) -> dict[str, SiteLowering | KeptFloat]:
        weight = example_inputs[w] if w is not None else None
        if not isinstance(weight, torch.Tensor):
            return {f: KeptFloat("weight is not a graph input") for f in self.probe.configs}
        return {f: c if isinstance(c, KeptFloat) else lower_site(site, c, weight.device.type, weight.dtype)
                for f, c in self.probe.configs.items()}

    def __call__(self, *args):
        probe = self.probe
        with torch.no_grad():
            if probe.recording:
                probe.meet(self, args)
                return self.observed(*args)
            if probe.target is not None:
                name, fmt = probe.target
                for i, site in enumerate(self.plan):
                    lowering = self.lowerings[i][fmt]
                    if isinstance(lowering, SiteLowering) and probe.name(site, args[self.weights[i]]) == name:
                        return self._quantized(i, lowering, probe.state(name, fmt, lowering), args)
            return self.gm(*args)

    def _quantized(self, i: int, lowering: SiteLowering, state: QuantState, args):
        lowering = state.applied_to(lowering)   # with the schemes measured while recording
        key = (i, lowering)
        if key not in self.converted:
            self.converted[key] = convert(self.gm, [(self.plan.sites[i], lowering)])
        gm, extras = self.converted[key]
        return gm(*args, *(state.graph_input(f) for _, f in extras))
