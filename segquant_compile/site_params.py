"""SiteParams: the numbers one quantized site runs with, as a frozen record, and the functions that
make it. A record is never edited: packing, a calibration's freeze and a first call's decisions
each return a new one from (statistics, float weight, lowering, the record before).

Searches (SmoothQuant's alpha, the static clip factor, the schemes of dualscale="auto") score
each candidate by the site's output SQNR on kept rows, run as the site runs on this device."""
from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass

import torch
from torch import Tensor

from segquant_compile.lowering import low_rank
from segquant_compile.lowering import quantize as Q
from segquant_compile.lowering import scheme_choice
from segquant_compile.lowering.conv import tap_major_columns
from segquant_compile.lowering.gptq import DAMP, FIRST_CALL_DAMP, gptq_int4, gptq_int8
from segquant_compile.lowering.linear import quantized_linear
from segquant_compile.lowering.ops import column_sums
from segquant_compile.lowering.site_lowering import ActivationClip, SiteLowering, SmoothPolicy
from segquant_compile import statistics
from segquant_compile.statistics import SiteStatistics

# GPTQ on one call's rows only with at least this many rows per column of the widest K segment:
# with fewer it fits that call (docs/results.md, first-call GPTQ)
FIRST_CALL_ROWS_PER_K = 4
SMOOTH_GRID = (0.0, 0.25, 0.5, 0.75)
# static steps: the calibrated range scaled by one of these (1 included) where the site's output
# SQNR on its calibration rows is best: a range set by a few outlier rows wastes the grid on the rest
ACT_CLIP_GRID = (0.9, 0.8, 0.7, 0.6, 0.5)
PACKED_FIELDS = ("packed", "d_w", "colsum", "l1", "l2")
STEP_FIELDS = ("d_pos", "d_neg", "zp", "smooth")


@dataclass(frozen=True, eq=False)
class SiteParams:
    packed: Tensor                       # the quantized weight (lowering/quantize.py pack_weight)
    d_w: Tensor                          # its steps
    colsum: Tensor | None                # grid column sums per K segment (zero-point corrections)
    l1: Tensor | None = None             # the low-rank branch's down-projection [K, r] (lowering/low_rank.py)
    l2: Tensor | None = None             # its up-projection [r, N]
    smooth: Tensor | None = None         # SmoothQuant's divisor per input channel
    alpha: float | None = None
    smooth_note: str | None = None       # why a site to smooth on its first call was not
    d_pos: Tensor | None = None          # static activation steps [1, S] (DualScale: the positive side)
    d_neg: Tensor | None = None          # DualScale's negative side (the same as d_pos elsewhere)
    zp: Tensor | None = None             # zero points [1, S] (asymmetric segments)
    act_clip: float | None = None        # static: the factor of the calibrated range kept
    chosen: tuple[str, ...] | None = None    # schemes measured per segment (dualscale="auto")
    candidates: tuple | None = None      # per segment: scheme -> SQNR (dB)
    sqnr: float | None = None            # the site's output SQNR on its rows (dB)
    rows_source: str | None = None       # where GPTQ's rows came from
    nearest_note: str | None = None      # why a GPTQ site rounds to nearest
    dynamic_note: str | None = None      # why a static site runs dynamic (unusable calibration)

    def replace(self, **changes) -> "SiteParams":
        return dataclasses.replace(self, **changes)

    def to(self, device) -> "SiteParams":
        """The record with its tensors on `device` (layouts kept)."""
        return self.replace(**{f.name: getattr(self, f.name).to(device) for f in dataclasses.fields(self)
                               if isinstance(getattr(self, f.name), Tensor)})


def applied(lowering: SiteLowering, params: SiteParams | None) -> SiteLowering:
    """`lowering` (a state's, or a graph's with its kernel choices) with what the record decided:
    the measured schemes, dynamic activations, no smoothing input where there are no factors."""
    if params is None:
        return lowering
    if params.chosen is not None:
        lowering = lowering.with_schemes(params.chosen, "schemes measured (dualscale='auto')")
    if params.dynamic_note is not None:
        lowering = lowering.as_dynamic(params.dynamic_note)
    if lowering.smooth is not None and params.smooth is None:
        lowering = dataclasses.replace(lowering, smooth=None)
    return lowering


def float_weight(weight: Tensor, site) -> Tensor:
    """The weight as the GEMM's [N, K] (a conv's [N, C, kh, kw] channel-major like im2col)."""
    w = weight.detach()
    if site.conv is not None:
        return w.reshape(w.shape[0], -1)
    return w if site.weight_nk else w.t()


# ---------------------------------------------------------------------- packing
def packed(w_nk: Tensor, lowering: SiteLowering, params: SiteParams | None,
           hessians: tuple[list[Tensor], float] | None = None) -> SiteParams:
    """`params` (None: a first packing) with the weight packed under its smoothing factors,
    rounded by GPTQ on `hessians` (per K segment, damping) where given, else to nearest. With a
    low-rank branch, what is packed is the residual of the smoothed weight beside it."""
    smooth = params.smooth if params is not None else None
    w = w_nk.float()
    if smooth is not None:
        w = w * smooth
    l1 = l2 = None
    if lowering.low_rank:
        w, l1, l2 = low_rank.split(w, lowering.low_rank, smooth, w_nk.dtype)
    lo = applied(lowering, params)
    rounded = _gptq(w, lo, smooth, *hessians) if hessians is not None else None
    weight, d_w, grid = Q.pack_weight(w, lo, rounded)
    colsum = column_sums(grid, lo.g_bounds or lo.k_bounds) if lo.format in ("int8", "w4a8") else None
    if params is None:
        return SiteParams(weight, d_w, colsum, l1, l2)
    return params.replace(packed=weight, d_w=d_w, colsum=colsum, l1=l1, l2=l2)


def quantized_part(w_nk: Tensor, params: SiteParams) -> Tensor:
    """The float weight [N, K] the packed grid stands for, before smoothing: the weight less its
    low-rank branch (the whole weight without one)."""
    w = w_nk.float()
    return w if params.l1 is None else w - low_rank.branch_weight(params.l1, params.l2)


def _gptq(w: Tensor, lo: SiteLowering, smooth: Tensor | None, hessians: list[Tensor], damp: float):
    """(grid [K, N], steps) of the (smoothed) weight, rounded by GPTQ on the rows' Hessians (of
    the rows divided by the smoothing factors, as the GEMM sees them)."""
    if smooth is not None:
        kb = lo.k_bounds
        inv = [(1 / smooth[a:b]).to(h.device) for a, b, h in zip(kb[:-1], kb[1:], hessians)]
        hessians = [h * i[:, None] * i[None, :] for h, i in zip(hessians, inv)]
    if lo.group_size is not None:
        return gptq_int4(w, hessians, lo.k_bounds, lo.g_bounds, lo.weight_clip, damp)
    steps = Q.weight_steps(w, lo.out_bounds, Q.grid(lo.format), lo.weight_clip)
    return gptq_int8(w, hessians, lo.k_bounds, steps, damp), steps


def dequantized(params: SiteParams, lowering: SiteLowering) -> Tensor:
    """The packed weight's grid values times its steps, fp32 [K, N]."""
    return Q.dequantized_weight(params.packed, params.d_w, applied(lowering, params))


# ---------------------------------------------------------------------- running on rows
def run_rows(params: SiteParams, lowering: SiteLowering, rows: Tensor, bias: Tensor | None,
             dequantized_weight: Tensor | None = None) -> Tensor:
    """The quantized site on GEMM rows [M, K] (eagerly, as its lowering runs on this device)."""
    lo = applied(lowering, params)
    bias = bias.detach().float() if bias is not None else None
    if lo.conv is not None and not lo.static:
        rows, params, lo, dequantized_weight = _pixel_groups(rows, params, lo, dequantized_weight)
    if lo.cpu_gemm == "fp32" and rows.device.type == "cpu":
        w = dequantized_weight if dequantized_weight is not None else dequantized(params, lowering)
        d_w = None
    else:
        w, d_w = params.packed, params.d_w
    return quantized_linear(rows, w, d_w, bias, params.d_pos, params.d_neg, params.zp, params.smooth,
                            params.colsum, lo.k_bounds, lo.codes, fmt=lo.format, cpu_gemm=lo.cpu_gemm,
                            g_bounds=lo.g_bounds, l1=params.l1, l2=params.l2)


def _pixel_groups(rows: Tensor, params: SiteParams, lo: SiteLowering, dequantized_weight: Tensor | None):
    """A dynamic conv site as a linear site on its im2col rows: columns in (segment, tap,
    channel) order and a K segment per (segment, tap) group, so each row's steps are those of the
    input pixels its taps read (lowering/conv.py, tap_major_columns)."""
    order, bounds = tap_major_columns(lo.k_bounds, lo.conv.taps)
    order = order.to(rows.device)
    grid = params.packed.index_select(0, order.to(params.packed.device))
    pick = lambda t: t.index_select(0, order.to(t.device)) if t is not None else None   # noqa: E731
    params = params.replace(packed=Q.packed_layout(grid, lo.format), l1=pick(params.l1), smooth=pick(params.smooth),
                            colsum=column_sums(grid, bounds))
    schemes = tuple(s for s in lo.schemes for _ in range(lo.conv.taps))
    lo = dataclasses.replace(lo, k_bounds=bounds, schemes=schemes, conv=None)
    return rows.index_select(1, order), params, lo, pick(dequantized_weight)


def site_sqnr(params: SiteParams, lowering: SiteLowering, w_nk: Tensor, rows: Tensor, bias: Tensor | None) -> float:
    b = bias.detach().float() if bias is not None else 0
    return Q.sqnr_db(rows @ w_nk.float().t() + b, run_rows(params, lowering, rows, bias))


# ---------------------------------------------------------------------- searches
def smoothing_factors(amax_x: Tensor, amax_w: Tensor, alpha: float, taps: int = 1) -> Tensor:
    """SmoothQuant's per-channel divisors amax_x^alpha / amax_w^(1 - alpha), raised to at least
    the median over the channels seen active: only loud channels are divided down. A channel the
    observed rows left quiet or at zero (a ReLU unit the first call never fired) would otherwise
    be multiplied up to 1e5x, and once it fires set the token's step by itself. A conv's K columns
    are (channel, tap) (`taps` per channel): one divisor per input channel, from its largest
    weight over the taps, repeated per tap (the input is divided per channel, before im2col)."""
    if taps > 1:
        amax_x, amax_w = amax_x.view(-1, taps).amax(dim=1), amax_w.view(-1, taps).amax(dim=1)
    s = amax_x.clamp(min=1e-5).pow(alpha) / amax_w.clamp(min=1e-5).pow(1 - alpha)
    active = amax_x > 1e-3 * amax_x.max()
    s = torch.maximum(s, s[active].median()) if active.any() else torch.ones_like(s)
    return s.repeat_interleave(taps) if taps > 1 else s


def segment_ranges(ranges: tuple[Tensor, Tensor], k_bounds, smooth: Tensor | None) -> tuple[Tensor, Tensor]:
    """Per K segment: the largest positive and negative value, of the rows as the GEMM sees them."""
    pos, neg = ranges if smooth is None else (ranges[0] / smooth, ranges[1] / smooth)
    return (torch.stack([pos[a:b].max() for a, b in zip(k_bounds[:-1], k_bounds[1:])]),
            torch.stack([neg[a:b].max() for a, b in zip(k_bounds[:-1], k_bounds[1:])]))


def with_static_steps(params: SiteParams, lowering: SiteLowering, pos: Tensor, neg: Tensor) -> SiteParams:
    lo = applied(lowering, params)
    d_pos, d_neg, zp = Q.static_steps(pos, neg, list(lo.codes), lo.format)
    return params.replace(d_pos=d_pos, d_neg=d_neg, zp=zp if lo.asymmetric else None)


def with_smoothing(params: SiteParams, lowering: SiteLowering, w_nk: Tensor, ranges, alpha: float | None,
                   hessians=None) -> SiteParams:
    """The record with SmoothQuant's factors at `alpha` (None: none) from `ranges`, the weight
    packed under them and, if static, the steps of the smoothed ranges."""
    taps = lowering.conv.taps if lowering.conv is not None else 1
    smooth = None if alpha is None else smoothing_factors(torch.maximum(*ranges), w_nk.float().abs().amax(dim=0),
                                                          alpha, taps)
    params = packed(w_nk, lowering, params.replace(alpha=alpha, smooth=smooth), hessians)
    if applied(lowering, params).static:
        params = with_static_steps(params, lowering, *segment_ranges(ranges, lowering.k_bounds, smooth))
    return params


def choose_smoothing(params, lowering, w_nk, stats: SiteStatistics, rows, bias, hessians=None) -> SiteParams:
    """SmoothQuant's factors from the ranges observed: the given alpha, or the best by the site's
    output SQNR (no smoothing included), with factors and steps from the even calls scored on the
    odd calls' rows (chosen and scored on the same rows they fit a few calibration inputs). The
    alpha is chosen on weights rounded to nearest; GPTQ (`hessians`) rounds once, for the choice."""
    option = lowering.smooth
    if option is None:
        return with_smoothing(params, lowering, w_nk, stats.ranges(), None, hessians)
    if not isinstance(option, SmoothPolicy):   # a given alpha
        return with_smoothing(params, lowering, w_nk, stats.ranges(), float(option), hessians)
    held = stats.held_out()
    ranges, score_rows = (held[:2], held[2]) if held is not None else (stats.ranges(), rows)
    best = None
    for alpha in (None, *SMOOTH_GRID):
        trial = with_smoothing(params, lowering, w_nk, ranges, alpha)
        score = site_sqnr(trial, lowering, w_nk, score_rows, bias)
        if best is None or score > best[0]:
            best = (score, alpha)
    return with_smoothing(params, lowering, w_nk, stats.ranges(), best[1], hessians)


def search_activation_clip(params, lowering, w_nk, ranges, rows, bias) -> SiteParams:
    """One factor per site (ACT_CLIP_GRID or 1) scaling every segment's calibrated range, the best
    site output SQNR on the calibration rows; values beyond saturate."""
    pos, neg = segment_ranges(ranges, lowering.k_bounds, params.smooth)
    best = (site_sqnr(params, lowering, w_nk, rows, bias), 1.0, params)
    for c in ACT_CLIP_GRID:
        trial = with_static_steps(params, lowering, pos * c, neg * c)
        score = site_sqnr(trial, lowering, w_nk, rows, bias)
        if score > best[0]:
            best = (score, c, trial)
    return best[2].replace(act_clip=best[1], sqnr=best[0])


def choose_schemes(params: SiteParams, lowering: SiteLowering, w_nk: Tensor, rows: Tensor) -> SiteParams:
    """dualscale="auto": every candidate scheme measured per segment on these rows, the rule's
    choice kept (lowering/scheme_choice.py)."""
    w = quantized_part(w_nk, params)
    if params.smooth is not None:   # as the GEMM sees them
        rows, w = rows / params.smooth, w * params.smooth
    deq, groups = dequantized(params, lowering), 1
    if lowering.conv is not None and not lowering.static:   # steps per input pixel (_pixel_groups)
        order, _ = tap_major_columns(lowering.k_bounds, lowering.conv.taps)
        groups, order = lowering.conv.taps, order.to(rows.device)
        rows, w, deq = rows.index_select(1, order), w.index_select(1, order.to(w.device)), deq.index_select(0, order)
    candidates = scheme_choice.segment_sqnr(rows, w, deq, lowering.k_bounds, lowering.static, lowering.format, groups)
    return params.replace(candidates=tuple(candidates), chosen=scheme_choice.choose(candidates))


# ---------------------------------------------------------------------- a calibration's freeze
def frozen(params: SiteParams, lowering: SiteLowering, w_nk: Tensor, stats: SiteStatistics, bias: Tensor | None,
           gptq: bool, name: str) -> SiteParams:
    """The record a calibration decides: schemes (dualscale="auto"), SmoothQuant's factors, GPTQ's
    rounding (`gptq`), static steps (clip-searched where asked). A segment whose calibrated range is
    zero gets no step: the site stays dynamic, with a warning."""
    rows = stats.rows
    hessians = (stats.gptq_hessians(w_nk.device), DAMP) if gptq else None
    params = params.replace(dynamic_note=None, act_clip=None, sqnr=None)
    if gptq:
        params = params.replace(rows_source="calibration", nearest_note=None)
    pos, neg = segment_ranges(stats.ranges(), lowering.k_bounds, None)
    empty = [i for i, (p, n) in enumerate(zip(pos.tolist(), neg.tolist())) if p <= 0 and n <= 0]
    if empty and applied(lowering, params).static:
        note = f"calibrated range is zero on input segment(s) {empty} (only blank inputs seen): kept dynamic"
        warnings.warn(f"segquant: {name}: {note}", stacklevel=4)
        params = params.replace(dynamic_note=note, d_pos=None, d_neg=None, zp=None)
        params = with_smoothing(params, lowering, w_nk, stats.ranges(), None, hessians)
        return params.replace(sqnr=site_sqnr(params, lowering, w_nk, rows, bias))
    if lowering.auto and (lowering.static or params.chosen is None):   # dynamic: chosen on its first call
        params = choose_schemes(params, lowering, w_nk, rows)
    # a calibration's ranges decide the smoothing, whatever a first call decided
    params = choose_smoothing(params, lowering, w_nk, stats, rows, bias, hessians)
    clip = lowering.activation_clip
    if applied(lowering, params).static and (clip is ActivationClip.SEARCH or
                                             clip is ActivationClip.SEARCH_IF_UNSMOOTHED and params.smooth is None):
        return search_activation_clip(params, lowering, w_nk, stats.ranges(), rows, bias)
    return params.replace(sqnr=site_sqnr(params, lowering, w_nk, rows, bias))


# ---------------------------------------------------------------------- a dynamic site's first call
def first_call_rows(stats: SiteStatistics, lowering: SiteLowering) -> tuple[Tensor | None, str | None]:
    """(the first call's finite rows, None), or (None, why there are too few to fit to: none, or
    fewer than FIRST_CALL_ROWS_PER_K per column of the widest K segment)."""
    if stats.kept is None:
        return None, "the first call's rows were all NaN/Inf"
    need = FIRST_CALL_ROWS_PER_K * lowering.widest_segment
    n = stats.rows_seen if stats.hessians is not None else stats.rows_held   # the rows GPTQ would fit
    if n < need:
        kept = "" if n == stats.rows_seen else (f" kept of {stats.rows_seen} (a K segment wider than "
                                               f"{statistics.HESSIAN_MAX_K} sums no Hessian)")
        return None, (f"the first call gave {n} rows{kept}, fewer than {need} "
                      f"({FIRST_CALL_ROWS_PER_K} per column of a K segment)")
    return stats.rows, None


def first_call_smoothing(params, lowering, w_nk, stats, bias) -> SiteParams:
    """SmoothQuant with dynamic activations: the factors (alpha searched, or given) from the first
    call's ranges and rows, on weights rounded to nearest. smooth="auto" leaves the site
    unsmoothed: one call's ranges miss the channels later calls use."""
    if lowering.smooth is SmoothPolicy.SEARCH_FROM_CALIBRATION:
        return params
    rows, note = first_call_rows(stats, lowering)
    if rows is None:
        return params.replace(smooth_note=note)
    return choose_smoothing(params.replace(smooth_note=None), lowering, w_nk, stats, rows, bias)


def first_call_rounding(params, lowering, w_nk, stats, name: str) -> SiteParams:
    """weight_rounding="auto" with dynamic activations: GPTQ on the first call's rows (damped
    more: FIRST_CALL_DAMP). Without finite rows, or with too few to fit GPTQ to, the weights stay
    rounded to nearest, said in the report."""
    rows, note = first_call_rows(stats, lowering)
    if rows is None:
        if stats.kept is None:
            warnings.warn(f"segquant: {name}: {note}: weights rounded to nearest", stacklevel=4)
        return params.replace(nearest_note=note, rows_source=None)
    params = packed(w_nk, lowering, params, (stats.gptq_hessians(w_nk.device), FIRST_CALL_DAMP))
    return params.replace(rows_source="the first call", nearest_note=None)
