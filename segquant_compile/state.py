"""QuantState: one weight under one SiteLowering, shared by every graph, graph break and recompile
that touches that weight (registry.STATES finds it by the weight tensor).

It owns four parts, each with one job, and is the only writer of them:
- `watcher` (weight_watch.py): has the float weight changed since it was packed;
- `stats` (statistics.py): what calibration or a first call observed (accumulates, merges);
- `params` (site_params.py): the frozen record of the numbers the site runs with;
- `pending`: the decisions still waiting for rows (lifecycle.Decision), from which `phase`
  says where the site is in its life: awaiting a calibration, awaiting its first call, ready."""
from __future__ import annotations

import threading
import warnings
import torch
from torch import Tensor

from segquant_compile import site_params as P
from segquant_compile.lowering import low_rank
from segquant_compile.lowering.site_lowering import Rounding, SiteLowering
from segquant_compile.passes import LinearSite
from segquant_compile.distributed import Shard
from segquant_compile import lifecycle
from segquant_compile.lifecycle import NUMBERS, Decision, Phase, initial_decisions
from segquant_compile.site_params import SiteParams
from segquant_compile.statistics import DEVICE_BYTES, SiteStatistics, StatisticsSpec
from segquant_compile.weight_watch import FloatWeightsReleased, WeightWatcher


class QuantState:
    def __init__(self, site: LinearSite, lowering: SiteLowering, weight: Tensor, source: str | None = None,
                 name: str | None = None, device_bytes: int = DEVICE_BYTES):
        self.site = site
        self.name = name or site.name    # the site's full module path (its first site's, when shared)
        self.base = lowering             # the lowering the options decided
        self.source = source             # the saved directory it was loaded from (None: made here)
        self.stale_note: str | None = None   # static steps calibrated before an upstream weight edit
        self.device_bytes = device_bytes     # option calibration_device_bytes (statistics.DEVICE_BUDGET)
        self.pending = initial_decisions(lowering)
        self.stats = SiteStatistics(self._spec())
        self._lock = threading.Lock()
        self._placeholders: dict[str, Tensor] = {}
        self._dequantized: tuple | None = None   # (params, fp32 [K, N]) for the CPU fp32 GEMM
        self.watcher = WeightWatcher(weight)
        self.params = P.packed(self._w(weight), lowering, None)

    def _spec(self) -> StatisticsSpec:
        return StatisticsSpec.for_site(self.base.k_bounds, Decision.ROUNDING in self.pending, self.site.conv,
                                       self.device_bytes)

    def _w(self, weight: Tensor) -> Tensor:
        return P.float_weight(weight, self.site)

    # ------------------------------------------------------------------ where it stands
    @property
    def phase(self) -> Phase:
        return lifecycle.phase(self.pending, self.base)

    @property
    def settled(self) -> bool:
        """Its numbers are final (a dynamic site may still measure its schemes on a later call,
        when its first call gave no finite row)."""
        return not self.pending & NUMBERS

    @property
    def calibrated_by_rows(self) -> bool:
        """Calibration sets something here: static steps, GPTQ's rounding, SmoothQuant's factors."""
        return bool(initial_decisions(self.base) & NUMBERS)

    @property
    def lowering(self) -> SiteLowering:
        """What runs: the base lowering with the measured schemes, dynamic when calibration was unusable."""
        return P.applied(self.base, self.params)

    def applied_to(self, lowering: SiteLowering) -> SiteLowering:
        """A graph's lowering of this site (its kernel choices) with what the record decided."""
        return P.applied(lowering, self.params)

    @property
    def decided(self) -> tuple:
        """What changes the compiled graph: the key of a runner's converted graphs."""
        p = self.params
        return p.chosen, p.dynamic_note, p.smooth is not None

    @property
    def released(self) -> bool:
        return self.watcher.released

    @property
    def fingerprint(self) -> str:
        return self.watcher.fingerprint

    def weight(self) -> Tensor:
        """The float weight this state was packed from (held weakly: the state dies with it)."""
        return self.watcher.weight(self.name)

    # the record's fields, read-only, for the report, persist and tests
    def __getattr__(self, field: str):
        if field in SiteParams.__dataclass_fields__:
            return getattr(self.__dict__["params"], field)
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {field!r}")

    @property
    def dequantized(self) -> Tensor:
        """The packed weight as fp32 [K, N], the operand of the CPU fp32 GEMM
        (lowering/cpu_linear.py): made once per record, not per call."""
        cached = self._dequantized
        if cached is None or cached[0] is not self.params:
            cached = self._dequantized = (self.params, P.dequantized(self.params, self.base))
        return cached[1]

    def graph_input(self, field: str) -> Tensor:
        """The tensor the quantized graph takes for `field` (placeholders of the right shape
        until calibration has frozen the steps)."""
        value = self.dequantized if field == "dequantized" else getattr(self.params, field)
        if value is None:   # one cached placeholder: no allocation per call
            packed = self.params.packed
            shape = (packed.shape[0],) if field == "smooth" else (1, len(self.lowering.schemes))
            value = self._placeholders.get(field)
            if value is None:
                fill = torch.zeros if field == "zp" else torch.ones
                value = self._placeholders[field] = fill(shape, device=packed.device)
        return value

    # ------------------------------------------------------------------ the float weight
    def is_current(self, weight: Tensor) -> bool:
        return self.watcher.is_current(weight)

    def refresh(self, weight: Tensor) -> None:
        """Re-pack an edited or swapped weight (the activation steps stay). GPTQ on the first
        call's rows rounds again on the next call's."""
        with self._lock:
            if self.watcher.is_current(weight):
                return
            if self.released:
                raise FloatWeightsReleased(
                    f"segquant: the weight of {self.name} changed after its float copy was released "
                    f"(options release_float_weights=True); compile the model again to change weights")
            params = self.params
            if self.base.rounding is Rounding.GPTQ_FIRST_CALL:
                self._set_pending(self.pending | {Decision.ROUNDING})
                params = params.replace(rows_source=None, nearest_note=None)
            elif self.base.gptq and Decision.ROUNDING not in self.pending:
                warnings.warn(f"segquant: {self.name}: weight changed after GPTQ calibration; re-packed with "
                              f"round-to-nearest (calibrate again for GPTQ)", stacklevel=3)
            self._set(P.packed(self._w(weight), self.base, params), weight)

    def release(self, weight: Tensor) -> int:
        """Free the float weight's storage; the bytes freed."""
        with self._lock:
            return self.watcher.release(weight)

    def _set_pending(self, pending: frozenset[Decision]) -> None:
        """The decisions still open; empty statistics start afresh when what they collect
        changes (GPTQ waiting for rows keeps more rows and sums Hessians)."""
        self.pending = frozenset(pending)
        spec = self._spec()
        if spec != self.stats.spec and self.stats.empty:
            self.stats = SiteStatistics(spec, self.stats.shard)

    def _set(self, params: SiteParams, weight: Tensor | None = None) -> None:
        self.params = params
        if weight is not None:
            self.watcher.watch(weight)

    # ------------------------------------------------------------------ rows
    def observe(self, x: Tensor) -> None:
        if self.released:
            raise FloatWeightsReleased(
                f"segquant: cannot calibrate {self.name}: its float weight was released "
                f"(options release_float_weights=True); compile the float model again to recalibrate")
        try:   # deciding on a call: NaN/Inf rows are skipped
            self.stats.observe(x, finite_only=self.phase is Phase.AWAITING_FIRST_CALL)
        except FloatingPointError:
            raise FloatingPointError(f"segquant: NaN or Inf reached the calibration observer of {self.name}") from None

    @property
    def observed_calls(self) -> int:
        return self.stats.calls

    @property
    def rows_seen(self) -> int:
        return self.stats.rows_seen

    def discard_statistics(self) -> None:
        """Drop what was observed, keeping the record."""
        self.stats = SiteStatistics(self._spec(), self.stats.shard)

    def number_calls(self, shard: Shard) -> None:
        """Number this site's calls as the `shard` of a calibration group (distributed.py)."""
        if self.stats.shard != shard:
            if not self.stats.empty:
                raise RuntimeError(f"segquant: {self.name} holds statistics of another calibration group")
            self.stats = SiteStatistics(self._spec(), shard)

    def share_statistics(self, other: "QuantState") -> bool:
        """Collect into `other`'s statistics from now on (a site reading the same activation): True
        if they are shared, False where this site holds statistics of its own already."""
        if self.stats is other.stats:
            return True
        if not self.stats.empty or self.stats.spec != other.stats.spec or self.stats.shard != other.stats.shard:
            return False
        self.stats = other.stats
        return True

    def freeze(self, bias: Tensor | None) -> None:
        """A calibration's decisions from the statistics (`bias`: for the site's output SQNR)."""
        if self.stats.empty:
            raise RuntimeError(f"segquant: {self.name} saw no calibration data")
        weight = self.weight()
        params = P.frozen(self.params, self.base, self._w(weight), self.stats, bias,
                          gptq=Decision.ROUNDING in self.pending, name=self.name)
        self._set(params)
        self.stale_note = None
        self._set_pending(frozenset())

    def adopt_frozen(self, params: SiteParams) -> None:
        """A record another rank of the calibration group froze from the same merged statistics."""
        self._set(params.to(self.params.packed.device))
        self.stale_note = None
        self._set_pending(frozenset())

    def decide_first_call(self, bias: Tensor | None) -> None:
        """Dynamic activations: what the first call's rows decide (SmoothQuant's factors, GPTQ's
        rounding, the schemes; in that order, each on the weights as the one before left them),
        then fixed: later calls never change the graph or the weights."""
        weight, stats, params = self.weight(), self.stats, self.params
        w = self._w(weight)
        if Decision.SMOOTHING in self.pending:
            params = P.first_call_smoothing(params, self.base, w, stats, bias)
        if Decision.ROUNDING in self.pending:
            params = P.first_call_rounding(params, self.base, w, stats, self.name)
        pending = self.pending - {Decision.SMOOTHING, Decision.ROUNDING}
        if Decision.SCHEMES in pending and stats.kept is not None:   # none when every row was non-finite
            params = P.choose_schemes(params, self.base, w, stats.rows)
            pending -= {Decision.SCHEMES}
        self._set(params)
        self._set_pending(pending)
        self.discard_statistics()

    def measure(self, bias: Tensor | None) -> Tensor:
        """Sensitivity: the schemes chosen (dualscale="auto") and the site's output SQNR on the
        rows observed; the rows."""
        if self.stats.kept is None:
            raise FloatingPointError(f"segquant.sensitivity: {self.name} saw no finite input rows")
        rows, w = self.stats.rows, self._w(self.weight())
        params = self.params
        if Decision.SCHEMES in self.pending:
            params = P.choose_schemes(params, self.base, w, rows)
            self._set_pending(self.pending - {Decision.SCHEMES})
        self._set(params.replace(sqnr=P.site_sqnr(params, self.base, w, rows, bias)))
        return rows

    def run_rows(self, rows: Tensor, bias: Tensor | None = None) -> Tensor:
        """The quantized site on GEMM rows [M, K], as it runs on this device."""
        dq = self.dequantized if self.lowering.cpu_gemm == "fp32" and rows.device.type == "cpu" else None
        return P.run_rows(self.params, self.base, rows, bias, dq)

    def reset_calibration(self) -> None:
        """Forget statistics and what rows decided (recalibrate): back to the first packing."""
        keep_schemes = not self.base.static   # a dynamic site's first call chose them for good
        self.stale_note = None
        pending = initial_decisions(self.base)
        params = SiteParams(self.params.packed, self.params.d_w, self.params.colsum, self.params.l1, self.params.l2,
                            chosen=self.params.chosen if keep_schemes else None,
                            candidates=self.params.candidates if keep_schemes else None)
        if keep_schemes and params.chosen is not None:
            pending -= {Decision.SCHEMES}
        self._set_pending(pending)
        self.discard_statistics()
        if self.params.smooth is not None or self.params.dynamic_note is not None:
            params = P.packed(self._w(self.weight()), self.base, params)
        self._set(params)

    def load(self, params: SiteParams, name: str) -> None:
        """A saved record (persist.load_state): its packing is the calibrated one."""
        self.name = name
        self._set(params)
        self._set_pending(frozenset({Decision.SCHEMES}) if (
            self.base.auto and not self.base.static and params.chosen is None) else frozenset())

    def mark_stale(self, note: str | None) -> None:
        self.stale_note = note

    # ------------------------------------------------------------------ report
    def summary(self) -> dict:
        lo, p = self.lowering, self.params
        out = {"format": lo.format, "weight_bits": lo.weight_bits, "weights": lo.weights,
               "activations": lo.activations, "schemes": list(lo.schemes), "kernel": lo.variant,
               "weight_step": [float(p.d_w.min()), float(p.d_w.max())], "phase": self.phase.value}
        if lo.group_size:
            out["group_size"] = lo.group_size
        if p.l1 is not None:   # SVDQuant's branch: its share of the site's work and storage
            rank, (k, n) = p.l1.shape[1], (p.l1.shape[0], p.l2.shape[1])
            branch = p.l1.nbytes + p.l2.nbytes
            out["low_rank"] = {"rank": rank, "flops_share": round(low_rank.flops_share(rank, k, n), 4),
                               "bytes_share": round(branch / (branch + p.packed.nbytes + p.d_w.nbytes), 4)}
        if lo.rounding != "rtn":
            if Decision.ROUNDING in self.pending:
                out["weight_rounding"] = "gptq (awaiting " + (
                    "the first call)" if lo.rounding is Rounding.GPTQ_FIRST_CALL else "calibration)")
            elif p.nearest_note is not None:
                out["weight_rounding"] = f"rtn ({p.nearest_note})"
            else:
                out["weight_rounding"] = f"gptq (rows: {p.rows_source or 'saved'})"
        if lo.cpu_gemm:   # how the CPU runs it (lowering/cpu_linear.py)
            out["cpu_gemm"] = lo.cpu_gemm
        if lo.note:
            out["note"] = lo.note
        if self.stale_note:
            out["stale_steps"] = self.stale_note
        if p.d_pos is not None:
            out["act_step"] = [round(float(v), 6) for v in p.d_pos.reshape(-1)]
            if any(lo.dual):
                out["act_step_neg"] = [round(float(v), 6) for v in p.d_neg.reshape(-1)]
            if p.zp is not None:
                out["zero_point"] = [int(v) for v in p.zp.reshape(-1)]
        if p.candidates is not None:
            out["candidates_sqnr_db"] = [{k: round(v, 2) for k, v in c.items()} for c in p.candidates]
        if p.sqnr is not None:
            out["sqnr_db"] = round(p.sqnr, 2)
        if p.alpha is not None:
            out["smooth_alpha"] = p.alpha
        elif p.smooth_note is not None:
            out["smooth_alpha"] = f"none ({p.smooth_note})"
        if p.act_clip is not None:
            out["activation_clip"] = p.act_clip
        return out

