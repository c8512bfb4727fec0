"""One low-rank branch per site or one per K segment (issue 29, "measure which"): on the MNIST
DiT's head-merge sites `dits.{0,1,2}.lv` (K = 256 in 4 head segments of 64, N = 64), the site's
output SQNR on its real input rows (a float sampling run of calibration seed 1000, 10 images, every
call's rows, subsampled to <= 4096) with 4-bit weights (group 128, rounded to nearest; activations
float, so only the weight and branch differ): a rank-r branch over the whole site against a
rank-r/4 branch per segment (the same up-projection rows). Writes bench/results/low_rank_segments.json.

    .venv/bin/python bench/low_rank_segments.py
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from segquant_compile.examples import mnist_dit
from segquant_compile.lowering import low_rank
from segquant_compile.lowering import quantize as Q
from segquant_compile.lowering.formats import Format, Scheme
from segquant_compile.lowering.site_lowering import SiteLowering

SEGMENTS = (0, 64, 128, 192, 256)


def site_rows(net, names) -> dict:
    got = {}
    modules = dict(net.named_modules())
    hooks = [modules[n].register_forward_hook(
        lambda m, i, o, n=n: got.setdefault(n, []).append(i[0].detach().reshape(-1, i[0].shape[-1]))) for n in names]
    with torch.no_grad():
        mnist_dit.sample(net, torch.arange(10), 1000)
    for h in hooks:
        h.remove()
    out = {}
    for n, v in got.items():
        x = torch.cat(v)
        out[n] = x[::max(1, len(x) // 4096)]
    return out


def w4(w: torch.Tensor) -> torch.Tensor:
    lo = SiteLowering(Format.W4A8, "dynamic", "per-group", SEGMENTS, (Scheme.SYMMETRIC,) * 4, None, group_size=128)
    packed, steps, _ = Q.pack_weight(w, lo)
    return Q.dequantized_weight(packed, steps, lo).t()


def main() -> dict:
    torch.manual_seed(0)
    net = mnist_dit.load_dit()
    names = [f"dits.{i}.lv" for i in range(3)]
    rows = site_rows(net, names)
    modules = dict(net.named_modules())
    out = {"command": ".venv/bin/python bench/low_rank_segments.py", "torch": torch.__version__, "sites": {}}
    for n in names:
        w, x = modules[n].weight.detach().float(), rows[n]
        ref = x @ w.t()
        row = {"rows": len(x), "none_db": Q.sqnr_db(ref, x @ w4(w).t())}
        for r in (8, 16, 32):
            res, l1, l2 = low_rank.split(w, r, None, torch.float32)
            per_site = Q.sqnr_db(ref, x @ w4(res).t() + (x @ l1) @ l2)
            resid, branch = torch.empty_like(w), torch.empty_like(w)
            for a, b in zip(SEGMENTS[:-1], SEGMENTS[1:]):
                rs, s1, s2 = low_rank.split(w[:, a:b], r // 4, None, torch.float32)
                resid[:, a:b], branch[:, a:b] = rs, (s1 @ s2).t()
            per_segment = Q.sqnr_db(ref, x @ w4(resid).t() + x @ branch.t())
            row[f"rank_{r}"] = {"per_site_db": round(per_site, 2), "per_segment_db": round(per_segment, 2)}
        out["sites"][n] = row
        print(n, row, flush=True)
    return out


if __name__ == "__main__":
    result = main()
    path = Path(__file__).parent / "results" / "low_rank_segments.json"
    path.write_text(json.dumps(result, indent=1))
    print(f"wrote {path}")
    sys.exit(0)
