"""Triton implicit-GEMM conv2d for the segquant conv op: the GEMM kernel's contract with the A
tile gathered from the NCHW (or channels-last: any strides) input instead of loaded from rows.

    row m = output pixel (b, ho, wo); column k = (c, i, j) channel-major: a K segment is a
    channel range, so the per-segment loop, DualScale's two passes, zero-point correction and
    flushes are the GEMM kernel's (lowering/triton_gemm.py)
    int8 input:   quantized with static steps outside; out-of-image taps read the segment's
                  zero point (the quantized 0)
    PROLOGUE:     float input, quantized in registers with per-pixel ([M, S]) or static steps
                  (symmetric, DualScale or asymmetric per segment), out-of-image taps read 0.0
    epilogue:     * d_w + bias, cast, stored at (b, n, ho, wo) through the output's strides
The math is exactly lowering/conv.py's reference; see tests/test_conv_kernel.py.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import autotune
from .quantize import packed_layout
from .site_lowering import ConvGeometry, variant_name
from .gemm_configs import prune
from .triton_k_loop import (_rint, dual_pass, flush, int_tensor, k_tile, k_tiles, pass_operand, segment_end, segment_steps,
                            tile, tile_schemes)


@triton.jit
def segquant_conv_kernel(
        X, W, C, DPOS, DNEG, DW, BIAS, TK, TU, TS, SCHEMES, ZP, COLSUM,
        M, N, T, H, WD, HO, WO,
        stride_xb, stride_xc, stride_xh, stride_xw, stride_wk, stride_wn,
        stride_cb, stride_cn, stride_ch, stride_cw, stride_dm, stride_ds,
        KH: tl.constexpr, KW: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr, PH: tl.constexpr,
        PW: tl.constexpr, SEGMENTED: tl.constexpr, K_ALIGN: tl.constexpr, EVEN_K: tl.constexpr, DUAL: tl.constexpr, PROLOGUE: tl.constexpr, HAS_BIAS: tl.constexpr, ASYM: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    rm, rn = tile(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    rk = tl.arange(0, BLOCK_K)
    m_ok = rm < M
    n_ok = rn < N
    # the output pixel of each row, and the top-left input tap of its receptive field
    b = rm // (HO * WO)
    pix = rm % (HO * WO)
    ho = pix // WO
    wo = pix % WO
    top = ho * SH - PH
    left = wo * SW - PW
    x_row = X + b * stride_xb
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_i = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    d_pos, d_neg, scheme, zp = segment_steps(SCHEMES, DPOS, DNEG, ZP, 0, rm, m_ok, stride_dm, stride_ds, BLOCK_M, ASYM)
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
        if PROLOGUE:
            if SEGMENTED:   # the tile's segment's steps (one segment: loaded once, before the loop)
                d_pos, d_neg, scheme, zp = segment_steps(SCHEMES, DPOS, DNEG, ZP, s, rm, m_ok, stride_dm, stride_ds,
                                                         BLOCK_M, ASYM)
            x = tl.load(ptr, mask=a_mask & inside, other=0.0).to(tl.float32)
            # one quotient per element, with the step and clamps of its scheme (and DualScale side)
            # (not x >= 0: a NaN takes DualScale's negative side, as a where(x >= 0, ...) does)
            dual = scheme == 1
            positive = x >= 0
            negative = dual & ~positive
            q = _rint(x / tl.where(negative, d_neg[:, None], d_pos[:, None]))
            if ASYM:
                q = tl.where(scheme == 2, q + zp[:, None], q)
            low = tl.where(scheme == 0, -127.0, tl.where(dual & positive, 0.0, -128.0))
            q = tl.minimum(tl.maximum(q, low), tl.where(negative, 0.0, 127.0))
            a = tl.where(a_mask, q, 0.0).to(tl.int8)
        else:
            a = tl.load(ptr, mask=a_mask & inside, other=0)
            if ASYM:   # out-of-image taps read the segment's quantized 0
                zp = tl.load(ZP + rm * stride_dm + s * stride_ds, mask=m_ok, other=0.0)
                a = tl.where(inside, a, tl.where(a_mask, zp[:, None], 0.0).to(tl.int8))
        if DUAL:   # the tile's scheme by tile index (the GEMM kernel's reason)
            a = pass_operand(a, tl.load(TS + tt), neg, DUAL, False)
        w = tl.load(W + kk[:, None] * stride_wk + rn[None, :] * stride_wn,
                    mask=k_ok[:, None] & n_ok[None, :], other=0)
        acc_i += tl.dot(a, w, out_dtype=tl.int32)
        if SEGMENTED or DUAL:
            if last:
                acc, acc_i = segment_end(acc, acc_i, SCHEMES, DPOS, DNEG, ZP, COLSUM + s * N + rn, s, neg, rm, m_ok, n_ok,
                                         stride_dm, stride_ds, BLOCK_M, DUAL, ASYM)
    if not SEGMENTED and not DUAL:
        acc = acc + flush(acc_i, d_pos, zp, COLSUM + rn, n_ok, scheme, ASYM)
    acc = acc * tl.load(DW + rn, mask=n_ok, other=0.0)[None, :]
    if HAS_BIAS:
        acc = acc + tl.load(BIAS + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    c_ptr = C + (b * stride_cb + ho * stride_ch + wo * stride_cw)[:, None] + rn[None, :] * stride_cn
    tl.store(c_ptr, acc.to(C.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


def variant(geometry: ConvGeometry, schemes, prologue: bool) -> str:
    return geometry.tag() + "-" + variant_name("int8", 1 in schemes, prologue, 2 in schemes)


def launch(x, d_pos, d_neg, w, d_w, bias, k_bounds, schemes, geometry: ConvGeometry, out_dtype, zp=None,
           colsum=None, config=None) -> torch.Tensor:
    """y [B, N, Ho, Wo] (channels-last memory) = segquant conv of x [B, C, H, W] (int8 quantized
    with static steps, or float with per-pixel or static steps) and packed w [K, N]."""
    B, C, H, Wd = x.shape
    K, N = w.shape
    if C != geometry.in_channels or K != C * geometry.taps:
        raise ValueError(f"segquant conv: input {tuple(x.shape)} and weight {tuple(w.shape)} do not match {geometry}")
    prologue = x.is_floating_point()
    asym = 2 in schemes
    if asym and (zp is None or colsum is None):
        raise ValueError("segquant conv: asymmetric segments need zero points and column sums")
    Ho, Wo = geometry.output_size(H, Wd)
    M = B * Ho * Wo
    if d_pos.shape[0] not in (1, M) or d_neg.shape != d_pos.shape or (zp is not None and zp.shape != d_pos.shape):
        raise ValueError(f"segquant conv: activation steps must be [1 or M, S], got {tuple(d_pos.shape)}")
    if not prologue and d_pos.shape[0] != 1:
        raise ValueError("segquant conv: a quantized (int8) input takes static steps [1, S]")
    c = torch.empty((B, N, Ho, Wo), dtype=out_dtype, device=x.device).to(memory_format=torch.channels_last)
    if M == 0 or N == 0:
        return c
    name = variant(geometry, schemes, prologue)
    if config is None:
        config = autotune.choose(autotune.key(M, N, K, name, x.device), prune(M, N, K, name, x.device, k_bounds))
    stride_dm = d_pos.stride(0) if d_pos.shape[0] == M and M > 1 else 0
    grid = (triton.cdiv(M, config["BLOCK_M"]) * triton.cdiv(N, config["BLOCK_N"]),)
    (kh, kw), (sh, sw), (ph, pw) = geometry.kernel, geometry.stride, geometry.padding
    tk, tu, tiles, align, even = k_tiles(k_bounds, config["BLOCK_K"], x.device)
    flags = int_tensor(schemes, x.device)
    ts = tile_schemes(k_bounds, schemes, config["BLOCK_K"], x.device) if 1 in schemes else flags
    segquant_conv_kernel[grid](
        x, w, c, d_pos, d_neg, d_w, bias if bias is not None else d_w, tk, tu, ts, flags,
        zp if zp is not None else d_pos, colsum if colsum is not None else tk,
        M, N, tiles, H, Wd, Ho, Wo,
        *x.stride(), w.stride(0), w.stride(1), *c.stride(), stride_dm, d_pos.stride(1),
        KH=kh, KW=kw, SH=sh, SW=sw, PH=ph, PW=pw, SEGMENTED=len(k_bounds) > 2, K_ALIGN=align, EVEN_K=even,
        DUAL=1 in schemes, PROLOGUE=prologue,
        HAS_BIAS=bias is not None, ASYM=asym,
        BLOCK_M=config["BLOCK_M"], BLOCK_N=config["BLOCK_N"], BLOCK_K=config["BLOCK_K"],
        GROUP_M=config.get("GROUP_M", 8), num_warps=config.get("num_warps", 4), num_stages=config.get("num_stages", 3))
    return c


def tune(m: int, n: int, geometry: ConvGeometry, name: str, device, bench=None) -> tuple[dict, list]:
    """Tune the conv kernel for one shape (M output pixels as a square batch-1 image) and variant."""
    device = torch.device(device)
    prologue, dual, asym = "-prologue" in name, "-dual" in name, "-asym" in name
    codes = tuple(c for c, on in ((1, dual), (2, asym)) if on) or (0,)
    cin, k = geometry.in_channels, geometry.in_channels * geometry.taps
    bounds = (0, k) if len(codes) == 1 or cin < 2 else (0, (cin // 2) * geometry.taps, k)
    codes = codes[: len(bounds) - 1]
    side = max(1, round(m ** 0.5))
    h = (side - 1) * geometry.stride[0] + geometry.kernel[0] - 2 * geometry.padding[0]
    g = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(1, cin, h, h, generator=g).to(device)
    if not prologue:
        x = torch.randint(-127, 128, x.shape, generator=g, dtype=torch.int8).to(device)
    w = packed_layout(torch.randint(-127, 128, (k, n), generator=g, dtype=torch.int8).to(device), "int8")
    d = torch.full((1, len(codes)), 0.01, device=device)
    zp = torch.zeros_like(d) if asym else None
    colsum = torch.stack([w[a:b].sum(dim=0, dtype=torch.int32) for a, b in zip(bounds[:-1], bounds[1:])]) \
        if asym else None

    def run(cfg):
        launch(x, d, d, w, torch.full((n,), 0.01, device=device), None, bounds, codes, geometry, torch.bfloat16,
               zp=zp, colsum=colsum, config=cfg)
    return autotune.tune(autotune.key(m, n, k, name, device), prune(m, n, k, name, device, bounds), run, bench)


def ensure(m: int, n: int, geometry: ConvGeometry, name: str, device) -> dict:
    """A tuned config for this shape (at compile time, never inside a CUDA graph capture)."""
    k = geometry.in_channels * geometry.taps
    return autotune.cached(autotune.key(m, n, k, name, device)) or tune(m, n, geometry, name, device)[0]
