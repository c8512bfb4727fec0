"""QuantState: everything segquant keeps for one weight under one SiteLowering (packed weight,
steps, calibration statistics), shared by every graph, graph break and recompile that touches
that weight. The Registry finds states by weight tensor (weakly: a state dies with its weight)."""
from __future__ import annotations

import dataclasses
import hashlib
import threading
import warnings
import weakref

import torch
from torch import Tensor

from segquant_compile.lowering import quantize as Q
from segquant_compile.lowering import scheme_choice
from segquant_compile.lowering.gptq import DAMP, FIRST_CALL_DAMP, segment_hessians
from segquant_compile.lowering.linear import quantized_linear
from segquant_compile.lowering.ops import column_sums
from segquant_compile.lowering.site_lowering import ActivationClip, Rounding, SiteLowering, SmoothPolicy
from segquant_compile.passes import LinearSite

SAMPLE_ROWS = 512          # activation rows kept per site for SQNR and smoothing search
GPTQ_ROWS = 2048           # rows kept for a GPTQ site's Hessian where none is summed
# GPTQ's Hessian X^T X is summed over every row observed where the widest K segment has at most
# this many columns (K^2 fp32 per segment: 64 MB at 4096; with fewer rows kept, `rows_kept`, no
# more memory than before up to K = 1536); wider sites fit GPTQ_ROWS sampled rows (damped where
# fewer than K)
HESSIAN_MAX_K = 4096
# GPTQ on one call's rows only with at least this many rows per column of the widest K segment:
# with fewer it fits that call (a 256-column layer on 256 rows: -2.4 dB on other rows against
# round to nearest; on 1024 rows +0.4 dB)
FIRST_CALL_ROWS_PER_K = 4
SMOOTH_GRID = (0.0, 0.25, 0.5, 0.75)
# static steps: the calibrated range scaled by one of these (1 included) where the site's output
# SQNR on its calibration rows is best: a range set by a few outlier rows wastes the grid on the
# rest. Measured (static default, seeds 1-2, 2x100 images): ViT 42.19 -> 44.03 dB, DiT 42.91 ->
# 43.30; per segment instead of per site: no better (ViT 43.92)
ACT_CLIP_GRID = (0.9, 0.8, 0.7, 0.6, 0.5)
PROBES = 64                # weight values compared at every call: catches edits through `.data`


def fingerprint(t: Tensor | None) -> str | None:
    """Identifies a tensor's values cheaply: shape, dtype and a strided sample with the sum."""
    if t is None:
        return None
    flat = t.detach().reshape(-1)
    step = max(1, flat.numel() // 65536)
    sample = flat[::step].float().cpu().clone()   # a copy: numpy views pin the storage
    h = hashlib.sha256(str((tuple(t.shape), str(t.dtype))).encode())
    h.update(sample.numpy().tobytes())
    h.update(repr(round(float(flat.sum(dtype=torch.float64)), 6)).encode())
    return h.hexdigest()[:32]


def probe(weight: Tensor) -> Tensor:
    """A view of PROBES values of a weight, evenly spread, compared at every call: `w.data += d`
    and `w.data.copy_(new)` bump no version counter but write into this view's storage, and a
    LoRA merge or a copy changes nearly every value. An edit of a few single values can pass
    unseen; swapping the storage (`w.data = new`) changes the stamp instead."""
    flat = weight.detach().reshape(-1)   # a view for contiguous weights (the usual case)
    step = max(1, flat.numel() // PROBES)
    return flat[step // 2::step][:PROBES]


def smoothing_factors(amax_x: Tensor, amax_w: Tensor, alpha: float) -> Tensor:
    """SmoothQuant's per-channel divisors amax_x^alpha / amax_w^(1 - alpha), raised to at least
    the median over the channels seen active: only loud channels are divided down. A channel the
    observed rows left quiet or at zero (a ReLU unit the first call never fired) would otherwise
    be multiplied up to 1e5x, and once it fires set the token's step by itself (MNIST DiT, first
    call at sigma 80: 44.7 -> 18.9 dB)."""
    s = amax_x.clamp(min=1e-5).pow(alpha) / amax_w.clamp(min=1e-5).pow(1 - alpha)
    active = amax_x > 1e-3 * amax_x.max()
    return torch.maximum(s, s[active].median()) if active.any() else torch.ones_like(s)


class FloatWeightsReleased(RuntimeError):
    """The float copy of a quantized weight was freed (release_float_weights=True)."""


class QuantState:
    def __init__(self, site: LinearSite, lowering: SiteLowering, weight: Tensor, source: str | None = None):
        self.site = site
        self.name = site.name            # the full module path once the front end resolves it
        self.base = lowering             # the lowering the options decided
        self.source = source             # the saved directory it was loaded from (None: made here)
        self.dynamic_note: str | None = None   # why a static site runs dynamic (unusable calibration)
        self.stale_note: str | None = None     # static steps calibrated before an upstream weight edit
        self.chosen: tuple[str, ...] | None = None   # schemes measured for dualscale="auto"
        self.candidates: list[dict[str, float]] | None = None   # per segment: scheme -> SQNR (dB)
        self.zp: Tensor | None = None            # static zero points [1, S] (asymmetric segments)
        self.smooth: Tensor | None = None
        self.alpha: float | None = None
        self.act_clip: float | None = None       # static: the factor of the calibrated range kept
        # SmoothQuant's factors wait for ranges: calibration's, or with dynamic activations the first call's
        self.smooth_pending = lowering.smooth is not None
        self.smooth_note: str | None = None      # why a site to smooth on its first call was not
        # calibration statistics, per input channel: positive and negative maxima
        self.pos_max: Tensor | None = None
        self.neg_max: Tensor | None = None
        self.sample: list[Tensor] = []          # calibration rows: a uniform sample over all calls
        self._reservoir: Tensor | None = None
        self._row_calls: Tensor | None = None   # the call each reservoir row came from
        self._even_max: tuple[Tensor, Tensor] | None = None   # (pos, neg) maxima of even-numbered calls
        self.rows_seen = 0
        self.observed_calls = 0
        self.d_x: Tensor | None = None
        self.d_neg: Tensor | None = None
        self.sqnr: float | None = None
        self.released = False
        self.bias: Tensor | None = None   # the site's bias, for SQNR at freeze (set while calibrating)
        self._placeholders: dict[str, Tensor] = {}
        self._dequantized: tuple | None = None   # (packed, d_w, fp32 [K, N]) for the CPU fp32 GEMM
        # GPTQ: rounded to nearest until calibration (or first-call) rows arrive (then frozen)
        self.awaiting_rows = lowering.gptq
        self.rows_source: str | None = None      # where GPTQ's rows came from (the report)
        self.nearest_note: str | None = None     # why a first-call GPTQ site rounds to nearest
        # GPTQ's Hessian per K segment, summed over the rows observed (None: from the kept rows)
        self._hessians: list[Tensor] | None = None
        # (Hessians per K segment, damping), set only while freeze() or the first call re-packs
        self._gptq_hessians: tuple[list[Tensor], float] | None = None
        self._lock = threading.Lock()
        self.pack(weight)

    @property
    def lowering(self) -> SiteLowering:
        """What runs: the base lowering with the measured schemes, dynamic when calibration was unusable."""
        return self.applied_to(self.base)

    def applied_to(self, lowering: SiteLowering) -> SiteLowering:
        """`lowering` (this state's, or a graph's with its kernel choices) with what calibration
        decided: the measured schemes, dynamic activations."""
        if self.chosen is not None:
            lowering = lowering.with_schemes(self.chosen, "schemes measured (dualscale='auto')")
        if self.dynamic_note is not None:
            lowering = lowering.as_dynamic(self.dynamic_note)
        if lowering.smooth is not None and self.smooth is None:   # no factors (yet, or searched to none):
            lowering = dataclasses.replace(lowering, smooth=None)   # no divisor input in the graph
        return lowering

    @property
    def decided(self) -> tuple:
        """What changes the compiled graph: the key of a runner's converted graphs."""
        return self.chosen, self.dynamic_note, self.smooth is not None

    @property
    def needs_choice(self) -> bool:
        return self.base.auto and self.chosen is None

    @property
    def calibrated_by_rows(self) -> bool:
        """Calibration sets something here: static steps, GPTQ's rounding, SmoothQuant's factors."""
        return self.base.static or self.base.gptq or self.base.smooth is not None

    @property
    def awaiting_first_call(self) -> bool:
        """GPTQ's rounding waits for the first call's rows (weight_rounding="auto", dynamic)."""
        return self.awaiting_rows and self.base.rounding is Rounding.GPTQ_FIRST_CALL

    @property
    def first_call_pending(self) -> bool:
        """Dynamic, with something decided on the first call's rows still to decide: the
        schemes (dualscale="auto"), GPTQ's rounding (weight_rounding="auto"), SmoothQuant's factors."""
        return not self.base.static and (self.needs_choice or self.awaiting_first_call or self.smooth_pending)

    # ------------------------------------------------------------------ weights
    @property
    def frozen(self) -> bool:
        """Ready to run quantized: dynamic, or static with steps."""
        return (not self.lowering.static or self.d_x is not None) and not self.awaiting_rows \
            and not self.smooth_pending

    def _float_weight(self, weight: Tensor) -> Tensor:
        w = weight.detach()
        if self.site.conv is not None:   # [N, C, kh, kw] -> [N, K], K channel-major like im2col
            return w.reshape(w.shape[0], -1)
        return w if self.site.weight_nk else w.t()

    def pack(self, weight: Tensor) -> None:
        """Quantize the weight (with the smoothing factors, if any): packed [K, N] + steps."""
        if self.released:
            raise FloatWeightsReleased(
                f"segquant: the weight of {self.name} changed after its float copy was released "
                f"(options release_float_weights=True); compile the model again to change weights")
        w = self._float_weight(weight).float()
        if self.smooth is not None:
            w = w * self.smooth
        lo = self.lowering
        rounded = None
        if self._gptq_hessians is not None:
            rounded = self._gptq(w, lo)
        elif lo.gptq and not self.awaiting_rows:
            warnings.warn(f"segquant: {self.name}: weight changed after GPTQ calibration; re-packed with "
                          f"round-to-nearest (calibrate again for GPTQ)", stacklevel=3)
        self.packed, self.d_w, grid = Q.pack_weight(w, lo, rounded)
        # zero-point corrections need the grid's column sums per K segment (per group: 4-bit)
        self.colsum = column_sums(grid, lo.g_bounds or lo.k_bounds) if lo.format in ("int8", "w4a8") else None
        self.fingerprint = fingerprint(weight)
        self._stamp = self.stamp(weight)
        self._weight = weakref.ref(weight)
        # a view made once (slicing a Parameter per call costs ~4 us); a non-contiguous weight's
        # probe is a copy, so it is taken again at each check
        view = probe(weight)
        self._probe_view = view if weight.is_contiguous() else None
        self._probe = view.clone()

    def _gptq(self, w: Tensor, lo: SiteLowering) -> tuple[Tensor, Tensor]:
        """(grid [K, N], steps) of the (smoothed) weight, rounded by GPTQ on the calibration
        rows' Hessians (of the rows divided by the smoothing factors, as the GEMM sees them)."""
        from segquant_compile.lowering.gptq import gptq_int4, gptq_int8
        hessians, damp = self._gptq_hessians
        if self.smooth is not None:
            kb = lo.k_bounds
            inv = [(1 / self.smooth[a:b]).to(h.device) for a, b, h in zip(kb[:-1], kb[1:], hessians)]
            hessians = [h * i[:, None] * i[None, :] for h, i in zip(hessians, inv)]
        if lo.group_size is not None:
            return gptq_int4(w, hessians, lo.k_bounds, lo.g_bounds, lo.weight_clip, damp)
        steps = Q.weight_steps(w, lo.out_bounds, Q.grid(lo.format), lo.weight_clip)
        return gptq_int8(w, hessians, lo.k_bounds, steps, damp), steps

    def _gptq_input(self, rows: Tensor, device) -> list[Tensor]:
        """GPTQ's Hessians per K segment: summed over every row observed where accumulated,
        else those of the kept rows."""
        hessians = self._hessians if self._hessians is not None else segment_hessians(rows, self.base.k_bounds)
        return [h.to(device) for h in hessians]

    @property
    def rows_kept(self) -> int:
        """How many rows the reservoir keeps: SAMPLE_ROWS for the SQNR, scheme and smoothing
        searches; GPTQ_ROWS for GPTQ where no Hessian is summed; where one is, as many as fit in
        the memory GPTQ_ROWS took beside its K^2 (at least SAMPLE_ROWS): the searches keep most
        of their rows on narrow sites (make demo: 38.8 dB with 2048, 38.5 with 512)."""
        if not self.awaiting_rows:
            return SAMPLE_ROWS
        if not self._sums_hessian:
            return GPTQ_ROWS
        return max(SAMPLE_ROWS, GPTQ_ROWS - self.site.in_features)

    @property
    def _sums_hessian(self) -> bool:
        """GPTQ waits for rows and the Hessian is small enough to sum over all of them."""
        return self.awaiting_rows and self.base.widest_segment <= HESSIAN_MAX_K

    def smooth_on_first_call(self) -> None:
        """SmoothQuant with dynamic activations: the factors (alpha searched, or given) from the
        first call's per-channel ranges and rows, then fixed like its schemes. Chosen on weights
        rounded to nearest, before GPTQ rounds them (as at a calibration's freeze). smooth="auto"
        leaves the site unsmoothed: one call's ranges miss the channels later calls use."""
        self.smooth_pending = False
        if self.base.smooth is SmoothPolicy.SEARCH_FROM_CALIBRATION:
            return
        rows, self.smooth_note = self._first_call_rows()
        if rows is not None:
            self._choose_smooth(self.weight(), rows)

    def _first_call_rows(self) -> tuple[Tensor | None, str | None]:
        """(the first call's finite rows, None), or (None, why there are too few to fit to: none,
        or fewer than FIRST_CALL_ROWS_PER_K per column of the widest K segment)."""
        if not self.sample:
            return None, "the first call's rows were all NaN/Inf"
        rows = torch.cat(self.sample)
        need = FIRST_CALL_ROWS_PER_K * self.base.widest_segment
        n = self.rows_seen if self._hessians is not None else len(rows)   # the rows GPTQ would fit
        if n < need:
            kept = "" if n == self.rows_seen else (f" kept of {self.rows_seen} (a K segment wider than "
                                                   f"{HESSIAN_MAX_K} sums no Hessian)")
            return None, (f"the first call gave {n} rows{kept}, fewer than {need} "
                          f"({FIRST_CALL_ROWS_PER_K} per column of a K segment)")
        return rows, None

    def round_on_first_call(self) -> None:
        """weight_rounding="auto" with dynamic activations: GPTQ on the first call's rows (damped
        more: lowering/gptq.py FIRST_CALL_DAMP), then fixed like the schemes chosen there. A site
        whose first call gave no finite row, or too few rows to fit GPTQ to (FIRST_CALL_ROWS_PER_K),
        keeps round to nearest, said in the report."""
        self.awaiting_rows = False
        rows, self.nearest_note = self._first_call_rows()
        if rows is None:
            if not self.sample:
                warnings.warn(f"segquant: {self.name}: {self.nearest_note}: weights rounded to nearest", stacklevel=3)
            return
        weight = self.weight()
        self._gptq_hessians = (self._gptq_input(rows, weight.device), FIRST_CALL_DAMP)
        try:
            self.pack(weight)
        finally:
            self._gptq_hessians = self._hessians = None
        self.rows_source = "the first call"

    @property
    def dequantized(self) -> Tensor:
        """The packed weight's grid values times its steps, fp32 [K, N]: the operand of the CPU
        fp32 GEMM (lowering/cpu_linear.py), made once per packing rather than per call (a
        per-call conversion cost ~25% of the forward and fresh buffers: page faults)."""
        cached = self._dequantized
        if cached is None or cached[0] is not self.packed or cached[1] is not self.d_w:
            cached = self._dequantized = (self.packed, self.d_w, Q.dequantized_weight(self.packed, self.d_w,
                                                                                      self.lowering))
        return cached[2]

    @staticmethod
    def stamp(weight: Tensor):
        return weight._version, weight.untyped_storage().data_ptr()

    def is_current(self, weight: Tensor) -> bool:
        """Unchanged since packing: same version and storage, same probed values."""
        if self._stamp != self.stamp(weight):
            return False
        if self._probe is None:   # released: the storage is gone, the stamp says it all
            return True
        view = self._probe_view if self._probe_view is not None else probe(weight)
        return torch.equal(view, self._probe)

    def refresh(self, weight: Tensor) -> None:
        """Re-pack an edited or swapped weight (the activation steps stay). GPTQ on the first
        call's rows rounds again on the next call's."""
        with self._lock:
            if not self.is_current(weight):
                if self.base.rounding is Rounding.GPTQ_FIRST_CALL:
                    self.awaiting_rows, self.rows_source, self.nearest_note = True, None, None
                self.pack(weight)

    def release(self, weight: Tensor) -> int:
        """Free the float weight's storage (metadata stays, so dynamo guards still hold)."""
        with self._lock:
            if self.released:
                return 0
            storage = weight.untyped_storage()
            freed = storage.nbytes()
            storage.resize_(0)
            self.released = True
            self._stamp, self._probe, self._probe_view = self.stamp(weight), None, None
            RELEASED[id(weight)] = weakref.ref(weight)
            return freed

    # ------------------------------------------------------------------ calibration
    def observe(self, x: Tensor) -> None:
        if self.released:
            raise FloatWeightsReleased(
                f"segquant: cannot calibrate {self.name}: its float weight was released "
                f"(options release_float_weights=True); compile the float model again to recalibrate")
        x2, pos, neg = self._rows(x.detach())
        if self.first_call_pending:   # deciding on a call: skip NaN/Inf rows
            x2 = x2[torch.isfinite(x2).all(dim=1)]
            if not len(x2):
                return
            pos, neg = x2.amax(dim=0).clamp(min=0), (-x2).amax(dim=0).clamp(min=0)
        if not (torch.isfinite(pos).all() and torch.isfinite(neg).all()):
            raise FloatingPointError(f"segquant: NaN or Inf reached the calibration observer of {self.name}")
        with self._lock:
            self.pos_max = pos if self.pos_max is None else torch.maximum(self.pos_max, pos)
            self.neg_max = neg if self.neg_max is None else torch.maximum(self.neg_max, neg)
            if self.observed_calls % 2 == 0:
                even = self._even_max
                self._even_max = (pos, neg) if even is None else (torch.maximum(even[0], pos),
                                                                  torch.maximum(even[1], neg))
            if self._sums_hessian:
                sums = [h.cpu() for h in segment_hessians(x2, self.base.k_bounds)]
                if self._hessians is None:
                    self._hessians = sums
                else:   # in place: no second K^2 per segment while adding
                    for total, h in zip(self._hessians, sums):
                        total.add_(h)
            self._keep_rows(x2, self.rows_kept)
            self.observed_calls += 1

    def _keep_rows(self, x2: Tensor, limit: int) -> None:
        """A uniform sample of every row observed so far, over all calls (reservoir sampling,
        Vitter's algorithm R): a sampler's late timesteps count as much as its first ones
        (keeping the first calls' rows would fit SQNR, scheme choice and GPTQ to high noise)."""
        seen, n = self.rows_seen, len(x2)
        if self._reservoir is None:
            self._reservoir = torch.empty((limit, x2.shape[1]))
            self._row_calls = torch.full((limit,), -1, dtype=torch.long)
        g = torch.Generator().manual_seed(self.observed_calls)
        x2 = x2[torch.randperm(n, generator=g)].cpu()   # which rows fill the free slots: random too
        fill = min(n, max(0, limit - seen))
        self._reservoir[seen:seen + fill] = x2[:fill]
        self._row_calls[seen:seen + fill] = self.observed_calls
        if n > fill:   # row number i replaces a random slot with probability limit / (i + 1)
            slot = (torch.rand(n - fill, generator=g, dtype=torch.float64)
                    * torch.arange(seen + fill + 1, seen + n + 1, dtype=torch.float64)).long()
            kept = slot < limit
            # the last row drawn for a slot holds it, as in the algorithm's sequential order: an
            # index_put with repeated indices keeps any one of them (not reproducible run to run)
            order = torch.arange(n - fill)[kept]
            last = torch.full((limit,), -1, dtype=torch.long).scatter_reduce_(0, slot[kept], order, "amax")
            filled = last >= 0
            self._reservoir[filled] = x2[fill:][last[filled]]
            self._row_calls[filled] = self.observed_calls
        self.rows_seen = seen + n
        self.sample = [self._reservoir[:min(self.rows_seen, limit)]]

    def _rows(self, x: Tensor) -> tuple[Tensor, Tensor | None, Tensor | None]:
        """GEMM rows of an activation, with per-K-column positive and negative maxima. A conv's
        rows are im2col rows of SAMPLE_ROWS random output pixels (never the whole matrix)."""
        conv = self.site.conv
        if conv is None:
            x2 = x.reshape(-1, x.shape[-1]).float()
            return x2, x2.amax(dim=0).clamp(min=0), (-x2).amax(dim=0).clamp(min=0)
        from segquant_compile.lowering.conv import channel_ranges, im2col_rows
        ho, wo = conv.output_size(x.shape[2], x.shape[3])
        g = torch.Generator().manual_seed(self.observed_calls)
        pixels = torch.randperm(x.shape[0] * ho * wo, generator=g)[:SAMPLE_ROWS].to(x.device)
        return (im2col_rows(x.float(), conv, pixels), *channel_ranges(x, conv))

    def reset_calibration(self) -> None:
        """Forget statistics and steps (recalibrate, or a calibration that raised)."""
        self.stale_note = None
        self.pos_max = self.neg_max = self.d_x = self.d_neg = self.zp = self.sqnr = self.act_clip = None
        self.sample, self.observed_calls, self.rows_seen, self._reservoir = [], 0, 0, None
        self._row_calls = self._even_max = self._hessians = None
        # GPTQ rounds again, on the new rows
        self.awaiting_rows, self.rows_source, self.nearest_note = self.base.gptq, None, None
        if self.base.static:
            self.chosen = self.candidates = None
        self.smooth_pending, self.smooth_note = self.base.smooth is not None, None
        if self.smooth is not None or self.dynamic_note is not None:
            self.smooth, self.alpha, self.dynamic_note = None, None, None
            self.pack(self.weight())

    def discard_statistics(self) -> None:
        """Drop what a calibration collected, keeping steps frozen before it."""
        self.pos_max = self.neg_max = None
        self.sample, self.observed_calls, self.rows_seen, self._reservoir = [], 0, 0, None
        self._row_calls = self._even_max = self._hessians = None

    def weight(self) -> Tensor:
        """The float weight this state was packed from (held weakly: the state dies with it)."""
        weight = self._weight()
        if weight is None:
            raise RuntimeError(f"segquant: the weight of {self.name} is gone")
        return weight

    def freeze(self) -> None:
        """Turn the statistics into static steps (choosing SmoothQuant's alpha if asked). A
        segment whose calibrated range is zero gets no step: the site stays dynamic, with a warning."""
        if self.pos_max is None:
            raise RuntimeError(f"segquant: {self.name} saw no calibration data")
        weight = self.weight()
        rows = torch.cat(self.sample)
        gptq = self.awaiting_rows
        if gptq:   # the packings below round by GPTQ (SmoothQuant's search excepted)
            self._gptq_hessians = (self._gptq_input(rows, weight.device), DAMP)
        try:
            self._freeze_steps(weight, rows)
            self.awaiting_rows = self.smooth_pending = False
            self.stale_note = None
            if gptq:
                self.rows_source = "calibration"
        finally:
            self._gptq_hessians = self._hessians = None   # K^2 per segment: not held past its use

    def _freeze_steps(self, weight: Tensor, rows: Tensor) -> None:
        pos, neg = self._segment_ranges(None)
        empty = [i for i, (p, n) in enumerate(zip(pos.tolist(), neg.tolist())) if p <= 0 and n <= 0]
        if empty and self.lowering.static:
            note = (f"calibrated range is zero on input segment(s) {empty} (only blank inputs seen): "
                    f"kept dynamic")
            warnings.warn(f"segquant: {self.name}: {note}", stacklevel=3)
            self.dynamic_note = note
            self.d_x = self.d_neg = self.zp = None
            self._set_smooth(weight, None)
            self.sqnr = self._sqnr(weight, rows)
            return
        if self.base.auto and (self.base.static or self.chosen is None):   # dynamic: chosen on its first call
            self.choose_schemes(rows, weight)
        # a calibration's ranges decide the smoothing, whatever a first call decided (a call refused
        # before calibration, weight_rounding "gptq", had settled "auto" to none); packs the weight
        self._choose_smooth(weight, rows)
        clip = self.lowering.activation_clip
        if self.lowering.static and (clip is ActivationClip.SEARCH or
                                     clip is ActivationClip.SEARCH_IF_UNSMOOTHED and self.smooth is None):
            self.sqnr = self._search_activation_clip(weight, rows)
        else:
            self.sqnr = self._sqnr(weight, rows)

    def _choose_smooth(self, weight: Tensor, rows: Tensor) -> None:
        """SmoothQuant's factors from the ranges observed: the given alpha, or the best by the
        site's output SQNR on `rows` (None, i.e. no smoothing, included). Packs the weight."""
        self.smooth_pending = False
        smooth = self.base.smooth
        if smooth is None:
            self._set_smooth(weight, None)
        elif isinstance(smooth, SmoothPolicy):
            # alpha chosen on weights rounded to nearest; GPTQ (if asked) rounds once, for the choice
            held = self._held_out()
            saved = self._gptq_hessians, self.pos_max, self.neg_max
            self._gptq_hessians = None
            best = None
            try:
                if held is not None:   # factors and steps from the even calls, scored on the odd ones
                    self.pos_max, self.neg_max, rows = held
                for alpha in (None, *SMOOTH_GRID):
                    self._set_smooth(weight, alpha)
                    score = self._sqnr(weight, rows)
                    if best is None or score > best[0]:
                        best = (score, alpha)
            finally:
                self._gptq_hessians, self.pos_max, self.neg_max = saved
            self._set_smooth(weight, best[1])
        else:
            self._set_smooth(weight, float(smooth))

    def _held_out(self) -> tuple[Tensor, Tensor, Tensor] | None:
        """(positive and negative maxima of the even-numbered calls, the kept rows of the odd
        ones): SmoothQuant's alpha scored on calls that did not set its factors and steps (chosen
        and scored on the same rows, it fit 4 calibration inputs: `make demo` lost 3.7 dB).
        None with a single call."""
        if self._even_max is None or self._row_calls is None:
            return None
        odd = self._row_calls[:len(self.sample[0])] % 2 == 1
        return (*self._even_max, self.sample[0][odd]) if odd.any() else None

    def _search_activation_clip(self, weight: Tensor, rows: Tensor) -> float:
        """One factor per site (ACT_CLIP_GRID or 1) scaling every segment's calibrated range,
        the best site output SQNR on the calibration rows (returned); values beyond saturate."""
        pos, neg = self._segment_ranges(self.smooth)
        best = (self._sqnr(weight, rows), 1.0)
        for c in ACT_CLIP_GRID:
            self._set_static_steps(pos * c, neg * c)
            score = self._sqnr(weight, rows)
            if score > best[0]:
                best = (score, c)
        self._set_static_steps(pos * best[1], neg * best[1])
        self.act_clip = best[1]
        return best[0]

    def _segment_ranges(self, s: Tensor | None) -> tuple[Tensor, Tensor]:
        pos, neg = (self.pos_max, self.neg_max) if s is None else (self.pos_max / s, self.neg_max / s)
        kb = self.lowering.k_bounds
        return (torch.stack([pos[a:b].max() for a, b in zip(kb[:-1], kb[1:])]),
                torch.stack([neg[a:b].max() for a, b in zip(kb[:-1], kb[1:])]))

    def _set_smooth(self, weight: Tensor, alpha: float | None) -> None:
        self.alpha = alpha
        if alpha is None:
            self.smooth = None
        else:
            self.smooth = smoothing_factors(torch.maximum(self.pos_max, self.neg_max),
                                            self._float_weight(weight).float().abs().amax(dim=0), alpha)
        self.pack(weight)
        if self.lowering.static:
            self._set_static_steps(*self._segment_ranges(self.smooth))

    def _set_static_steps(self, pos: Tensor, neg: Tensor) -> None:
        self.d_x, self.d_neg, self.zp = Q.static_steps(pos, neg, list(self.lowering.codes), self.lowering.format)
        if not self.lowering.asymmetric:
            self.zp = None

    def choose_schemes(self, rows: Tensor, weight: Tensor) -> None:
        """dualscale="auto": measure every candidate scheme per segment on these rows, keep the
        rule's choice (lowering/scheme_choice.py). Dynamic sites choose once, on the first call."""
        lo, w = self.base, self._float_weight(weight).float()
        if self.smooth is not None:   # as the GEMM sees them (dynamic: smoothed on the first call)
            rows, w = rows / self.smooth, w * self.smooth
        self.candidates = scheme_choice.segment_sqnr(rows, w, self.dequantized, lo.k_bounds, lo.static, lo.format)
        self.chosen = scheme_choice.choose(self.candidates)

    def _sqnr(self, weight: Tensor, rows: Tensor) -> float:
        w = self._float_weight(weight).float()
        bias = self.bias.detach().float() if self.bias is not None else None
        ref = rows @ w.t() + (bias if bias is not None else 0)
        return Q.sqnr_db(ref, self.run_rows(rows))

    def run_rows(self, rows: Tensor) -> Tensor:
        """The quantized site on GEMM rows [M, K] (eagerly, as its lowering runs on this device)."""
        lo = self.lowering
        bias = self.bias.detach().float() if self.bias is not None else None
        dequantized = lo.cpu_gemm == "fp32" and rows.device.type == "cpu"
        w, d_w = (self.dequantized, None) if dequantized else (self.packed, self.d_w)
        return quantized_linear(rows, w, d_w, bias, self.d_x, self.d_neg, self.zp, self.smooth,
                                self.colsum, lo.k_bounds, lo.codes, fmt=lo.format, cpu_gemm=lo.cpu_gemm,
                                g_bounds=lo.g_bounds)

    def graph_input(self, field: str) -> Tensor:
        """The tensor the quantized graph takes for `field` (placeholders of the right shape
        until calibration has frozen the steps)."""
        value = getattr(self, field)
        if value is None:   # one cached placeholder: no allocation per call
            shape = (self.packed.shape[0],) if field == "smooth" else (1, len(self.lowering.schemes))
            value = self._placeholders.get(field)
            if value is None:
                fill = torch.zeros if field == "zp" else torch.ones
                value = self._placeholders[field] = fill(shape, device=self.packed.device)
        return value

    # ------------------------------------------------------------------ report
    def summary(self) -> dict:
        lo = self.lowering
        out = {"format": lo.format, "weight_bits": lo.weight_bits, "weights": lo.weights,
               "activations": lo.activations, "schemes": list(lo.schemes), "kernel": lo.variant,
               "weight_step": [float(self.d_w.min()), float(self.d_w.max())]}
        if lo.group_size:
            out["group_size"] = lo.group_size
        if lo.rounding != "rtn":
            if self.awaiting_rows:
                out["weight_rounding"] = "gptq (awaiting " + (
                    "the first call)" if lo.rounding is Rounding.GPTQ_FIRST_CALL else "calibration)")
            elif self.nearest_note is not None:
                out["weight_rounding"] = f"rtn ({self.nearest_note})"
            else:
                out["weight_rounding"] = f"gptq (rows: {self.rows_source or 'saved'})"
        if lo.cpu_gemm:   # how the CPU runs it (lowering/cpu_linear.py)
            out["cpu_gemm"] = lo.cpu_gemm
        if lo.note:
            out["note"] = lo.note
        if self.stale_note:
            out["stale_steps"] = self.stale_note
        if self.d_x is not None:
            out["act_step"] = [round(float(v), 6) for v in self.d_x.reshape(-1)]
            if any(lo.dual):
                out["act_step_neg"] = [round(float(v), 6) for v in self.d_neg.reshape(-1)]
            if self.zp is not None:
                out["zero_point"] = [int(v) for v in self.zp.reshape(-1)]
        if self.candidates is not None:
            out["candidates_sqnr_db"] = [{k: round(v, 2) for k, v in c.items()} for c in self.candidates]
        if self.sqnr is not None:
            out["sqnr_db"] = round(self.sqnr, 2)
        if self.alpha is not None:
            out["smooth_alpha"] = self.alpha
        elif self.smooth_note is not None:
            out["smooth_alpha"] = f"none ({self.smooth_note})"
        if self.act_clip is not None:
            out["activation_clip"] = self.act_clip
        return out


def state_key(lowering: SiteLowering, source: str | None) -> tuple:
    """What a state is shared by: its lowering's numbers and where it came from (a loaded state
    is never mixed with one calibrated in this process)."""
    return lowering, source


class Registry:
    """QuantStates by weight tensor (weakly) and state_key: every graph that sees the tensor
    under the same key shares its state; the entry dies with the weight."""

    def __init__(self):
        self._by_key: dict[tuple, tuple[weakref.ref, QuantState]] = {}
        self._lock = threading.Lock()

    def get(self, weight: Tensor, key: tuple) -> QuantState | None:
        entry = self._by_key.get((id(weight), key))
        if entry is None or entry[0]() is not weight:
            return None
        return entry[1]

    def put(self, weight: Tensor, state: QuantState) -> QuantState:
        """Store a fully built state; when another thread stored one first, keep and return that."""
        key = (id(weight), state_key(state.base, state.source))
        with self._lock:
            entry = self._by_key.get(key)
            if entry is not None and entry[0]() is weight:
                return entry[1]
            self._by_key[key] = (weakref.ref(weight, lambda _r, k=key: self._by_key.pop(k, None)), state)
        return state

    def states_for(self, tensors) -> list[tuple[Tensor, QuantState]]:
        """(weight, state) for every state of these tensors."""
        live = {id(t): t for t in tensors}
        out = []
        for (wid, _), (ref, state) in list(self._by_key.items()):
            if wid in live and ref() is live[wid]:
                out.append((live[wid], state))
        return out


REGISTRY = Registry()
RELEASED: dict[int, weakref.ref] = {}   # weights whose float storage was freed, by id (checked by identity)


def is_released(t: Tensor) -> bool:
    ref = RELEASED.get(id(t))
    return ref is not None and ref() is t


def _refuse_released(module: torch.nn.Module, _args) -> None:
    if torch.compiler.is_compiling() or not RELEASED:   # traced graphs never run this
        return
    for name, p in module._parameters.items():
        if p is not None and is_released(p):
            raise FloatWeightsReleased(
                f"segquant: {type(module).__name__}.{name} was released by a segquant-compiled model "
                f"(options release_float_weights=True): only the compiled model can run it; load the float "
                f"weights again to use this module eagerly")


_GUARD: list = []


def guard_released_weights() -> None:
    """Eager calls of a module whose float weight was released raise a clear error (instead of
    torch's storage error). Installed in the backend call, before dynamo builds its guards, so
    it adds no recompile."""
    if not _GUARD:
        # torch warns that global hooks also fire on the OptimizedModule wrapper: harmless here
        # (the wrapper owns no parameters)
        warnings.filterwarnings("ignore", message=r"Using `torch.compile\(module\)` when there are global hooks")
        _GUARD.append(torch.nn.modules.module.register_module_forward_pre_hook(_refuse_released))
