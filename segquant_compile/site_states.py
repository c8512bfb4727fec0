"""A graph's planned sites as entries (lowered under the options, with their inputs' positions),
and the QuantStates of the weights a call brings: found in the registry, or built and loaded."""
from __future__ import annotations

import dataclasses
import warnings
from typing import NamedTuple

import torch

from segquant_compile import registry
from segquant_compile.config import QuantConfig
from segquant_compile.lowering.site_lowering import KeptFloat, SiteLowering
from segquant_compile.passes import LinearSite, Plan
from segquant_compile.passes.site_rules import lower_site
from segquant_compile.persist import load_state
from segquant_compile.registry import state_key
from segquant_compile.state import QuantState


class SiteEntry(NamedTuple):
    site: LinearSite
    lowering: SiteLowering     # as the options decide it (the registry key)
    weight: int                # positions in the graph's inputs
    bias: int | None


def placeholder_index(gm: torch.fx.GraphModule) -> dict[str, int]:
    """Placeholder name -> position in the graph's inputs."""
    return {n.name: i for i, n in enumerate(n for n in gm.graph.nodes if n.op == "placeholder")}


def plan_entries(plan: Plan, gm: torch.fx.GraphModule, example_inputs, config: QuantConfig
                 ) -> tuple[tuple[SiteEntry, ...], dict[str, str]]:
    """Lower every planned site: the quantized ones as entries, the rest with their reason."""
    index = placeholder_index(gm)
    entries, floats = [], {}
    for site in plan:
        w = index.get(site.weight_node)
        weight = example_inputs[w] if w is not None else None
        if not isinstance(weight, torch.Tensor):
            floats[site.name] = "weight is not a graph input"
            continue
        lowering = lower_site(site, config, weight.device.type, weight.dtype)
        if isinstance(lowering, KeptFloat):
            floats[site.name] = lowering.reason
            continue
        entries.append(SiteEntry(site, lowering, w, index.get(site.bias_node) if site.bias_node else None))
    return tuple(entries), floats


def create_state(entry: SiteEntry, weight: torch.Tensor, bias: torch.Tensor | None,
                 config: QuantConfig, name: str) -> QuantState:
    """The weight's state under this lowering: found, or built (and loaded) in full before it is
    registered, so a failed load leaves nothing behind. `name`: the site's full name for this
    weight (a graph shared by several blocks names its sites after the first block's)."""
    key = state_key(entry.lowering, config.load)
    state = registry.STATES.get(weight, key)
    if state is not None:
        return state
    site = entry.site if name == entry.site.name else dataclasses.replace(entry.site, name=name)
    state = QuantState(site, entry.lowering, weight, source=config.load, device_bytes=config.calibration_device_bytes)
    if config.load:
        load_state(config.load, state, weight, bias)
    return registry.STATES.put(weight, key, state)


def mark_stale_steps(edited, states) -> None:
    """Static steps after a weight edit: the edited sites are re-packed, but the activation ranges
    of the sites after them in the graph (their inputs computed from the edited weights) were
    calibrated on the old weights and may now clip. Said once per edit, and in the report."""
    first = min(states.index(st) for st in edited)
    names = sorted({st.name for st in edited})
    shown = ", ".join(names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")
    stale = [st for st in states[first + 1:] if st.lowering.static and st.params.d_pos is not None]
    if not stale:
        return
    note = f"calibrated before {shown} was edited: recalibrate"
    for st in stale:
        st.mark_stale(note)
    warnings.warn(f"segquant: weight(s) {shown} edited after static calibration: the activation steps of "
                  f"{len(stale)} site(s) computed from them were calibrated on the old weights and may clip; "
                  f"run `with segquant_compile.calibrate(compiled, recalibrate=True): ...` on calibration "
                  f"inputs (the report marks them)", stacklevel=4)


def release_float_weights(entries, args, states) -> int:
    return sum(st.release(args[e.weight]) for e, st in zip(entries, states) if not st.released)
