"""SVDQuant's low-rank branch in the Triton GEMM kernels (TRITON_INTERPRET=1 on CPU machines, the
device when CUDA is present): the up-projection lr @ L2 in the epilogue of the int8 / fp8 GEMM
and of w4a8, the prologue GEMM's down-projection x @ L1 accumulated in its K loop, against the
ops' CPU reference, and a whole site through quantized_linear against its CPU path.

The branch's float sums run in another order in a kernel (tile by tile, tensor cores) than in
the reference (BLAS): the bit-exact tests give the branch dyadic values whose every partial sum
is exact in fp32 (so only the order of the fp32 operations the ops document can differ), and a
random branch is checked to fp32 rounding."""
import os

import pytest
import torch

from segquant_compile.lowering import low_rank
from segquant_compile.lowering.ops import column_sums, gemm_reference
from segquant_compile.lowering.quantize import group_bounds, k_major, pack_int4, quantize_dynamic, segment_groups

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
RANKS = [8, 16, 32]


def launch(*args, **kw):
    from segquant_compile.lowering.triton_gemm import launch as run
    return run(*args, **kw)


def launch_w4(*args, **kw):
    from segquant_compile.lowering.triton_formats import launch_w4 as run
    return run(*args, **kw)


def on_device(*tensors):
    return [t.to(DEVICE) if isinstance(t, torch.Tensor) else t for t in tensors]


def dyadic(shape, unit, g, lim=8, dtype=torch.float32):
    """Integers in [-lim, lim] times a power of two: exact in bf16/fp16, and every sum of their
    products in these tests is exact in fp32 (whatever its order)."""
    return (torch.randint(-lim, lim + 1, shape, generator=g).float() * unit).to(dtype)


def equal(got, ref):
    """Bit for bit under the interpreter; a GPU's tensor cores sum the branch in their own order."""
    got = got.cpu()
    if DEVICE == "cpu":   # NaN where the reference has NaN (non-finite rows)
        torch.testing.assert_close(got, ref, rtol=0, atol=0, equal_nan=True)
    else:
        torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-5, equal_nan=True)


def int8_operands(m, n, bounds, codes, seed):
    g = torch.Generator().manual_seed(seed)
    k, s = bounds[-1], len(bounds) - 1
    q = torch.randint(-128, 128, (m, k), generator=g, dtype=torch.int8)
    w = k_major(torch.randint(-127, 128, (k, n), generator=g, dtype=torch.int8))
    d_pos = torch.rand(m, s, generator=g) * 0.05 + 1e-3
    d_neg = torch.rand(m, s, generator=g) * 0.05 + 1e-3
    zp = torch.randint(-128, 128, (m, s), generator=g).float() if 2 in codes else None
    colsum = column_sums(w, bounds) if 2 in codes else None
    d_w = torch.rand(n, generator=g) * 0.01 + 1e-4
    bias = torch.randn(n, generator=g)
    return q, d_pos, d_neg, w, d_w, bias, zp, colsum, g


CASES = [   # (M, N, K bounds, scheme codes): M not a multiple of the interpreter's BLOCK_M 16
    (17, 40, [0, 64], [0]),
    (33, 24, [0, 40, 90], [1, 0]),
    (5, 33, [0, 30, 70], [2, 1]),
]


@pytest.mark.parametrize("rank", RANKS + [40])
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_int8_epilogue_adds_the_up_projection_bit_exact(rank, case, dtype):
    """segquant::gemm with lr, l2: y = combine * d_w + bias + lr @ l2 (rank chunks), the kernel
    as the reference; rank 40 takes two chunks of 32."""
    m, n, bounds, codes = case
    q, d_pos, d_neg, w, d_w, bias, zp, colsum, g = int8_operands(m, n, bounds, codes, rank)
    lr, l2 = dyadic((m, rank), 2 ** -3, g, dtype=dtype), dyadic((rank, n), 2 ** -4, g, dtype=dtype)
    args = (q, d_pos, d_neg, w, d_w, bias, bounds, codes, torch.float32)
    ref = gemm_reference(*args, zp, colsum, lr, l2)
    got = launch(*on_device(*args), zp=on_device(zp)[0], colsum=on_device(colsum)[0], lr=lr.to(DEVICE),
                 l2=l2.to(DEVICE))
    equal(got, ref)
    # the branch is there, after the bias: not the same as adding it in another order
    plain = gemm_reference(*args, zp, colsum)
    assert not torch.equal(ref, plain)
    assert torch.equal(ref, low_rank.up_into(plain.clone(), lr, l2))


@pytest.mark.parametrize("rank", RANKS)
@pytest.mark.parametrize("codes", [[0], [1, 0]])
def test_fp8_epilogue_adds_the_up_projection(rank, codes):
    """e4m3 operands (sm89+ on a GPU): the same epilogue; the reference's fp8 sums are float64,
    so to fp32 rounding."""
    m, n, bounds = 17, 40, ([0, 64] if len(codes) == 1 else [0, 32, 64])
    g = torch.Generator().manual_seed(rank)
    q = (torch.randn(m, 64, generator=g) * 8).to(torch.float8_e4m3fn)
    w = k_major((torch.randn(64, n, generator=g) * 8).to(torch.float8_e4m3fn))
    d = torch.rand(m, len(codes), generator=g) * 0.05 + 1e-3
    d_w = torch.rand(n, generator=g) * 0.01 + 1e-4
    lr, l2 = dyadic((m, rank), 2 ** -3, g, dtype=torch.bfloat16), dyadic((rank, n), 2 ** -4, g, dtype=torch.bfloat16)
    args = (q, d, d, w, d_w, None, bounds, codes, torch.float32)
    ref = gemm_reference(*args, lr=lr, l2=l2).float()
    got = launch(*on_device(*args), lr=lr.to(DEVICE), l2=l2.to(DEVICE)).cpu()
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("rank", RANKS)
@pytest.mark.parametrize("case", CASES[:2])
@pytest.mark.parametrize("x_dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("smooth_on", [False, True])
def test_prologue_accumulates_the_down_projection_bit_exact(rank, case, x_dtype, smooth_on):
    """segquant::gemm_prologue with l1, l2: x @ L1 from the raw x tiles of the K loop (DualScale:
    in its first pass only), rounded to x's dtype, its up-projection after the bias, then the
    NaN of non-finite rows."""
    m, n, bounds, codes = case
    _, _, _, w, d_w, bias, _, _, g = int8_operands(m, n, bounds, codes, rank + 1)
    s = len(bounds) - 1
    d_pos = torch.rand(1, s, generator=g) * 0.3 + 0.05
    d_neg = torch.where(torch.tensor(codes) == 1, torch.rand(1, s, generator=g) * 0.3 + 0.05, d_pos)
    x = dyadic((m, bounds[-1]), 2 ** -2, g, lim=16, dtype=x_dtype)
    x[2, 5] = float("nan")
    smooth = torch.rand(bounds[-1], generator=g) + 0.5 if smooth_on else None
    l1, l2 = dyadic((bounds[-1], rank), 2 ** -5, g, dtype=x_dtype), dyadic((rank, n), 2 ** -4, g, dtype=x_dtype)
    args = (x, d_pos, d_neg, smooth, w, d_w, bias, bounds, codes, torch.float32)
    ref = torch.ops.segquant.gemm_prologue(*args, l1, l2)
    got = launch(*on_device(x, d_pos, d_neg, w, d_w, bias), bounds, codes, torch.float32,
                 smooth=on_device(smooth)[0], prologue=True, l1=l1.to(DEVICE), l2=l2.to(DEVICE))
    assert torch.isnan(got[2]).all() and torch.isfinite(got[[0, 1, 3]]).all()
    equal(got, ref)
    plain = torch.ops.segquant.gemm_prologue(*args)
    assert not torch.equal(ref[[0, 1]], plain[[0, 1]])


def w4_operands(m, n, k_bounds, codes, group, seed):
    g = torch.Generator().manual_seed(seed)
    k, s = k_bounds[-1], len(k_bounds) - 1
    g_bounds = list(group_bounds(k_bounds, group))
    q = torch.randint(-128, 128, (m, k), generator=g, dtype=torch.int8)
    w = torch.randint(-8, 8, (k, n), generator=g, dtype=torch.int8)
    d_pos = torch.rand(m, s, generator=g) * 0.05 + 1e-3
    d_neg = torch.rand(m, s, generator=g) * 0.05 + 1e-3
    zp = torch.randint(-128, 128, (m, s), generator=g).float() if 2 in codes else None
    colsum = column_sums(w, g_bounds) if 2 in codes else None
    d_w = torch.rand(len(g_bounds) - 1, n, generator=g) * 0.01 + 1e-4
    assert segment_groups(k_bounds, g_bounds)[-1] == len(g_bounds) - 1
    return q, d_pos, d_neg, pack_int4(w), d_w, torch.randn(n, generator=g), g_bounds, zp, colsum, g


@pytest.mark.parametrize("rank", RANKS)
@pytest.mark.parametrize("case", CASES)
def test_w4a8_epilogue_adds_the_up_projection_bit_exact(rank, case):
    m, n, bounds, codes = case
    q, d_pos, d_neg, w4, d_w, bias, g_bounds, zp, colsum, g = w4_operands(m, n, bounds, codes, 32, rank)
    lr, l2 = dyadic((m, rank), 2 ** -3, g, dtype=torch.bfloat16), dyadic((rank, n), 2 ** -4, g, dtype=torch.bfloat16)
    ref = torch.ops.segquant.gemm_w4(q, d_pos, d_neg, w4, d_w, bias, bounds, g_bounds, codes, torch.float32, zp, colsum,
                                     lr, l2)
    got = launch_w4(*on_device(q, d_pos, d_neg, w4, d_w, bias), bounds, g_bounds, codes, torch.float32,
                    zp=on_device(zp)[0], colsum=on_device(colsum)[0], lr=lr.to(DEVICE), l2=l2.to(DEVICE))
    equal(got, ref)
    plain = torch.ops.segquant.gemm_w4(q, d_pos, d_neg, w4, d_w, bias, bounds, g_bounds, codes, torch.float32, zp,
                                       colsum)
    assert torch.equal(ref, low_rank.up_into(plain.clone(), lr, l2))


def test_a_random_branch_agrees_to_fp32_rounding():
    """Any branch values: kernel and reference differ by the order of the branch's fp32 sums at
    most (bf16 output: by the cast's last bit, the interpreter truncating)."""
    q, d_pos, d_neg, w, d_w, bias, _, _, g = int8_operands(33, 40, [0, 40, 90], [1, 0], 5)
    lr, l2 = torch.randn(33, 24, generator=g).bfloat16(), torch.randn(24, 40, generator=g).bfloat16()
    for out in (torch.float32, torch.bfloat16):
        args = (q, d_pos, d_neg, w, d_w, bias, [0, 40, 90], [1, 0], out)
        ref = gemm_reference(*args, lr=lr, l2=l2).float()
        got = launch(*on_device(*args), lr=lr.to(DEVICE), l2=l2.to(DEVICE)).float().cpu()
        tol = 1e-6 if out == torch.float32 else 2 ** -7
        assert ((got - ref).abs() / ref.abs().clamp(min=1.0)).max() <= tol


def test_branch_operands_are_checked():
    q, d_pos, d_neg, w, d_w, bias, _, _, g = int8_operands(5, 16, [0, 64], [0], 0)
    args = (q, d_pos, d_neg, w, d_w, bias, [0, 64], [0], torch.float32)
    lr, l2 = torch.zeros(5, 8), torch.zeros(8, 16)
    with pytest.raises(ValueError, match="takes l2"):
        launch(*args, lr=lr)
    with pytest.raises(ValueError, match="low-rank branch"):
        launch(*args, lr=torch.zeros(4, 8), l2=l2)
    with pytest.raises(ValueError, match="as l1"):
        launch(*args, l1=torch.zeros(64, 8), l2=l2)
    x = torch.zeros(5, 64)
    with pytest.raises(ValueError, match="rank <= 32"):
        launch(x, d_pos[:1], d_neg[:1], w, d_w, bias, [0, 64], [0], torch.float32, prologue=True,
               l1=torch.zeros(64, 40), l2=torch.zeros(40, 16))


def test_fake_ops_take_the_branch():
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode():
        q, w = torch.zeros(7, 64, dtype=torch.int8), torch.zeros(64, 16, dtype=torch.int8)
        d, d_w = torch.ones(7, 1), torch.ones(16)
        lr, l2 = torch.zeros(7, 8, dtype=torch.bfloat16), torch.zeros(8, 16, dtype=torch.bfloat16)
        y = torch.ops.segquant.gemm(q, d, d, w, d_w, None, [0, 64], [0], torch.bfloat16, None, None, lr, l2)
        assert y.shape == (7, 16) and y.dtype == torch.bfloat16
        y = torch.ops.segquant.gemm_prologue(torch.zeros(7, 64), d[:1], d[:1], None, w, d_w, None, [0, 64], [0],
                                             torch.float32, torch.zeros(64, 8), l2)
        assert y.shape == (7, 16)
        w4 = torch.zeros(32, 16, dtype=torch.int8)
        y = torch.ops.segquant.gemm_w4(q, d, d, w4, torch.ones(2, 16), None, [0, 64], [0, 32, 64], [0],
                                       torch.float32, None, None, lr, l2)
        assert y.shape == (7, 16)


def test_variant_names_and_codegen_cases_carry_the_branch():
    from segquant_compile.lowering.codegen_cases import cases
    from segquant_compile.lowering.formats import Format, Scheme
    from segquant_compile.lowering.site_lowering import SiteLowering
    lo = SiteLowering(Format.INT8, "static", "per-channel", (0, 64, 128), (Scheme.DUALSCALE, Scheme.SYMMETRIC), None,
                      prologue=True, low_rank=32)
    assert lo.variant == "int8-dual-prologue-lr"
    assert SiteLowering(Format.W4A8, "dynamic", "per-group", (0, 64), (Scheme.SYMMETRIC,), None, group_size=32,
                        low_rank=8).variant == "w4a8-lr"
    names = {c.name for c in cases()}
    for name in ("gemm:int8-lr", "gemm:int8-lr:segmented", "gemm:int8-dual-lr:segmented", "gemm:int8-asym-lr:segmented",
                 "gemm:int8-prologue-lr", "gemm:int8-dual-prologue-lr:segmented", "gemm:fp8-lr",
                 "w4a8:w4a8-lr:segmented", "w4a8:w4a8-dual-lr:segmented"):
        assert name in names, name


# ---- a whole site: quantized_linear with the branch, the kernels against the CPU path ----

@pytest.fixture
def kernel_ops(monkeypatch):
    """The GEMM ops routed to the Triton launchers (under the interpreter on CPU tensors), as a
    CUDA site runs them: linear.py's wiring of the branch into the kernels."""
    if DEVICE == "cpu" and not INTERPRET:
        pytest.skip("needs the interpreter or a GPU")

    def gemm(q, d_pos, d_neg, w, d_w, bias, kb, sc, out, zp=None, colsum=None, lr=None, l2=None):
        return launch(q, d_pos, d_neg, w, d_w, bias, kb, sc, out, zp=zp, colsum=colsum, lr=lr, l2=l2)

    def prologue(x, d_pos, d_neg, smooth, w, d_w, bias, kb, sc, out, l1=None, l2=None):
        return launch(x, d_pos, d_neg, w, d_w, bias, kb, sc, out, smooth=smooth, prologue=True, l1=l1, l2=l2)

    def w4(q, d_pos, d_neg, w4, d_w, bias, kb, gb, sc, out, zp=None, colsum=None, lr=None, l2=None):
        return launch_w4(q, d_pos, d_neg, w4, d_w, bias, kb, gb, sc, out, zp=zp, colsum=colsum, lr=lr, l2=l2)

    for name, fn in (("gemm", gemm), ("gemm_prologue", prologue), ("gemm_w4", w4)):
        monkeypatch.setattr(torch.ops.segquant, name, fn)


def site(rank, k=96, n=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = dyadic((3, 11, k), 2 ** -2, g, lim=16)
    l1, l2 = dyadic((k, rank), 2 ** -5, g), dyadic((rank, n), 2 ** -4, g)
    w = torch.randint(-127, 128, (k, n), generator=g, dtype=torch.int8)
    return x, w, torch.rand(n, generator=g) * 0.01 + 1e-4, torch.randn(n, generator=g), l1, l2, g


def _linear(*args, **kw):
    from segquant_compile.lowering.linear import quantized_linear
    return quantized_linear(*args, **kw)


@pytest.mark.parametrize("rank", RANKS)
def test_dynamic_site_kernel_path_is_the_cpu_path(rank, kernel_ops):
    """Dynamic DualScale + symmetric int8: lr = x @ L1 by torch, the up-projection in the GEMM's
    epilogue; the same numbers as the CPU site's plain ops (cpu_linear) and the op's reference."""
    x, w, d_w, bias, l1, l2, _ = site(rank)
    args = (x, k_major(w), d_w, bias, None, None, None, None, None, (0, 48, 96), (1, 0))
    got = _linear(*args, l1=l1, l2=l2)
    cpu = _linear(x, w, d_w, bias, None, None, None, None, None, (0, 48, 96), (1, 0), cpu_gemm="int8",
                               l1=l1, l2=l2)
    equal(got, cpu)


@pytest.mark.parametrize("rank", RANKS)
def test_static_prologue_site_kernel_path_is_the_cpu_path(rank, kernel_ops):
    """Static steps with the prologue: x @ L1 inside the kernel; the CPU site (plain ops, no
    prologue) gives the same numbers."""
    x, w, d_w, bias, l1, l2, g = site(rank, seed=1)
    d_pos = torch.tensor([[0.3, 0.2]])
    d_neg = torch.tensor([[0.25, 0.2]])
    smooth = torch.rand(96, generator=g) + 0.5
    args = (x, k_major(w), d_w, bias, d_pos, d_neg, None, smooth, None, (0, 48, 96), (1, 0))
    got = _linear(*args, prologue=True, l1=l1, l2=l2)
    cpu = _linear(x, w, d_w, bias, d_pos, d_neg, None, smooth, None, (0, 48, 96), (1, 0), cpu_gemm="int8", l1=l1,
                  l2=l2)
    equal(got, cpu)


@pytest.mark.parametrize("rank", RANKS)
def test_w4a8_site_kernel_path_is_the_op_reference(rank, kernel_ops):
    x, _, _, bias, l1, l2, g = site(rank, seed=2)
    k_bounds, g_bounds = (0, 48, 96), group_bounds((0, 48, 96), 32)
    w4 = pack_int4(torch.randint(-8, 8, (96, 40), generator=g, dtype=torch.int8))
    d_w = torch.rand(len(g_bounds) - 1, 40, generator=g) * 0.01 + 1e-4
    args = (x, w4, d_w, bias, None, None, None, None, None, k_bounds, (1, 0))
    got = _linear(*args, fmt="w4a8", g_bounds=g_bounds, l1=l1, l2=l2)
    x2 = x.reshape(-1, 96)
    q, d_pos, d_neg, _ = quantize_dynamic(x2, list(k_bounds), [1, 0], "w4a8")
    from segquant_compile.lowering.ops import gemm_w4
    ref = gemm_w4(q, d_pos, d_neg, w4, d_w, bias, list(k_bounds), list(g_bounds), [1, 0], torch.float32, None, None,
                  low_rank.down(x2, l1), l2)
    equal(got.reshape(-1, 40), ref)
