"""calibration_memory(): the bytes a calibration holds, from a plan (explain's report; no tensor is
made). Per site and in total:

- statistics (statistics.py), what calibration (or a dynamic site's first call) collects until
  the freeze: GPTQ's Hessians (the upper triangle of K^2 fp32 per K segment in row
  panels, where summed), the kept rows (the reservoir: K wide in the activations' dtype where it
  is 16-bit, else fp32; GPTQ's rows beyond the searches' sample int8 with a step per 128 columns;
  each with its priority and call, 16 bytes) and the ranges (positive and
  negative maxima per K column and call parity). Sites of one graph that read the same activation
  with the same statistics spec collect into ONE set (runtime.Observer), as do the calls of one
  weight under one lowering (one QuantState): counted once, at the first site, and the others say
  whose set they share;
- the packed weight: its grid (bits x K x N / 8), steps (per channel, or per K group of a 4-bit
  format), the column sums of the integer formats' zero-point correction (per K segment or group)
  and a low-rank branch's r x (K + N) numbers in the weight dtype;
- float copies the backend holds beside the model's own weights: the fp32 dequantized weight [K, N]
  a CPU site of the "fp32" GEMM form caches (lowering/cpu_linear.py; none on a GPU). The model's
  own float weight is listed apart, not as a copy.

Kept rows grow with the rows observed up to the spec's `rows_kept`: with `calls`, a site's rows are
its traced call's rows (a conv's: SAMPLE_ROWS im2col rows at most) times `calls`, else the cap.
A call's transient (`call_bytes`: its fp32 rows, their negated copy, their kept-dtype copy, the full X^T X per segment,
the reservoir's merge) is made and freed set by set: the peak during calls adds the largest one.
Not counted: activation steps, zero points and SmoothQuant divisors (S or K numbers per site), the
float forward's own activations, and what the freeze makes and frees (GPTQ's inverse Hessian,
the searches' copies)."""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from segquant_compile.lifecycle import Decision, Phase, initial_decisions, phase
from segquant_compile.lowering.formats import Format
from segquant_compile.report import text_table
from segquant_compile.statistics import SAMPLE_ROWS, StatisticsSpec

ROW_EXTRA_BYTES = 16   # per kept row: its priority (float64) and its call (int64), statistics.SiteStatistics


@dataclass(frozen=True)
class SiteMemory:
    site: str
    in_features: int
    out_features: int
    serves: tuple[str, ...]       # the decisions the statistics serve (lifecycle.Decision values); () none
    phase: str                    # when they are collected: awaiting calibration | awaiting its first call
    shared_with: str | None       # the site whose statistics this one collects into (counted there)
    hessian_bytes: int            # 0 where shared, or no Hessian is summed
    row_bytes: int                # kept rows with their priorities and calls
    range_bytes: int
    packed_bytes: int             # the quantized weight, its steps, column sums, low-rank branch
    float_copy_bytes: int         # the CPU fp32 GEMM's dequantized weight
    weight_bytes: int             # the model's own float weight (not a copy)
    call_bytes: int = 0           # what one call's observe makes and frees (StatisticsSpec.call_bytes)

    @property
    def statistics_bytes(self) -> int:
        return self.hessian_bytes + self.row_bytes + self.range_bytes


@dataclass(frozen=True)
class CalibrationMemory:
    sites: tuple[SiteMemory, ...]
    weight_dtype: str
    calls: int | None = None      # calibration calls the kept rows count (None: as many as fill them)
    model: str = ""

    def totals(self) -> dict[str, int]:
        s = self.sites
        hessians = sum(x.hessian_bytes for x in s)
        rows = sum(x.row_bytes for x in s)
        ranges = sum(x.range_bytes for x in s)
        # one set observes at a time: the peak during a call is the held statistics plus the
        # largest set's transient (the float forward's own activations not counted)
        transient = max((x.call_bytes for x in s), default=0)
        return {"statistics": hessians + rows + ranges, "hessians": hessians, "rows": rows, "ranges": ranges,
                "packed": sum(x.packed_bytes for x in s), "float_copies": sum(x.float_copy_bytes for x in s),
                "weights": sum(x.weight_bytes for x in s),
                "call_transient": transient, "peak_during_calls": hessians + rows + ranges + transient,
                "sites": len(s), "collecting": sum(bool(x.serves) for x in s),
                "statistics_sets": sum(bool(x.serves) and x.shared_with is None for x in s),
                "hessians_summed": sum(x.hessian_bytes > 0 for x in s)}

    def serves(self) -> dict[str, int]:
        """Each (decisions, phase) the statistics serve, with its number of sites."""
        out: dict[str, int] = {}
        for x in self.sites:
            if x.serves:
                key = f"{', '.join(x.serves)} ({x.phase})"
                out[key] = out.get(key, 0) + 1
        return out

    def describe(self, per_site: bool = True) -> str:
        t = self.totals()
        lines = []
        if per_site:
            head = ("site", "K -> N", "Hessians MiB", "rows, ranges", "packed", "float copy", "weight")
            body = [(x.site, f"{x.in_features} -> {x.out_features}",
                     f"shared with {x.shared_with}" if x.shared_with else _mib(x.hessian_bytes),
                     "-" if x.shared_with else _mib(x.row_bytes + x.range_bytes), _mib(x.packed_bytes),
                     _mib(x.float_copy_bytes), _mib(x.weight_bytes)) for x in self.sites]
            lines += [*text_table(head, body), ""]
        rows_of = "rows of %d call(s)" % self.calls if self.calls else "rows kept in full"
        lines += [f"calibration memory ({t['sites']} quantized sites; MiB = 2^20 bytes, GiB = 2^30):",
                  f"  statistics: {_gib(t['statistics'])} = Hessians {_gib(t['hessians'])} ({t['hessians_summed']} "
                  f"summed) + kept rows {_gib(t['rows'])} ({rows_of}) + ranges {_gib(t['ranges'])}; "
                  f"{t['statistics_sets']} set(s) for {t['collecting']} collecting site(s)",
                  f"  peak during a call: {_gib(t['peak_during_calls'])} (the statistics + the largest set's "
                  f"transient {_gib(t['call_transient'])}: its call's rows, X^T X, reservoir merge)",
                  f"  packed weights: {_gib(t['packed'])}; float copies beside the model's weights: "
                  f"{_gib(t['float_copies'])}; the model's own float weights ({self.weight_dtype}): "
                  f"{_gib(t['weights'])}"]
        lines += [f"  statistics serve {k}: {n} site(s)" for k, n in self.serves().items()]
        if any(x.phase == Phase.AWAITING_FIRST_CALL.value for x in self.sites if x.serves):
            lines.append("  (awaiting its first call: collected on the compiled model's first call, with dynamic "
                         "activations, and freed once that call has decided)")
        if not t["collecting"]:
            lines.append("  no site collects statistics under these options")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.describe()

    def to_dict(self) -> dict:
        from dataclasses import asdict
        return {"model": self.model, "weight_dtype": self.weight_dtype, "calls": self.calls,
                "totals": self.totals(), "serves": self.serves(),
                "sites": [{**asdict(x), "serves": list(x.serves)} for x in self.sites]}

    def save(self, path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=1))
        return path


def calibration_memory(report, weight_dtype: torch.dtype = torch.float32, calls: int | None = None
                       ) -> CalibrationMemory:
    """The bytes a calibration of `report`'s plan (sq.explain's, or sq.report's of a compiled
    model: its sites' lowerings as planned) holds, per quantized site. `weight_dtype`: the model's
    float weights (and a low-rank branch's); `calls`: calibration calls (None: enough to fill
    every site's kept rows)."""
    element = torch.empty((), dtype=weight_dtype).element_size()
    owners: dict[tuple, str] = {}
    out = []
    for site in report.sites:
        lowering = _planned(report, site.name)
        if lowering is None:
            continue
        k, n = site.in_features, site.out_features
        pending = initial_decisions(lowering)
        spec = StatisticsSpec.for_site(lowering.k_bounds, Decision.ROUNDING in pending, lowering.conv)
        shared_with, hessians, rows, ranges, call = None, 0, 0, 0, 0
        if pending:
            when = phase(pending, lowering)
            # one QuantState per (weight, lowering), one SiteStatistics per (graph, activation, spec, phase)
            keys = (("weight", site.weight, lowering), ("input", site.graph, site.input_node, spec, when))
            shared_with = next((owners[key] for key in keys if key in owners), None)
            for key in keys:
                owners.setdefault(key, shared_with or site.name)
            if shared_with is None:
                hessians = spec.hessian_bytes
                # rows in the activations' dtype where it is 16-bit (statistics._row_dtype), else fp32
                kept = _rows_kept(spec, site, calls)
                rows = spec.row_bytes(min(element, 4), kept) + kept * ROW_EXTRA_BYTES
                ranges = 2 * 4 * k * (2 if calls is None else min(calls, 2))
                call = spec.call_bytes(site.rows if site.rows is not None else spec.rows_kept, min(element, 4))
        out.append(SiteMemory(site.name, k, n, tuple(d.value for d in Decision if d in pending),
                              phase(pending, lowering).value, shared_with, hessians, rows, ranges,
                              packed_bytes(lowering, k, n, element),
                              4 * k * n if lowering.cpu_gemm == "fp32" else 0, element * k * n, call))
    return CalibrationMemory(tuple(out), str(weight_dtype).removeprefix("torch."), calls, report.model)


def _planned(report, name: str):
    """The lowering the options give a site (a compiled site's before calibration decided
    anything), or None where it stays float."""
    if name in report.fallbacks:
        return None
    state = report.states.get(name)
    return state.base if state is not None else report.planned.get(name)


def _rows_kept(spec: StatisticsSpec, site, calls: int | None) -> int:
    if calls is None or site.rows is None:
        return spec.rows_kept
    per_call = min(site.rows, SAMPLE_ROWS) if site.conv is not None else site.rows
    return min(spec.rows_kept, per_call * calls)


def packed_bytes(lowering, k: int, n: int, element_bytes: int) -> int:
    """The packed weight's bytes (site_params.packed): the grid, fp32 steps [N] (4-bit: [G, N]),
    int32 column sums per K segment or group (int8, w4a8) and the low-rank factors."""
    fmt = Format(lowering.format)
    groups = lowering.g_bounds or lowering.k_bounds
    grid = math.ceil(k / 2) * n if fmt.weight_bits == 4 else k * n
    steps = 4 * n * ((len(groups) - 1) if fmt.grouped else 1)
    colsum = 4 * n * (len(groups) - 1) if fmt in (Format.INT8, Format.W4A8) else 0
    branch = (lowering.low_rank or 0) * (k + n) * element_bytes
    return grid + steps + colsum + branch


def _mib(nbytes: int) -> str:
    return f"{nbytes / 2**20:.2f}" if nbytes else "-"


def _gib(nbytes: int) -> str:
    if not nbytes:
        return "none"
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20)):
        if nbytes >= scale:
            return f"{nbytes / scale:.2f} {unit}"
    return f"{nbytes / 2**10:.1f} KiB"

