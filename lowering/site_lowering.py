"""SiteLowering: how one linear site runs, decided once (passes.site_rules.lower_site) and read by
the rewrite, the CPU op's arguments, the Triton launcher, `segquant autotune` and the report.

Plain data with no graph in it, so `lowering/` can read it without knowing about FX."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from .formats import Choice, Format, Scheme


# The data-dependent policies every "auto" option resolves to (passes/site_rules.py), one place:
# the calibration state switches on these, the report shows the reasons beside them.
class Rounding(Choice):
    RTN = "rtn"                            # round to nearest
    GPTQ = "gptq"                          # error-compensated on calibration rows (lowering/gptq.py)
    GPTQ_FIRST_CALL = "gptq-first-call"    # dynamic: on the first call's rows (a calibration's, if one comes first)


class WeightClip(Choice):
    ABSMAX = "absmax"                      # the weight's range
    MSE = "mse"                            # the clipped range with the least rounding error


class SmoothPolicy(Choice):
    SEARCH = "search"                      # alpha (or none) by output SQNR on rows: a calibration's, else the first call's
    # searched on a calibration's ranges only; none from a first call (its ranges miss later calls' channels)
    SEARCH_FROM_CALIBRATION = "search-from-calibration"


class ActivationClip(Choice):
    ABSMAX = "absmax"                      # the calibrated range
    SEARCH = "search"                      # the range scaled by the factor with the best output SQNR
    SEARCH_IF_UNSMOOTHED = "search-if-unsmoothed"   # SEARCH where SmoothQuant left the site unsmoothed, else ABSMAX


@dataclass(frozen=True)
class ConvGeometry:
    """A conv2d site's implicit GEMM: K = in_channels x kh x kw, ordered channel-major (c, i, j)
    like the weight's own [N, C, kh, kw] layout and F.unfold, so an input-channel segment
    [c0, c1) is the one K range [c0 * kh * kw, c1 * kh * kw). Rows (M) are output pixels."""
    in_channels: int
    kernel: tuple[int, int]
    stride: tuple[int, int] = (1, 1)
    padding: tuple[int, int] = (0, 0)

    @property
    def taps(self) -> int:
        return self.kernel[0] * self.kernel[1]

    def channel_bounds(self, k_bounds) -> tuple[int, ...]:
        return tuple(k // self.taps for k in k_bounds)

    def output_size(self, h: int, w: int) -> tuple[int, int]:
        return ((h + 2 * self.padding[0] - self.kernel[0]) // self.stride[0] + 1,
                (w + 2 * self.padding[1] - self.kernel[1]) // self.stride[1] + 1)

    def tag(self) -> str:
        """Part of a conv kernel's variant (its autotune key): `conv3x3s2`."""
        return f"conv{self.kernel[0]}x{self.kernel[1]}s{self.stride[0]}" + \
            (f"x{self.stride[1]}" if self.stride[1] != self.stride[0] else "")

    def variant(self, fmt: str, dual: bool, asymmetric: bool, pixel: bool) -> str:
        """A conv kernel's variant: `conv3x3s1-int8-dual` (static steps, one per K segment) or
        `conv3x3s1-int8-dual-pixel` (dynamic: a step per input pixel and segment)."""
        return self.tag() + "-" + variant_name(fmt, dual, False, asymmetric) + ("-pixel" if pixel else "")

    def as_list(self) -> list[int]:
        """Flat ints (op arguments, the saved manifest)."""
        return [self.in_channels, *self.kernel, *self.stride, *self.padding]

    @classmethod
    def from_list(cls, v) -> "ConvGeometry":
        return cls(int(v[0]), (int(v[1]), int(v[2])), (int(v[3]), int(v[4])), (int(v[5]), int(v[6])))


def variant_name(fmt: str, dual: bool, prologue: bool = False, asymmetric: bool = False, low_rank: bool = False) -> str:
    """The kernel variant (`int8`, `int8-dual`, `int8-asym`, `fp8-dual`, `int8-prologue`,
    `int8-prologue-lr`, `w4a8-dual-lr`, ...): part of the autotune key, shared by the launcher and
    SiteLowering.variant; `-lr`: with SVDQuant's low-rank branch in the epilogue (and, in the
    prologue kernel, its down-projection in the K loop)."""
    return fmt + ("-dual" if dual else "") + ("-asym" if asymmetric else "") + ("-prologue" if prologue else "") + \
        ("-lr" if low_rank else "")


@dataclass(frozen=True)
class SiteLowering:
    format: Format
    activations: str                     # "dynamic" (per token) | "static" (per tensor, per segment) | "float" (weight-only)
    weights: str                         # "per-channel" | "per-tensor"
    k_bounds: tuple[int, ...]            # K segments: S + 1 bounds
    schemes: tuple[Scheme, ...]          # activation scheme per K segment
    out_bounds: tuple[int, ...] | None   # per-tensor weights: one weight step per output segment
    smooth: float | SmoothPolicy | None = None   # SmoothQuant: an alpha or a search policy (a divisor per channel)
    auto: bool = False                   # schemes measured on real rows (dualscale="auto")
    weight_clip: WeightClip = WeightClip.ABSMAX
    activation_clip: ActivationClip | None = None   # static steps' clip; None: not static
    heads: int | None = None             # head segments merged into these K segments (head_groups)
    act_groups: int | None = None        # segments cut into activation groups of this size (their own steps)
    # kernel choices for one traced shape: they change no number, so two lowerings that differ
    # only here share one QuantState
    prologue: bool = field(default=False, compare=False)   # static steps applied in the kernel (CUDA)
    rows: int | None = field(default=None, compare=False)   # M of the traced call (None: symbolic)
    cpu_gemm: str | None = field(default=None, compare=False)   # CPU int8: "int8" | "fp32" (cpu_linear.py)
    note: str | None = None              # why this lowering differs from the options' default
    conv: ConvGeometry | None = None     # a conv2d site: its implicit GEMM (None: a linear)
    group_size: int | None = None        # 4-bit formats: K group of one weight step (within a segment)
    rounding: Rounding = Rounding.RTN
    # SVDQuant's low-rank branch: the rank of a float L1 @ L2 beside the quantized residual (None: none)
    low_rank: int | None = None
    # why each "auto" option resolved as it did here (the report shows them); no number depends on them
    reasons: tuple[str, ...] = field(default=(), compare=False)

    def __post_init__(self):
        if len(self.schemes) != len(self.k_bounds) - 1:
            raise ValueError(f"SiteLowering: {len(self.schemes)} schemes for {len(self.k_bounds) - 1} K segments")
        unknown = set(self.schemes) - set(Scheme.values())
        if unknown:
            raise ValueError(f"SiteLowering: unknown activation scheme(s) {sorted(unknown)}")
        # values read back from a saved manifest or a measurement arrive as plain strings
        object.__setattr__(self, "schemes", tuple(Scheme(s) for s in self.schemes))
        for name, kind in (("format", Format), ("weight_clip", WeightClip), ("rounding", Rounding),
                           ("activation_clip", ActivationClip), ("smooth", SmoothPolicy)):
            value = getattr(self, name)
            if isinstance(value, str):
                object.__setattr__(self, name, kind(value))

    @property
    def static(self) -> bool:
        return self.activations == "static"

    @property
    def gptq(self) -> bool:
        """Weights rounded by GPTQ, once rows arrive (calibration or the first call)."""
        return self.rounding in (Rounding.GPTQ, Rounding.GPTQ_FIRST_CALL)

    @property
    def weight_only(self) -> bool:
        return self.format.weight_only

    @property
    def weight_bits(self) -> int:
        return self.format.weight_bits

    @property
    def g_bounds(self) -> tuple[int, ...] | None:
        """K bounds of the weight's step groups (4-bit formats); None: one step per channel."""
        if self.group_size is None:
            return None
        from .quantize import group_bounds
        return group_bounds(self.k_bounds, self.group_size)

    @property
    def codes(self) -> tuple[int, ...]:
        """Scheme codes per K segment, as the GEMM op takes them."""
        return tuple(s.code for s in self.schemes)

    @property
    def dual(self) -> tuple[int, ...]:
        return tuple(int(s is Scheme.DUALSCALE) for s in self.schemes)

    @property
    def asymmetric(self) -> bool:
        return Scheme.ASYMMETRIC in self.schemes

    @property
    def in_features(self) -> int:
        return self.k_bounds[-1]

    @property
    def widest_segment(self) -> int:
        """Columns of the widest K segment (GPTQ's Hessian blocks are this wide at most)."""
        kb = self.k_bounds
        return max(b - a for a, b in zip(kb[:-1], kb[1:]))

    @property
    def variant(self) -> str:
        if self.weight_only:
            return self.format
        if self.conv is not None:
            return self.conv.variant(self.format, Scheme.DUALSCALE in self.schemes, self.asymmetric, not self.static)
        return variant_name(self.format, Scheme.DUALSCALE in self.schemes, self.prologue, self.asymmetric,
                            self.low_rank is not None)

    def as_dynamic(self, note: str) -> "SiteLowering":
        """The same site with dynamic activations (a static site whose calibration is unusable)."""
        return dataclasses.replace(self, activations="dynamic", smooth=None, prologue=False, note=note)

    def with_schemes(self, schemes: tuple[str, ...], note: str) -> "SiteLowering":
        """The same site with measured schemes (dualscale="auto"); the prologue takes no zero point."""
        schemes = tuple(Scheme(s) for s in schemes)
        return dataclasses.replace(self, schemes=schemes, note=note,
                                   prologue=self.prologue and Scheme.ASYMMETRIC not in schemes)

    def describe(self) -> str:
        fmt = self.format + (f" g{self.group_size}" if self.group_size else "") + \
            (" gptq" if self.gptq else "") + (f" + low-rank {self.low_rank}" if self.low_rank else "")
        if self.weight_only:
            return f"{fmt}, a float"
        schemes = set(self.schemes)
        acts = schemes.pop() if len(schemes) == 1 else "mixed " + "/".join(self.schemes)
        return f"{fmt} w {self.weights}, a {self.activations} {acts}" + \
            (", prologue" if self.prologue else "") + (f", smooth {self.smooth}" if self.smooth is not None else "") + \
            (f", {self.heads} heads in {len(self.schemes)} segments" if self.heads else "") + \
            (f", activation groups of {self.act_groups} ({len(self.schemes)} steps per token)"
             if self.act_groups else "")


@dataclass(frozen=True)
class KeptFloat:
    """A site that stays float, with the reason the report shows."""
    reason: str
