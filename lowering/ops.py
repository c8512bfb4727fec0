"""The segquant GEMM custom op: int8 activations x packed int8 weights, with SegLinear K
segments and DualScale, returning the float output with bias.

Math (every implementation, the Triton kernels included), per K segment s = [k_s, k_{s+1}) with
scheme code schemes[s] (lowering/quantize.py):
    0 symmetric:   y += (q[:, s] @ W[s, :]) * d_x[:, s]
    1 DualScale:   y += (max(q,0)[:, s] @ W[s, :]) * d_x[:, s] + (min(q,0)[:, s] @ W[s, :]) * d_neg[:, s]
    2 asymmetric:  y += (q[:, s] @ W[s, :] - zp[:, s] * colsum[s]) * d_x[:, s]   (the correction in int32)
    y = y * d_w + bias
with int32 accumulation inside a segment and fp32 across segments. Scales are step sizes;
d_x / d_neg / zp are [M, S] (dynamic, per token) or [1, S] (static, per tensor); colsum [S, N]
int32 holds the packed weight's column sums per segment (packed with it).
"""
from __future__ import annotations

import contextlib
import functools

import torch
from torch import Tensor

LIB = "segquant"


@torch.library.custom_op(f"{LIB}::gemm", mutates_args=())
def gemm(q: Tensor, d_x: Tensor, d_neg: Tensor, w: Tensor, d_w: Tensor, bias: Tensor | None,
         k_bounds: list[int], schemes: list[int], out_dtype: torch.dtype, zp: Tensor | None = None,
         colsum: Tensor | None = None) -> Tensor:
    """q [M, K] int8; d_x, d_neg, zp [M or 1, S] fp32; w [K, N] int8 (packed); d_w [N] fp32;
    k_bounds S+1 ints; schemes S codes; colsum [S, N] int32 (asymmetric segments); returns [M, N]."""
    return gemm_reference(q, d_x, d_neg, w, d_w, bias, k_bounds, schemes, out_dtype, zp, colsum)


@gemm.register_fake
def _(q, d_x, d_neg, w, d_w, bias, k_bounds, schemes, out_dtype, zp=None, colsum=None):
    torch._check(q.dim() == 2 and w.dim() == 2, lambda: "segquant::gemm takes 2-D q and w")
    torch._check(q.shape[1] == w.shape[0], lambda: f"K mismatch: q {q.shape}, w {w.shape}")
    return q.new_empty((q.shape[0], w.shape[1]), dtype=out_dtype)


@gemm.register_kernel("cuda")
def _(q, d_x, d_neg, w, d_w, bias, k_bounds, schemes, out_dtype, zp=None, colsum=None):
    from .triton_gemm import launch
    return launch(q, d_x, d_neg, w, d_w, bias, k_bounds, schemes, out_dtype, zp=zp, colsum=colsum)


@torch.library.custom_op(f"{LIB}::gemm_prologue", mutates_args=())
def gemm_prologue(x: Tensor, d_x: Tensor, d_neg: Tensor, smooth: Tensor | None, w: Tensor, d_w: Tensor,
                  bias: Tensor | None, k_bounds: list[int], schemes: list[int], out_dtype: torch.dtype) -> Tensor:
    """The GEMM reading float activations, quantized with static steps d_x/d_neg [1, S] (and the
    SmoothQuant divisor) inside the kernel: no separate quantize pass. Rows holding NaN/Inf come
    out NaN."""
    from .quantize import nonfinite_rows, quantize_static
    xs = x.float() / smooth if smooth is not None else x.float()
    q = quantize_static(xs, list(k_bounds), list(schemes), d_x, d_neg)
    y = gemm_reference(q, d_x, d_neg, w, d_w, bias, k_bounds, schemes, torch.float32) + nonfinite_rows(xs)
    return y.to(out_dtype)


@gemm_prologue.register_fake
def _(x, d_x, d_neg, smooth, w, d_w, bias, k_bounds, schemes, out_dtype):
    return x.new_empty((x.shape[0], w.shape[1]), dtype=out_dtype)


@gemm_prologue.register_kernel("cuda")
def _(x, d_x, d_neg, smooth, w, d_w, bias, k_bounds, schemes, out_dtype):
    from .triton_gemm import launch
    return launch(x, d_x, d_neg, w, d_w, bias, k_bounds, schemes, out_dtype, smooth=smooth, prologue=True)


def column_sums(w: Tensor, k_bounds) -> Tensor:
    """[S, N] int32 column sums of a packed [K, N] int8 weight per K segment (asymmetric scheme)."""
    return torch.stack([w[k0:k1].sum(dim=0, dtype=torch.int32) for k0, k1 in zip(k_bounds[:-1], k_bounds[1:])])


def gemm_reference(q, d_x, d_neg, w, d_w, bias, k_bounds, schemes, out_dtype, zp=None, colsum=None):
    """CPU implementation: an exact int8 GEMM (_int_mm) per segment, fp32 epilogue; e4m3
    operands (fp8 emulated on CPU) go through float64 products, exact for 8-bit values."""
    fp8 = q.dtype == torch.float8_e4m3fn
    mm = torch.matmul if fp8 else _int_mm

    def sums():   # lazily, so one segment's partial sums are alive at a time
        for s, (k0, k1) in enumerate(zip(k_bounds[:-1], k_bounds[1:])):
            qs, ws = q[:, k0:k1], w[k0:k1]
            if fp8:
                qs, ws = qs.double(), ws.double()
            yield (mm(qs.clamp(min=0), ws), mm(qs.clamp(max=0), ws)) if schemes[s] == 1 else (mm(qs, ws),)

    y = combine_segments(sums(), d_x, d_neg, d_w, bias, schemes, zp, colsum)
    return y if y.dtype == out_dtype else y.to(out_dtype)


def combine_segments(sums, d_x, d_neg, d_w, bias, schemes, zp=None, colsum=None) -> Tensor:
    """The epilogue on per-segment integer sums ((pos, neg) for DualScale, (all,) otherwise), in
    the order of fp32 operations every implementation follows (the conv op shares it)."""
    y = None
    for s, acc in enumerate(sums):
        # int32 * fp32 promotes in one pass; the rest accumulates in place (CPU epilogue cost)
        if schemes[s] == 1:
            part = torch.mul(acc[0], d_x[:, s:s + 1])
            part.add_(torch.mul(acc[1], d_neg[:, s:s + 1]))
        elif schemes[s] == 2:
            part = torch.mul(acc[0] - zp[:, s:s + 1].to(torch.int32) * colsum[s], d_x[:, s:s + 1])
        else:
            part = torch.mul(acc[0], d_x[:, s:s + 1])
        y = part if y is None else y.add_(part)
    y.mul_(d_w)
    if bias is not None:
        y.add_(bias)
    return y


EXACT_FP32_K = 1024   # 1024 products of 8-bit values: every partial sum is an integer below 2**24


def _int_mm_fp32(a: Tensor, b: Tensor) -> Tensor:
    """int8 x int8 -> int32 through fp32 GEMMs over K chunks: exact (all partial sums are
    integers below 2**24), at fp32 GEMM speed on CPUs without int8 dot instructions."""
    out = None
    for k0 in range(0, a.shape[1], EXACT_FP32_K):
        part = (a[:, k0:k0 + EXACT_FP32_K].float() @ b[k0:k0 + EXACT_FP32_K].float()).to(torch.int32)
        out = part if out is None else out.add_(part)
    return out if out is not None else a.new_zeros((a.shape[0], b.shape[1]), dtype=torch.int32)


@functools.lru_cache(maxsize=1)
def cpu_int8_gemm() -> str:
    """Which exact CPU int8 GEMM is faster here, measured once: oneDNN's `_int_mm` (fast with
    VNNI/AMX) or fp32 chunks (oneDNN falls back to a reference loop on plain AVX2, ~100x slower)."""
    import time
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
    return min(best, key=best.get)


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


def _int_mm(a: Tensor, b: Tensor) -> Tensor:
    if a.device.type == "cpu":
        if cpu_int8_gemm() == "fp32":
            return _int_mm_fp32(a, b)
        return torch._int_mm(a.contiguous(), b.contiguous())
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
