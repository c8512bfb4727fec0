"""The CPU lowering of one quantized site as plain torch ops inside the traced graph: Inductor
fuses the activation quantization into its producer and the scale/bias epilogue (with what
follows it: gate multiply, residual add, cast) into one pointwise kernel after the GEMM, and no
custom op is dispatched per call. The quantization grid is the segquant::gemm op's (ops.py);
two GEMM forms, by what the CPU has (`cpu_gemm()`):

- "int8": one exact int8 GEMM (oneDNN `_int_mm`, fast with VNNI/AMX) per K segment, the int32
  sums combined in fp32 in the op's order. Each segment's int8 operand is its own tensor (no
  slicing copies) and the partial outputs are summed in the epilogue (no `cat`).
- "fp32" (CPUs without int8 dot instructions, where `_int_mm` is a reference loop): the grid
  values dequantized, q * d per segment and Wq * d_w, and one fp32 GEMM (addmm) for the whole
  site whatever its segments. Same grid, fp32 summation: it differs from the integer path by
  fp32 rounding (~1e-7 relative), three orders below the quantization error.
"""
from __future__ import annotations

import os

import torch
from torch import Tensor

from . import low_rank
from .ops import cpu_int8_gemm, int_mm_onednn
from .quantize import ASYMMETRIC, DUALSCALE, _round, _segments, dequantize_segment, dynamic_steps, nonfinite_rows

CPU_GEMMS = ("int8", "fp32")
ENV = "SEGQUANT_CPU_GEMM"


def cpu_gemm() -> str:
    """The CPU GEMM form: $SEGQUANT_CPU_GEMM if set, else the faster one measured here."""
    forced = os.environ.get(ENV)
    if forced:
        if forced not in CPU_GEMMS:
            raise ValueError(f"segquant: {ENV}={forced!r}; expected one of {CPU_GEMMS}")
        return forced
    return "int8" if cpu_int8_gemm() == "onednn" else "fp32"


def segment_steps(x: Tensor, k_bounds, schemes, d_pos, d_neg, zp):
    """Per segment (x_s, d, d_neg, z): the static steps [1, 1] given, or per-token steps [M, 1]
    computed here (the dynamic quantizer's rule, lowering/quantize.py)."""
    out = []
    for s, xs in enumerate(_segments(x, k_bounds)):
        if d_pos is None:
            d, dn, z = dynamic_steps(xs, schemes[s])
        else:
            d, dn = d_pos[:, s:s + 1], d_neg[:, s:s + 1]
            z = zp[:, s:s + 1] if zp is not None else torch.zeros_like(d)
        out.append((xs, d, dn, z))
    return out


def quantized_activation(x: Tensor, k_bounds, schemes, d_pos, d_neg, zp, kind: str):
    """x [M, K] float -> what the GEMM form reads: "fp32": the dequantized activation [M, K];
    "int8": per segment (q or (q_pos, q_neg), d, d_neg, z)."""
    x = x.float()
    parts = []
    for (xs, d, dn, z), scheme in zip(segment_steps(x, k_bounds, schemes, d_pos, d_neg, zp), schemes):
        q = _round(xs, d, dn, z, scheme)
        if kind == "fp32":
            parts.append(dequantize_segment(q.float(), d, dn, z, scheme))
        else:
            parts.append(((q.clamp(min=0), q.clamp(max=0)) if scheme == DUALSCALE else q, d, dn, z))
    if kind == "fp32":
        # NaN/Inf rows: a dynamic step is then non-finite too; a static one is not (int8 has no NaN)
        xq = parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)
        return xq if d_pos is None else xq + nonfinite_rows(x)
    return parts


def cpu_linear(x: Tensor, w: Tensor, d_w: Tensor, bias: Tensor | None, d_pos, d_neg, zp, colsum,
               k_bounds, schemes, kind: str, out_dtype: torch.dtype, activation=None, branch=None) -> Tensor:
    """y [M, N] = x @ W^T + b on the int8 grid; w: the packed int8 [K, N] with its steps d_w, or
    for "fp32" with d_w None the dequantized weight (QuantState.dequantized); `activation`:
    quantized_activation's result when several sites share it (same input, same steps);
    `branch`: (lr, l2), the low-rank branch's up-projection added in fp32 after the bias, as the
    GEMM op adds it (low_rank.up_into)."""
    a = activation if activation is not None else quantized_activation(x, k_bounds, schemes, d_pos, d_neg, zp, kind)
    b = bias.float() if bias is not None else None
    if kind == "fp32":
        wf = w if d_w is None else w.float() * d_w
        y = torch.addmm(b, a, wf) if b is not None else a @ wf
        if branch is not None:
            y = low_rank.up_into(y, *branch)
        return y.to(out_dtype)
    y, negatives = None, []
    for s, ((q, d, dn, z), k0, k1) in enumerate(zip(a, k_bounds[:-1], k_bounds[1:])):
        ws = w[k0:k1]
        if isinstance(q, tuple):   # DualScale: two dots, one weight; the negative part added last
            part = int_mm_onednn(q[0], ws) * d
            negatives.append(int_mm_onednn(q[1], ws) * dn)
        elif schemes[s] == ASYMMETRIC:
            part = (int_mm_onednn(q, ws) - z.to(torch.int32) * colsum[s]) * d
        else:
            part = int_mm_onednn(q, ws) * d
        y = part if y is None else y + part
    for part in negatives:    # the op's order (ops.combine_segments)
        y = y + part
    y = y * d_w
    if b is not None:
        y = y + b
    if branch is not None:
        y = low_rank.up_into(y, *branch)
    if d_pos is not None:
        y = y + nonfinite_rows(x)
    return y.to(out_dtype)
