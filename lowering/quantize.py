"""Quantizers in plain torch ops (Inductor fuses the activation ones into their producer).

Scales are step sizes: x ~= q * d. Per K segment, one scheme (codes as the GEMM op takes them):
  0 symmetric:  q = round(x / d) on [-127, 127], d = amax / 127
  1 DualScale:  d_pos = amax_pos / 127 on [0, 127] and d_neg = amax_neg / 128 on [-128, 0]
  2 asymmetric: x ~= (q - z) * d on [-128, 127], d = (max - min) / 255 with 0 inside the range,
                z = round(-min / d) - 128 (an integer, carried as float)
The fp8 format (e4m3) uses +-448 on both sides and rounds by the cast (no asymmetric scheme).
Each activation quantizer returns or takes (d, d_neg, zp), [M or 1, S] each: d_neg = d on
non-DualScale segments, zp = 0 on non-asymmetric ones.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .formats import Format, Scheme

EPS = 1e-12
FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0
# (positive limit, negative limit) per format
LIMITS = {"int8": (127.0, 128.0), "fp8": (FP8_MAX, FP8_MAX)}
SYMMETRIC, DUALSCALE, ASYMMETRIC = (s.code for s in Scheme)   # the ops' int codes of each Scheme


CLIP_RATIOS = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7)
# 15 levels: the best clip sits lower (rounding error dominates clipping error for longer)
CLIP_RATIOS_INT4 = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7, 0.65, 0.6, 0.55, 0.5)


def weight_steps(w: Tensor, out_bounds: tuple[int, ...] | None = None, fmt: str = "int8",
                 clip: str = "absmax") -> Tensor:
    """Per-output-channel steps of a [N, K] weight; with `out_bounds`, one step per output
    segment (per-tensor mode), broadcast back to N. clip="mse": per channel, the clipped range
    (CLIP_RATIOS of absmax) whose rounding error is smallest (int8 per channel only)."""
    amax = w.detach().abs().amax(dim=1).float()
    if clip == "mse" and fmt == "int8" and out_bounds is None:
        amax = amax * mse_clip_ratio(w.detach().float(), amax, 127.0, CLIP_RATIOS)
    if out_bounds is not None:
        for a, b in zip(out_bounds[:-1], out_bounds[1:]):
            amax[a:b] = amax[a:b].max()
    return (amax / LIMITS[grid(fmt)][0]).clamp(min=EPS)


def mse_clip_ratio(w: Tensor, amax: Tensor, limit: float, ratios) -> Tensor:
    """Per row of w [N, K]: the ratio of its absmax whose symmetric grid (+-limit) rounds the
    row with the smallest squared error."""
    best_err, best = None, torch.ones_like(amax)
    for r in ratios:
        step = (amax * r / limit).clamp(min=EPS)[:, None]
        err = (torch.round(w / step).clamp(-limit, limit) * step - w).pow(2).sum(dim=1)
        if best_err is None:
            best_err = err
        else:
            better = err < best_err
            best_err, best = torch.where(better, err, best_err), torch.where(better, torch.full_like(best, r), best)
    return best


def quantize_weight(w: Tensor, steps: Tensor, fmt: str = "int8") -> Tensor:
    """[N, K] float -> [K, N] int8 (or e4m3), packed for the GEMM."""
    x = w.detach().float() / steps[:, None]
    q = x.clamp(-FP8_MAX, FP8_MAX).to(FP8) if fmt == "fp8" else torch.round(x).clamp(-127, 127).to(torch.int8)
    return q.t().contiguous()


# 4-bit weights (w4a8, int4-weight-only): symmetric grid [-7, 7], one step per output channel and
# K group; groups never straddle a K segment (a segment's last group may be shorter).
INT4_MAX = 7.0
GROUP_SIZES = (64, 128)


def group_bounds(k_bounds, group_size: int) -> tuple[int, ...]:
    """K bounds of the weight groups: each segment cut every `group_size` (the bounds refine
    k_bounds, so a segment boundary is always a group boundary)."""
    out = [k_bounds[0]]
    for k0, k1 in zip(k_bounds[:-1], k_bounds[1:]):
        out.extend(min(k, k1) for k in range(k0 + group_size, k1 + group_size, group_size))
    return tuple(out)


def segment_groups(k_bounds, g_bounds) -> list[int]:
    """S + 1 group indices: segment s holds the groups [out[s], out[s + 1]). A ValueError unless
    the (strictly increasing) group bounds refine the segment bounds."""
    g_bounds = list(g_bounds)
    if (any(b <= a for a, b in zip(g_bounds, g_bounds[1:])) or not set(k_bounds) <= set(g_bounds)
            or g_bounds[0] != k_bounds[0] or g_bounds[-1] != k_bounds[-1]):
        raise ValueError(f"segquant: group bounds {g_bounds} do not refine the K segments {list(k_bounds)}")
    return [g_bounds.index(k) for k in k_bounds]


def int4_steps(w: Tensor, g_bounds, clip: str = "absmax") -> Tensor:
    """[G, N] steps of a [N, K] float weight: absmax / 7 per output channel and K group; clip="mse":
    the clipped range (CLIP_RATIOS_INT4 of absmax) that rounds the group with the smallest error."""
    w = w.detach().float()
    return torch.stack([int4_group_step(w[:, a:b], clip) for a, b in zip(g_bounds[:-1], g_bounds[1:])])


def int4_group_step(wg: Tensor, clip: str = "absmax") -> Tensor:
    """[N] steps of one K group's columns wg [N, g] (GPTQ takes them group by group)."""
    amax = wg.abs().amax(dim=1)
    if clip == "mse":
        amax = amax * mse_clip_ratio(wg, amax, INT4_MAX, CLIP_RATIOS_INT4)
    return (amax / INT4_MAX).clamp(min=EPS)


def expand_groups(steps: Tensor, g_bounds) -> Tensor:
    """[G, N] group steps -> [K, N] (each group's row repeated over its K range)."""
    sizes = torch.tensor([b - a for a, b in zip(g_bounds[:-1], g_bounds[1:])], device=steps.device)
    return steps.repeat_interleave(sizes, dim=0)


def round_int4(w: Tensor, steps: Tensor, g_bounds) -> Tensor:
    """[N, K] float -> [K, N] int8 holding the int4 grid values (round to nearest)."""
    x = w.detach().float().t() / expand_groups(steps, g_bounds)
    return torch.round(x).clamp(-INT4_MAX, INT4_MAX).to(torch.int8)


def pack_int4(q: Tensor) -> Tensor:
    """[K, N] int8 values in [-8, 7] -> [ceil(K / 2), N] int8 bytes, two K rows per byte: row 2j
    in the low nibble, row 2j + 1 in the high one (an odd K pads a zero nibble)."""
    if q.shape[0] % 2:
        q = torch.cat([q, q.new_zeros((1, q.shape[1]))])
    lo, hi = q[0::2].to(torch.int16) & 0xF, q[1::2].to(torch.int16) & 0xF
    b = lo | (hi << 4)
    return torch.where(b > 127, b - 256, b).to(torch.int8)


def unpack_int4(packed: Tensor, k: int) -> Tensor:
    """Inverse of pack_int4: [ceil(K / 2), N] bytes -> [K, N] int8 (sign-extended nibbles)."""
    b = packed.to(torch.int16) & 0xFF
    lo, hi = b & 0xF, b >> 4
    q = torch.stack([lo, hi], dim=1).reshape(-1, packed.shape[1])[:k]
    return torch.where(q > 7, q - 16, q).to(torch.int8)


def grid(fmt: str) -> str:
    """The 8-bit grid of a format's activations and 8-bit weights: "fp8" or "int8" (w4a8 and
    the weight-only formats included)."""
    return Format(fmt).grid


def pack_weight(w: Tensor, lowering, rounded: tuple[Tensor, Tensor] | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """A [N, K] float weight under a SiteLowering -> (packed, steps, grid values [K, N]): 8-bit
    formats [K, N] with per-channel steps [N]; 4-bit formats [ceil(K/2), N] bytes with steps [G, N]
    per K group; rounded to nearest unless `rounded` gives (grid, steps) (error-compensated).
    The packed weight is in the memory layout its GEMM reads on w's device (packed_layout)."""
    if lowering.group_size is not None:
        g = lowering.g_bounds
        q, steps = rounded if rounded is not None else (None, int4_steps(w, g, lowering.weight_clip))
        q = round_int4(w, steps, g) if q is None else q
        return pack_int4(q), steps, q
    if rounded is not None:
        return packed_layout(rounded[0], lowering.format, w.device), rounded[1], rounded[0]
    fmt = grid(lowering.format)
    steps = weight_steps(w, lowering.out_bounds, fmt, lowering.weight_clip)
    q = quantize_weight(w, steps, fmt)
    return packed_layout(q, lowering.format, w.device), steps, q


# Formats whose packed weight is an 8-bit tensor-core operand as it is stored (the 4-bit and
# weight-only kernels convert the weight tile in registers first)
K_MAJOR_FORMATS = ("int8", "fp8")


def packed_layout(packed: Tensor, fmt: str, device=None) -> Tensor:
    """A packed weight of format `fmt` (logical shape [K, N] everywhere) on `device` (default: its
    own), in the memory layout that device's GEMM reads. CUDA, 8-bit formats: K-major, the
    transpose view of a contiguous [N, K] (strides (1, K)): wgmma reads 8-bit operands K-major,
    so only then are both tiles copied asynchronously on sm_90 (`segquant codegen-check`, whose
    verdict the pruner's table holds, compiles this layout). Elsewhere (the CPU forms' _int_mm
    and fp32 GEMMs, the interpreter, the 4-bit formats) contiguous [K, N], the layout a saved
    file holds: `persist` saves `.contiguous()` and its load calls this."""
    device = packed.device if device is None else torch.device(device)
    packed = packed.to(device)
    return k_major(packed) if reads_k_major(fmt, device) else packed.contiguous()


def reads_k_major(fmt: str, device) -> bool:
    """Whether the GEMM of format `fmt` reads its packed weight K-major on `device` (packed_layout)."""
    return torch.device(device).type == "cuda" and fmt in K_MAJOR_FORMATS


def k_major(w: Tensor) -> Tensor:
    """[K, N] with the same values, stored K-major (strides (1, K)); a no-op if it already is."""
    return w.t().contiguous().t()


def dequantized_weight(packed: Tensor, steps: Tensor, lowering) -> Tensor:
    """A site's packed weight as fp32 [K, N] (its grid values times their steps)."""
    return dequantize_weight(packed, steps, lowering.g_bounds, lowering.weight_bits, lowering.in_features)


def dequantize_weight(w: Tensor, d_w: Tensor, g_bounds, bits: int, k: int) -> Tensor:
    """[K, N] fp32 weight: 8-bit [K, N] grid values times d_w [N], or packed int4
    [ceil(K/2), N] times d_w [G, N] over each group's K range."""
    if bits == 8:
        return w.float() * d_w
    if bits == 4:
        return unpack_int4(w, k).float() * expand_groups(d_w, g_bounds)
    raise ValueError(f"segquant: weight-only bits must be 8 or 4, got {bits}")


def _segments(x: Tensor, k_bounds: list[int]):
    return [x[:, a:b] for a, b in zip(k_bounds[:-1], k_bounds[1:])]


def quantize_dynamic(x: Tensor, k_bounds: list[int], schemes: list[int], fmt: str = "int8"):
    """Per token and per K segment. x [M, K] float -> (q [M, K], d, d_neg, zp [M, S])."""
    xf = x.float()
    steps, negs, zps, qs = [], [], [], []
    for xs, scheme in zip(_segments(xf, k_bounds), schemes):
        d, dn, z = dynamic_steps(xs, scheme, fmt)
        qs.append(_round(xs, d, dn, z, scheme, fmt))
        steps.append(d)
        negs.append(dn)
        zps.append(z)
    return torch.cat(qs, dim=1), torch.cat(steps, dim=1), torch.cat(negs, dim=1), torch.cat(zps, dim=1)


def dynamic_steps(xs: Tensor, scheme: int, fmt: str = "int8") -> tuple[Tensor, Tensor, Tensor]:
    """One segment's per-token (d, d_neg, z), [M, 1] each."""
    pos_lim, neg_lim = LIMITS[grid(fmt)]
    z = torch.zeros_like(xs[:, :1])
    if scheme == DUALSCALE:
        d = (xs.amax(dim=1, keepdim=True).clamp(min=0) / pos_lim).clamp(min=EPS)
        dn = ((-xs).amax(dim=1, keepdim=True).clamp(min=0) / neg_lim).clamp(min=EPS)
        return d, dn, z
    if scheme == ASYMMETRIC:
        hi = xs.amax(dim=1, keepdim=True).clamp(min=0)
        lo = xs.amin(dim=1, keepdim=True).clamp(max=0)
        d, z = asymmetric_step(hi, -lo)
        return d, d, z
    d = (xs.abs().amax(dim=1, keepdim=True) / pos_lim).clamp(min=EPS)
    return d, d, z


def asymmetric_step(pos_max: Tensor, neg_max: Tensor) -> tuple[Tensor, Tensor]:
    """Range [-neg_max, pos_max] (both >= 0, so 0 is inside) -> (d, z) on [-128, 127]."""
    d = ((pos_max + neg_max) / 255).clamp(min=EPS)
    z = (torch.round(neg_max / d) - 128).clamp(-128, 127)
    return d, z


def quantize_static(x: Tensor, k_bounds: list[int], schemes: list[int], d: Tensor, d_neg: Tensor,
                    zp: Tensor | None = None, fmt: str = "int8") -> Tensor:
    """With calibrated per-segment steps d, d_neg and zero points zp [1, S]: x [M, K] -> q [M, K]."""
    xf = x.float()
    qs = [_round(xs, d[:, i:i + 1], d_neg[:, i:i + 1], zp[:, i:i + 1] if zp is not None else None, scheme, fmt)
          for i, (xs, scheme) in enumerate(zip(_segments(xf, k_bounds), schemes))]
    return torch.cat(qs, dim=1)


def _round(xs: Tensor, d: Tensor, dn: Tensor, z: Tensor | None, scheme: int, fmt: str = "int8") -> Tensor:
    if fmt == "fp8":
        scaled = torch.where(xs >= 0, xs / d, xs / dn) if scheme == DUALSCALE else xs / d
        return scaled.clamp(-FP8_MAX, FP8_MAX).to(FP8)
    if scheme == DUALSCALE:
        pos = torch.round(xs / d).clamp(0, 127)
        neg = torch.round(xs / dn).clamp(-128, 0)
        return torch.where(xs >= 0, pos, neg).to(torch.int8)
    if scheme == ASYMMETRIC:
        return (torch.round(xs / d) + z).clamp(-128, 127).to(torch.int8)
    return torch.round(xs / d).clamp(-127, 127).to(torch.int8)


def dequantize(q: Tensor, k_bounds: list[int], schemes: list[int], d: Tensor, d_neg: Tensor,
               zp: Tensor | None = None) -> Tensor:
    """Inverse of the activation quantizers (for tests and SQNR)."""
    return torch.cat([dequantize_segment(qs, d[:, i:i + 1], d_neg[:, i:i + 1],
                                         zp[:, i:i + 1] if zp is not None else None, scheme)
                      for i, (qs, scheme) in enumerate(zip(_segments(q.float(), k_bounds), schemes))], dim=1)


def dequantize_segment(qs: Tensor, d: Tensor, dn: Tensor, z: Tensor | None, scheme: int) -> Tensor:
    """One segment's grid values (float) times its steps: the inverse of `_round`."""
    if scheme == DUALSCALE:
        return torch.where(qs >= 0, qs * d, qs * dn)
    if scheme == ASYMMETRIC:
        return (qs - z) * d
    return qs * d


def static_steps(pos_max: Tensor, neg_max: Tensor, schemes: list[int], fmt: str = "int8"
                 ) -> tuple[Tensor, Tensor, Tensor]:
    """Calibrated ranges per segment [S] (all > 0 on some side) -> (d, d_neg, zp), [1, S] each.
    A DualScale segment seen one-signed takes the other side's step for its empty side rather
    than a vanishing one (a value of that sign at inference is then not crushed to zero)."""
    pos_lim, neg_lim = LIMITS[grid(fmt)]
    pos_max, neg_max = pos_max.float(), neg_max.float()
    amax = torch.maximum(pos_max, neg_max)
    if not bool((amax > 0).all()):
        raise ValueError("segquant: a segment with a zero calibrated range has no static step")
    code = torch.tensor(schemes)
    d_pos = torch.where(pos_max > 0, pos_max / pos_lim, neg_max / neg_lim)
    d_neg = torch.where(neg_max > 0, neg_max / neg_lim, pos_max / pos_lim)
    d_asym, z = asymmetric_step(pos_max, neg_max)
    d = torch.where(code == DUALSCALE, d_pos, torch.where(code == ASYMMETRIC, d_asym, amax / pos_lim))
    dn = torch.where(code == DUALSCALE, d_neg, d)
    zp = torch.where(code == ASYMMETRIC, z, torch.zeros_like(z))
    return d[None], dn[None], zp[None]


def nonfinite_rows(x: Tensor) -> Tensor:
    """[M, 1]: 0 for finite rows, NaN for rows holding NaN or Inf. Added to a static-step GEMM's
    output, it keeps a non-finite input non-finite (int8 has no NaN; a plain cast would hide it)."""
    return (x - x).sum(dim=-1, keepdim=True)


def sqnr_db(ref: Tensor, out: Tensor) -> float:
    ref, out = ref.double(), out.double()
    noise = (ref - out).pow(2).sum()
    return float(10 * torch.log10(ref.pow(2).sum() / noise.clamp(min=1e-30)))
