"""GraphRunner: what the segquant backend returns for one dynamo graph. It only dispatches.

Dynamo reuses a graph for every module instance of the same code, with weights as inputs, so
each call looks its weights' QuantStates up (states_of_call); the quantized graph is compiled
once per set of calibration decisions (converted: normally once, in the backend call; again only
when calibration measures schemes or turns a site dynamic). Its sites and their states come from
site_states.py; the runner keeps no per-call state."""
from __future__ import annotations

import contextlib
import dataclasses
import threading
import warnings
import weakref

import torch

from segquant_compile import calibration, inductor_cache, registry
from segquant_compile.compiled import compiled_root_on_stack, full_site_names
from segquant_compile.config import QuantConfig
from segquant_compile.lowering.site_lowering import KeptFloat
from segquant_compile.passes import Plan
from segquant_compile.passes.rewrite import convert, prepare
from segquant_compile.passes.site_rules import lower_site
from segquant_compile.registry import state_key
from segquant_compile.site_states import (SiteEntry, create_state, mark_stale_steps, placeholder_index, plan_entries,
                                          release_float_weights)
from segquant_compile.lifecycle import Phase
from segquant_compile.state import QuantState

# first calls decide on their own rows (dynamic "auto" schemes, GPTQ, smoothing) one at a time:
# two threads making the first call of the same weights at once would pool their rows
FIRST_CALL = threading.RLock()


def _ref(args, i: int | None):
    return weakref.ref(args[i]) if i is not None and isinstance(args[i], torch.Tensor) else None


class ObservedInputs(threading.local):
    """The activations observed in the current call of a graph (per thread), by graph node: sites
    that read the same node (q, k and v of one input) collect one set of statistics, one Hessian."""

    def __init__(self):
        self.by_input: dict[tuple, QuantState] = {}


class Observer(torch.nn.Module):
    """Records a site's activation statistics into the state of the weight it is called with."""

    def __init__(self, key: tuple, input_node: str, seen: ObservedInputs):
        super().__init__()
        self.key, self.input_node, self.seen = key, input_node, seen

    def forward(self, x, weight):
        state = registry.STATES.get(weight, self.key)
        # a site observes while its rows still have something to decide
        if state is None or not state.pending:
            return
        key = (self.input_node, state.stats.spec, state.phase)   # the same activation, collected alike
        first = self.seen.by_input.get(key)
        if first is not None and first is not state and state.share_statistics(first):
            return
        self.seen.by_input[key] = state
        state.observe(x)


def _fake(t, static: bool = False):
    """Inputs for a compile: fake tensors of dynamo's fake mode (no storage kept alive; our extra
    inputs static, so they add no symbols)."""
    from torch._guards import TracingContext
    ctx = TracingContext.try_get()
    if ctx is None or ctx.fake_mode is None or not isinstance(t, torch.Tensor):
        return t
    return ctx.fake_mode.from_tensor(t, static_shapes=static) if static else ctx.fake_mode.from_tensor(t)


def _concrete(inputs) -> bool:
    """Real tensors and ints (not symbolic sizes or fake tensors): the graph can run on them."""
    from torch._subclasses.fake_tensor import FakeTensor
    return all(not isinstance(t, (torch.SymInt, torch.SymFloat, FakeTensor)) for t in inputs)


class _InferenceOnly(torch.autograd.Function):
    """Marks outputs computed by quantized GEMMs: backward raises a clear error."""

    @staticmethod
    def forward(ctx, x, anchor):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        raise RuntimeError("segquant: quantized models are inference-only; backward through a "
                           "segquant-compiled graph is not supported (train the float model, then compile)")


def _mark_inference_only(out, anchor: torch.Tensor):
    """Outputs that would need grad in float get a grad_fn whose backward raises (`anchor` is an
    input that requires grad: it is what makes them need it)."""
    if isinstance(out, torch.Tensor) and out.is_floating_point():
        return _InferenceOnly.apply(out, anchor)
    if isinstance(out, (list, tuple)):
        return type(out)(_mark_inference_only(o, anchor) for o in out)
    return out


class GraphRunner:
    def __init__(self, gm: torch.fx.GraphModule, example_inputs: list, plan: Plan, config: QuantConfig):
        from torch._guards import TracingContext
        index = placeholder_index(gm)
        self._plan_positions = tuple((index.get(s.weight_node), index.get(s.bias_node) if s.bias_node else None)
                                     for s in plan)
        plan = self._named_from_root(plan, example_inputs)
        self.gm, self.plan, self.config = gm, plan, config
        self.entries, self.fallbacks = plan_entries(plan, gm, example_inputs, config)
        self.weight_positions = tuple(e.weight for e in self.entries)
        self._float_positions = tuple(index.get(f.weight) if f.weight else None for f in plan.float_calls)
        # the parameters that tell one call's weights from another's: the quantized sites' first
        self._weights_of_call = tuple(dict.fromkeys(i for i in (
            *self.weight_positions, *(w for w, _ in self._plan_positions), *self._float_positions)
            if i is not None))
        # every planned site's weight, per set of weights this graph ran with (weakly): how
        # report/save tell a model's graphs and sites apart, by identity
        self.weight_sets: list[tuple] = []
        self.float_weight_sets: list[tuple] = []     # the same for the calls kept float (the report)
        self._by_weights: dict[tuple, tuple] = {}    # ids of a call's weights -> (weakrefs, states): a cache
        self._converted: dict[tuple, tuple] = {}     # lowerings -> (compiled fn, extra inputs)
        self._observer = None
        self._seen = ObservedInputs()
        self._lock = threading.Lock()
        self._tracing = TracingContext.try_get()     # for a later convert (a site turned dynamic)
        self._fake_inputs = [_fake(t) for t in example_inputs]
        if config.autotune_cache:
            from segquant_compile.lowering import autotune
            autotune.set_cache_dir(config.autotune_cache)
        states = self.states_of_call(example_inputs)
        if any(st.phase is Phase.AWAITING_FIRST_CALL for st in states) and _concrete(example_inputs) and \
                self._session(example_inputs) is None:
            self.choose_schemes(example_inputs, states)   # now, so the graph compiles once
        # a site awaiting calibration cannot run quantized yet, and the calibration's decisions
        # (schemes, smoothing) change the graph: it compiles on its first quantized call
        if not any(st.phase is Phase.AWAITING_CALIBRATION for st in states):
            self.converted(states)
        registry.RUNNERS.add(self)

    # ------------------------------------------------------------------ names
    def _full_names(self, plan, args) -> dict[str, str]:
        weights = {site.name: args[w] for site, (w, _) in zip(plan, self._plan_positions) if w is not None}
        return full_site_names(plan, weights, compiled_root_on_stack())

    def _named_from_root(self, plan: Plan, args) -> Plan:
        """Sites named by full module paths from the compiled model (a graph below it, after a
        graph break inside a block, names them relative to the block): `formats` and `skip`
        entries apply to exactly the sites they name."""
        names = self._full_names(plan, args)
        if not names:
            return plan
        return dataclasses.replace(plan, sites=tuple(dataclasses.replace(s, name=names.get(s.name, s.name))
                                                     for s in plan))

    def _check_shared_graph(self, args, names: dict[str, str]) -> None:
        """Dynamo reuses this graph for every instance of its block: new weights must take the
        lowering the options give their own full names (`names`), or the call is refused (a
        `formats` or `skip` entry naming one block's site would otherwise apply to every block)."""
        if not (self.config.formats or self.config.skip):
            return
        decided = {e.site.name: e.lowering.format for e in self.entries}
        for site, (w, _) in zip(self.plan, self._plan_positions):
            full = names.get(site.name)
            if full is None or full == site.name or w is None:
                continue
            own = lower_site(dataclasses.replace(site, name=full), self.config, args[w].device.type, args[w].dtype)
            own = None if isinstance(own, KeptFloat) else own.format
            if own != decided.get(site.name):
                raise RuntimeError(
                    f"segquant: options formats/skip give {full} {own or 'float'}, but it runs in the graph "
                    f"compiled for {site.name} ({decided.get(site.name) or 'float'}): dynamo reuses one graph "
                    f"for every instance of a block after a graph break. Give every block's site the same "
                    f"entry (a glob such as '*.{full.rsplit('.', 1)[-1]}'), or remove the graph break")

    # ------------------------------------------------------------------ states
    def states_of_call(self, args) -> tuple[QuantState, ...]:
        """This call's states, by the identity of its weights (every parameter the graph plans,
        float ones included: a new set is recorded for the report); edited weights are re-packed."""
        weights = [args[i] for i in self._weights_of_call]
        key = tuple(map(id, weights))
        hit = self._by_weights.get(key)
        if hit is None or any(r() is not w for r, w in zip(hit[0], weights)):
            names = {}
            if self.weight_sets:   # a graph shared with other weights (another instance of a block)
                names = self._full_names(self.plan, args)
                self._check_shared_graph(args, names)
            states = tuple(create_state(e, args[e.weight], args[e.bias] if e.bias is not None else None,
                                        self.config, names.get(e.site.name, e.site.name)) for e in self.entries)
            hit = (tuple(map(weakref.ref, weights)), states)
            self._by_weights[key] = hit
            self.weight_sets.append(tuple((_ref(args, w), _ref(args, b)) for w, b in self._plan_positions))
            self.float_weight_sets.append(tuple(_ref(args, i) for i in self._float_positions))
        edited = [(e, st) for e, st in zip(self.entries, hit[1]) if not st.is_current(args[e.weight])]
        for e, st in edited:
            st.refresh(args[e.weight])
        if edited:
            mark_stale_steps([st for _, st in edited], hit[1])
        return hit[1]

    def site_weights(self):
        """(site, weight, bias or None) for every planned site and every live set of weights this
        graph ran with (a site's own bias: a weight shared by two modules has two)."""
        for refs in list(self.weight_sets):
            for site, (w_ref, b_ref) in zip(self.plan, refs):
                w = w_ref() if w_ref is not None else None
                if w is not None:
                    yield site, w, b_ref() if b_ref is not None else None

    def float_call_weights(self):
        """(FloatCall, its parameter) for every call this graph keeps float and every live set of
        weights it ran with."""
        for refs in list(self.float_weight_sets):
            for call, ref in zip(self.plan.float_calls, refs):
                w = ref() if ref is not None else None
                if w is not None:
                    yield call, w

    # ------------------------------------------------------------------ graphs
    def converted(self, states) -> tuple:
        """The compiled quantized graph for these states (compiled on first need; again only
        for a state that calibration turned dynamic)."""
        key = tuple(st.decided for st in states)
        found = self._converted.get(key)
        if found is None:
            with self._lock:
                found = self._converted.get(key)
                if found is None:
                    found = self._converted[key] = self._convert(states)
        return found

    def _convert(self, states):
        # this graph's kernel choices (prologue, rows) with the numbers each state runs with
        lowerings = [st.applied_to(e.lowering) for e, st in zip(self.entries, states)]
        gm, extras = convert(self.gm, [(e.site, lo) for e, lo in zip(self.entries, lowerings)])
        for e, st, lo in zip(self.entries, states, lowerings):
            if st.packed.is_cuda and e.site.rows is not None and lo.conv is not None:
                from segquant_compile.lowering import triton_conv
                triton_conv.ensure(e.site.rows, e.site.out_features, lo.conv, lo.variant, st.packed.device)
            elif st.packed.is_cuda and e.site.rows is not None and lo.format in ("int8", "fp8"):
                # tune now, never inside a CUDA graph capture (w4a8 and weight-only kernels take
                # their first pruned config: no tuner for them yet, lowering/triton_formats.py)
                from segquant_compile.lowering.triton_gemm import ensure
                ensure(e.site.rows, e.site.out_features, e.site.in_features, lo.variant, st.packed.device)
        if not self.config.inductor:
            return gm.forward, extras
        extra = [states[i].graph_input(f) for i, f in extras]
        if self.config.mode == "reduce-overhead":
            # CUDA graph trees copy non-static inputs at every replay: ours are weights and steps
            for t in extra:
                if t.is_cuda:
                    torch._dynamo.mark_static_address(t)
        return self._compile(gm, extra), extras

    def _compile(self, gm, extra):
        from torch._guards import TracingContext, tracing
        from torch._inductor.compile_fx import compile_fx
        patches = torch._inductor.list_mode_options(self.config.mode) if self.config.mode != "default" else {}
        patches = {**patches, **inductor_cache.config_patches()}
        later = TracingContext.try_get() is None
        try:
            with tracing(self._tracing) if later else contextlib.nullcontext(), torch.no_grad():
                inputs = self._fake_inputs + [_fake(t, static=True) for t in extra]
                return compile_fx(gm, inputs, config_patches=patches)
        except Exception as e:   # a compile outside dynamo's call failed: run the graph as it is
            if not later:
                raise
            warnings.warn(f"segquant: recompiling a graph after calibration failed ({type(e).__name__}: {e}); "
                          f"it runs uncompiled", stacklevel=3)
            return gm.forward

    # ------------------------------------------------------------------ running
    def __call__(self, *args):
        states = self.states_of_call(args)
        session = self._session(args)
        if session is not None:   # its freeze decides what a first call would, on every call's rows
            return self._calibrate(args, states, session)
        if any(st.phase is Phase.AWAITING_FIRST_CALL for st in states):
            self.choose_schemes(args, states)
        waiting = [st for st in states if st.phase is Phase.AWAITING_CALIBRATION]
        if waiting:
            if self.config.calibration_steps:
                out = self._calibrate(args, states, None)
                if min(st.observed_calls for st in waiting) >= self.config.calibration_steps:
                    calibration.freeze((st, b) for st, b in zip(states, self._biases(args))
                                       if st.phase is Phase.AWAITING_CALIBRATION)
                return out
            missing = waiting[0].name
            raise RuntimeError(
                f"segquant: static activations and GPTQ rounding need calibration before use ({missing} has "
                f"none: a model "
                f"not calibrated yet, or a weight replaced since): run the compiled model inside "
                f"`with segquant_compile.calibrate(compiled, recalibrate=True): ...`, or set options "
                f"{{'calibration_steps': N}} or {{'load': path}}")
        if self.config.release_float_weights:
            release_float_weights(self.entries, args, states)
        fn, extras = self.converted(states)
        anchor = next((a for a in args if isinstance(a, torch.Tensor) and a.requires_grad), None) \
            if torch.is_grad_enabled() else None
        with torch.no_grad():   # compiled for inference: quantized GEMMs have no backward
            out = fn(*args, *(states[i].graph_input(f) for i, f in extras))
        return out if anchor is None else _mark_inference_only(out, anchor)

    def _session(self, args):
        """The calibration session running over this call's weights, or None."""
        session = registry.active_session()
        return session if session is not None and session.owns(args[i] for i in self.weight_positions) else None

    def state_key(self, entry: SiteEntry) -> tuple:
        return state_key(entry.lowering, self.config.load)

    def choose_schemes(self, args, states) -> None:
        """Dynamic activations, on the first call: measure the schemes (dualscale="auto") on
        this call's rows (the observer graph in float) and round by GPTQ on them
        (weight_rounding="auto"), then keep both: later calls never change the graph or the
        weights. Never inside a calibration of these weights: its freeze decides all of it, on
        every call's rows (deciding here would discard the rows it collected before)."""
        with FIRST_CALL:   # one call's rows decide: a thread arriving meanwhile finds nothing pending
            pending = [i for i, st in enumerate(states) if st.phase is Phase.AWAITING_FIRST_CALL]
            if pending:
                self._calibrate(args, states, None)
                biases = self._biases(args)
                for i in pending:
                    states[i].decide_first_call(biases[i])

    def _biases(self, args):
        return [args[e.bias] if e.bias is not None else None for e in self.entries]

    def _calibrate(self, args, states, session):
        if self._observer is None:
            with self._lock:
                if self._observer is None:
                    self._observer = prepare(self.gm, [e.site for e in self.entries],
                                             [Observer(self.state_key(e), e.site.input_node, self._seen)
                                              for e in self.entries])
        if session is not None:
            session.touch(states, self._biases(args))
        self._seen.by_input = {}   # sharing is decided anew in each call
        with torch.no_grad():
            return self._observer(*args)
