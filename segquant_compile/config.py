"""QuantConfig: the validated, frozen form of `torch.compile(..., options={...})`."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from segquant_compile.passes.ops import ACTIVATIONS

FORMATS = ("int8", "fp8", "w4a8", "int8-weight-only")
PLANNED_FORMATS = ("w4a8", "int8-weight-only")   # accepted names, not lowered yet: refused, never run as float
ACTIVATION_MODES = ("dynamic", "static")
WEIGHT_MODES = ("per-channel", "per-tensor")
MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


@dataclass(frozen=True)
class QuantConfig:
    format: str = "int8"
    activations: str = "dynamic"
    weights: str = "per-channel"
    smooth: float | str | None = None
    seglinear: bool = True
    # at most this many input segments from a head merge (adjacent heads share a step): fewer
    # segment GEMMs on the int8 CPU form; None keeps one segment per head
    head_groups: int | None = None
    convs: bool = True                    # conv2d sites quantized (False: float, listed in the report)
    # "auto": per segment, the scheme measured best on real rows (won on both real models:
    # bench/results/fidelity.json); True: DualScale where SiLU/GELU feeds; False: none
    dualscale: bool | str = "auto"
    asymmetric: bool = False              # zero points on the segments without DualScale
    weight_clip: str = "absmax"           # "absmax" or "mse" (clip-searched per-channel weight steps)
    dualscale_activations: tuple[str, ...] = ("silu", "gelu")
    skip: tuple[str, ...] = ()
    inductor: bool = True
    calibration_steps: int | None = None
    load: str | None = None
    release_float_weights: bool = False
    autotune_cache: str | None = None
    mode: str = "default"

    @classmethod
    def from_options(cls, options: dict | None = None, mode: str | None = None) -> "QuantConfig":
        options = dict(options or {})
        # `mode` is an option too: torch.compile refuses mode= together with options=
        valid = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(options) - set(valid))
        if unknown:
            raise ValueError(f"unknown segquant option(s) {unknown}; valid options: {valid}")
        if options.get("load") is not None:
            options = _adopt_saved(options)
        if mode is not None:
            if "mode" in options and options["mode"] != mode:
                raise ValueError(f"segquant: mode {mode!r} and options['mode'] {options['mode']!r} disagree")
            options["mode"] = mode
        for key in ("dualscale_activations", "skip"):
            if key in options:
                value = options[key]
                if isinstance(value, str):
                    options[key] = (value,)
                elif isinstance(value, (list, tuple, set, frozenset)):
                    options[key] = tuple(value)
                else:
                    raise ValueError(f"option {key!r} must be a string or a list of strings, got "
                                     f"{type(value).__name__} {value!r}")
        config = cls(**options)
        config.validate()
        return config

    def validate(self) -> None:
        _choice("format", self.format, FORMATS)
        if self.format in PLANNED_FORMATS:
            available = [f for f in FORMATS if f not in PLANNED_FORMATS]
            raise ValueError(f"format {self.format!r} is not lowered yet (it would run float); available "
                             f"formats: {available}")
        _choice("activations", self.activations, ACTIVATION_MODES)
        _choice("weights", self.weights, WEIGHT_MODES)
        _choice("weight_clip", self.weight_clip, ("absmax", "mse"))
        _choice("mode", self.mode, MODES)
        if self.dualscale not in (True, False, "auto"):
            raise ValueError(f"option 'dualscale' must be True, False or 'auto', got {self.dualscale!r}")
        if self.format == "fp8" and self.asymmetric:   # fp8 "auto" chooses between symmetric and DualScale
            raise ValueError("option 'asymmetric' (zero points) is int8 only; fp8 has no asymmetric scheme")
        for key in ("seglinear", "convs", "inductor", "release_float_weights", "asymmetric"):
            if not isinstance(getattr(self, key), bool):
                raise ValueError(f"option {key!r} must be True or False, got {getattr(self, key)!r}")
        if self.smooth is not None and self.smooth != "search" and not (
                isinstance(self.smooth, (int, float)) and not isinstance(self.smooth, bool)
                and 0.0 <= self.smooth <= 1.0):
            raise ValueError(f"option 'smooth' must be None, 'search' or a float in [0, 1], got {self.smooth!r}")
        for act in self.dualscale_activations:
            _choice("dualscale_activations", act, tuple(ACTIVATIONS))
        if self.smooth is not None and self.activations != "static":
            raise ValueError("option 'smooth' needs activations='static': SmoothQuant's factors come from "
                             "calibrated per-channel ranges")
        if self.calibration_steps is not None and not (isinstance(self.calibration_steps, int)
                                                       and self.calibration_steps > 0):
            raise ValueError(f"option 'calibration_steps' must be a positive int, got {self.calibration_steps!r}")
        if self.head_groups is not None and not (isinstance(self.head_groups, int) and not isinstance(
                self.head_groups, bool) and self.head_groups > 0):
            raise ValueError(f"option 'head_groups' must be None or a positive int, got {self.head_groups!r}")
        if self.load is not None and not isinstance(self.load, str):
            raise ValueError(f"option 'load' must be a path (str), got {type(self.load).__name__} {self.load!r}")
        if self.autotune_cache is not None and not isinstance(self.autotune_cache, str):
            raise ValueError(f"option 'autotune_cache' must be a path (str), got {self.autotune_cache!r}")
        if not all(isinstance(p, str) for p in self.skip):
            raise ValueError(f"option 'skip' must be glob patterns (strings), got {self.skip!r}")
        if not all(isinstance(a, str) for a in self.dualscale_activations):
            raise ValueError(f"option 'dualscale_activations' must be activation names (strings), got "
                             f"{self.dualscale_activations!r}")

    @property
    def activation_set(self) -> frozenset[str]:
        return frozenset(self.dualscale_activations) if self.dualscale else frozenset()


# options that only say how to run (not what the saved numbers are): never adopted from a save
RUN_OPTIONS = ("load", "inductor", "mode", "release_float_weights", "autotune_cache", "calibration_steps")


def _adopt_saved(options: dict) -> dict:
    """options={'load': path} alone is enough: the options the save was made with fill every
    option not given; one given with another value is an error naming both (the saved numbers
    would not match it)."""
    from segquant_compile.persist import saved_options
    path = options["load"]
    if not isinstance(path, (str, bytes)) and not hasattr(path, "__fspath__"):
        return options   # validate() names the bad type
    valid = {f.name for f in dataclasses.fields(QuantConfig)}
    saved = {k: v for k, v in saved_options(path).items() if k in valid and k not in RUN_OPTIONS}
    for key, value in saved.items():
        if key in options and not _same(options[key], value):
            raise ValueError(f"segquant: options[{key!r}]={options[key]!r} conflicts with {path}, saved with "
                             f"another plan or options ({key}={value!r}); drop {key!r} to adopt the saved value")
    return {**saved, **options}


def _same(given, saved) -> bool:
    """Compared as JSON holds them: tuples as lists, a lone string as a one-item list."""
    if isinstance(given, str) and isinstance(saved, list):
        given = [given]
    if isinstance(given, (tuple, set, frozenset)):
        given = list(given)
    return given == saved


def _choice(key, value, valid):
    if value not in valid:
        raise ValueError(f"invalid value {value!r} for segquant option {key!r}; valid values: {list(valid)}")
