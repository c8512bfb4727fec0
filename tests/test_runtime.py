"""The quantized runtime as a demanding user meets it: nothing silently wrong (issue: runtime redesign)."""
import json
import threading
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import segquant_compile as sq
from segquant_compile.lowering.quantize import sqnr_db
from conftest import Two
from segquant_compile.compiled import find
from segquant_compile.weight_watch import FloatWeightsReleased

EAGER = {"inductor": False}   # the quantized graph run as traced: fast to build, same numbers


class Chain(nn.Module):
    """A linear feeding a linear, one feeding three (fan-out), and one feeding its own residual."""

    def __init__(self):
        super().__init__()
        self.a, self.q, self.k, self.v = (nn.Linear(32, 32) for _ in range(4))

    def forward(self, x):
        h = self.a(x)
        return self.q(h) + self.k(h) * self.v(h) + h


@pytest.mark.parametrize("model", [lambda: nn.Sequential(nn.Linear(32, 32), nn.Linear(32, 32)), Chain],
                         ids=["sequential", "fan-out+residual"])
def test_linear_fed_by_linear(model):
    torch.manual_seed(0)
    m = model().eval()
    x = torch.randn(5, 32)
    with torch.no_grad():
        got = torch.compile(m, backend="segquant")(x)
        assert sqnr_db(m(x), got) > 35


def test_transformer_encoder_every_linear_is_a_site():
    """nn.MultiheadAttention's F.linear calls (in_proj, out_proj) are sites with their segments."""
    torch.backends.mha.set_fastpath_enabled(False)
    torch.manual_seed(0)
    m = nn.TransformerEncoder(nn.TransformerEncoderLayer(32, 4, 64, batch_first=True, dropout=0.0), 2).eval()
    x = torch.randn(2, 6, 32)
    with torch.no_grad():
        c = torch.compile(m, backend="segquant", options=EAGER)
        assert sqnr_db(m(x), c(x)) > 30
    report = sq.report(c)
    names = {s.name: s for s in report.sites}
    assert len(names) == 8 and not report.fallbacks and not report.float_calls and not report.unreached
    in_proj = names["layers.0.self_attn.in_proj"]
    assert in_proj.output_segments.sizes == (32, 32, 32)
    assert names["layers.1.self_attn.out_proj"].input_segments.sizes == (8,) * 4
    assert set(report.states) == set(names)


def test_transformer_encoder_stays_quantized_after_a_batch_change():
    """A new batch size (a CFG sampler doubles it) makes dynamo recompile with symbolic sizes:
    the attention linears are still sites there, computing what a graph traced at that batch
    computes, not float."""
    torch.backends.mha.set_fastpath_enabled(False)
    torch.manual_seed(0)
    m = nn.TransformerEncoder(nn.TransformerEncoderLayer(32, 4, 64, batch_first=True, dropout=0.0), 2).eval()
    x2, x3 = torch.randn(2, 6, 32), torch.randn(3, 6, 32)
    with torch.no_grad():
        c = torch.compile(m, backend="segquant", options=EAGER)
        c(x2)
        got = c(x3)                       # the recompile, batch symbolic
        report = sq.report(c)
        torch._dynamo.reset()
        fresh = torch.compile(m, backend="segquant", options=EAGER)(x3)   # traced at batch 3
    assert report.totals()["graphs"] == 2 and not report.float_calls and not report.unreached
    torch.testing.assert_close(got, fresh, rtol=0, atol=0)
    assert not torch.equal(got, m(x3))    # quantized, not the float model

class ComputedWeight(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(16, 16)
        self.w = nn.Parameter(torch.randn(16, 16))

    def forward(self, x):
        return F.linear(self.lin(x), self.w * 0.5)


def test_linear_call_that_stays_float_is_reported():
    m = ComputedWeight()
    c = torch.compile(m, backend="segquant", options=EAGER)
    with torch.no_grad():
        c(torch.randn(3, 16))
    report = sq.report(c)
    assert [s.name for s in report.sites] == ["lin"]
    assert len(report.float_calls) == 1 and "computed" in report.float_calls[0].reason
    assert "float:" in str(report) and "computed" in str(report)
    assert report.totals()["float_calls"] == 1


class EagerLoop(nn.Module):
    """A graph break inside a loop: dynamo runs this frame eagerly, so the linears it calls
    never reach a segquant graph."""

    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList(nn.Linear(8, 8) for _ in range(2))
        self.head = nn.Linear(8, 8)

    def forward(self, x):
        for b in self.blocks:
            x = b(x)
            torch._dynamo.graph_break()
        return x


def test_linear_modules_run_eagerly_are_reported():
    m = EagerLoop()
    c = torch.compile(m, backend="segquant", options=EAGER)
    with torch.no_grad():
        c(torch.randn(2, 8))
    report = sq.report(c)
    assert set(report.unreached) >= {"blocks.0", "blocks.1", "head"}
    assert all("eagerly" in why for why in report.unreached.values())
    assert "blocks.0 (linear module)" in str(report)


# ------------------------------------------------------------------ weights edited through .data
def test_data_edits_are_followed():
    """`w.data += delta` and `w.data.copy_(new)` (a PEFT LoRA merge) bump no version counter."""
    torch.manual_seed(0)
    m = Two()
    c = torch.compile(m, backend="segquant")
    x = torch.randn(5, 8)
    with torch.no_grad():
        before = c(x)
        m.a.weight.data += 0.3 * torch.randn(16, 8)
        assert sqnr_db(m(x), c(x)) > 30
        m.b.weight.data.copy_(torch.randn(4, 16))
        after = c(x)
        assert sqnr_db(m(x), after) > 30 and not torch.allclose(before, after)


# ------------------------------------------------------------------ calibration
def test_exception_inside_calibrate_leaves_no_statistics():
    m = Two()
    c = torch.compile(m, backend="segquant", options={"activations": "static", **EAGER})
    with pytest.raises(KeyError):
        with sq.calibrate(c, progress=False):
            c(torch.randn(3, 8) * 1000)      # a huge range that must not survive
            raise KeyError("user code failed")
    states = [st for _, st in find(c).states]
    assert states and all(st.stats.empty and st.observed_calls == 0 for st in states)
    with torch.no_grad(), sq.calibrate(c, progress=False):
        c(torch.randn(3, 8))
    assert all(float(st.d_pos.max()) < 1.0 for st in states)   # steps from the clean run only


def test_zero_range_site_stays_dynamic_with_a_warning():
    torch.manual_seed(0)
    m = Two()
    c = torch.compile(m, backend="segquant", options={"activations": "static", "skip": ["b"]})
    with torch.no_grad():
        with pytest.warns(UserWarning, match=r"^segquant: a: calibrated range is zero"):
            with sq.calibrate(c, progress=False):
                c(torch.zeros(3, 8))          # blank inputs: site a sees only zeros
        report = sq.report(c)
        st = report.states["a"]
        assert st.lowering.activations == "dynamic" and st.d_pos is None
        assert "kept dynamic" in str(report)
        x = torch.randn(4, 8)
        assert sqnr_db(m(x), c(x)) > 30                     # not crushed by a vanishing step


@pytest.mark.parametrize("activations", ["dynamic", "static"])
def test_non_finite_rows_stay_non_finite(activations):
    torch.manual_seed(0)
    m = Two()
    c = torch.compile(m, backend="segquant", options={"activations": activations})
    with torch.no_grad():
        if activations == "static":
            with sq.calibrate(c, progress=False):
                c(torch.randn(4, 8))
        x = torch.randn(4, 8)
        x[1, 3], x[2, 0] = float("nan"), float("inf")
        got, ref = c(x), m(x)
    assert torch.isfinite(got[[0, 3]]).all()
    for row in (1, 2):
        assert not torch.isfinite(ref[row]).all() and not torch.isfinite(got[row]).all()


def test_two_models_in_two_threads_never_mix_weights():
    torch.manual_seed(0)
    models = [Two(), Two()]
    compiled = [torch.compile(m, backend="segquant") for m in models]
    x = torch.randn(3, 8)
    with torch.no_grad():
        expected = [c(x) for c in compiled]
    assert not torch.equal(*expected)
    mismatches, errors = [0, 0], []

    def run(i):
        try:
            with torch.no_grad():
                for _ in range(1500):
                    mismatches[i] += not torch.equal(compiled[i](x), expected[i])
        except Exception as e:   # pragma: no cover - reported below
            errors.append(e)
    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and mismatches == [0, 0]


# ------------------------------------------------------------------ graph breaks, save/load
class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn, self.ff = nn.Linear(8, 8), nn.Linear(8, 8)

    def forward(self, x):
        x = x + self.attn(x)
        torch._dynamo.graph_break()   # every block's frame compiles to one shared graph
        return x + self.ff(F.silu(x))


class Stack(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList(Block() for _ in range(3))
        self.out = nn.Linear(8, 4)

    def forward(self, x):
        for b in self.blocks:
            x = b(x)
        return self.out(x)


def test_graph_breaks_full_names_save_and_load(tmp_path):
    torch.manual_seed(0)
    m = Stack()
    x = torch.randn(2, 8)
    c = torch.compile(m, backend="segquant", options={"activations": "static", **EAGER})
    with torch.no_grad():
        with sq.calibrate(c, progress=False):
            c(torch.randn(4, 8))
        before = c(x)
    report = sq.report(c)
    names = [s.name for s in report.sites]
    expected = {f"blocks.{i}.{n}" for i in range(3) for n in ("attn", "ff")}
    assert len(names) == len(set(names)) and set(names) == expected == set(report.states)
    assert {s.weight for s in report.sites} == {"attn.weight", "ff.weight"}   # block graphs, shared
    assert set(report.unreached) == {"out"}      # the root frame (a loop with a break) runs eagerly
    sq.save(c, tmp_path / "q")
    saved = json.loads((tmp_path / "q" / "manifest.json").read_text())["sites"]
    assert set(saved) == expected
    torch._dynamo.reset()
    c2 = torch.compile(m, backend="segquant", options={"activations": "static", "load": str(tmp_path / "q"), **EAGER})
    with torch.no_grad():
        assert torch.equal(c2(x), before)


def test_load_refuses_a_bias_only_fine_tune(tmp_path):
    m = Two()
    c = torch.compile(m, backend="segquant", options=EAGER)
    with torch.no_grad():
        c(torch.randn(2, 8))
    sq.save(c, tmp_path / "q")
    with torch.no_grad():
        m.b.bias.add_(0.1)
    torch._dynamo.reset()
    c2 = torch.compile(m, backend="segquant", options={"load": str(tmp_path / "q"), **EAGER})
    with pytest.raises(Exception, match=r"bias of b differs .*calibrate again"):
        c2(torch.randn(2, 8))


def test_corrupt_file_raises_the_same_error_every_time_and_leaves_nothing(tmp_path):
    m = Two()
    c = torch.compile(m, backend="segquant", options=EAGER)
    with torch.no_grad():
        c(torch.randn(2, 8))
    path = sq.save(c, tmp_path / "q")
    blob = (path / "tensors.safetensors").read_bytes()
    (path / "tensors.safetensors").write_bytes(blob[: len(blob) // 2])      # truncated
    torch._dynamo.reset()
    from segquant_compile import registry
    before = len(registry.STATES.states_for(list(m.parameters())))
    messages = []
    for _ in range(2):
        torch._dynamo.reset()
        c2 = torch.compile(m, backend="segquant", options={"load": str(path), **EAGER})
        with pytest.raises(Exception) as info:
            c2(torch.randn(2, 8))
        messages.append(str(getattr(info.value, "inner_exception", info.value)))
    assert str(path) in messages[0] and "corrupt" in messages[0] and messages[0] == messages[1]
    assert len(registry.STATES.states_for(list(m.parameters()))) == before


# ------------------------------------------------------------------ autograd, released weights
def test_forward_with_autograd_on_and_backward_refused():
    torch.manual_seed(0)
    m = Two()
    c = torch.compile(m, backend="segquant")
    x = torch.randn(3, 8)
    with torch.no_grad():
        ref = c(x)
    got = c(x)                              # grad mode on: a second graph, same numbers
    assert torch.equal(got.detach(), ref) and got.requires_grad
    with pytest.raises(RuntimeError, match="inference-only"):
        got.sum().backward()


def test_released_float_weights_give_clear_errors():
    m = Two()
    c = torch.compile(m, backend="segquant", options={"activations": "static", "release_float_weights": True})
    with torch.no_grad():
        with sq.calibrate(c, progress=False):
            c(torch.randn(3, 8))
        c(torch.randn(3, 8))                 # first quantized call frees the float weights
        assert m.a.weight.untyped_storage().nbytes() == 0
        with pytest.raises(FloatWeightsReleased, match="release_float_weights"):
            m(torch.randn(3, 8))             # the original float model
        with pytest.raises(FloatWeightsReleased, match="calibration needs them"):
            with sq.calibrate(c, progress=False, recalibrate=True):
                pass


# ------------------------------------------------------------------ options, explain, report
def test_option_types():
    with pytest.raises(ValueError, match=r"'skip' must be a string or a list of strings, got int 5"):
        sq.resolve_options({"skip": 5})


def test_unmatched_skip_pattern_warns():
    with pytest.warns(UserWarning, match=r"skip pattern 'nothing\.\*' matches no linear site"):
        sq.explain(Two(), torch.randn(2, 8), options={"skip": ["nothing.*", "a"]})
    c = torch.compile(Two(), backend="segquant", options={"skip": ["zzz"], **EAGER})
    with torch.no_grad():
        c(torch.randn(2, 8))
    with pytest.warns(UserWarning, match="'zzz'"):
        sq.report(c)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        sq.explain(Two(), torch.randn(2, 8), options={"skip": ["a"]})
    assert not [w for w in seen if "segquant" in str(w.message)]


def test_explain_compiled_uses_its_options_and_report_without_linears():
    c = torch.compile(Two(), backend="segquant", options={"skip": ["b"], "dualscale": False})
    report = sq.explain(c, torch.randn(2, 8))
    assert report.config.skip == ("b",) and not report.config.dualscale
    assert set(report.fallbacks) == {"b"}
    plain = torch.compile(nn.Sequential(nn.Conv2d(2, 2, 3, groups=2), nn.ReLU()), backend="segquant", options=EAGER)
    plain(torch.randn(1, 2, 6, 6))                       # a depthwise conv is no site
    r = sq.report(plain)
    assert r.totals()["sites"] == 0 and "0 linear sites" in str(r)


def test_calibration_rows_are_a_uniform_sample_over_all_calls():
    """SQNR, scheme choice and GPTQ see rows from every call (a sampler's late timesteps too),
    not the first calls' rows only."""
    from segquant_compile.passes.site_rules import lower_site
    from segquant_compile.lifecycle import Decision
    from segquant_compile.state import QuantState
    from segquant_compile.statistics import GPTQ_ROWS
    model = Two()
    site = next(iter(sq.explain(model, torch.randn(2, 8)).sites))
    config = sq.resolve_options({"activations": "static"})
    weight = dict(model.named_parameters())[site.weight]
    state = QuantState(site, lower_site(site, config), weight)
    calls, per_call = 40, 64
    for call in range(calls):
        state.observe(torch.full((per_call, site.in_features), float(call)))
    rows = state.stats.rows
    assert Decision.ROUNDING in state.pending     # static: weight_rounding "auto" rounds by GPTQ, on a summed Hessian
    assert len(rows) == state.stats.spec.rows_kept == GPTQ_ROWS - site.in_features < calls * per_call == state.rows_seen
    assert state.stats.hessians[0].full()[0, 0] == sum(c * c * per_call for c in range(calls))   # every row, none kept for it
    late = (rows[:, 0] >= calls // 2).float().mean().item()
    assert 0.4 < late < 0.6, late   # half the rows seen came from the second half of the calls
    state.discard_statistics()
    assert state.stats.rows is None and state.rows_seen == 0


def test_calibration_rows_are_the_same_every_run():
    """One call of more rows than the reservoir draws several rows for one slot: the last one
    holds it, every run (an index_put with repeated indices kept any one; first-call GPTQ then
    rounded the same model differently from one compile to the next)."""
    from segquant_compile.passes.site_rules import lower_site
    from segquant_compile.state import QuantState
    from segquant_compile.statistics import GPTQ_ROWS
    model = Two()
    site = next(iter(sq.explain(model, torch.randn(2, 8)).sites))
    config = sq.resolve_options({"activations": "static"})
    weight = dict(model.named_parameters())[site.weight]
    x = torch.arange(3 * GPTQ_ROWS, dtype=torch.float32)[:, None].expand(-1, site.in_features)
    samples = []
    for _ in range(3):
        state = QuantState(site, lower_site(site, config), weight)
        state.observe(x)
        samples.append(state.stats.rows)
    assert all(torch.equal(samples[0], s) for s in samples[1:])
    assert len(samples[0][:, 0].unique()) == state.stats.spec.rows_kept   # distinct rows: no slot written twice over


def test_explains_do_not_use_up_the_recompile_limit_of_a_later_compile():
    """Each explain() compiles with a backend of its own; with torch's recompile regions (2.13)
    those entries never push the user's compile of the same model past the limit into eager."""
    import inspect
    if "isolate_recompiles" not in inspect.signature(torch.compile).parameters:
        pytest.skip("this torch has no recompile regions (isolate_recompiles): explain lifts the limit "
                    "only while it runs")
    torch._dynamo.reset()
    model = Two()
    for _ in range(10):
        sq.explain(model, torch.randn(2, 8))
    c = torch.compile(model, backend="segquant", options=EAGER)
    with torch.no_grad():
        c(torch.randn(2, 8))
    assert sq.report(c).states, "the segquant compile fell back to eager"
