"""GPTQ's Hessian memory while calibrating FLUX.1-dev, with one Hessian per site against one per
(activation, K segmentation) (sites reading the same graph node share it: runtime.Observer).

FLUX.1-dev at full width with one double and one single block (the plan of a block does not
depend on the token count, so a small image is traced); every block's sites are counted 19 and 38
times, the embedders once. A Hessian is summed where the widest K segment has at most
statistics.HESSIAN_MAX_K columns: K^2 fp32 per segment.

    .venv/bin/python bench/hessian_sharing.py   # writes bench/results/hessian_sharing.json
"""
from __future__ import annotations

import json
import re
import sys
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from machine import cpu_name  # noqa: E402

FLUX_DEV = dict(patch_size=1, in_channels=64, num_attention_heads=24, attention_head_dim=128,
                joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
                axes_dims_rope=(16, 56, 56))
BLOCKS = {"transformer_blocks": 19, "single_transformer_blocks": 38}


def main() -> dict:
    from diffusers import FluxTransformer2DModel

    import segquant_compile as sq
    from segquant_compile.statistics import HESSIAN_MAX_K
    from segquant_compile.examples.models import example_inputs
    torch.manual_seed(0)
    model = FluxTransformer2DModel(num_layers=1, num_single_layers=1, **FLUX_DEV).eval()
    inputs = example_inputs(model, batch=1, resolution=128, text_tokens=16)
    report = sq.explain(model, **inputs, options={"activations": "static"})
    per_site, shared = 0.0, {}
    rows = []
    for site in report.sites:
        lo = report.planned.get(site.name)
        if lo is None or not lo.gptq:
            continue
        kb = lo.k_bounds
        if max(b - a for a, b in zip(kb[:-1], kb[1:])) > HESSIAN_MAX_K:
            continue   # fits kept rows, sums no Hessian
        block = re.match(r"(\w+)\.\d+\.", site.name)
        times = BLOCKS.get(block.group(1), 1) if block else 1
        nbytes = sum((b - a) ** 2 * 4 for a, b in zip(kb[:-1], kb[1:]))
        per_site += nbytes * times
        key = (site.graph, site.input_node, kb)
        shared.setdefault(key, (nbytes * times, []))[1].append(site.name)
        rows.append({"site": site.name, "K": site.in_features, "segments": len(kb) - 1, "times": times,
                     "hessian_mb": round(nbytes / 2**20, 2)})
    groups = [names for _, names in shared.values() if len(names) > 1]
    shared_bytes = sum(b for b, _ in shared.values())
    out = {"model": "FLUX.1-dev (1 double + 1 single block at full width, counted x19 and x38)",
           "cpu": cpu_name(), "torch": torch.__version__, "hessian_max_k": HESSIAN_MAX_K,
           "hessian_gb_one_per_site": round(per_site / 2**30, 2),
           "hessian_gb_one_per_activation": round(shared_bytes / 2**30, 2),
           "sharing_groups": groups, "sites": rows}
    return out


if __name__ == "__main__":
    result = main()
    path = Path(__file__).parent / "results" / "hessian_sharing.json"
    path.write_text(json.dumps(result, indent=1))
    print(f"Hessians while calibrating FLUX.1-dev: {result['hessian_gb_one_per_site']} GB one per site, "
          f"{result['hessian_gb_one_per_activation']} GB one per activation; shared by: "
          + "; ".join(", ".join(g) for g in result["sharing_groups"]))
