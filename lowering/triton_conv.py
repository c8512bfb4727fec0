"""Triton implicit-GEMM conv2d for the segquant conv op: the GEMM kernel's contract with the A
tile gathered from the int8 NCHW (or channels-last: any strides) input instead of loaded from rows.

    row m = output pixel (b, ho, wo); column k = (c, i, j) channel-major: a K segment is a
    channel range
    segquant_conv_kernel (static steps [1, S]): the per-segment loop, DualScale's two passes,
        zero-point correction and flushes are the GEMM kernel's (lowering/triton_gemm.py);
        out-of-image taps read the segment's zero point (the quantized 0)
    segquant_conv_pixel_kernel (steps per input pixel [B, S, H, W]): K tiles ordered (tap,
        segment, channel chunk), so a tile's rows each read one input pixel; each (tap, segment)
        group's integer sum is flushed with the step of the pixel its tap reads (0 outside the
        image); weight rows c * taps + tap are read strided (the packed [K, N] as it is);
        asymmetric: the group's weight column sums from the tiles it loads (no colsum input)
    epilogue: * d_w + bias, cast, stored at (b, n, ho, wo) through the output's strides
The math is exactly lowering/conv.py's reference; see tests/test_conv_kernel.py.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import autotune
from .gemm_configs import prune
from .ops import column_sums
from .quantize import packed_layout
from .site_lowering import ConvGeometry
from .triton_k_loop import (dual_pass, flush, int_tensor, k_tile, k_tiles, pass_operand, segment_end, segment_steps, tile,
                            tile_schemes)


@triton.jit
def output_pixels(rm, HO, WO, SH: tl.constexpr, SW: tl.constexpr, PH: tl.constexpr, PW: tl.constexpr):
    """The output pixel (b, ho, wo) of each row, and the top-left input tap of its receptive field."""
    b = rm // (HO * WO)
    pix = rm % (HO * WO)
    ho = pix // WO
    wo = pix % WO
    return b, ho, wo, ho * SH - PH, wo * SW - PW


@triton.jit
def store_pixels(acc, C, DW, BIAS, rn, m_ok, n_ok, b, ho, wo, stride_cb, stride_cn, stride_ch, stride_cw,
                 HAS_BIAS: tl.constexpr):
    """The epilogue: * d_w + bias, cast, stored at (b, n, ho, wo) through the output's strides."""
    acc = acc * tl.load(DW + rn, mask=n_ok, other=0.0)[None, :]
    if HAS_BIAS:
        acc = acc + tl.load(BIAS + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    c_ptr = C + (b * stride_cb + ho * stride_ch + wo * stride_cw)[:, None] + rn[None, :] * stride_cn
    tl.store(c_ptr, acc.to(C.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


@triton.jit
def segquant_conv_kernel(
        X, W, C, DPOS, DNEG, DW, BIAS, TK, TU, TS, SCHEMES, ZP, COLSUM,
        M, N, T, H, WD, HO, WO,
        stride_xb, stride_xc, stride_xh, stride_xw, stride_wk, stride_wn,
        stride_cb, stride_cn, stride_ch, stride_cw, stride_ds,
        KH: tl.constexpr, KW: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr, PH: tl.constexpr,
        PW: tl.constexpr, SEGMENTED: tl.constexpr, K_ALIGN: tl.constexpr, EVEN_K: tl.constexpr, DUAL: tl.constexpr,
        HAS_BIAS: tl.constexpr, ASYM: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    rm, rn = tile(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    rk = tl.arange(0, BLOCK_K)
    m_ok = rm < M
    n_ok = rn < N
    b, ho, wo, top, left = output_pixels(rm, HO, WO, SH, SW, PH, PW)
    x_row = X + b * stride_xb
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_i = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    d_pos, d_neg, scheme, zp = segment_steps(SCHEMES, DPOS, DNEG, ZP, 0, rm, m_ok, 0, stride_ds, BLOCK_M, ASYM)
    # one loop over K tiles, segment after segment (the GEMM kernel's, for the pipeliner; DualScale
    # in its two passes over K)
    for t in range(0, T * (2 if DUAL else 1)):
        tt, neg = dual_pass(t, T, DUAL)
        kk, k_ok, s, last = k_tile(TK, TU, tt, rk, K_ALIGN, EVEN_K, BLOCK_K)
        c = kk // (KH * KW)
        tap = kk % (KH * KW)
        hh = top[:, None] + (tap // KW)[None, :]
        ww = left[:, None] + (tap % KW)[None, :]
        inside = (hh >= 0) & (hh < H) & (ww >= 0) & (ww < WD)
        a_mask = m_ok[:, None] & k_ok[None, :]
        ptr = x_row[:, None] + c[None, :] * stride_xc + hh * stride_xh + ww * stride_xw
        a = tl.load(ptr, mask=a_mask & inside, other=0)
        if ASYM:   # out-of-image taps read the segment's quantized 0
            zp = tl.load(ZP + s * stride_ds + rm * 0, mask=m_ok, other=0.0)
            a = tl.where(inside, a, tl.where(a_mask, zp[:, None], 0.0).to(tl.int8))
        if DUAL:   # the tile's scheme by tile index (the GEMM kernel's reason)
            a = pass_operand(a, tl.load(TS + tt), neg, DUAL, False)
        w = tl.load(W + kk[:, None] * stride_wk + rn[None, :] * stride_wn,
                    mask=k_ok[:, None] & n_ok[None, :], other=0)
        acc_i += tl.dot(a, w, out_dtype=tl.int32)
        if SEGMENTED or DUAL:
            if last:
                acc, acc_i = segment_end(acc, acc_i, SCHEMES, DPOS, DNEG, ZP, COLSUM + s * N + rn, s, neg, rm, m_ok, n_ok,
                                         0, stride_ds, BLOCK_M, DUAL, ASYM)
    if not SEGMENTED and not DUAL:
        acc = acc + flush(acc_i, d_pos, zp, COLSUM + rn, n_ok, scheme, ASYM)
    store_pixels(acc, C, DW, BIAS, rn, m_ok, n_ok, b, ho, wo, stride_cb, stride_cn, stride_ch, stride_cw, HAS_BIAS)


@triton.jit
def segquant_conv_pixel_kernel(
        X, W, C, DPOS, DNEG, DW, BIAS, TILES, ZP,
        M, N, T, H, WD, HO, WO,
        stride_xb, stride_xc, stride_xh, stride_xw, stride_wk, stride_wn,
        stride_cb, stride_cn, stride_ch, stride_cw, stride_db, stride_ds, stride_dh, stride_dw,
        KH: tl.constexpr, KW: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr, PH: tl.constexpr,
        PW: tl.constexpr, C_ALIGN: tl.constexpr, EVEN_C: tl.constexpr, CHUNKS: tl.constexpr, DUAL: tl.constexpr,
        HAS_BIAS: tl.constexpr, ASYM: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    rm, rn = tile(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    rk = tl.arange(0, BLOCK_K)
    m_ok = rm < M
    n_ok = rn < N
    b, ho, wo, top, left = output_pixels(rm, HO, WO, SH, SW, PH, PW)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_i = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    colsum = tl.zeros((BLOCK_N,), dtype=tl.int32)     # ASYM: the group's weight column sums, from its tiles
    # tile t (pixel_tiles): channels [c0, c_end) of segment s at tap `tap`; `last`: its (tap,
    # segment) group ends here. DualScale: two passes over the tiles, as the static kernel.
    # (Tap-major over whole tiles, tile t is chunk t % CHUNKS of tap t // CHUNKS.)
    for t in range(0, T * (2 if DUAL else 1)):
        tt, neg = dual_pass(t, T, DUAL)
        s = tl.load(TILES + tt * 6 + 3)
        last = tl.load(TILES + tt * 6 + 4) != 0
        if EVEN_C:   # every segment's channels in whole tiles: the tile's channels and tap computed,
            # not loaded, so the pipeliner can run the tile loads stages ahead (as EVEN_K)
            c = (tt % CHUNKS) * BLOCK_K + rk
            if KH * KW == 1:   # a 1x1 conv: weight rows c, aligned (its tile loads as vectors)
                tap = 0
            else:
                tap = tt // CHUNKS
            k_ok = rk < BLOCK_K
        else:   # C_ALIGN: chunks start on multiples of it (channels-last rows load as vectors)
            c = tl.multiple_of(tl.load(TILES + tt * 6), C_ALIGN) + rk
            tap = tl.load(TILES + tt * 6 + 2)
            k_ok = c < tl.load(TILES + tt * 6 + 1)
        hh = top + tap // KW
        ww = left + tap % KW
        inside = m_ok & (hh >= 0) & (hh < H) & (ww >= 0) & (ww < WD)
        a = tl.load(X + (b * stride_xb + hh * stride_xh + ww * stride_xw)[:, None] + c[None, :] * stride_xc,
                    mask=inside[:, None] & k_ok[None, :], other=0)
        scheme = tl.load(TILES + tt * 6 + 5)   # by tile index, not through s (the GEMM kernel's reason)
        if DUAL:
            a = pass_operand(a, scheme, neg, DUAL, False)
        w = tl.load(W + (c * (KH * KW) + tap)[:, None] * stride_wk + rn[None, :] * stride_wn,
                    mask=k_ok[:, None] & n_ok[None, :], other=0)
        acc_i += tl.dot(a, w, out_dtype=tl.int32)
        if ASYM:
            colsum += tl.sum(w.to(tl.int32), axis=0)
        if last:   # the group's sum times the step of the pixel its tap reads (0 outside the image)
            at = b * stride_db + s * stride_ds + hh * stride_dh + ww * stride_dw
            d = tl.load(DPOS + at, mask=inside, other=0.0)
            total = acc_i
            if ASYM:   # asymmetric: the group's sum less zp * colsum, in int32 (ops.segment_part)
                zp = tl.load(ZP + at, mask=inside, other=0.0)
                total = tl.where(scheme == 2, total - zp.to(tl.int32)[:, None] * colsum[None, :], total)
                colsum = tl.zeros_like(colsum)
            if DUAL:   # the first pass: all but DualScale's negative parts; the second: those only
                d = tl.where(neg, tl.load(DNEG + at, mask=inside, other=0.0), d)
                acc = acc + tl.where(neg & (scheme != 1), 0.0, total.to(tl.float32) * d[:, None])
            else:
                acc = acc + total.to(tl.float32) * d[:, None]
            acc_i = tl.zeros_like(acc_i)
    store_pixels(acc, C, DW, BIAS, rn, m_ok, n_ok, b, ho, wo, stride_cb, stride_cn, stride_ch, stride_cw, HAS_BIAS)


def pixel_tiles(k_bounds, schemes, taps: int, block_k: int, device) -> tuple[torch.Tensor, int, int]:
    """The pixel kernel's tile table, [T, 6] int32: per tile its first channel, its segment's
    channel end, tap, segment, whether its (tap, segment) group ends with it, and the segment's
    scheme; tap-major, the reference's group order (conv.pixel_sums). Also the tile count and the
    largest power of two up to 16 dividing every channel bound (C_ALIGN)."""
    cb = [k // taps for k in k_bounds]
    rows = []
    for tap in range(taps):
        for s, (c0, c1) in enumerate(zip(cb[:-1], cb[1:])):
            rows += [(c, c1, tap, s, int(c + block_k >= c1), schemes[s]) for c in range(c0, c1, block_k)]
    align = 16
    while any(c % align for c in cb):
        align //= 2
    return int_tensor([v for r in rows for v in r], device), len(rows), align


def variant(geometry: ConvGeometry, schemes, pixel: bool) -> str:
    return geometry.variant("int8", 1 in schemes, 2 in schemes, pixel)


def prune_bounds(k_bounds, geometry: ConvGeometry, pixel: bool) -> tuple[int, ...]:
    """The bounds the pruner aligns K tiles to: K segment bounds (static), or the segments' channel
    bounds (per pixel: a tile is a channel chunk of one tap)."""
    return tuple(geometry.channel_bounds(k_bounds)) if pixel else tuple(k_bounds)


def launch(x, d_pos, d_neg, w, d_w, bias, k_bounds, schemes, geometry: ConvGeometry, out_dtype, zp=None,
           colsum=None, config=None) -> torch.Tensor:
    """y [B, N, Ho, Wo] (channels-last memory) = segquant conv of x [B, C, H, W] (int8, quantized
    with static steps [1, S] or steps per input pixel [B, S, H, W]) and packed w [K, N]."""
    B, C, H, Wd = x.shape
    K, N = w.shape
    S = len(schemes)
    if C != geometry.in_channels or K != C * geometry.taps:
        raise ValueError(f"segquant conv: input {tuple(x.shape)} and weight {tuple(w.shape)} do not match {geometry}")
    if x.dtype != torch.int8:
        raise ValueError(f"segquant conv: the input must be quantized (int8), got {x.dtype}")
    pixel = d_pos.dim() == 4
    steps = (B, S, H, Wd) if pixel else (1, S)
    if tuple(d_pos.shape) != steps or d_neg.shape != d_pos.shape or (zp is not None and zp.shape != d_pos.shape):
        raise ValueError(f"segquant conv: activation steps must be [1, S] (static) or [B, S, H, W] (per input "
                         f"pixel), here {steps}; got {tuple(d_pos.shape)}")
    asym = 2 in schemes
    if asym and (zp is None or (colsum is None and not pixel)):
        raise ValueError("segquant conv: asymmetric segments need zero points (static: and column sums)")
    Ho, Wo = geometry.output_size(H, Wd)
    M = B * Ho * Wo
    c = torch.empty((B, N, Ho, Wo), dtype=out_dtype, device=x.device).to(memory_format=torch.channels_last)
    if M == 0 or N == 0:
        return c
    name = variant(geometry, schemes, pixel)
    if config is None:
        config = autotune.choose(autotune.key(M, N, K, name, x.device),
                                 prune(M, N, K, name, x.device, prune_bounds(k_bounds, geometry, pixel)))
    grid = (triton.cdiv(M, config["BLOCK_M"]) * triton.cdiv(N, config["BLOCK_N"]),)
    (kh, kw), (sh, sw), (ph, pw) = geometry.kernel, geometry.stride, geometry.padding
    flags = int_tensor(schemes, x.device)
    common = dict(KH=kh, KW=kw, SH=sh, SW=sw, PH=ph, PW=pw, DUAL=1 in schemes, HAS_BIAS=bias is not None, ASYM=asym,
                  BLOCK_M=config["BLOCK_M"], BLOCK_N=config["BLOCK_N"], BLOCK_K=config["BLOCK_K"],
                  GROUP_M=config.get("GROUP_M", 8), num_warps=config.get("num_warps", 4),
                  num_stages=config.get("num_stages", 3))
    zp_arg = zp if zp is not None else d_pos
    colsum_arg = colsum if colsum is not None else flags
    bias_arg = bias if bias is not None else d_w
    if pixel:
        tiles, t, align = pixel_tiles(k_bounds, schemes, geometry.taps, config["BLOCK_K"], x.device)
        even = all(cb % config["BLOCK_K"] == 0 for cb in geometry.channel_bounds(k_bounds))
        segquant_conv_pixel_kernel[grid](
            x, w, c, d_pos, d_neg, d_w, bias_arg, tiles, zp_arg,
            M, N, t, H, Wd, Ho, Wo,
            *x.stride(), w.stride(0), w.stride(1), *c.stride(), *d_pos.stride(), C_ALIGN=align, EVEN_C=even,
            CHUNKS=C // config["BLOCK_K"], **common)
        return c
    tk, tu, tiles, align, even = k_tiles(k_bounds, config["BLOCK_K"], x.device)
    ts = tile_schemes(k_bounds, schemes, config["BLOCK_K"], x.device) if 1 in schemes else flags
    segquant_conv_kernel[grid](
        x, w, c, d_pos, d_neg, d_w, bias_arg, tk, tu, ts, flags, zp_arg, colsum_arg,
        M, N, tiles, H, Wd, Ho, Wo,
        *x.stride(), w.stride(0), w.stride(1), *c.stride(), d_pos.stride(1),
        SEGMENTED=len(k_bounds) > 2, K_ALIGN=align, EVEN_K=even, **common)
    return c


def tune(m: int, n: int, geometry: ConvGeometry, name: str, device, bench=None) -> tuple[dict, list]:
    """Tune the conv kernel for one shape (M output pixels as a square batch-1 image) and variant."""
    device = torch.device(device)
    pixel, dual, asym = name.endswith("-pixel"), "-dual" in name, "-asym" in name
    codes = tuple(c for c, on in ((1, dual), (2, asym)) if on) or (0,)
    cin, k = geometry.in_channels, geometry.in_channels * geometry.taps
    bounds = (0, k) if len(codes) == 1 or cin < 2 else (0, (cin // 2) * geometry.taps, k)
    codes = codes[: len(bounds) - 1]
    side = max(1, round(m ** 0.5))
    h = (side - 1) * geometry.stride[0] + geometry.kernel[0] - 2 * geometry.padding[0]
    g = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randint(-127, 128, (1, cin, h, h), generator=g, dtype=torch.int8).to(device)
    if pixel:   # as the dynamic path writes its quantized input (conv._quantized)
        x = x.contiguous(memory_format=torch.channels_last)
    w = packed_layout(torch.randint(-127, 128, (k, n), generator=g, dtype=torch.int8).to(device), "int8")
    d = torch.full((1, len(codes), h, h) if pixel else (1, len(codes)), 0.01, device=device)
    zp = torch.zeros_like(d) if asym else None
    colsum = column_sums(w, bounds) if asym and not pixel else None

    def run(cfg):
        launch(x, d, d, w, torch.full((n,), 0.01, device=device), None, bounds, codes, geometry, torch.bfloat16,
               zp=zp, colsum=colsum, config=cfg)
    return autotune.tune(autotune.key(m, n, k, name, device),
                         prune(m, n, k, name, device, prune_bounds(bounds, geometry, pixel)), run, bench)


def ensure(m: int, n: int, geometry: ConvGeometry, name: str, device) -> dict:
    """A tuned config for this shape (at compile time, never inside a CUDA graph capture)."""
    k = geometry.in_channels * geometry.taps
    return autotune.cached(autotune.key(m, n, k, name, device)) or tune(m, n, geometry, name, device)[0]
