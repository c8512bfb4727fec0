"""The kernels' one K loop (lowering/triton_k_loop.py k_tiles / k_tile): tiles on BLOCK_K multiples
(EVEN_K, the loop the pipeliner takes) and tiles read from the table (any bounds) give the
reference's bits in every kernel; the pruner keeps the table's verdict (TRITON_INTERPRET=1 on CPU)."""
import pytest
import torch

from segquant_compile.lowering import gemm_configs, triton_k_loop
from segquant_compile.lowering.ops import column_sums, gemm_reference
from segquant_compile.lowering.quantize import quantize_static
from test_conv_kernel import _launch as conv_launch
from test_conv_kernel import problem as conv_problem
from test_formats_kernels import launch_w4, launch_weight_only, w4_operands, weight_only_operands
from test_triton_gemm import launch, on_device, operands

CONFIG = dict(gemm_configs.INTERPRETER_CONFIG, BLOCK_K=32)
EVEN, UNEVEN = [0, 64, 96, 160], [0, 40, 100, 161]     # every bound on 32 multiples / none after 0
# the packed weight as CUDA reads it (K-major: quantize.packed_layout) and as the CPU does
LAYOUTS = ["k-major", "n-major"]


def test_k_tiles_never_straddle_a_segment():
    tk, tu, tiles, align, even = triton_k_loop.k_tiles((0, 40, 100, 1000), 64, "cpu")
    assert tk.tolist() == [0, 40, 100, *range(164, 1000, 64), 1000]
    assert tu.tolist() == [0, 1, *[2] * 15, 3] and tiles == 17 and align == 4 and not even
    tk, tu, tiles, align, even = triton_k_loop.k_tiles(tuple(range(0, 1537, 64)), 64, "cpu")
    assert tiles == 24 and align == 16 and even and tu.tolist() == list(range(25))


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("bounds", [EVEN, UNEVEN], ids=["even", "table"])
@pytest.mark.parametrize("codes", [[0, 0, 0], [1, 0, 1], [2, 1, 0]])
def test_gemm_both_loops_bit_exact(bounds, codes, layout):
    q, d_pos, d_neg, w, d_w, bias, _, _, _ = operands((17, 40, bounds, [0] * 3, True, True, torch.float32, 5),
                                                    layout=layout)
    assert (w.stride(0) == 1) == (layout == "k-major")
    zp = torch.randint(-128, 128, d_pos.shape, generator=torch.Generator().manual_seed(1)).float()
    colsum = column_sums(w, bounds)
    ref = gemm_reference(q, d_pos, d_neg, w, d_w, bias, bounds, codes, torch.float32, zp, colsum)
    got = launch(*on_device(q, d_pos, d_neg, w, d_w, bias), bounds, codes, torch.float32, zp=zp, colsum=colsum,
                 config=CONFIG)
    assert torch.equal(got.cpu(), ref)


@pytest.mark.parametrize("bounds", [EVEN, UNEVEN], ids=["even", "table"])
@pytest.mark.parametrize("codes", [[0, 0, 0], [1, 0, 1]])
def test_prologue_both_loops_bit_exact(bounds, codes):
    """Static steps per column (the launcher's gather) quantize like the per-segment steps."""
    _, d_pos, d_neg, w, d_w, bias, _, _, _ = operands((9, 24, bounds, codes, False, True, torch.float32, 6))
    d_neg = torch.where(torch.tensor(codes) == 1, d_neg, d_pos)
    x = torch.randn(9, bounds[-1], generator=torch.Generator().manual_seed(2)) * 3
    x[0, 0], x[1, 70] = 2.5 * d_pos[0, 0], -0.0
    ref = gemm_reference(quantize_static(x, bounds, codes, d_pos, d_neg), d_pos, d_neg, w, d_w, bias, bounds, codes,
                         torch.float32)
    got = launch(*on_device(x, d_pos, d_neg, w, d_w, bias), bounds, codes, torch.float32, prologue=True, config=CONFIG)
    assert torch.equal(got.cpu(), ref)


@pytest.mark.parametrize("pixel", [False, True], ids=["static", "pixel"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("channels", [(32, 32), (3, 5)], ids=["even", "table"])
def test_conv_both_loops_bit_exact(channels, layout, pixel):
    """The static conv kernel's two K loops, and the pixel kernel on channel chunks that fill its
    tiles or not."""
    from segquant_compile.lowering import conv as C
    from segquant_compile.lowering import quantize as Q
    x, geo, kb, w, d_w, bias = conv_problem(channels, ((1, 1), (1, 1), (0, 0)), (0, 2), seed=3, layout=layout)
    if pixel:
        d, dn, zp = C.input_pixel_steps(x, geo, kb, [0, 2])
        colsum = None
    else:
        cb = geo.channel_bounds(kb)
        pos = torch.stack([x[:, a:b].amax().clamp(min=0) for a, b in zip(cb[:-1], cb[1:])])
        d, dn, zp = Q.static_steps(pos, pos, [0, 2])
        colsum = column_sums(w, kb)
    q = C.quantize_channels(x, geo, kb, [0, 2], d, dn, zp)
    ref = C.conv2d_reference(q, d, dn, w, d_w, bias, kb, [0, 2], geo, torch.float32, zp, colsum)
    got = conv_launch(q, d, dn, w, d_w, bias, kb, [0, 2], geo, torch.float32, zp, colsum)
    assert torch.equal(got, ref)


@pytest.mark.parametrize("group", [32, 64], ids=["even", "table"])
def test_formats_both_loops_bit_exact(group):
    """w4a8 (groups of `group` within segments of 64 + 96 columns; bit exact) and int4 weight-only."""
    args, kw, _ = w4_operands((5, 24, [0, 64, 160], [1, 2], group, True, True, torch.float32, 8))
    if group == 64:     # groups of 64 inside a 96-wide segment: a group of 32 starting at 128
        assert list(args[7]) == [0, 64, 128, 160]
    ref = torch.ops.segquant.gemm_w4(*args, **kw)
    got = launch_w4(*on_device(*args), zp=kw["zp"], colsum=kw["colsum"], config=CONFIG)
    assert torch.equal(got.cpu(), ref)
    wo = weight_only_operands((5, 24, [0, 64, 160], None, group, None, True, torch.float32, 9), 4, torch.float32)
    ref = torch.ops.segquant.gemm_weight_only(*wo)   # steps after the dot: fp32 rounding apart
    assert ((launch_weight_only(*wo, config=CONFIG).cpu() - ref).abs().max() / ref.abs().max()) < 1e-5


def test_pruner_keeps_the_table_and_tiles_on_segment_multiples(monkeypatch):
    heads = tuple(range(0, 1537, 64))
    offered = gemm_configs.prune(4096, 1536, 1536, "int8", "cpu", heads, arch="sm_90")
    assert offered and all(c["BLOCK_K"] <= 64 and all(b % c["BLOCK_K"] == 0 for b in heads) for c in offered)
    table = {"archs": {"sm_90": {"gemm:int8:segmented": [6], "gemm:int8-dual:segmented": [],
                                 "gemm:int8-dual:segmented:single_stage": [9]}}}
    monkeypatch.setattr(gemm_configs, "_table", lambda: table)
    assert gemm_configs.prune(4096, 1536, 1536, "int8", "cpu", heads, arch="sm_90") == [gemm_configs.CONFIGS[6]]
    # a one-segment launch the table lacks takes its segmented case's verdict
    assert gemm_configs.prune(4096, 1536, 1536, "int8", "cpu", None, arch="sm_90") == [gemm_configs.CONFIGS[6]]
    # no config pipelines: those that pass all else, with num_stages 1
    assert gemm_configs.prune(4096, 1536, 1536, "int8-dual", "cpu", heads, arch="sm_90") == \
        [dict(gemm_configs.CONFIGS[9], num_stages=1)]
    # bounds on no BLOCK_K multiple: the table-driven loop, which no pipeliner takes
    assert all(c["num_stages"] == 1 for c in gemm_configs.prune(4096, 1536, 1000, "int8", "cpu", UNEVEN[:3] + [1000],
                                                               arch="sm_89", checked=False))


def test_packed_layout_is_k_major_for_the_8bit_formats_on_cuda_only():
    """One rule (quantize.packed_layout): the 8-bit formats' weight is K-major on CUDA (what the
    kernels and codegen-check assume), contiguous [K, N] elsewhere and for the other formats;
    the values and the logical shape never change."""
    from segquant_compile.lowering import quantize as Q
    cuda = torch.device("cuda")
    assert Q.reads_k_major("int8", cuda) and Q.reads_k_major("fp8", cuda)
    assert not any(Q.reads_k_major(f, cuda) for f in ("w4a8", "int8-weight-only", "int4-weight-only"))
    assert not Q.reads_k_major("int8", torch.device("cpu"))
    w = torch.randint(-127, 128, (48, 24), dtype=torch.int8)
    km = Q.k_major(w)
    assert km.shape == w.shape and km.stride() == (1, 48) and torch.equal(km, w)
    assert Q.k_major(km).data_ptr() == km.data_ptr()          # already K-major: not copied again
    back = Q.packed_layout(km, "int8", "cpu")
    assert back.is_contiguous() and torch.equal(back, w)
    # the codegen-check compiles the layout the sites get on CUDA
    from segquant_compile.lowering import codegen_cases
    calls = []
    case = next(c for c in codegen_cases.cases() if c.name == "gemm:int8")
    case.run(dict(gemm_configs.CONFIGS[0]), calls)
    fn, args, _ = calls[0]
    strides = dict(zip(fn.arg_names, args))
    assert strides["stride_wk"] == 1 and strides["stride_wn"] == case.k
