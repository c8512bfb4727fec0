"""Static W8A8 quality against the number of calibration prompts, on the tiny PixArt-Sigma pipeline.

    .venv/bin/python bench/calibration_prompts.py [--out bench/results/calibration_prompts.json]

For N in 1, 2, 4, 8 calibration prompts: a fresh pipeline (same random weights) goes through
`quantize_pipeline` (static activations, guidance 4.5, 4 steps: 4 denoiser calls per prompt at
batch 2); then 4 held-out prompts are generated with fixed seeds and the final latents are compared
with the float pipeline's (SQNR, dB; latents, so the VAE's clamp hides nothing). Dynamic W8A8
(no calibration) is the reference line. The quantized graph runs uncompiled (inductor False):
the same numbers, a fraction of the compile time. JSON with torch/diffusers versions.
"""
from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

CALIBRATION = ["a photo of a red cat", "a blue house on the river", "an old car in the city at night",
               "a painting of a green tree", "a small bird in the sky", "a large dog with a red car",
               "the city in the morning", "a new house with a blue sky"]
HELD_OUT = ["a cat and a dog", "a green river at night", "an old painting of the sky", "a red bird on a tree"]
SETTINGS = dict(num_inference_steps=4, guidance_scale=4.5, use_resolution_binning=False, clean_caption=False,
                output_type="latent")


def generate(pipe) -> list[torch.Tensor]:
    return [pipe(p, generator=torch.Generator().manual_seed(100 + i), **SETTINGS).images
            for i, p in enumerate(HELD_OUT)]


def run(options: dict, prompts: list[str], reference) -> dict:
    import segquant_compile as sq
    from segquant_compile.examples import models
    from segquant_compile.lowering.quantize import sqnr_db
    torch._dynamo.reset()
    pipe = models.tiny_pixart_pipeline()
    start = time.perf_counter()
    sq.quantize_pipeline(pipe, prompts, options=options, progress=False,
                         generator=torch.Generator().manual_seed(0), **SETTINGS)
    calibrate_s = time.perf_counter() - start
    per_prompt = [sqnr_db(r, q) for r, q in zip(reference, generate(pipe))]
    summary = sq.report(pipe.transformer).calibration
    return {"prompts": len(prompts), "sqnr_db_per_held_out_prompt": [round(v, 2) for v in per_prompt],
            "sqnr_db_mean": round(sum(per_prompt) / len(per_prompt), 2), "min_sqnr_db": round(min(per_prompt), 2),
            "denoiser_calls": summary.calls if summary else 0,
            "last_call_output_sqnr_db": round(summary.output_sqnr_db, 2) if summary and summary.output_sqnr_db else None,
            "quantize_s": round(calibrate_s, 1)}


def main():
    import diffusers

    from segquant_compile.examples import models
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="bench/results/calibration_prompts.json")
    args = ap.parse_args()
    torch.set_grad_enabled(False)
    reference = generate(models.tiny_pixart_pipeline())
    rows = []
    for n in (1, 2, 4, 8):
        rows.append(run({"activations": "static", "inductor": False}, CALIBRATION[:n], reference))
        print(rows[-1], flush=True)
    dynamic = run({"activations": "dynamic", "inductor": False}, [], reference)
    print("dynamic", dynamic)
    result = {"torch": torch.__version__, "diffusers": diffusers.__version__, "machine": platform.processor() or
              platform.machine(), "pipeline": "models.tiny_pixart_pipeline() (random weights, 32x32 px, 4 steps, "
              "guidance 4.5, 300 text tokens)", "metric": "SQNR of the final latents vs the float pipeline, "
              "4 held-out prompts, fixed seeds", "static": rows, "dynamic": dynamic}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
