"""The HTML page of a Report: the layered SVG of each site's graph neighbourhood and the page
around the table (filters by flag and name)."""
from __future__ import annotations

import html

import networkx as nx


def shape(d) -> str:
    return "(" + ",".join(d["shape"]) + ")" if d.get("shape") else ""


def svg(g: nx.DiGraph, focus: str) -> str:
    """A layered drawing: each node one level below its deepest producer."""
    if g.number_of_nodes() == 0:
        return "<p>(no graph)</p>"
    level: dict[str, int] = {}
    for n in nx.topological_sort(g):
        level[n] = max((level[p] + 1 for p in g.predecessors(n)), default=0)
    rows: dict[int, list[str]] = {}
    for n, lv in level.items():
        rows.setdefault(lv, []).append(n)
    bw, bh, gx, gy = 190, 34, 20, 30
    pos = {n: (gx + i * (bw + gx), gy + lv * (bh + gy)) for lv, ns in rows.items() for i, n in enumerate(ns)}
    width = gx + max(len(ns) for ns in rows.values()) * (bw + gx)
    height = gy + (max(rows) + 1) * (bh + gy)
    parts = [f'<svg width="{width}" height="{height}" xmlns="http://www.w3.org/2000/svg" font-size="10" font-family="monospace">']
    for a, b in g.edges:
        (x1, y1), (x2, y2) = pos[a], pos[b]
        parts.append(f'<line x1="{x1 + bw / 2}" y1="{y1 + bh}" x2="{x2 + bw / 2}" y2="{y2}" stroke="#888" marker-end="url(#arr)"/>')
    for n, (x, y) in pos.items():
        d = g.nodes[n]
        fill = "#ffd28a" if n == focus else "#eef"
        parts.append(f'<rect x="{x}" y="{y}" width="{bw}" height="{bh}" rx="4" fill="{fill}" stroke="#446"/>'
                     f'<text x="{x + 4}" y="{y + 13}">{html.escape(n[:30])}</text>'
                     f'<text x="{x + 4}" y="{y + 27}" fill="#555">{html.escape((d.get("op", "") + " " + shape(d))[:32])}</text>')
    parts.insert(1, '<defs><marker id="arr" markerWidth="8" markerHeight="8" refX="8" refY="4" orient="auto">'
                    '<path d="M0,0 L8,4 L0,8 z" fill="#888"/></marker></defs>')
    parts.append("</svg>")
    return "".join(parts)


PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>{title}</title>
<style>
body {{ font-family: sans-serif; margin: 1.5em; }}
table {{ border-collapse: collapse; font-size: 13px; }}
td, th {{ border: 1px solid #ccc; padding: 3px 6px; vertical-align: top; }}
th {{ background: #f3f3f3; position: sticky; top: 0; }}
tr[hidden] {{ display: none; }}
.notes {{ color: #a33; font-size: 11px; }}
#bar {{ margin: 1em 0; }}
</style></head><body>
<h1>{title}</h1>
<p id="summary" style="white-space: pre-line">{summary}</p>
<p><small>options: {config}</small></p>
<div id="bar">
 <input id="q" placeholder="filter sites (substring)" size="40">
 <label><input type="checkbox" data-f="out"> output-segmented</label>
 <label><input type="checkbox" data-f="in"> input-segmented</label>
 <label><input type="checkbox" data-f="dual"> DualScale</label>
 <label><input type="checkbox" data-f="skip"> skipped</label>
 &nbsp;&mdash;&nbsp; <span id="count">{total}</span> sites shown
</div>
<table id="plan"><thead><tr><th>site</th><th>K &rarr; N</th><th>output segments</th>
<th>input segments</th><th>DualScale</th><th>quantized</th><th>evidence</th></tr></thead>
<tbody>
{rows}
</tbody></table>
<h3>legend</h3><dl>{legend}</dl>
<script>
const q = document.getElementById('q');
const boxes = [...document.querySelectorAll('#bar input[type=checkbox]')];
function apply() {{
  const text = q.value.toLowerCase();
  const need = boxes.filter(b => b.checked).map(b => b.dataset.f);
  let n = 0;
  for (const tr of document.querySelectorAll('#plan tbody tr')) {{
    const flags = tr.dataset.flags.split(' ');
    const ok = tr.cells[0].textContent.toLowerCase().includes(text) && need.every(f => flags.includes(f));
    tr.hidden = !ok; n += ok;
  }}
  document.getElementById('count').textContent = n;
}}
q.addEventListener('input', apply); boxes.forEach(b => b.addEventListener('change', apply));
</script>
</body></html>
"""
