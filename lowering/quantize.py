"""Quantizers in plain torch ops (Inductor fuses the activation ones into their producer).

Scales are step sizes: x ~= q * d. Symmetric int8 uses [-127, 127]; DualScale uses
d_pos = amax_pos / 127 on [0, 127] and d_neg = amax_neg / 128 on [-128, 0]. The fp8 format
(e4m3) uses +-448 on both sides and rounds by the cast.
"""
from __future__ import annotations

import torch
from torch import Tensor

EPS = 1e-12
FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0
# (positive limit, negative limit) per format
LIMITS = {"int8": (127.0, 128.0), "fp8": (FP8_MAX, FP8_MAX)}


def weight_steps(w: Tensor, out_bounds: tuple[int, ...] | None = None, fmt: str = "int8") -> Tensor:
    """Per-output-channel steps of a [N, K] weight; with `out_bounds`, one step per output
    segment (per-tensor mode), broadcast back to N."""
    amax = w.detach().abs().amax(dim=1).float()
    if out_bounds is not None:
        for a, b in zip(out_bounds[:-1], out_bounds[1:]):
            amax[a:b] = amax[a:b].max()
    return (amax / LIMITS[fmt][0]).clamp(min=EPS)


def quantize_weight(w: Tensor, steps: Tensor, fmt: str = "int8") -> Tensor:
    """[N, K] float -> [K, N] int8 (or e4m3), packed for the GEMM."""
    x = w.detach().float() / steps[:, None]
    q = x.clamp(-FP8_MAX, FP8_MAX).to(FP8) if fmt == "fp8" else torch.round(x).clamp(-127, 127).to(torch.int8)
    return q.t().contiguous()


def _segments(x: Tensor, k_bounds: list[int]):
    return [x[:, a:b] for a, b in zip(k_bounds[:-1], k_bounds[1:])]


def quantize_dynamic(x: Tensor, k_bounds: list[int], dual: list[int], fmt: str = "int8"):
    """Per token and per K segment. x [M, K] float -> (q int8 [M, K], d [M, S], d_neg [M, S])."""
    xf = x.float()
    pos_lim, neg_lim = LIMITS[fmt]
    steps, negs, qs = [], [], []
    for xs, is_dual in zip(_segments(xf, k_bounds), dual):
        if is_dual:
            d = (xs.amax(dim=1, keepdim=True).clamp(min=0) / pos_lim).clamp(min=EPS)
            dn = ((-xs).amax(dim=1, keepdim=True).clamp(min=0) / neg_lim).clamp(min=EPS)
        else:
            d = (xs.abs().amax(dim=1, keepdim=True) / pos_lim).clamp(min=EPS)
            dn = d
        qs.append(_round(xs, d, dn, is_dual, fmt))
        steps.append(d)
        negs.append(dn)
    return torch.cat(qs, dim=1), torch.cat(steps, dim=1), torch.cat(negs, dim=1)


def quantize_static(x: Tensor, k_bounds: list[int], dual: list[int], d: Tensor, d_neg: Tensor,
                    fmt: str = "int8") -> Tensor:
    """With calibrated per-segment steps d, d_neg [1, S]: x [M, K] -> q int8 [M, K]."""
    xf = x.float()
    qs = [_round(xs, d[:, i:i + 1], d_neg[:, i:i + 1], is_dual, fmt)
          for i, (xs, is_dual) in enumerate(zip(_segments(xf, k_bounds), dual))]
    return torch.cat(qs, dim=1)


def _round(xs: Tensor, d: Tensor, dn: Tensor, is_dual, fmt: str = "int8") -> Tensor:
    if fmt == "fp8":
        scaled = torch.where(xs >= 0, xs / d, xs / dn) if is_dual else xs / d
        return scaled.clamp(-FP8_MAX, FP8_MAX).to(FP8)
    if is_dual:
        pos = torch.round(xs / d).clamp(0, 127)
        neg = torch.round(xs / dn).clamp(-128, 0)
        return torch.where(xs >= 0, pos, neg).to(torch.int8)
    return torch.round(xs / d).clamp(-127, 127).to(torch.int8)


def dequantize(q: Tensor, k_bounds: list[int], dual: list[int], d: Tensor, d_neg: Tensor) -> Tensor:
    """Inverse of the activation quantizers (for tests and SQNR)."""
    out = []
    for i, (qs, is_dual) in enumerate(zip(_segments(q.float(), k_bounds), dual)):
        if is_dual:
            out.append(torch.where(qs >= 0, qs * d[:, i:i + 1], qs * d_neg[:, i:i + 1]))
        else:
            out.append(qs * d[:, i:i + 1])
    return torch.cat(out, dim=1)


def static_steps(pos_max: Tensor, neg_max: Tensor, dual: list[int], fmt: str = "int8") -> tuple[Tensor, Tensor]:
    """Calibrated ranges per segment [S] (all > 0 on some side) -> steps (d [1, S], d_neg [1, S]).
    A DualScale segment seen one-signed takes the other side's step for its empty side rather
    than a vanishing one (a value of that sign at inference is then not crushed to zero)."""
    pos_lim, neg_lim = LIMITS[fmt]
    amax = torch.maximum(pos_max, neg_max)
    if not bool((amax > 0).all()):
        raise ValueError("segquant: a segment with a zero calibrated range has no static step")
    dual_t = torch.tensor(dual, dtype=torch.bool)
    d_pos = torch.where(pos_max > 0, pos_max / pos_lim, neg_max / neg_lim)
    d_neg = torch.where(neg_max > 0, neg_max / neg_lim, pos_max / pos_lim)
    d = torch.where(dual_t, d_pos, amax / pos_lim)
    dn = torch.where(dual_t, d_neg, amax / pos_lim)
    return d[None].float(), dn[None].float()


def nonfinite_rows(x: Tensor) -> Tensor:
    """[M, 1]: 0 for finite rows, NaN for rows holding NaN or Inf. Added to a static-step GEMM's
    output, it keeps a non-finite input non-finite (int8 has no NaN; a plain cast would hide it)."""
    return (x - x).sum(dim=-1, keepdim=True)


def sqnr_db(ref: Tensor, out: Tensor) -> float:
    ref, out = ref.double(), out.double()
    noise = (ref - out).pow(2).sum()
    return float(10 * torch.log10(ref.pow(2).sum() / noise.clamp(min=1e-30)))
