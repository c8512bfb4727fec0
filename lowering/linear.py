"""One quantized linear site as traceable torch code: activation quantization (plain ops that
Inductor fuses into the producer) followed by one segquant GEMM."""
from __future__ import annotations

import torch
from torch import Tensor

from . import ops  # noqa: F401  (registers torch.ops.segquant)
from .quantize import ASYMMETRIC, nonfinite_rows, quantize_dynamic, quantize_static


def quantized_linear(x: Tensor, w: Tensor, d_w: Tensor, bias: Tensor | None, d_x: Tensor | None,
                     d_neg: Tensor | None, zp: Tensor | None, smooth: Tensor | None, colsum: Tensor | None,
                     k_bounds: tuple[int, ...], schemes: tuple[int, ...], prologue: bool = False,
                     fmt: str = "int8") -> Tensor:
    """y = x @ W^T + b with int8 W (packed [K, N]); static steps d_x/d_neg/zp [1, S] or dynamic
    when d_x is None; `schemes` one code per K segment (lowering/quantize.py); colsum [S, N] for
    asymmetric segments. `prologue`: static steps applied inside the GEMM kernel."""
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    k_bounds, schemes = list(k_bounds), list(schemes)
    if prologue and d_x is not None:
        y = torch.ops.segquant.gemm_prologue(x2, d_x, d_neg, smooth, w, d_w, bias, k_bounds, schemes, x.dtype)
        return y.reshape(*lead, w.shape[1])
    if smooth is not None:
        x2 = x2 / smooth
    if d_x is None:   # dynamic: a NaN/Inf row gets a NaN/Inf step, so its output stays non-finite
        q, d_x, d_neg, zp = quantize_dynamic(x2, k_bounds, schemes, fmt)
        zp = zp if ASYMMETRIC in schemes else None   # all zeros otherwise: traced away
        y = torch.ops.segquant.gemm(q, d_x, d_neg, w, d_w, bias, k_bounds, schemes, x.dtype, zp, colsum)
    else:
        q = quantize_static(x2, k_bounds, schemes, d_x, d_neg, zp, fmt)
        y = torch.ops.segquant.gemm(q, d_x, d_neg, w, d_w, bias, k_bounds, schemes, x.dtype, zp, colsum)
        y = y + nonfinite_rows(x2).to(y.dtype)
    return y.reshape(*lead, w.shape[1])
