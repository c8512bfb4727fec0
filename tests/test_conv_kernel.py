"""The segquant conv2d op: its CPU reference against the linear GEMM contract on im2col rows
(static steps) and against the dequantized input's convolution (steps per input pixel), and the
Triton implicit-GEMM kernels against that reference (TRITON_INTERPRET=1 on CPU machines)."""
import itertools

import pytest
import torch
import torch.nn.functional as F
from torch._inductor.utils import run_and_get_code

from segquant_compile.lowering import conv as C
from segquant_compile.lowering import quantize as Q
from segquant_compile.lowering import shape_generic
from segquant_compile.lowering.ops import column_sums, gemm_reference
from segquant_compile.lowering.site_lowering import ConvGeometry

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# the geometries diffusers UNets use: 3x3 same, 3x3 stride 2 (Downsample2D), 1x1 (shortcut, proj)
GEOMETRIES = [((3, 3), (1, 1), (1, 1)), ((3, 3), (2, 2), (1, 1)), ((1, 1), (1, 1), (0, 0)),
              ((2, 2), (2, 2), (0, 0))]


def problem(channels, geometry, schemes, seed=0, n=12, b=2, side=5, layout="k-major"):
    """A conv site's input and operands; its packed weight K-major as for CUDA (quantize.packed_layout)
    or "n-major" (contiguous [K, N], as on CPU)."""
    g = torch.Generator().manual_seed(seed)
    geo = ConvGeometry(sum(channels), *geometry)
    x = torch.randn(b, geo.in_channels, side, side + 1, generator=g)
    x[:, : channels[0]] *= 4            # segments with different ranges
    if 1 in schemes:
        x = F.silu(x)
    k_bounds = [c * geo.taps for c in (0, *itertools.accumulate(channels))]
    w = torch.randint(-127, 128, (geo.in_channels * geo.taps, n), generator=g, dtype=torch.int8)
    w = Q.k_major(w) if layout == "k-major" else w
    d_w = torch.rand(n, generator=g) * 0.01 + 1e-3
    bias = torch.randn(n, generator=g)
    return x, geo, k_bounds, w, d_w, bias


def test_im2col_is_unfold_in_channel_major_order():
    x = torch.randn(2, 3, 5, 6)
    for kernel, stride, padding in GEOMETRIES:
        geo = ConvGeometry(3, kernel, stride, padding)
        ref = F.unfold(x, kernel, padding=padding, stride=stride).transpose(1, 2).reshape(-1, 3 * geo.taps)
        assert torch.equal(C.im2col(x, geo), ref)
        assert torch.equal(C.im2col(x.to(memory_format=torch.channels_last), geo), ref)
        pixels = torch.tensor([0, 3, len(ref) - 1])
        assert torch.equal(C.im2col_rows(x, geo, pixels), ref[pixels])


@pytest.mark.parametrize("schemes", [(0, 0), (1, 1), (2, 2), (0, 1), (2, 1)])
@pytest.mark.parametrize("geometry", GEOMETRIES)
def test_input_pixel_steps_are_the_dynamic_steps_of_each_pixels_channels(geometry, schemes):
    """A step per input pixel and segment: quantize_dynamic with the pixel as the token. On im2col
    rows reordered tap-major (tap_major_columns, the searches' model of the site), quantize_dynamic
    per (segment, tap) group gives the same grid values at each tap (0 outside the image)."""
    x, geo, kb, *_ = problem((3, 2), geometry, schemes)
    schemes = list(schemes)
    d, dn, zp = C.input_pixel_steps(x, geo, kb, schemes)
    tokens = x.permute(0, 2, 3, 1).reshape(-1, x.shape[1])
    cb = geo.channel_bounds(kb)
    q, td, tdn, tzp = Q.quantize_dynamic(tokens, list(cb), schemes)
    flat = lambda t: t.permute(0, 2, 3, 1).reshape(-1, t.shape[1])   # noqa: E731
    assert torch.equal(flat(d), td) and torch.equal(flat(dn), tdn) and torch.equal(flat(zp), tzp)
    qx = C.quantize_channels(x, geo, kb, schemes, d, dn, zp)
    assert torch.equal(flat(qx), q)
    order, bounds = C.tap_major_columns(kb, geo.taps)
    rows = C.im2col(x, geo)[:, order]
    fine = [c for c in schemes for _ in range(geo.taps)]
    rq, rd, rdn, rzp = Q.quantize_dynamic(rows, list(bounds), fine)
    deq_rows = Q.dequantize(rq, list(bounds), fine, rd, rdn, rzp)
    deq_x = torch.cat([Q.dequantize_segment(qx[:, a:b].float(), d[:, s:s + 1], dn[:, s:s + 1], zp[:, s:s + 1], c)
                       for s, (a, b, c) in enumerate(zip(cb[:-1], cb[1:], schemes))], dim=1)
    assert torch.equal(deq_rows, C.im2col(deq_x, geo)[:, order])


@pytest.mark.parametrize("schemes", [(0, 0), (1, 1), (2, 0)])
def test_static_input_quantized_once_equals_the_rows_quantized(schemes):
    x, geo, kb, *_ = problem((3, 2), GEOMETRIES[0], schemes)
    rows = C.im2col(x, geo)
    pos = torch.stack([rows[:, a:b].amax().clamp(min=0) for a, b in zip(kb[:-1], kb[1:])])
    neg = torch.stack([(-rows[:, a:b]).amax().clamp(min=0) for a, b in zip(kb[:-1], kb[1:])]) * 0.5
    d, dn, zp = Q.static_steps(pos, neg, list(schemes))
    zp = zp if 2 in schemes else None
    q = C.quantize_channels(x, geo, kb, list(schemes), d, dn, zp)
    padded = C.im2col(q, geo, C.channel_pad(zp, kb, geo, x.shape[1], x.device))
    assert torch.equal(padded, Q.quantize_static(rows, kb, list(schemes), d, dn, zp))


def test_reference_is_the_float_conv_up_to_quantization():
    x, geo, kb, _, _, bias = problem((3, 2), GEOMETRIES[1], (0, 0), n=6)
    weight = torch.randn(6, 5, 3, 3)
    d_w = Q.weight_steps(weight.reshape(6, -1))
    w = Q.quantize_weight(weight.reshape(6, -1), d_w)
    d, dn, zp = C.input_pixel_steps(x, geo, kb, [0, 0])
    got = C.conv2d_reference(C.quantize_channels(x, geo, kb, [0, 0], d, dn, zp), d, dn, w, d_w, bias, kb, [0, 0], geo,
                             torch.float32)
    ref = F.conv2d(x, weight, bias, geo.stride, geo.padding)
    assert got.shape == ref.shape and got.is_contiguous(memory_format=torch.channels_last)
    assert Q.sqnr_db(ref, got) > 35


def _launch(x, d, dn, w, d_w, bias, kb, schemes, geo, out, zp=None, colsum=None):
    from segquant_compile.lowering.triton_conv import launch
    dev = lambda t: t.to(DEVICE) if isinstance(t, torch.Tensor) else t  # noqa: E731
    return launch(dev(x), dev(d), dev(dn), dev(w), dev(d_w), dev(bias), kb, schemes, geo, out, zp=dev(zp),
                  colsum=dev(colsum)).cpu()


CASES = [(g, s, cl, pixel, ch) for g in GEOMETRIES for s in [(0, 0), (1, 1), (2, 2), (1, 0)]
         for cl in (False, True) for pixel in (False, True) for ch in ((5, 3), (40, 27))][::5]


@pytest.mark.parametrize("geometry,schemes,channels_last,pixel,channels", CASES)
def test_triton_conv_matches_the_reference(geometry, schemes, channels_last, pixel, channels):
    """Both kernels against the reference: static steps (the input quantized once, padding reads
    the zero point) and steps per input pixel (a tile per tap and channel chunk: 40 channels are
    two chunks of the interpreter's 32)."""
    x, geo, kb, w, d_w, bias = problem(channels, geometry, schemes, seed=hash((geometry, schemes)) % 1000)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    schemes = list(schemes)
    if pixel:
        d, dn, zp = C.input_pixel_steps(x, geo, kb, schemes)
        colsum = None
    else:
        rows = C.im2col(x, geo)
        pos = torch.stack([rows[:, a:b].amax().clamp(min=0) for a, b in zip(kb[:-1], kb[1:])])
        neg = torch.stack([(-rows[:, a:b]).amax().clamp(min=0) for a, b in zip(kb[:-1], kb[1:])])
        d, dn, zp = Q.static_steps(pos, neg, schemes)
        colsum = column_sums(w, kb) if 2 in schemes else None
    q = C.quantize_channels(x, geo, kb, schemes, d, dn, zp)
    zp = zp if 2 in schemes else None
    ref = C.conv2d_reference(q, d, dn, w, d_w, bias, kb, schemes, geo, torch.float32, zp, colsum)
    got = _launch(q, d, dn, w, d_w, bias, kb, schemes, geo, torch.float32, zp, colsum)
    assert got.shape == ref.shape and got.stride() == ref.stride()
    assert torch.equal(got, ref)       # same int32 sums, same fp32 epilogue order: bit exact


@pytest.mark.parametrize("schemes", [(0, 0), (1, 1), (2, 2)])
def test_nonfinite_input_pixels_give_nonfinite_outputs(schemes):
    """Steps per input pixel: a NaN or Inf input pixel has a non-finite step, so every output pixel
    whose receptive field holds it is non-finite, in the kernel, the reference and both CPU forms
    (int8 has no NaN: the step carries it); the others stay finite."""
    x, geo, kb, w, d_w, bias = problem((3, 2), GEOMETRIES[0], schemes, side=6)
    x[0, 1, 2, 3], x[1, 4, 0, 0] = float("nan"), float("inf")
    schemes = list(schemes)
    d, dn, zp = C.input_pixel_steps(x, geo, kb, schemes)
    q = C.quantize_channels(x, geo, kb, schemes, d, dn, zp)
    zp = zp if 2 in schemes else None
    bad = F.max_pool2d((~torch.isfinite(x)).any(dim=1, keepdim=True).float(), 3, 1, 1).bool().expand(-1, 12, -1, -1)
    outs = [C.conv2d_reference(q, d, dn, w, d_w, bias, kb, schemes, geo, torch.float32, zp),
            _launch(q, d, dn, w, d_w, bias, kb, schemes, geo, torch.float32, zp)]
    for weight, steps in ((w.contiguous(), d_w), (w.float() * d_w, None)):   # the int8 and fp32 CPU forms
        outs.append(torch.ops.segquant.conv2d_dynamic(x, weight, steps, bias, kb, schemes, geo.as_list(),
                                                      torch.float32))
    for y in outs:
        assert torch.equal(~torch.isfinite(y), bad)


def test_triton_conv_bf16_output_and_refusals():
    x, geo, kb, w, d_w, bias = problem((4,), GEOMETRIES[0], (0,))
    d, dn, zp = C.input_pixel_steps(x, geo, kb, [0])
    q = C.quantize_channels(x, geo, kb, [0], d, dn, zp)
    ref = C.conv2d_reference(q, d, dn, w, d_w, bias, kb, [0], geo, torch.float32)
    got = _launch(q, d, dn, w, d_w, bias, kb, [0], geo, torch.bfloat16)
    assert got.dtype == torch.bfloat16 and ((got.float() - ref).abs().max() / ref.abs().max()) < 8e-3
    with pytest.raises(ValueError, match="quantized"):
        _launch(x, d, dn, w, d_w, bias, kb, [0], geo, torch.float32)
    with pytest.raises(ValueError, match="per input pixel"):     # steps per output pixel: not a granularity
        _launch(q, d.view(-1, 1), dn.view(-1, 1), w, d_w, bias, kb, [0], geo, torch.float32)
    with pytest.raises(ValueError, match="do not match"):
        _launch(q[:, :3], d, dn, w, d_w, bias, kb, [0], geo, torch.float32)
    with pytest.raises(ValueError, match="quantized"):
        C.conv2d_reference(x, d, dn, w, d_w, bias, kb, [0], geo, torch.float32)


@pytest.mark.parametrize("schemes", [(0, 0), (1, 1), (2, 2), (1, 0, 2)])
@pytest.mark.parametrize("geometry", GEOMETRIES[:3])
def test_direct_cpu_path_is_the_im2col_path_bit_for_bit(geometry, schemes):
    """Static int8 input on CPU: fp32 convolutions in channel chunks give the exact integer sums
    (K per segment up to 1290 here: more than one chunk of 1024 taps), also at the extremes."""
    channels = (143, 2, 5)[: len(schemes)]
    x, geo, kb, w, d_w, bias = problem(channels, geometry, schemes, n=7, side=4)
    g = torch.Generator().manual_seed(1)
    q = torch.randint(-128, 128, x.shape, generator=g, dtype=torch.int8)
    q[0, :, 0, 0], w[:, 0] = -128, 127                       # largest products
    schemes = list(schemes)
    s = len(schemes)
    d = torch.rand(1, s, generator=g) * 0.01 + 1e-3
    dn = torch.where(torch.tensor([c == 1 for c in schemes]), torch.rand(1, s, generator=g) * 0.01 + 1e-3, d)
    zp = torch.where(torch.tensor([c == 2 for c in schemes]), torch.randint(-20, 20, (1, s), generator=g).float(),
                     torch.zeros(1, s)) if 2 in schemes else None
    colsum = column_sums(w, kb) if 2 in schemes else None
    args = (q, d, dn, w, d_w, bias, kb, schemes, geo, torch.float32, zp, colsum)
    direct = C.conv2d_reference(*args, direct=True)
    assert torch.equal(direct, C.conv2d_reference(*args, direct=False))
    assert direct.stride() == C.conv2d_reference(*args, direct=False).stride()


@pytest.mark.parametrize("compiled", [False, True])
@pytest.mark.parametrize("schemes", [(0, 0), (1, 1), (2, 2), (1, 2)])
@pytest.mark.parametrize("geometry", GEOMETRIES[:3])
def test_cpu_dynamic_conv_op_is_the_conv2d_op_bit_for_bit(geometry, schemes, compiled):
    """A dynamic conv site on the CPU is one conv2d_dynamic op. In the "int8" CPU form it is bit
    for bit the conv2d op on the input quantized with input_pixel_steps' steps, called eagerly and
    from a compiled graph (the site is one op node there). The packed weight gives the form
    (fp32: the next test); the zero points' column sums are made per pixel inside the op."""
    x, geo, kb, w, d_w, bias = problem((3, 2), geometry, schemes, layout="n-major")
    d, dn, zp = C.input_pixel_steps(x, geo, kb, list(schemes))
    q = C.quantize_channels(x, geo, kb, list(schemes), d, dn, zp)
    zp = zp if 2 in schemes else None
    op = torch.ops.segquant.conv2d(q, d, dn, w, d_w, bias, kb, list(schemes), geo.as_list(), x.dtype, zp)
    site = lambda x: C.quantized_conv2d(x, w, d_w, bias, None, None, None, None, None, kb,   # noqa: E731
                                        list(schemes), conv=geo)
    assert torch.equal(site(x), op) and site(x).stride() == op.stride()
    if compiled:
        torch._dynamo.reset()
        code = run_and_get_code(torch.compile(site, fullgraph=True), x)
        assert torch.equal(code[0], op)
        assert "".join(code[1]).count("torch.ops.segquant.conv2d_dynamic.default(") == 1


@pytest.mark.parametrize("compiled", [False, True])
@pytest.mark.parametrize("schemes", [(0, 0), (1, 1), (2, 2), (1, 2)])
@pytest.mark.parametrize("geometry", GEOMETRIES[:3])
def test_cpu_dynamic_conv_fp32_form_is_the_same_grid_summed_in_fp32(geometry, schemes, compiled, monkeypatch):
    """In the "fp32" CPU form (no fast int8 dot) the op convolves the input's grid values times
    their steps (quantized and dequantized in one pass, by one shape-generic compiled kernel for
    large inputs, eagerly for small ones) with the dequantized weight: the conv2d op's output up
    to fp32 summation order, in the same channels-last memory. The dequantized weight gives the
    form."""
    monkeypatch.setattr(shape_generic, "COMPILED_MIN", 0 if compiled else 1 << 40)
    x, geo, kb, w, d_w, bias = problem((3, 2), geometry, schemes, layout="n-major")
    d, dn, zp = C.input_pixel_steps(x, geo, kb, list(schemes))
    q = C.quantize_channels(x, geo, kb, list(schemes), d, dn, zp)
    zp = zp if 2 in schemes else None
    op = torch.ops.segquant.conv2d(q, d, dn, w, d_w, bias, kb, list(schemes), geo.as_list(), x.dtype, zp)
    got = torch.ops.segquant.conv2d_dynamic(x, w.float() * d_w, None, bias, kb, list(schemes), geo.as_list(),
                                            x.dtype)
    assert got.shape == op.shape and got.stride() == op.stride()
    torch.testing.assert_close(got, op, rtol=1e-5, atol=1e-5 * float(op.abs().max()))
    assert not torch.equal(got, torch.zeros_like(got))
