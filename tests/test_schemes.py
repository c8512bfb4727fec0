"""Activation schemes end to end: asymmetric, dualscale="auto", and their save/load."""
import pytest
import torch
from torch import nn

import segquant_compile as sq
from segquant_compile.lowering.quantize import sqnr_db

EAGER = {"inductor": False}


class ReluMLP(nn.Module):
    """One-signed inputs (post-ReLU, shifted) to the second linear: where zero points pay."""

    def __init__(self):
        super().__init__()
        self.up, self.down = nn.Linear(32, 64), nn.Linear(64, 32)

    def forward(self, x):
        return self.down(torch.relu(self.up(x)) + 0.1)


def rows(seed, n=64):
    return torch.randn(n, 32, generator=torch.Generator().manual_seed(seed))


def compiled(options, static=False):
    torch.manual_seed(0)
    m = ReluMLP()
    c = torch.compile(m, backend="segquant", options={**options, **({"activations": "static"} if static else {})})
    if static:
        with torch.no_grad(), sq.calibrate(c, progress=False):
            for s in range(3):
                c(rows(100 + s))
    return m, c


@pytest.mark.parametrize("static", [False, True], ids=["dynamic", "static"])
def test_asymmetric_beats_symmetric_on_one_sided_inputs(static):
    """The schemes on the calibrated ranges as seen; a clip-searched range (the static default)
    narrows the gap, asymmetric still ahead."""
    x = rows(1)
    with torch.no_grad():
        for clip, margin in (("absmax", 1.0), ("search", 0.0)):
            m, sym = compiled({"dualscale": False, "activation_clip": clip}, static)
            _, asym = compiled({"dualscale": False, "asymmetric": True, "activation_clip": clip}, static)
            db_sym, db_asym = sqnr_db(m(x), sym(x)), sqnr_db(m(x), asym(x))
            assert db_asym > db_sym + margin, (clip, db_sym, db_asym)
    st = sq.report(asym).states["down"]
    assert st.lowering.schemes == ("asymmetric",) and st.lowering.variant == "int8-asym"
    if static:
        assert st.zp is not None and st.summary()["zero_point"][0] < 0   # range mostly above zero


def test_auto_dynamic_chooses_on_the_first_call_and_never_recompiles():
    m, c = compiled({"dualscale": "auto"})
    with torch.no_grad():
        first = c(rows(1))
        with torch._dynamo.config.patch(error_on_recompile=True):
            assert torch.equal(c(rows(1)), first)
            c(rows(2))
    report = sq.report(c)
    down = report.states["down"]
    assert down.chosen == ("asymmetric",)
    assert set(down.candidates[0]) == {"symmetric", "asymmetric", "dualscale"}
    assert "candidates_sqnr_db" in report.rows()[1]["quant"] and "measured" in str(report)


def test_auto_static_chooses_at_freeze_and_reloads_bit_identical(tmp_path):
    m, c = compiled({"dualscale": "auto", **EAGER}, static=True)
    x = rows(1)
    with torch.no_grad():
        before = c(x)
    states = sq.report(c).states
    assert all(st.chosen is not None and st.candidates for st in states.values())
    sq.save(c, tmp_path / "q")
    torch._dynamo.reset()
    c2 = torch.compile(m, backend="segquant", options={"dualscale": "auto", "activations": "static",
                                                       "load": str(tmp_path / "q"), **EAGER})
    with torch.no_grad():
        assert torch.equal(c2(x), before)
    assert {n: st.chosen for n, st in sq.report(c2).states.items()} == {n: st.chosen for n, st in states.items()}


def test_degenerate_calibration_chooses_a_valid_scheme():
    """A segment calibrated on one-signed rows gets finite, non-vanishing steps for every scheme."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.ReLU(), nn.Linear(16, 8))
    c = torch.compile(m, backend="segquant", options={"activations": "static", "dualscale": "auto", **EAGER})
    with torch.no_grad():
        with sq.calibrate(c, progress=False):
            c(torch.rand(8, 16))                          # only positive rows
        st = sq.report(c).states["1"]
        assert st.chosen is not None and bool((st.d_pos > 1e-6).all() and (st.d_neg > 1e-6).all())
        x = torch.rand(4, 16)
        assert sqnr_db(m(x), c(x)) > 30


def test_fp8_refuses_asymmetric():
    with pytest.raises(ValueError, match="int8 only"):
        sq.resolve_options({"format": "fp8", "asymmetric": True})
    assert sq.resolve_options({"format": "fp8"}).dualscale == "auto"   # sym or DualScale only
    with pytest.raises(ValueError, match="True, False or 'auto'"):
        sq.resolve_options({"dualscale": "sometimes"})
