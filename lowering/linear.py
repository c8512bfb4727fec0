"""One quantized linear site as traceable torch code: activation quantization (plain ops that
Inductor fuses into the producer; on the CPU with dynamic steps one op, lowering/cpu_linear.py)
followed by one segquant GEMM.

SVDQuant's low-rank branch (lowering/low_rank.py) runs inside the GEMM op, on CPU and CUDA alike,
in the op's order of fp32 operations (ops.py): y = <quantized site> + lr @ L2 before the cast.
Where it is computed:
- static steps with the prologue (CUDA): the kernel accumulates x @ L1 from the float x tiles it
  reads anyway and adds the up-projection in its epilogue (segquant::gemm_prologue's l1, l2);
- dynamic steps, and static ones without the prologue: the down-projection lr = x @ L1 is a
  torch matmul before the GEMM (a GEMM of its own: the activation quantization is plain torch
  ops that Inductor fuses into the producer, and a matmul does not fuse there), the
  up-projection in the GEMM op's epilogue (its lr, l2);
- CPU sites as plain ops (cpu_linear): the same down-projection and the up-projection added in
  fp32 before the cast (low_rank.up_into), the numbers of the op's reference;
- weight-only formats: beside the op, (x @ L1) @ L2 in the activation's dtype added after the
  cast (their kernel takes no branch)."""
from __future__ import annotations

import torch
from torch import Tensor

from . import low_rank
from . import ops  # noqa: F401  (registers torch.ops.segquant)
from .cpu_linear import cpu_linear, quantized_activation
from .quantize import ASYMMETRIC, nonfinite_rows, quantize_dynamic, quantize_static
from .formats import Format


def quantized_linear(x: Tensor, w: Tensor, d_w: Tensor | None, bias: Tensor | None, d_pos: Tensor | None,
                     d_neg: Tensor | None, zp: Tensor | None, smooth: Tensor | None, colsum: Tensor | None,
                     k_bounds: tuple[int, ...], schemes: tuple[int, ...], prologue: bool = False,
                     fmt: str = "int8", cpu_gemm: str | None = None, activation=None,
                     g_bounds: tuple[int, ...] | None = None, l1: Tensor | None = None,
                     l2: Tensor | None = None) -> Tensor:
    """y = x @ W^T + b with int8 W (packed [K, N]; with cpu_gemm "fp32" and d_w None, the
    dequantized fp32 weight); static steps d_pos/d_neg/zp [1, S] or dynamic
    when d_pos is None; `schemes` one code per K segment (lowering/quantize.py); colsum [S, N] for
    asymmetric segments. `prologue`: static steps applied inside the GEMM kernel. `cpu_gemm`
    ("int8" | "fp32", decided outside tracing): the site as plain torch ops on CPU (cpu_linear.py);
    `activation`: its quantized input there, when sites share it. 4-bit formats: `w` packed two
    per byte, d_w [G, N] per K group of `g_bounds`; weight-only formats: x stays float. `l1`,
    `l2`: SVDQuant's low-rank branch (lowering/low_rank.py), added in the GEMM's fp32 epilogue
    (module docstring)."""
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    if Format(fmt).weight_only:
        y = _weight_only(x2, w, d_w, bias, g_bounds, fmt, cpu_gemm)
        if l1 is not None:
            y = y + low_rank.apply(x2, l1, l2).to(y.dtype)
        return y.reshape(*lead, w.shape[1])
    k_bounds, schemes = list(k_bounds), list(schemes)
    if prologue and d_pos is not None:   # the down-projection in the kernel, from the x it reads
        y = torch.ops.segquant.gemm_prologue(x2, d_pos, d_neg, smooth, w, d_w, bias, k_bounds, schemes, x.dtype,
                                             l1, l2)
        return y.reshape(*lead, w.shape[1])
    lr = low_rank.down(x2, l1) if l1 is not None else None   # of the raw input (L1 holds the divisor)
    if smooth is not None:
        x2 = x2 / smooth
    if cpu_gemm is not None and x.device.type == "cpu":   # plain ops: Inductor fuses the epilogue
        y = cpu_linear(x2, w, d_w, bias, d_pos, d_neg, zp, colsum, k_bounds, schemes, cpu_gemm, x.dtype, activation,
                       branch=(lr, l2) if lr is not None else None)
        return y.reshape(*lead, w.shape[1])
    if d_pos is None:   # dynamic: a NaN/Inf row gets a NaN/Inf step, so its output stays non-finite
        q, d_pos, d_neg, zp = quantize_dynamic(x2, k_bounds, schemes, fmt)
        zp = zp if ASYMMETRIC in schemes else None   # all zeros otherwise: traced away
        y = _gemm(q, d_pos, d_neg, w, d_w, bias, k_bounds, schemes, x.dtype, zp, colsum, g_bounds, lr, l2)
    else:
        q = quantize_static(x2, k_bounds, schemes, d_pos, d_neg, zp, fmt)
        y = _gemm(q, d_pos, d_neg, w, d_w, bias, k_bounds, schemes, x.dtype, zp, colsum, g_bounds, lr, l2)
        y = y + nonfinite_rows(x2).to(y.dtype)
    return y.reshape(*lead, w.shape[1])


def _weight_only(x2, w, d_w, bias, g_bounds, fmt, cpu_gemm) -> Tensor:
    if cpu_gemm is not None and x2.device.type == "cpu":   # w: the dequantized weight
        y = torch.addmm(bias.float(), x2.float(), w) if bias is not None else x2.float() @ w
        return y.to(x2.dtype)
    return torch.ops.segquant.gemm_weight_only(x2, w, d_w, bias, list(g_bounds or ()), Format(fmt).weight_bits, x2.dtype)


def _gemm(q, d_pos, d_neg, w, d_w, bias, k_bounds, schemes, out_dtype, zp, colsum, g_bounds, lr=None, l2=None):
    """The segquant GEMM op of the weight's format: int8/fp8 weights, or int4 in K groups (w4a8)."""
    if g_bounds is None:
        return torch.ops.segquant.gemm(q, d_pos, d_neg, w, d_w, bias, k_bounds, schemes, out_dtype, zp, colsum, lr, l2)
    return torch.ops.segquant.gemm_w4(q, d_pos, d_neg, w, d_w, bias, k_bounds, list(g_bounds), schemes, out_dtype,
                                      zp, colsum, lr, l2)


def shared_activation(x: Tensor, k_bounds: tuple[int, ...], schemes: tuple[int, ...], cpu_gemm: str):
    """The dynamic quantized activation several CPU sites read (q/k/v projections of one input):
    computed once; each site's `quantized_linear(..., activation=...)` takes it."""
    return quantized_activation(x.reshape(-1, x.shape[-1]), list(k_bounds), list(schemes), None, None, None, cpu_gemm)
