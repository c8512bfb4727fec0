"""QuantConfig: the options, typed and frozen, one small dataclass per concern (as torchao's config
classes: plain typed fields, enums for value sets, checked on construction).

Users write options flat (`{"activations": "static", "smooth": 0.5}`): every field name below is
an option name, unique across the groups; `QuantConfig.from_flat` / `to_flat` map between the two
and `config.smooth` reads a field by its option name. Values are checked by their field types
(typed_fields.py); the checks that span two fields are in QuantConfig.__post_init__. The
measurements behind the defaults are in docs/results.md. A leaf: it imports only lowering/passes
data (the sensitivity-driven allocation and the adoption of saved options are in options.py)."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Annotated, Literal

from segquant_compile.lowering.formats import Choice, Format, FormatChoice
from segquant_compile.passes.graph_ops import ACTIVATIONS
from segquant_compile.typed_fields import check_fields

AUTO = "auto"
ActivationName = Literal[tuple(ACTIVATIONS)]
FormatName = Annotated[str, FormatChoice]    # "int8", "w4a8+r32": FormatChoice.parse checks it


class Budget(Choice):
    WEIGHT_BITS = "weight_bits"    # average weight bits over the quantized weights
    LATENCY = "latency"            # summed GEMM time as a fraction of the float GEMMs'


class Granularity(Choice):
    PER_CHANNEL = "per-channel"
    PER_TENSOR = "per-tensor"      # one weight step per output segment


class WeightClipOption(Choice):
    AUTO = "auto"                  # mse for 4-bit weights, absmax for 8-bit
    ABSMAX = "absmax"
    MSE = "mse"


class RoundingOption(Choice):
    AUTO = "auto"                  # gptq on the rows there are (a calibration's, else the first call's)
    RTN = "rtn"
    GPTQ = "gptq"


class ActivationMode(Choice):
    DYNAMIC = "dynamic"            # per-token steps at each call
    STATIC = "static"              # per-segment steps from a calibration


class ActivationClipOption(Choice):
    AUTO = "auto"                  # search where SmoothQuant left a site unsmoothed, else absmax
    SEARCH = "search"
    ABSMAX = "absmax"


class SmoothOption(Choice):
    AUTO = "auto"                  # searched where a calibration gives the ranges; none from a first call
    SEARCH = "search"              # searched on the rows there are (a first call's too)


class CompileMode(Choice):
    DEFAULT = "default"
    REDUCE_OVERHEAD = "reduce-overhead"
    MAX_AUTOTUNE = "max-autotune"
    MAX_AUTOTUNE_NO_CUDAGRAPHS = "max-autotune-no-cudagraphs"


def _at_least(n, what):
    return {"check": (lambda v: v >= n, what)}


@dataclass(frozen=True)
class Precision:
    """The numbers each site runs with."""
    format: Format | Literal["auto"] = Format.INT8     # "auto": per site, allocated from `sensitivity` under `budget`
    # (glob or site name, format): first match wins; a format may carry a low-rank branch ("w4a8+r32")
    formats: tuple[tuple[str, Literal["float"] | FormatName], ...] = ()
    budget: tuple[tuple[Budget, float], ...] = field(default=(), metadata={"check": (
        lambda v: len(v) <= 1 and all(b > 0 for _, b in v), "one budget (weight_bits or latency) with a positive value")})
    sensitivity: str | None = None                     # a file saved by sq.sensitivity(...).save

    def __post_init__(self):
        check_fields(self)


@dataclass(frozen=True)
class Weights:
    """How weight steps are found and weights rounded."""
    weights: Granularity = Granularity.PER_CHANNEL
    group_size: Literal[64, 128] = 128                 # 4-bit weights: K values per step, never across a segment
    weight_clip: WeightClipOption = WeightClipOption.AUTO
    weight_rounding: RoundingOption = RoundingOption.AUTO
    # SVDQuant's float low-rank branch beside the quantized residual: its rank (None: no branch)
    low_rank: int | None = field(default=None, metadata=_at_least(1, "None or a positive int (the branch's rank)"))

    def __post_init__(self):
        check_fields(self)


@dataclass(frozen=True)
class Activations:
    """How activation steps are found."""
    activations: ActivationMode = ActivationMode.DYNAMIC
    activation_clip: ActivationClipOption = ActivationClipOption.AUTO
    # a per-token step per group of this many K columns of a segment: finer steps, one more flush each
    activation_group_size: Literal[16, 32, 64, 128] | None = None

    def __post_init__(self):
        check_fields(self)


@dataclass(frozen=True)
class Segments:
    """The segments read off the graph and the scheme of each."""
    seglinear: bool = True                             # False: plain per-tensor/per-token W8A8
    head_groups: int | None = field(default=None, metadata=_at_least(1, "None or a positive int"))
    dualscale: bool | Literal["auto"] = AUTO           # "auto": per segment, the scheme measured best on rows
    dualscale_activations: tuple[ActivationName, ...] = ("silu", "gelu")
    asymmetric: bool = False                           # zero points on the segments without DualScale

    def __post_init__(self):
        check_fields(self)


@dataclass(frozen=True)
class Smoothing:
    """SmoothQuant's per-channel divisors."""
    smooth: float | SmoothOption | None = field(default=SmoothOption.AUTO, metadata={"check": (
        lambda v: not isinstance(v, float) or 0.0 <= v <= 1.0, "None, 'auto', 'search' or a float in [0, 1]")})

    def __post_init__(self):
        check_fields(self)


@dataclass(frozen=True)
class Sites:
    """Which sites are quantized."""
    # fewer input features stay float: such a GEMM is bound by its traffic, and these were the most
    # sensitive sites on the real models
    min_k: int = field(default=64, metadata=_at_least(0, "a non-negative int (0 quantizes every site)"))
    convs: bool = True
    skip: tuple[str, ...] = ()                         # glob patterns of full site names kept float

    def __post_init__(self):
        check_fields(self)


@dataclass(frozen=True)
class Run:
    """How to run: never part of the saved numbers, so never adopted from a save."""
    inductor: bool = True                              # False: run the rewritten graph as FX (debugging)
    calibration_steps: int | None = field(default=None, metadata=_at_least(1, "None or a positive int"))
    load: str | None = None                            # a folder written by sq.save
    release_float_weights: bool = False
    # calibration statistics (GPTQ Hessians, kept rows) kept on the model's GPU up to this many bytes
    # in all, accumulated there with no copy per call; the sites beyond keep theirs on the CPU
    calibration_device_bytes: int = field(default=4 << 30, metadata=_at_least(0, "a non-negative int (bytes)"))
    autotune_cache: str | None = None
    mode: CompileMode = CompileMode.DEFAULT            # torch.compile's mode (it refuses mode= beside options=)

    def __post_init__(self):
        check_fields(self)


GROUPS = {"precision": Precision, "weight": Weights, "activation": Activations, "segments": Segments,
          "smoothing": Smoothing, "sites": Sites, "run": Run}


@dataclass(frozen=True)
class QuantConfig:
    """Every option, by concern; `config.<option>` reads one by its flat name."""
    precision: Precision = field(default_factory=Precision)
    weight: Weights = field(default_factory=Weights)
    activation: Activations = field(default_factory=Activations)
    segments: Segments = field(default_factory=Segments)
    smoothing: Smoothing = field(default_factory=Smoothing)
    sites: Sites = field(default_factory=Sites)     # a factory: a changed Sites default applies (tests/conftest.py)
    run: Run = field(default_factory=Run)

    def __post_init__(self):
        for name, cls in GROUPS.items():
            if not isinstance(getattr(self, name), cls):
                raise ValueError(f"QuantConfig.{name} must be a {cls.__name__}, got {getattr(self, name)!r}")
        p = self.precision
        if p.format == AUTO and not p.formats and (not p.budget or p.sensitivity is None):
            raise ValueError("format 'auto' needs options 'budget' (e.g. {'weight_bits': 5}) and 'sensitivity' "
                             "(a file saved by segquant_compile.sensitivity(...).save('sens.json'))")
        if p.format != AUTO and (p.budget or p.sensitivity is not None):
            raise ValueError("options 'budget' and 'sensitivity' choose formats for format='auto' only")
        if self.weight.weight_rounding == RoundingOption.GPTQ and self.only_fp8:
            raise ValueError("weight_rounding 'gptq' rounds integer weights (int8, w4a8, the weight-only "
                             "formats); fp8 weights round by the cast")
        if p.format == Format.FP8 and self.segments.asymmetric:   # fp8 "auto" picks symmetric or DualScale
            raise ValueError("option 'asymmetric' (zero points) is int8 only; fp8 has no asymmetric scheme")

    def __getattr__(self, name):
        group = OPTION_GROUP.get(name)
        if group is None:
            raise AttributeError(f"{type(self).__name__} has no option {name!r}")
        return getattr(object.__getattribute__(self, group), name)

    @classmethod
    def from_flat(cls, options: dict | None = None) -> "QuantConfig":
        """The config of flat options (pure: no file is read; options.resolve_options also applies
        presets, `load` and format="auto")."""
        options = dict(options or {})
        unknown = sorted(set(options) - set(OPTION_GROUP))
        if unknown:
            raise ValueError(f"unknown segquant option(s) {unknown}; valid options: {list(OPTION_GROUP)}")
        parts = {name: {} for name in GROUPS}
        for key, value in options.items():
            parts[OPTION_GROUP[key]][key] = value
        return cls(**{name: GROUPS[name](**values) for name, values in parts.items()})

    def to_flat(self) -> dict:
        """{option: value}, every option, as from_flat takes them (JSON-ready: enums are strings)."""
        return {f.name: getattr(getattr(self, g), f.name) for g, c in GROUPS.items() for f in dataclasses.fields(c)}

    def replace(self, **options) -> "QuantConfig":
        """This config with some options (flat names) changed."""
        return type(self).from_flat({**self.to_flat(), **options})

    @property
    def only_fp8(self) -> bool:
        """Every format asked is fp8: no integer weight for GPTQ to round."""
        p = self.precision
        names = (p.format, *(f for _, f in p.formats))
        return all(FormatChoice.valid(f) and FormatChoice.parse(f).format == Format.FP8 for f in names)

    @property
    def activation_set(self) -> frozenset[str]:
        return frozenset(self.segments.dualscale_activations) if self.segments.dualscale else frozenset()


OPTION_GROUP = {f.name: g for g, c in GROUPS.items() for f in dataclasses.fields(c)}   # option -> its group
