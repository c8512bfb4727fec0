"""Triton kernels for the segquant GEMM: one body, variants by constexpr flags.

    int8 A [M, K] x int8 W [K, N] -> int32 per K segment -> fp32 flush with the segment's steps
    DUAL:      two passes over K with one integer accumulator: the first multiplies DualScale
               segments' positive part (and the other segments whole), flushed with d_pos (the
               others' own flush); the second their negative part, flushed with d_neg. Twice the
               A and W tile loads of the site; the spills of two accumulators alive avoided
    ASYM:      asymmetric segments subtract zp * colsum(W) from the int32 sum at the flush
    FP8:       e4m3 x e4m3 with fp32 accumulation (sm89+), same epilogues
    PROLOGUE:  A is float; each tile is quantized in the kernel with static per-segment steps
    epilogue:  * d_w (per output channel) + bias, cast to the output dtype
    HAS_LR:    SVDQuant's low-rank branch, its down-projection lr = x @ L1 given [M, r]: the
               epilogue adds lr @ L2 (after the bias, before the cast) in rank chunks of RC
    LR_DOWN:   PROLOGUE with the branch: x @ L1 accumulated from the float x tiles in the K loop
               ([BLOCK_M, RC] fp32, r <= RC <= 32), rounded to x's dtype, then lr @ L2 the same way
    K loop:    one loop over K tiles that never straddle a segment (k_tiles), the integer sums
               flushed under a condition at a segment's end: the form the pipeliner takes
    W:         any strides; sites pack it K-major on CUDA (quantize.packed_layout), the layout
               codegen-check compiles, whose W tile wgmma takes through async copies
The math is exactly lowering/ops.py's reference; see tests/test_triton_gemm.py. The one K loop's
tables and helpers are in triton_k_loop.py; the configs and the pruner (which offers on each arch
what `segquant codegen-check` passed) in gemm_configs.py.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import autotune, low_rank
from .gemm_configs import CONFIGS, INTERPRET, INTERPRETER_CONFIG, MIN_DOT_K, prune  # noqa: F401  (the kernel's configs)
from .quantize import packed_layout
from .site_lowering import variant_name
from .triton_k_loop import (_rint, bf16_rne, branch_args, branch_dot, dual_pass, int_tensor, k_tile, k_tiles, pass_operand,
                            segment_end, tile, tile_schemes, up_chunk, up_projection)


@triton.jit
def segquant_gemm_kernel(
        A, W, C, DPOS, DNEG, DW, BIAS, TK, TU, TS, SCHEMES, SMOOTH, ZP, COLSUM, DPOSK, DNEGK, LOWK, LR, L2, L1,
        M, N, T, RANK,
        stride_am, stride_ak, stride_wk, stride_wn, stride_cm, stride_cn, stride_dm, stride_ds,
        stride_lm, stride_lr, stride_l2r, stride_l2n, stride_l1k, stride_l1r,
        SEGMENTED: tl.constexpr, K_ALIGN: tl.constexpr, EVEN_K: tl.constexpr,
        DUAL: tl.constexpr, FP8: tl.constexpr, PROLOGUE: tl.constexpr, HAS_BIAS: tl.constexpr,
        HAS_SMOOTH: tl.constexpr, ASYM: tl.constexpr,
        HAS_LR: tl.constexpr, LR_DOWN: tl.constexpr, RC: tl.constexpr, CHUNKS: tl.constexpr, EMULATE_BF16: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    rm, rn = tile(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    rk = tl.arange(0, BLOCK_K)
    m_ok = rm < M
    n_ok = rn < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    bad = tl.zeros((BLOCK_M,), dtype=tl.float32)     # PROLOGUE: rows holding NaN/Inf come out NaN
    acc_i = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32 if FP8 else tl.int32)   # the segment's exact sum
    rr = tl.arange(0, RC)
    acc_lr = tl.zeros((BLOCK_M, RC), dtype=tl.float32)   # LR_DOWN: x @ L1, K tile after K tile
    # one loop over K tiles, segment after segment, so that the pipeliner takes it (a loop over
    # segments around the K loop is never pipelined); the integer sum flushes at a segment's end.
    # DualScale: two passes over K (dual_pass), one accumulator alive, twice the W traffic
    for t in range(0, T * (2 if DUAL else 1)):
        tt, neg = dual_pass(t, T, DUAL)
        kk, k_ok, s, last = k_tile(TK, TU, tt, rk, K_ALIGN, EVEN_K, BLOCK_K)
        a_mask = m_ok[:, None] & k_ok[None, :]
        w_mask = k_ok[:, None] & n_ok[None, :]
        if PROLOGUE:
            # static steps and lower clamps per column (the segment's, expanded by the launcher):
            # loaded like A, not through the tile's segment, so the pipeliner keeps its stages
            x = tl.load(A + rm[:, None] * stride_am + kk[None, :] * stride_ak, mask=a_mask, other=0.0)
            if LR_DOWN:   # the raw x tile (L1 holds the smoothing divisor), in the first pass only
                l1 = tl.load(L1 + kk[:, None] * stride_l1k + rr[None, :] * stride_l1r,
                             mask=k_ok[:, None] & (rr < RANK)[None, :], other=0.0).to(x.dtype)
                if DUAL:
                    acc_lr = branch_dot(tl.where(neg, tl.zeros_like(x), x), l1, acc_lr, EMULATE_BF16)
                else:
                    acc_lr = branch_dot(x, l1, acc_lr, EMULATE_BF16)
            x = x.to(tl.float32)
            if DUAL:   # counted once, in the first pass
                bad += tl.where(neg, 0.0, tl.sum(x - x, axis=1))
            else:
                bad += tl.sum(x - x, axis=1)
            if HAS_SMOOTH:
                x = x / tl.load(SMOOTH + kk, mask=k_ok, other=1.0)[None, :]
            step_pos = tl.load(DPOSK + kk, mask=k_ok, other=1.0)[None, :]
            if DUAL:
                # a plain segment of a mixed site quantizes symmetrically: its lower clamp is -127
                # each element on its own side, one quotient per element (not both sides' tiles)
                low = tl.load(LOWK + kk, mask=k_ok, other=-127).to(tl.float32)[None, :]
                step_neg = tl.load(DNEGK + kk, mask=k_ok, other=1.0)[None, :]
                positive = x >= 0
                q = _rint(x / tl.where(positive, step_pos, step_neg))
                a = tl.minimum(tl.maximum(q, tl.where(positive, 0.0, low)), tl.where(positive, 127.0, 0.0)).to(tl.int8)
            else:
                a = tl.minimum(tl.maximum(_rint(x / step_pos), -127.0), 127.0).to(tl.int8)
        elif FP8:
            a = tl.load(A + rm[:, None] * stride_am + kk[None, :] * stride_ak, mask=a_mask, other=0.0)
        else:
            a = tl.load(A + rm[:, None] * stride_am + kk[None, :] * stride_ak, mask=a_mask, other=0)
        if DUAL:
            # the tile's scheme by tile index, not through s (a load through a load costs stages);
            # the second pass multiplies a plain segment's tiles by 0 (masking their loads out
            # instead spills: the K mask is no longer constant)
            a = pass_operand(a, tl.load(TS + tt), neg, DUAL, FP8)
        if FP8:
            w = tl.load(W + kk[:, None] * stride_wk + rn[None, :] * stride_wn, mask=w_mask, other=0.0)
            acc_i += tl.dot(a, w, out_dtype=tl.float32)
        else:
            w = tl.load(W + kk[:, None] * stride_wk + rn[None, :] * stride_wn, mask=w_mask, other=0)
            acc_i += tl.dot(a, w, out_dtype=tl.int32)
        if SEGMENTED or DUAL:
            if last:
                acc, acc_i = segment_end(acc, acc_i, SCHEMES, DPOS, DNEG, ZP, COLSUM + s * N + rn, s, neg, rm, m_ok, n_ok,
                                         stride_dm, stride_ds, BLOCK_M, DUAL, ASYM)
    if not SEGMENTED and not DUAL:   # one segment: its flush after the loop, no fp32 sum alive inside it
        acc, acc_i = segment_end(acc, acc_i, SCHEMES, DPOS, DNEG, ZP, COLSUM + rn, 0, False, rm, m_ok, n_ok,
                                 stride_dm, stride_ds, BLOCK_M, False, ASYM)
    acc = acc * tl.load(DW + rn, mask=n_ok, other=0.0)[None, :]
    if HAS_BIAS:
        acc = acc + tl.load(BIAS + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    if HAS_LR:
        acc = up_projection(acc, LR, L2, rm, rn, m_ok, n_ok, RANK, stride_lm, stride_lr, stride_l2r, stride_l2n,
                            RC, CHUNKS, EMULATE_BF16)
    if LR_DOWN:   # one chunk: RANK <= RC
        if EMULATE_BF16:
            lr = bf16_rne(acc_lr)
        else:
            lr = acc_lr.to(A.dtype.element_ty)   # x's dtype, rounded to nearest even
        acc = up_chunk(acc, lr, L2, 0, rn, n_ok, RANK, stride_l2r, stride_l2n, RC, EMULATE_BF16)
    if PROLOGUE:
        acc = acc + bad[:, None]
    c_ptr = C + rm[:, None] * stride_cm + rn[None, :] * stride_cn
    tl.store(c_ptr, acc.to(C.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


def launch(a, d_pos, d_neg, w, d_w, bias, k_bounds, schemes, out_dtype, smooth=None, prologue=False,
           config=None, zp=None, colsum=None, lr=None, l2=None, l1=None) -> torch.Tensor:
    """C = segquant GEMM of a [M, K] (int8, e4m3, or float with prologue) and packed w [K, N];
    with the low-rank branch lr [M, r] and l2 [r, N] (prologue: l1 [K, r] instead of lr)."""
    M, K = a.shape
    N = w.shape[1]
    low_rank.check_operands(M, N, K, lr, l2, l1, prologue)
    fp8 = w.dtype == torch.float8_e4m3fn
    if prologue and (fp8 or d_pos.shape[0] != 1):
        raise ValueError("segquant: the in-kernel quantize prologue is int8 with static steps [1, S] only")
    dual_any = 1 in schemes
    asym = 2 in schemes
    if asym and (prologue or fp8 or zp is None or colsum is None):
        raise ValueError("segquant: asymmetric segments need int8 operands, zero points and column sums "
                         "(and no prologue)")
    if d_pos.shape[0] not in (1, M) or d_neg.shape != d_pos.shape or (zp is not None and zp.shape != d_pos.shape):
        raise ValueError(f"segquant: activation steps must be [1 or M, S], got {tuple(d_pos.shape)}")
    c = torch.empty((M, N), dtype=out_dtype, device=a.device)
    if M == 0 or N == 0:
        return c
    if config is None:
        variant = variant_name("fp8" if fp8 else "int8", dual_any, prologue, asym, l2 is not None)
        config = autotune.choose(autotune.key(M, N, K, variant, a.device),
                                prune(M, N, K, variant, a.device, k_bounds))
    cfg = config
    tk, tu, tiles, align, even = k_tiles(k_bounds, cfg["BLOCK_K"], a.device)
    flags = int_tensor(schemes, a.device)
    ts = tile_schemes(k_bounds, schemes, cfg["BLOCK_K"], a.device) if dual_any else flags
    dxk = dnk = lowk = flags
    if prologue:   # static steps [1, S] per column (two small gathers; the tables stay on the device)
        segment = [s for s, (k0, k1) in enumerate(zip(k_bounds[:-1], k_bounds[1:])) for _ in range(k0, k1)]
        columns = int_tensor(segment, a.device)
        dxk, dnk = d_pos[0].index_select(0, columns), d_neg[0].index_select(0, columns)
        lowk = int_tensor([-128 if schemes[s] == 1 else -127 for s in segment], a.device)
    stride_dm = d_pos.stride(0) if d_pos.shape[0] == M and M > 1 else 0
    br = branch_args(lr, l2, l1, a.dtype, INTERPRET)
    grid = (triton.cdiv(M, cfg["BLOCK_M"]) * triton.cdiv(N, cfg["BLOCK_N"]),)
    segquant_gemm_kernel[grid](
        a, w, c, d_pos, d_neg, d_w, bias if bias is not None else d_w, tk, tu, ts, flags,
        smooth if smooth is not None else d_w, zp if zp is not None else d_pos, colsum if colsum is not None else tk,
        dxk, dnk, lowk, lr if lr is not None else d_w, l2 if l2 is not None else d_w, l1 if l1 is not None else d_w,
        M, N, tiles, br["rank"],
        a.stride(0), a.stride(1), w.stride(0), w.stride(1), c.stride(0), c.stride(1), stride_dm, d_pos.stride(1),
        *br["strides"],
        SEGMENTED=len(k_bounds) > 2, K_ALIGN=align, EVEN_K=even,
        DUAL=dual_any, FP8=fp8, PROLOGUE=prologue, HAS_BIAS=bias is not None, HAS_SMOOTH=smooth is not None,
        ASYM=asym, HAS_LR=lr is not None, LR_DOWN=l1 is not None, RC=br["RC"], CHUNKS=br["CHUNKS"],
        EMULATE_BF16=br["EMULATE_BF16"],
        BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"], GROUP_M=cfg.get("GROUP_M", 8),
        num_warps=cfg.get("num_warps", 4), num_stages=cfg.get("num_stages", 3))
    return c


BRANCH_RANK = 32    # what tune and codegen-check run a `-lr` variant with (SVDQuant's rank)


def tune(m: int, n: int, k: int, variant: str, device, bench=None) -> tuple[dict, list]:
    """Tune this kernel for one GEMM shape and variant on random operands; persist the winner."""
    device = torch.device(device)
    dual, prologue, fp8 = "-dual" in variant, "-prologue" in variant, variant.startswith("fp8")
    asym, branch = "-asym" in variant, variant.endswith("-lr")
    # one segment of each scheme the variant holds (DualScale and asymmetric: two halves)
    codes = tuple(c for c, on in ((1, dual), (2, asym)) if on) or (0,)
    bounds = (0, k) if len(codes) == 1 else (0, k // 2, k)
    g = torch.Generator(device="cpu").manual_seed(0)
    if prologue:   # float activations: bf16 with the branch (16-bit dots), fp32 otherwise
        a = torch.randn(m, k, generator=g).to(device).to(torch.bfloat16 if branch else torch.float32)
    elif fp8:
        a = torch.randn(m, k, generator=g).to(device).to(torch.float8_e4m3fn)
    else:
        a = torch.randint(-127, 128, (m, k), generator=g, dtype=torch.int8).to(device)
    w = (torch.randn(k, n, generator=g).to(device).to(torch.float8_e4m3fn) if fp8 else
         torch.randint(-127, 128, (k, n), generator=g, dtype=torch.int8).to(device))
    w = packed_layout(w, "fp8" if fp8 else "int8")     # as sites pack it on this device
    d = torch.full((m, len(codes)), 0.01, device=device)
    d_w = torch.full((n,), 0.01, device=device)
    zp = torch.zeros_like(d) if asym else None
    colsum = torch.stack([w[a0:a1].sum(dim=0, dtype=torch.int32) for a0, a1 in zip(bounds[:-1], bounds[1:])]) \
        if asym else None
    lr = l1 = l2 = None
    if branch:
        l2 = torch.randn(BRANCH_RANK, n, generator=g).to(device).to(torch.bfloat16)
        if prologue:
            l1 = torch.randn(k, BRANCH_RANK, generator=g).to(device).to(torch.bfloat16)
        else:
            lr = torch.randn(m, BRANCH_RANK, generator=g).to(device).to(torch.bfloat16)

    def run(cfg):
        launch(a, d, d, w, d_w, None, bounds, codes, torch.bfloat16, prologue=prologue, config=cfg,
               zp=zp, colsum=colsum, lr=lr, l2=l2, l1=l1)
    return autotune.tune(autotune.key(m, n, k, variant, device), prune(m, n, k, variant, device, bounds), run,
                         bench)


def ensure(m: int, n: int, k: int, variant: str, device) -> dict:
    """A tuned config for this shape, tuning now if neither memory nor disk has one (at compile
    time: never inside a CUDA graph capture)."""
    return autotune.cached(autotune.key(m, n, k, variant, device)) or tune(m, n, k, variant, device)[0]
