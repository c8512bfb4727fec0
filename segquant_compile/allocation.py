"""allocate(): one format per site from measured sensitivity, the least summed output error under an
average weight-bit budget (Qua2SeDiMo's search, arXiv 2412.14628, solved exactly instead)."""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from fractions import Fraction

import numpy as np

from segquant_compile.lowering import low_rank
from segquant_compile.lowering.formats import FLOAT, Format, FormatChoice
from segquant_compile.report import text_table
from segquant_compile.sensitivity_report import Sensitivity, db

# nominal weight bits per format ("float": the 16-bit weights a diffusion model runs in)
NOMINAL_BITS = {FLOAT: 16, **{f.value: f.weight_bits for f in Format}}
MAX_CELLS = 1 << 15   # DP width: the choice table is sites x MAX_CELLS bytes


@dataclass
class Allocation:
    formats: dict[str, str]      # site name -> format ("float": kept float)
    average_bits: float          # weight bits per element, weighted by each site's weight elements
    error: float                 # summed measured error of the chosen formats (noise powers add)
    weight_bits: float | None    # the budget: average weight bits, or
    bits: dict[str, float]       # per format chosen, its bits per weight element (low-rank branches included)
    latency: float | None = None   # the budget: summed GEMM seconds as a fraction of all float
    seconds: float | None = None   # the chosen formats' summed GEMM seconds (the sensitivity's timings)

    def describe(self) -> str:
        counts: dict[str, int] = {}
        for f in self.formats.values():
            counts[f] = counts.get(f, 0) + 1
        budget = f"{self.weight_bits:g} average weight bits" if self.weight_bits is not None else \
            f"{self.latency:g} x the float GEMM time"
        lines = [f"allocation under {budget}: {self.average_bits:.3f} bits"
                 + (f", {self.seconds * 1e3:.3f} ms of GEMMs" if self.seconds is not None else "")
                 + f", summed error {self.error:.3e} (output SQNR about {db(self.error):.1f} dB if the errors add)",
                 *text_table(("format", "bits", "sites"), [(f, f"{self.bits[f]:g}", str(n)) for f, n in counts.items()]),
                 "", *text_table(("site", "format"), list(self.formats.items()))]
        return "\n".join(lines)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)

    @classmethod
    def from_json(cls, text: str) -> "Allocation":
        return cls(**json.loads(text))


def allocate(sens: Sensitivity, weight_bits: float | None = None, bits: dict[str, float] | None = None,
             latency: float | None = None) -> Allocation:
    """Choose per site one of its measured formats or "float" (NOMINAL_BITS, overridden by `bits`)
    minimising the summed measured error, subject to ONE budget: the average weight bits
    (weighted by each site's weight elements) <= `weight_bits`, or the summed GEMM seconds <=
    `latency` x those of all sites float (the cost model: each site's GEMM per format timed by
    `sensitivity` on this machine, activation quantization included).

    An exact multiple-choice knapsack by dynamic programming over a discretised bit cost: every
    site first pays its cheapest option, and the extra bits of the others are counted in cells of
    one unit, the greatest common divisor of all extra costs (then the DP is exactly optimal) or,
    when the budget would need more than MAX_CELLS such cells, budget / MAX_CELLS with every cost
    rounded UP to whole cells: the result never exceeds the budget, and is optimal for the rounded
    costs. Raises ValueError when the budget is below every site's cheapest format."""
    table = {**NOMINAL_BITS, **(bits or {})}
    if not sens.sites:
        raise ValueError("allocate: the sensitivity holds no sites")
    if (weight_bits is None) == (latency is None):
        raise ValueError("allocate: give one budget, weight_bits or latency")
    if latency is not None:
        untimed = [s.name for s in sens.sites if set(s.seconds) < {FLOAT, *s.error}]
        if untimed:
            raise ValueError(f"allocate: no GEMM timings for {untimed[0]} (a sensitivity saved before they were "
                             f"measured?): measure again for a latency budget")
    # per site: (format, exact cost in bits or seconds, error); a NaN/inf error is no option
    cost = (lambda s, f: _bits(table, s, f)) if latency is None else (lambda s, f: Fraction(s.seconds[f]))
    options = []
    for s in sens.sites:
        opts = [(FLOAT, cost(s, FLOAT), 0.0)]
        for f, err in s.error.items():
            if f not in table and (not FormatChoice.valid(f) or str(FormatChoice.parse(f).format) not in table):
                raise ValueError(f"allocate: no bit width for format {f!r}; pass bits={{{f!r}: ...}}")
            if math.isfinite(err):
                opts.append((f, cost(s, f), err))
        options.append(opts)
    total = sum(s.weight_numel for s in sens.sites)
    floor = [min(c for _, c, _ in opts) for opts in options]
    if latency is None:
        budget, unit_name = Fraction(weight_bits) * total, f"{weight_bits:g} average weight bits"
        least = f"{float(sum(floor) / total):.4g} bits"
    else:
        all_float = sum(opts[0][1] for opts in options)
        budget, unit_name = Fraction(latency) * all_float, f"{latency:g} x the float GEMM time"
        least = f"{float(sum(floor) / all_float):.4g} x the float GEMM time"
    if sum(floor) > budget:
        raise ValueError(f"allocate: a budget of {unit_name} is infeasible: the minimum over these sites' "
                         f"formats is {least}")
    slack = budget - sum(floor)
    extras = [[c - low for _, c, _ in opts] for opts, low in zip(options, floor)]
    unit = _unit(extras)
    if slack / unit > MAX_CELLS:
        unit = slack / MAX_CELLS
    cap = math.floor(slack / unit)
    cells = [[math.ceil(e / unit) for e in es] for es in extras]
    picks = _knapsack(cells, [[err for _, _, err in opts] for opts in options], cap)
    chosen = {s.name: opts[j][0] for s, opts, j in zip(sens.sites, options, picks)}
    error = sum(opts[j][2] for opts, j in zip(options, picks))
    bits_used = sum(_bits(table, s, f) for s, f in zip(sens.sites, chosen.values()))   # exact
    seconds = sum(s.seconds[f] for s, f in zip(sens.sites, chosen.values())) if latency is not None else None
    per_format = {}   # format -> bits per weight element over the sites given it (a branch's included)
    for f in set(chosen.values()):
        sites = [s for s in sens.sites if chosen[s.name] == f]
        per_format[f] = float(sum(_bits(table, s, f) for s in sites) / sum(s.weight_numel for s in sites))
    return Allocation(chosen, float(bits_used / total), error, weight_bits, per_format,
                      latency, seconds)


def _bits(table: dict, site, fmt: str) -> Fraction:
    """The bits `fmt` stores at `site`: its weight bits (the table's) times the weight's elements,
    plus a low-rank variant's 16-bit branch ("w4a8+r32": r (K + N) numbers, at the site's rank)."""
    if fmt in table:
        return Fraction(table[fmt]) * site.weight_numel
    choice = FormatChoice.parse(fmt)
    rank = low_rank.site_rank(choice.low_rank, site.in_features, site.out_features)
    return Fraction(table[str(choice.format)]) * site.weight_numel + \
        low_rank.branch_bits(rank, site.in_features, site.out_features)


def _unit(extras: list[list[Fraction]]) -> Fraction:
    """The greatest common divisor of the nonzero extra costs (1 when there is none)."""
    nonzero = [e for es in extras for e in es if e]
    if not nonzero:
        return Fraction(1)
    den = math.lcm(*(e.denominator for e in nonzero))
    return Fraction(math.gcd(*(int(e * den) for e in nonzero)), den)


def _knapsack(cells: list[list[int]], errors: list[list[float]], cap: int) -> list[int]:
    """Per site the option index minimising the summed error with summed cells <= cap (ties: fewer
    cells). best[c]: the least error of the sites so far using exactly c cells."""
    best = np.full(cap + 1, np.inf)
    best[0] = 0.0
    choice = np.zeros((len(cells), cap + 1), dtype=np.int16)
    for i, (ws, es) in enumerate(zip(cells, errors)):
        new = np.full(cap + 1, np.inf)
        for j, (w, e) in enumerate(zip(ws, es)):
            if w > cap:
                continue
            cand = np.full(cap + 1, np.inf)
            cand[w:] = best[:cap + 1 - w] + e
            better = cand < new
            new[better] = cand[better]
            choice[i, better] = j
        best = new
    c = int(np.argmin(best))
    picks = []
    for i in reversed(range(len(cells))):
        j = int(choice[i, c])
        picks.append(j)
        c -= cells[i][j]
    return picks[::-1]
