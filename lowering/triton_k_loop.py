"""The one K loop every GEMM-family kernel runs (triton_gemm.py, triton_conv.py,
triton_formats.py): its host-side tables (k_tiles: K tiles that never straddle a segment or
weight group; tile_schemes) and the jit helpers on both sides of a tile's dot (the output tile's
rows and columns, a tile's columns and flush unit, DualScale's two passes, the flush of a
segment's integer sum into fp32 with its steps, the low-rank branch's float dots).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rint(x):
    """Round half to even, like torch.round (x - floor(x) is exact in fp32 for |x| < 2**23)."""
    r = tl.floor(x)
    f = x - r
    odd = (r - 2.0 * tl.floor(r * 0.5)) != 0.0
    up = (f > 0.5) | ((f == 0.5) & odd)
    return tl.where(up, r + 1.0, r)


@triton.jit
def tile(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """Rows and columns of this program's output tile, in grouped order (W tiles stay in L2)."""
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * num_n
    first_m = (pid // per_group) * GROUP_M
    group_m = min(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_m
    pid_n = (pid % per_group) // group_m
    return pid_m * BLOCK_M + tl.arange(0, BLOCK_M), pid_n * BLOCK_N + tl.arange(0, BLOCK_N)


@triton.jit
def segment_steps(SCHEMES, DPOS, DNEG, ZP, s, rm, m_ok, stride_dm, stride_ds, BLOCK_M: tl.constexpr,
                  ASYM: tl.constexpr):
    """K segment s: its scheme code (0 symmetric, 1 DualScale, 2 asymmetric) and the steps and
    zero point of this tile's rows (zero point 0 unless ASYM). Shared with triton_conv.py."""
    d_pos = tl.load(DPOS + rm * stride_dm + s * stride_ds, mask=m_ok, other=1.0)
    d_neg = tl.load(DNEG + rm * stride_dm + s * stride_ds, mask=m_ok, other=1.0)
    scheme = tl.load(SCHEMES + s)
    if ASYM:
        zp = tl.load(ZP + rm * stride_dm + s * stride_ds, mask=m_ok, other=0.0)
    else:
        zp = tl.zeros((BLOCK_M,), dtype=tl.float32)
    return d_pos, d_neg, scheme, zp


@triton.jit
def k_tile(TK, TU, t, rk, K_ALIGN: tl.constexpr, EVEN_K: tl.constexpr, BLOCK_K: tl.constexpr):
    """K tile t of the one K loop (k_tiles): its columns kk and which of them are inside, the
    flush unit (K segment, or w4a8 group) they belong to, and whether that unit ends with this
    tile (flush now). EVEN_K (every bound a multiple of BLOCK_K): the columns are t * BLOCK_K + rk,
    computed, not loaded, so the pipeliner can run the tile loads stages ahead."""
    unit = tl.load(TU + t)
    last = tl.load(TU + t + 1) != unit
    if EVEN_K:
        kk = t * BLOCK_K + rk
        k_ok = rk < BLOCK_K
    else:
        k = tl.multiple_of(tl.load(TK + t), K_ALIGN)
        k_end = tl.multiple_of(tl.load(TK + t + 1), K_ALIGN)
        kk = k + rk
        k_ok = kk < k_end
    return kk, k_ok, unit, last


@triton.jit
def flush(acc_i, d, zp, colsum_ptr, n_ok, scheme, ASYM: tl.constexpr):
    """One flush unit's integer sum into fp32 with step d of this tile's rows, in the reference's
    order (ops.segment_part): asymmetric segments (scheme 2) subtract zp * colsum(W) in int32
    first. segment_end passes DualScale's pass: its step, and scheme 1 in the second pass."""
    total = acc_i                                      # the unit's exact sum (int32)
    if ASYM:
        colsum = tl.load(colsum_ptr, mask=n_ok, other=0)
        total = tl.where(scheme == 2, total - zp.to(tl.int32)[:, None] * colsum[None, :], total)
    return total.to(tl.float32) * d[:, None]


@triton.jit
def dual_pass(t, T, DUAL: tl.constexpr):
    """DualScale in two passes over K, so one integer accumulator is alive: the loop runs 2T
    tiles, tile t reads K tile t mod T (still computed, for the pipeliner); neg: the second pass."""
    if DUAL:
        neg = t >= T
        return tl.where(neg, t - T, t), neg
    else:
        return t, t < 0


@triton.jit
def pass_operand(a, scheme, neg, DUAL: tl.constexpr, FP8: tl.constexpr):
    """What this pass multiplies of A tile `a` (of a segment with scheme code `scheme`): the first
    pass a DualScale segment's positive part and the whole tile of the others; the second pass a
    DualScale segment's negative part (NaN included, like the reference's split by x >= 0) and
    nothing of the others."""
    if DUAL:
        if FP8:
            positive = a.to(tl.float32) >= 0
        else:
            positive = a >= 0
        dual = scheme == 1
        keep = tl.where(neg, dual & ~positive, positive | ~dual)
        a = tl.where(keep, a, tl.zeros_like(a))
    return a


@triton.jit
def segment_end(acc, acc_i, SCHEMES, DPOS, DNEG, ZP, colsum_ptr, s, neg, rm, m_ok, n_ok, stride_dm, stride_ds,
                BLOCK_M: tl.constexpr, DUAL: tl.constexpr, ASYM: tl.constexpr):
    """The end of K segment s (DUAL: of its pass `neg`) in the one K loop: its integer sum flushed
    into `acc` with its own steps, the sum restarted. DualScale's first pass flushes a DualScale
    segment's positive part with d_pos (the other segments as without DUAL), the second its
    negative part with d_neg (and nothing of the others): the reference's order
    (ops.combine_segments). Shared with triton_conv.py."""
    d_pos, d_neg, scheme, zp = segment_steps(SCHEMES, DPOS, DNEG, ZP, s, rm, m_ok, stride_dm, stride_ds, BLOCK_M, ASYM)
    if DUAL:
        part = flush(acc_i, tl.where(neg, d_neg, d_pos), zp, colsum_ptr, n_ok, tl.where(neg, 1, scheme), ASYM)
        acc = acc + tl.where(neg & (scheme != 1), 0.0, part)
    else:
        acc = acc + flush(acc_i, d_pos, zp, colsum_ptr, n_ok, scheme, ASYM)
    return acc, tl.zeros_like(acc_i)


@triton.jit
def branch_dot(a, b, acc, EMULATE_BF16: tl.constexpr):
    """acc + a @ b with fp32 sums (the low-rank branch's float dots): 16-bit operands on the
    tensor cores; fp32 operands as exact fp32 products (ieee, not tf32). EMULATE_BF16 (bf16 under
    the interpreter, whose tl.dot reads bf16 as its uint16 bits, triton 3.7): the operands
    converted to fp32 first (exact: bf16 products fit fp32)."""
    if EMULATE_BF16:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision="ieee", out_dtype=tl.float32)


@triton.jit
def bf16_rne(x):
    """fp32 x rounded to bf16 (to nearest, ties to even), held in fp32: the interpreter's cast to
    bf16 truncates (triton 3.7), a GPU's rounds like this."""
    b = x.to(tl.uint32, bitcast=True)
    b = (b + 0x7FFF + ((b >> 16) & 1)) & 0xFFFF0000
    return b.to(tl.float32, bitcast=True)


@triton.jit
def up_chunk(acc, lr, L2, c0, rn, n_ok, rank, stride_l2r, stride_l2n, RC: tl.constexpr, EMULATE_BF16: tl.constexpr):
    """acc + lr @ L2[c0:c0 + RC] for one rank chunk lr [BLOCK_M, RC] (zero past the rank): the
    up-projection's step in the reference's order (low_rank.up_into)."""
    rc = c0 + tl.arange(0, RC)
    l2 = tl.load(L2 + rc[:, None] * stride_l2r + rn[None, :] * stride_l2n, mask=(rc < rank)[:, None] & n_ok[None, :],
                 other=0.0)
    return branch_dot(lr, l2.to(lr.dtype), acc, EMULATE_BF16)


@triton.jit
def up_projection(acc, LR, L2, rm, rn, m_ok, n_ok, rank, stride_lm, stride_lr, stride_l2r, stride_l2n,
                  RC: tl.constexpr, CHUNKS: tl.constexpr, EMULATE_BF16: tl.constexpr):
    """The epilogue's acc + lr @ L2 for lr [M, rank] given (the down-projection done before the
    GEMM): CHUNKS rank chunks of RC columns (unrolled: one chunk's tiles alive at a time)."""
    for c in tl.static_range(CHUNKS):
        rc = c * RC + tl.arange(0, RC)
        lr = tl.load(LR + rm[:, None] * stride_lm + rc[None, :] * stride_lr, mask=m_ok[:, None] & (rc < rank)[None, :],
                     other=0.0)
        acc = up_chunk(acc, lr, L2, c * RC, rn, n_ok, rank, stride_l2r, stride_l2n, RC, EMULATE_BF16)
    return acc


def branch_args(lr, l2, l1=None, dtype=None, interpret: bool = False) -> dict:
    """The kernels' low-rank arguments: rank, strides and constexprs (RC: the chunk,
    low_rank.chunk; CHUNKS; EMULATE_BF16: bf16 under the interpreter). lr [M, r] (or l1 [K, r]:
    the prologue's in-kernel down-projection, its dot in x's `dtype`), l2 [r, N]; none: dummies
    the kernel never reads."""
    from . import low_rank
    if l2 is None:
        return dict(rank=0, strides=(0,) * 6, RC=16, CHUNKS=0, EMULATE_BF16=False)
    rank = l2.shape[0]
    rc = low_rank.chunk(rank)
    dtype = lr.dtype if lr is not None else dtype
    lr_strides = lr.stride() if lr is not None else (0, 0)
    l1_strides = l1.stride() if l1 is not None else (0, 0)
    return dict(rank=rank, strides=(*lr_strides, *l2.stride(), *l1_strides), RC=rc, CHUNKS=triton.cdiv(rank, rc),
                EMULATE_BF16=interpret and dtype == torch.bfloat16)


_INTS: dict = {}


def int_tensor(values, device) -> torch.Tensor:
    """Segment bounds and flags live on the device once per (values, device): no host copy
    per call (CUDA graphs replay the same pointer)."""
    key = (tuple(int(b) for b in values), str(device))
    t = _INTS.get(key)
    if t is None:
        t = _INTS[key] = torch.tensor(key[0], dtype=torch.int32, device=device)
    return t


def k_tiles(bounds, block_k: int, device):
    """The one K loop's table (kernels' k_tile): K tiles of at most block_k columns that never
    straddle a flush unit (a K segment, or a w4a8 weight group), unit after unit. Returns the
    tiles' starts and units (each with a sentinel: K, the number of units), the tile count, and
    the largest power of two up to 16 dividing every start and end (the kernels' K_ALIGN: A rows load as
    16-byte vectors, which the async copies need, where every segment starts on 16 columns), and
    whether every bound is a multiple of block_k (EVEN_K)."""
    bounds = tuple(int(b) for b in bounds)
    starts = [k for a, b in zip(bounds[:-1], bounds[1:]) for k in range(a, b, block_k)]
    units = [u for u, (a, b) in enumerate(zip(bounds[:-1], bounds[1:])) for _ in range(a, b, block_k)]
    align = 16
    while any(k % align for k in starts):
        align //= 2
    return (int_tensor(starts + [bounds[-1]], device), int_tensor(units + [len(bounds) - 1], device),
            len(starts), align, all(b % block_k == 0 for b in bounds))


def tile_schemes(bounds, schemes, block_k: int, device) -> torch.Tensor:
    """The scheme code of each tile of k_tiles' table (DualScale's passes read it by tile)."""
    return int_tensor([schemes[s] for s, (a, b) in enumerate(zip(bounds[:-1], bounds[1:])) for _ in range(a, b, block_k)],
                      device)
