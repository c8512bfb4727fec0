"""The segquant conv2d custom op (an implicit GEMM over the linear GEMM's contract) and one
quantized conv2d site as traceable torch code.

The GEMM view (lowering/site_lowering.py, ConvGeometry): row m = output pixel (b, ho, wo),
column k = (c, i, j) channel-major, so K segment s is the input channels
[k_s / taps, k_{s+1} / taps). Per segment, exactly lowering/ops.py's math on the im2col rows:
    y[m] = sum_s flush_s(q[m, K_s] @ W[K_s]) * d_w + bias
Activation steps are per output pixel and segment ([M, S], dynamic: the range of the pixel's
receptive field) or per segment ([1, S], static). The op takes the input either already
quantized (int8, static steps: quantized once per input pixel, fused into its producer) or in
float (quantized per im2col row with the given steps, in the kernel's prologue). Padding is the
value 0: a quantized input pads with its segment's zero point.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from . import quantize as Q
from . import shape_generic
from .cpu_linear import cpu_gemm
from .ops import EXACT_FP32_K, LIB, combine_segments, cpu_int8_gemm, gemm_reference
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
    """x [B, C, H, W] int8 (quantized with static steps d_pos/d_neg/zp [1, S]) or float (quantized
    here per im2col row with d_pos/d_neg/zp [M or 1, S]); w [K, N] packed; geometry
    ConvGeometry.as_list(); returns [B, N, Ho, Wo] (channels-last memory: the GEMM's [M, N])."""
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
    """CPU implementation: im2col, then the linear GEMM's reference (exact int32 per segment).
    An int8 input (static steps) on a CPU without int8 dot instructions takes `direct_sums`
    instead: the same integers from fp32 convolutions, no im2col (`direct`: force either)."""
    g = ConvGeometry.from_list(geometry) if not isinstance(geometry, ConvGeometry) else geometry
    b, _, h, wd = x.shape
    ho, wo = g.output_size(h, wd)
    if direct is None:
        direct = not x.is_floating_point() and x.device.type == "cpu" and cpu_int8_gemm() == "fp32"
    if direct:
        y = combine_segments(direct_sums(x, w, k_bounds, schemes, g, zp), d_pos, d_neg, d_w, bias, schemes, zp, colsum)
        return y.to(out_dtype).view(b, ho, wo, -1).permute(0, 3, 1, 2)
    if x.is_floating_point():
        q = Q.quantize_static(im2col(x.float(), g), list(k_bounds), list(schemes), d_pos, d_neg, zp)
    else:
        q = im2col(x, g, channel_pad(zp, k_bounds, g, x.shape[1], x.device))
    y = gemm_reference(q, d_pos, d_neg, w, d_w, bias, k_bounds, schemes, out_dtype, zp, colsum)
    return y.view(b, ho, wo, -1).permute(0, 3, 1, 2)


def direct_sums(q: Tensor, w: Tensor, k_bounds, schemes, geometry: ConvGeometry, zp: Tensor | None):
    """Per K segment, the exact int32 sums q_rows[:, K_s] @ W[K_s] ([M, N]; DualScale: the
    positive and negative halves) from fp32 convolutions of the int8 input, in channel chunks of
    at most EXACT_FP32_K taps: every partial sum is an integer below 2**24, so fp32 is exact in
    any summation order, at float convolution speed (no im2col)."""
    taps, (kh, kw) = geometry.taps, geometry.kernel
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
    weight = w.t().reshape(n, -1, kh, kw)                  # packed [K, N] -> [N, C, kh, kw] (a view)
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


# ---------------------------------------------------------------- traceable site

def pixel_steps(x: Tensor, geometry: ConvGeometry, k_bounds, schemes, fmt: str = "int8"):
    """Dynamic steps per output pixel and segment, [M, S] each (d, d_neg, zp): the range of each
    pixel's receptive field, i.e. of its im2col row, computed as a max-pool of per-pixel channel
    ranges (padding: the pool's -inf never wins over a real pixel, and the rows' zeros change no
    clamped range). The same numbers quantize_dynamic gives on the im2col rows."""
    pos_lim, neg_lim = Q.LIMITS[fmt]
    cb = geometry.channel_bounds(k_bounds)
    pool = lambda t: F.max_pool2d(t, geometry.kernel, geometry.stride, geometry.padding)  # noqa: E731
    steps, negs, zps = [], [], []
    xf = x.float()
    for (c0, c1), scheme in zip(zip(cb[:-1], cb[1:]), schemes):
        xs = xf[:, c0:c1]
        z = None
        if scheme == Q.DUALSCALE:
            d = (pool(xs.amax(dim=1, keepdim=True)).clamp(min=0) / pos_lim).clamp(min=Q.EPS)
            dn = (pool((-xs).amax(dim=1, keepdim=True)).clamp(min=0) / neg_lim).clamp(min=Q.EPS)
        elif scheme == Q.ASYMMETRIC:
            hi = pool(xs.amax(dim=1, keepdim=True)).clamp(min=0)
            lo = pool((-xs).amax(dim=1, keepdim=True)).clamp(min=0)
            d, z = Q.asymmetric_step(hi, lo)
            dn = d
        else:
            d = (pool(xs.abs().amax(dim=1, keepdim=True)) / pos_lim).clamp(min=Q.EPS)
            dn = d
        steps.append(d)
        negs.append(dn)
        zps.append(z if z is not None else torch.zeros_like(d))
    flat = lambda ts: torch.cat(ts, dim=1).permute(0, 2, 3, 1).reshape(-1, len(ts))  # noqa: E731
    return flat(steps), flat(negs), flat(zps)


def quantize_channels(x: Tensor, geometry: ConvGeometry, k_bounds, schemes, d: Tensor, d_neg: Tensor,
                      zp: Tensor | None, fmt: str = "int8") -> Tensor:
    """Static steps [1, S]: quantize an NCHW input once per element (plain ops: Inductor fuses
    them into the producer); the im2col rows of the result are quantize_static of the rows."""
    cb = geometry.channel_bounds(k_bounds)
    xf = x.float()
    parts = [Q._round(xf[:, c0:c1], d[0, s], d_neg[0, s], zp[0, s] if zp is not None else None, scheme, fmt)
             for s, ((c0, c1), scheme) in enumerate(zip(zip(cb[:-1], cb[1:]), schemes))]
    return torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]


def nonfinite_pixels(x: Tensor, geometry: ConvGeometry) -> Tensor:
    """[B, 1, Ho, Wo]: NaN where the receptive field holds NaN/Inf, else 0 (static steps: int8
    has no NaN, so a non-finite input would otherwise come out finite)."""
    bad = (x - x).float().sum(dim=1, keepdim=True)
    return F.avg_pool2d(bad, geometry.kernel, geometry.stride, geometry.padding)


def quantized_conv2d(x: Tensor, w: Tensor, d_w: Tensor, bias: Tensor | None, d_pos: Tensor | None,
                     d_neg: Tensor | None, zp: Tensor | None, smooth: Tensor | None, colsum: Tensor | None,
                     k_bounds: tuple[int, ...], schemes: tuple[int, ...], prologue: bool = False,
                     fmt: str = "int8", conv: ConvGeometry | tuple | None = None, l1: Tensor | None = None,
                     l2: Tensor | None = None) -> Tensor:
    """conv2d(x, W, b) with int8 W packed [K, N] (same arguments as quantized_linear, plus the
    geometry, or its as_list() ints). Dynamic (d_pos None): steps per output pixel; static: the
    input quantized once. `l1`, `l2`: the low-rank branch, as a conv of rank output channels and
    the site's kernel, then a 1x1 conv."""
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
            return torch.ops.segquant.conv2d_dynamic(x, w, d_w, bias, k_bounds, schemes, geometry, out_dtype, colsum)
        d_pos, d_neg, zp = pixel_steps(x, conv, k_bounds, schemes, fmt)
        zp = zp if Q.ASYMMETRIC in schemes else None
        return torch.ops.segquant.conv2d(x, d_pos, d_neg, w, d_w, bias, k_bounds, schemes, geometry, out_dtype, zp,
                                         colsum)
    q = quantize_channels(x, conv, k_bounds, schemes, d_pos, d_neg, zp, fmt)
    y = torch.ops.segquant.conv2d(q, d_pos, d_neg, w, d_w, bias, k_bounds, schemes, geometry, out_dtype, zp, colsum)
    return y + nonfinite_pixels(x, conv).to(y.dtype)


# ---------------------------------------------------------------- CPU dynamic conv

def quantize_columns(cols: Tensor, d: Tensor, d_neg: Tensor, zp: Tensor, scheme: int) -> Tensor:
    """F.unfold's columns [B, K, L] of one K segment -> its int8 im2col rows [B * L, K], each
    row with its own steps [B * L, 1] (quantize_static's rounding)."""
    b, k, l = cols.shape
    per_row = lambda t: t.view(b, l, 1)   # noqa: E731
    q = Q._round(cols.transpose(1, 2), per_row(d), per_row(d_neg), per_row(zp), scheme)
    return q.contiguous().view(b * l, k)


def dequantized_columns(cols: Tensor, d: Tensor, d_neg: Tensor, zp: Tensor, scheme: int) -> Tensor:
    """quantize_columns' grid values times their steps: the fp32 rows [B * L, K] the "fp32" GEMM
    form reads (one pass: no int8 rows to convert back)."""
    b, k, l = cols.shape
    per_row = lambda t: t.view(b, l, 1)   # noqa: E731
    q = Q._round(cols.transpose(1, 2), per_row(d), per_row(d_neg), per_row(zp), scheme)
    rows = Q.dequantize_segment(q.float(), per_row(d), per_row(d_neg), per_row(zp), scheme)
    return rows.contiguous().view(b * l, k)


def dynamic_rows(x: Tensor, k_bounds, schemes, g: ConvGeometry, form: str = "int8"
                 ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """A float input's im2col rows [M, K] quantized with steps per output pixel and segment
    [M, S] (d, d_neg, zp): pixel_steps, then quantize_static on im2col's rows, segment by segment.
    The rows as the GEMM `form` reads them: "int8" the grid values, "fp32" those dequantized."""
    d, dn, zp = pixel_steps(x, g, k_bounds, schemes)
    xf = x.float()
    cb = g.channel_bounds(k_bounds)
    kernel = dequantized_columns if form == "fp32" else quantize_columns
    parts = []
    for s, ((c0, c1), scheme) in enumerate(zip(zip(cb[:-1], cb[1:]), schemes)):
        cols = F.unfold(xf[:, c0:c1], g.kernel, padding=g.padding, stride=g.stride)   # im2col's values
        # one pass from the unfolded fp32 columns to the rows (shape_generic.py)
        parts.append(shape_generic.run(kernel, cols, d[:, s:s + 1], dn[:, s:s + 1], zp[:, s:s + 1], scheme))
    return (parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)), d, dn, zp


@torch.library.custom_op(f"{LIB}::conv2d_dynamic", mutates_args=())
def conv2d_dynamic(x: Tensor, w: Tensor, d_w: Tensor, bias: Tensor | None, k_bounds: list[int], schemes: list[int],
                   geometry: list[int], out_dtype: torch.dtype, colsum: Tensor | None = None) -> Tensor:
    """conv2d of a float input with dynamic steps per output pixel and segment (the range of its
    receptive field), on the CPU: the quantized im2col rows, then the GEMM in the CPU's form
    (cpu_linear.cpu_gemm): "int8", the GEMM op on the grid values (exact integer sums); "fp32"
    (no fast int8 dot here), the dequantized rows times the dequantized weight in one fp32 GEMM,
    as the linear sites' fp32 form: the same grid, fp32 summation. One op per site, so a compiled
    model's generated code does not grow with its conv sites."""
    g = ConvGeometry.from_list(geometry)
    b, _, h, wd = x.shape
    ho, wo = g.output_size(h, wd)
    form = cpu_gemm()
    rows, d, dn, zp = dynamic_rows(x, k_bounds, schemes, g, form)
    if form == "fp32":
        weight = w.float() * d_w.float()
        y = (torch.addmm(bias.float(), rows, weight) if bias is not None else rows @ weight).to(out_dtype)
    else:
        zp = zp if Q.ASYMMETRIC in schemes else None
        y = torch.ops.segquant.gemm(rows, d, dn, w, d_w, bias, k_bounds, schemes, out_dtype, zp, colsum)
    return y.view(b, ho, wo, -1).permute(0, 3, 1, 2)


@conv2d_dynamic.register_fake
def _(x, w, d_w, bias, k_bounds, schemes, geometry, out_dtype, colsum=None):
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
