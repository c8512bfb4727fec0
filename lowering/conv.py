"""The segquant conv2d custom op (an implicit GEMM over the linear GEMM's contract) and one
quantized conv2d site as traceable torch code.

The GEMM view (lowering/site_lowering.py, ConvGeometry): row m = output pixel (b, ho, wo),
column k = (c, i, j) channel-major, so K segment s is the input channels
[k_s / taps, k_{s+1} / taps). The op takes the input quantized once per element (int8, fused
into its producer) with one of two step granularities:
    static  [1, S]:        a step per segment; per segment exactly lowering/ops.py's math on the
                           im2col rows, y[m] = sum_s flush_s(q[m, K_s] @ W[K_s]) * d_w + bias;
                           padding reads the segment's zero point (the quantized 0)
    dynamic [B, S, H, W]:  a step per input pixel and segment (the range of that pixel's channels
                           in the segment); the integer sums are per (tap, segment) group, each
                           times the step of the input pixel the tap reads:
                           y[m] = sum_{tap, s} flush(q_tap[m, C_s] @ W[C_s, tap]) * d[pixel] * d_w
                           + bias; padding contributes 0 (no pixel, no step)
A step per input pixel, unlike one per output pixel (a max-pool of its receptive field's
ranges), quantizes each input value once: no im2col of float values, and on the CPU the site is
the dequantized input convolved in fp32 (bench/conv_granularity.py measured the fidelity).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from . import quantize as Q
from . import shape_generic
from .ops import EXACT_FP32_K, LIB, _int_mm, combine_segments, cpu_int8_gemm, gemm_reference
from .site_lowering import ConvGeometry


def im2col(x: Tensor, geometry: ConvGeometry, pad: Tensor | None = None) -> Tensor:
    """[B, C, H, W] (any dtype, any memory format) -> [B * Ho * Wo, C * kh * kw] in (c, i, j)
    order; `pad` [C]: the value of each channel outside the image (default 0)."""
    (kh, kw), (sh, sw), (ph, pw) = geometry.kernel, geometry.stride, geometry.padding
    b, c, h, w = x.shape
    ho, wo = geometry.output_size(h, w)
    if pad is not None and (ph or pw):
        xp = pad_channels(x, pad, ph, pw)
    else:
        xp = F.pad(x, (pw, pw, ph, ph))
    taps = [xp[:, :, i:i + sh * (ho - 1) + 1:sh, j:j + sw * (wo - 1) + 1:sw] for i in range(kh) for j in range(kw)]
    cols = torch.stack(taps, dim=2)                           # [B, C, taps, Ho, Wo]
    return cols.permute(0, 3, 4, 1, 2).reshape(b * ho * wo, c * kh * kw)


def conv_weight(w: Tensor, geometry: ConvGeometry) -> Tensor:
    """A packed or dequantized [K, N] weight as F.conv2d's [N, C, kh, kw] (a view)."""
    return w.t().reshape(w.shape[1], -1, *geometry.kernel)


def channel_pad(zp: Tensor | None, k_bounds, geometry: ConvGeometry, channels: int, device) -> Tensor | None:
    """Per input channel, the quantized value of 0 (its segment's zero point); None if all 0."""
    if zp is None:
        return None
    cb = geometry.channel_bounds(k_bounds)
    return torch.cat([zp[0, s].expand(c1 - c0) for s, (c0, c1) in enumerate(zip(cb[:-1], cb[1:]))]).to(device)


@torch.library.custom_op(f"{LIB}::conv2d", mutates_args=())
def conv2d(x: Tensor, d_pos: Tensor, d_neg: Tensor, w: Tensor, d_w: Tensor, bias: Tensor | None,
           k_bounds: list[int], schemes: list[int], geometry: list[int], out_dtype: torch.dtype,
           zp: Tensor | None = None, colsum: Tensor | None = None) -> Tensor:
    """x [B, C, H, W] int8, quantized with d_pos/d_neg/zp [1, S] (static) or [B, S, H, W] (a step
    per input pixel and segment); w [K, N] packed; colsum (asymmetric segments, static steps)
    [S, N] (per input pixel the op sums the weight's (tap, segment) groups itself:
    pixel_column_sums); geometry ConvGeometry.as_list(); returns [B, N, Ho, Wo] (channels-last
    memory: the GEMM's [M, N])."""
    return conv2d_reference(x, d_pos, d_neg, w, d_w, bias, k_bounds, schemes, geometry, out_dtype, zp, colsum)


@conv2d.register_fake
def _(x, d_pos, d_neg, w, d_w, bias, k_bounds, schemes, geometry, out_dtype, zp=None, colsum=None):
    g = ConvGeometry.from_list(geometry)
    torch._check(x.dim() == 4 and x.shape[1] == g.in_channels, lambda: f"segquant::conv2d: input {x.shape}")
    torch._check(w.shape[0] == g.in_channels * g.taps, lambda: f"segquant::conv2d: K mismatch, w {w.shape}")
    ho, wo = g.output_size(x.shape[2], x.shape[3])
    return x.new_empty((x.shape[0], w.shape[1], ho, wo), dtype=out_dtype).to(memory_format=torch.channels_last)


@conv2d.register_kernel("cuda")
def _(x, d_pos, d_neg, w, d_w, bias, k_bounds, schemes, geometry, out_dtype, zp=None, colsum=None):
    from .triton_conv import launch
    return launch(x, d_pos, d_neg, w, d_w, bias, k_bounds, schemes, ConvGeometry.from_list(geometry), out_dtype,
                  zp=zp, colsum=colsum)


def conv2d_reference(x, d_pos, d_neg, w, d_w, bias, k_bounds, schemes, geometry, out_dtype, zp=None, colsum=None,
                     direct: bool | None = None):
    """CPU implementation, exact integer sums with the fp32 epilogue of ops.combine_segments.
    Static steps: im2col, then the linear GEMM's reference per segment; on a CPU without int8
    dot instructions `direct_sums` instead: the same integers from fp32 convolutions, no im2col
    (`direct`: force either). Steps per input pixel: pixel_sums, a group per (tap, segment)."""
    g = ConvGeometry.from_list(geometry) if not isinstance(geometry, ConvGeometry) else geometry
    if x.is_floating_point():
        raise ValueError("segquant::conv2d takes its input quantized (int8): quantize_channels")
    b, _, h, wd = x.shape
    ho, wo = g.output_size(h, wd)
    if d_pos.dim() == 4:
        groups = [(tap, s) for tap in range(g.taps) for s in range(len(schemes))]
        steps = [tap_steps(t, g, groups) if t is not None else None for t in (d_pos, d_neg, zp)]
        colsum = pixel_column_sums(w, k_bounds, g.taps) if zp is not None else None
        y = combine_segments(pixel_sums(x, w, k_bounds, schemes, g, groups), steps[0], steps[1], d_w, bias,
                             [schemes[s] for _, s in groups], steps[2], colsum)
    else:
        if direct is None:
            direct = x.device.type == "cpu" and cpu_int8_gemm() == "fp32"
        if direct:
            y = combine_segments(direct_sums(x, w, k_bounds, schemes, g, zp), d_pos, d_neg, d_w, bias, schemes, zp,
                                 colsum)
        else:
            q = im2col(x, g, channel_pad(zp, k_bounds, g, x.shape[1], x.device))
            y = gemm_reference(q, d_pos, d_neg, w, d_w, bias, k_bounds, schemes, torch.float32, zp, colsum)
    return y.to(out_dtype).view(b, ho, wo, -1).permute(0, 3, 1, 2)


def direct_sums(q: Tensor, w: Tensor, k_bounds, schemes, geometry: ConvGeometry, zp: Tensor | None):
    """Per K segment, the exact int32 sums q_rows[:, K_s] @ W[K_s] ([M, N]; DualScale: the
    positive and negative halves) from fp32 convolutions of the int8 input, in channel chunks of
    at most EXACT_FP32_K taps: every partial sum is an integer below 2**24, so fp32 is exact in
    any summation order, at float convolution speed (no im2col)."""
    taps = geometry.taps
    n = w.shape[1]
    pad = channel_pad(zp, k_bounds, geometry, q.shape[1], q.device)
    qf = q.float()
    if pad is not None and any(geometry.padding):        # asymmetric: outside the image is the zero point
        (ph, pw) = geometry.padding
        qf = pad_channels(qf, pad, ph, pw)
        padding = (0, 0)
    else:
        padding = geometry.padding
    qf = qf.contiguous(memory_format=torch.channels_last)
    weight = conv_weight(w, geometry)
    step = max(1, EXACT_FP32_K // taps)
    out = []
    for s, (k0, k1) in enumerate(zip(k_bounds[:-1], k_bounds[1:])):
        c0, c1 = k0 // taps, k1 // taps
        halves = (qf[:, c0:c1].clamp(min=0), qf[:, c0:c1].clamp(max=0)) if schemes[s] == 1 else (qf[:, c0:c1],)
        sums = []
        for half in halves:
            acc = None
            for a in range(0, c1 - c0, step):
                part = F.conv2d(half[:, a:a + step], weight[:, c0 + a:min(c1, c0 + a + step)].float()
                                .contiguous(memory_format=torch.channels_last), None, geometry.stride, padding)
                part = part.permute(0, 2, 3, 1).reshape(-1, n).to(torch.int32)
                acc = part if acc is None else acc.add_(part)
            sums.append(acc)
        out.append(tuple(sums))
    return out


def pad_channels(x: Tensor, pad: Tensor, ph: int, pw: int) -> Tensor:
    """x padded by (ph, pw) with a value per channel."""
    xp = F.pad(x, (pw, pw, ph, ph))
    inside = torch.zeros(1, 1, *xp.shape[2:], dtype=torch.bool, device=x.device)
    inside[..., ph:ph + x.shape[2], pw:pw + x.shape[3]] = True
    return torch.where(inside, xp, pad.to(xp.dtype).view(1, -1, 1, 1))


# ---------------------------------------------------------------- steps per input pixel

def tap_view(x: Tensor, geometry: ConvGeometry, tap: int) -> Tensor:
    """[B, C, Ho, Wo]: for each output pixel, the value of x at the input pixel that `tap` reads
    (0 outside the image)."""
    (kh, kw), (sh, sw), (ph, pw) = geometry.kernel, geometry.stride, geometry.padding
    ho, wo = geometry.output_size(x.shape[2], x.shape[3])
    i, j = divmod(tap, kw)
    xp = F.pad(x, (pw, pw, ph, ph))
    return xp[:, :, i:i + sh * (ho - 1) + 1:sh, j:j + sw * (wo - 1) + 1:sw]


def tap_steps(steps: Tensor, geometry: ConvGeometry, groups) -> Tensor:
    """Per-pixel steps [B, S, H, W] -> [M, G]: for each output pixel and (tap, segment) group, the
    step of the input pixel the tap reads (0 outside the image: padding contributes nothing)."""
    cols = [tap_view(steps[:, s:s + 1], geometry, tap) for tap, s in groups]
    return torch.cat(cols, dim=1).permute(0, 2, 3, 1).reshape(-1, len(groups))


def pixel_sums(q: Tensor, w: Tensor, k_bounds, schemes, geometry: ConvGeometry, groups):
    """Per (tap, segment) group, the exact int32 sums of the tap's input pixels' quantized channels
    of the segment times the weight rows (c * taps + tap) ([M, N]; DualScale: the positive and
    negative halves). Lazily: one group's sums alive at a time."""
    taps, cb = geometry.taps, geometry.channel_bounds(k_bounds)
    for tap, s in groups:
        qs = tap_view(q[:, cb[s]:cb[s + 1]], geometry, tap).permute(0, 2, 3, 1).reshape(-1, cb[s + 1] - cb[s])
        ws = group_rows(w, cb, taps, tap, s)
        yield (_int_mm(qs.clamp(min=0), ws), _int_mm(qs.clamp(max=0), ws)) if schemes[s] == 1 else (_int_mm(qs, ws),)


def pixel_column_sums(w: Tensor, k_bounds, taps: int) -> Tensor:
    """[taps * S, N] int32 column sums of a packed [K, N] int8 weight per (tap, segment) group,
    row tap * S + s (the asymmetric correction of steps per input pixel)."""
    cb = [k // taps for k in k_bounds]
    return torch.stack([group_rows(w, cb, taps, tap, s).sum(dim=0, dtype=torch.int32)
                        for tap in range(taps) for s in range(len(cb) - 1)])


def group_rows(w: Tensor, cb, taps: int, tap: int, s: int) -> Tensor:
    """The weight rows c * taps + tap of segment s's channels [cb[s], cb[s + 1]) (a view)."""
    return w[cb[s] * taps + tap:cb[s + 1] * taps:taps]


def tap_major_columns(k_bounds, taps: int) -> tuple[Tensor, tuple[int, ...]]:
    """A conv site's K columns reordered within each segment from (channel, tap) to (tap,
    channel), and the bounds of its (segment, tap) groups in that order. On im2col rows so
    reordered, quantize_dynamic with a step per row and group is quantization with a step per
    input pixel and segment (an out-of-image tap's zeros contribute 0, as in the conv)."""
    order, bounds = [], [0]
    for k0, k1 in zip(k_bounds[:-1], k_bounds[1:]):
        channels = (k1 - k0) // taps
        for tap in range(taps):
            order += range(k0 + tap, k1, taps)
            bounds.append(bounds[-1] + channels)
    return torch.tensor(order), tuple(bounds)


def input_pixel_steps(x: Tensor, geometry: ConvGeometry, k_bounds, schemes, fmt: str = "int8"):
    """Dynamic steps per input pixel and segment, [B, S, H, W] each (d, d_neg, zp): a pixel's
    channels in a segment are a token's columns (quantize.dynamic_steps over the channel dim)."""
    cb = geometry.channel_bounds(k_bounds)
    xf = x.float()
    per = [Q.dynamic_steps(xf[:, c0:c1], scheme, fmt) for c0, c1, scheme in zip(cb[:-1], cb[1:], schemes)]
    return tuple(torch.cat(t, dim=1) for t in zip(*per))


def quantize_channels(x: Tensor, geometry: ConvGeometry, k_bounds, schemes, d: Tensor, d_neg: Tensor,
                      zp: Tensor | None, fmt: str = "int8") -> Tensor:
    """x [B, C, H, W] quantized once per element with steps [1, S] (static) or [B, S, H, W] (per
    input pixel): plain ops, which Inductor fuses into the producer. With static steps the im2col
    rows of the result are quantize_static of the rows."""
    cb = geometry.channel_bounds(k_bounds)
    xf = x.float()
    parts = [Q._round(xf[:, c0:c1], *segment_steps(d, d_neg, zp, s), scheme, fmt)
             for s, (c0, c1, scheme) in enumerate(zip(cb[:-1], cb[1:], schemes))]
    return torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]


def dequantize_channels(q: Tensor, geometry: ConvGeometry, k_bounds, schemes, d: Tensor, d_neg: Tensor,
                        zp: Tensor | None) -> Tensor:
    """quantize_channels' grid values times their steps, fp32: the input the CPU's "fp32" form
    convolves."""
    cb = geometry.channel_bounds(k_bounds)
    parts = [Q.dequantize_segment(q[:, c0:c1].float(), *segment_steps(d, d_neg, zp, s), scheme)
             for s, (c0, c1, scheme) in enumerate(zip(cb[:-1], cb[1:], schemes))]
    return torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]


def segment_steps(d: Tensor, d_neg: Tensor, zp: Tensor | None, s: int) -> tuple:
    """Segment s's (d, d_neg, zp), broadcastable over its channels [B, Cs, H, W]: scalars of
    static steps [1, S], [B, 1, H, W] of steps per input pixel [B, S, H, W]."""
    pick = (lambda t: t[:, s:s + 1]) if d.dim() == 4 else (lambda t: t[0, s])   # noqa: E731
    return pick(d), pick(d_neg), pick(zp) if zp is not None else None


# ---------------------------------------------------------------- traceable site

def nonfinite_pixels(x: Tensor, geometry: ConvGeometry) -> Tensor:
    """[B, 1, Ho, Wo]: NaN where the receptive field holds NaN/Inf, else 0 (static steps: int8
    has no NaN, so a non-finite input would otherwise come out finite; steps per input pixel
    carry it themselves)."""
    bad = (x - x).float().sum(dim=1, keepdim=True)
    return F.avg_pool2d(bad, geometry.kernel, geometry.stride, geometry.padding)


def quantized_conv2d(x: Tensor, w: Tensor, d_w: Tensor, bias: Tensor | None, d_pos: Tensor | None,
                     d_neg: Tensor | None, zp: Tensor | None, smooth: Tensor | None, colsum: Tensor | None,
                     k_bounds: tuple[int, ...], schemes: tuple[int, ...], prologue: bool = False,
                     fmt: str = "int8", conv: ConvGeometry | tuple | None = None, l1: Tensor | None = None,
                     l2: Tensor | None = None) -> Tensor:
    """conv2d(x, W, b) with int8 W packed [K, N] (same arguments as quantized_linear, plus the
    geometry, or its as_list() ints). Dynamic (d_pos None): a step per input pixel and segment;
    static: steps per segment. `l1`, `l2`: the low-rank branch, as a
    conv of rank output channels and the site's kernel, then a 1x1 conv."""
    conv = conv if isinstance(conv, ConvGeometry) else ConvGeometry.from_list(conv)
    y = _quantized(x, w, d_w, bias, d_pos, d_neg, zp, smooth, colsum, k_bounds, schemes, fmt, conv)
    if l1 is None:
        return y
    rank = l1.shape[1]
    down = F.conv2d(x, l1.t().reshape(rank, conv.in_channels, *conv.kernel).to(x.dtype), None, conv.stride,
                    conv.padding)
    return y + F.conv2d(down, l2.t().reshape(-1, rank, 1, 1).to(x.dtype)).to(y.dtype)


def _quantized(x, w, d_w, bias, d_pos, d_neg, zp, smooth, colsum, k_bounds, schemes, fmt, conv: ConvGeometry):
    if fmt != "int8":
        raise ValueError(f"segquant: conv sites are lowered for int8 only, not {fmt!r}")
    k_bounds, schemes, geometry, out_dtype = list(k_bounds), list(schemes), conv.as_list(), x.dtype
    if smooth is not None:   # one divisor per input channel, repeated per tap (site_params.smoothing_factors)
        x = x / smooth[::conv.taps].view(1, -1, 1, 1)
    if d_pos is None:
        if x.device.type == "cpu":   # one op node per site: the graph's code does not grow per conv site
            return torch.ops.segquant.conv2d_dynamic(x, w, d_w, bias, k_bounds, schemes, geometry, out_dtype)
        d_pos, d_neg, zp = input_pixel_steps(x, conv, k_bounds, schemes, fmt)
        # channels-last: the kernel's tile of one tap reads each pixel's channels as one vector
        q = quantize_channels(x, conv, k_bounds, schemes, d_pos, d_neg, zp, fmt).contiguous(
            memory_format=torch.channels_last)
        zp = zp if Q.ASYMMETRIC in schemes else None
        return torch.ops.segquant.conv2d(q, d_pos, d_neg, w, d_w, bias, k_bounds, schemes, geometry, out_dtype, zp)
    q = quantize_channels(x, conv, k_bounds, schemes, d_pos, d_neg, zp, fmt)
    if w.is_floating_point():   # the CPU's "fp32" form (w: the dequantized weight)
        xq = dequantize_channels(q, conv, k_bounds, schemes, d_pos, d_neg, zp)
        y = F.conv2d(xq, conv_weight(w, conv), bias.float() if bias is not None else None, conv.stride,
                     conv.padding).to(out_dtype)
    else:
        y = torch.ops.segquant.conv2d(q, d_pos, d_neg, w, d_w, bias, k_bounds, schemes, geometry, out_dtype, zp,
                                      colsum)
    return y + nonfinite_pixels(x, conv).to(y.dtype)


# ---------------------------------------------------------------- CPU dynamic conv

def _dequantized_input(xs: Tensor, scheme: int) -> Tensor:
    """One segment's channels [B, Cs, H, W] quantized with steps per input pixel and dequantized
    in one pass (the "fp32" form's input: no int8 tensor to convert back)."""
    d, dn, z = Q.dynamic_steps(xs, scheme)
    return Q.dequantize_segment(Q._round(xs, d, dn, z, scheme).float(), d, dn, z, scheme)


@torch.library.custom_op(f"{LIB}::conv2d_dynamic", mutates_args=())
def conv2d_dynamic(x: Tensor, w: Tensor, d_w: Tensor | None, bias: Tensor | None, k_bounds: list[int],
                   schemes: list[int], geometry: list[int], out_dtype: torch.dtype) -> Tensor:
    """conv2d of a float input with dynamic steps per input pixel and segment, on the CPU, in the
    CPU's GEMM form (cpu_linear.cpu_gemm), which `w` gives: "fp32" (`w` the dequantized weight
    [K, N], d_w None: no fast int8 dot here), the input quantized and dequantized in one pass,
    then one float convolution: the same grid, fp32 summation; "int8" (`w` packed, d_w its
    steps), the conv2d op on the quantized input (exact integer sums per (tap, segment); zero
    points' column sums made per pixel inside). One op per site, so a compiled model's generated
    code does not grow with its conv sites. Returns channels-last memory, as the conv2d op."""
    g = ConvGeometry.from_list(geometry)
    if w.is_floating_point():
        cb = g.channel_bounds(k_bounds)
        xf = x.float()
        # one pass per segment (shape_generic.py): quantize and dequantize
        parts = [shape_generic.run(_dequantized_input, xf[:, c0:c1], scheme)
                 for c0, c1, scheme in zip(cb[:-1], cb[1:], schemes)]
        xq = (parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)).contiguous(memory_format=torch.channels_last)
        weight = conv_weight(w.float(), g)
        weight = weight.contiguous(memory_format=torch.channels_last)
        y = F.conv2d(xq, weight, bias.float() if bias is not None else None, g.stride, g.padding)
        return y.to(out_dtype).contiguous(memory_format=torch.channels_last)
    d, dn, zp = input_pixel_steps(x, g, k_bounds, schemes)
    q = quantize_channels(x, g, k_bounds, schemes, d, dn, zp)
    return conv2d_reference(q, d, dn, w, d_w, bias, k_bounds, schemes, g, out_dtype,
                            zp if Q.ASYMMETRIC in schemes else None)


@conv2d_dynamic.register_fake
def _(x, w, d_w, bias, k_bounds, schemes, geometry, out_dtype):
    g = ConvGeometry.from_list(geometry)
    torch._check(x.dim() == 4 and x.shape[1] == g.in_channels, lambda: f"segquant::conv2d_dynamic: input {x.shape}")
    ho, wo = g.output_size(x.shape[2], x.shape[3])
    return x.new_empty((x.shape[0], w.shape[1], ho, wo), dtype=out_dtype).to(memory_format=torch.channels_last)


# ---------------------------------------------------------------- calibration

def im2col_rows(x: Tensor, geometry: ConvGeometry, pixels: Tensor) -> Tensor:
    """The im2col rows of the output pixels `pixels` (flat indices into B * Ho * Wo) only:
    calibration samples rows without materializing the whole [M, K] matrix."""
    (kh, kw), (sh, sw), (ph, pw) = geometry.kernel, geometry.stride, geometry.padding
    ho, wo = geometry.output_size(x.shape[2], x.shape[3])
    xp = F.pad(x, (pw, pw, ph, ph))
    b, rest = pixels // (ho * wo), pixels % (ho * wo)
    top, left = (rest // wo) * sh, (rest % wo) * sw
    taps = [xp[b, :, top + i, left + j] for i in range(kh) for j in range(kw)]   # [R, C] each
    return torch.stack(taps, dim=2).reshape(len(pixels), -1)


def channel_ranges(x: Tensor, geometry: ConvGeometry) -> tuple[Tensor, Tensor]:
    """Per K column (c, i, j): the positive and negative maxima of channel c, [K] each (the
    padding zeros change no clamped maximum)."""
    xf = x.float()
    pos = xf.amax(dim=(0, 2, 3)).clamp(min=0)
    neg = (-xf).amax(dim=(0, 2, 3)).clamp(min=0)
    return pos.repeat_interleave(geometry.taps), neg.repeat_interleave(geometry.taps)
