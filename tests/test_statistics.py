"""The calibration state split by job (issue 26): SiteStatistics accumulate and merge into what one
observer of every call holds; SiteParams is a frozen record; a site's life is one Phase."""
import dataclasses

import pytest
import torch
from torch import nn

import segquant_compile as sq
from conftest import Two
from segquant_compile.compiled import find
from segquant_compile.lowering.site_lowering import ConvGeometry
from segquant_compile.lifecycle import Decision
from segquant_compile.lifecycle import Phase
from segquant_compile.statistics import SiteStatistics, StatisticsSpec


def _calls(n, rows, k, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(rows, k, generator=g) * (1 + i) for i in range(n)]


@pytest.mark.parametrize("spec", [StatisticsSpec((0, 16, 48), 64, True), StatisticsSpec((0, 48), 512, False)],
                         ids=["few-rows-kept-hessian", "all-rows-kept"])
def test_two_halves_merge_into_the_statistics_of_all_calls(spec):
    """Calls 0..5 observed by one object, and calls 0, 2, 4 / 1, 3, 5 by two (numbered globally),
    merged: the same ranges per call parity, the same kept rows and their calls (bottom-k sampling
    depends on no order), the same counts; Hessians equal up to summation order."""
    calls = _calls(6, 40, 48)
    whole, even, odd = SiteStatistics(spec), SiteStatistics(spec), SiteStatistics(spec)
    for i, x in enumerate(calls):
        whole.observe(x, call=i)
        (even if i % 2 == 0 else odd).observe(x, call=i)
    odd.merge(even)   # merged in the other order than observed
    for parity in (0, 1):
        assert all(torch.equal(a, b) for a, b in zip(whole.parity_max[parity], odd.parity_max[parity]))
    key = lambda s: sorted(zip(s.row_calls.tolist(), map(tuple, s.rows.tolist())))   # noqa: E731
    assert key(whole) == key(odd) and len(whole.rows) == min(spec.rows_kept, 6 * 40)
    assert (whole.rows_seen, whole.calls) == (odd.rows_seen, odd.calls) == (240, 6)
    if spec.sum_hessian:
        for a, b in zip(whole.hessians, odd.hessians):
            torch.testing.assert_close(a.full(), b.full(), rtol=1e-5, atol=1e-3)
    else:
        assert whole.hessians is None and odd.hessians is None
    held_w, held_m = whole.held_out(), odd.held_out()
    assert all(torch.equal(a, b) for a, b in zip(held_w[:2], held_m[:2]))
    assert sorted(map(tuple, held_w[2].tolist())) == sorted(map(tuple, held_m[2].tolist()))


def test_merge_refuses_another_sites_statistics():
    a, b = SiteStatistics(StatisticsSpec((0, 8), 16, False)), SiteStatistics(StatisticsSpec((0, 4, 8), 16, False))
    b.observe(torch.randn(4, 8))
    with pytest.raises(ValueError, match="different sites"):
        a.merge(b)


def test_kept_rows_are_a_sample_of_every_call_and_do_not_depend_on_call_order():
    spec = StatisticsSpec((0, 4), 32, False)
    calls = [torch.full((16, 4), float(i)) for i in range(20)]
    forward, backward = SiteStatistics(spec), SiteStatistics(spec)
    for i, x in enumerate(calls):
        forward.observe(x, call=i)
    for i in reversed(range(20)):
        backward.observe(calls[i], call=i)
    assert sorted(forward.rows[:, 0].tolist()) == sorted(backward.rows[:, 0].tolist())
    assert torch.equal(forward.rows[:, 0], forward.row_calls.float())
    assert len(set(forward.row_calls.tolist())) > 10   # rows of many calls, not the first ones only


def test_a_conv_sites_rows_are_im2col_rows_of_sampled_pixels():
    geometry = ConvGeometry(3, (3, 3), (1, 1), (1, 1))
    stats = SiteStatistics(StatisticsSpec((0, 27), 512, False, geometry))
    x = torch.randn(2, 3, 5, 5)
    stats.observe(x, call=0)
    full = torch.nn.functional.unfold(x, (3, 3), padding=1).transpose(1, 2).reshape(-1, 27)
    assert stats.rows.shape == (50, 27) and sorted(map(tuple, stats.rows.tolist())) == sorted(map(tuple, full.tolist()))
    assert torch.equal(stats.ranges()[0], x.amax(dim=(0, 2, 3)).clamp(min=0).repeat_interleave(9))


def test_non_finite_rows_are_refused_or_skipped():
    stats = SiteStatistics(StatisticsSpec((0, 4), 16, False))
    x = torch.randn(6, 4)
    x[2, 1] = float("nan")
    with pytest.raises(FloatingPointError):
        stats.observe(x)
    assert stats.empty
    assert stats.observe(x, finite_only=True) and stats.rows_seen == 5
    assert not stats.observe(torch.full((3, 4), float("inf")), finite_only=True) and stats.calls == 1


def test_a_static_site_waits_for_calibration_then_is_ready():
    model = Two().eval()
    c = torch.compile(model, backend="segquant", options={"activations": "static", "inductor": False})
    with pytest.raises(RuntimeError, match="need calibration"):
        c(torch.randn(4, 8))
    states = find(c).quant_states
    assert states and all(st.phase is Phase.AWAITING_CALIBRATION for st in states)
    assert all({Decision.STEPS, Decision.ROUNDING} <= st.pending for st in states)
    with sq.calibrate(c, progress=False):
        c(torch.randn(16, 8))
    assert all(st.phase is Phase.READY and not st.pending and st.params.d_pos is not None for st in states)
    with pytest.raises(dataclasses.FrozenInstanceError):
        states[0].params.d_pos = None   # the record is never edited: a new one replaces it
    for st in states:
        st.reset_calibration()
    assert all(st.phase is Phase.AWAITING_CALIBRATION and st.params.d_pos is None for st in states)


def test_a_dynamic_sites_first_call_decides_then_it_is_ready():
    torch.manual_seed(0)
    model = nn.Linear(64, 32).eval().requires_grad_(False)
    c = torch.compile(model, backend="segquant", options={"inductor": False})
    c(torch.randn(512, 64))
    st, = find(c).quant_states
    assert st.phase is Phase.READY and st.params.chosen is not None and st.rows_source == "the first call"


def test_find_changes_nothing():
    """find() reads: a state keeps its name, phase and record whoever looks."""
    model = Two().eval()
    c = torch.compile(model, backend="segquant", options={"inductor": False})
    c(torch.randn(4, 8))
    before = [(st.name, st.params, st.pending) for st in find(c).quant_states]
    found = find(c)
    assert [(st.name, st.params, st.pending) for st in found.quant_states] == before
    assert [found.name_of(st) for st in found.quant_states] == [n for n, _, _ in before]


class _Qkv(nn.Module):
    def __init__(self):
        super().__init__()
        self.q, self.k, self.v = (nn.Linear(64, 64) for _ in range(3))
        self.out = nn.Linear(64, 64)

    def forward(self, x):
        return self.out(self.q(x) * torch.sigmoid(self.k(x)) + self.v(x))


def _calibrated_qkv(monkeypatch, share: bool):
    from segquant_compile.state import QuantState
    if not share:
        monkeypatch.setattr(QuantState, "share_statistics", lambda self, other: False)
    torch.manual_seed(0)
    model = _Qkv().eval()
    c = torch.compile(model, backend="segquant", options={"activations": "static", "inductor": False})
    g = torch.Generator().manual_seed(1)
    seen = {}
    with sq.calibrate(c, progress=False):
        for _ in range(3):
            c(torch.randn(32, 64, generator=g))
        states = {st.name: st for st in find(c).quant_states}
        seen = {n: (id(st.stats), st.stats.hessians) for n, st in states.items()}
    monkeypatch.undo()
    return states, seen


def test_sites_reading_one_activation_share_one_set_of_statistics(monkeypatch):
    """q, k and v read the same tensor: one row sample and one Hessian sum for the three (the
    statistics of each would be identical), and the same parameters as with a set each."""
    states, seen = _calibrated_qkv(monkeypatch, share=True)
    assert seen["q"][0] == seen["k"][0] == seen["v"][0] != seen["out"][0]
    assert seen["q"][1] is not None   # GPTQ's Hessian, summed once for the three
    alone, seen_alone = _calibrated_qkv(monkeypatch, share=False)
    assert len({i for i, _ in seen_alone.values()}) == 4
    for name, st in states.items():
        for field in ("packed", "d_w", "d_pos", "d_neg", "smooth"):
            a, b = getattr(st.params, field), getattr(alone[name].params, field)
            assert (a is None and b is None) or torch.equal(a, b), (name, field)
        assert st.stats.hessians is None   # freed once every sharing site froze


def test_statistics_stay_on_the_device_within_the_budget_and_release_it():
    """Placement is decided on the first call: on the activations' device while the process's
    statistics there fit `calibration_device_bytes`, else on the CPU; the reservation
    ends with the statistics (a frozen site discards them). (Bookkeeping only: no tensor is
    made on the device here; tests/test_gpu.py checks a real calibration on CUDA.)"""
    import gc
    from segquant_compile.statistics import CPU, DEVICE_BUDGET
    device = torch.device("cuda", 7)   # a device no test touches
    spec = StatisticsSpec((0, 64, 128), 32, True, device_bytes=3 * (4 * 2 * 64 * 64 + 4 * 32 * 128) // 2)
    whole = spec.hessian_bytes + spec.row_bytes()
    assert (spec.hessian_bytes, spec.row_bytes()) == (4 * 2 * 64 * 64, 4 * 32 * 128)
    base = DEVICE_BUDGET.used(device)
    a, b = SiteStatistics(spec), SiteStatistics(spec)
    a._place(device, torch.float32)
    b._place(device, torch.float32)   # a second whole does not fit 1.5 wholes
    assert (a.home, b.home) == (device, CPU)
    assert DEVICE_BUDGET.used(device) == base + whole
    del a
    gc.collect()
    assert DEVICE_BUDGET.used(device) == base
    c = SiteStatistics(dataclasses.replace(spec, device_bytes=0))
    c._place(device, torch.float32)
    assert c.home == CPU and DEVICE_BUDGET.used(device) == base
    d = SiteStatistics(spec)
    d._place(CPU, torch.float32)
    assert d.home == CPU and DEVICE_BUDGET.used(device) == base


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_a_holders_rows_travel_as_one_byte_buffer_bit_for_bit(dtype):
    """What a rank sends of its rows (statistics.RowParcel): exact rows in the kept dtype and coded
    rows, packed into one uint8 buffer of the size every rank computes from the specs, unpacked bit
    for bit (an odd count of 16-bit values before the codes' fp32 steps must not misalign them)."""
    from segquant_compile.distributed import pack, unpack
    from segquant_compile.statistics import CodedRows, RowParcel
    g = torch.Generator().manual_seed(0)
    exact, coded = torch.randn(3, 131, generator=g).to(dtype), CodedRows.encode(torch.randn(5, 131, generator=g))
    specs = RowParcel.specs(3, 5, 131, dtype)
    buffer = pack(RowParcel(exact, coded).tensors())
    assert buffer.dtype == torch.uint8 and len(buffer) == sum(s.nbytes for s in specs) >= 3 * 131 * dtype.itemsize
    back = RowParcel.of_tensors(unpack(buffer.clone(), specs), 131)
    assert torch.equal(back.exact, exact) and torch.equal(back.coded.q, coded.q)
    assert torch.equal(back.coded.steps, coded.steps)
    empty = RowParcel.empty(131, dtype, "cpu")
    none = RowParcel.of_tensors(unpack(pack(empty.tensors()), RowParcel.specs(0, 0, 131, dtype)), 131)
    assert none.exact.shape == (0, 131) and len(none.coded) == 0


def test_a_record_travels_as_a_skeleton_and_bytes_with_its_strides():
    """A frozen record between ranks (distributed.record_skeleton): its non-tensor fields in the
    skeleton, its tensors as one byte buffer; rebuilt equal, strides included (a packed weight's
    layout is kept)."""
    from segquant_compile import distributed
    from segquant_compile.site_params import SiteParams
    g = torch.Generator().manual_seed(0)
    packed = torch.randint(-127, 128, (24, 40), generator=g, dtype=torch.int8).t()   # a transposed layout
    record = SiteParams(packed, torch.rand(1, 24, generator=g), None, alpha=0.5, chosen=("dual",),
                        d_pos=torch.rand(1, 3, generator=g, dtype=torch.float64), sqnr=31.5)
    skeleton, tensors = distributed.record_skeleton(record)
    assert not any(isinstance(v, torch.Tensor) for v in vars(skeleton).values())
    back = distributed.fill_record(skeleton, distributed.unpack(distributed.pack(tensors),
                                                                distributed.record_specs(skeleton)))
    assert back.packed.stride() == packed.stride() and torch.equal(back.packed, packed)
    assert torch.equal(back.d_w, record.d_w) and torch.equal(back.d_pos, record.d_pos)
    assert (back.alpha, back.chosen, back.sqnr, back.colsum, back.zp) == (0.5, ("dual",), 31.5, None, None)


def test_a_frozen_calibration_holds_no_statistics():
    """After the freeze no rows or Hessians stay held (FLUX.1-dev's kept rows alone are GBs)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 64)).eval().requires_grad_(False)
    c = torch.compile(model, backend="segquant", options={"inductor": False, "activations": "static",
                                                          "weight_rounding": "gptq"})
    with sq.calibrate(c, progress=False):
        for s in range(2):
            c(torch.randn(16, 64))
        assert all(st.stats.rows is not None for st in find(c).quant_states)
    for st in find(c).quant_states:
        assert st.stats.rows is None and st.stats.hessians is None and st.stats.empty


def test_hessian_panels_hold_the_upper_triangle_and_give_back_the_sum():
    from segquant_compile.statistics import PANEL_ROWS, HessianPanels
    k = PANEL_ROWS * 2 + 37                     # a last panel shorter than the others
    x, y = torch.randn(50, k), torch.randn(30, k)
    panels = HessianPanels.of_rows(x, "cpu")
    panels.add_rows_(y)
    xtx = x.t() @ x
    for a, made in zip(range(0, k, PANEL_ROWS), HessianPanels.of_rows(x, "cpu").panels):   # only the upper panels
        assert made.shape == xtx[a:a + PANEL_ROWS, a:].shape and torch.allclose(made, xtx[a:a + PANEL_ROWS, a:],
                                                                                 rtol=1e-5, atol=1e-4)
    full = torch.cat([x, y]).double()
    full = full.t() @ full
    assert torch.allclose(panels.full().double(), full, rtol=1e-5, atol=1e-3)
    assert torch.equal(panels.full(), panels.full().t())
    assert panels.nbytes == 4 * HessianPanels.numel(k) <= 4 * (k * k + k * PANEL_ROWS) // 2
    assert HessianPanels.numel(3072) < 0.55 * 3072 ** 2      # FLUX.1-dev's width


def test_kept_rows_do_not_alias_the_observed_activation():
    """The graph may reuse an activation's buffer once the observer returns: the first call's
    rows (fewer than rows_kept, fp32, so no selection and no cast copies them) are copied."""
    stats = SiteStatistics(StatisticsSpec((0, 8), 64, False))
    x = torch.randn(5, 8)
    stats.observe(x, call=0)
    before = stats.rows.clone()
    x.fill_(7.0)
    assert torch.equal(stats.rows, before)


def test_coded_rows_decode_within_half_a_step_per_group():
    from segquant_compile.statistics import CODE_GROUP, CodedRows
    x = torch.randn(6, 200) * torch.logspace(-3, 3, 200)   # K not whole groups; loud and quiet columns
    x[2] = 0.0
    c = CodedRows.encode(x)
    assert c.q.dtype == torch.int8 and c.q.shape == (6, 2 * CODE_GROUP) and c.steps.shape == (6, 2)
    assert c.nbytes == 6 * CodedRows.row_bytes(200) == 6 * 2 * (CODE_GROUP + 4)
    steps = c.steps.repeat_interleave(CODE_GROUP, dim=1)[:, :200]
    assert ((c.decode() - x).abs() <= steps / 2 * (1 + 1e-6)).all()
    assert torch.equal(c.decode()[2], torch.zeros(200))
    torch.testing.assert_close(c.decode().abs().amax(dim=1), x.abs().amax(dim=1), rtol=1e-6, atol=0)   # the largest value of each row: exact up to rounding


def _all_rows_by_priority(calls):
    rows, priority = [], []
    for i, x in enumerate(calls):
        rows.append(x)
        priority.append(torch.rand(len(x), generator=torch.Generator().manual_seed(i), dtype=torch.float64))
    order = torch.sort(torch.cat(priority)).indices
    return torch.cat(rows)[order]


def test_gptq_rows_beyond_the_sample_are_coded_and_halves_still_merge_bit_for_bit():
    """A wide GPTQ site keeps GPTQ_ROWS rows: the SAMPLE_ROWS of smallest priority exact (what the
    searches read), the rest int8-coded (GPTQ's Hessian only). Kept rows are the bottom-k of every
    row observed; two halves merged hold the same exact rows, the same codes and the same calls as
    one observer of all the calls, in the same (priority) order."""
    from segquant_compile.statistics import GPTQ_ROWS, HESSIAN_MAX_K, SAMPLE_ROWS, CodedRows
    from segquant_compile.lowering.gptq import segment_hessians
    wide = StatisticsSpec.for_site((0, HESSIAN_MAX_K + 8), True, None)
    assert (wide.rows_kept, wide.rows_coded, wide.sum_hessian) == (GPTQ_ROWS, GPTQ_ROWS - SAMPLE_ROWS, False)
    assert StatisticsSpec.for_site((0, HESSIAN_MAX_K), True, None).rows_coded == 0
    assert StatisticsSpec.for_site((0, HESSIAN_MAX_K + 8), False, None).rows_coded == 0
    spec = StatisticsSpec((0, 72, 200), 64, False, rows_coded=48)
    assert spec.row_bytes(2) == 2 * 16 * 200 + 48 * CodedRows.row_bytes(200)
    calls = _calls(6, 40, 200)
    whole, even, odd = SiteStatistics(spec), SiteStatistics(spec), SiteStatistics(spec)
    for i, x in enumerate(calls):
        whole.observe(x, call=i)
        (even if i % 2 == 0 else odd).observe(x, call=i)
    assert even.coded is not None and odd.coded is not None   # each half coded rows of its own
    odd.merge(even)
    expected = _all_rows_by_priority(calls)[:64]
    for s in (whole, odd):
        assert torch.equal(s.rows, expected[:16]) and s.rows_held == 64 and len(s.coded) == 48
        assert torch.equal(s.coded.q, CodedRows.encode(expected[16:]).q)
        assert torch.equal(s.gptq_rows()[16:], CodedRows.encode(expected[16:]).decode())
        held = s.held_out()[2]
        assert torch.equal(held, expected[:16][s.row_calls[:16] % 2 == 1])
    assert torch.equal(whole.row_calls, odd.row_calls) and torch.equal(whole.coded.steps, odd.coded.steps)
    h = whole.gptq_hessians("cpu")
    assert len(h) == 2 and all(torch.equal(a, b) for a, b in zip(h, segment_hessians(whole.gptq_rows(), spec.k_bounds)))
    rel = (whole.gptq_rows() - expected).norm() / expected.norm()
    assert 0 < rel < 1e-2
