"""dualscale="auto": the activation scheme of each K segment, chosen by the output SQNR measured
on real rows (calibration rows when static, the first call's rows when dynamic).

Rule: the better of symmetric and asymmetric (one integer dot each), unless DualScale beats that
by at least DUALSCALE_MARGIN_DB. DualScale runs two dots on its segment: on H100/H200, where
int8 peak is 2x bf16, that segment runs at about bf16 speed, so it must buy a clear gain. 1 dB
is 21% less noise power."""
from __future__ import annotations

import torch
from torch import Tensor

from . import quantize as Q
from .formats import Scheme

DUALSCALE_MARGIN_DB = 1.0
CANDIDATES = (Scheme.SYMMETRIC, Scheme.ASYMMETRIC, Scheme.DUALSCALE)


def segment_sqnr(rows: Tensor, weight: Tensor, dequantized: Tensor, k_bounds: tuple[int, ...], static: bool,
                 fmt: str = "int8", groups: int = 1) -> list[dict[str, float]]:
    """Per K segment, the SQNR (dB) of that segment's contribution to the output under each
    candidate scheme, weight quantized as it runs. rows [R, K] float; weight [N, K] float;
    dequantized [K, N]: the weight's grid values times their steps (any weight format).
    `groups`: dynamic steps per row for each of that many equal column groups of a segment (a
    dynamic conv's taps, columns in tap-major order: conv.tap_major_columns)."""
    out = []
    act = Q.grid(fmt)
    for s, (k0, k1) in enumerate(zip(k_bounds[:-1], k_bounds[1:])):
        xs = rows[:, k0:k1].float()
        ref = xs @ weight[:, k0:k1].float().t()
        bounds, results = [0, k1 - k0], {}
        for scheme in CANDIDATES if act == "int8" else (Scheme.SYMMETRIC, Scheme.DUALSCALE):
            code = [scheme.code]
            if static:
                pos = xs.amax(dim=0).max().clamp(min=0)[None]
                neg = (-xs).amax(dim=0).max().clamp(min=0)[None]
                if float(torch.maximum(pos, neg)) <= 0:
                    results[scheme] = float("inf")    # all zeros: every scheme is exact
                    continue
                d, dn, zp = Q.static_steps(pos, neg, code, act)
                q = Q.quantize_static(xs, bounds, code, d, dn, zp, act)
            else:
                width = (k1 - k0) // groups
                bounds, code = list(range(0, k1 - k0 + 1, width)), code * groups
                q, d, dn, zp = Q.quantize_dynamic(xs, bounds, code, act)
            got = Q.dequantize(q, bounds, code, d, dn, zp) @ dequantized[k0:k1]
            results[scheme] = Q.sqnr_db(ref, got)
        out.append(results)
    return out


def choose(measured: list[dict[str, float]], margin: float = DUALSCALE_MARGIN_DB) -> tuple[Scheme, ...]:
    """The scheme per segment by the rule above (ties go to the cheaper, simpler scheme)."""
    schemes = []
    for m in measured:
        one_dot = max((Scheme.SYMMETRIC, Scheme.ASYMMETRIC),
                      key=lambda s: (m.get(s, float("-inf")), s is Scheme.SYMMETRIC))
        better = m.get(Scheme.DUALSCALE, float("-inf")) >= m[one_dot] + margin and m[one_dot] != float("inf")
        schemes.append(Scheme.DUALSCALE if better else one_dot)
    return tuple(schemes)
