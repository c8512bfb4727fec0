"""Report: the plan as a person reads it (terminal table, JSON, DOT, HTML)."""
from __future__ import annotations

import html
import json
from dataclasses import dataclass, field
from pathlib import Path

import networkx as nx

from segquant_compile.config import QuantConfig
from segquant_compile.lowering import low_rank
from segquant_compile.passes import LinearSite, Plan
from segquant_compile.passes.site_rules import skip_pattern
from segquant_compile.report_html import PAGE, shape, svg

FORMAT_VERSION = 1

# What each column and the summary line say, printed under the table (terminal, JSON and HTML).
LEGEND = {
    "site": "the linear (or conv) layer's full module path in the model; a suffix #k marks the k-th call "
            "of the same weight within one graph",
    "K -> N": "input features -> output features of the weight (a conv2d: in channels x kh x kw -> out channels; "
              "it runs as an implicit GEMM with one row per output pixel)",
    "output segments": "pieces the output is consumed in (chunk, split, slicing), found in the graph: "
                       "'6x96 (chunk)' = 6 segments of 96 features; each gets its own weight steps",
    "input segments": "pieces the input is assembled from (cat, the head merge before to_out; for a conv2d the "
                      "channels of a skip concatenation, 'ch'): each gets its own activation step and its own "
                      "integer accumulation (SegLinear)",
    "DualScale": "the activation (silu, gelu) the input comes from: its positive and negative sides get "
                 "their own steps; '-' none",
    "quantized": "format, weight granularity, activations (dynamic per token, or static per segment) and "
                 "scheme; SQNR = this site's output alone on calibration rows, quantized vs float; "
                 "'planned' = not compiled yet (explain); 'float: why' = kept in float",
    "graph(s)": "FX graphs dynamo handed the backend for this model: one per frame it compiled (a graph break "
                "splits a forward into several) and one more per recompile for new shapes; each site is "
                "listed once however many graphs hold it",
}


@dataclass
class Report:
    plan: Plan
    config: object
    n_graphs: int = 1
    model: str = ""
    fallbacks: dict[str, str] = field(default_factory=dict)   # site -> why it stays float
    states: dict[str, object] = field(default_factory=dict)   # site -> QuantState (compiled models)
    unreached: dict[str, str] = field(default_factory=dict)   # linear module -> why no graph planned it
    unreached_kinds: dict[str, str] = field(default_factory=dict)   # such a module -> linear | conv2d
    calibration: object | None = None    # calibration.CalibrationSummary of the last calibrate() block
    planned: dict[str, object] = field(default_factory=dict)   # site -> SiteLowering (explain: not compiled)

    @property
    def skipped(self) -> set[str]:
        return {s.name for s in self.sites if skip_pattern(s.name, self.config.skip)}

    @property
    def float_calls(self) -> tuple:
        """Linear calls the graphs hold that are no site (e.g. a computed weight), with the reason."""
        return tuple(getattr(self.plan, "float_calls", ()))

    @property
    def sites(self) -> tuple[LinearSite, ...]:
        return self.plan.sites

    def totals(self) -> dict[str, int]:
        s = self.sites
        return {
            "sites": len(s),
            "conv_sites": sum(x.conv is not None for x in s),
            "output_segmented": sum(x.output_segments is not None for x in s),
            "input_segmented": sum(x.input_segments is not None for x in s),
            "dualscale": sum(x.dualscale.all for x in s),
            "dualscale_partial": sum(x.dualscale.any and not x.dualscale.all for x in s),
            "skipped": len(self.skipped),
            "float": len(self.fallbacks),
            "unreached": len(self.unreached),
            "float_calls": len(self.float_calls),
            "graphs": self.n_graphs,
            **self._formats(),
        }

    def _formats(self) -> dict:
        """Sites per weight format, and the quantized sites' average weight bits weighted by their
        weight element counts (the allocation's budget measure)."""
        lowerings = {**self.planned, **{k: st.lowering for k, st in self.states.items()}}
        quantized = [(x, lowerings[x.name]) for x in self.sites if x.name in lowerings]
        if not quantized:
            return {}
        counts: dict[str, int] = {}
        for _, lo in quantized:
            counts[lo.format] = counts.get(lo.format, 0) + 1
        # the low-rank branches' float factors count: they are stored beside the quantized weights
        bits = sum(lo.weight_bits * x.in_features * x.out_features + self._branch_bits(x, lo) for x, lo in quantized)
        numel = sum(x.in_features * x.out_features for x, _ in quantized)
        return {"formats": counts, "average_weight_bits": round(bits / numel, 3)}

    def _branch_bits(self, site: LinearSite, lowering) -> int:
        st = self.states.get(site.name)
        if st is not None and st.params.l1 is not None:
            return 8 * (st.params.l1.nbytes + st.params.l2.nbytes)
        return low_rank.branch_bits(lowering.low_rank, site.in_features, site.out_features)

    # ------------------------------------------------------------------ views
    def rows(self) -> list[dict]:
        out, skipped = [], self.skipped
        for s in self.sites:
            out.append({
                "site": s.name, "weight": s.weight, "node": s.node, "kind": s.kind, "graph": s.graph,
                "in_features": s.in_features, "out_features": s.out_features, "bias": s.bias,
                "output_segments": list(s.output_segments.sizes) if s.output_segments else None,
                "output_pattern": s.output_segments.pattern if s.output_segments else None,
                "output_evidence": list(s.output_segments.evidence) if s.output_segments else [],
                "input_segments": list(s.input_segments.sizes) if s.input_segments else None,
                "input_pattern": s.input_segments.pattern if s.input_segments else None,
                "input_evidence": list(s.input_segments.evidence) if s.input_segments else [],
                "dualscale": list(s.dualscale.sources),
                "skipped": s.name in skipped,
                "fallback": self.fallbacks.get(s.name),
                "quant": self.states[s.name].summary() if s.name in self.states else None,
                "resolved": list(self._lowering(s.name).reasons) if self._lowering(s.name) else [],
                "notes": list(s.notes),
            })
        for name, (kind, why) in self._unreached_kinds():
            out.append({"site": name, "kind": f"{kind} module", "fallback": why, "quant": None})
        for call in self.float_calls:
            out.append({"site": call.name, "node": call.node, "kind": call.kind, "fallback": call.reason,
                        "quant": None})
        return out

    def to_dict(self) -> dict:
        import dataclasses
        calib = dataclasses.asdict(self.calibration) if self.calibration is not None else None
        return {"format_version": FORMAT_VERSION, "model": self.model, "config": _config_dict(self.config),
                "totals": self.totals(), "calibration": calib, "legend": LEGEND, "sites": self.rows()}

    def legend(self) -> str:
        return "\n".join(f"  {k}: {v}" for k, v in LEGEND.items())

    def __str__(self) -> str:
        head = ("site", "K -> N", "output segments", "input segments", "DualScale", "quantized")
        skipped = self.skipped
        body = [(s.name + (" (skip)" if s.name in skipped else ""),
                 f"{s.in_features} -> {s.out_features}",
                 s.output_segments.describe() if s.output_segments else "-",
                 _input_text(s), _dual_text(s), self._quant_text(s.name)) for s in self.sites]
        lines = [*text_table(head, body), "", self.summary()]
        lines += [f"{reason} ({n} site{'s' if n > 1 else ''})" for reason, n in self.resolved().items()]
        lines += [f"float: {c.name} ({c.kind} call): {c.reason}" for c in self.float_calls]
        lines += [f"float: {name} ({kind} module): {why}" for name, (kind, why) in self._unreached_kinds()]
        if self.calibration is not None:
            lines.append(self.calibration.describe())
        lines += ["", "legend:", self.legend()]
        return "\n".join(lines)

    def _lowering(self, name: str):
        """The SiteLowering a site runs with (compiled) or would (explain); None: kept float."""
        if name in self.fallbacks:
            return None
        st = self.states.get(name)
        return st.lowering if st is not None else self.planned.get(name)

    def resolved(self) -> dict[str, int]:
        """How the options' "auto" values resolved (passes/site_rules.resolve_autos), each reason
        with the number of sites it applies to."""
        out: dict[str, int] = {}
        for s in self.sites:
            lowering = self._lowering(s.name)
            for reason in lowering.reasons if lowering is not None else ():
                out[reason] = out.get(reason, 0) + 1
        return out

    def _unreached_kinds(self):
        """(name, (module kind, why)) for the modules no segquant graph reached."""
        for name, why in self.unreached.items():
            yield name, (self.unreached_kinds.get(name, "linear"), why)

    def _quant_text(self, name: str) -> str:
        if name in self.fallbacks:
            return "float: " + self.fallbacks[name]
        st = self.states.get(name)
        if st is None:
            return "planned: " + self.planned[name].describe() if name in self.planned else "planned"
        info = st.summary()
        text = st.lowering.describe()
        if info.get("sqnr_db") is not None:
            text += f", SQNR {info['sqnr_db']:.1f} dB"
        if st.dynamic_note:
            text += f" ({st.dynamic_note})"
        if st.stale_note:
            text += f" (STALE STEPS: {st.stale_note})"
        if st.candidates:   # dualscale="auto": what each scheme measured, per segment
            short = {"symmetric": "sym", "asymmetric": "asym", "dualscale": "dual"}
            text += "; measured " + " | ".join(
                " ".join(f"{short[k]} {v:.1f}" for k, v in c.items()) for c in st.candidates[:4]) + " dB" + \
                (f" (+{len(st.candidates) - 4} segments)" if len(st.candidates) > 4 else "")
        return text

    def summary(self) -> str:
        t = self.totals()
        kinds = f"{t['sites']} sites ({t['sites'] - t['conv_sites']} linear, {t['conv_sites']} conv2d)" \
            if t["conv_sites"] else f"{t['sites']} linear sites"
        return (f"{kinds} in {t['graphs']} graph(s): {t['output_segmented']} output-segmented, "
                f"{t['input_segmented']} input-segmented, {t['dualscale']} DualScale"
                + (f" (+{t['dualscale_partial']} on some input segments)" if t["dualscale_partial"] else "")
                + (f", {t['skipped']} skipped" if t["skipped"] else "")
                + (f"; {t['float']} stay float" if t["float"] else "")
                + (f"; {t['float_calls'] + t['unreached']} other linear/conv call(s) float (listed)"
                   if t["float_calls"] + t["unreached"] else "")
                + ("\nformats: " + ", ".join(f"{n} {f}" for f, n in t["formats"].items())
                   + f"; average weight bits {t['average_weight_bits']:.2f} (quantized sites, by weight size)"
                   if set(t.get("formats", ())) - {"int8"} else ""))

    # ------------------------------------------------------------------ files
    def save(self, path) -> Path:
        path = Path(path)
        writers = {".json": self._json, ".dot": self._dot, ".html": self._html}
        if path.suffix not in writers:
            raise ValueError(f"report.save: unknown extension {path.suffix!r}; use one of {sorted(writers)}")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(writers[path.suffix]())
        return path

    def _json(self) -> str:
        return json.dumps(self.to_dict(), indent=1)

    def _neighbourhood(self, site: LinearSite) -> nx.DiGraph:
        graph = self.plan.graphs[site.graph] if site.graph < len(self.plan.graphs) else nx.DiGraph()
        return graph.subgraph([n for n in site.neighbourhood if n in graph]).copy()

    def _dot(self) -> str:
        out = ["digraph segquant_plan {", "  rankdir=TB; node [shape=box, fontname=monospace];"]
        for i, s in enumerate(self.sites):
            sub = self._neighbourhood(s)
            out.append(f'  subgraph cluster_{i} {{ label="{_esc(s.name)}: {_esc(_site_label(s))}";')
            for n, d in sub.nodes(data=True):
                style = ', style=filled, fillcolor="#ffd28a"' if n == s.node else ""
                out.append(f'    "{i}:{n}" [label="{_esc(n)}\\n{_esc(d.get("op", ""))} {_esc(shape(d))}"{style}];')
            for a, b in sub.edges:
                out.append(f'    "{i}:{a}" -> "{i}:{b}";')
            out.append("  }")
        out.append("}")
        return "\n".join(out) + "\n"

    def _html(self) -> str:
        t = self.totals()
        rows = []
        for i, s in enumerate(self.sites):
            flags = " ".join(f for f, on in (("out", s.output_segments), ("in", s.input_segments),
                                               ("dual", s.dualscale.any), ("skip", s.name in self.skipped)) if on)
            notes = "<br>".join(html.escape(n) for n in s.notes)
            quant = html.escape(self._quant_text(s.name))
            rows.append(
                f'<tr data-flags="{flags}"><td>{html.escape(s.name)}</td><td>{s.in_features} &rarr; {s.out_features}</td>'
                f'<td>{html.escape(s.output_segments.describe()) if s.output_segments else "-"}</td>'
                f'<td>{html.escape(_input_text(s))}</td>'
                f'<td>{html.escape(_dual_text(s))}</td><td>{quant}</td>'
                f'<td><details><summary>graph</summary>{svg(self._neighbourhood(s), s.node)}'
                f'<div class="notes">{notes}</div></details></td></tr>')
        summary = self.summary() + ("\n" + self.calibration.describe() if self.calibration is not None else "")
        legend = "".join(f"<dt>{html.escape(k)}</dt><dd>{html.escape(v)}</dd>" for k, v in LEGEND.items())
        return PAGE.format(title=html.escape(f"segquant plan: {self.model}"),
                           summary=html.escape(summary), legend=legend,
                           config=html.escape(json.dumps(_config_dict(self.config))),
                           rows="\n".join(rows), total=t["sites"])


def text_table(head, rows) -> list[str]:
    """Lines of a plain-text table: columns padded to their widest cell, a rule under the head."""
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    line = lambda r: "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip()
    return [line(head), line(tuple("-" * w for w in widths)), *map(line, rows)]


def _config_dict(config) -> dict:
    """The options, flat as a user writes them."""
    return config.to_flat() if isinstance(config, QuantConfig) else dict(config or {})


def _dual_text(s: LinearSite) -> str:
    src = s.dualscale.sources
    if not s.dualscale.any:
        return "-"
    if s.dualscale.all and len(set(src)) == 1:
        return src[0]
    return "segments " + ",".join(str(i) for i, x in enumerate(src) if x) + ": " + \
        ",".join(sorted({x for x in src if x}))


def _input_text(s: LinearSite) -> str:
    """Input segments; a conv's in channels (its K ranges are channels x kh x kw)."""
    seg = s.input_segments
    if seg is None:
        return "-"
    if s.conv is None:
        return seg.describe()
    return seg.__class__(seg.axis, tuple(k // s.conv.taps for k in seg.sizes), seg.pattern, seg.evidence
                         ).describe().replace(" (", " ch (", 1)


def _site_label(s: LinearSite) -> str:
    parts = []
    if s.output_segments:
        parts.append("out " + s.output_segments.describe())
    if s.input_segments:
        parts.append("in " + s.input_segments.describe())
    if s.dualscale.any:
        parts.append("DualScale " + _dual_text(s))
    return "; ".join(parts) or "plain"


def _esc(text: str) -> str:
    return str(text).replace("\\", "\\\\").replace('"', '\\"')
