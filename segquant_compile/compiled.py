"""find(compiled): a segquant-compiled model's options, graphs and QuantStates, the one way
calibrate(), save(), report() and explain() reach them."""
from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass

import torch

from segquant_compile import registry
from segquant_compile.config import QuantConfig
from segquant_compile.options import resolve_options


def compiled_options(compiled) -> tuple[str | None, dict | None]:
    """(backend name, options) of a torch.compile'd module, or of the function torch.compile made
    of a module compiled in place (`module.compile(...)`: its `_compiled_call_impl`); (None, None)
    when torch's internals do not say (their layout is not public: walk it defensively)."""
    ctx = getattr(compiled, "dynamo_ctx", None)
    if ctx is None and callable(compiled):   # a compiled function holds its context in a closure cell
        ctx = next((v for v in map(_cell, getattr(compiled, "__closure__", None) or ()) if hasattr(v, "callback")),
                   None)
    obj = getattr(ctx, "callback", None)
    for _ in range(8):
        if obj is None:
            break
        name = getattr(obj, "compiler_name", None)
        if isinstance(name, str):
            return name, dict(getattr(obj, "kwargs", {}) or {}).get("options", {})
        obj = next((getattr(obj, a) for a in ("_torchdynamo_orig_backend", "_inner_convert", "compiler_fn")
                    if getattr(obj, a, None) not in (None, obj)), None)
    return None, None


def _cell(cell):
    try:
        return cell.cell_contents
    except ValueError:   # an empty cell
        return None


def regional_options(model: torch.nn.Module) -> tuple[str | None, dict | None]:
    """(backend, options) of the submodules compiled in place (regional compilation: diffusers'
    `compile_repeated_blocks`); (None, None) where none is; an error where they disagree."""
    found = {}
    for name, m in model.named_modules():
        fn = getattr(m, "_compiled_call_impl", None)
        if fn is not None:
            backend, options = compiled_options(fn)
            found.setdefault(repr((backend, sorted((options or {}).items(), key=str))), (name, backend, options))
    if len(found) > 1:
        shown = "; ".join(f"{n or '<root>'}: {b} {o}" for n, b, o in found.values())
        raise TypeError(f"the model's blocks are compiled with different backends or options ({shown})")
    if not found:
        return None, None
    _, backend, options = next(iter(found.values()))
    return backend, options


def unwrap(model, options: dict | None) -> tuple:
    """(the module behind a torch.compile'd one, the options to plan it with: those given, else
    those it was segquant-compiled with); anything else passes through."""
    if isinstance(getattr(model, "_orig_mod", None), torch.nn.Module):
        backend, compiled_with = compiled_options(model)
        if options is None and backend == "segquant":
            options = compiled_with
        model = model._orig_mod
    return model, options


def module_paths(model: torch.nn.Module) -> dict[int, str]:
    """id(parameter or buffer) -> its full name in the root model (shared tensors: first name)."""
    out: dict[int, str] = {}
    for name, t in (*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)):
        out.setdefault(id(t), name)
    return out


def compiled_root_on_stack() -> torch.nn.Module | None:
    """The model whose compiled call is running on the Python stack: the innermost torch.compile'd
    module's `_orig_mod`, or where modules are compiled in place by `.compile()` (regional
    compilation), the outermost module on the stack; None outside any.
    A graph dynamo captures below it (a graph break inside a block) knows its parameters only
    relative to that block: this root gives their full paths, as the report names them."""
    frame, found = sys._getframe(1), None
    while frame is not None:
        m = frame.f_locals.get("self") if "self" in frame.f_code.co_varnames else None
        if isinstance(m, torch.nn.Module):
            inner = getattr(m, "_orig_mod", None)
            if isinstance(inner, torch.nn.Module):
                return inner
            # a module compiled in place (regional compilation compiles each block so): names run
            # from the outermost module calling it, the model whose report names them
            if found is not None or getattr(m, "_compiled_call_impl", None) is not None:
                found = m
        frame = frame.f_back
    return found


def full_site_names(sites, weights, root: torch.nn.Module | None) -> dict[str, str]:
    """site name as its graph knows it -> full module path from `root`, by the identity of each
    site's weight (`weights`: site name -> tensor); names stay as they are without a root."""
    if root is None:
        return {}
    paths = module_paths(root)
    return {site.name: full_site_name(site.name, paths[id(w)]) for site in sites
            if (w := weights.get(site.name)) is not None and id(w) in paths}


def full_site_name(name: str, weight_path: str) -> str:
    """A site's full name from its weight's full path, keeping the graph's `#2` of a weight
    called more than once."""
    return site_path(weight_path) + (name[name.index("#"):] if "#" in name else "")


def site_path(param_name: str) -> str:
    """`blocks.0.attn.to_q.weight` -> `blocks.0.attn.to_q`; `...in_proj_weight` -> `....in_proj`."""
    head, _, leaf = param_name.rpartition(".")
    if leaf == "weight":
        return head
    if leaf.endswith("_weight"):
        return f"{head}.{leaf[:-len('_weight')]}" if head else leaf[:-len("_weight")]
    return param_name


@dataclass(frozen=True)
class SiteRow:
    """One planned site of one weight of the model: quantized (state) or float (reason)."""
    site: object                       # the LinearSite, named by its full module path
    weight: torch.Tensor
    bias: torch.Tensor | None          # the site's own bias (tied weights: each module its own)
    state: object | None
    reason: str | None


@dataclass
class Compiled:
    model: torch.nn.Module             # the original (float) model
    config: QuantConfig | None         # None when torch's internals do not tell the options
    runners: list                      # GraphRunners that ran with this model's weights
    rows: list[SiteRow]
    # calls the graphs keep float (passes.FloatCall), by full module path where their parameter is known
    float_calls: list
    float_weights: set                 # ids of those parameters: modules reached, kept float
    names: dict                        # id(state) -> the full name of the first site it serves
    regional: bool = False             # blocks compiled in place, not the model (regional compilation)

    def name_of(self, state) -> str:
        """A state's name in this model: its first site's full module path."""
        return self.names.get(id(state), state.name)

    @property
    def states(self) -> list:
        """[(weight, QuantState)], one per state."""
        seen, out = set(), []
        for r in self.rows:
            if r.state is not None and id(r.state) not in seen:
                seen.add(id(r.state))
                out.append((r.weight, r.state))
        return out

    @property
    def quant_states(self) -> list:
        return [st for _, st in self.states]


def find(compiled) -> Compiled:
    """The model behind `compiled`, its options and everything segquant holds for it. Sites are
    named by full module paths from the root (unique also across graph breaks), states by their
    first site's (`Compiled.name_of`). Reads only: nothing it finds is changed."""
    if not isinstance(compiled, torch.nn.Module):
        raise TypeError(f"expected a model compiled with torch.compile(model, backend='segquant'), got "
                        f"{type(compiled).__name__}")
    model = getattr(compiled, "_orig_mod", None)
    if model is not None:
        backend, options = compiled_options(compiled)
    else:   # regional compilation: blocks compiled in place
        model = compiled
        backend, options = regional_options(model)
        if backend is None:
            raise TypeError(f"expected a model compiled with torch.compile(model, backend='segquant') or whose "
                            f"blocks are (model.compile_repeated_blocks(backend='segquant')), got "
                            f"{type(compiled).__name__} with no compiled block")
    if backend is not None and backend != "segquant":
        raise TypeError(f"the model is compiled with backend {backend!r}, not 'segquant'")
    config = resolve_options(options) if backend == "segquant" else None
    paths = module_paths(model)
    mine = {id(t): t for t in (*model.parameters(), *model.buffers())}
    runners, rows, names, named = [], [], set(), {}
    floats, float_weights = {}, set()
    for r in sorted((r for r in registry.RUNNERS if config is None or r.config == config), key=id):
        entry_of = {id(e.site): e for e in r.entries}
        ran = False
        for site, w, b in r.site_weights():
            if mine.get(id(w)) is not w:
                continue
            ran = True
            full = full_site_name(site.name, paths[id(w)])
            if full in names:
                continue
            names.add(full)
            e = entry_of.get(id(site))
            state = registry.STATES.get(w, r.state_key(e)) if e is not None else None
            if state is not None:   # a state shared by sites: the first one's name
                named.setdefault(id(state), full)
            rows.append(SiteRow(dataclasses.replace(site, name=full, graph=len(runners)), w, b, state,
                                None if e is not None else r.fallbacks.get(site.name)))
        for call, w in r.float_call_weights():
            if mine.get(id(w)) is w:
                ran = True
                float_weights.add(id(w))
                floats.setdefault((site_path(paths[id(w)]), call.kind), dataclasses.replace(
                    call, name=site_path(paths[id(w)]), graph=len(runners)))
        if ran:
            for call in r.plan.float_calls:   # no parameter to name it by: as the graph knows it
                if call.weight is None:
                    floats.setdefault((call.name, call.kind), dataclasses.replace(call, graph=len(runners)))
            runners.append(r)
    return Compiled(model, config, runners, rows, list(floats.values()), float_weights, named,
                    regional=getattr(compiled, "_orig_mod", None) is None)
