"""save() / options={'load': path}: scales and packed weights as safetensors + a JSON manifest.

Sites are saved under their full module paths. A graph compiled below the root (a graph break
inside a block) knows only paths relative to that block: load matches those by suffix and by the
weight's fingerprint, which tells the blocks apart."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from segquant_compile import distributed, registry
from segquant_compile.compiled import find, module_paths
from segquant_compile.lowering.quantize import packed_layout
from segquant_compile.saved_files import FORMAT_VERSION, MANIFEST, TENSORS, read
from segquant_compile.site_params import PACKED_FIELDS, STEP_FIELDS, SiteParams
from segquant_compile.state import QuantState
from segquant_compile.weight_watch import fingerprint

FIELDS = PACKED_FIELDS + STEP_FIELDS
# SiteLowering fields that change the saved numbers (kernel choices may differ between machines)
LOWERING_FIELDS = ("format", "activations", "weights", "k_bounds", "schemes", "out_bounds", "smooth", "auto", "weight_clip",
                   "conv", "group_size", "rounding", "activation_clip", "low_rank")


def _lowering_dict(lowering) -> dict:
    out = {}
    for f in LOWERING_FIELDS:
        v = getattr(lowering, f)
        out[f] = list(v) if isinstance(v, tuple) else v.as_list() if hasattr(v, "as_list") else v
    return out


def save(compiled, path) -> Path:
    """Write the quantized state of a segquant-compiled (and, if static, calibrated) model. In a
    calibration group (torch.distributed) rank 0 writes, and every rank returns once it has."""
    group = distributed.calibration_group()
    if group is None:
        return _write(compiled, path)
    import torch.distributed as dist
    written = _write(compiled, path) if dist.get_rank(group) == 0 else Path(path)
    dist.barrier(group)
    return written


def _write(compiled, path) -> Path:
    from safetensors.torch import save_file

    found = find(compiled)
    states = found.states
    if not states:
        if registry.STATES.states_for(found.model.parameters()):
            raise RuntimeError("segquant_compile.save(): the compiled graphs of this model were reset "
                               "(torch._dynamo.reset()) since it ran; its quantized state is kept: call the "
                               "compiled model once more (no recalibration needed), then save")
        raise RuntimeError("segquant_compile.save(): no quantized state for this model; compile it with "
                           "backend='segquant' and call it once first")
    unfrozen = [found.name_of(st) for _, st in states if not st.settled]
    if unfrozen:
        raise RuntimeError(f"segquant_compile.save(): {len(unfrozen)} site(s) are not calibrated yet "
                           f"(e.g. {unfrozen[0]}); calibrate first")
    paths = module_paths(found.model)
    # every site a state serves (tied weights: one linear called twice, or a weight shared by two
    # modules), each with its own bias
    served: dict[int, dict[str, str | None]] = {}
    for row in found.rows:
        if row.state is not None:
            served.setdefault(id(row.state), {})[row.site.name] = fingerprint(row.bias)
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tensors, sites = {}, {}
    for weight, st in sorted(states, key=lambda ws: found.name_of(ws[1])):
        name, p = found.name_of(st), st.params
        for f in FIELDS:
            value = getattr(p, f)
            if value is not None:
                tensors[f"{name}.{f}"] = value.detach().contiguous().cpu()
        sites[name] = {"weight": paths[id(weight)], "in_features": st.site.in_features,
                       "out_features": st.site.out_features, "lowering": _lowering_dict(st.base),
                       "dynamic_note": p.dynamic_note, "chosen": list(p.chosen) if p.chosen else None,
                       "candidates": list(p.candidates) if p.candidates else None, "fingerprint": st.fingerprint,
                       "sites": served[id(st)],
                       "smooth_alpha": p.alpha, "sqnr_db": p.sqnr, "activation_clip": p.act_clip,
                       "gptq_rows": p.rows_source, "nearest_note": p.nearest_note,
                       "smooth_note": p.smooth_note}
    options = found.config.to_flat() if found.config is not None else {}
    manifest = {"format_version": FORMAT_VERSION, "torch": torch.__version__,
                "options": {k: v for k, v in options.items() if k not in ("load",)}, "sites": sites}
    save_file(tensors, str(path / TENSORS))
    (path / MANIFEST).write_text(json.dumps(manifest, indent=1))
    return path


ENTRY_KEYS = ("weight", "in_features", "out_features", "lowering", "fingerprint", "sites")
STEPS = ("d_w", "d_pos", "d_neg", "smooth")   # divisors: finite and positive


def _entry_for(path, manifest: dict, state: QuantState, weight_fp: str) -> tuple[str, dict, str]:
    """The saved entry of this state and which of the sites it serves this state is: its name,
    or a saved name ending in it (graph breaks), told apart by the weight's fingerprint."""
    sites = manifest.get("sites")
    if not isinstance(sites, dict):
        raise ValueError(f"segquant load: {path / MANIFEST} has no 'sites' table: save it again")
    for k, v in sites.items():
        missing = [key for key in ENTRY_KEYS if not isinstance(v, dict) or key not in v]
        if missing:
            raise ValueError(f"segquant load: entry {k!r} of {path / MANIFEST} lacks {missing}: the manifest "
                             f"was edited or damaged; save it again")
    named = [(k, v, n) for k, v in sites.items() for n in v["sites"]
             if n == state.name or n.endswith("." + state.name)]
    if not named:
        raise ValueError(f"segquant load: {state.name} is not in {path}: the model's architecture differs "
                         f"from the saved one")
    same = [(k, v, n) for k, v, n in named if v["fingerprint"] == weight_fp]
    if not same:
        raise ValueError(f"segquant load: the weights of {state.name} differ from the ones saved in {path}")
    return same[0]


def _check_tensors(path, name: str, values: dict, state: QuantState, dynamic_note: str | None) -> None:
    """The saved tensors of one site against what this site runs with: present, of the shape and
    dtype its packing and segments give, steps finite and positive (a damaged or hand-edited file
    is refused here, not by a shape error in a GEMM or a NaN output)."""
    lo, p = state.base, state.params
    where = f"{path / TENSORS}, site {name!r}"
    expected = {"packed": (tuple(p.packed.shape), p.packed.dtype),
                "d_w": (tuple(p.d_w.shape), p.d_w.dtype),
                "colsum": None if p.colsum is None else (tuple(p.colsum.shape), p.colsum.dtype),
                "smooth": ((state.site.in_features,), torch.float32),
                "l1": None if p.l1 is None else (tuple(p.l1.shape), p.l1.dtype),
                "l2": None if p.l2 is None else (tuple(p.l2.shape), p.l2.dtype)}
    for f in ("d_pos", "d_neg", "zp"):
        expected[f] = ((1, len(lo.schemes)), torch.float32)
    required = ["packed", "d_w"] + (["colsum"] if p.colsum is not None else []) + \
        (["l1", "l2"] if p.l1 is not None else [])
    if lo.static and dynamic_note is None:
        required += ["d_pos", "d_neg"]
    for f in required:
        if values[f] is None:
            raise ValueError(f"segquant load: {where}: '{name}.{f}' is missing; save it again")
    for f, v in values.items():
        if v is None:
            continue
        shape, dtype = expected[f] if expected[f] is not None else (None, None)
        if shape is None or tuple(v.shape) != shape or v.dtype != dtype:
            raise ValueError(f"segquant load: {where}: '{name}.{f}' is {v.dtype} {tuple(v.shape)}, this site "
                             f"needs {dtype} {shape}: the file was edited or damaged; save it again")
        if f in STEPS and not bool((torch.isfinite(v) & (v > 0)).all()):
            raise ValueError(f"segquant load: {where}: '{name}.{f}' holds steps that are not finite and "
                             f"positive: the file was edited or damaged; save it again")
        if f in ("zp", "l1", "l2") and not bool(torch.isfinite(v).all()):
            raise ValueError(f"segquant load: {where}: '{name}.{f}' is not finite; save it again")


def load_state(path, state: QuantState, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
    """Fill a new state from a saved directory, refusing any mismatch. The state is not yet
    registered: on an error it is dropped whole."""
    path, manifest, tensors = read(path)
    name, entry, site = _entry_for(path, manifest, state, state.fingerprint)
    if (entry["in_features"], entry["out_features"]) != (state.site.in_features, state.site.out_features) or \
            entry["lowering"] != _lowering_dict(state.base):
        raise ValueError(f"segquant load: {name} in {path} was saved with another plan or options (saved "
                         f"{entry['lowering']}, now {_lowering_dict(state.base)})")
    if entry["sites"][site] != fingerprint(bias):
        raise ValueError(f"segquant load: the bias of {name} differs from the one saved in {path} (a "
                         f"fine-tune since saving?): calibrate again and save")
    values = {f: tensors.get(f"{name}.{f}") for f in FIELDS}
    _check_tensors(path, name, values, state, entry.get("dynamic_note"))
    # files hold [K, N]; the device may read another layout (quantize.packed_layout)
    values["packed"] = packed_layout(values["packed"], state.base.format, weight.device)
    tensors = {f: v.to(weight.device) if v is not None else None for f, v in values.items()}
    # the saved packing is the calibrated one (GPTQ included), with its smoothing factors (or none)
    state.load(SiteParams(**tensors, dynamic_note=entry.get("dynamic_note"),
                          chosen=tuple(entry["chosen"]) if entry.get("chosen") else None,
                          candidates=tuple(entry["candidates"]) if entry.get("candidates") else None,
                          alpha=entry.get("smooth_alpha"), sqnr=entry.get("sqnr_db"),
                          act_clip=entry.get("activation_clip"), rows_source=entry.get("gptq_rows"),
                          nearest_note=entry.get("nearest_note"), smooth_note=entry.get("smooth_note")), name)
