"""Properties of the quantizers."""
import itertools

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from segquant_compile.lowering import quantize as Q

FAST = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def activations(draw):
    m = draw(st.integers(1, 6))
    widths = draw(st.lists(st.integers(1, 24), min_size=1, max_size=3))
    seed = draw(st.integers(0, 2 ** 16))
    g = torch.Generator().manual_seed(seed)
    scales = torch.tensor([draw(st.floats(1e-2, 1e3)) for _ in widths])
    x = torch.cat([torch.randn(m, w, generator=g) * s for w, s in zip(widths, scales)], dim=1)
    bounds = [0, *itertools.accumulate(widths)]
    return x, bounds


@FAST
@given(activations(), st.booleans())
def test_round_trip_within_half_a_step(xb, dual_on):
    x, bounds = xb
    dual = [int(dual_on)] * (len(bounds) - 1)
    q, d, dn, _ = Q.quantize_dynamic(x, bounds, dual)
    back = Q.dequantize(q, bounds, dual, d, dn)
    for i, (a, b) in enumerate(zip(bounds[:-1], bounds[1:])):
        err = (back[:, a:b] - x[:, a:b]).abs()
        xs = x[:, a:b]
        step = torch.where(xs >= 0, d[:, i:i + 1], dn[:, i:i + 1]) if dual_on else d[:, i:i + 1].expand_as(xs)
        assert bool((err <= step * 0.5 * (1 + 1e-5) + 1e-12).all())


@st.composite
def narrow_negative(draw):
    """Post-SiLU activations whose positive side dominates, as after a real SiLU/GELU."""
    m = draw(st.integers(1, 4))
    widths = draw(st.lists(st.integers(16, 48), min_size=1, max_size=3))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2 ** 16)))
    scale = draw(st.floats(2.0, 50.0))
    x = torch.nn.functional.silu(torch.randn(m, sum(widths), generator=g) * scale)
    bounds = [0, *itertools.accumulate(widths)]
    for a, b in zip(bounds[:-1], bounds[1:]):
        seg = x[:, a:b]
        assume(bool((seg.amax(1) >= 4 * (-seg).amax(1)).all()) and bool(((seg < 0).sum(1) >= 2).all()))
    return x, bounds


@FAST
@given(narrow_negative())
def test_dualscale_never_worse_on_narrow_negative_range(xb):
    x, bounds = xb
    s = len(bounds) - 1
    q1, d1, n1, _ = Q.quantize_dynamic(x, bounds, [0] * s)
    q2, d2, n2, _ = Q.quantize_dynamic(x, bounds, [1] * s)
    e1 = (Q.dequantize(q1, bounds, [0] * s, d1, n1) - x).pow(2).sum()
    e2 = (Q.dequantize(q2, bounds, [1] * s, d2, n2) - x).pow(2).sum()
    assert e2 <= e1 * (1 + 1e-6) + 1e-12


@FAST
@given(activations())
def test_segment_scales_never_mix(xb):
    """Changing one segment's values leaves every other segment's steps and codes unchanged."""
    x, bounds = xb
    s = len(bounds) - 1
    q, d, dn, _ = Q.quantize_dynamic(x, bounds, [0] * s)
    y = x.clone()
    y[:, bounds[0]:bounds[1]] *= 1000
    q2, d2, _, _ = Q.quantize_dynamic(y, bounds, [0] * s)
    assert torch.equal(q[:, bounds[1]:], q2[:, bounds[1]:])
    assert torch.equal(d[:, 1:], d2[:, 1:])


@FAST
@given(st.integers(1, 20), st.integers(1, 20), st.integers(0, 2 ** 16), st.booleans())
def test_weight_round_trip(n, k, seed, per_segment):
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(seed))
    bounds = (0, n // 2, n) if per_segment and n > 1 else None
    steps = Q.weight_steps(w, bounds)
    packed = Q.quantize_weight(w, steps)
    assert packed.shape == (k, n) and packed.dtype == torch.int8
    back = packed.t().float() * steps[:, None]
    assert bool(((back - w).abs() <= steps[:, None] / 2 * (1 + 1e-5)).all())
    if bounds:
        assert len(set(steps[:n // 2].tolist())) == 1 and len(set(steps[n // 2:].tolist())) == 1


def test_static_steps():
    d, dn, _ = Q.static_steps(torch.tensor([1.27, 1.27]), torch.tensor([0.256, 0.0]), [1, 0])
    torch.testing.assert_close(d, torch.tensor([[0.01, 0.01]]))
    torch.testing.assert_close(dn, torch.tensor([[0.002, 0.01]]))


def test_static_steps_never_vanish():
    """A DualScale segment seen one-signed takes the other side's step; a zero range is refused."""
    d, dn, _ = Q.static_steps(torch.tensor([1.27, 0.0]), torch.tensor([0.0, 2.56]), [1, 1])
    torch.testing.assert_close(d, torch.tensor([[0.01, 0.02]]))
    torch.testing.assert_close(dn, torch.tensor([[0.01, 0.02]]))
    assert bool((d > 1e-6).all() and (dn > 1e-6).all())
    with pytest.raises(ValueError, match="zero calibrated range"):
        Q.static_steps(torch.tensor([0.0]), torch.tensor([0.0]), [0])


@FAST
@given(activations(), st.booleans())
def test_fp8_round_trip_within_half_an_ulp(xb, dual_on):
    x, bounds = xb
    dual = [int(dual_on)] * (len(bounds) - 1)
    q, d, dn, _ = Q.quantize_dynamic(x, bounds, dual, "fp8")
    assert q.dtype == Q.FP8
    back = Q.dequantize(q, bounds, dual, d, dn)
    # e4m3 keeps 3 mantissa bits: relative error <= 2**-4 for normal values; subnormals
    # (below 2**-6 steps) are off by at most half their spacing, 2**-10 steps
    for i, (a, b) in enumerate(zip(bounds[:-1], bounds[1:])):
        xs = x[:, a:b]
        step = torch.where(xs >= 0, d[:, i:i + 1], dn[:, i:i + 1]) if dual_on else d[:, i:i + 1].expand_as(xs)
        err = (back[:, a:b] - xs).abs()
        assert bool((err <= xs.abs() * 2 ** -4 + step * 2 ** -10 + 1e-12).all())


@FAST
@given(activations(), st.floats(-5.0, 5.0))
def test_asymmetric_round_trip_within_half_a_step(xb, shift):
    """x ~= (q - z) * d with 0 inside the range: error at most half a step, zeros exact."""
    x, bounds = xb
    x = x + shift * x.abs().amax()
    x[:, 0] = 0.0
    codes = [Q.ASYMMETRIC] * (len(bounds) - 1)
    q, d, dn, zp = Q.quantize_dynamic(x, bounds, codes)
    assert bool((zp == zp.round()).all() and (zp >= -128).all() and (zp <= 127).all())
    back = Q.dequantize(q, bounds, codes, d, dn, zp)
    for i, (a, b) in enumerate(zip(bounds[:-1], bounds[1:])):
        assert bool(((back[:, a:b] - x[:, a:b]).abs() <= d[:, i:i + 1] * 0.5 * (1 + 1e-4) + 1e-12).all())
    assert bool((back[:, 0] == 0).all())


def test_asymmetric_beats_symmetric_on_one_sided_rows():
    g = torch.Generator().manual_seed(0)
    x = torch.relu(torch.randn(64, 256, generator=g)) + 0.05          # one-signed, like post-ReLU
    errs = {}
    for code in (Q.SYMMETRIC, Q.ASYMMETRIC):
        q, d, dn, zp = Q.quantize_dynamic(x, [0, 256], [code])
        errs[code] = (Q.dequantize(q, [0, 256], [code], d, dn, zp) - x).pow(2).mean()
    assert errs[Q.ASYMMETRIC] < 0.4 * errs[Q.SYMMETRIC]


def test_static_asymmetric_steps_and_degenerate_ranges():
    d, dn, zp = Q.static_steps(torch.tensor([2.55, 1.0, 0.0]), torch.tensor([0.0, 0.0, 2.55]), [2, 2, 2])
    torch.testing.assert_close(d, torch.tensor([[0.01, 1 / 255, 0.01]]))
    assert zp.tolist() == [[-128.0, -128.0, 127.0]]        # one-signed: the whole code range on one side
    assert bool((d > 1e-6).all())


def test_scheme_choice_rule():
    from segquant_compile.lowering.scheme_choice import DUALSCALE_MARGIN_DB, choose
    assert choose([{"symmetric": 40.0, "asymmetric": 42.0, "dualscale": 42.5}]) == ("asymmetric",)
    assert choose([{"symmetric": 40.0, "asymmetric": 41.0, "dualscale": 41.0 + DUALSCALE_MARGIN_DB}]) == ("dualscale",)
    assert choose([{"symmetric": 40.0, "asymmetric": 40.0, "dualscale": 39.0}]) == ("symmetric",)   # tie: cheaper
    inf = float("inf")
    assert choose([{"symmetric": inf, "asymmetric": inf, "dualscale": inf}]) == ("symmetric",)       # all zeros


def test_mse_clipped_weight_steps_never_worse_than_absmax():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(32, 4096, generator=g)               # long Gaussian rows: clipping the tail pays
    err = {}
    for clip in ("absmax", "mse"):
        d = Q.weight_steps(w, clip=clip)
        back = Q.quantize_weight(w, d).t().float() * d[:, None]
        err[clip] = (back - w).pow(2).sum(dim=1)
    assert bool((err["mse"] <= err["absmax"] * (1 + 1e-6)).all()) and err["mse"].sum() < err["absmax"].sum()
