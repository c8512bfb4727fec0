"""The CPU GEMM op against a float64 reference of the same quantized math."""
import itertools

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from segquant_compile.lowering.ops import gemm, int_accumulators


def reference64(q, d_pos, d_neg, w, d_w, bias, k_bounds, dual):
    y = torch.zeros(q.shape[0], w.shape[1], dtype=torch.float64)
    for s, (a, b) in enumerate(zip(k_bounds[:-1], k_bounds[1:])):
        qs, ws = q[:, a:b].double(), w[a:b].double()
        if dual[s]:
            y += (qs.clamp(min=0) @ ws) * d_pos[:, s:s + 1].double() + (qs.clamp(max=0) @ ws) * d_neg[:, s:s + 1].double()
        else:
            y += (qs @ ws) * d_pos[:, s:s + 1].double()
    y = y * d_w.double()
    return y + bias.double() if bias is not None else y


@st.composite
def problems(draw):
    m = draw(st.sampled_from([1, 2, 3, 17, 33]))
    n = draw(st.integers(1, 40))
    widths = draw(st.lists(st.integers(1, 37), min_size=1, max_size=4))
    dual = draw(st.lists(st.integers(0, 1), min_size=len(widths), max_size=len(widths)))
    per_token = draw(st.booleans())
    has_bias = draw(st.booleans())
    seed = draw(st.integers(0, 2 ** 16))
    return m, n, widths, dual, per_token, has_bias, seed


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(problems())
def test_gemm_matches_float64_reference(p):
    m, n, widths, dual, per_token, has_bias, seed = p
    g = torch.Generator().manual_seed(seed)
    k = sum(widths)
    bounds = [0, *itertools.accumulate(widths)]
    q = torch.randint(-128, 128, (m, k), generator=g, dtype=torch.int8)
    w = torch.randint(-127, 128, (k, n), generator=g, dtype=torch.int8)
    rows = m if per_token else 1
    d_pos = torch.rand(rows, len(widths), generator=g) * 0.1 + 1e-3
    d_neg = torch.rand(rows, len(widths), generator=g) * 0.1 + 1e-3
    d_w = torch.rand(n, generator=g) * 0.01 + 1e-4
    bias = torch.randn(n, generator=g) if has_bias else None
    y = gemm(q, d_pos, d_neg, w, d_w, bias, bounds, dual, torch.float32)
    ref = reference64(q, d_pos, d_neg, w, d_w, bias, bounds, dual)
    assert y.shape == (m, n) and y.dtype == torch.float32
    # fp32 epilogue over exact int32 partial sums: error is a few fp32 ulps of the magnitude
    scale = ref.abs().max().clamp(min=1e-6)
    assert ((y.double() - ref).abs().max() / scale) < 1e-5
    # and the integer partial sums themselves are exact
    for s, parts in enumerate(int_accumulators(q, w, bounds, dual)):
        a, b = bounds[s], bounds[s + 1]
        if dual[s]:
            assert torch.equal(parts[0], torch._int_mm(q[:, a:b].clamp(min=0).contiguous(), w[a:b].contiguous()).long())
        else:
            assert torch.equal(parts[0], q[:, a:b].long() @ w[a:b].long())


def test_output_dtypes_and_fake():
    q = torch.randint(-128, 128, (5, 16), dtype=torch.int8)
    w = torch.randint(-127, 128, (16, 8), dtype=torch.int8)
    d = torch.full((5, 1), 0.01)
    for dt in (torch.float32, torch.bfloat16, torch.float16):
        assert gemm(q, d, d, w, torch.ones(8), None, [0, 16], [0], dt).dtype == dt
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode() as mode:
        fq = mode.from_tensor(q)
        fw = mode.from_tensor(w)
        out = gemm(fq, mode.from_tensor(d), mode.from_tensor(d), fw, mode.from_tensor(torch.ones(8)), None,
                   [0, 16], [0], torch.bfloat16)
        assert out.shape == (5, 8) and out.dtype == torch.bfloat16


def test_opcheck():
    q = torch.randint(-128, 128, (4, 12), dtype=torch.int8)
    w = torch.randint(-127, 128, (12, 6), dtype=torch.int8)
    d = torch.full((4, 2), 0.01)
    torch.library.opcheck(torch.ops.segquant.gemm.default,
                          (q, d, d, w, torch.ones(6), torch.zeros(6), [0, 5, 12], [1, 0], torch.float32))


def test_fp32_chunked_int8_gemm_is_exact():
    """The CPU fallback for machines without int8 dot instructions: exact at the extremes."""
    from segquant_compile.lowering.ops import EXACT_FP32_K, _int_mm_fp32
    for m, k, n in [(3, 1, 4), (5, EXACT_FP32_K, 7), (2, 3 * EXACT_FP32_K + 5, 9)]:
        worst = _int_mm_fp32(torch.full((m, k), -128, dtype=torch.int8), torch.full((k, n), -127, dtype=torch.int8))
        assert worst.dtype == torch.int32 and bool((worst == 128 * 127 * k).all())
        g = torch.Generator().manual_seed(k)
        a = torch.randint(-128, 128, (m, k), generator=g, dtype=torch.int8)
        b = torch.randint(-127, 128, (k, n), generator=g, dtype=torch.int8)
        assert torch.equal(_int_mm_fp32(a, b).long(), a.long() @ b.long())
