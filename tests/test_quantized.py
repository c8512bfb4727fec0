"""Quantized execution end to end on tiny random diffusers models (CPU)."""
import subprocess
import sys

import pytest
import torch
from torch import nn
from torch._inductor.utils import run_and_get_code

import segquant_compile as sq
from segquant_compile.examples import models
from conftest import TINY, Two, expected_site_gemms, output, site_gemm_calls, tiny_inputs
from segquant_compile.lowering.quantize import sqnr_db
from segquant_compile.registry import RUNNERS
from segquant_compile.lifecycle import Phase


def calibrated(model, options=None, calls=4, batch=2):
    compiled = torch.compile(model, backend="segquant", options={"activations": "static", **(options or {})})
    with torch.no_grad(), sq.calibrate(compiled, progress=False):
        for s in range(calls):
            compiled(**tiny_inputs(model, batch=batch, seed=10 + s))
    return compiled


@pytest.mark.parametrize("name", sorted(TINY))
@pytest.mark.parametrize("activations", ["dynamic", "static"])
def test_tiny_models_sqnr_and_one_gemm_per_site(name, activations):
    model = TINY[name]()
    x = tiny_inputs(model)
    with torch.no_grad():
        ref = output(model(**x))
        if activations == "static":
            compiled = calibrated(model)
        else:
            compiled = torch.compile(model, backend="segquant")
        got, code = run_and_get_code(lambda: output(compiled(**x)))
    db = sqnr_db(ref, got)
    print(f"{name} {activations}: SQNR {db:.2f} dB")
    assert db >= 25
    report = sq.report(compiled)
    quantized = report.totals()["sites"] - report.totals()["float"]
    assert quantized == len(report.sites) > 0
    if activations == "dynamic":   # static: the graph compiled during calibration, not in this call
        assert site_gemm_calls(code) == expected_site_gemms(report)   # the CPU form's GEMMs (cpu_linear.py)
    else:
        assert all(s.settled and s.sqnr is not None for s in report.states.values())


def test_a_static_graph_compiles_once_after_its_calibration(monkeypatch):
    """Before a calibration a static site cannot run quantized, and the calibration's decisions
    (schemes, smoothing) change the graph: nothing is compiled until the first quantized call
    (the calibration summary's), then never again."""
    from segquant_compile.runtime import GraphRunner
    compiles = []
    original = GraphRunner._compile
    monkeypatch.setattr(GraphRunner, "_compile", lambda self, gm, extra: compiles.append(1) or original(self, gm, extra))
    model = Two()
    x = torch.randn(2, 5, 8)
    compiled = torch.compile(model, backend="segquant", options={"activations": "static"})
    with torch.no_grad(), sq.calibrate(compiled, progress=False):
        for s in range(3):
            compiled(torch.randn(2, 5, 8, generator=torch.Generator().manual_seed(s)))
            assert compiles == []
    assert len(compiles) == 1
    with torch.no_grad():
        assert sqnr_db(model(x), compiled(x)) > 25
    assert len(compiles) == 1


def test_new_resolution_recompiles_with_the_same_scales():
    model = TINY["sd3"]()
    compiled = calibrated(model)
    states = dict(sq.report(compiled).states)
    steps = {n: s.d_pos.clone() for n, s in states.items()}
    packed = {n: s.packed for n, s in states.items()}
    x = models.example_inputs(model, batch=2, resolution=32, text_tokens=5,
                                 generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        db = sqnr_db(model(**x).sample, compiled(**x).sample)
    assert db >= 25
    after = sq.report(compiled)
    assert after.n_graphs >= 2                              # it did recompile
    for n, s in after.states.items():
        assert s is states[n]                               # same QuantState, not recalibrated
        assert torch.equal(s.d_pos, steps[n]) and s.packed is packed[n]


@pytest.mark.parametrize("rounding", ["rtn", "auto"])
def test_packing_happens_once_per_weight(monkeypatch, rounding):
    """Round to nearest: one packing per weight, never again on a recompile. "auto" with
    dynamic activations: to nearest when the state is made, then by GPTQ on the first call
    where it had rows enough (4 per column of K)."""
    from segquant_compile import site_params
    calls = []   # the storage of each weight packed
    original = site_params.packed
    monkeypatch.setattr(site_params, "packed", lambda w, *a, **k: (calls.append(w.data_ptr()), original(w, *a, **k))[1])
    model = TINY["pixart"]()
    compiled = torch.compile(model, backend="segquant", options={"weight_rounding": rounding})
    with torch.no_grad():
        compiled(**tiny_inputs(model, batch=8))
        compiled(**tiny_inputs(model, batch=3))       # new batch: recompile
        compiled(**tiny_inputs(model, batch=5))
    states = list(sq.report(compiled).states.values())
    assert len(set(calls)) == len(states)
    assert all(calls.count(st.weight().data_ptr()) == 1 + (st.rows_source == "the first call") for st in states)
    assert any(st.rows_source == "the first call" for st in states) == (rounding == "auto")


def test_static_steps_clip_searched_on_calibration_rows(tmp_path):
    """activation_clip "search" (the default): a range set by a few rows of a larger scale (a
    sampler's few loud timesteps) is cut to the factor with the best output SQNR on the
    calibration rows, better on typical inputs too; "absmax" keeps the range as seen. The factor
    is reported, saved and loaded."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32)).eval().requires_grad_(False)
    rows = torch.randn(512, 64)
    rows[:8] *= 4
    typical = torch.randn(64, 64)
    base = {"activations": "static", "weight_rounding": "rtn", "inductor": False, "smooth": None}
    sqnr, states, outs = {}, {}, {}
    for clip in ("search", "absmax"):
        torch._dynamo.reset()
        c = torch.compile(model, backend="segquant", options={**base, "activation_clip": clip})
        with sq.calibrate(c, progress=False):
            c(rows)
        (states[clip],) = sq.report(c).states.values()
        outs[clip] = c(typical)
        sqnr[clip] = sqnr_db(model(typical), outs[clip])
        if clip == "search":
            sq.save(c, tmp_path / "q")
    assert states["search"].act_clip < 1 and states["absmax"].act_clip is None
    assert float(states["search"].d_pos.max()) < float(states["absmax"].d_pos.max())
    assert sqnr["search"] > sqnr["absmax"] + 0.5, sqnr
    assert states["search"].summary()["activation_clip"] == states["search"].act_clip
    with pytest.raises(ValueError, match="activation_clip"):
        sq.resolve_options({"activation_clip": "mse"})
    torch._dynamo.reset()
    fresh = nn.Sequential(nn.Linear(64, 32)).eval().requires_grad_(False)
    fresh.load_state_dict(model.state_dict())   # other tensors: no state shared with `model`
    loaded = torch.compile(fresh, backend="segquant", options={**base, "load": str(tmp_path / "q")})
    assert torch.equal(loaded(typical), outs["search"])
    (state,) = sq.report(loaded).states.values()
    assert state.act_clip == states["search"].act_clip


def outlier_rows(n, seed):
    """Rows with a few input channels 30x louder than the rest (LayerNorm gains do this): one
    per-token step is set by them and the other channels keep few levels."""
    x = torch.randn(n, 64, generator=torch.Generator().manual_seed(seed))
    x[:, :4] *= 30
    return x


@pytest.mark.parametrize("activations", ["dynamic", "static"])
def test_smoothquant_searched_on_the_rows_beats_no_smoothing(tmp_path, activations):
    """smooth="search": per site, alpha (or none) by the output SQNR on real rows. Dynamic: the
    first call's, then fixed (a later call with other rows changes nothing); static: the
    calibration's. Channel outliers make it smooth, and more faithful on other rows; alpha is
    reported, saved and loaded."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32)).eval().requires_grad_(False)
    base = {"activations": activations, "weight_rounding": "rtn", "inductor": False}
    held_out, sqnr, outs = outlier_rows(256, 2), {}, {}
    for smooth in ("search", None):
        torch._dynamo.reset()
        c = torch.compile(model, backend="segquant", options={**base, "smooth": smooth})
        if activations == "static":
            with sq.calibrate(c, progress=False):
                c(outlier_rows(512, 1))
        else:
            c(outlier_rows(512, 1))                      # the first call decides
        (state,) = sq.report(c).states.values()
        if smooth:
            alpha, factors = state.alpha, state.smooth.clone()
            assert alpha is not None and state.summary()["smooth_alpha"] == alpha
            c(outlier_rows(300, 3) * 0.1)                # other rows, another batch: nothing changes
            assert state.alpha == alpha and torch.equal(state.smooth, factors)
            sq.save(c, tmp_path / "q")
        else:
            assert state.smooth is None and state.alpha is None
        outs[smooth] = c(held_out)
        sqnr[smooth] = sqnr_db(model(held_out), outs[smooth])
    assert sqnr["search"] > sqnr[None] + 3, sqnr
    torch._dynamo.reset()
    fresh = nn.Sequential(nn.Linear(64, 32)).eval().requires_grad_(False)
    fresh.load_state_dict(model.state_dict())
    loaded = torch.compile(fresh, backend="segquant", options={**base, "smooth": "search", "load": str(tmp_path / "q")})
    assert torch.equal(loaded(held_out), outs["search"])
    (state,) = sq.report(loaded).states.values()
    assert state.alpha == alpha and state.phase is Phase.READY


def test_a_call_refused_before_calibration_does_not_settle_the_smoothing():
    """weight_rounding "gptq" with dynamic activations refuses calls until calibrated; that
    refused call must not decide smoothing ("auto": none from one call): the calibration does."""
    torch.manual_seed(0)
    lin = nn.Linear(64, 32).eval().requires_grad_(False)
    c = torch.compile(lin, backend="segquant", options={"weight_rounding": "gptq", "inductor": False})
    with pytest.raises(RuntimeError, match="need calibration before use"):
        c(outlier_rows(512, 0))
    with sq.calibrate(c, progress=False):
        for seed in range(3):
            c(outlier_rows(64, seed))
    (state,) = sq.report(c).states.values()
    assert state.alpha is not None and state.smooth is not None and state.rows_source == "calibration"


def test_smoothquant_alpha_is_scored_on_calls_that_did_not_set_the_ranges(monkeypatch):
    """With two or more calibration calls, alpha is scored on the odd calls' rows with factors and
    steps from the even calls' ranges (on the same rows it fit `make demo`'s 4 inputs: -3.7 dB);
    the final factors use every call's ranges. One call: scored on its own rows."""
    from segquant_compile import site_params
    torch.manual_seed(0)
    lin = nn.Linear(64, 32).eval().requires_grad_(False)
    c = torch.compile(lin, backend="segquant", options={"activations": "static", "smooth": "search",
                                                        "weight_rounding": "rtn", "inductor": False})
    scored, ranges = [], []
    sqnr, smoothing = site_params.site_sqnr, site_params.with_smoothing
    monkeypatch.setattr(site_params, "site_sqnr", lambda params, lowering, w, rows, bias: (
        scored.append(rows.clone()), sqnr(params, lowering, w, rows, bias))[1])
    monkeypatch.setattr(site_params, "with_smoothing", lambda params, lowering, w, r, alpha, hessians=None: (
        ranges.append(r[0].clone()), smoothing(params, lowering, w, r, alpha, hessians))[1])
    calls = [outlier_rows(64, seed) * (1 + seed) for seed in range(4)]   # call i: values up to (1 + i) x
    with sq.calibrate(c, progress=False):
        for x in calls:
            c(x)
    (state,) = sq.report(c).states.values()
    odd = torch.cat([calls[1], calls[3]])
    assert len(scored) >= 5 and len(ranges) == 5 + 1   # no smoothing, then the alpha grid; the choice
    for rows, pos in zip(scored[:5], ranges[:5]):
        assert len(rows) == 128 and all(any(torch.equal(r, o) for o in odd) for r in rows[:8])
        assert torch.equal(pos, torch.maximum(calls[0], calls[2]).amax(dim=0).clamp(min=0))
    assert torch.equal(ranges[-1], torch.cat(calls).amax(dim=0).clamp(min=0))


def test_smoothing_never_amplifies_a_channel_the_rows_left_silent():
    """Channels at zero in the first call (ReLU units that had not fired) get the median divisor,
    not a tiny one: when they fire later they do not set the token's step by themselves."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32)).eval().requires_grad_(False)
    first = outlier_rows(512, 1)
    first[:, 32:] = 0
    later = outlier_rows(256, 2)
    sqnr = {}
    for smooth in ("search", None):
        torch._dynamo.reset()
        c = torch.compile(model, backend="segquant", options={"smooth": smooth, "weight_rounding": "rtn",
                                                              "inductor": False})
        c(first)
        sqnr[smooth] = sqnr_db(model(later), c(later))
    assert sqnr["search"] > sqnr[None] - 1, sqnr     # unclamped divisors of 1e-5: -30 dB


def test_first_call_with_too_few_rows_is_not_smoothed_and_says_so():
    """Factors fitted to fewer rows than 4 per input column (one timestep's AdaLN rows) would fit
    that call; the site runs unsmoothed and the report says why."""
    torch.manual_seed(0)
    lin = nn.Linear(64, 32).eval().requires_grad_(False)
    c = torch.compile(lin, backend="segquant", options={"smooth": "search", "inductor": False})
    c(outlier_rows(100, 1))
    (state,) = sq.report(c).states.values()
    assert state.smooth is None and state.phase is Phase.READY
    assert state.summary()["smooth_alpha"] == ("none (the first call gave 100 rows, fewer than 256 "
                                               "(4 per column of a K segment))")


def test_dynamic_smoothing_from_a_calibration_when_one_comes_first():
    """calibrate() before the first call gives SmoothQuant its ranges (all of its calls', weights
    rounded to nearest too); without smoothing, GPTQ or static steps there is nothing to calibrate."""
    torch.manual_seed(0)
    lin = nn.Linear(64, 32).eval().requires_grad_(False)
    c = torch.compile(lin, backend="segquant", options={"smooth": "search", "weight_rounding": "rtn", "inductor": False})
    with sq.calibrate(c, progress=False):
        for seed in range(3):
            c(outlier_rows(64, seed))
        (state,) = sq.report(c).states.values()
        assert state.observed_calls == 3   # all of its calls (the freeze then discards them)
    assert state.alpha is not None and state.settled
    assert state.lowering.activations == "dynamic"
    torch._dynamo.reset()
    plain = torch.compile(nn.Linear(64, 32), backend="segquant", options={"weight_rounding": "rtn", "smooth": None})
    with pytest.raises(ValueError, match="need no calibration"):
        with sq.calibrate(plain, progress=False):
            pass


def test_a_second_compile_of_calibrated_weights_never_ignores_its_calibration():
    """States are shared by weight and options: a new compile of calibrated weights, calibrated
    again, raises instead of keeping the old steps in silence; recalibrate=True takes the new rows."""
    torch.manual_seed(0)
    lin = nn.Linear(64, 32).eval().requires_grad_(False)
    options = {"activations": "static", "weight_rounding": "rtn", "inductor": False, "smooth": None}
    first = torch.compile(lin, backend="segquant", options=options)
    with sq.calibrate(first, progress=False):
        first(torch.randn(64, 64))
    torch._dynamo.reset()
    second = torch.compile(lin, backend="segquant", options=options)
    with pytest.raises(RuntimeError, match="earlier compile of the same weights"):
        with sq.calibrate(second, progress=False):
            second(torch.randn(64, 64) * 10)
    (before,) = sq.report(second).states.values()
    step = before.d_pos.clone()
    with sq.calibrate(second, progress=False, recalibrate=True):
        second(torch.randn(64, 64) * 10)
    (after,) = sq.report(second).states.values()
    assert float(after.d_pos.max()) > 5 * float(step.max())


def test_calibration_steps_freeze_automatically():
    model = TINY["pixart"]()
    compiled = torch.compile(model, backend="segquant", options={"activations": "static", "calibration_steps": 2})
    with torch.no_grad():
        for s in range(2):
            compiled(**tiny_inputs(model, seed=20 + s))
        assert all(st.settled for st in sq.report(compiled).states.values())
        x = tiny_inputs(model)
        assert sqnr_db(output(model(**x)), output(compiled(**x))) >= 25


# ------------------------------------------------------------------ calibration errors
def test_calibrate_errors():
    with pytest.raises(TypeError, match="compiled with"):
        with sq.calibrate(Two()):
            pass
    with pytest.raises(TypeError, match="inductor"):
        with sq.calibrate(torch.compile(Two(), backend="inductor")):
            pass
    # dynamic, no smoothing (the default "auto" smooths from a calibration): nothing to calibrate
    for options in ({"weight_rounding": "rtn", "smooth": None}, {"format": "fp8", "smooth": None}):
        with pytest.raises(ValueError, match="need no calibration"):
            with sq.calibrate(torch.compile(Two(), backend="segquant", options=options)):
                pass
    compiled = torch.compile(Two(), backend="segquant", options={"activations": "static", "inductor": False})
    with pytest.raises(RuntimeError, match="need calibration before use"):
        compiled(torch.randn(3, 8))
    with pytest.raises(RuntimeError, match="no call"):
        with sq.calibrate(compiled, progress=False):
            pass
    with pytest.raises(RuntimeError, match="already running"):
        with sq.calibrate(compiled, progress=False):
            with sq.calibrate(compiled, progress=False):
                pass
    with sq.calibrate(compiled, progress=False):
        compiled(torch.randn(3, 8))
    with pytest.raises(RuntimeError, match="already calibrated"):
        with sq.calibrate(compiled, progress=False):
            compiled(torch.randn(3, 8))
    with sq.calibrate(compiled, progress=False, recalibrate=True):
        compiled(torch.randn(3, 8) * 10)
    m = Two()
    compiled = torch.compile(m, backend="segquant", options={"activations": "static", "inductor": False})
    bad = torch.randn(3, 8)
    bad[0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match=r"observer of a\b"):
        with sq.calibrate(compiled, progress=False):
            compiled(bad)


# ------------------------------------------------------------------ weights policy
def test_edited_and_replaced_weights_are_repacked():
    m = Two()
    compiled = torch.compile(m, backend="segquant")
    x = torch.randn(5, 8)
    with torch.no_grad():
        assert sqnr_db(m(x), compiled(x)) > 30
        m.a.weight.mul_(-3.0)                                   # in-place edit
        assert sqnr_db(m(x), compiled(x)) > 30
        m.b.weight = nn.Parameter(torch.randn(4, 16))           # replacement
        assert sqnr_db(m(x), compiled(x)) > 30
        m.b.weight.data = torch.randn(4, 16)                    # .data swap
        assert sqnr_db(m(x), compiled(x)) > 30


def test_release_float_weights_frees_memory():
    model = TINY["sd3"]()
    x = tiny_inputs(model)
    with torch.no_grad():
        ref = output(model(**x))
    before = sum(p.untyped_storage().nbytes() for p in model.parameters())
    compiled = torch.compile(model, backend="segquant", options={"release_float_weights": True})
    with torch.no_grad():
        got = output(compiled(**x))
    after = sum(p.untyped_storage().nbytes() for p in model.parameters())
    packed = sum(s.packed.nbytes + s.d_w.nbytes for s in sq.report(compiled).states.values())
    print(f"float weights {before} B -> {after} B left + {packed} B packed int8")
    assert sqnr_db(ref, got) > 30
    assert after + packed < 0.4 * before
    with torch.no_grad():
        model.proj_out.weight.data = torch.randn_like(model.proj_out.bias).expand(16, 16).clone()
        with pytest.raises(RuntimeError, match="released"):
            compiled(**x)


# ------------------------------------------------------------------ save / load
SAVE_LOAD = """
import sys, torch
sys.path.insert(0, {tests!r})
import segquant_compile as sq
from segquant_compile.examples import models
from conftest import TINY, tiny_inputs
model = TINY["flux"]()
compiled = torch.compile(model, backend="segquant", options={{"activations": "static", "load": {path!r}}})
with torch.no_grad():
    torch.save(compiled(**tiny_inputs(model)).sample, {out!r})
"""


def test_save_then_load_in_a_fresh_process_is_bit_identical(tmp_path):
    model = TINY["flux"]()
    compiled = calibrated(model)
    with torch.no_grad():
        here = compiled(**tiny_inputs(model)).sample
    sq.save(compiled, tmp_path / "q")
    code = SAVE_LOAD.format(tests=str(__import__("pathlib").Path(__file__).parent), path=str(tmp_path / "q"),
                            out=str(tmp_path / "out.pt"))
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert torch.equal(torch.load(tmp_path / "out.pt"), here)


def test_load_refuses_other_weights_or_architecture(tmp_path):
    model = TINY["pixart"]()
    sq.save(calibrated(model), tmp_path / "q")
    other = TINY["pixart"](seed=1)                                      # same architecture, other weights
    compiled = torch.compile(other, backend="segquant", options={"activations": "static", "load": str(tmp_path / "q")})
    with pytest.raises(Exception, match="weights of .* differ"):
        compiled(**tiny_inputs(other))
    flux = TINY["flux"]()
    compiled = torch.compile(flux, backend="segquant", options={"activations": "static", "load": str(tmp_path / "q")})
    with pytest.raises(Exception, match="architecture differs"):
        compiled(**tiny_inputs(flux))
    compiled = torch.compile(model, backend="segquant", options={"activations": "static", "weights": "per-tensor",
                                                                 "load": str(tmp_path / "q")})
    with pytest.raises(Exception, match="another plan or options"):
        compiled(**tiny_inputs(model))


def test_report_of_compiled_model():
    model = TINY["sd3"]()
    compiled = calibrated(model, options={"skip": ["time_text_embed.*"]})
    r = sq.report(compiled)
    assert r.fallbacks == {n: "matches skip pattern 'time_text_embed.*'" for n in
                           ("time_text_embed.timestep_embedder.linear_1", "time_text_embed.timestep_embedder.linear_2",
                            "time_text_embed.text_embedder.linear_1", "time_text_embed.text_embedder.linear_2")}
    text = str(r)
    assert "float: matches skip pattern" in text and "SQNR" in text and "4 stay float" in text
    row = next(x for x in r.rows() if x["site"] == "transformer_blocks.0.ff.net.2")
    assert row["quant"]["format"] == "int8" and row["quant"]["sqnr_db"] > 20
    assert len(row["quant"]["act_step"]) == 1 and len(row["quant"]["candidates_sqnr_db"]) == 1
    schemes = row["quant"]["schemes"]                     # dualscale="auto": what was measured best
    assert ("act_step_neg" in row["quant"]) == (schemes == ["dualscale"])
    assert ("zero_point" in row["quant"]) == (schemes == ["asymmetric"])


def test_replaced_weight_in_static_mode_asks_for_calibration():
    g = torch.Generator().manual_seed(0)
    calib, x = torch.randn(256, 8, generator=g), torch.randn(4, 8, generator=g)
    m = Two()
    compiled = torch.compile(m, backend="segquant", options={"activations": "static", "inductor": False})
    with torch.no_grad(), sq.calibrate(compiled, progress=False):
        compiled(calib)
    with torch.no_grad():
        m.a.weight.mul_(0.5)                                       # in place: re-packed, steps kept
        assert sqnr_db(m(x), compiled(x)) > 25
        m.a.weight = nn.Parameter(torch.randn(16, 8, generator=g) * 0.3)   # replaced: steps unknown
        with pytest.raises(RuntimeError, match="a weight replaced since"):
            compiled(x)
        with pytest.warns(UserWarning, match="calibrating only the sites without steps"):
            with sq.calibrate(compiled, progress=False):
                compiled(calib)
        with sq.calibrate(compiled, progress=False, recalibrate=True):   # b's input range changed too
            compiled(calib)
        assert sqnr_db(m(x), compiled(x)) > 25


def test_per_tensor_weights_have_one_step_per_output_segment():
    model = TINY["sd3"]()
    compiled = torch.compile(model, backend="segquant", options={"weights": "per-tensor", "inductor": False})
    with torch.no_grad():
        x = tiny_inputs(model)
        assert sqnr_db(output(model(**x)), output(compiled(**x))) >= 25
    states = sq.report(compiled).states
    norm1 = states["transformer_blocks.0.norm1.linear"]
    steps = norm1.d_w.reshape(9, -1)                      # 9 AdaLN segments of 16 channels
    assert all(len(set(row.tolist())) == 1 for row in steps)
    assert len(set(steps[:, 0].tolist())) > 1             # and they differ between segments
    assert len(set(states["proj_out"].d_w.tolist())) == 1  # unsegmented: one step per tensor


@pytest.mark.parametrize("activations", ["dynamic", "static"])
def test_fp8_format(activations):
    """e4m3 weights and activations (emulated on CPU): the GEMM gets float8 operands."""
    model = TINY["sd3"]()
    x = tiny_inputs(model)
    options = {"format": "fp8", "inductor": False}
    with torch.no_grad():
        ref = output(model(**x))
        compiled = calibrated(model, options) if activations == "static" else \
            torch.compile(model, backend="segquant", options=options)
        db = sqnr_db(ref, output(compiled(**x)))
    print(f"sd3 fp8 {activations}: SQNR {db:.2f} dB")
    assert db >= 25
    states = sq.report(compiled).states.values()
    assert all(s.packed.dtype == torch.float8_e4m3fn for s in states)
