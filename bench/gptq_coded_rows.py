"""GPTQ on coded rows (issue 30). Where a site's widest K segment is too wide to sum a Hessian
(statistics.HESSIAN_MAX_K), GPTQ fits the site's GPTQ_ROWS kept rows; those beyond the searches'
SAMPLE_ROWS are held int8 with one step per 128 columns (statistics.CodedRows). What that costs,
on the trained MNIST models of ../shared/data:

1. per site, real activations (every nn.Linear's inputs while the float model samples; fit rows
   from seed 1, held-out rows from seed 2): the weight-only output SQNR on the held-out rows of
   GPTQ fitted to R rows kept exact, against the same R rows with all but the first quarter coded
   (the 512 : 1536 split), for int8 channels and int4 groups of 64; at R = 2048 (more rows than
   K) and R = K / 6 (FLUX.1-dev's 2048 rows at K = 12288). Round to nearest and the Hessian of
   every fit row for scale;
2. end to end: static W8A8 with GPTQ (bench/fidelity.py's "static") with every site forced onto
   the kept-rows path (HESSIAN_MAX_K = 0), kept rows exact (rows_coded = 0: the searches also read
   all 2048) against coded (what ships), and the summed Hessians of the default; mean per-image
   PSNR against float, bench/fidelity.py's seeds and metric.

    .venv/bin/python bench/gptq_coded_rows.py     # bench/results/gptq_coded_rows.json
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import shlex
import sys
import time
from pathlib import Path

import torch

from segquant_compile import statistics
from segquant_compile.lowering.gptq import gptq_int4, gptq_int8, segment_hessians
from segquant_compile.lowering.quantize import int4_group_step
from segquant_compile.statistics import CodedRows, StatisticsSpec
import fidelity as F   # noqa: E402  (bench/fidelity.py)
from machine import cpu_name  # noqa: E402

ROWS_PER_CALL = 256     # rows sampled from each forward's input at each site
GROUP = 64              # int4 group
EXACT_SHARE = statistics.SAMPLE_ROWS / statistics.GPTQ_ROWS


def site_rows(model_key: str, seed: int, images: int) -> dict[str, tuple[torch.nn.Linear, torch.Tensor]]:
    """Every nn.Linear's input rows ([rows, K], ROWS_PER_CALL random ones per forward) while the
    float model samples `images` images of seed `seed`."""
    spec = F.MODELS[model_key]
    net = spec["load"]()
    g = torch.Generator().manual_seed(seed)
    rows: dict[str, list] = {}
    hooks = []
    for name, m in net.named_modules():
        if isinstance(m, torch.nn.Linear):
            def grab(mod, args, name=name):
                x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
                rows.setdefault(name, [mod, []])[1].append(x[torch.randperm(len(x), generator=g)[:ROWS_PER_CALL]])
            hooks.append(m.register_forward_pre_hook(grab))
    with torch.no_grad():
        spec["sample"](net, F.labels_for(images), seed)
    for h in hooks:
        h.remove()
    return {n: (m, torch.cat(xs)) for n, (m, xs) in rows.items()}


def coded(rows: torch.Tensor) -> torch.Tensor:
    """The rows as the statistics hold them: the first EXACT_SHARE exact, the rest coded."""
    exact = max(1, round(len(rows) * EXACT_SHARE))
    return torch.cat([rows[:exact], CodedRows.encode(rows[exact:]).decode()])


def weight_only_sqnr(w: torch.Tensor, wq: torch.Tensor, x: torch.Tensor) -> float:
    y, e = x @ w.t(), x @ (w - wq).t()
    return float(10 * torch.log10(y.square().sum() / e.square().sum().clamp(min=1e-30)))


def rounded(w: torch.Tensor, fmt: str, h: torch.Tensor | None) -> torch.Tensor:
    """w [N, K] rounded to `fmt`'s grid: by GPTQ on the Hessian `h`, else to nearest; as float [N, K]."""
    k = w.shape[1]
    if fmt == "int8":
        steps = w.abs().amax(dim=1).clamp(min=1e-12) / 127
        if h is None:
            return torch.round(w / steps[:, None]).clamp(-127, 127) * steps[:, None]
        return gptq_int8(w, [h], (0, k), steps).t().float() * steps[:, None]
    g_bounds = tuple(range(0, k, GROUP)) + (k,)
    if h is None:
        out = torch.empty_like(w)
        for a, b in zip(g_bounds[:-1], g_bounds[1:]):
            s = int4_group_step(w[:, a:b], "absmax")
            out[:, a:b] = torch.round(w[:, a:b] / s[:, None]).clamp(-7, 7) * s[:, None]
        return out
    q, steps = gptq_int4(w, [h], (0, k), g_bounds)
    return q.t().float() * torch.repeat_interleave(steps, torch.tensor(g_bounds).diff(), dim=0).t()


def per_site(model_key: str, images: int) -> list[dict]:
    fit, held = site_rows(model_key, 1, images), site_rows(model_key, 2, images)
    g = torch.Generator().manual_seed(0)
    out = []
    for name, (mod, x) in fit.items():
        w, xh = mod.weight.detach().float(), held[name][1]
        k = w.shape[1]
        x = x[torch.randperm(len(x), generator=g)]
        row = {"site": name, "K": k, "N": w.shape[0], "fit_rows": len(x), "held_out_rows": len(xh)}
        for fmt in ("int8", "int4"):
            r = {"rtn": weight_only_sqnr(w, rounded(w, fmt, None), xh),
                 "every_fit_row": weight_only_sqnr(w, rounded(w, fmt, segment_hessians(x, (0, k))[0]), xh)}
            for label, n in (("R2048", 2048), ("R_K_over_6", max(8, k // 6))):
                sample = x[:n]
                r[f"{label}_exact"] = weight_only_sqnr(w, rounded(w, fmt, segment_hessians(sample, (0, k))[0]), xh)
                r[f"{label}_coded"] = weight_only_sqnr(w, rounded(w, fmt, segment_hessians(coded(sample), (0, k))[0]), xh)
            row[fmt] = {key: round(v, 3) for key, v in r.items()}
        out.append(row)
        print(f"  [{model_key}] {name} K={k}: " + "; ".join(
            f"{fmt} " + " ".join(f"{key}={v:.2f}" for key, v in row[fmt].items()) for fmt in ("int8", "int4")),
            flush=True)
    return out


def summary(sites: list[dict]) -> dict:
    keys = [k for k in sites[0]["int8"] if k != "rtn"]
    return {fmt: {f"mean_{k}_db": round(sum(s[fmt][k] for s in sites) / len(sites), 3) for k in ["rtn", *keys]}
            | {f"max_abs_coded_minus_exact_{label}_db": round(max(abs(s[fmt][f"{label}_coded"] - s[fmt][f"{label}_exact"])
                                                                  for s in sites), 3)
               for label in ("R2048", "R_K_over_6")}
            for fmt in ("int8", "int4")}


ARMS = {   # name -> (HESSIAN_MAX_K, rows coded beyond SAMPLE_ROWS)
    "summed Hessians (default)": (statistics.HESSIAN_MAX_K, True),
    "kept rows, exact": (0, False),
    "kept rows, coded": (0, True),
}


def end_to_end(model_key: str, seeds, images) -> dict:
    spec = F.MODELS[model_key]
    net = spec["load"]()
    refs = {s: spec["sample"](net, F.labels_for(images), s) for s in seeds}
    classifier = F.mnist_dit.load_classifier()
    for_site = StatisticsSpec.for_site.__func__
    out = {}
    try:
        for arm, (max_k, coding) in ARMS.items():
            statistics.HESSIAN_MAX_K = max_k
            StatisticsSpec.for_site = classmethod(
                for_site if coding else lambda cls, *a, **kw: dataclasses.replace(for_site(cls, *a, **kw), rows_coded=0))
            row, _ = F.run_config(model_key, "static", seeds, images, refs, classifier)
            row["name"] = arm
            out[arm] = {k: row[k] for k in ("psnr_mean_db", "psnr_per_seed_mean_db", "accuracy", "wall_s") if k in row}
            out[arm]["error"] = row.get("error")
    finally:
        statistics.HESSIAN_MAX_K, StatisticsSpec.for_site = ARMS["summed Hessians (default)"][0], classmethod(for_site)
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=list(F.MODELS), choices=list(F.MODELS))
    p.add_argument("--seeds", type=int, default=5, help="end-to-end evaluation seeds 1..N (default 5)")
    p.add_argument("--images", type=int, default=100, help="images per seed (default 100)")
    p.add_argument("--site-images", type=int, default=20, help="images sampled for the per-site rows (default 20)")
    p.add_argument("--out", default=str(F.RESULTS / "gptq_coded_rows.json"))
    a = p.parse_args(argv)
    t0 = time.perf_counter()
    result = {"benchmark": "gptq_coded_rows (issue 30): GPTQ fitted to exact vs int8-coded kept rows",
              "command": shlex.join([sys.executable, *sys.argv]),
              "code_group": statistics.CODE_GROUP, "exact_share": EXACT_SHARE, "int4_group": GROUP,
              "environment": {"cpu": cpu_name(), "torch": torch.__version__, "git": F.git_state()},
              "models": {}}
    for m in a.models:
        print(f"{m}: per site", flush=True)
        sites = per_site(m, a.site_images)
        print(f"{m}: end to end", flush=True)
        result["models"][m] = {"per_site_summary": summary(sites), "end_to_end": end_to_end(m, list(range(1, a.seeds + 1)),
                                                                                           a.images),
                               "per_site": sites}
        print(json.dumps(result["models"][m]["per_site_summary"], indent=1), flush=True)
    result["wall_s"] = round(time.perf_counter() - t0, 1)
    Path(a.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
