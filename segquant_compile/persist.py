"""save() / options={'load': path}: scales and packed weights as safetensors + a JSON manifest.

Sites are saved under their full module paths. A graph compiled below the root (a graph break
inside a block) knows only paths relative to that block: load matches those by suffix and by the
weight's fingerprint, which tells the blocks apart."""
from __future__ import annotations

import dataclasses
import functools
import json
from pathlib import Path

import torch

from segquant_compile.state import QuantState, fingerprint

FORMAT_VERSION = 4   # 3: weight formats (group_size, rounding); 4: activation_clip, first-call GPTQ
MANIFEST, TENSORS = "manifest.json", "tensors.safetensors"
FIELDS = ("packed", "d_w", "colsum", "d_x", "d_neg", "zp", "smooth")
# SiteLowering fields that change the saved numbers (kernel choices may differ between machines)
LOWERING_FIELDS = ("format", "activations", "weights", "k_bounds", "schemes", "out_bounds", "smooth", "auto", "weight_clip",
                   "conv", "group_size", "rounding", "activation_clip")


def _bias_name(weight_name: str) -> str:
    head, _, leaf = weight_name.rpartition(".")
    leaf = leaf[: -len("weight")] + "bias" if leaf.endswith("weight") else leaf + "_bias"
    return f"{head}.{leaf}" if head else leaf


def _lowering_dict(lowering) -> dict:
    out = {}
    for f in LOWERING_FIELDS:
        v = getattr(lowering, f)
        out[f] = list(v) if isinstance(v, tuple) else v.as_list() if hasattr(v, "as_list") else v
    return out


def save(compiled, path) -> Path:
    """Write the quantized state of a segquant-compiled (and, if static, calibrated) model."""
    from safetensors.torch import save_file

    from segquant_compile.compiled import find, module_paths
    found = find(compiled)
    states = found.states
    if not states:
        raise RuntimeError("segquant_compile.save(): no quantized state for this model; compile it with "
                           "backend='segquant' and call it once first")
    unfrozen = [st.name for _, st in states if not st.frozen]
    if unfrozen:
        raise RuntimeError(f"segquant_compile.save(): {len(unfrozen)} site(s) are not calibrated yet "
                           f"(e.g. {unfrozen[0]}); calibrate first")
    params = dict(found.model.named_parameters())
    paths = module_paths(found.model)
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tensors, sites = {}, {}
    for weight, st in sorted(states, key=lambda ws: ws[1].name):
        for f in FIELDS:
            value = getattr(st, f)
            if value is not None:
                tensors[f"{st.name}.{f}"] = value.detach().contiguous().cpu()
        weight_name = paths[id(weight)]
        sites[st.name] = {"weight": weight_name, "in_features": st.site.in_features,
                          "out_features": st.site.out_features, "lowering": _lowering_dict(st.base),
                          "dynamic_note": st.dynamic_note, "chosen": list(st.chosen) if st.chosen else None,
                          "candidates": st.candidates, "fingerprint": st.fingerprint,
                          "bias_fingerprint": fingerprint(params.get(_bias_name(weight_name))),
                          "smooth_alpha": st.alpha, "sqnr_db": st.sqnr, "activation_clip": st.act_clip,
                          "gptq_rows": st.rows_source, "nearest_note": st.nearest_note,
                          "smooth_note": st.smooth_note}
    options = dataclasses.asdict(found.config) if found.config is not None else {}
    manifest = {"format_version": FORMAT_VERSION, "torch": torch.__version__,
                "options": {k: v for k, v in options.items() if k not in ("load",)}, "sites": sites}
    save_file(tensors, str(path / TENSORS))
    (path / MANIFEST).write_text(json.dumps(manifest, indent=1))
    return path


_SAVED_OPTIONS: dict[str, dict] = {}   # resolved path -> options: one read per process and save


def saved_options(path) -> dict:
    """The options a directory was saved with (the manifest only: validating options reads no
    tensors). The last read is kept per path, so report/save still work if the folder goes away."""
    path = Path(path).resolve()
    manifest = path / MANIFEST
    if not manifest.is_file():
        if str(path) in _SAVED_OPTIONS:
            return _SAVED_OPTIONS[str(path)]
        raise FileNotFoundError(f"segquant load: no {MANIFEST} in {path}")
    try:
        options = json.loads(manifest.read_text())["options"]
    except Exception as e:
        raise ValueError(f"segquant load: {path} is unreadable or corrupt ({type(e).__name__}: {e}); "
                         f"save it again") from None
    _SAVED_OPTIONS[str(path)] = dict(options)
    return options


@functools.lru_cache(maxsize=4)
def _read(path: Path, stamp: tuple) -> tuple[dict, dict]:
    """The manifest and tensors of a saved directory, read once per (path, file times). A read
    that fails raises every time (nothing is cached)."""
    from safetensors.torch import load_file
    try:
        manifest = json.loads((path / MANIFEST).read_text())
        tensors = load_file(str(path / TENSORS))
    except Exception as e:
        raise ValueError(f"segquant load: {path} is unreadable or corrupt ({type(e).__name__}: {e}); "
                         f"save it again") from None
    if not isinstance(manifest, dict) or manifest.get("format_version") != FORMAT_VERSION:
        version = manifest.get("format_version") if isinstance(manifest, dict) else None
        raise ValueError(f"segquant load: {path} has format version {version}, this segquant reads "
                         f"{FORMAT_VERSION}: save it again")
    return manifest, tensors


def read(path) -> tuple[Path, dict, dict]:
    path = Path(path).resolve()
    if not (path / MANIFEST).is_file() or not (path / TENSORS).is_file():
        raise FileNotFoundError(f"segquant load: no {MANIFEST} and {TENSORS} in {path}")
    stamp = tuple((path / f).stat().st_mtime_ns for f in (MANIFEST, TENSORS))
    return (path, *_read(path, stamp))


def _entry_for(path, manifest: dict, state: QuantState, weight_fp: str) -> tuple[str, dict]:
    """The saved site of this state: its name, or a saved name ending in it (graph breaks),
    told apart by the weight's fingerprint."""
    named = [(k, v) for k, v in manifest["sites"].items() if k == state.name or k.endswith("." + state.name)]
    if not named:
        raise ValueError(f"segquant load: {state.name} is not in {path}: the model's architecture differs "
                         f"from the saved one")
    same = [(k, v) for k, v in named if v["fingerprint"] == weight_fp]
    if not same:
        raise ValueError(f"segquant load: the weights of {state.name} differ from the ones saved in {path}")
    return same[0]


def load_state(path, state: QuantState, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
    """Fill a new state from a saved directory, refusing any mismatch. The state is not yet
    registered: on an error it is dropped whole."""
    path, manifest, tensors = read(path)
    name, entry = _entry_for(path, manifest, state, state.fingerprint)
    if (entry["in_features"], entry["out_features"]) != (state.site.in_features, state.site.out_features) or \
            entry["lowering"] != _lowering_dict(state.base):
        raise ValueError(f"segquant load: {name} in {path} was saved with another plan or options (saved "
                         f"{entry['lowering']}, now {_lowering_dict(state.base)})")
    if entry["bias_fingerprint"] != fingerprint(bias):
        raise ValueError(f"segquant load: the bias of {name} differs from the one saved in {path} (a "
                         f"fine-tune since saving?): calibrate again and save")
    values = {f: tensors.get(f"{name}.{f}") for f in FIELDS}
    if values["packed"] is None or values["d_w"] is None:
        raise ValueError(f"segquant load: {path} lacks the packed weight of {name}: save it again")
    for f, v in values.items():
        setattr(state, f, v.to(weight.device) if v is not None else None)
    state.name, state.dynamic_note = name, entry.get("dynamic_note")
    state.chosen = tuple(entry["chosen"]) if entry.get("chosen") else None
    state.candidates = entry.get("candidates")
    state.alpha, state.sqnr = entry.get("smooth_alpha"), entry.get("sqnr_db")
    state.act_clip = entry.get("activation_clip")
    state.rows_source, state.nearest_note = entry.get("gptq_rows"), entry.get("nearest_note")
    state.smooth_note = entry.get("smooth_note")
    state.awaiting_rows = False   # the saved packing is the calibrated one (GPTQ included)
    state.smooth_pending = False  # and its smoothing factors (saved, or none)
