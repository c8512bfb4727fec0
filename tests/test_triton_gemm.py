"""The Triton GEMM kernels against the CPU reference op (TRITON_INTERPRET=1 on CPU machines;
on a GPU the same tests run on the device with `pytest -m gpu`)."""
import itertools

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from segquant_compile.lowering.ops import gemm_reference
from segquant_compile.lowering.quantize import k_major, quantize_static

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SETTINGS = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def launch(*args, **kw):
    from segquant_compile.lowering.triton_gemm import launch as run
    return run(*args, **kw)


@st.composite
def problems(draw, max_k=90):
    m = draw(st.sampled_from([1, 2, 5, 17, 33]))
    n = draw(st.integers(1, 48))
    widths = draw(st.lists(st.integers(1, 40), min_size=1, max_size=4).filter(lambda w: sum(w) <= max_k))
    dual = draw(st.lists(st.integers(0, 1), min_size=len(widths), max_size=len(widths)))
    per_token = draw(st.booleans())
    bias = draw(st.booleans())
    out = draw(st.sampled_from([torch.float32, torch.bfloat16, torch.float16]))
    seed = draw(st.integers(0, 2 ** 16))
    bounds = [0, *itertools.accumulate(widths)]
    return m, n, bounds, dual, per_token, bias, out, seed


def operands(p, fp8=False, layout="k-major"):
    """The GEMM's operands; the weight K-major as sites pack it for CUDA (quantize.packed_layout),
    or "n-major", contiguous [K, N] as on CPU."""
    m, n, bounds, dual, per_token, has_bias, out, seed = p
    g = torch.Generator().manual_seed(seed)
    k, s = bounds[-1], len(bounds) - 1
    if fp8:
        q = (torch.randn(m, k, generator=g) * 8).to(torch.float8_e4m3fn)
        w = (torch.randn(k, n, generator=g) * 8).to(torch.float8_e4m3fn)
    else:
        q = torch.randint(-128, 128, (m, k), generator=g, dtype=torch.int8)
        w = torch.randint(-127, 128, (k, n), generator=g, dtype=torch.int8)
    w = k_major(w) if layout == "k-major" else w
    rows = m if per_token else 1
    d_pos = torch.rand(rows, s, generator=g) * 0.05 + 1e-3
    d_neg = torch.where(torch.tensor(dual, dtype=torch.bool), torch.rand(rows, s, generator=g) * 0.05 + 1e-3, d_pos)
    d_w = torch.rand(n, generator=g) * 0.01 + 1e-4
    bias = torch.randn(n, generator=g) if has_bias else None
    return q, d_pos, d_neg, w, d_w, bias, bounds, dual, out


def on_device(*tensors):
    return [t.to(DEVICE) if isinstance(t, torch.Tensor) else t for t in tensors]


def close(got, ref, out_dtype, fp8=False):
    got, ref = got.float().cpu(), ref.float()
    if out_dtype == torch.float32 and not fp8:
        assert torch.equal(got, ref)      # same int32 sums, same fp32 epilogue order: bit exact
        return
    tol = {torch.float32: 1e-5, torch.bfloat16: 8e-3, torch.float16: 1e-3}[out_dtype]
    scale = ref.abs().max().clamp(min=1e-6)
    assert ((got - ref).abs().max() / scale) <= tol


@SETTINGS
@given(problems())
def test_int8_variants(p):
    args = operands(p)
    ref = gemm_reference(*args)
    got = launch(*on_device(*args))
    assert got.shape == ref.shape and got.dtype == ref.dtype
    close(got, ref, args[8])


@SETTINGS
@given(problems())
def test_fp8_variants(p):
    args = operands(p, fp8=True)
    ref = gemm_reference(*args)
    got = launch(*on_device(*args))
    close(got, ref, args[8], fp8=True)


@SETTINGS
@given(problems(), st.booleans(), st.sampled_from([torch.float32, torch.bfloat16]))
def test_prologue_quantizes_like_the_reference(p, smooth_on, x_dtype):
    m, n, bounds, dual, _, has_bias, out, seed = p
    q, d_pos, d_neg, w, d_w, bias, *_ = operands((m, n, bounds, dual, False, has_bias, out, seed))
    g = torch.Generator().manual_seed(seed + 1)
    x = (torch.randn(m, bounds[-1], generator=g) * 3).to(x_dtype)
    x[0, 0] = 2.5 * d_pos[0, 0]       # a tie: round half to even
    smooth = torch.rand(bounds[-1], generator=g) + 0.5 if smooth_on else None
    xs = x.float() / smooth if smooth is not None else x.float()
    q_ref = quantize_static(xs, bounds, dual, d_pos, d_neg)
    ref = gemm_reference(q_ref, d_pos, d_neg, w, d_w, bias, bounds, dual, out)
    got = launch(*on_device(x, d_pos, d_neg, w, d_w, bias), bounds, dual, out,
                 smooth=smooth.to(DEVICE) if smooth is not None else None, prologue=True)
    close(got, ref, out)


def test_op_and_kernel_agree_on_this_device():
    """On CPU the op runs the oneDNN reference, on CUDA the kernel itself: either way they agree."""
    args = on_device(*operands((3, 8, [0, 40], [0], True, True, torch.float32, 0)))
    assert torch.equal(torch.ops.segquant.gemm(*args), launch(*args))


def test_large_k_and_many_segments():
    """24 head segments of 64 and a K that is not a multiple of the tile."""
    bounds = list(range(0, 24 * 64 + 1, 64))
    args = operands((17, 40, bounds, [0] * 24, True, True, torch.float32, 3))
    close(launch(*on_device(*args)), gemm_reference(*args), torch.float32)
    args = operands((2, 24, [0, 100, 301], [1, 0], False, False, torch.bfloat16, 4))
    close(launch(*on_device(*args)), gemm_reference(*args), torch.bfloat16)


def test_prologue_keeps_non_finite_rows_non_finite():
    """Static steps on float input: a row with NaN/Inf comes out NaN in the kernel and in the op,
    the others are unchanged (int8 has no NaN: without this a NaN would turn finite)."""
    q, d_pos, d_neg, w, d_w, bias, bounds, dual, out = operands((5, 24, [0, 40, 64], [1, 1], False, True,
                                                               torch.float32, 7))
    x = torch.randn(5, 64, generator=torch.Generator().manual_seed(8))
    x[1, 3], x[3, 50] = float("nan"), float("inf")
    ref = torch.ops.segquant.gemm_prologue(x, d_pos, d_neg, None, w, d_w, bias, bounds, dual, out)
    got = launch(*on_device(x, d_pos, d_neg, w, d_w, bias), bounds, dual, out, prologue=True).cpu()
    for y in (ref, got):
        assert torch.isnan(y[[1, 3]]).all() and torch.isfinite(y[[0, 2, 4]]).all()
    assert torch.equal(got[[0, 2, 4]], ref[[0, 2, 4]])
    finite = x.clone()
    finite[1, 3] = finite[3, 50] = 0.0
    plain = torch.ops.segquant.gemm_prologue(finite, d_pos, d_neg, None, w, d_w, bias, bounds, dual, out)
    assert torch.equal(plain[[0, 2, 4]], ref[[0, 2, 4]])


@SETTINGS
@given(problems(), st.data())
def test_asymmetric_segments_bit_exact(p, data):
    """Zero points: the int32 correction zp * colsum at each flush, the same in kernel and op."""
    from segquant_compile.lowering.ops import column_sums
    q, d_pos, d_neg, w, d_w, bias, bounds, dual, out = operands(p)
    s = len(bounds) - 1
    codes = data.draw(st.lists(st.sampled_from([0, 1, 2]), min_size=s, max_size=s))
    zp = torch.randint(-128, 128, d_pos.shape, generator=torch.Generator().manual_seed(p[-1])).float()
    d_neg = torch.where(torch.tensor(codes) == 1, d_neg, d_pos)
    colsum = column_sums(w, bounds)
    ref = gemm_reference(q, d_pos, d_neg, w, d_w, bias, bounds, codes, out, zp, colsum)
    got = launch(*on_device(q, d_pos, d_neg, w, d_w, bias), bounds, codes, out, zp=zp.to(DEVICE),
                 colsum=colsum.to(DEVICE))
    close(got, ref, out)   # bit exact in fp32, mixed schemes included
    # the correction matches the integer identity sum((q - z) * W) per segment
    for i, (k0, k1) in enumerate(zip(bounds[:-1], bounds[1:])):
        deq = (q[:, k0:k1].long() - zp[:, i:i + 1].long()) @ w[k0:k1].long()
        direct = q[:, k0:k1].long() @ w[k0:k1].long() - zp[:, i:i + 1].long() * colsum[i].long()
        assert torch.equal(deq, direct)
