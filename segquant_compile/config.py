"""QuantConfig: the validated, frozen form of `torch.compile(..., options={...})`."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from segquant_compile.lowering.quantize import GROUP_SIZES
from segquant_compile.lowering.site_lowering import FLOAT, LOWERED_FORMATS, ROUNDINGS
from segquant_compile.passes.graph_ops import ACTIVATIONS

AUTO = "auto"   # a format per site, allocated from measured sensitivity under a budget
FORMATS = LOWERED_FORMATS + (AUTO,)
BUDGETS = ("weight_bits", "latency")   # average weight bits; GEMM time as a fraction of all float
ACTIVATION_MODES = ("dynamic", "static")
WEIGHT_MODES = ("per-channel", "per-tensor")
ACTIVATION_GROUP_SIZES = (16, 32, 64, 128)   # at least Triton's smallest dot K
MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


@dataclass(frozen=True)
class QuantConfig:
    format: str = "int8"
    # per-site formats: (glob or full site name, format) pairs, the first match wins over `format`;
    # format="auto" fills them from `sensitivity` (a saved segquant_compile.sensitivity) and `budget`
    formats: tuple[tuple[str, str], ...] = ()
    budget: tuple[tuple[str, float], ...] = ()
    sensitivity: str | None = None
    group_size: int = 128                 # 4-bit formats: K values per weight step (never across a segment)
    # integer weights: "rtn", "gptq" (error-compensated on calibration rows) or "auto" (gptq on the
    # calibration's rows, or with dynamic activations on the first call's: passes/site_rules.py)
    weight_rounding: str = "auto"
    activations: str = "dynamic"
    weights: str = "per-channel"
    # SmoothQuant: alpha, "search" (per site, alpha or none by the SQNR on rows: a calibration's,
    # else the first call's), None, or "auto" (the default): "search" where a calibration gives the
    # ranges, none from one call (static default DiT +2.2 dB, ViT +2.7 dB; dynamic from a first call
    # DiT -1.4 dB: its rows at sigma 80 leave later steps' channels unseen; bench/results/fidelity_smooth.json)
    smooth: float | str | None = "auto"
    seglinear: bool = True
    # at most this many input segments from a head merge (adjacent heads share a step): fewer
    # segment GEMMs on the int8 CPU form; None keeps one segment per head
    head_groups: int | None = None
    convs: bool = True                    # conv2d sites quantized (False: float, listed in the report)
    # sites with fewer input features (K, a conv's C*kh*kw) stay float: a GEMM this thin is bound
    # by its input and output traffic, so int8 saves no time, and on both real models such sites
    # (the patch embeddings) are the ones measured most sensitive (bench/results/fidelity.json)
    min_k: int = 64
    # per-token activation steps per group of this many K columns within each segment (None: one
    # step per token and segment); finer steps, at one more int32 flush per group in the GEMM
    activation_group_size: int | None = None
    # "auto": per segment, the scheme measured best on real rows (won on both real models:
    # bench/results/fidelity.json); True: DualScale where SiLU/GELU feeds; False: none
    dualscale: bool | str = "auto"
    asymmetric: bool = False              # zero points on the segments without DualScale
    # "absmax", "mse" (clip-searched weight steps), or "auto": absmax for 8-bit weights, mse for
    # 4-bit (w4a8 round-to-nearest: DiT +0.65 dB, ViT +1.2 dB; int8: no gain on both models)
    weight_clip: str = "auto"
    # static steps: "search" scales each site's calibrated range by the factor in 1, 0.9 .. 0.5
    # whose output SQNR on the calibration rows is best; "absmax": the range as seen; "auto" (the
    # default): "search" where SmoothQuant left the site unsmoothed (with smoothing the search lost
    # on both real models: DiT 45.44 -> 45.06 dB, ViT 46.44 -> 45.98; without it, it won)
    activation_clip: str = "auto"
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
        for key in ("formats", "budget"):   # mappings, held as pairs (a frozen config; JSON gives lists)
            value = options.get(key)
            if isinstance(value, dict):
                options[key] = tuple((str(k), v) for k, v in value.items())
            elif isinstance(value, (list, tuple)):
                options[key] = tuple(tuple(p) if isinstance(p, (list, tuple)) else p for p in value)
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
        if config.format == AUTO and not config.formats:
            config = dataclasses.replace(config, formats=_allocated(config))
        return config

    @property
    def only_fp8(self) -> bool:
        """Every format asked is fp8: no integer weight for GPTQ to round."""
        return all(f == "fp8" for f in (self.format, *(f for _, f in self.formats)))

    def validate(self) -> None:
        _choice("format", self.format, FORMATS)
        for pair in self.formats:
            if not (isinstance(pair, tuple) and len(pair) == 2 and isinstance(pair[0], str)):
                raise ValueError(f"option 'formats' must map site names or globs to formats, got {pair!r}")
            _choice(f"formats[{pair[0]!r}]", pair[1], LOWERED_FORMATS + (FLOAT,))
        for pair in self.budget:
            if not (isinstance(pair, tuple) and len(pair) == 2):
                raise ValueError(f"option 'budget' must be a mapping like {{'weight_bits': 5}}, got {pair!r}")
            _choice("budget", pair[0], BUDGETS)
            if isinstance(pair[1], bool) or not isinstance(pair[1], (int, float)) or pair[1] <= 0:
                raise ValueError(f"budget {pair[0]!r} must be a positive number, got {pair[1]!r}")
        if len(self.budget) > 1:
            raise ValueError(f"option 'budget' takes one budget (weight_bits or latency), got {dict(self.budget)}")
        if self.format == AUTO and not self.formats and (not self.budget or self.sensitivity is None):
            raise ValueError("format 'auto' needs options 'budget' (e.g. {'weight_bits': 5}) and 'sensitivity' "
                             "(a file saved by segquant_compile.sensitivity(...).save('sens.json'))")
        if self.format != AUTO and (self.budget or self.sensitivity is not None):
            raise ValueError("options 'budget' and 'sensitivity' choose formats for format='auto' only")
        if self.sensitivity is not None and not isinstance(self.sensitivity, str):
            raise ValueError(f"option 'sensitivity' must be a path (str), got {self.sensitivity!r}")
        _choice("group_size", self.group_size, GROUP_SIZES)
        if isinstance(self.min_k, bool) or not isinstance(self.min_k, int) or self.min_k < 0:
            raise ValueError(f"option 'min_k' must be a non-negative int (0 quantizes every site), got {self.min_k!r}")
        if self.activation_group_size is not None and (type(self.activation_group_size) is not int or
                                                       self.activation_group_size not in ACTIVATION_GROUP_SIZES):
            raise ValueError(f"option 'activation_group_size' must be None or one of "
                             f"{list(ACTIVATION_GROUP_SIZES)}, got {self.activation_group_size!r}")
        _choice("weight_rounding", self.weight_rounding, ("auto", *ROUNDINGS))
        _choice("activations", self.activations, ACTIVATION_MODES)
        _choice("weights", self.weights, WEIGHT_MODES)
        _choice("weight_clip", self.weight_clip, ("auto", "absmax", "mse"))
        _choice("activation_clip", self.activation_clip, ("absmax", "search", "auto"))
        _choice("mode", self.mode, MODES)
        if self.dualscale not in (True, False, "auto"):
            raise ValueError(f"option 'dualscale' must be True, False or 'auto', got {self.dualscale!r}")
        if self.weight_rounding == "gptq" and self.only_fp8:
            raise ValueError("weight_rounding 'gptq' rounds integer weights (int8, w4a8, the weight-only "
                             "formats); fp8 weights round by the cast")
        if self.format == "fp8" and self.asymmetric:   # fp8 "auto" chooses between symmetric and DualScale
            raise ValueError("option 'asymmetric' (zero points) is int8 only; fp8 has no asymmetric scheme")
        for key in ("seglinear", "convs", "inductor", "release_float_weights", "asymmetric"):
            if not isinstance(getattr(self, key), bool):
                raise ValueError(f"option {key!r} must be True or False, got {getattr(self, key)!r}")
        if self.smooth not in (None, "search", "auto") and not (
                isinstance(self.smooth, (int, float)) and not isinstance(self.smooth, bool)
                and 0.0 <= self.smooth <= 1.0):
            raise ValueError(f"option 'smooth' must be None, 'auto', 'search' or a float in [0, 1], got "
                             f"{self.smooth!r}")
        for act in self.dualscale_activations:
            _choice("dualscale_activations", act, tuple(ACTIVATIONS))
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


def _allocated(config: QuantConfig) -> tuple[tuple[str, str], ...]:
    """format="auto": per site, the format the allocation picks from the measured sensitivity."""
    from segquant_compile.allocation import allocate
    from segquant_compile.sensitivity import Sensitivity
    try:
        measured = Sensitivity.load(config.sensitivity)
    except (ValueError, FileNotFoundError) as e:
        raise type(e)(f"option 'sensitivity': {e}") from None
    chosen = allocate(measured, **dict(config.budget))
    return tuple(chosen.formats.items())


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
    """Compared as JSON holds them: mappings as [key, value] pairs (as from_options holds
    `formats` and `budget`), tuples as lists, a lone string as a one-item list."""
    if isinstance(given, str) and isinstance(saved, list):
        given = [given]
    return _as_json(given) == saved


def _as_json(value):
    if isinstance(value, dict):
        return [[str(k), _as_json(v)] for k, v in value.items()]
    if isinstance(value, (list, tuple, set, frozenset)):
        return [_as_json(v) for v in value]
    return value


def _choice(key, value, valid):
    if value not in valid:
        raise ValueError(f"invalid value {value!r} for segquant option {key!r}; valid values: {list(valid)}")
