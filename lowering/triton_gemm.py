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
    K loop:    one loop over K tiles that never straddle a segment (k_tiles), the integer sums
               flushed under a condition at a segment's end: the form the pipeliner takes
    W:         any strides; sites pack it K-major on CUDA (quantize.packed_layout), the layout
               codegen-check compiles, whose W tile wgmma takes through async copies
The math is exactly lowering/ops.py's reference; see tests/test_triton_gemm.py. Which configs
the pruner offers on each arch is what `segquant codegen-check` found (codegen_table.json).
"""
from __future__ import annotations

import functools
import json
import os
from pathlib import Path

import torch
import triton
import triton.language as tl

from . import autotune
from .quantize import packed_layout
from .site_lowering import variant_name

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

# The autotuner's candidates (Triton matmul tutorial style: listed right above the kernel).
CONFIGS = [
    dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8, num_stages=st, num_warps=wp)
    for bm, bn, bk, st, wp in [
        (128, 256, 64, 3, 8), (256, 128, 64, 3, 8), (128, 128, 128, 4, 8), (128, 128, 64, 4, 8),
        (128, 64, 128, 4, 4), (64, 128, 128, 4, 4), (128, 64, 64, 4, 4), (64, 128, 64, 4, 4),
        (64, 64, 128, 4, 4), (64, 64, 64, 5, 4), (32, 64, 128, 4, 4), (16, 64, 128, 4, 4),
        (16, 128, 64, 4, 4), (16, 32, 64, 3, 4),
        # K tiles of 32 (a dot's minimum): the conv prologue's im2col gather and quantization hold
        # fewer registers per thread (indices above are the codegen table's: append only)
        (64, 64, 32, 4, 4), (128, 128, 32, 4, 8),
    ]
]
INTERPRETER_CONFIG = dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=32, GROUP_M=4, num_stages=1, num_warps=4)
MIN_DOT_K = 32          # 8-bit operands


# What `segquant codegen-check --write-table` found: per arch, per kernel case (codegen_case),
# the CONFIGS indices that compile to tensor cores, pipelined where they ask for stages, with no
# spills and within the arch's shared memory.
CODEGEN_TABLE = Path(__file__).with_name("codegen_table.json")
# cudaDevAttrMaxSharedMemoryPerBlockOptin of each arch the check compiles for (and sm_86)
ARCH_SHARED = {"sm_80": 166912, "sm_86": 101376, "sm_89": 101376, "sm_90": 232448}


def shared_memory(device) -> int:
    device = torch.device(device)
    if device.type != "cuda":
        return 1 << 30
    props = torch.cuda.get_device_properties(device)
    return getattr(props, "shared_memory_per_block_optin", 0) or 101376


def device_arch(device) -> str | None:
    """`sm_90` for a CUDA device; None elsewhere (the interpreter, CPU)."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    major, minor = torch.cuda.get_device_capability(device)
    return f"sm_{major}{minor}"


def codegen_case(variant: str, segmented: bool = True, even: bool = True) -> str:
    """The check's name for what decides a launch's code: the kernel, its variant, whether the K
    loop flushes inside (several segments or groups) and whether the tile columns are loaded
    from the table (bounds not on BLOCK_K multiples)."""
    if variant.startswith("conv"):
        tag, _, variant = variant.partition("-")
        kernel = "conv1x1" if tag.startswith("conv1x1") else "conv"
    elif variant.startswith("w4a8"):
        kernel = "w4a8"
    elif variant.endswith("weight-only"):
        kernel = "weight-only"
    else:
        kernel = "gemm"
    return f"{kernel}:{variant}" + (":segmented" if segmented else "") + ("" if even else ":unaligned")


@functools.lru_cache(maxsize=None)
def _table() -> dict:
    try:
        return json.loads(CODEGEN_TABLE.read_text())
    except (OSError, ValueError):
        return {}


def checked_configs(variant: str, segmented: bool, even: bool, arch: str) -> tuple[list, list]:
    """CONFIGS indices the check passed for this launch on this arch, and those it passed with
    num_stages 1 where none pipelines (a one-segment launch the check did not compile takes its
    segmented case's, whose K loop holds one more tile); None: the arch or the case is not in
    the table."""
    archs = _table().get("archs", {})
    # an arch the check does not compile for takes its nearest checked one of the same major
    # (sm_86/sm_87: sm_80's mma.sync code); others have no verdict
    table = archs.get(arch) or archs.get({"sm_86": "sm_80", "sm_87": "sm_80"}.get(arch, ""), {})
    for seg in (segmented, True):
        name = codegen_case(variant, seg, even)
        if name in table:
            return table[name], table.get(name + ":single_stage", [])
    return None, []


def prune(m: int, n: int, k: int, variant: str, device, bounds=None, arch: str | None = None,
          checked: bool = True) -> list[dict]:
    """Configs that fit: shared memory, the minimum dot size, no tile much larger than the problem;
    on a known arch only those the codegen check passed (no spills, pipelined). `bounds` (K
    segment, or w4a8 group, bounds): tiles no wider than the narrowest and on its multiples
    where a config allows (the pipelined EVEN_K loop); where none does, the table-driven loop,
    which the pipeliner does not take, with num_stages 1. `checked=False`: before the table's
    verdict (what the check compiles to write it)."""
    if INTERPRET and arch is None:
        return [dict(INTERPRETER_CONFIG)]
    arch = arch or device_arch(device)
    elem = 4 if variant.endswith("prologue") or variant.endswith("weight-only") else 1   # bytes of an A element
    # a real device's own limit; the arch's when the check asks for one
    limit = shared_memory(device) if torch.device(device).type == "cuda" else codegen_limit(arch) if arch else \
        shared_memory(device)
    bounds = tuple(bounds) if bounds is not None else (0, k)
    segmented = len(bounds) > 2
    min_m = 64 if arch == "sm_90" else 16     # wgmma's tile is 64 rows a warpgroup: smaller ones fall back to mma.sync
    out = []
    for i, c in enumerate(CONFIGS):
        if c["BLOCK_K"] < MIN_DOT_K:
            continue
        smem = (c["BLOCK_M"] * c["BLOCK_K"] * elem + c["BLOCK_K"] * c["BLOCK_N"]) * c["num_stages"]
        if smem > limit:
            continue
        if m and (c["BLOCK_M"] > max(min_m, autotune.m_bucket(m)) or c["BLOCK_N"] > max(32, n * 2)):
            continue
        out.append((i, c))
    even = [(i, c) for i, c in out if all(b % c["BLOCK_K"] == 0 for b in bounds)]
    if even:
        out = even
    else:
        out = [(i, dict(c, num_stages=1)) for i, c in out]
    if arch and checked:
        passed, single = checked_configs(variant, segmented, bool(even), arch)
        if passed is not None:
            out = [(i, c) for i, c in out if i in passed] or \
                [(i, dict(c, num_stages=1)) for i, c in out if i in single] or out[-1:]
    return [dict(c) for _, c in out] or [dict(CONFIGS[-1])]


def codegen_limit(arch: str) -> int:
    """Shared memory one block may opt into on this arch (bytes); unknown archs: sm_89's."""
    return ARCH_SHARED.get(arch, ARCH_SHARED["sm_89"])


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
def segment_steps(SCHEMES, DX, DN, ZP, s, rm, m_ok, stride_dm, stride_ds, BLOCK_M: tl.constexpr,
                  ASYM: tl.constexpr):
    """K segment s: its scheme code (0 symmetric, 1 DualScale, 2 asymmetric) and the steps and
    zero point of this tile's rows (zero point 0 unless ASYM). Shared with triton_conv.py."""
    d_pos = tl.load(DX + rm * stride_dm + s * stride_ds, mask=m_ok, other=1.0)
    d_neg = tl.load(DN + rm * stride_dm + s * stride_ds, mask=m_ok, other=1.0)
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
def int8_dots(acc_p, acc_n, a, w, DUAL: tl.constexpr):
    """One K tile's exact int32 dots; DualScale splits A by sign in registers (two dots, one W tile)."""
    if DUAL:
        acc_p += tl.dot(tl.maximum(a, 0).to(tl.int8), w, out_dtype=tl.int32)
        acc_n += tl.dot(tl.minimum(a, 0).to(tl.int8), w, out_dtype=tl.int32)
    else:
        acc_p += tl.dot(a, w, out_dtype=tl.int32)
    return acc_p, acc_n


@triton.jit
def flush(acc_p, acc_n, d_pos, d_neg, zp, colsum_ptr, n_ok, scheme, DUAL: tl.constexpr, ASYM: tl.constexpr):
    """One K segment's integer sums into fp32 with its own steps, in the reference's order
    (ops.segment_part): only DualScale segments combine two products, the others (plain segments
    of a DualScale site too) scale their whole sum once; asymmetric segments subtract
    zp * colsum(W) in int32 first. Shared with triton_conv.py and triton_formats.py."""
    total = acc_p                                      # the whole q tile's sum (exact int32)
    if DUAL:
        total = acc_p + acc_n
    if ASYM:
        colsum = tl.load(colsum_ptr, mask=n_ok, other=0)
        total = tl.where(scheme == 2, total - zp.to(tl.int32)[:, None] * colsum[None, :], total)
    part = total.to(tl.float32) * d_pos[:, None]
    if DUAL:
        dual = acc_p.to(tl.float32) * d_pos[:, None] + acc_n.to(tl.float32) * d_neg[:, None]
        part = tl.where(scheme == 1, dual, part)
    return part


@triton.jit
def segment_end(acc, acc_p, acc_n, SCHEMES, DX, DN, ZP, colsum_ptr, s, rm, m_ok, n_ok, stride_dm, stride_ds,
                BLOCK_M: tl.constexpr, DUAL: tl.constexpr, ASYM: tl.constexpr):
    """The end of K segment s in the one K loop: its integer sums flushed into `acc` with its own
    steps, the sums restarted. Shared with triton_conv.py."""
    d_pos, d_neg, scheme, zp = segment_steps(SCHEMES, DX, DN, ZP, s, rm, m_ok, stride_dm, stride_ds, BLOCK_M, ASYM)
    acc = acc + flush(acc_p, acc_n, d_pos, d_neg, zp, colsum_ptr, n_ok, scheme, DUAL, ASYM)
    return acc, tl.zeros_like(acc_p), tl.zeros_like(acc_n)


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
def pass_end(acc, acc_i, SCHEMES, DX, DN, ZP, colsum_ptr, s, neg, rm, m_ok, n_ok, stride_dm, stride_ds,
             BLOCK_M: tl.constexpr, ASYM: tl.constexpr):
    """The end of segment s's pass in DualScale's two passes: its integer sum flushed into `acc`
    with that pass's step (the first pass: d_pos, or the segment's plain flush; the second:
    d_neg, DualScale segments only), the sum restarted. The reference's order (ops.combine_segments)."""
    d_pos, d_neg, scheme, zp = segment_steps(SCHEMES, DX, DN, ZP, s, rm, m_ok, stride_dm, stride_ds, BLOCK_M, ASYM)
    part = flush(acc_i, acc_i, tl.where(neg, d_neg, d_pos), d_neg, zp, colsum_ptr, n_ok,
                 tl.where(neg, 1, scheme), False, ASYM)
    return acc + tl.where(neg & (scheme != 1), 0.0, part), tl.zeros_like(acc_i)


@triton.jit
def segquant_gemm_kernel(
        A, W, C, DX, DN, DW, BIAS, TK, TU, TS, SCHEMES, SMOOTH, ZP, COLSUM, DXK, DNK, LOWK,
        M, N, T,
        stride_am, stride_ak, stride_wk, stride_wn, stride_cm, stride_cn, stride_dm, stride_ds,
        SEGMENTED: tl.constexpr, K_ALIGN: tl.constexpr, EVEN_K: tl.constexpr,
        DUAL: tl.constexpr, FP8: tl.constexpr, PROLOGUE: tl.constexpr, HAS_BIAS: tl.constexpr,
        HAS_SMOOTH: tl.constexpr, ASYM: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    rm, rn = tile(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    rk = tl.arange(0, BLOCK_K)
    m_ok = rm < M
    n_ok = rn < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    bad = tl.zeros((BLOCK_M,), dtype=tl.float32)     # PROLOGUE: rows holding NaN/Inf come out NaN
    acc_i = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32 if FP8 else tl.int32)   # the segment's exact sum
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
            x = x.to(tl.float32)
            if DUAL:   # counted once, in the first pass
                bad += tl.where(neg, 0.0, tl.sum(x - x, axis=1))
            else:
                bad += tl.sum(x - x, axis=1)
            if HAS_SMOOTH:
                x = x / tl.load(SMOOTH + kk, mask=k_ok, other=1.0)[None, :]
            step_pos = tl.load(DXK + kk, mask=k_ok, other=1.0)[None, :]
            if DUAL:
                # a plain segment of a mixed site quantizes symmetrically: its lower clamp is -127
                # each element on its own side, one quotient per element (not both sides' tiles)
                low = tl.load(LOWK + kk, mask=k_ok, other=-127).to(tl.float32)[None, :]
                step_neg = tl.load(DNK + kk, mask=k_ok, other=1.0)[None, :]
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
        if DUAL:
            if last:
                acc, acc_i = pass_end(acc, acc_i, SCHEMES, DX, DN, ZP, COLSUM + s * N + rn, s, neg, rm, m_ok, n_ok,
                                      stride_dm, stride_ds, BLOCK_M, ASYM)
        elif SEGMENTED:
            if last:
                acc, acc_i, _ = segment_end(acc, acc_i, acc_i, SCHEMES, DX, DN, ZP, COLSUM + s * N + rn, s, rm,
                                            m_ok, n_ok, stride_dm, stride_ds, BLOCK_M, False, ASYM)
    if not SEGMENTED and not DUAL:   # one segment: its flush after the loop, no fp32 sum alive inside it
        acc, acc_i, _ = segment_end(acc, acc_i, acc_i, SCHEMES, DX, DN, ZP, COLSUM + rn, 0, rm, m_ok, n_ok,
                                    stride_dm, stride_ds, BLOCK_M, False, ASYM)
    acc = acc * tl.load(DW + rn, mask=n_ok, other=0.0)[None, :]
    if HAS_BIAS:
        acc = acc + tl.load(BIAS + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    if PROLOGUE:
        acc = acc + bad[:, None]
    c_ptr = C + rm[:, None] * stride_cm + rn[None, :] * stride_cn
    tl.store(c_ptr, acc.to(C.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


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


def launch(a, d_x, d_neg, w, d_w, bias, k_bounds, schemes, out_dtype, smooth=None, prologue=False,
           config=None, zp=None, colsum=None) -> torch.Tensor:
    """C = segquant GEMM of a [M, K] (int8, e4m3, or float with prologue) and packed w [K, N]."""
    M, K = a.shape
    N = w.shape[1]
    fp8 = w.dtype == torch.float8_e4m3fn
    if prologue and (fp8 or d_x.shape[0] != 1):
        raise ValueError("segquant: the in-kernel quantize prologue is int8 with static steps [1, S] only")
    dual_any = 1 in schemes
    asym = 2 in schemes
    if asym and (prologue or fp8 or zp is None or colsum is None):
        raise ValueError("segquant: asymmetric segments need int8 operands, zero points and column sums "
                         "(and no prologue)")
    if d_x.shape[0] not in (1, M) or d_neg.shape != d_x.shape or (zp is not None and zp.shape != d_x.shape):
        raise ValueError(f"segquant: activation steps must be [1 or M, S], got {tuple(d_x.shape)}")
    c = torch.empty((M, N), dtype=out_dtype, device=a.device)
    if M == 0 or N == 0:
        return c
    if config is None:
        variant = variant_name("fp8" if fp8 else "int8", dual_any, prologue, asym)
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
        dxk, dnk = d_x[0].index_select(0, columns), d_neg[0].index_select(0, columns)
        lowk = int_tensor([-128 if schemes[s] == 1 else -127 for s in segment], a.device)
    stride_dm = d_x.stride(0) if d_x.shape[0] == M and M > 1 else 0
    grid = (triton.cdiv(M, cfg["BLOCK_M"]) * triton.cdiv(N, cfg["BLOCK_N"]),)
    segquant_gemm_kernel[grid](
        a, w, c, d_x, d_neg, d_w, bias if bias is not None else d_w, tk, tu, ts, flags,
        smooth if smooth is not None else d_w, zp if zp is not None else d_x, colsum if colsum is not None else tk,
        dxk, dnk, lowk, M, N, tiles,
        a.stride(0), a.stride(1), w.stride(0), w.stride(1), c.stride(0), c.stride(1), stride_dm, d_x.stride(1),
        SEGMENTED=len(k_bounds) > 2, K_ALIGN=align, EVEN_K=even,
        DUAL=dual_any, FP8=fp8, PROLOGUE=prologue, HAS_BIAS=bias is not None, HAS_SMOOTH=smooth is not None,
        ASYM=asym,
        BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"], GROUP_M=cfg.get("GROUP_M", 8),
        num_warps=cfg.get("num_warps", 4), num_stages=cfg.get("num_stages", 3))
    return c


def tune(m: int, n: int, k: int, variant: str, device, bench=None) -> tuple[dict, list]:
    """Tune this kernel for one GEMM shape and variant on random operands; persist the winner."""
    device = torch.device(device)
    dual, prologue, fp8 = "-dual" in variant, variant.endswith("prologue"), variant.startswith("fp8")
    asym = "-asym" in variant
    # one segment of each scheme the variant holds (DualScale and asymmetric: two halves)
    codes = tuple(c for c, on in ((1, dual), (2, asym)) if on) or (0,)
    bounds = (0, k) if len(codes) == 1 else (0, k // 2, k)
    g = torch.Generator(device="cpu").manual_seed(0)
    if prologue:
        a = torch.randn(m, k, generator=g).to(device)
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

    def run(cfg):
        launch(a, d, d, w, d_w, None, bounds, codes, torch.bfloat16, prologue=prologue, config=cfg,
               zp=zp, colsum=colsum)
    return autotune.tune(autotune.key(m, n, k, variant, device), prune(m, n, k, variant, device, bounds), run,
                         bench)


def ensure(m: int, n: int, k: int, variant: str, device) -> dict:
    """A tuned config for this shape, tuning now if neither memory nor disk has one (at compile
    time: never inside a CUDA graph capture)."""
    return autotune.cached(autotune.key(m, n, k, variant, device)) or tune(m, n, k, variant, device)[0]
