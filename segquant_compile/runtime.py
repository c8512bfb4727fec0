"""GraphRunner: what the segquant backend returns for one dynamo graph.

It owns the graph's quantized sites (their QuantStates live in the shared registry), compiles
the quantized graph once (inside the backend call, where dynamo's shapes are live; static steps
are graph inputs, so calibration later needs no recompile), runs the float graph with observers
while calibrating, and re-packs a weight the user replaced or edited before it is used."""
from __future__ import annotations

import weakref

import torch

from segquant_compile import calibration
from segquant_compile.config import QuantConfig
from segquant_compile.passes import Plan
from segquant_compile.passes.rewrite import observe_sites, quantize_sites
from segquant_compile.state import REGISTRY, QuantState, fallback_reason

RUNNERS: "weakref.WeakSet[GraphRunner]" = weakref.WeakSet()


def lowering_of(site, config: QuantConfig) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """K-segment bounds and DualScale flags per segment for a site under a config."""
    seg = site.input_segments if config.seglinear else None
    bounds = seg.bounds if seg is not None else (0, site.in_features)
    sources = site.dualscale.sources if len(site.dualscale.sources) == len(bounds) - 1 else (None,)
    dual = tuple(int(config.dualscale and s is not None) for s in sources)
    return bounds, dual


def _static_fake(t: torch.Tensor) -> torch.Tensor:
    """Our extra inputs have fixed shapes: fakeify them as static in dynamo's fake mode so they
    add no symbols (symbols without a source break guard building)."""
    from torch._guards import TracingContext
    ctx = TracingContext.try_get()
    if ctx is None or ctx.fake_mode is None:
        return t
    return ctx.fake_mode.from_tensor(t, static_shapes=True)


class GraphRunner:
    def __init__(self, gm: torch.fx.GraphModule, example_inputs: list, plan: Plan, config: QuantConfig):
        self.gm, self.plan, self.config = gm, plan, config
        index = {n.name: i for i, n in enumerate(n for n in gm.graph.nodes if n.op == "placeholder")}
        self.sites: list[tuple] = []          # (site, state, weight index, bias index)
        self.fallbacks: dict[str, str] = {}
        for site in plan:
            w_idx = index.get(site.weight_node)
            weight = example_inputs[w_idx] if w_idx is not None else None
            reason = "weight is not a graph input" if weight is None else fallback_reason(site, weight, config)
            if reason is not None:
                self.fallbacks[site.name] = reason
                continue
            k_bounds, dual = lowering_of(site, config)
            state = REGISTRY.get(weight, (config, k_bounds, dual))
            if state is None:
                state = QuantState(site, weight, config, k_bounds, dual)
                REGISTRY.put(weight, (config, k_bounds, dual), state)
            b_idx = index.get(site.bias_node) if site.bias_node else None
            state.bias = example_inputs[b_idx] if b_idx is not None else None
            self.sites.append((site, state, w_idx, b_idx))
        if config.load:
            from segquant_compile.persist import load_states
            load_states(config.load, [(s, st, example_inputs[w]) for s, st, w, _ in self.sites], config)
        self.weight_ids = {id(example_inputs[w]) for _, _, w, _ in self.sites}
        self.calls = 0
        self._observer = None
        self._compiled, self._extras = self._compile_quantized(example_inputs)
        if config.release_float_weights and self.ready:
            self.release_float_weights(example_inputs)
        RUNNERS.add(self)

    # ------------------------------------------------------------------ building
    @property
    def states(self) -> list[QuantState]:
        return [st for _, st, _, _ in self.sites]

    @property
    def ready(self) -> bool:
        return self.config.activations == "dynamic" or all(st.frozen for st in self.states)

    def _compile_quantized(self, example_inputs):
        static = self.config.activations == "static"
        smooth = self.config.smooth is not None
        gm, extras = quantize_sites(self.gm, [(s, st.k_bounds, st.dual, smooth) for s, st, _, _ in self.sites],
                                    static)
        states = {st.name: st for st in self.states}
        extras = [(states[name], field) for name, field in extras]
        self.quantized_gm = gm
        if not self.config.inductor:
            return gm.forward, extras
        from torch._inductor.compile_fx import compile_fx
        patches = torch._inductor.list_mode_options(self.config.mode) if self.config.mode != "default" else {}
        inputs = list(example_inputs) + [_static_fake(st.graph_input(f)) for st, f in extras]
        return compile_fx(gm, inputs, config_patches=patches), extras

    def release_float_weights(self, args) -> int:
        return sum(st.release(args[w]) for _, st, w, _ in self.sites if not st.released)

    # ------------------------------------------------------------------ running
    def __call__(self, *args):
        self.calls += 1
        session = calibration.active()
        if session is not None and session.owns(self):
            return self._calibrate(args, session)
        if not self.ready:
            if self.config.calibration_steps:
                out = self._calibrate(args, None)
                if self.calls >= self.config.calibration_steps:
                    calibration.freeze(self.states)
                    if self.config.release_float_weights:
                        self.release_float_weights(args)
                return out
            raise RuntimeError(
                "segquant: static activations need calibration before use: run the compiled model inside "
                "`with segquant_compile.calibrate(compiled): ...`, or set options "
                "{'calibration_steps': N} or {'load': path}")
        for _, st, w, b in self.sites:
            if not st.is_current(args[w]):
                st.refresh(args[w])
                REGISTRY.put(args[w], (st.config, st.k_bounds, st.dual), st)
            if b is not None:
                st.bias = args[b]
        return self._compiled(*args, *(st.graph_input(f) for st, f in self._extras))

    def _calibrate(self, args, session):
        if self._observer is None:
            by_name = {st.name: st for st in self.states}

            def observe(name, x):
                by_name[name].observe(x)
            self._observer = observe_sites(self.gm, [s for s, _, _, _ in self.sites], observe)
        for _, st, w, _ in self.sites:
            if not st.is_current(args[w]):
                st.refresh(args[w])
        if session is not None:
            session.touch(self)
        with torch.no_grad():
            return self._observer(*args)
