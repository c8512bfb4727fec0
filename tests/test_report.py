"""The report: terminal table, JSON, DOT, HTML."""
import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import segquant_compile as sq


class Small(nn.Module):
    def __init__(self):
        super().__init__()
        self.ada = nn.Linear(8, 16)
        self.proj = nn.Linear(12, 8)

    def forward(self, x):
        shift, scale = self.ada(F.silu(x.mean(1))).chunk(2, dim=-1)
        h = x * (1 + scale[:, None]) + shift[:, None]
        return self.proj(torch.cat([h, F.gelu(h[..., :4])], dim=-1))


@pytest.fixture(scope="module")
def report():
    return sq.explain(Small(), torch.randn(2, 3, 8))


def test_table(report):
    text = str(report)
    assert "ada" in text and "2x8 (chunk)" in text and "[8, 4] (cat)" in text
    assert report.summary() in text.splitlines()   # the legend follows the totals line
    assert report.summary() == ("2 linear sites in 1 graph(s): 1 output-segmented, 1 input-segmented, "
                                "1 DualScale (+1 on some input segments)")


def test_json(report, tmp_path):
    data = json.loads(report.save(tmp_path / "plan.json").read_text())
    assert data["totals"]["sites"] == 2
    rows = {r["site"]: r for r in data["sites"]}
    assert rows["ada"]["output_segments"] == [8, 8] and rows["ada"]["dualscale"] == ["silu"]
    assert rows["proj"]["input_segments"] == [8, 4] and rows["proj"]["dualscale"] == [None, "gelu"]
    assert rows["proj"]["input_evidence"]


def test_dot_and_html(report, tmp_path):
    dot = report.save(tmp_path / "plan.dot").read_text()
    assert dot.startswith("digraph") and "cluster_0" in dot and "->" in dot
    page = report.save(tmp_path / "plan.html").read_text()
    assert page.count("<tr data-flags") == 2
    assert 'data-flags="out dual"' in page and "<svg" in page and "addEventListener" in page


def test_unknown_extension(report, tmp_path):
    with pytest.raises(ValueError, match=".json"):
        report.save(tmp_path / "plan.txt")


def test_skip_patterns_show():
    r = sq.explain(Small(), torch.randn(2, 3, 8), options={"skip": ["ad*"]})
    assert r.skipped == {"ada"} and "ada (skip)" in str(r)
