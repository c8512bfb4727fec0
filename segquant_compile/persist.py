"""save() / options={'load': path}: scales and packed weights as safetensors + a JSON manifest."""
from __future__ import annotations

import dataclasses
import functools
import json
from pathlib import Path

import torch

from segquant_compile.state import REGISTRY, QuantState, fingerprint

FORMAT_VERSION = 1
MANIFEST, TENSORS = "manifest.json", "tensors.safetensors"
# options that change the quantized numbers; the others (inductor, mode, load, ...) may differ
NUMERIC_OPTIONS = ("format", "activations", "weights", "smooth", "seglinear", "dualscale", "dualscale_activations")


def states_of(compiled) -> list[QuantState]:
    from segquant_compile.calibration import compiled_options
    from segquant_compile.config import QuantConfig
    model = getattr(compiled, "_orig_mod", compiled)
    states = REGISTRY.states_for([*model.parameters(), *model.buffers()])
    backend, options = compiled_options(compiled)
    if backend == "segquant":
        config = QuantConfig.from_options(options)
        states = [s for s in states if s.config == config]
    return states


def save(compiled, path) -> Path:
    """Write the quantized state of a segquant-compiled (and, if static, calibrated) model."""
    from safetensors.torch import save_file
    states = states_of(compiled)
    if not states:
        raise RuntimeError("segquant_compile.save(): no quantized state for this model; compile it with "
                           "backend='segquant' and call it once first")
    unfrozen = [s.name for s in states if s.config.activations == "static" and not s.frozen]
    if unfrozen:
        raise RuntimeError(f"segquant_compile.save(): {len(unfrozen)} site(s) are not calibrated yet "
                           f"(e.g. {unfrozen[0]}); calibrate first")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tensors, sites = {}, {}
    for s in sorted(states, key=lambda s: s.name):
        for field in ("packed", "d_w", "d_x", "d_neg", "smooth"):
            value = getattr(s, field)
            if value is not None:
                tensors[f"{s.name}.{field}"] = value.detach().contiguous().cpu()
        sites[s.name] = {"weight": s.site.weight, "in_features": s.site.in_features,
                         "out_features": s.site.out_features, "k_bounds": list(s.k_bounds), "dual": list(s.dual),
                         "out_bounds": list(s.out_bounds) if s.out_bounds else None,
                         "fingerprint": s.fingerprint, "smooth_alpha": s.alpha, "sqnr_db": s.sqnr}
    config = {k: v for k, v in dataclasses.asdict(states[0].config).items() if k in NUMERIC_OPTIONS}
    manifest = {"format_version": FORMAT_VERSION, "torch": torch.__version__, "config": config, "sites": sites}
    save_file(tensors, str(path / TENSORS))
    (path / MANIFEST).write_text(json.dumps(manifest, indent=1))
    return path


@functools.lru_cache(maxsize=4)
def _read(path: Path, stamp: tuple) -> tuple[dict, dict]:
    """The manifest and tensors of a saved directory, read once per (path, file times)."""
    from safetensors.torch import load_file
    return json.loads((path / MANIFEST).read_text()), load_file(str(path / TENSORS))


def load_states(path, entries, config) -> None:
    """Fill (site, state, weight) entries from a saved directory, refusing any mismatch."""
    path = Path(path).resolve()
    if not (path / MANIFEST).is_file() or not (path / TENSORS).is_file():
        raise FileNotFoundError(f"segquant load: no {MANIFEST} and {TENSORS} in {path}")
    stamp = tuple((path / f).stat().st_mtime_ns for f in (MANIFEST, TENSORS))
    manifest, tensors = _read(path, stamp)
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"segquant load: {path} has format version {manifest.get('format_version')}, "
                         f"this segquant reads {FORMAT_VERSION}")
    mine = {k: v for k, v in dataclasses.asdict(config).items() if k in NUMERIC_OPTIONS}
    saved = {k: (tuple(v) if isinstance(v, list) else v) for k, v in manifest["config"].items()}
    diff = {k: (saved.get(k), mine[k]) for k in mine if saved.get(k) != mine[k]}
    if diff:
        raise ValueError(f"segquant load: options differ from the saved ones (saved, now): {diff}")
    for site, state, weight in entries:
        entry = manifest["sites"].get(state.name)
        if entry is None:
            raise ValueError(f"segquant load: {state.name} is not in {path}: the model's architecture differs "
                             f"from the saved one")
        if (entry["in_features"], entry["out_features"], tuple(entry["k_bounds"]), tuple(entry["dual"])) != \
                (site.in_features, site.out_features, state.k_bounds, state.dual):
            raise ValueError(f"segquant load: {state.name} differs from the saved plan (shape, K segments or "
                             f"DualScale): the model's architecture differs from the saved one")
        if entry["fingerprint"] != fingerprint(weight):
            raise ValueError(f"segquant load: the weights of {state.name} differ from the ones saved in {path}")
        for field in ("packed", "d_w", "d_x", "d_neg", "smooth"):
            key = f"{state.name}.{field}"
            setattr(state, field, tensors[key].to(weight.device) if key in tensors else None)
        state.alpha, state.sqnr = entry.get("smooth_alpha"), entry.get("sqnr_db")
