"""GraphRunner: what the segquant backend returns for one dynamo graph.

It compiles the quantized graph once (inside the backend call, where dynamo's shapes are live;
packed weights and static steps are extra graph inputs, so calibration later needs no
recompile). Dynamo reuses a graph for every module instance of the same code, with weights as
inputs, so each call looks its weights up in the shared registry: a weight seen before reuses
its QuantState, an edited one is re-packed, a new one (replaced parameter, another instance)
gets a new state."""
from __future__ import annotations

import weakref

import torch

from segquant_compile import calibration
from segquant_compile.config import QuantConfig
from segquant_compile.passes import Plan
from segquant_compile.passes.rewrite import observe_sites, quantize_sites
from segquant_compile.state import REGISTRY, QuantState, fallback_reason

RUNNERS: "weakref.WeakSet[GraphRunner]" = weakref.WeakSet()
PROLOGUE_MAX_ROWS = 256


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
        self.sites: list[tuple] = []          # (site, weight index, bias index, lowering key)
        self.fallbacks: dict[str, str] = {}
        for site in plan:
            w_idx = index.get(site.weight_node)
            weight = example_inputs[w_idx] if w_idx is not None else None
            reason = "weight is not a graph input" if weight is None else fallback_reason(site, weight, config)
            if reason is not None:
                self.fallbacks[site.name] = reason
                continue
            b_idx = index.get(site.bias_node) if site.bias_node else None
            self.sites.append((site, w_idx, b_idx, (config, *lowering_of(site, config))))
        self.position = {site.name: i for i, (site, *_) in enumerate(self.sites)}
        self.plan_weights = [index[s.weight_node] for s in plan if s.weight_node in index]
        # weights this graph has run with, held weakly: ids alone are reused after a model dies
        self.seen: "weakref.WeakValueDictionary[int, torch.Tensor]" = weakref.WeakValueDictionary()
        self._remember(example_inputs)
        self._refs: list = []          # weakrefs to the weights of the cached states (ids get reused)
        self._states: list[QuantState] = []
        states = self.states_for(example_inputs)
        self._observer = None
        self._compiled, self._extras = self._compile_quantized(example_inputs, states)
        RUNNERS.add(self)   # float weights are released at the first quantized call: dynamo keeps
        # parameter storages fixed while a backend runs

    # ------------------------------------------------------------------ states
    def states_for(self, args) -> list[QuantState]:
        """The QuantStates of this call's weights (created, re-packed or loaded as needed)."""
        if len(self._refs) != len(self.sites) or any(r() is not args[w] for r, (_, w, _, _) in
                                                       zip(self._refs, self.sites)):
            states = []
            for site, w, _, lowering in self.sites:
                state = REGISTRY.get(args[w], lowering)
                if state is None:
                    state = QuantState(site, args[w], self.config, lowering[1], lowering[2])
                    REGISTRY.put(args[w], lowering, state)
                    if self.config.load:
                        from segquant_compile.persist import load_states
                        load_states(self.config.load, [(site, state, args[w])], self.config)
                states.append(state)
            self._refs = [weakref.ref(args[w]) for _, w, _, _ in self.sites]
            self._states = states
            self._remember(args)
        for (_, w, b, _), state in zip(self.sites, self._states):
            if not state.is_current(args[w]):
                state.refresh(args[w])
            state.bias = args[b] if b is not None else None
        return self._states

    def _remember(self, args) -> None:
        for i in self.plan_weights:
            self.seen[id(args[i])] = args[i]

    def saw(self, tensors) -> bool:
        """Has this graph run with any of these tensors (by identity)?"""
        return any(self.seen.get(id(t)) is t for t in tensors)

    def _ready(self, states) -> bool:
        return self.config.activations == "dynamic" or all(st.frozen for st in states)

    def _release(self, args, states) -> int:
        return sum(st.release(args[w]) for (_, w, _, _), st in zip(self.sites, states) if not st.released)

    # ------------------------------------------------------------------ building
    def _compile_quantized(self, example_inputs, states):
        static = self.config.activations == "static"
        smooth = self.config.smooth is not None
        if self.config.autotune_cache:
            from segquant_compile.lowering import autotune
            autotune.set_cache_dir(self.config.autotune_cache)
        specs = []
        for (site, w, _, _), st in zip(self.sites, states):
            cuda = example_inputs[w].is_cuda
            # static steps at small M: quantize inside the kernel rather than in a separate pass
            prologue = (static and cuda and self.config.format == "int8" and site.rows is not None
                        and site.rows <= PROLOGUE_MAX_ROWS)
            specs.append((site, st.k_bounds, st.dual, smooth, prologue))
            if cuda and site.rows is not None:
                self._pretune(site, st, prologue, self.config.format, example_inputs[w].device)
        gm, extras = quantize_sites(self.gm, specs, static, self.config.format)
        extras = [(self.position[name], field) for name, field in extras]
        self.quantized_gm = gm
        if not self.config.inductor:
            return gm.forward, extras
        from torch._inductor.compile_fx import compile_fx
        patches = torch._inductor.list_mode_options(self.config.mode) if self.config.mode != "default" else {}
        extra = [states[i].graph_input(f) for i, f in extras]
        if self.config.mode == "reduce-overhead":
            # CUDA graph trees copy non-static inputs at every replay: ours are weights and steps
            for t in extra:
                if t.is_cuda:
                    torch._dynamo.mark_static_address(t)
        inputs = list(example_inputs) + [_static_fake(t) for t in extra]
        return compile_fx(gm, inputs, config_patches=patches), extras

    @staticmethod
    def _pretune(site, state, prologue, fmt, device):
        """Tune at compile time (never inside a CUDA graph capture): the kernel then only reads
        the cache."""
        from segquant_compile.lowering import autotune
        variant = autotune.variant_name(fmt, any(state.dual), prologue)
        autotune.ensure(site.rows, site.out_features, site.in_features, variant, device)

    # ------------------------------------------------------------------ running
    def __call__(self, *args):
        states = self.states_for(args)
        session = calibration.active()
        if session is not None and session.owns({id(args[i]) for i in self.plan_weights}):
            return self._calibrate(args, states, session)
        if not self._ready(states):
            if self.config.calibration_steps:
                out = self._calibrate(args, states, None)
                if min(st.observed_calls for st in states) >= self.config.calibration_steps:
                    calibration.freeze(states)
                return out
            missing = next(st.name for st in states if not st.frozen)
            raise RuntimeError(
                f"segquant: static activations need calibration before use ({missing} has none: a model "
                f"not calibrated yet, or a weight replaced since): run the compiled model inside "
                f"`with segquant_compile.calibrate(compiled, recalibrate=True): ...`, or set options "
                f"{{'calibration_steps': N}} or {{'load': path}}")
        if self.config.release_float_weights:
            self._release(args, states)
        return self._compiled(*args, *(states[i].graph_input(f) for i, f in self._extras))

    def _calibrate(self, args, states, session):
        if self._observer is None:
            def observe(name, x):
                state = self._states[self.position[name]]
                if not state.frozen:   # calibrated sites keep their steps (recalibrate resets them)
                    state.observe(x)
            self._observer = observe_sites(self.gm, [site for site, *_ in self.sites], observe)
        if session is not None:
            session.touch([st for st in states if not st.frozen])
        with torch.no_grad():
            return self._observer(*args)
