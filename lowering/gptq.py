"""Error-compensated rounding of weights (GPTQ, Frantar et al. 2022), per K segment: 4-bit
groups and 8-bit channels.

Columns of W [N, K] are rounded one at a time in K order; each rounding error is spread over the
columns not yet rounded, weighted by the inverse Hessian of the layer's output error on
calibration rows, H = X^T X. The Hessian is taken per K segment (block diagonal): a segment's
activations get their own steps at inference, so its error is compensated inside it. H is a sum
over rows: the caller adds each call's (segment_hessians) and holds no rows. A group's step
(absmax / 7) comes from its weights as updated when the group starts, as in GPTQ's grouped
variant. 8-bit weights keep their per-channel steps (absmax of the float weight, taken before
any column moves, as GPTQ does without groups) and clamp to [-127, 127]. Round to nearest is the
fallback (no rows: `pack_weight` without a grid).
"""
from __future__ import annotations

import torch
from torch import Tensor

from .quantize import INT4_MAX, int4_group_step

INT8_MAX = 127.0
BLOCK = 128   # 8-bit columns compensated one at a time inside a block, the block's error at once

DAMP = 0.01   # of the mean diagonal: keeps H invertible with fewer rows than columns
# one call's rows (dynamic activations, no calibration) are few and from one timestep: damped
# as much as the Hessian's own diagonal, so the rounding fits that call less. Which call comes
# first decides (mean per-image PSNR, 100 images, first call = the first seed's; RTN in brackets):
#   damp     ViT seed 0       ViT seeds 6-8    ViT seeds 1-2    DiT seed 0
#   0.1      45.39 (46.80)    47.62 (47.39)    48.02 (47.15)    44.91 (44.47)
#   1.0      47.61            47.95            47.81            44.71
# 0.1 lost 1.4 dB on one first call; 1.0 gained on every one measured. With a calibration's rows
# 0.01 stays better (ViT dynamic 48.64 vs 48.35 at 0.1; static 42.19 vs 41.80).
FIRST_CALL_DAMP = 1.0


def segment_hessians(rows: Tensor, k_bounds) -> list[Tensor]:
    """rows [R, K] -> X^T X of each K segment (fp32, on the rows' device)."""
    rows = rows.float()
    return [rows[:, a:b].t() @ rows[:, a:b] for a, b in zip(k_bounds[:-1], k_bounds[1:])]


def gptq_int4(w: Tensor, hessians: list[Tensor], k_bounds, g_bounds, clip: str = "absmax",
              damp: float = DAMP) -> tuple[Tensor, Tensor]:
    """w [N, K] float, `hessians` per K segment (segment_hessians) -> (grid values [K, N] int8 in
    [-7, 7], steps [G, N]) on the groups `g_bounds` (which refine `k_bounds`); `clip` as in
    int4_steps, taken on the updated weights when a group starts."""
    q, steps = _compensated(w, hessians, k_bounds, g_bounds, lambda wg: int4_group_step(wg, clip), INT4_MAX, damp)
    return q, torch.stack(steps)


def gptq_int8(w: Tensor, hessians: list[Tensor], k_bounds, steps: Tensor, damp: float = DAMP) -> Tensor:
    """w [N, K] float, `hessians` per K segment, per-channel steps [N] -> grid values [K, N] int8
    in [-127, 127]."""
    blocks = sorted({*k_bounds, *range(k_bounds[0], k_bounds[-1], BLOCK)})
    return _compensated(w, hessians, k_bounds, tuple(blocks), lambda wg: steps.to(wg.device), INT8_MAX, damp)[0]


def _compensated(w: Tensor, hessians: list[Tensor], k_bounds, blocks, step_of, qmax: float,
                 damp: float) -> tuple[Tensor, list[Tensor]]:
    """GPTQ's loop: per K segment, per block of columns (`blocks` refine `k_bounds`), the block's
    steps from `step_of(its current columns)`, then each column rounded and its error spread over
    the block's later columns, the block's error over the rest of the segment at once. Returns the
    grid values [K, N] and each block's steps."""
    W = w.detach().float().clone()
    q = torch.zeros_like(W, dtype=torch.int8)
    steps = []
    for (k0, k1), h in zip(zip(k_bounds[:-1], k_bounds[1:]), hessians):
        U = _inverse_hessian_factor(h.to(W.device), damp)
        for a, b in ((a, b) for a, b in zip(blocks[:-1], blocks[1:]) if k0 <= a < k1):
            step = step_of(W[:, a:b])
            steps.append(step)
            err = torch.empty((W.shape[0], b - a), device=W.device)
            for i in range(a, b):
                col = W[:, i]
                qi = torch.round(col / step).clamp(-qmax, qmax)
                q[:, i] = qi.to(torch.int8)
                e = (col - qi * step) / U[i - k0, i - k0]
                W[:, i + 1:b] -= e[:, None] * U[i - k0, i + 1 - k0:b - k0][None]
                err[:, i - a] = e
            W[:, b:k1] -= err @ U[a - k0:b - k0, b - k0:k1 - k0]   # the rest of the segment, at once
    return q.t().contiguous(), steps


def _inverse_hessian_factor(h: Tensor, damp: float = DAMP) -> Tensor:
    """Upper Cholesky factor of (H + damping)^-1, H = X^T X. Channels never active in calibration
    get a unit diagonal: their weights are rounded to nearest and pass no error on (never zeroed:
    they may be active at inference)."""
    h = h.double().clone()
    diag = torch.diagonal(h)
    dead = diag <= 0
    h[dead, dead] = 1.0
    damp = damp * float(torch.diagonal(h).mean())
    for attempt in range(4):   # more damping when rows are too few or collinear
        try:
            hd = h + (damp * 10 ** attempt) * torch.eye(len(h), dtype=h.dtype, device=h.device)
            inv = torch.cholesky_inverse(torch.linalg.cholesky(hd))
            return torch.linalg.cholesky(inv, upper=True).float()
        except RuntimeError:
            continue
    return torch.eye(len(h), device=h.device)   # no compensation: round to nearest
