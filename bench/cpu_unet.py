"""CPU UNets with conv sites: segquant (int8 dynamic and static, convs and linears quantized)
against torch.compile (Inductor) in float32 and bfloat16, on a tiny and a mid-size random
UNet2DConditionModel, in one run. Writes JSON to bench/results/cpu_unet.json.

    .venv/bin/python bench/cpu_unet.py [--models tiny mid] [--reps 7] [--threads 1]
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import segquant_compile as sq
from segquant_compile.demo import median_seconds
from segquant_compile.lowering.quantize import sqnr_db
from segquant_compile.examples.models import example_inputs
from machine import cpu_name  # noqa: E402  (bench/machine.py)

CONFIGS = {
    # tests/conftest.py tiny_unet: 8x8 latents
    "tiny": (dict(block_out_channels=(32, 64), layers_per_block=1,
                  down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                  up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=16,
                  attention_head_dim=8, norm_num_groups=8, sample_size=8), dict(resolution=64, text_tokens=5)),
    # SD-style layout at a third of SDXL's widths: 32x32 latents (256 px), 77 tokens
    "mid": (dict(block_out_channels=(128, 256, 512), layers_per_block=1,
                 down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                 cross_attention_dim=256, attention_head_dim=8, norm_num_groups=32, sample_size=32),
            dict(resolution=256, text_tokens=77)),
}


def build(name: str, dtype=torch.float32):
    from diffusers import UNet2DConditionModel
    torch.manual_seed(0)
    return UNet2DConditionModel(in_channels=4, out_channels=4, **CONFIGS[name][0]).eval().to(dtype)


def inputs(model, name: str, batch: int, seed: int):
    return example_inputs(model, batch=batch, generator=torch.Generator().manual_seed(seed), **CONFIGS[name][1])


def op_share(model, x, names) -> float:
    """Fraction of float32 eager CPU time in these aten ops (profiler)."""
    with torch.no_grad(), torch.profiler.profile() as prof:
        model(**x)
    events = prof.key_averages()
    return sum(e.self_cpu_time_total for e in events if e.key in names) / sum(e.self_cpu_time_total for e in events)


def run_model(name: str, batch: int, reps: int) -> dict:
    model = build(name)
    x = inputs(model, name, batch, seed=1)
    with torch.no_grad():
        ref = model(**x).sample
    rows = {}

    def measure(label, fn, setup_s, out=None):
        t = median_seconds(fn, reps=reps)
        rows[label] = {"median_s": t, "setup_s": round(setup_s, 1),
                       "sqnr_db_vs_fp32": None if out is None else round(sqnr_db(ref, out.float()), 2)}
        print(f"{name:5s} {label:22s} {t * 1e3:9.1f} ms   setup {setup_s:6.1f} s"
              + ("" if out is None else f"   SQNR {rows[label]['sqnr_db_vs_fp32']:.1f} dB"), flush=True)

    torch._dynamo.reset()
    t0 = time.perf_counter()
    fp32 = torch.compile(model, backend="inductor")
    with torch.no_grad():
        fp32(**x)
    measure("inductor_fp32", lambda: fp32(**x), time.perf_counter() - t0)

    bf16_model = build(name, torch.bfloat16)
    xb = {k: v.to(torch.bfloat16) if torch.is_tensor(v) and v.is_floating_point() else v for k, v in x.items()}
    t0 = time.perf_counter()
    bf16 = torch.compile(bf16_model, backend="inductor")
    with torch.no_grad():
        out = bf16(**xb).sample
    measure("inductor_bf16", lambda: bf16(**xb), time.perf_counter() - t0, out)

    report = None
    for act in ("dynamic", "static"):
        torch._dynamo.reset()
        t0 = time.perf_counter()
        q = torch.compile(model, backend="segquant", options={"activations": act})
        with torch.no_grad():
            if act == "static":
                with sq.calibrate(q, progress=False):
                    for s in range(2, 6):
                        q(**inputs(model, name, batch, seed=s))
            out = q(**x).sample
        measure(f"segquant_int8_{act}", lambda: q(**x), time.perf_counter() - t0, out)
        report = sq.report(q)
    t = report.totals()
    return {
        "model": {"kind": "UNet2DConditionModel (random weights)", **{k: v for k, v in CONFIGS[name][0].items()
                                                                    if k in ("block_out_channels", "layers_per_block")},
                  "batch": batch, **CONFIGS[name][1],
                  "params_M": round(sum(p.numel() for p in model.parameters()) / 1e6, 2)},
        "sites": {"linear": t["sites"] - t["conv_sites"], "conv2d": t["conv_sites"], "float": t["float"],
                  "input_segmented": t["input_segmented"]},
        "conv_share_of_fp32_eager": round(op_share(model, x, ("aten::mkldnn_convolution", "aten::convolution",
                                                               "aten::_convolution", "aten::thnn_conv2d")), 3),
        "timings": rows,
        "speedup_vs_inductor_fp32": {k: round(rows["inductor_fp32"]["median_s"] / v["median_s"], 3)
                                     for k, v in rows.items()},
        "speedup_vs_inductor_bf16": {k: round(rows["inductor_bf16"]["median_s"] / v["median_s"], 3)
                                     for k, v in rows.items()},
    }


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--models", nargs="+", default=["tiny", "mid"], choices=sorted(CONFIGS))
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads (1 keeps timings stable on a CPU shared with other jobs)")
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "cpu_unet.json"))
    a = p.parse_args()
    torch._dynamo.config.cache_size_limit = 64
    if a.threads:
        torch.set_num_threads(a.threads)
    from segquant_compile.lowering.ops import cpu_int8_gemm
    result = {"benchmark": "cpu_unet", "device": cpu_name(), "threads": torch.get_num_threads(),
              "torch": torch.__version__, "cpu_int8_gemm": cpu_int8_gemm(),
              "models": {name: run_model(name, a.batch, a.reps) for name in a.models}}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(result, indent=1))
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
