"""The segquant GEMM custom op: int8 activations x packed int8 weights, with SegLinear K
segments and DualScale, returning the float output with bias.

Math (every implementation, the Triton kernels included), per K segment s = [k_s, k_{s+1}) with
scheme code schemes[s] (lowering/quantize.py):
    0 symmetric:   y += (q[:, s] @ W[s, :]) * d_pos[:, s]
    1 DualScale:   y += (max(q,0)[:, s] @ W[s, :]) * d_pos[:, s]
    2 asymmetric:  y += (q[:, s] @ W[s, :] - zp[:, s] * colsum[s]) * d_pos[:, s]   (the correction in int32)
then for each DualScale segment s, in order:  y += (min(q,0)[:, s] @ W[s, :]) * d_neg[:, s]
    y = y * d_w + bias
    y = y + lr[:, c] @ l2[c, :]    for each rank chunk c, in order (with SVDQuant's branch)
with int32 accumulation inside a segment and fp32 across segments. Scales are step sizes;
d_pos / d_neg / zp are [M, S] (dynamic, per token) or [1, S] (static, per tensor); colsum [S, N]
int32 holds the packed weight's column sums per segment (packed with it).

SVDQuant's low-rank branch (lowering/low_rank.py), optional in every GEMM op: lr [M, r] = x @ L1
(the down-projection, in the activation's dtype: what the tensor cores take, fp32 sums rounded
once, as a torch matmul gives it) and l2 [r, N] (cast to lr's dtype); the up-projection is added
to the fp32 result after the bias and before the cast, in rank chunks of low_rank.chunk(r)
columns (16 for r <= 16, else 32: tl.dot's K, the rank zero-padded to it), each chunk's products
summed in fp32 (low_rank.up_into). segquant::gemm_prologue takes L1 instead of lr: its kernel
accumulates x @ L1 from the float x tiles it reads anyway (fp32, K tile after K tile), rounds it
to x's dtype, then adds the up-projection the same way; its reference sums x @ L1 in one matmul
(with 16-bit x the two lr may differ in their last bit where the two fp32 sums round apart).
The branch's float sums run in a BLAS / numpy / tensor-core order (a GPU's MMA adds a chunk's
products into the running fp32 result in its own order): kernel and reference agree bit for bit
under the interpreter where the integer path and those sums are exact (the tests' dyadic
branches), and to fp32 rounding otherwise.

The 4-bit and weight-only formats have their own ops below (segquant::gemm_w4: int4 weights with
steps per K group, flushed per group; segquant::gemm_weight_only: float activations), each with
its order of operations in its docstring.
"""
from __future__ import annotations

import contextlib
import functools

import torch
from torch import Tensor

from . import low_rank
from .quantize import dequantize_weight, segment_groups, unpack_int4

LIB = "segquant"


@torch.library.custom_op(f"{LIB}::gemm", mutates_args=())
def gemm(q: Tensor, d_pos: Tensor, d_neg: Tensor, w: Tensor, d_w: Tensor, bias: Tensor | None,
         k_bounds: list[int], schemes: list[int], out_dtype: torch.dtype, zp: Tensor | None = None,
         colsum: Tensor | None = None, lr: Tensor | None = None, l2: Tensor | None = None) -> Tensor:
    """q [M, K] int8; d_pos, d_neg, zp [M or 1, S] fp32; w [K, N] int8 (packed); d_w [N] fp32;
    k_bounds S+1 ints; schemes S codes; colsum [S, N] int32 (asymmetric segments); lr [M, r],
    l2 [r, N]: the low-rank branch (module docstring); returns [M, N]."""
    return gemm_reference(q, d_pos, d_neg, w, d_w, bias, k_bounds, schemes, out_dtype, zp, colsum, lr, l2)


def _check_branch(op, m, n, lr, l2):
    torch._check((lr is None) == (l2 is None), lambda: f"segquant::{op}: the low-rank branch takes both lr and l2")
    if lr is not None:
        torch._check(lr.dim() == 2 and l2.dim() == 2 and lr.shape[0] == m and lr.shape[1] == l2.shape[0]
                     and l2.shape[1] == n, lambda: f"segquant::{op}: lr {tuple(lr.shape)}, l2 {tuple(l2.shape)} "
                     f"for [M = {m}, N = {n}]")


@gemm.register_fake
def _(q, d_pos, d_neg, w, d_w, bias, k_bounds, schemes, out_dtype, zp=None, colsum=None, lr=None, l2=None):
    torch._check(q.dim() == 2 and w.dim() == 2, lambda: "segquant::gemm takes 2-D q and w")
    torch._check(q.shape[1] == w.shape[0], lambda: f"K mismatch: q {q.shape}, w {w.shape}")
    _check_branch("gemm", q.shape[0], w.shape[1], lr, l2)
    return q.new_empty((q.shape[0], w.shape[1]), dtype=out_dtype)


@gemm.register_kernel("cuda")
def _(q, d_pos, d_neg, w, d_w, bias, k_bounds, schemes, out_dtype, zp=None, colsum=None, lr=None, l2=None):
    from .triton_gemm import launch
    return launch(q, d_pos, d_neg, w, d_w, bias, k_bounds, schemes, out_dtype, zp=zp, colsum=colsum, lr=lr, l2=l2)


@torch.library.custom_op(f"{LIB}::gemm_prologue", mutates_args=())
def gemm_prologue(x: Tensor, d_pos: Tensor, d_neg: Tensor, smooth: Tensor | None, w: Tensor, d_w: Tensor,
                  bias: Tensor | None, k_bounds: list[int], schemes: list[int], out_dtype: torch.dtype,
                  l1: Tensor | None = None, l2: Tensor | None = None) -> Tensor:
    """The GEMM reading float activations, quantized with static steps d_pos/d_neg [1, S] (and the
    SmoothQuant divisor) inside the kernel: no separate quantize pass. Rows holding NaN/Inf come
    out NaN. l1 [K, r] (r <= low_rank.FUSED_DOWN_MAX), l2 [r, N]: the low-rank branch, its
    down-projection x @ L1 from the raw x the kernel reads. Order of fp32 operations:
        y = combine(...) * d_w + bias + lr @ l2 (rank chunks) + NaN for non-finite rows"""
    from .quantize import nonfinite_rows, quantize_static
    xs = x.float() / smooth if smooth is not None else x.float()
    q = quantize_static(xs, list(k_bounds), list(schemes), d_pos, d_neg)
    lr = low_rank.down(x, l1) if l1 is not None else None
    y = gemm_reference(q, d_pos, d_neg, w, d_w, bias, k_bounds, schemes, torch.float32, lr=lr, l2=l2) + \
        nonfinite_rows(xs)
    return y.to(out_dtype)


@gemm_prologue.register_fake
def _(x, d_pos, d_neg, smooth, w, d_w, bias, k_bounds, schemes, out_dtype, l1=None, l2=None):
    if l1 is not None:
        torch._check(l1.dim() == 2 and l1.shape[0] == x.shape[1], lambda: f"segquant::gemm_prologue: l1 {tuple(l1.shape)}")
        _check_branch("gemm_prologue", x.shape[0], w.shape[1], x.new_empty((x.shape[0], l1.shape[1])), l2)
    return x.new_empty((x.shape[0], w.shape[1]), dtype=out_dtype)


@gemm_prologue.register_kernel("cuda")
def _(x, d_pos, d_neg, smooth, w, d_w, bias, k_bounds, schemes, out_dtype, l1=None, l2=None):
    from .triton_gemm import launch
    return launch(x, d_pos, d_neg, w, d_w, bias, k_bounds, schemes, out_dtype, smooth=smooth, prologue=True,
                  l1=l1, l2=l2)


def column_sums(w: Tensor, k_bounds) -> Tensor:
    """[S, N] int32 column sums of a packed [K, N] int8 weight per K segment (asymmetric scheme)."""
    return torch.stack([w[k0:k1].sum(dim=0, dtype=torch.int32) for k0, k1 in zip(k_bounds[:-1], k_bounds[1:])])


def gemm_reference(q, d_pos, d_neg, w, d_w, bias, k_bounds, schemes, out_dtype, zp=None, colsum=None, lr=None,
                   l2=None):
    """CPU implementation: an exact int8 GEMM (_int_mm) per segment, fp32 epilogue; e4m3
    operands (fp8 emulated on CPU) go through float64 products, exact for 8-bit values; the
    low-rank branch's up-projection last (low_rank.up_into)."""
    fp8 = q.dtype == torch.float8_e4m3fn
    mm = torch.matmul if fp8 else _int_mm

    def sums():   # lazily, so one segment's partial sums are alive at a time
        for s, (k0, k1) in enumerate(zip(k_bounds[:-1], k_bounds[1:])):
            qs, ws = q[:, k0:k1], w[k0:k1]
            if fp8:
                qs, ws = qs.double(), ws.double()
            yield (mm(qs.clamp(min=0), ws), mm(qs.clamp(max=0), ws)) if schemes[s] == 1 else (mm(qs, ws),)

    y = combine_segments(sums(), d_pos, d_neg, d_w, bias, schemes, zp, colsum)
    if lr is not None:
        y = low_rank.up_into(y, lr, l2)
    return y if y.dtype == out_dtype else y.to(out_dtype)


def combine_segments(sums, d_pos, d_neg, d_w, bias, schemes, zp=None, colsum=None) -> Tensor:
    """The epilogue on per-segment integer sums ((pos, neg) for DualScale, (all,) otherwise), in
    the order of fp32 operations every implementation follows (the conv op shares it): each
    segment's part in segment order, of a DualScale segment its positive part; then the DualScale
    segments' negative parts, in segment order (the kernels' two passes over K, which keep one
    integer accumulator alive)."""
    y, negatives = None, []
    for s, acc in enumerate(sums):
        if schemes[s] == 1:
            negatives.append(torch.mul(acc[1], d_neg[:, s:s + 1]))
        part = segment_part(acc[0], s, schemes[s], d_pos, zp, colsum[s] if colsum is not None else None)
        y = part if y is None else y.add_(part)
    for part in negatives:
        y.add_(part)
    y.mul_(d_w)
    if bias is not None:
        y.add_(bias)
    return y


def segment_part(acc, s, scheme, d_pos, zp=None, colsum=None) -> Tensor:
    """One K range's fp32 part from its integer sum, with the step of its segment s: the whole
    sum of a symmetric or asymmetric segment (colsum: that range's [N] column sums, asymmetric
    only), or a DualScale segment's positive part; the weight step is not applied yet."""
    # int32 * fp32 promotes in one pass (CPU epilogue cost)
    if scheme == 2:
        return torch.mul(acc - zp[:, s:s + 1].to(torch.int32) * colsum, d_pos[:, s:s + 1])
    return torch.mul(acc, d_pos[:, s:s + 1])


EXACT_FP32_K = 1024   # 1024 products of 8-bit values: every partial sum is an integer below 2**24


def _int_mm_fp32(a: Tensor, b: Tensor) -> Tensor:
    """int8 x int8 -> int32 through fp32 GEMMs over K chunks: exact (all partial sums are
    integers below 2**24), at fp32 GEMM speed on CPUs without int8 dot instructions."""
    out = None
    for k0 in range(0, a.shape[1], EXACT_FP32_K):
        part = (a[:, k0:k0 + EXACT_FP32_K].float() @ b[k0:k0 + EXACT_FP32_K].float()).to(torch.int32)
        out = part if out is None else out.add_(part)
    return out if out is not None else a.new_zeros((a.shape[0], b.shape[1]), dtype=torch.int32)


ONEDNN_MARGIN = 4.0   # far from both kinds of CPU: oneDNN is several times faster with VNNI, ~100x slower without


@functools.lru_cache(maxsize=1)
def cpu_int8_gemm() -> str:
    """Which exact CPU int8 GEMM to use here, measured once: oneDNN's `_int_mm` (fast with
    VNNI/AMX) or fp32 chunks (oneDNN falls back to a reference loop on plain AVX2, ~100x slower).
    The choice also picks the CPU form of a site (cpu_linear.cpu_gemm), whose numbers differ, so it
    must not flip with the load of the machine: oneDNN unless it is more than ONEDNN_MARGIN times
    slower (a timing noisy by several times cannot cross that on either kind of CPU)."""
    import time
    threads = torch.get_num_threads()
    # one thread: on a busy machine OpenMP's barriers make a small multi-threaded fp32 GEMM tens of
    # times slower, and the margin would be crossed; single-threaded, the load slows both alike
    torch.set_num_threads(1)
    try:
        with _untraced():   # real tensors even if called under a trace (a fake timing would decide)
            g = torch.Generator().manual_seed(0)
            a = torch.randint(-127, 128, (64, 512), generator=g, dtype=torch.int8)
            b = torch.randint(-127, 128, (512, 512), generator=g, dtype=torch.int8)
            best = {}
            for name, fn in (("onednn", torch._int_mm), ("fp32", _int_mm_fp32)):
                fn(a, b)
                t = time.perf_counter()
                for _ in range(3):
                    fn(a, b)
                best[name] = time.perf_counter() - t
    finally:
        torch.set_num_threads(threads)
    return "onednn" if best["onednn"] <= ONEDNN_MARGIN * best["fp32"] else "fp32"



def _untraced() -> contextlib.ExitStack:
    stack = contextlib.ExitStack()
    try:   # internal context managers, feature-tested: without them nothing is disabled
        from torch._subclasses.fake_tensor import unset_fake_temporarily
        from torch.fx.experimental.proxy_tensor import disable_proxy_modes_tracing
    except ImportError:
        return stack
    stack.enter_context(unset_fake_temporarily())
    stack.enter_context(disable_proxy_modes_tracing())
    return stack


def int_mm_onednn(a: Tensor, b: Tensor) -> Tensor:
    """torch._int_mm on the CPU, exact for every layout: with VNNI oneDNN misreads a [1, N]
    right operand whose strides are (1, 1) (one K column of a transposed weight) and returns
    garbage (torch 2.13), so a K of 1 is computed as the outer product it is."""
    if a.shape[1] == 1:
        return a.to(torch.int32) * b.to(torch.int32)
    return torch._int_mm(a, b)


def _int_mm(a: Tensor, b: Tensor) -> Tensor:
    if a.device.type == "cpu":
        if cpu_int8_gemm() == "fp32":
            return _int_mm_fp32(a, b)
        return int_mm_onednn(a.contiguous(), b.contiguous())
    if a.shape[0] > 16 and a.shape[1] % 8 == 0 and b.shape[1] % 8 == 0:
        return torch._int_mm(a.contiguous(), b.contiguous())
    return (a.double() @ b.double()).to(torch.int32)  # small or unaligned shapes: exact in float64


def int_accumulators(q, w, k_bounds, schemes):
    """The exact integer partial sums the op combines (int64), for tests and debugging."""
    out = []
    for s, (k0, k1) in enumerate(zip(k_bounds[:-1], k_bounds[1:])):
        qs, ws = q[:, k0:k1].long(), w[k0:k1].long()
        out.append((qs.clamp(min=0) @ ws, qs.clamp(max=0) @ ws) if schemes[s] == 1 else (qs @ ws,))
    return out


# ---- The w4a8 and weight-only formats (DESIGN.md, Formats and granularity) ----

@torch.library.custom_op(f"{LIB}::gemm_w4", mutates_args=())
def gemm_w4(q: Tensor, d_pos: Tensor, d_neg: Tensor, w4: Tensor, d_w: Tensor, bias: Tensor | None,
            k_bounds: list[int], g_bounds: list[int], schemes: list[int], out_dtype: torch.dtype,
            zp: Tensor | None = None, colsum: Tensor | None = None, lr: Tensor | None = None,
            l2: Tensor | None = None) -> Tensor:
    """w4a8: q [M, K] int8 activations with segquant::gemm's K segments, schemes and steps
    (d_pos, d_neg, zp [M or 1, S]) x int4 weights w4 [ceil(K/2), N] (quantize.pack_int4) with steps
    d_w [G, N] per K group [g_bounds[g], g_bounds[g+1]) and output channel; the G + 1 g_bounds
    refine k_bounds; colsum [G, N] int32 (column_sums over g_bounds) for asymmetric segments. Returns [M, N].

    Order of fp32 operations (every implementation): DualScale in two passes over the groups, as
    segquant::gemm's segments (combine_segments). First, for each group g of segment s in turn:
        acc  = q[:, g] @ W[g]                                exact int32
               DualScale: max(q, 0)[:, g] @ W[g]
        part = acc * d_pos[:, s]                             symmetric, DualScale
               (acc - zp[:, s] * colsum[g]) * d_pos[:, s]    asymmetric (the correction in int32)
        part = part * d_w[g]
        y    = y + part
    then for each group g of a DualScale segment s in turn:
        acc  = min(q, 0)[:, g] @ W[g]                        exact int32
        part = acc * d_neg[:, s]
        part = part * d_w[g]
        y    = y + part
    then y = y + bias; with the low-rank branch lr [M, r], l2 [r, N] then y = y + lr @ l2 in rank
    chunks (module docstring); cast to out_dtype."""
    w = unpack_int4(w4, q.shape[1])
    groups = segment_groups(k_bounds, g_bounds)
    y = None
    for negative in (False, True):    # DualScale's second pass: its segments' negative parts
        for s, scheme in enumerate(schemes):
            if negative and scheme != 1:
                continue
            for g in range(groups[s], groups[s + 1]):
                qs, ws = q[:, g_bounds[g]:g_bounds[g + 1]], w[g_bounds[g]:g_bounds[g + 1]]
                if negative:
                    part = torch.mul(_int_mm(qs.clamp(max=0), ws), d_neg[:, s:s + 1])
                else:
                    part = segment_part(_int_mm(qs.clamp(min=0) if scheme == 1 else qs, ws), s, scheme, d_pos, zp,
                                        colsum[g] if colsum is not None else None)
                part.mul_(d_w[g])
                y = part if y is None else y.add_(part)
    if bias is not None:
        y.add_(bias)
    if lr is not None:
        y = low_rank.up_into(y, lr, l2)
    return y.to(out_dtype)


@gemm_w4.register_fake
def _(q, d_pos, d_neg, w4, d_w, bias, k_bounds, g_bounds, schemes, out_dtype, zp=None, colsum=None, lr=None,
      l2=None):
    torch._check(q.dim() == 2 and w4.dim() == 2, lambda: "segquant::gemm_w4 takes 2-D q and w4")
    torch._check(w4.shape[0] == (q.shape[1] + 1) // 2, lambda: f"K mismatch: q {q.shape}, packed int4 w {w4.shape}")
    _check_branch("gemm_w4", q.shape[0], w4.shape[1], lr, l2)
    return q.new_empty((q.shape[0], w4.shape[1]), dtype=out_dtype)


@gemm_w4.register_kernel("cuda")
def _(q, d_pos, d_neg, w4, d_w, bias, k_bounds, g_bounds, schemes, out_dtype, zp=None, colsum=None, lr=None,
      l2=None):
    from .triton_formats import launch_w4
    return launch_w4(q, d_pos, d_neg, w4, d_w, bias, k_bounds, g_bounds, schemes, out_dtype, zp=zp, colsum=colsum,
                     lr=lr, l2=l2)


@torch.library.custom_op(f"{LIB}::gemm_weight_only", mutates_args=())
def gemm_weight_only(x: Tensor, w: Tensor, d_w: Tensor, bias: Tensor | None, g_bounds: list[int], bits: int,
                     out_dtype: torch.dtype) -> Tensor:
    """Float activations x [M, K] (any float dtype) x weights dequantized on the fly: bits 8,
    w [K, N] int8 with d_w [N] per output channel (g_bounds [0, K]); bits 4, w [ceil(K/2), N]
    packed int4 with d_w [G, N] per K group. y = x.float() @ dequantize_weight(...) (+ bias) in
    fp32, cast to out_dtype. The kernel sums in another order (the steps applied per group after
    the dot): equal up to fp32 rounding."""
    y = x.float() @ dequantize_weight(w, d_w, g_bounds, bits, x.shape[1])
    if bias is not None:
        y.add_(bias)
    return y.to(out_dtype)


@gemm_weight_only.register_fake
def _(x, w, d_w, bias, g_bounds, bits, out_dtype):
    torch._check(x.dim() == 2 and w.dim() == 2, lambda: "segquant::gemm_weight_only takes 2-D x and w")
    rows = x.shape[1] if bits == 8 else (x.shape[1] + 1) // 2
    torch._check(w.shape[0] == rows, lambda: f"K mismatch: x {x.shape}, {bits}-bit w {w.shape}")
    return x.new_empty((x.shape[0], w.shape[1]), dtype=out_dtype)


@gemm_weight_only.register_kernel("cuda")
def _(x, w, d_w, bias, g_bounds, bits, out_dtype):
    from .triton_formats import launch_weight_only
    return launch_weight_only(x, w, d_w, bias, g_bounds, bits, out_dtype)


