"""lower_site: the one function that decides how a planned site runs under the options."""
from __future__ import annotations

import bisect
import fnmatch
from dataclasses import dataclass

import torch

from segquant_compile.lowering import low_rank
from segquant_compile.lowering.cpu_linear import cpu_gemm
from segquant_compile.lowering.quantize import group_bounds
from segquant_compile.lowering.formats import FLOAT, Format, FormatChoice, Scheme
from segquant_compile.lowering.site_lowering import (ActivationClip, KeptFloat, Rounding, SiteLowering,
                                                     SmoothPolicy, WeightClip)

from .plan import LinearSite

PROLOGUE_MAX_ROWS = 256   # static steps at small M: quantizing inside the kernel saves a pass


def skip_pattern(name: str, patterns) -> str | None:
    """The first of the `skip` patterns a site name matches."""
    return next((p for p in patterns if fnmatch.fnmatch(name, p)), None)


def site_format(name: str, config) -> tuple[str, str | None]:
    """(format, the `formats` entry that chose it): the first entry whose glob matches the site's
    full name (the runtime names a graph's sites from the compiled model's root); else the
    options' `format`."""
    for pattern, fmt in config.formats:
        if fnmatch.fnmatch(name, pattern):
            return fmt, pattern
    return config.format, None


def group_segments(k_bounds, sources, groups: int):
    """Adjacent segments merged into `groups` (sizes as equal as possible); a merged segment keeps
    a DualScale source only if all its parts share it."""
    n = len(k_bounds) - 1
    cuts = [round(i * n / groups) for i in range(groups + 1)]
    bounds = tuple(k_bounds[c] for c in cuts)
    merged = tuple(sources[a] if len(set(sources[a:b])) == 1 else None for a, b in zip(cuts[:-1], cuts[1:]))
    return bounds, merged


def split_segments(k_bounds, sources, size: int):
    """Each segment cut every `size` columns (activation groups: a per-token step each); the
    parts keep their segment's DualScale source."""
    bounds = group_bounds(k_bounds, size)
    return bounds, tuple(sources[bisect.bisect_right(k_bounds, a) - 1] for a in bounds[:-1])


@dataclass(frozen=True)
class Resolved:
    """Every "auto" option of one site as an explicit value or data-dependent policy, with the
    reasons the report shows."""
    rounding: Rounding
    weight_clip: WeightClip
    smooth: float | SmoothPolicy | None
    activation_clip: ActivationClip | None
    auto: bool                       # schemes measured on rows (dualscale="auto")
    reasons: tuple[str, ...]


def resolve_autos(config, fmt: Format, static: bool, allocated: bool = False) -> Resolved:
    """The one place an "auto" option becomes a value or a policy (the calibration state then
    only follows the policy). `allocated`: the site's format came from format="auto"."""
    reasons = []
    if allocated:
        budget = ", ".join(f"{k}={v}" for k, v in config.budget)
        reasons.append(f"format auto: {fmt} allocated from {config.sensitivity} under {budget}")
    weight_only = fmt.weight_only
    # weight steps: clip-searched 4-bit groups only (15 levels: where it was measured to win)
    clip = config.weight_clip
    if clip == "auto":
        clip = WeightClip.MSE if fmt.grouped else WeightClip.ABSMAX
        reasons.append(f"weight_clip auto: {clip} for {fmt.weight_bits}-bit weights")
    # GPTQ on the rows there are: the calibration's (static), else the first call's, as
    # dualscale="auto" chooses its schemes there; fp8 rounds by its cast
    rounding = config.weight_rounding
    if not fmt.integer:
        rounding = Rounding.RTN
    elif rounding == "auto":
        rounding = Rounding.GPTQ if config.activations == "static" else Rounding.GPTQ_FIRST_CALL
        reasons.append("weight_rounding auto: gptq on " + ("the calibration's rows" if rounding is Rounding.GPTQ
                       else "the first call's rows (a calibration before it gives its rows)"))
    # weight-only has no activation grid; a conv's divisor is per input channel (site_params)
    smooth = config.smooth
    if weight_only or smooth is None:
        smooth = None
    elif smooth == "auto":
        smooth = SmoothPolicy.SEARCH_FROM_CALIBRATION
        reasons.append("smooth auto: searched on a calibration's ranges; none from a first call (its ranges "
                       "miss the channels later calls use)")
    elif smooth == "search":
        smooth = SmoothPolicy.SEARCH
    act_clip = None
    if static:
        act_clip = ActivationClip(config.activation_clip) if config.activation_clip != "auto" else (
            ActivationClip.SEARCH if smooth is None else ActivationClip.ABSMAX if isinstance(smooth, float)
            else ActivationClip.SEARCH_IF_UNSMOOTHED)
        if config.activation_clip == "auto":   # with smoothing, the search lost on both real models
            reasons.append(f"activation_clip auto: {act_clip} (searched where SmoothQuant leaves the site "
                           f"unsmoothed)")
    auto = config.dualscale == "auto" and not weight_only
    if auto:
        reasons.append("dualscale auto: per segment, the scheme measured best on rows (a calibration's, "
                       "else the first call's)")
    return Resolved(Rounding(rounding), WeightClip(clip), smooth, act_clip, auto, tuple(reasons))


def lower_site(site: LinearSite, config, device: str = "cpu",
               weight_dtype: torch.dtype | None = None) -> SiteLowering | KeptFloat:
    """(LinearSite, QuantConfig) -> SiteLowering, or KeptFloat with the reason. `device` and
    `weight_dtype` are those of the weight (None: judge the plan alone, as explain() does)."""
    pattern = skip_pattern(site.name, config.skip)
    if pattern is not None:
        return KeptFloat(f"matches skip pattern {pattern!r}")
    if weight_dtype is not None and not weight_dtype.is_floating_point:
        return KeptFloat(f"weight dtype {weight_dtype} is not floating point")
    if device not in ("cpu", "cuda"):
        return KeptFloat(f"weight on {device} device")
    fmt, entry = site_format(site.name, config)
    if fmt == FLOAT:
        return KeptFloat(f"format '{FLOAT}' for this site (options formats[{entry!r}])")
    if not FormatChoice.valid(fmt):   # "auto" with no allocated format for this site
        return KeptFloat(f"format {fmt!r} names no format for this site (not in the sensitivity measurement?)")
    choice = FormatChoice.parse(fmt)
    fmt = choice.format
    if entry is None and site.in_features < config.min_k:
        return KeptFloat(f"K={site.in_features} < min_k={config.min_k}: too thin a GEMM for int8 to save "
                         f"time (options min_k; 0 quantizes it)")
    if site.conv is not None and not config.convs:
        return KeptFloat("conv site kept float (options convs=False)")
    if site.conv is not None and not fmt.spec.conv:
        return KeptFloat(f"conv sites are lowered for int8 only (format {fmt!r})")
    seg = site.input_segments if config.seglinear else None
    k_bounds = seg.bounds if seg is not None else (0, site.in_features)
    n_seg = len(k_bounds) - 1
    sources = site.dualscale.sources if len(site.dualscale.sources) == n_seg else (None,) * n_seg
    heads = None
    if config.head_groups and seg is not None and seg.pattern == "head_merge" and n_seg > config.head_groups:
        heads, (k_bounds, sources) = n_seg, group_segments(k_bounds, sources, config.head_groups)
        n_seg = len(k_bounds) - 1
    act_groups = None
    weight_only = fmt.weight_only
    if config.activation_group_size and site.conv is None and not weight_only:
        k_bounds, sources = split_segments(k_bounds, sources, config.activation_group_size)
        act_groups, n_seg = config.activation_group_size, len(k_bounds) - 1
    # DualScale where the graph shows a SiLU/GELU-like producer; with dualscale="auto" this is the
    # starting point that measurement on real rows replaces
    other = Scheme.ASYMMETRIC if config.asymmetric else Scheme.SYMMETRIC
    schemes = tuple(Scheme.DUALSCALE if config.dualscale and s is not None else other for s in sources)
    out_bounds = None
    if config.weights == "per-tensor":
        out_seg = site.output_segments if config.seglinear else None
        out_bounds = out_seg.bounds if out_seg is not None else (0, site.out_features)
    if weight_only:   # float activations: no scheme applies
        schemes = (Scheme.SYMMETRIC,) * n_seg
    activations = "float" if weight_only else config.activations
    static = activations == "static"
    prologue = (static and device == "cuda" and fmt == "int8" and site.rows is not None
                and site.rows <= PROLOGUE_MAX_ROWS)
    conv = site.conv is not None
    # decided here, outside any tracing: the choice is a measurement (lowering/cpu_linear.py); in
    # the "fp32" form a site reads its dequantized weight (conv sites too: lowering/conv.py). The
    # other integer formats run on CPU as their dequantized grids (one fp32 GEMM: no int4 or int8
    # x float instructions there)
    cpu = None
    if device == "cpu" and fmt != "fp8":
        cpu = cpu_gemm() if fmt == "int8" else "fp32"
    grouped = fmt.grouped
    r = resolve_autos(config, fmt, static, allocated=entry is not None and config.format == "auto")
    weights = config.weights if not grouped else "per-group"
    asked = choice.low_rank or config.low_rank   # a format entry's own rank ("w4a8+r32") first
    rank = low_rank.site_rank(asked, site.in_features, site.out_features)
    reasons = r.reasons
    if rank is not None and rank < asked:
        reasons += (f"low_rank {asked}: rank {rank} here (at most half of min(K, N) = "
                    f"{min(site.in_features, site.out_features)})",)
    elif asked and rank is None:
        reasons += (f"low_rank {asked}: no branch (K or N below 2)",)
    return SiteLowering(format=fmt, activations=activations, weights=weights,
                        k_bounds=tuple(k_bounds), schemes=schemes, out_bounds=out_bounds if not grouped else None,
                        smooth=r.smooth, auto=r.auto, weight_clip=r.weight_clip, heads=heads,
                        activation_clip=r.activation_clip, act_groups=act_groups,
                        prologue=prologue and not conv and Scheme.ASYMMETRIC not in schemes and not r.auto
                        and (rank is None or rank <= low_rank.FUSED_DOWN_MAX),   # x @ L1 accumulated in the kernel
                        rows=site.rows, conv=site.conv, cpu_gemm=cpu,
                        group_size=config.group_size if grouped else None, rounding=r.rounding,
                        low_rank=rank, reasons=reasons)
