"""SVDQuant's low-rank branch (arXiv 2411.05007): after smoothing has moved activation outliers
into the weight, a rank-r float product L1 @ L2 takes the weight's largest singular directions
and only the residual R = W_smoothed - L1 @ L2 is quantized:

    y = Q(x / s) @ Q(R) + (x @ L1) @ L2

L1 [K, r] (the down-projection, the smoothing divisor s folded in so the branch reads the
site's raw input) and L2 [r, N] are kept in the weight's float dtype; the singular values are
split evenly between them (sqrt each) so neither factor's range dwarfs the other's in 16-bit.
One branch per site, over all K segments: the branch is float, so segments change nothing in it."""
from __future__ import annotations

import torch
from torch import Tensor


def split(w: Tensor, rank: int, smooth: Tensor | None, dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor]:
    """(residual [N, K] fp32, L1 [K, r], L2 [r, N]) of the smoothed fp32 weight `w` [N, K]. The
    residual is taken against the branch as stored (in `dtype`), so it absorbs the branch's own
    rounding."""
    u, sv, vh = torch.linalg.svd(w.float(), full_matrices=False)
    root = sv[:rank].sqrt()
    l1 = vh[:rank].t() * root                     # [K, r], in the smoothed space
    l2 = root[:, None] * u[:, :rank].t()          # [r, N]
    if smooth is not None:
        l1 = l1 / smooth[:, None]
    l1, l2 = l1.to(dtype).contiguous(), l2.to(dtype).contiguous()
    return w.float() - branch_weight(l1, l2, smooth), l1, l2


def branch_weight(l1: Tensor, l2: Tensor, smooth: Tensor | None = None) -> Tensor:
    """The branch as a weight [N, K]: of the raw input, or (with `smooth`) of the smoothed one."""
    l1 = l1.float() if smooth is None else l1.float() * smooth[:, None]
    return (l1 @ l2.float()).t()


def site_rank(rank: int | None, in_features: int, out_features: int) -> int | None:
    """The branch's rank at a K x N site: the asked rank, at most half the smaller side (beyond,
    the branch holds more float numbers than the quantized weight saves); None when that is 0."""
    if not rank:
        return None
    r = min(rank, min(in_features, out_features) // 2)
    return r or None


def branch_bits(rank: int | None, in_features: int, out_features: int, element_bits: int = 16) -> int:
    """The bits the branch stores at a K x N site (16-bit factors unless said)."""
    return (rank or 0) * (in_features + out_features) * element_bits


def flops_share(rank: int, in_features: int, out_features: int) -> float:
    """The branch's share of the site's multiply-adds per row: r (K + N) of K N + r (K + N)."""
    extra = rank * (in_features + out_features)
    return extra / (in_features * out_features + extra)


def apply(x2: Tensor, l1: Tensor, l2: Tensor) -> Tensor:
    """(x @ L1) @ L2 for rows [M, K], in the activation's float dtype."""
    return (x2 @ l1.to(x2.dtype)) @ l2.to(x2.dtype)
