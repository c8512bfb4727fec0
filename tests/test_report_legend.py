"""The report as a person reads it: a legend for every column, the calibration summary."""
import json

import torch

import segquant_compile as sq
from segquant_compile.report import LEGEND
from conftest import Two

EAGER = {"inductor": False}   # the quantized graph run as traced: fast to build, same numbers


def test_every_column_and_the_graph_count_have_a_legend(tmp_path):
    report = sq.explain(Two(), torch.randn(2, 8))
    text = str(report)
    header = text.splitlines()[0]
    for column in ("site", "K -> N", "output segments", "input segments", "DualScale", "quantized"):
        assert column in header and f"  {column}: " in text, column
    assert "in 1 graph(s)" in text and "  graph(s): FX graphs dynamo handed the backend" in text
    assert json.loads(report._json())["legend"] == LEGEND
    html = report.save(tmp_path / "plan.html").read_text()
    assert "<dt>graph(s)</dt>" in html and "<dt>DualScale</dt>" in html


def test_calibration_summary_counts_calls_batches_rows_and_end_to_end_sqnr():
    torch.manual_seed(0)
    m = Two()
    compiled = sq.compile(m, activations="static", **EAGER)
    assert sq.report(compiled).calibration is None            # nothing calibrated yet
    with torch.no_grad(), sq.calibrate(compiled, progress=False) as session:
        for _ in range(3):
            compiled(torch.randn(2, 5, 8))
    summary = sq.report(compiled).calibration
    assert summary is session.summary
    assert summary.calls == 3 and summary.batch_sizes == {2: 3} and summary.sites == 2
    assert summary.rows_per_call == (10, 10)                  # 2 x 5 activation rows per call at each site
    assert 25 < summary.output_sqnr_db < 80                   # quantized vs float on the last call: finite, real
    text = str(sq.report(compiled))
    assert "calibration: 3 call(s) of the compiled model, batch sizes 2 (3 calls)" in text
    assert "end-to-end output SQNR of the last calibration call" in text
    assert sq.report(compiled).to_dict()["calibration"]["calls"] == 3
