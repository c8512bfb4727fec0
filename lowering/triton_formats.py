"""Triton kernels of the 4-bit and weight-only formats (the int8 / fp8 kernel is triton_gemm.py).

    w4a8:         int8 A [M, K] x int4 W (two K rows per byte) -> int32 per K group -> fp32 flush
                  with the group's segment steps (asymmetric by the zp * colsum correction:
                  triton_k_loop.flush) times the group's weight steps; DualScale in the GEMM
                  kernel's two passes over K with one integer accumulator (positive parts and
                  the other segments' groups, then the DualScale groups' negative parts)
    weight-only:  float A x int8 (per channel) or int4 (per group) W, fp32 sums per group scaled
                  by the group's weight steps at its end
    epilogue:     + bias (w4a8: + lr @ L2, SVDQuant's low-rank branch, in rank chunks: HAS_LR as
                  in triton_gemm.py), cast to the output dtype
The math is lowering/ops.py's segquant::gemm_w4 and segquant::gemm_weight_only; see
tests/test_formats_kernels.py.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import autotune, low_rank
from .quantize import segment_groups
from .site_lowering import variant_name
from .gemm_configs import INTERPRET, prune
from .triton_k_loop import (branch_args, dual_pass, flush, int_tensor, k_tile, k_tiles, pass_operand, segment_steps,
                            tile, tile_schemes, up_projection)


@triton.jit
def int4_rows(W, kk, rn, mask, stride_wk, stride_wn):
    """Rows kk of a packed int4 weight [ceil(K/2), N]: byte row k // 2, low nibble for even k and
    high nibble for odd k, sign-extended (per row, since groups and segments may start at odd k)."""
    b = tl.load(W + (kk // 2)[:, None] * stride_wk + rn[None, :] * stride_wn, mask=mask, other=0).to(tl.int32)
    nibble = (b >> ((kk % 2) * 4)[:, None]) & 0xF
    return (nibble - (nibble >> 3) * 16).to(tl.int8)     # 8..15 are -8..-1


@triton.jit
def w4a8_kernel(
        A, W, C, DPOS, DNEG, DW, BIAS, TK, TU, TS, GS, SCHEMES, ZP, COLSUM, LR, L2,
        M, N, T, RANK,
        stride_am, stride_ak, stride_wk, stride_wn, stride_cm, stride_cn, stride_dm, stride_ds,
        stride_dwg, stride_dwn, stride_lm, stride_lr, stride_l2r, stride_l2n,
        SEGMENTED: tl.constexpr, K_ALIGN: tl.constexpr, EVEN_K: tl.constexpr,
        DUAL: tl.constexpr, HAS_BIAS: tl.constexpr, ASYM: tl.constexpr,
        HAS_LR: tl.constexpr, RC: tl.constexpr, CHUNKS: tl.constexpr, EMULATE_BF16: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    rm, rn = tile(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    rk = tl.arange(0, BLOCK_K)
    m_ok = rm < M
    n_ok = rn < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_i = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)     # the group's exact sum
    # one loop over K tiles, weight group after group (the flush unit: groups never straddle a
    # segment); each group flushes with its segment's steps (GS) and its own weight steps.
    # DualScale: two passes over K (dual_pass), one integer accumulator alive
    for t in range(0, T * (2 if DUAL else 1)):
        tt, neg = dual_pass(t, T, DUAL)
        kk, k_ok, g, last = k_tile(TK, TU, tt, rk, K_ALIGN, EVEN_K, BLOCK_K)
        a = tl.load(A + rm[:, None] * stride_am + kk[None, :] * stride_ak,
                    mask=m_ok[:, None] & k_ok[None, :], other=0)
        if DUAL:   # the tile's scheme by tile index (the GEMM kernel's reason)
            a = pass_operand(a, tl.load(TS + tt), neg, DUAL, False)
        w = int4_rows(W, kk, rn, k_ok[:, None] & n_ok[None, :], stride_wk, stride_wn)
        acc_i += tl.dot(a, w, out_dtype=tl.int32)
        if SEGMENTED or DUAL:
            if last:
                acc, acc_i = group_end(acc, acc_i, DPOS, DNEG, DW, GS, SCHEMES, ZP, COLSUM, g, neg, rm, rn, m_ok, n_ok,
                                       N, stride_dm, stride_ds, stride_dwg, stride_dwn, BLOCK_M, DUAL, ASYM)
    if not SEGMENTED and not DUAL:   # one group: its flush after the loop
        acc, acc_i = group_end(acc, acc_i, DPOS, DNEG, DW, GS, SCHEMES, ZP, COLSUM, 0, False, rm, rn, m_ok, n_ok,
                               N, stride_dm, stride_ds, stride_dwg, stride_dwn, BLOCK_M, False, ASYM)
    if HAS_BIAS:
        acc = acc + tl.load(BIAS + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    if HAS_LR:
        acc = up_projection(acc, LR, L2, rm, rn, m_ok, n_ok, RANK, stride_lm, stride_lr, stride_l2r, stride_l2n,
                            RC, CHUNKS, EMULATE_BF16)
    tl.store(C + rm[:, None] * stride_cm + rn[None, :] * stride_cn, acc.to(C.dtype.element_ty),
             mask=m_ok[:, None] & n_ok[None, :])


@triton.jit
def group_end(acc, acc_i, DPOS, DNEG, DW, GS, SCHEMES, ZP, COLSUM, g, neg, rm, rn, m_ok, n_ok, N, stride_dm, stride_ds,
              stride_dwg, stride_dwn, BLOCK_M: tl.constexpr, DUAL: tl.constexpr, ASYM: tl.constexpr):
    """The end of weight group g (DUAL: of its pass `neg`): its integer sum flushed with its
    segment's steps as triton_k_loop.segment_end flushes a segment (DualScale's first pass the
    positive part with d_pos, the second the negative part with d_neg and nothing of the other
    segments), times the group's weight steps, into `acc`; the sum restarted."""
    s = tl.load(GS + g)
    d_pos, d_neg, scheme, zp = segment_steps(SCHEMES, DPOS, DNEG, ZP, s, rm, m_ok, stride_dm, stride_ds, BLOCK_M, ASYM)
    d_w = tl.load(DW + g * stride_dwg + rn * stride_dwn, mask=n_ok, other=0.0)[None, :]
    if DUAL:
        part = flush(acc_i, tl.where(neg, d_neg, d_pos), zp, COLSUM + g * N + rn, n_ok, tl.where(neg, 1, scheme), ASYM)
        acc = acc + tl.where(neg & (scheme != 1), 0.0, part * d_w)
    else:
        acc = acc + flush(acc_i, d_pos, zp, COLSUM + g * N + rn, n_ok, scheme, ASYM) * d_w
    return acc, tl.zeros_like(acc_i)


@triton.jit
def weight_only_kernel(
        A, W, C, DW, BIAS, TK, TU,
        M, N, T,
        stride_am, stride_ak, stride_wk, stride_wn, stride_cm, stride_cn, stride_dwg, stride_dwn,
        SEGMENTED: tl.constexpr, K_ALIGN: tl.constexpr, EVEN_K: tl.constexpr,
        INT4: tl.constexpr, HAS_BIAS: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    rm, rn = tile(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    rk = tl.arange(0, BLOCK_K)
    m_ok = rm < M
    n_ok = rn < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    part = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for t in range(0, T):     # one loop over K tiles, weight group after group
        kk, k_ok, g, last = k_tile(TK, TU, t, rk, K_ALIGN, EVEN_K, BLOCK_K)
        a = tl.load(A + rm[:, None] * stride_am + kk[None, :] * stride_ak,
                    mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        w_mask = k_ok[:, None] & n_ok[None, :]
        if INT4:
            w = int4_rows(W, kk, rn, w_mask, stride_wk, stride_wn)
        else:
            w = tl.load(W + kk[:, None] * stride_wk + rn[None, :] * stride_wn, mask=w_mask, other=0)
        # the grid values are exact in A's dtype (16-bit A: tensor-core dot; converted through
        # fp32, so no int -> bf16 conversion is needed), the steps come once per group after
        # the dot; fp32 A takes exact fp32 products, not tf32
        part = tl.dot(a, w.to(tl.float32).to(a.dtype), part, input_precision="ieee", out_dtype=tl.float32)
        if SEGMENTED:
            if last:
                acc = acc + part * tl.load(DW + g * stride_dwg + rn * stride_dwn, mask=n_ok, other=0.0)[None, :]
                part = tl.zeros_like(part)
    if not SEGMENTED:
        acc = acc + part * tl.load(DW + rn * stride_dwn, mask=n_ok, other=0.0)[None, :]
    if HAS_BIAS:
        acc = acc + tl.load(BIAS + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(C + rm[:, None] * stride_cm + rn[None, :] * stride_cn, acc.to(C.dtype.element_ty),
             mask=m_ok[:, None] & n_ok[None, :])


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError("segquant: " + message)


def _groups(g_bounds, k: int) -> int:
    _require(len(g_bounds) >= 2 and g_bounds[0] == 0 and g_bounds[-1] == k
             and all(a < b for a, b in zip(g_bounds, g_bounds[1:])),
             f"group bounds {list(g_bounds)} must increase strictly from 0 to K = {k}")
    return len(g_bounds) - 1


def _config(config, m, n, k, variant, device, g_bounds) -> dict:
    return config or autotune.choose(autotune.key(m, n, k, variant, device), prune(m, n, k, variant, device, g_bounds))


def launch_w4(q, d_pos, d_neg, w4, d_w, bias, k_bounds, g_bounds, schemes, out_dtype, zp=None, colsum=None,
              config=None, lr=None, l2=None) -> torch.Tensor:
    """C = segquant::gemm_w4 of int8 q [M, K] and packed int4 w4 [ceil(K/2), N]; with the low-rank
    branch lr [M, r] (the down-projection x @ L1) and l2 [r, N]."""
    _require(q.dim() == 2 and q.dtype == torch.int8,
             f"w4a8 activations must be 2-D int8, got {q.dtype} {tuple(q.shape)}")
    M, K = q.shape
    _require(w4.dim() == 2 and w4.dtype == torch.int8 and w4.shape[0] == (K + 1) // 2,
             f"packed int4 weight must be int8 [ceil(K/2) = {(K + 1) // 2}, N], got {w4.dtype} {tuple(w4.shape)}")
    N = w4.shape[1]
    G = _groups(g_bounds, K)
    groups = segment_groups(k_bounds, g_bounds)
    S = len(k_bounds) - 1
    _require(len(schemes) == S, f"{len(schemes)} schemes for {S} K segments")
    _require(tuple(d_w.shape) == (G, N), f"int4 weight steps must be [G = {G}, N = {N}], got {tuple(d_w.shape)}")
    _require(d_pos.shape[0] in (1, M) and d_pos.shape[1] == S and d_neg.shape == d_pos.shape
             and (zp is None or zp.shape == d_pos.shape), f"activation steps must be [1 or M, S], got {tuple(d_pos.shape)}")
    asym = 2 in schemes
    _require(not asym or (zp is not None and colsum is not None and tuple(colsum.shape) == (G, N)),
             "asymmetric segments need zero points and column sums [G, N]")
    _require(bias is None or tuple(bias.shape) == (N,), f"bias must be [N = {N}]")
    low_rank.check_operands(M, N, K, lr, l2)
    c = torch.empty((M, N), dtype=out_dtype, device=q.device)
    if M == 0 or N == 0:
        return c
    dual = 1 in schemes
    cfg = _config(config, M, N, K, variant_name("w4a8", dual, False, asym, l2 is not None), q.device, g_bounds)
    br = branch_args(lr, l2, interpret=INTERPRET)
    stride_dm = d_pos.stride(0) if d_pos.shape[0] == M and M > 1 else 0
    grid = (triton.cdiv(M, cfg["BLOCK_M"]) * triton.cdiv(N, cfg["BLOCK_N"]),)
    tk, tu, tiles, align, even = k_tiles(g_bounds, cfg["BLOCK_K"], q.device)
    # the segment of each weight group, and DualScale's scheme of each K tile (by group)
    segment = [s for s in range(S) for _ in range(groups[s], groups[s + 1])]
    gs = int_tensor(segment, q.device)
    flags = int_tensor(schemes, q.device)
    ts = tile_schemes(g_bounds, [schemes[s] for s in segment], cfg["BLOCK_K"], q.device) if dual else flags
    w4a8_kernel[grid](
        q, w4, c, d_pos, d_neg, d_w, bias if bias is not None else d_w, tk, tu, ts, gs, flags,
        zp if zp is not None else d_pos, colsum.contiguous() if colsum is not None else tk,
        lr if lr is not None else d_w, l2 if l2 is not None else d_w,
        M, N, tiles, br["rank"],
        q.stride(0), q.stride(1), w4.stride(0), w4.stride(1), c.stride(0), c.stride(1), stride_dm, d_pos.stride(1),
        d_w.stride(0), d_w.stride(1), *br["strides"][:4],
        SEGMENTED=G > 1, K_ALIGN=align, EVEN_K=even, DUAL=dual, HAS_BIAS=bias is not None, ASYM=asym,
        HAS_LR=lr is not None, RC=br["RC"], CHUNKS=br["CHUNKS"], EMULATE_BF16=br["EMULATE_BF16"],
        BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"], GROUP_M=cfg.get("GROUP_M", 8),
        num_warps=cfg.get("num_warps", 4), num_stages=cfg.get("num_stages", 3),
        # no mul + add -> fma contraction: the flushes round like the reference's separate ops
        # (bit exact); the dots are integer, so this costs a few epilogue instructions only
        enable_fp_fusion=False)
    return c


def launch_weight_only(x, w, d_w, bias, g_bounds, bits, out_dtype, config=None) -> torch.Tensor:
    """C = segquant::gemm_weight_only of float x [M, K] and int8 (bits 8) or packed int4 (bits 4) w."""
    _require(x.dim() == 2 and x.dtype in (torch.float32, torch.bfloat16, torch.float16),
             f"weight-only activations must be 2-D float32/bfloat16/float16, got {x.dtype} {tuple(x.shape)}")
    _require(bits in (8, 4), f"weight-only bits must be 8 or 4, got {bits}")
    M, K = x.shape
    rows = K if bits == 8 else (K + 1) // 2
    _require(w.dim() == 2 and w.dtype == torch.int8 and w.shape[0] == rows,
             f"{bits}-bit weight must be int8 [{rows}, N] for K = {K}, got {w.dtype} {tuple(w.shape)}")
    N = w.shape[1]
    if bits == 8:   # one step per output channel: one group over all of K
        _require(tuple(d_w.shape) == (N,), f"int8 weight steps must be [N = {N}], got {tuple(d_w.shape)}")
        g_bounds, stride_dwg, stride_dwn = (0, K), 0, d_w.stride(0)
    else:
        G = _groups(g_bounds, K)
        _require(tuple(d_w.shape) == (G, N), f"int4 weight steps must be [G = {G}, N = {N}], got {tuple(d_w.shape)}")
        stride_dwg, stride_dwn = d_w.stride()
    _require(bias is None or tuple(bias.shape) == (N,), f"bias must be [N = {N}]")
    c = torch.empty((M, N), dtype=out_dtype, device=x.device)
    if M == 0 or N == 0:
        return c
    cfg = _config(config, M, N, K, f"int{bits}-weight-only", x.device, g_bounds)
    grid = (triton.cdiv(M, cfg["BLOCK_M"]) * triton.cdiv(N, cfg["BLOCK_N"]),)
    tk, tu, tiles, align, even = k_tiles(g_bounds, cfg["BLOCK_K"], x.device)
    weight_only_kernel[grid](
        x, w, c, d_w, bias if bias is not None else d_w, tk, tu,
        M, N, tiles,
        x.stride(0), x.stride(1), w.stride(0), w.stride(1), c.stride(0), c.stride(1), stride_dwg, stride_dwn,
        SEGMENTED=len(g_bounds) > 2, K_ALIGN=align, EVEN_K=even, INT4=bits == 4, HAS_BIAS=bias is not None,
        BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"], GROUP_M=cfg.get("GROUP_M", 8),
        num_warps=cfg.get("num_warps", 4), num_stages=cfg.get("num_stages", 3))
    return c
