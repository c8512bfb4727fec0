"""Sensitivity: what segquant_compile.sensitivity measured, per site and format, aggregated per op
type and per block; printed as tables, saved as JSON (exact round trip) or one HTML page."""
from __future__ import annotations

import dataclasses

import html
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

from segquant_compile.op_types import OP_TYPES
from segquant_compile.report import text_table

FORMAT_VERSION = 1
OUTSIDE = "(outside blocks)"


def db(error: float) -> float:
    """Relative noise power -> SQNR in dB (an exact output: inf)."""
    return -10 * math.log10(error) if error > 0 else math.inf


@dataclass
class SiteSensitivity:
    name: str                       # full module path
    op_type: str                    # segquant_compile.op_types.op_type(name)
    block: str | None               # `transformer_blocks.3`; None outside any block
    kind: str                       # linear | addmm | matmul | conv2d
    in_features: int
    out_features: int
    weight_numel: int               # the weight's elements: what a bit budget counts
    error: dict[str, float]         # format -> model output relative noise power, only this site quantized
    site_sqnr_db: dict[str, float]  # format -> the site's own output SQNR on its real input rows
    not_applicable: dict[str, str] = field(default_factory=dict)   # format -> why it cannot take it
    # format (and "float") -> seconds of the site's GEMM on its sampled rows, measured here: the
    # cost model of a latency budget
    seconds: dict[str, float] = field(default_factory=dict)

    def output_sqnr_db(self, fmt: str) -> float | None:
        return db(self.error[fmt]) if fmt in self.error else None


@dataclass(frozen=True)
class Aggregate:
    sites: int           # sites measured at this format in the group
    # mean output SQNR when each alone is quantized, over the sites that change the output at all
    # (a site whose output is never read, e.g. the last SD3 block's context queries, measures inf)
    mean_sqnr_db: float
    error: float         # their summed error (noise powers add)


@dataclass
class Sensitivity:
    model: str
    formats: tuple[str, ...]
    calls: int
    sites: list[SiteSensitivity]
    notes: tuple[str, ...] = ()

    def __getitem__(self, name: str) -> SiteSensitivity:
        return next(s for s in self.sites if s.name == name)

    def only(self, formats) -> "Sensitivity":
        """The same measurement with only these formats (what `allocate` may choose from)."""
        keep = tuple(f for f in self.formats if f in formats)
        if not keep:
            raise ValueError(f"Sensitivity.only: none of {list(formats)} was measured ({list(self.formats)})")
        pick = lambda d: {f: v for f, v in d.items() if f in keep}  # noqa: E731
        sites = [dataclasses.replace(s, error=pick(s.error), site_sqnr_db=pick(s.site_sqnr_db),
                                     not_applicable=pick(s.not_applicable),
                                     seconds={f: v for f, v in s.seconds.items() if f in keep or f == "float"})
                 for s in self.sites]
        return dataclasses.replace(self, formats=keep, sites=sites)

    # ------------------------------------------------------------------ aggregation
    def _grouped(self, key, rank=None) -> dict[str, list[SiteSensitivity]]:
        groups: dict[str, list[SiteSensitivity]] = {}
        for s in self.sites:
            groups.setdefault(key(s), []).append(s)
        return groups if rank is None else dict(sorted(groups.items(), key=lambda kv: rank(kv[0])))

    def _op_groups(self) -> dict[str, list[SiteSensitivity]]:
        return self._grouped(lambda s: s.op_type, lambda k: OP_TYPES.index(k) if k in OP_TYPES else len(OP_TYPES))

    def _block_groups(self) -> dict[str, list[SiteSensitivity]]:
        return self._grouped(lambda s: s.block or OUTSIDE)

    def by_op_type(self) -> dict[str, dict[str, Aggregate]]:
        """op type -> format -> Aggregate, in the order of op_types.OP_TYPES."""
        return _aggregate(self._op_groups(), self.formats)

    def by_block(self) -> dict[str, dict[str, Aggregate]]:
        """block -> format -> Aggregate, in graph order (sites outside blocks as OUTSIDE)."""
        return _aggregate(self._block_groups(), self.formats)

    def most_sensitive(self, n: int = 10) -> list[SiteSensitivity]:
        """The n sites with the largest error at any measured format."""
        return sorted((s for s in self.sites if s.error), key=lambda s: -max(s.error.values()))[:n]

    # ------------------------------------------------------------------ text
    def __str__(self) -> str:
        fmts = self.formats
        lines = [f"segquant sensitivity: {self.model}, {len(self.sites)} sites x {len(fmts)} formats, "
                 f"{self.calls} call(s)", *self.notes,
                 "cells: mean output SQNR (dB) when one site alone is quantized / summed relative error", ""]
        for title, groups in (("op type", self._op_groups()), ("block", self._block_groups())):
            aggregates = _aggregate(groups, fmts)
            rows = [(g, str(len(sites)), *(_cell(aggregates[g].get(f)) for f in fmts)) for g, sites in groups.items()]
            lines += [*text_table((title, "sites", *fmts), rows), ""]
        rows = [(s.name, s.op_type, *(_site_cell(s, f) for f in fmts)) for s in self.most_sensitive()]
        lines += ["most sensitive sites (output SQNR dB, error; site SQNR dB on its rows)",
                  *text_table(("site", "op type", *fmts), rows)]
        na = sorted({r for s in self.sites for r in s.not_applicable.values()})
        lines += [f"not applicable: {r}" for r in na]
        return "\n".join(lines)

    # ------------------------------------------------------------------ files
    def to_dict(self) -> dict:
        return {"format_version": FORMAT_VERSION, "model": self.model, "formats": list(self.formats),
                "calls": self.calls, "notes": list(self.notes), "sites": [asdict(s) for s in self.sites]}

    @classmethod
    def from_dict(cls, d: dict) -> "Sensitivity":
        if d.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"sensitivity file format_version {d.get('format_version')!r}; this version reads "
                             f"{FORMAT_VERSION}")
        return cls(model=d["model"], formats=tuple(d["formats"]), calls=d["calls"],
                   sites=[SiteSensitivity(**s) for s in d["sites"]], notes=tuple(d["notes"]))

    def save(self, path) -> Path:
        """.json (exact: Sensitivity.load reads it back equal) or .html (one self-contained page)."""
        path = Path(path)
        writers = {".json": lambda: json.dumps(self.to_dict(), indent=1), ".html": self._html}
        if path.suffix not in writers:
            raise ValueError(f"Sensitivity.save: unknown extension {path.suffix!r}; use one of {sorted(writers)}")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(writers[path.suffix]())
        return path

    @classmethod
    def load(cls, path) -> "Sensitivity":
        """A .json file written by save(); anything else (the .html page, a damaged file) is an
        error naming the file and what to give instead."""
        path = Path(path)
        if path.suffix == ".html":
            raise ValueError(f"sensitivity file {path}: the .html page is for reading; give the .json file "
                             f"saved beside it (Sensitivity.save('....json'))")
        if not path.is_file():
            raise FileNotFoundError(f"sensitivity file {path} does not exist")
        try:
            return cls.from_dict(json.loads(path.read_text()))
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise ValueError(f"sensitivity file {path} is not a sensitivity measurement saved as .json "
                             f"({type(e).__name__}: {' '.join(str(e).split())[:200]}); measure and save it "
                             f"again") from None

    def _html(self) -> str:
        fmts = self.formats
        finite = [db(e) for s in self.sites for e in s.error.values() if e > 0]
        lo, hi = (min(finite), max(finite)) if finite else (0.0, 1.0)
        rows = []
        for s in self.sites:
            cells = []
            for f in fmts:
                if f in s.error:
                    out = db(s.error[f])
                    tip = f"error {s.error[f]:.3e}; site SQNR {s.site_sqnr_db[f]:.1f} dB on its input rows"
                    cells.append(f'<td class="v" style="background:{_colour(out, lo, hi)}" title="{tip}">{out:.1f}</td>')
                else:
                    cells.append(f'<td class="na" title="{html.escape(s.not_applicable.get(f, ""))}">n/a</td>')
            rows.append(f"<tr><td>{html.escape(s.name)}</td><td>{html.escape(s.op_type)}</td>"
                        f"<td>{html.escape(s.block or '')}</td><td class=\"v\">{s.weight_numel}</td>{''.join(cells)}</tr>")
        head = "".join(f"<th>{html.escape(f)}</th>" for f in fmts)
        notes = "<br>".join(html.escape(n) for n in self.notes)
        return _PAGE.format(title=html.escape(f"segquant sensitivity: {self.model}"), notes=notes,
                            count=f"{len(self.sites)} sites x {len(fmts)} formats, {self.calls} call(s)",
                            bars=self._bars_svg(), head=head, rows="\n".join(rows))

    def _bars_svg(self) -> str:
        """Mean output SQNR (dB) per op type, one bar per format."""
        groups = self.by_op_type()
        fmts = self.formats
        values = [a.mean_sqnr_db for g in groups.values() for a in g.values() if math.isfinite(a.mean_sqnr_db)]
        top = max(values, default=1.0) or 1.0
        bar, label, width = 14, 150, 420
        height = sum(len(fmts) * bar + 10 for _ in groups) + 20
        parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{label + width + 300}" height="{height}" '
                 f'font-family="sans-serif" font-size="11">']
        y = 10
        for group, aggs in groups.items():
            parts.append(f'<text x="0" y="{y + len(fmts) * bar / 2 + 4}">{html.escape(group)}</text>')
            for i, f in enumerate(fmts):
                a = aggs.get(f)
                if a is not None:
                    v = a.mean_sqnr_db if math.isfinite(a.mean_sqnr_db) else top
                    w = max(1.0, width * max(v, 0.0) / top)
                    parts.append(f'<rect x="{label}" y="{y}" width="{w:.1f}" height="{bar - 2}" fill="{_PALETTE[i % len(_PALETTE)]}"/>'
                                 f'<text x="{label + w + 4:.1f}" y="{y + bar - 4}">{html.escape(f)} {a.mean_sqnr_db:.1f} dB'
                                 f' ({a.sites} sites, error {a.error:.2e})</text>')
                y += bar
            y += 10
        parts.append("</svg>")
        return "".join(parts)


def _aggregate(groups: dict[str, list[SiteSensitivity]], formats) -> dict[str, dict[str, Aggregate]]:
    out = {}
    for group, sites in groups.items():
        out[group] = {}
        for f in formats:
            errs = [s.error[f] for s in sites if f in s.error]
            if errs:
                changed = [db(e) for e in errs if e > 0]
                out[group][f] = Aggregate(len(errs), sum(changed) / len(changed) if changed else math.inf, sum(errs))
    return out


def _cell(a: Aggregate | None) -> str:
    return "n/a" if a is None else f"{a.mean_sqnr_db:.1f} dB / {a.error:.2e}"


def _site_cell(s: SiteSensitivity, f: str) -> str:
    if f not in s.error:
        return "n/a"
    return f"{s.output_sqnr_db(f):.1f} dB, {s.error[f]:.2e}; site {s.site_sqnr_db[f]:.1f} dB"


def _colour(value: float, lo: float, hi: float) -> str:
    """Red (the lowest output SQNR: most sensitive) to green (the highest)."""
    t = 1.0 if not math.isfinite(value) or hi <= lo else min(1.0, max(0.0, (value - lo) / (hi - lo)))
    return f"hsl({120 * t:.0f}, 70%, 78%)"


_PALETTE = ("#4e79a7", "#f28e2b", "#59a14f", "#b07aa1", "#76b7b2", "#edc948")

_PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>{title}</title>
<style>
body {{ font-family: sans-serif; margin: 1.5em; }}
table {{ border-collapse: collapse; font-size: 13px; }}
td, th {{ border: 1px solid #ccc; padding: 3px 6px; }}
th {{ background: #f3f3f3; position: sticky; top: 0; }}
td.v {{ text-align: right; font-family: monospace; }}
td.na {{ background: #e6e6e6; color: #777; text-align: center; }}
</style></head><body>
<h1>{title}</h1>
<p>{count}<br>{notes}</p>
<p>Each cell: the model's output SQNR (dB) when only that site is quantized at that format, every other
site float; red is the most sensitive, green the least. Hover for the relative error and the site's own
SQNR on its input rows; grey cells are formats the site cannot take (hover for why).</p>
<h2>per op type: mean output SQNR</h2>
{bars}
<h2>sites</h2>
<table id="sites"><thead><tr><th>site</th><th>op type</th><th>block</th><th>weights</th>{head}</tr></thead>
<tbody>
{rows}
</tbody></table>
</body></html>
"""
