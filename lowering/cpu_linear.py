"""The CPU lowering of one quantized site: its activation quantization, then the GEMM and its
scale/bias epilogue as plain torch ops inside the traced graph (Inductor fuses the epilogue, with
what follows it: gate multiply, residual add, cast, into one pointwise kernel after the GEMM).
The quantization grid is the segquant::gemm op's (ops.py). Two GEMM forms, by what the CPU has
(`cpu_gemm()`):

- "int8": one exact int8 GEMM (oneDNN `_int_mm`, fast with VNNI/AMX) per K segment, the int32
  sums combined in fp32 in the op's order. Each segment's int8 operand is its own tensor (no
  slicing copies) and the partial outputs are summed in the epilogue (no `cat`).
- "fp32" (CPUs without int8 dot instructions, where `_int_mm` is a reference loop): the grid
  values dequantized, q * d per segment and Wq * d_w, and one fp32 GEMM (addmm) for the whole
  site whatever its segments. Same grid, fp32 summation: it differs from the integer path by
  fp32 rounding (~1e-7 relative), three orders below the quantization error.

Static steps quantize as plain ops that Inductor fuses into the producer. Dynamic steps are one
`segquant::dynamic_activation` op per input (shared by the sites that read it): traced, each
site's per-token range, rounding and dequantization became its own shape-specialized C++ kernel,
and the generated code, and the cold compile, grew with the model's sites.
"""
from __future__ import annotations

import os

import torch
from torch import Tensor

from . import low_rank, shape_generic
from .ops import LIB, cpu_int8_gemm, int_mm_onednn
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


def _segment_parts(xs: Tensor, d: Tensor, dn: Tensor, z: Tensor, scheme: int, kind: str) -> list[Tensor]:
    """One segment as the GEMM form reads it: "fp32": [its dequantized values]; "int8": [q, d, z],
    DualScale's q as its positive and negative parts with both steps [q_pos, q_neg, d, d_neg, z]
    (one scale otherwise: d_neg is d, and an op's outputs may not alias)."""
    q = _round(xs, d, dn, z, scheme)
    if kind == "fp32":
        return [dequantize_segment(q.float(), d, dn, z, scheme)]
    return [q.clamp(min=0), q.clamp(max=0), d, dn, z] if scheme == DUALSCALE else [q, d, z]


def _joined(segments: list[Tensor]) -> Tensor:
    """The "fp32" form's dequantized segments as one [M, K] (no copy for one segment)."""
    return segments[0] if len(segments) == 1 else torch.cat(segments, dim=1)


def _dynamic_segment(xs: Tensor, scheme: int, kind: str) -> list[Tensor]:
    d, dn, z = dynamic_steps(xs, scheme)
    return _segment_parts(xs, d, dn, z, scheme, kind)


@torch.library.custom_op(f"{LIB}::dynamic_activation", mutates_args=())
def dynamic_activation(x: Tensor, k_bounds: list[int], schemes: list[int], kind: str) -> list[Tensor]:
    """x [M, K] float, quantized with per-token steps per K segment: the tensors
    `quantized_activation` returns, flat ("fp32": the dequantized [M, K]; "int8": each segment's
    `_segment_parts`). Large segments run as one shape-generic compiled kernel per scheme."""
    x = x.float()
    parts = [p for xs, scheme in zip(_segments(x, k_bounds), schemes)
             for p in shape_generic.run(_dynamic_segment, xs, scheme, kind)]
    return [_joined(parts)] if kind == "fp32" else parts


@dynamic_activation.register_fake
def _(x, k_bounds, schemes, kind):
    m = x.shape[0]
    if kind == "fp32":
        return [x.new_empty((m, k_bounds[-1]), dtype=torch.float32)]
    out = []
    for k0, k1, scheme in zip(k_bounds[:-1], k_bounds[1:], schemes):
        dual = scheme == DUALSCALE
        out += [x.new_empty((m, k1 - k0), dtype=torch.int8) for _ in range(1 + dual)]
        out += [x.new_empty((m, 1), dtype=torch.float32) for _ in range(2 + dual)]
    return out


def _by_segment(flat: list[Tensor], schemes) -> list[tuple]:
    """The "int8" form's flat `_segment_parts`, per segment as cpu_linear reads them:
    (q or (q_pos, q_neg), d, d_neg, z)."""
    parts, i = [], 0
    for scheme in schemes:
        if scheme == DUALSCALE:
            parts.append(((flat[i], flat[i + 1]), *flat[i + 2:i + 5]))
            i += 5
        else:
            parts.append((flat[i], flat[i + 1], flat[i + 1], flat[i + 2]))
            i += 3
    return parts


def quantized_activation(x: Tensor, k_bounds, schemes, d_pos, d_neg, zp, kind: str):
    """x [M, K] float -> what the GEMM form reads: "fp32": the dequantized activation [M, K];
    "int8": per segment (q or (q_pos, q_neg), d, d_neg, z). Dynamic steps: one op (module
    docstring); static: plain ops."""
    if d_pos is None:
        flat = torch.ops.segquant.dynamic_activation(x, list(k_bounds), list(schemes), kind)
        return flat[0] if kind == "fp32" else _by_segment(flat, schemes)
    x = x.float()
    flat = []
    for s, (xs, scheme) in enumerate(zip(_segments(x, k_bounds), schemes)):
        d, dn = d_pos[:, s:s + 1], d_neg[:, s:s + 1]
        flat += _segment_parts(xs, d, dn, zp[:, s:s + 1] if zp is not None else torch.zeros_like(d), scheme, kind)
    if kind == "fp32":
        # NaN/Inf rows: static steps stay finite and int8 has no NaN, so they are put back
        return _joined(flat) + nonfinite_rows(x)
    return _by_segment(flat, schemes)


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
