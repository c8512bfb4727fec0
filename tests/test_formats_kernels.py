"""The w4a8 and weight-only formats: int4 packing, the CPU ops against float64, and the Triton
kernels against the ops (TRITON_INTERPRET=1 on CPU machines, the device when CUDA is present)."""
import itertools
import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from segquant_compile.lowering.ops import column_sums, dequantize_weight
from segquant_compile.lowering.quantize import group_bounds, pack_int4, segment_groups, unpack_int4

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
OUT_EPS = {torch.float32: 0.0, torch.bfloat16: 2.0 ** -8, torch.float16: 2.0 ** -11}   # half an ulp


def launch_w4(*args, **kw):
    from segquant_compile.lowering.triton_formats import launch_w4 as run
    return run(*args, **kw)


def launch_weight_only(*args, **kw):
    from segquant_compile.lowering.triton_formats import launch_weight_only as run
    return run(*args, **kw)


def on_device(*tensors):
    return [t.to(DEVICE) if isinstance(t, torch.Tensor) else t for t in tensors]


def config(block_k):
    """The interpreter's tile with a drawn BLOCK_K: 64 and 128 make groups shorter than a tile."""
    return dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=block_k, GROUP_M=4, num_stages=1, num_warps=4)


def test_int4_pack_round_trip():
    pairs = torch.tensor(list(itertools.product(range(-8, 8), repeat=2)), dtype=torch.int8).t()   # every byte
    packed = pack_int4(pairs)
    assert packed.shape == (1, 256) and packed.dtype == torch.int8 and len(set(packed[0].tolist())) == 256
    assert torch.equal(unpack_int4(packed, 2), pairs)
    g = torch.Generator().manual_seed(0)
    for k in (1, 3, 8, 33):
        q = torch.randint(-8, 8, (k, 5), generator=g, dtype=torch.int8)
        q[0, 0], q[-1, -1] = -8, 7
        packed = pack_int4(q)
        assert packed.shape == ((k + 1) // 2, 5)
        assert torch.equal(unpack_int4(packed, k), q)


@st.composite
def problems(draw, max_k=200):
    """Segments of any width (so segments and groups start at odd k), group sizes 64 and 128
    (a segment's last group may be a few columns), per-token or static steps."""
    m = draw(st.sampled_from([1, 2, 5, 17]))
    n = draw(st.integers(1, 40))
    widths = draw(st.lists(st.integers(1, 150), min_size=1, max_size=3).filter(lambda w: sum(w) <= max_k))
    schemes = draw(st.lists(st.sampled_from([0, 1, 2]), min_size=len(widths), max_size=len(widths)))
    group = draw(st.sampled_from([64, 128]))
    per_token = draw(st.booleans())
    has_bias = draw(st.booleans())
    out = draw(st.sampled_from([torch.float32, torch.bfloat16, torch.float16]))
    seed = draw(st.integers(0, 2 ** 16))
    return m, n, [0, *itertools.accumulate(widths)], schemes, group, per_token, has_bias, out, seed


def w4_operands(p):
    """gemm_w4's arguments; d_neg and zp are random on every segment (a segment of another scheme
    must ignore them), the weight holds the extreme nibbles -8 and 7."""
    m, n, k_bounds, schemes, group, per_token, has_bias, out, seed = p
    g = torch.Generator().manual_seed(seed)
    k, s = k_bounds[-1], len(k_bounds) - 1
    g_bounds = list(group_bounds(k_bounds, group))
    q = torch.randint(-128, 128, (m, k), generator=g, dtype=torch.int8)
    w = torch.randint(-8, 8, (k, n), generator=g, dtype=torch.int8)
    w[0, 0], w[-1, -1] = -8, 7
    rows = m if per_token else 1
    d_pos = torch.rand(rows, s, generator=g) * 0.05 + 1e-3
    d_neg = torch.rand(rows, s, generator=g) * 0.05 + 1e-3
    zp = torch.randint(-128, 128, (rows, s), generator=g).float()
    d_w = torch.rand(len(g_bounds) - 1, n, generator=g) * 0.01 + 1e-4
    bias = torch.randn(n, generator=g) if has_bias else None
    colsum = column_sums(w, g_bounds)
    return (q, d_pos, d_neg, pack_int4(w), d_w, bias, k_bounds, g_bounds, schemes, out), dict(zp=zp, colsum=colsum), w


def reference64(q, d_pos, d_neg, w, d_w, bias, k_bounds, g_bounds, schemes, zp):
    """gemm_w4 in float64 from the unpacked weight, asymmetric as (q - zp) @ W (no column sums);
    also the sum of the magnitudes of every term (the scale of the fp32 rounding)."""
    y = torch.zeros(q.shape[0], w.shape[1], dtype=torch.float64)
    mag = torch.zeros_like(y)
    groups = segment_groups(k_bounds, g_bounds)
    for s, scheme in enumerate(schemes):
        dx, dn, z = d_pos[:, s:s + 1].double(), d_neg[:, s:s + 1].double(), zp[:, s:s + 1].double()
        for g in range(groups[s], groups[s + 1]):
            qs, ws = q[:, g_bounds[g]:g_bounds[g + 1]].double(), w[g_bounds[g]:g_bounds[g + 1]].double()
            if scheme == 1:
                terms = [(qs.clamp(min=0) @ ws) * dx, (qs.clamp(max=0) @ ws) * dn]
            elif scheme == 2:
                terms = [((qs - z) @ ws) * dx]
            else:
                terms = [(qs @ ws) * dx]
            for t in terms:
                y += t * d_w[g].double()
                mag += (t * d_w[g].double()).abs()
    if bias is not None:
        y += bias.double()
        mag += bias.double().abs()
    return y, mag


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(problems())
def test_gemm_w4_matches_float64(p):
    args, kw, w = w4_operands(p)
    q, d_pos, d_neg, _, d_w, bias, k_bounds, g_bounds, schemes, _ = args
    y = torch.ops.segquant.gemm_w4(*args[:-1], torch.float32, **kw)
    ref, mag = reference64(q, d_pos, d_neg, w, d_w, bias, k_bounds, g_bounds, schemes, kw["zp"])
    assert y.shape == ref.shape and y.dtype == torch.float32
    # exact int32 group sums, a few fp32 roundings per term
    assert ((y.double() - ref).abs() <= 1e-6 * mag + 1e-30).all()


@SETTINGS
@given(problems(), st.sampled_from([32, 64, 128]))
def test_w4a8_kernel_bit_exact(p, block_k):
    """Same int32 group sums, same fp32 order (ops.gemm_w4's docstring): equal to the bit, in
    every output dtype (one cast of the same fp32 value)."""
    args, kw, _ = w4_operands(p)
    ref = torch.ops.segquant.gemm_w4(*args, **kw)
    out = args[-1]
    if INTERPRET and out == torch.bfloat16:   # the interpreter truncates fp32 -> bf16 (GPUs round to
        args = (*args[:-1], torch.float32)    # nearest even, like torch): compare the fp32 result, cast here
    got = launch_w4(*on_device(*args), zp=kw["zp"].to(DEVICE), colsum=kw["colsum"].to(DEVICE),
                    config=config(block_k)).cpu().to(out)
    assert torch.equal(got, ref)


def test_w4a8_odd_starts_short_groups_mixed_schemes():
    """Segments starting at odd k, one-column and three-column groups, every scheme, one tile
    (BLOCK_K 128) holding several groups."""
    k_bounds = [0, 3, 70, 135, 136]
    for schemes in ([0, 1, 2, 1], [2, 2, 0, 0], [1, 1, 1, 1]):
        args, kw, _ = w4_operands((5, 24, k_bounds, schemes, 64, True, True, torch.float32, 11))
        ref = torch.ops.segquant.gemm_w4(*args, **kw)
        for block_k in (32, 128):
            got = launch_w4(*on_device(*args), zp=kw["zp"].to(DEVICE), colsum=kw["colsum"].to(DEVICE),
                            config=config(block_k))
            assert torch.equal(got.cpu(), ref)


def w4_in_order(q, d_pos, d_neg, w, d_w, bias, k_bounds, g_bounds, schemes, zp, colsum, two_pass=True):
    """gemm_w4's order of fp32 operations written out (its docstring) from exact group sums:
    two_pass, the DualScale groups' negative parts after every group's first part; otherwise
    each DualScale group's two parts side by side (the order of the kernel that kept two
    accumulators alive), which rounds otherwise."""
    groups = segment_groups(k_bounds, g_bounds)
    y, negatives = None, []
    for s, scheme in enumerate(schemes):
        for g in range(groups[s], groups[s + 1]):
            qs, ws = q[:, g_bounds[g]:g_bounds[g + 1]].long(), w[g_bounds[g]:g_bounds[g + 1]].long()
            if scheme == 1:
                acc = (qs.clamp(min=0) @ ws).int()
                acc_neg = (qs.clamp(max=0) @ ws).int()
            elif scheme == 2:
                acc = (qs @ ws).int() - zp[:, s:s + 1].int() * colsum[g]
            else:
                acc = (qs @ ws).int()
            part = acc.float() * d_pos[:, s:s + 1]
            if scheme == 1 and two_pass:
                negatives.append((acc_neg.float() * d_neg[:, s:s + 1]) * d_w[g])
            elif scheme == 1:
                part = part + acc_neg.float() * d_neg[:, s:s + 1]
            part = part * d_w[g]
            y = part if y is None else y + part
    for part in negatives:
        y = y + part
    return y + bias if bias is not None else y


# plain (symmetric; one group: the flush after the K loop) and DualScale (alone, beside plain and
# asymmetric segments; one group: the two passes still flush inside the loop); segments of 70 and
# 160 columns hold groups of 64 and shorter ones
W4_SCHEMES = {"plain-one-group": ([0, 64], [0]), "plain": ([0, 70, 230], [0, 0]),
              "dual-one-group": ([0, 64], [1]), "dual": ([0, 70, 230], [1, 1]),
              "dual-mixed": ([0, 70, 230, 262], [1, 0, 2])}


@pytest.mark.parametrize("per_token", [True, False], ids=["per-token", "static"])
@pytest.mark.parametrize("block_k", [32, 64, 128])
@pytest.mark.parametrize("case", list(W4_SCHEMES))
def test_w4a8_plain_and_dualscale_bit_exact(case, block_k, per_token):
    """Kernel and op against gemm_w4's written order, bit for bit: DualScale in two passes (one
    integer accumulator), its negative parts added after every group's first part."""
    k_bounds, schemes = W4_SCHEMES[case]
    args, kw, w = w4_operands((17, 40, k_bounds, schemes, 64, per_token, True, torch.float32, 21))
    q, d_pos, d_neg, _, d_w, bias, _, g_bounds, _, _ = args
    want = w4_in_order(q, d_pos, d_neg, w, d_w, bias, k_bounds, g_bounds, schemes, kw["zp"], kw["colsum"])
    ref = torch.ops.segquant.gemm_w4(*args, **kw)
    assert torch.equal(ref, want)
    if 1 in schemes:   # the order is seen: the one-pass order rounds otherwise on these operands
        assert not torch.equal(ref, w4_in_order(q, d_pos, d_neg, w, d_w, bias, k_bounds, g_bounds, schemes, kw["zp"],
                                                kw["colsum"], two_pass=False))
    got = launch_w4(*on_device(*args), zp=kw["zp"].to(DEVICE), colsum=kw["colsum"].to(DEVICE), config=config(block_k))
    assert torch.equal(got.cpu(), ref)


def weight_only_operands(p, bits, x_dtype):
    m, n, k_bounds, _, group, _, has_bias, out, seed = p
    g = torch.Generator().manual_seed(seed)
    k = k_bounds[-1]
    x = (torch.randn(m, k, generator=g) * 2).to(x_dtype)
    if bits == 8:
        g_bounds = [0, k]
        w = torch.randint(-127, 128, (k, n), generator=g, dtype=torch.int8)
        d_w = torch.rand(n, generator=g) * 0.01 + 1e-4
    else:
        g_bounds = list(group_bounds(k_bounds, group))
        w = pack_int4(torch.randint(-8, 8, (k, n), generator=g, dtype=torch.int8))
        d_w = torch.rand(len(g_bounds) - 1, n, generator=g) * 0.01 + 1e-4
    bias = torch.randn(n, generator=g) if has_bias else None
    return x, w, d_w, bias, g_bounds, bits, out


# the interpreter has no bf16 dot (it multiplies the bit patterns): bf16 activations on a GPU only
X_DTYPES = [torch.float32, torch.float16] + ([] if INTERPRET else [torch.bfloat16])


@SETTINGS
@given(problems(), st.sampled_from([8, 4]), st.sampled_from(X_DTYPES), st.sampled_from([32, 64, 128]))
def test_weight_only_kernel(p, bits, x_dtype, block_k):
    """fp32 sums in another order (steps applied per group after the dot, the reference
    multiplies first): equal up to fp32 rounding of |x| @ |W|, then the output cast (the
    interpreter truncates to bf16: up to one ulp)."""
    args = weight_only_operands(p, bits, x_dtype)
    x, w, d_w, bias, g_bounds, bits, out = args
    ref = torch.ops.segquant.gemm_weight_only(*args)
    got = launch_weight_only(*on_device(*args), config=config(block_k)).cpu()
    assert got.dtype == ref.dtype == out
    ref32 = torch.ops.segquant.gemm_weight_only(*args[:-1], torch.float32).double()
    mag = x.double().abs() @ dequantize_weight(w, d_w, g_bounds, bits, x.shape[1]).double().abs()
    if bias is not None:
        mag += bias.double().abs()
    assert ((got.double() - ref.double()).abs() <= 1e-5 * mag + 2 * OUT_EPS[out] * ref32.abs() + 1e-30).all()


def test_dequantize_weight():
    g = torch.Generator().manual_seed(2)
    q = torch.randint(-8, 8, (7, 3), generator=g, dtype=torch.int8)
    d = torch.rand(2, 3, generator=g)
    w = dequantize_weight(pack_int4(q), d, [0, 3, 7], 4, 7)
    assert torch.equal(w, torch.cat([q[:3].float() * d[0], q[3:].float() * d[1]]))
    assert torch.equal(dequantize_weight(q, d[0], [0, 7], 8, 7), q.float() * d[0])
    with pytest.raises(ValueError, match="bits"):
        dequantize_weight(q, d[0], [0, 7], 2, 7)


def test_fake_implementations_give_shapes_and_dtypes():
    from torch._subclasses.fake_tensor import FakeTensorMode
    args, kw, _ = w4_operands((3, 10, [0, 5, 69], [2, 1], 64, True, True, torch.bfloat16, 0))
    wo = weight_only_operands((3, 10, [0, 69], None, 64, None, True, torch.float16, 0), 4, torch.bfloat16)
    with FakeTensorMode() as mode:
        fake = lambda t: mode.from_tensor(t) if isinstance(t, torch.Tensor) else t   # noqa: E731
        y = torch.ops.segquant.gemm_w4(*map(fake, args), zp=fake(kw["zp"]), colsum=fake(kw["colsum"]))
        z = torch.ops.segquant.gemm_weight_only(*map(fake, wo))
        z8 = torch.ops.segquant.gemm_weight_only(fake(wo[0]), fake(torch.zeros(69, 10, dtype=torch.int8)),
                                                 fake(torch.ones(10)), None, [0, 69], 8, torch.float32)
    assert (y.shape, y.dtype) == ((3, 10), torch.bfloat16)
    assert (z.shape, z.dtype) == ((3, 10), torch.float16)
    assert (z8.shape, z8.dtype) == ((3, 10), torch.float32)


def test_launchers_check_shapes():
    args, kw, _ = w4_operands((3, 10, [0, 5, 69], [0, 2], 64, False, False, torch.float32, 0))
    q, d_pos, d_neg, w4, d_w, bias, k_bounds, g_bounds, schemes, out = args
    with pytest.raises(ValueError, match="do not refine"):
        launch_w4(q, d_pos, d_neg, w4, d_w, bias, k_bounds, [0, 64, 69], schemes, out, **kw)
    with pytest.raises(ValueError, match="weight steps"):
        launch_w4(q, d_pos, d_neg, w4, d_w[:1], bias, k_bounds, g_bounds, schemes, out, **kw)
    with pytest.raises(ValueError, match="column sums"):
        launch_w4(q, d_pos, d_neg, w4, d_w, bias, k_bounds, g_bounds, schemes, out, zp=kw["zp"])
    with pytest.raises(ValueError, match="ceil"):
        launch_w4(q, d_pos, d_neg, w4[1:], d_w, bias, k_bounds, g_bounds, schemes, out, **kw)
    x = torch.randn(3, 69)
    with pytest.raises(ValueError, match="8-bit weight"):
        launch_weight_only(x, w4, d_w, None, g_bounds, 8, out)
    with pytest.raises(ValueError, match="int4 weight steps"):
        launch_weight_only(x, w4, d_w[0], None, g_bounds, 4, out)
