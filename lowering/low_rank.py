"""SVDQuant's low-rank branch (arXiv 2411.05007): after smoothing has moved activation outliers
into the weight, a rank-r float product L1 @ L2 takes the weight's largest singular directions
and only the residual R = W_smoothed - L1 @ L2 is quantized:

    y = Q(x / s) @ Q(R) + (x @ L1) @ L2

L1 [K, r] (the down-projection, the smoothing divisor s folded in so the branch reads the
site's raw input) and L2 [r, N] are kept in the weight's float dtype; the singular values are
split evenly between them (sqrt each) so neither factor's range dwarfs the other's in 16-bit.
One branch per site, over all K segments: the branch is float, so segments change nothing in it.

On a quantized site the branch splits in two (every implementation, lowering/ops.py's GEMM ops):
the down-projection lr = x @ L1 [M, r] in the activation's dtype (`down`: fp32 sums, rounded
once), and the up-projection added to the GEMM's fp32 result before its cast (`up_into`), in
rank chunks of `chunk(r)` columns (the kernels' tl.dot K: 16 for r <= 16, else 32), chunk after
chunk: y = y + lr[:, c] @ L2[c, :] with each chunk's products summed in fp32."""
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


FUSED_DOWN_MAX = 32    # ranks whose down-projection the prologue GEMM accumulates in its K loop


def chunk(rank: int) -> int:
    """Columns of one up-projection chunk: a tl.dot K (16 minimum, a power of two), 32 at most
    (one chunk's operands and product held at a time)."""
    return 16 if rank <= 16 else 32


def down(x2: Tensor, l1: Tensor) -> Tensor:
    """lr = x @ L1 [M, r] for rows [M, K] of the site's raw input, in the activation's dtype
    (16-bit operands: fp32 sums, rounded once)."""
    return x2 @ l1.to(x2.dtype)


def up_into(y: Tensor, lr: Tensor, l2: Tensor) -> Tensor:
    """y [M, N] (fp32, in place) + lr @ L2 in the kernels' order: chunk after chunk of `chunk(r)`
    rank columns, each chunk's products (L2 in lr's dtype, both in fp32) summed, then added."""
    l2 = l2.to(lr.dtype)
    c = chunk(lr.shape[1])
    for j in range(0, lr.shape[1], c):
        y.add_(lr[:, j:j + c].float() @ l2[j:j + c].float())
    return y


def check_operands(m: int, n: int, k: int, lr, l2, l1=None, prologue: bool = False) -> None:
    """The GEMM launchers' checks of the branch's operands: lr [M, r] (prologue: l1 [K, r], r at
    most FUSED_DOWN_MAX) and l2 [r, N], float."""
    given = lr if lr is not None else l1
    if (given is None) != (l2 is None):
        raise ValueError("segquant: the low-rank branch takes l2 with lr (prologue: with l1)")
    if l2 is None:
        return
    if prologue != (l1 is not None) or (lr is not None and l1 is not None):
        raise ValueError("segquant: the prologue GEMM takes the branch as l1 (its down-projection in the kernel), "
                         "the others as lr")
    r = l2.shape[0]
    rows = (k, r) if l1 is not None else (m, r)
    if given.dim() != 2 or tuple(given.shape) != rows or l2.dim() != 2 or l2.shape[1] != n:
        raise ValueError(f"segquant: low-rank branch {tuple(given.shape)} x {tuple(l2.shape)} for M = {m}, K = {k}, "
                         f"N = {n}")
    if not (given.is_floating_point() and l2.is_floating_point()):
        raise ValueError("segquant: the low-rank branch is float")
    if l1 is not None and r > FUSED_DOWN_MAX:
        raise ValueError(f"segquant: the prologue accumulates a down-projection of rank <= {FUSED_DOWN_MAX}, "
                         f"got {r}")


def apply(x2: Tensor, l1: Tensor, l2: Tensor) -> Tensor:
    """(x @ L1) @ L2 for rows [M, K], in the activation's float dtype."""
    return (x2 @ l1.to(x2.dtype)) @ l2.to(x2.dtype)
