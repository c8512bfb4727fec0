"""The calibration memory model (calibration_memory.py) against what a real calibration holds."""
import contextlib
import json

import torch

import segquant_compile as sq
from conftest import tiny_sd3, tiny_sd3_inputs
from segquant_compile import cli
from segquant_compile.calibration_memory import calibration_memory


def _bytes(t) -> int:
    return 0 if t is None else t.nbytes


def _row_bytes(sets) -> int:
    """Kept rows as held: exact, coded, and each row's priority and call."""
    return sum(_bytes(s.kept) + _bytes(s.coded) + _bytes(s._priority) + _bytes(s.row_calls) for s in sets.values())


@contextlib.contextmanager
def _calibrating(opts: dict, calls: int = 3):
    """A tiny SD3's estimate under `opts` for `calls` calls, and inside its calibration after the
    calls (before the freeze): (estimate, compiled model, statistics sets by id)."""
    model = tiny_sd3()
    inputs = [tiny_sd3_inputs(batch=2, seed=s, side=16) for s in range(calls)]
    memory = calibration_memory(sq.explain(model, **inputs[0], options=opts), calls=len(inputs))
    compiled = torch.compile(model, backend="segquant", options=opts)
    with sq.calibrate(compiled, progress=False):
        for x in inputs:
            compiled(**x)
        yield memory, compiled, {id(st.stats): st.stats for st in sq.report(compiled).states.values()}


def test_the_estimate_is_the_statistics_a_calibration_holds(monkeypatch):
    """A tiny SD3 (q/k/v sharing statistics; int8, w4a8 with a low-rank branch, int4 weight-only)
    calibrated on 3 calls: the Hessians, kept rows (with their priorities and calls) and ranges
    held just before the freeze, each set counted once, are the estimate from its plan, byte for
    byte; so are the packed weights and the CPU fp32 form's dequantized copies after a call."""
    monkeypatch.setenv("SEGQUANT_CPU_GEMM", "fp32")
    opts = {"activations": "static", "inductor": False,
            "formats": {"*.ff.net.2": "w4a8+r2", "*.ff_context.*": "int4-weight-only"}}
    with _calibrating(opts) as (memory, compiled, sets):
        held = {"hessians": sum(h.nbytes for s in sets.values() for h in s.hessians or ()),
                "rows": _row_bytes(sets),
                "ranges": sum(_bytes(t) for s in sets.values() for p in s.parity_max if p is not None for t in p)}
    total = memory.totals()
    assert held == {k: total[k] for k in held} and held["hessians"] > 0
    assert total["statistics_sets"] == len(sets) < total["collecting"] == total["sites"]
    shared = {x.site: x.shared_with for x in memory.sites if x.shared_with}
    assert shared["transformer_blocks.0.attn.to_k"] == shared["transformer_blocks.0.attn.to_v"] == \
        "transformer_blocks.0.attn.to_q"
    compiled(**tiny_sd3_inputs(batch=2, seed=0, side=16))
    states = sq.report(compiled).states
    estimate = {x.site: x for x in memory.sites}
    for name, st in states.items():
        p = st.params
        assert estimate[name].packed_bytes == sum(map(_bytes, (p.packed, p.d_w, p.colsum, p.l1, p.l2))), name
    copies = {id(st): _bytes(st._dequantized[1]) if st._dequantized else 0 for st in states.values()}
    assert sum(copies.values()) == total["float_copies"] > 0


def test_the_estimate_counts_gptqs_coded_rows(monkeypatch):
    """Sites too wide to sum a Hessian keep GPTQ's rows beyond the searches' sample int8-coded
    (the caps made small so that a tiny model's calls fill them): the estimate is what is held,
    byte for byte, and the searches read the exact rows only."""
    from segquant_compile import statistics
    monkeypatch.setattr(statistics, "HESSIAN_MAX_K", 32)
    monkeypatch.setattr(statistics, "SAMPLE_ROWS", 48)
    monkeypatch.setattr(statistics, "GPTQ_ROWS", 160)
    opts = {"activations": "static", "inductor": False, "weight_rounding": "gptq"}
    with _calibrating(opts) as (memory, compiled, sets):
        coded = [s for s in sets.values() if s.coded is not None]
        assert coded and all(len(s.rows) == 48 and s.rows_held == 160 and len(s.gptq_rows()) == 160 for s in coded)
        rows = _row_bytes(sets)
    assert rows == memory.totals()["rows"]
    assert all(st.phase.name == "READY" for st in sq.report(compiled).states.values())


def test_inspect_calibration_memory(capsys, tmp_path):
    """The default (dynamic) options: the statistics serve the first call's decisions."""
    tiny_sd3().save_config(tmp_path / "transformer")
    out = tmp_path / "memory.json"
    assert cli.main(["inspect", str(tmp_path), "--resolution", "64", "--text-tokens", "5",
                     "--calibration-memory", str(out), "--summary"]) == 0
    text = capsys.readouterr().out
    assert "statistics serve GPTQ rounding" in text and "awaiting its first call" in text
    saved = json.loads(out.read_text())
    assert saved["totals"]["statistics"] > 0 and len(saved["sites"]) == saved["totals"]["sites"]


def test_a_bf16_model_keeps_bf16_rows_and_the_estimate_says_so():
    """Kept rows are the activations as the model made them: a bf16 model's stay bf16 (half the
    bytes, nothing lost), and the estimate for weight dtype bf16 counts them so; GPTQ's Hessians
    stay fp32 panels of the upper triangle."""
    opts = {"activations": "static", "inductor": False, "weight_rounding": "gptq"}
    model = tiny_sd3().to(torch.bfloat16)
    inputs = [{k: v.to(torch.bfloat16) if torch.is_tensor(v) and v.is_floating_point() else v
               for k, v in tiny_sd3_inputs(batch=2, seed=s, side=16).items()} for s in range(2)]
    memory = calibration_memory(sq.explain(model, **inputs[0], options=opts), torch.bfloat16, calls=len(inputs))
    compiled = torch.compile(model, backend="segquant", options=opts)
    with sq.calibrate(compiled, progress=False):
        for x in inputs:
            compiled(**x)
        sets = {id(st.stats): st.stats for st in sq.report(compiled).states.values()}
        assert {s.kept.dtype for s in sets.values()} == {torch.bfloat16}
        assert {p.dtype for s in sets.values() for h in s.hessians for p in h.panels} == {torch.float32}
        rows = _row_bytes(sets)
        hessians = sum(h.nbytes for s in sets.values() for h in s.hessians)
    assert (rows, hessians) == (memory.totals()["rows"], memory.totals()["hessians"])


def test_the_peak_during_calls_adds_the_largest_sets_call_transient():
    """One set observes at a time: the modelled peak is the held statistics plus the largest
    set's transient, which holds that call's full X^T X where the Hessian is summed and the
    reservoir's merge (bench/calibration_memory.py checks it against a measured peak)."""
    from segquant_compile.statistics import SAMPLE_ROWS, StatisticsSpec
    opts = {"activations": "static", "inductor": False, "weight_rounding": "gptq"}
    model = tiny_sd3()
    memory = calibration_memory(sq.explain(model, **tiny_sd3_inputs(batch=2, seed=0, side=16), options=opts),
                                calls=2)
    t = memory.totals()
    counted = [x for x in memory.sites if x.serves and x.shared_with is None]
    assert all(x.call_bytes > 0 for x in counted)
    assert all(x.call_bytes == 0 for x in memory.sites if x.shared_with)
    assert t["call_transient"] == max(x.call_bytes for x in counted)
    assert t["peak_during_calls"] == t["statistics"] + t["call_transient"]
    assert "peak during a call" in memory.describe(per_site=False)
    spec = StatisticsSpec.for_site((0, 96, 160), True, None)
    assert spec.sum_hessian
    fp32 = spec.call_bytes(300)
    # the steps of a call free what they make before the next: the peak is the largest of the
    # negated rows, the largest Hessian panel's product (96 x 96: a segment narrower than a
    # panel) and the reservoir's merge (the entering rows, their concatenation with those held)
    merge = 4 * 160 * (2 * 300 + spec.rows_kept)
    assert fp32 == max(4 * 300 * 160, 4 * 96 ** 2, merge) == merge
    # a 16-bit activation's rows: an fp32 copy alive through the call, a kept-dtype copy in the merge
    assert spec.call_bytes(300, 2) == 4 * 300 * 160 + max(4 * 300 * 160, 2 * 300 * 160 + merge // 2)
    # coded rows: the copies that code the rows ranked out of the exact ones (bench/calibration_memory.py
    # checks the model against a measured peak)
    wide = StatisticsSpec.for_site((0, 6144), True, None)
    assert wide.call_bytes(512) == 4 * 6144 * (512 + wide.rows_exact) + 16 * 6144 * 512
    assert spec.call_bytes(600) > fp32 and spec.call_bytes(SAMPLE_ROWS) < spec.call_bytes(SAMPLE_ROWS * 2)
