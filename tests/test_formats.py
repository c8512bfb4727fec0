"""Weight formats beyond int8 (w4a8, int8/int4 weight-only), per-site formats and GPTQ rounding,
through the whole compile on CPU (the GEMM ops and Triton kernels: tests/test_formats_kernels.py)."""
import warnings

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import segquant_compile as sq
from segquant_compile.compiled import find
from segquant_compile.lowering import quantize as Q
from segquant_compile.lowering.gptq import gptq_int4, gptq_int8, segment_hessians
from segquant_compile.lifecycle import Decision
from segquant_compile.site_params import float_weight



class Net(torch.nn.Module):
    """Output segments (chunk), input segments (cat) and a GELU-fed site: the SegLinear cases."""

    def __init__(self):
        super().__init__()
        self.a = torch.nn.Linear(256, 384)
        self.b = torch.nn.Linear(128, 64)
        self.c = torch.nn.Linear(256, 64)

    def forward(self, x):
        q, k, _ = self.a(x).chunk(3, dim=-1)
        return self.c(torch.cat([F.gelu(q), k], -1)) + self.b(F.silu(q))


def correlated(batch, seed):
    """Inputs with correlated channels (where GPTQ's compensation has something to use)."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.eye(256) + 0.03 * torch.randn(256, 256, generator=torch.Generator().manual_seed(99))
    return torch.randn(batch, 16, 256, generator=g) @ mix


@pytest.fixture(scope="module")
def net():
    torch.manual_seed(0)
    return Net().eval().requires_grad_(False)


def compiled(model, **options):
    torch._dynamo.reset()
    return torch.compile(model, backend="segquant", options={"inductor": False, **options})


def formats_of(c):
    return {st.name: st.lowering.format for st in find(c).quant_states}


@pytest.mark.parametrize("fmt, floor", [("w4a8", 17.0), ("int8-weight-only", 40.0), ("int4-weight-only", 17.0)])
def test_format_runs_every_site_at_that_format(net, fmt, floor):
    x = correlated(4, 1)
    c = compiled(net, format=fmt)
    out = c(x)
    assert formats_of(c) == {"a": fmt, "b": fmt, "c": fmt}
    db = Q.sqnr_db(net(x), out)
    assert floor < db < 60, db   # quantized (not float), and not broken


def test_weight_only_is_float_activations_times_the_dequantized_weight(net):
    x = correlated(2, 2)
    c = compiled(net, format="int4-weight-only", group_size=64)
    out = c(x)
    states = {st.name: st for st in find(c).quant_states}
    # the same forward by hand: each site x @ dequantized + b
    lin = lambda name, v: v @ states[name].dequantized + getattr(net, name).bias  # noqa: E731
    q, k, _ = lin("a", x).chunk(3, dim=-1)
    ref = lin("c", torch.cat([F.gelu(q), k], -1)) + lin("b", F.silu(q))
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    st_c = states["c"]
    assert st_c.packed.shape == (128, 64) and st_c.d_w.shape == (4, 64)   # two per byte; 256 / 64 groups


def test_w4a8_steps_are_per_group_inside_segments(net):
    c = compiled(net, format="w4a8", group_size=64)
    c(correlated(2, 3))
    st_c = {st.name: st for st in find(c).quant_states}["c"]
    assert st_c.lowering.k_bounds == (0, 128, 256)
    assert st_c.lowering.g_bounds == (0, 64, 128, 192, 256)
    assert st_c.colsum.shape == (4, 64)   # zero-point corrections per group


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(1, 300), min_size=1, max_size=6), st.sampled_from(Q.GROUP_SIZES))
def test_groups_refine_segments(sizes, group):
    bounds = [0]
    for s in sizes:
        bounds.append(bounds[-1] + s)
    g = Q.group_bounds(bounds, group)
    assert set(bounds) <= set(g) and list(g) == sorted(set(g))
    assert all(0 < b - a <= group for a, b in zip(g[:-1], g[1:]))


def test_mse_clip_rounds_4bit_groups_no_worse_than_absmax():
    torch.manual_seed(0)
    w = torch.randn(32, 200)   # Gaussian groups: absmax spends levels on rare tails
    g = Q.group_bounds((0, 200), 64)

    def error(clip):   # per output channel, summed over its groups
        s = Q.int4_steps(w, g, clip)
        return (Q.round_int4(w, s, g).float() * Q.expand_groups(s, g) - w.t()).pow(2).sum(dim=0)
    assert bool((error("mse") <= error("absmax") * (1 + 1e-6)).all())
    assert error("mse").sum() < 0.9 * error("absmax").sum()


def test_weight_clip_auto_searches_4bit_steps_only(net):
    x = correlated(2, 3)
    clips = {}
    for fmt, clip in (("int8", "auto"), ("w4a8", "auto"), ("w4a8", "absmax")):
        c = compiled(net, format=fmt, weight_clip=clip, weight_rounding="rtn")   # GPTQ moves the weights
        c(x)
        st_a = {st.name: st for st in find(c).quant_states}["a"]
        clips[fmt, clip] = st_a.lowering.weight_clip
        if fmt == "w4a8":
            w = net.a.weight.detach().float()
            expect = Q.int4_steps(w, st_a.lowering.g_bounds, clips[fmt, clip])
            assert torch.equal(st_a.d_w, expect)
    assert clips == {("int8", "auto"): "absmax", ("w4a8", "auto"): "mse", ("w4a8", "absmax"): "absmax"}


def test_per_site_formats_and_float(net):
    c = compiled(net, formats={"c": "w4a8", "b": "float"})
    c(correlated(2, 4))
    assert formats_of(c) == {"a": "int8", "c": "w4a8"}
    text = str(sq.report(c))
    assert "format 'float' for this site" in text
    # weighted by weight size: a 256x384 at 8 bits, c 256x64 at 4 (b is float)
    assert "formats: 1 int8, 1 w4a8; average weight bits 7.43" in text
    assert sq.report(c).totals()["average_weight_bits"] == round((98304 * 8 + 16384 * 4) / 114688, 3)


@pytest.mark.parametrize("options, message", [
    ({"format": "w8"}, "invalid value 'w8'"),
    ({"formats": {"a": "int3"}}, "formats\\['a'\\]"),
    ({"format": "fp8", "weight_rounding": "gptq"}, "rounds integer weights"),
    ({"format": "w4a8", "group_size": 96}, "group_size"),
    ({"format": "auto"}, "needs options 'budget'"),
    ({"budget": {"weight_bits": 5}}, "format='auto' only"),
    ({"format": "auto", "budget": {"bits": 5}, "sensitivity": "s.json"}, "budget"),
])
def test_bad_format_options_raise(options, message):
    with pytest.raises(ValueError, match=message):
        sq.compile(torch.nn.Linear(4, 4), **options)


def test_gptq_beats_round_to_nearest_on_held_out_rows():
    torch.manual_seed(0)
    w = torch.randn(64, 300)
    k_bounds = (0, 100, 300)
    g = Q.group_bounds(k_bounds, 64)
    mix = torch.eye(300) + 0.3 * torch.randn(300, 300)
    rows, held_out = torch.randn(2000, 300) @ mix, torch.randn(1000, 300) @ mix
    q, steps = gptq_int4(w, segment_hessians(rows, k_bounds), k_bounds, g)
    assert q.abs().max() <= 7 and steps.shape == (len(g) - 1, 64)
    rtn_steps = Q.int4_steps(w, g)
    rtn = Q.round_int4(w, rtn_steps, g).float() * Q.expand_groups(rtn_steps, g)
    ref = held_out @ w.t()
    gain = Q.sqnr_db(ref, held_out @ (q.float() * Q.expand_groups(steps, g))) - Q.sqnr_db(ref, held_out @ rtn)
    assert gain > 0.5, gain


def test_gptq_int8_keeps_the_channel_steps_and_beats_round_to_nearest():
    """8-bit: the per-channel absmax steps stay; only which grid value each weight takes changes."""
    torch.manual_seed(0)
    w = torch.randn(64, 300)
    k_bounds = (0, 100, 300)
    mix = torch.eye(300) + 0.3 * torch.randn(300, 300)
    rows, held_out = torch.randn(2000, 300) @ mix, torch.randn(1000, 300) @ mix
    steps = Q.weight_steps(w)
    q = gptq_int8(w, segment_hessians(rows, k_bounds), k_bounds, steps)
    assert q.dtype == torch.int8 and q.shape == (300, 64) and q.abs().max() <= 127
    rtn = Q.quantize_weight(w, steps)
    assert not torch.equal(q, rtn) and (q.int() - rtn.int()).abs().max() <= 3   # nearby grid values
    ref = held_out @ w.t()
    gain = Q.sqnr_db(ref, held_out @ (q.float() * steps)) - Q.sqnr_db(ref, held_out @ (rtn.float() * steps))
    assert gain > 0.5, gain


@pytest.mark.parametrize("options, rounding", [
    ({}, "gptq-first-call"),                                       # dynamic: the first call's rows
    ({"weight_rounding": "rtn"}, "rtn"),
    ({"format": "fp8"}, "rtn"),                                    # fp8 rounds by its cast
    ({"activations": "static"}, "gptq"),                          # calibrated anyway: GPTQ
    ({"activations": "static", "weight_rounding": "rtn"}, "rtn"),
    ({"activations": "static", "format": "fp8"}, "rtn"),          # fp8 rounds by its cast
    ({"weight_rounding": "gptq"}, "gptq"),
])
def test_weight_rounding_auto(options, rounding):
    from segquant_compile.passes.site_rules import lower_site
    from segquant_compile.passes import build_plan
    from segquant_compile.capture import capture_graphs
    (gm, _), = capture_graphs(torch.nn.Linear(64, 32), (torch.randn(2, 64),), {})
    site, = build_plan(gm)
    assert lower_site(site, sq.resolve_options(options)).rounding == rounding


def test_recalibration_rounds_by_gptq_again(net):
    c = compiled(net, activations="static")     # weight_rounding "auto": GPTQ
    with sq.calibrate(c, progress=False):
        c(correlated(32, 11))
    first = {st.name: st.packed.clone() for st in find(c).quant_states}
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*re-packed with round-to-nearest")
        with sq.calibrate(c, progress=False, recalibrate=True):
            c(correlated(32, 12) * 3)
    for st in find(c).quant_states:
        assert Decision.ROUNDING not in st.pending and st.lowering.rounding == "gptq"
        assert not torch.equal(st.packed, first[st.name])                       # rounded on the new rows
        assert not torch.equal(st.packed, Q.pack_weight(float_weight(st.weight(), st.site).float(), st.lowering)[0])


@pytest.mark.parametrize("fmt, batch", [("int8", 64), ("w4a8", 8)])
def test_gptq_needs_calibration_then_runs_dynamic(net, fmt, batch):
    c = compiled(net, format=fmt, weight_rounding="gptq")     # dynamic activations
    with pytest.raises(RuntimeError, match="need calibration before use"):
        c(correlated(2, 5))
    with sq.calibrate(c, progress=False):
        for seed in range(3):
            c(correlated(32, 10 + seed))
    x = correlated(batch, 6)
    got = c(x)
    states = find(c).quant_states
    assert {st.lowering.format for st in states} == {fmt}
    assert all(st.lowering.rounding == "gptq" and Decision.ROUNDING not in st.pending and st.lowering.activations == "dynamic"
               for st in states)
    assert "gptq" in str(sq.report(c))
    rtn = compiled(net, format=fmt, weight_rounding="rtn")(x)
    ref = net(x)
    assert Q.sqnr_db(ref, got) > Q.sqnr_db(ref, rtn)   # the model output, not just one layer


# ------------------------------------------------------------------ GPTQ on the first call
def fresh() -> Net:
    """Weights of its own: a state is shared by every compile of one weight with one lowering,
    so the module's `net` has had its first call in an earlier test."""
    torch.manual_seed(0)
    return Net().eval().requires_grad_(False)


def rounded_by(c) -> dict:
    return {st.name: st.summary().get("weight_rounding") for st in find(c).quant_states}


@pytest.mark.parametrize("fmt", ["int8", "w4a8"])
def test_dynamic_auto_rounds_by_gptq_on_the_first_call_then_keeps_it(fmt):
    """weight_rounding "auto", dynamic: GPTQ on the first call's rows (damped more), fixed from
    then on: the first call already runs with them, later calls never re-round, and the model is
    more faithful than round to nearest on other inputs."""
    net = fresh()
    c = compiled(net, format=fmt)
    first = correlated(64, 11)                        # 1024 rows: 4 per column of the widest K (256)
    out_first = c(first)
    packed = {st.name: st.packed.clone() for st in find(c).quant_states}
    assert set(rounded_by(c).values()) == {"gptq (rows: the first call)"}
    for st in find(c).quant_states:
        assert st.lowering.rounding == "gptq-first-call" and Decision.ROUNDING not in st.pending and st.settled
        assert not torch.equal(st.packed, Q.pack_weight(float_weight(st.weight(), st.site).float(), st.lowering)[0])
    c(correlated(3, 12))                              # another batch: a recompile, no re-rounding
    assert all(torch.equal(st.packed, packed[st.name]) for st in find(c).quant_states)
    assert torch.equal(c(first), out_first)           # the first call ran with the weights that stay
    x = correlated(8, 6)
    ref = net(x)
    rtn = compiled(net, format=fmt, weight_rounding="rtn")(x)
    assert Q.sqnr_db(ref, c(x)) > Q.sqnr_db(ref, rtn)


def test_first_call_rounding_saves_and_loads_bit_identically(tmp_path):
    net = fresh()
    c = compiled(net)
    c(correlated(64, 11))
    x = correlated(4, 5)
    want, rounding = c(x), rounded_by(c)
    assert rounding == {n: "gptq (rows: the first call)" for n in "abc"}
    sq.save(c, tmp_path / "q")
    other = Net().eval().requires_grad_(False)
    other.load_state_dict(net.state_dict())       # other tensors: no state shared with `net`
    loaded = compiled(other, load=str(tmp_path / "q"))
    assert torch.equal(loaded(x), want)
    assert rounded_by(loaded) == rounding


def test_first_call_damping_is_larger_than_calibrations():
    """One call's rows are damped more (lowering/gptq.py FIRST_CALL_DAMP); the grid differs."""
    from segquant_compile.lowering import gptq
    assert gptq.FIRST_CALL_DAMP > gptq.DAMP
    torch.manual_seed(0)
    w, rows = torch.randn(32, 64), correlated(2, 3).reshape(-1, 256)[:, :64]
    steps = w.abs().amax(dim=1) / 127
    h = segment_hessians(rows, (0, 64))
    assert not torch.equal(gptq_int8(w, h, (0, 64), steps), gptq_int8(w, h, (0, 64), steps, gptq.FIRST_CALL_DAMP))


def test_dynamic_auto_takes_a_calibrations_rows_when_one_comes_first():
    c = compiled(fresh())
    with sq.calibrate(c, progress=False):
        for seed in range(2):
            c(correlated(16, 30 + seed))
        # every call's rows (the first-call rule ran at each and kept only the last call's); the
        # freeze at the block's end discards them
        assert all(st.lowering.activations == "dynamic" and st.observed_calls == 2 and
                   st.rows_seen == 2 * 16 * 16 for st in find(c).quant_states)
    assert set(rounded_by(c).values()) == {"gptq (rows: calibration)"}


def test_first_call_gptq_rounds_again_after_a_weight_edit():
    model = fresh()
    c = compiled(model)
    c(correlated(64, 1))
    with torch.no_grad():
        model.b.weight.mul_(1.5)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*re-packed with round-to-nearest")
        c(correlated(64, 2))
    st_b = {st.name: st for st in find(c).quant_states}["b"]
    assert st_b.rows_source == "the first call" and Decision.ROUNDING not in st_b.pending
    assert not torch.equal(st_b.packed, Q.pack_weight(float_weight(st_b.weight(), st_b.site).float(), st_b.lowering)[0])


def test_first_call_without_finite_rows_rounds_to_nearest_and_says_so():
    model = torch.nn.Linear(64, 32).eval().requires_grad_(False)
    c = compiled(model)
    bad = torch.full((4, 64), float("nan"))
    with pytest.warns(UserWarning, match="all NaN/Inf: weights rounded to nearest"):
        out = c(bad)
    assert torch.isnan(out).all()                     # NaN in, NaN out: never turned finite
    st, = find(c).quant_states
    assert torch.equal(st.packed, Q.pack_weight(model.weight.float(), st.lowering)[0])
    assert rounded_by(c)[st.name] == "rtn (the first call's rows were all NaN/Inf)"


def test_first_call_with_too_few_rows_rounds_to_nearest_and_says_so():
    """GPTQ fitted to fewer rows than 4 per column of a K segment loses to round to nearest on
    other rows: a call of 2 x 16 rows on K = 256 keeps the weights rounded to nearest."""
    c = compiled(fresh())
    c(correlated(2, 1))
    st_a = {st.name: st for st in find(c).quant_states}["a"]
    assert torch.equal(st_a.packed, Q.pack_weight(float_weight(st_a.weight(), st_a.site).float(), st_a.lowering)[0])
    assert rounded_by(c)["a"] == "rtn (the first call gave 32 rows, fewer than 1024 (4 per column of a K segment))"


def test_first_call_gptq_fits_every_row_of_a_site_wider_than_the_kept_sample():
    """A K=1024 site needs 4096 first-call rows, twice what the reservoir keeps (GPTQ_ROWS): its
    Hessian is summed over all of them (HESSIAN_MAX_K), so it is rounded by GPTQ, not to nearest,
    and the sum is freed once used."""
    from segquant_compile.statistics import GPTQ_ROWS, HESSIAN_MAX_K
    k, rows = 1024, 4160
    assert GPTQ_ROWS < 4 * k <= rows and k <= HESSIAN_MAX_K
    torch.manual_seed(0)
    model = torch.nn.Linear(k, 32).eval().requires_grad_(False)
    mix = torch.eye(k) + 0.05 * torch.randn(k, k)
    x, held_out = torch.randn(rows, k) @ mix, torch.randn(512, k) @ mix
    c = compiled(model, smooth=None)
    c(x)
    st, = find(c).quant_states
    assert st.summary()["weight_rounding"] == "gptq (rows: the first call)" and st.stats.hessians is None
    rtn = Q.pack_weight(model.weight.float(), st.lowering)
    ref = held_out @ model.weight.t()
    gain = (Q.sqnr_db(ref, held_out @ (st.packed.float() * st.d_w))
            - Q.sqnr_db(ref, held_out @ (rtn[0].float() * rtn[1])))
    assert gain > 0.5, gain


@pytest.mark.parametrize("k, calls, per_call", [(768, 8, 2048), (1536, 8, 4096)])
def test_gptq_on_the_summed_hessian_beats_gptq_on_the_kept_rows_where_k_is_wide(k, calls, per_call):
    """A wide site calibrated on many rows: GPTQ on X^T X of all of them against GPTQ on 2048 of
    them sampled (GPTQ_ROWS, what was kept before), output SQNR on held-out rows. Measured (-s
    prints it): K=768 44.30 kept / 44.85 summed dB; K=1536 43.24 / 44.64."""
    from segquant_compile.statistics import GPTQ_ROWS
    torch.manual_seed(0)
    w = torch.randn(128, k)
    mix = torch.eye(k) + 0.05 * torch.randn(k, k)
    xs = [torch.randn(per_call, k) @ mix for _ in range(calls)]
    held_out = torch.randn(2048, k) @ mix
    kept = torch.cat(xs)[torch.randperm(calls * per_call)[:GPTQ_ROWS]]
    steps = Q.weight_steps(w)
    summed = [sum(segment_hessians(x, (0, k))[0] for x in xs)]
    ref = held_out @ w.t()
    sqnr = {name: Q.sqnr_db(ref, held_out @ (gptq_int8(w, h, (0, k), steps).float() * steps))
            for name, h in (("kept", segment_hessians(kept, (0, k))), ("summed", summed))}
    print(f"K={k}: {sqnr}")
    assert sqnr["summed"] > sqnr["kept"] + 0.3, sqnr


def test_a_site_too_wide_to_sum_a_hessian_fits_the_kept_rows_and_says_so(monkeypatch):
    from segquant_compile import statistics
    monkeypatch.setattr(statistics, "HESSIAN_MAX_K", 512)
    model = torch.nn.Linear(1024, 8).eval().requires_grad_(False)
    c = compiled(model, smooth=None)
    c(torch.randn(4160, 1024))
    st, = find(c).quant_states
    assert st.summary()["weight_rounding"] == (
        "rtn (the first call gave 2048 rows kept of 4160 (a K segment wider than 512 sums no Hessian), "
        "fewer than 4096 (4 per column of a K segment))")


def test_calibration_gptq_sums_the_hessian_of_every_row():
    """Two calibration calls of 1536 rows (more than GPTQ_ROWS): GPTQ rounds on X^T X of all
    3072, summed call by call, not on a kept sample; the rows kept make room for the sum."""
    from segquant_compile.statistics import GPTQ_ROWS, SAMPLE_ROWS
    torch.manual_seed(0)
    model = torch.nn.Linear(64, 16).eval().requires_grad_(False)
    mix = torch.eye(64) + 0.3 * torch.randn(64, 64)
    calls = [torch.randn(1536, 64) @ mix for _ in range(2)]
    c = compiled(model, weight_rounding="gptq", smooth=None)
    with sq.calibrate(c, progress=False):
        for x in calls:
            c(x)
        st, = find(c).quant_states
        kept = st.stats.rows   # read before the freeze discards the statistics
        assert st.rows_seen == 3072 > GPTQ_ROWS and len(kept) == GPTQ_ROWS - 64 >= SAMPLE_ROWS   # room for H
    steps = Q.weight_steps(model.weight.float(), None, "int8", st.lowering.weight_clip)
    summed = [a + b for a, b in zip(segment_hessians(calls[0], (0, 64)), segment_hessians(calls[1], (0, 64)))]
    assert torch.equal(st.packed, gptq_int8(model.weight.float(), summed, (0, 64), steps))
    assert not torch.equal(st.packed, gptq_int8(model.weight.float(), segment_hessians(kept, (0, 64)),
                                                (0, 64), steps))


def test_gptq_site_whose_weight_changes_is_repacked_to_nearest_with_a_warning():
    torch.manual_seed(0)
    model = Net().eval().requires_grad_(False)
    c = compiled(model, format="w4a8", weight_rounding="gptq", smooth=None)
    with sq.calibrate(c, progress=False):
        c(correlated(32, 11))
    c(correlated(2, 7))
    with torch.no_grad():
        model.b.weight.mul_(1.5)
    with pytest.warns(UserWarning, match="re-packed with round-to-nearest"):
        out = c(correlated(2, 7))
    st_b = {st.name: st for st in find(c).quant_states}["b"]
    expect = Q.pack_weight(model.b.weight, st_b.lowering)
    assert torch.equal(st_b.packed, expect[0]) and torch.equal(st_b.d_w, expect[1])
    assert torch.isfinite(out).all()


def test_mixed_formats_save_and_load_bit_identically(net, tmp_path):
    options = dict(formats={"c": "w4a8", "b": "int4-weight-only"}, activations="static",
                   weight_rounding="gptq", group_size=64)
    c = compiled(net, **options)
    with sq.calibrate(c, progress=False):
        for seed in range(2):
            c(correlated(32, 20 + seed))
    x = correlated(4, 8)
    want = c(x)
    sq.save(c, tmp_path / "q")
    saved = {st.name: st for st in find(c).quant_states}
    loaded = compiled(net, load=str(tmp_path / "q"))   # dynamo's reset: `c` is gone from here on
    got = loaded(x)
    assert torch.equal(want, got)
    for st in find(loaded).quant_states:
        assert st.lowering == saved[st.name].lowering
        assert torch.equal(st.packed, saved[st.name].packed) and torch.equal(st.d_w, saved[st.name].d_w)
    assert formats_of(loaded) == {"a": "int8", "b": "int4-weight-only", "c": "w4a8"}


def test_explain_on_the_meta_device_plans_per_site_formats():
    from segquant_compile import explain
    from segquant_compile.examples import models
    model = models.build(models.load_config("sd3.5-medium"), device="meta")
    report = explain(model, **models.example_inputs(model, batch=1),
                     options={"format": "w4a8", "formats": {"*norm1*": "int8", "proj_out": "float"}})
    text = str(report)
    assert "planned: w4a8 g128 gptq" in text and "planned: int8 gptq w per-channel" in text
    assert "float: format 'float' for this site" in text
    assert 4.0 < report.totals()["average_weight_bits"] < 8.0


def test_auto_format_allocates_under_the_budget_and_reloads_without_the_measurement(net, tmp_path):
    calls = [(correlated(2, 30 + i),) for i in range(2)]
    sens = sq.sensitivity(net, calls, formats=("int8", "w4a8"), progress=False)
    assert {s.name for s in sens.sites} == {"a", "b", "c"}
    path = tmp_path / "sens.json"
    sens.save(path)
    c = compiled(net, format="auto", budget={"weight_bits": 6}, sensitivity=str(path))
    x = correlated(2, 40)
    want = c(x)
    chosen = sq.allocate(sens, weight_bits=6).formats
    assert {k: v for k, v in chosen.items() if v != "float"} == formats_of(c)
    totals = sq.report(c).totals()
    assert totals["average_weight_bits"] <= 6.0 or "float" in chosen.values()
    sq.save(c, tmp_path / "q")
    path.unlink()   # the saved options hold the allocated formats
    loaded = compiled(net, load=str(tmp_path / "q"))
    assert torch.equal(loaded(x), want)
    assert formats_of(loaded) == {k: v for k, v in chosen.items() if v != "float"}


@pytest.mark.parametrize("fmt", ["w4a8", "int8-weight-only", "int4-weight-only"])
def test_cpu_lowering_matches_the_gemm_op_the_gpu_runs(net, fmt):
    """The CPU form (dequantized grids, one fp32 GEMM) against the op path (segquant::gemm_w4 /
    gemm_weight_only, whose CUDA kernels tests/test_formats_kernels.py checks): same grid."""
    from segquant_compile.lowering.linear import quantized_linear
    c = compiled(net, format=fmt, group_size=64)
    c(correlated(2, 50))
    st_c = {st.name: st for st in find(c).quant_states}["c"]
    lo = st_c.lowering
    assert lo.cpu_gemm == "fp32"
    x = F.gelu(correlated(3, 51)[..., :256])
    args = (st_c.d_pos, st_c.d_neg, st_c.zp, st_c.smooth, st_c.colsum, lo.k_bounds, lo.codes)
    by_op = quantized_linear(x, st_c.packed, st_c.d_w, net.c.bias, *args, fmt=fmt, g_bounds=lo.g_bounds)
    by_cpu = quantized_linear(x, st_c.dequantized, None, net.c.bias, *args, fmt=fmt, cpu_gemm="fp32",
                              g_bounds=lo.g_bounds)
    torch.testing.assert_close(by_cpu, by_op, rtol=1e-5, atol=1e-5)
    assert Q.sqnr_db(x @ net.c.weight.t() + net.c.bias, by_op) > 15


def test_latency_budget_from_the_measured_gemm_times(net, tmp_path):
    sens = sq.sensitivity(net, [(correlated(2, 60),)], formats=("int8", "w4a8", "int8-weight-only"), progress=False)
    for s in sens.sites:   # every measured format and float timed on this machine
        assert set(s.seconds) == {*s.error, "float"} and all(t > 0 for t in s.seconds.values())
    all_float = sum(s.seconds["float"] for s in sens.sites)
    cheapest = sum(min(s.seconds.values()) for s in sens.sites)
    for fraction in (cheapest / all_float * 1.01, 1.0, 3.0):
        plan = sq.allocate(sens, latency=fraction)
        assert plan.seconds <= fraction * all_float * (1 + 1e-9)
        assert plan.seconds == pytest.approx(sum(s.seconds[plan.formats[s.name]] for s in sens.sites))
    with pytest.raises(ValueError, match="infeasible"):
        sq.allocate(sens, latency=cheapest / all_float * 0.5)
    with pytest.raises(ValueError, match="one budget"):
        sq.allocate(sens, weight_bits=6, latency=1.0)
    only = sens.only(["int8"])
    assert only.formats == ("int8",) and all(set(s.error) <= {"int8"} for s in only.sites)
    path = tmp_path / "s.json"
    sens.save(path)
    c = compiled(net, format="auto", budget={"latency": 3.0}, sensitivity=str(path))
    c(correlated(2, 61))
    assert formats_of(c) == {k: v for k, v in sq.allocate(sens, latency=3.0).formats.items() if v != "float"}
