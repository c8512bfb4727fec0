"""SVDQuant's low-rank branch (issue 29, option `low_rank`) on the real models in ../shared/data:
w4a8 rounded to nearest, by GPTQ, and by GPTQ beside a branch of rank 8, 16, 32 and 64; int8 with
and without a rank-32 branch. Mean per-image PSNR against the float samples (bench/fidelity.py's
seeds, labels, samplers and calibration seeds), the branch's cost in weight bytes and
multiply-adds per row, each summed over the quantized sites. Writes bench/results/low_rank.json
and a chart beside it.

    .venv/bin/python bench/low_rank.py                         # 5 seeds x 100 images, DiT and ViT
    .venv/bin/python bench/low_rank.py --seeds 1 --images 20   # quick check

GPTQ rows come from calibrating on fidelity.CALIBRATION_SEEDS (never an evaluation seed);
activations stay dynamic (per token) in every configuration.
"""
from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path

import torch

from segquant_compile.compiled import find
from segquant_compile.examples import mnist_dit
from fidelity import MODELS, RESULTS, git_state, labels_for, version  # noqa: E402  (bench/)
from machine import cpu_name  # noqa: E402
from mixed_precision import chart, measure_config  # noqa: E402

RANKS = (8, 16, 32, 64)
CONFIGS = {
    "w4a8 rtn": {"format": "w4a8", "weight_rounding": "rtn"},
    "w4a8 gptq": {"format": "w4a8", "weight_rounding": "gptq"},
    **{f"w4a8 gptq + low-rank {r}": {"format": "w4a8", "weight_rounding": "gptq", "low_rank": r} for r in RANKS},
    "int8 gptq": {"weight_rounding": "gptq"},
    "int8 gptq + low-rank 32": {"weight_rounding": "gptq", "low_rank": 32},
}


def costs(compiled) -> dict:
    """Summed over the quantized sites: the quantized weights' bytes (steps included), the
    branches' bytes, and multiply-adds per GEMM row of the quantized GEMMs and of the branches."""
    out = {"quantized_weight_bytes": 0, "branch_bytes": 0, "gemm_macs_per_row": 0, "branch_macs_per_row": 0,
           "sites": 0, "sites_with_branch": 0, "ranks": {}}
    for st in find(compiled).quant_states:
        p, k, n = st.params, st.site.in_features, st.site.out_features
        out["sites"] += 1
        out["quantized_weight_bytes"] += p.packed.nbytes + p.d_w.nbytes
        out["gemm_macs_per_row"] += k * n
        if p.l1 is not None:
            rank = p.l1.shape[1]
            out["sites_with_branch"] += 1
            out["branch_bytes"] += p.l1.nbytes + p.l2.nbytes
            out["branch_macs_per_row"] += rank * (k + n)
            out["ranks"][str(rank)] = out["ranks"].get(str(rank), 0) + 1
    return out


def run(model_key: str, seeds, images, classifier, only=None) -> dict:
    spec = MODELS[model_key]
    torch._dynamo.reset()
    net = spec["load"]()
    refs = {s: spec["sample"](net, labels_for(images), s) for s in seeds}
    result = {"title": spec["title"], "float_parameters": sum(p.numel() for p in net.parameters()), "configs": {}}
    for name, opts in CONFIGS.items():
        if only and name not in only:
            continue
        compiled, row = measure_config(spec, opts, seeds, images, refs, classifier)
        row.update(costs(compiled))
        result["configs"][name] = row
        print(f"  [{model_key}] {name}: {row['psnr_mean_db']:.2f} dB, acc {row['accuracy']:.3f}, "
              f"{row['average_weight_bits']} bits, branch {row['branch_bytes']} B / "
              f"{row['quantized_weight_bytes']} B quantized, {row['wall_s']:.0f} s", flush=True)
    return result


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--images", type=int, default=100)
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    p.add_argument("--configs", nargs="+", default=None, help=f"only these: {list(CONFIGS)}")
    p.add_argument("--out", type=Path, default=RESULTS / "low_rank.json")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    classifier = mnist_dit.load_classifier()
    seeds = list(range(1, args.seeds + 1))
    results = {"command": " ".join([".venv/bin/python bench/low_rank.py", *sys.argv[1:]]),
               "device": cpu_name(), "torch": torch.__version__, "triton": version("triton"),
               "git": git_state(), "seeds": seeds, "images_per_seed": args.images, "models": {}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for key in args.models:
            results["models"][key] = run(key, seeds, args.images, classifier, args.configs)
            args.out.write_text(json.dumps(results, indent=1))
    try:
        chart(results, args.out.with_suffix(".png"))
    except ImportError:   # matplotlib: the `bench` extra
        print("no chart: matplotlib is not installed (pip install '.[bench]')")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    sys.exit(main())
