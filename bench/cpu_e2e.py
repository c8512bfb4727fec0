"""CPU end to end: segquant (int8 static and dynamic) against torch.compile (Inductor) in float32
and bfloat16 on an SD3-style transformer where the linears dominate. Writes JSON to bench/results/.

    .venv/bin/python bench/cpu_e2e.py [--layers 4] [--heads 16] [--resolution 256] [--batch 2]
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import segquant_compile as sq
from segquant_compile.demo import demo_sd3, median_seconds, sd3_inputs
from segquant_compile.lowering.quantize import sqnr_db
from machine import cpu_name  # noqa: E402  (bench/machine.py)


def linear_share(model, x) -> float:
    """Fraction of float32 eager time spent in addmm/mm/linear (profiler)."""
    with torch.no_grad(), torch.profiler.profile() as prof:
        model(**x)
    total = sum(e.self_cpu_time_total for e in prof.key_averages())
    lin = sum(e.self_cpu_time_total for e in prof.key_averages() if e.key in ("aten::addmm", "aten::mm", "aten::linear"))
    return lin / total


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--resolution", type=int, default=256)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "cpu_e2e.json"))
    a = p.parse_args()
    torch._dynamo.config.cache_size_limit = 64
    width = a.heads * 64
    model = demo_sd3(num_layers=a.layers, num_attention_heads=a.heads, joint_attention_dim=width,
                     caption_projection_dim=width, dual_attention_layers=())
    x = sd3_inputs(model, batch=a.batch, resolution=a.resolution)
    tokens = (a.resolution // 16) ** 2
    with torch.no_grad():
        ref = model(**x).sample
    rows = {}

    def measure(name, fn, setup_s, out=None):
        t = median_seconds(fn, reps=a.reps)
        rows[name] = {"median_s": t, "setup_s": setup_s,
                      "sqnr_db_vs_fp32": None if out is None else sqnr_db(ref, out.float())}
        print(f"{name:28s} {t * 1e3:8.1f} ms   setup {setup_s:6.1f} s"
              + ("" if out is None else f"   SQNR {rows[name]['sqnr_db_vs_fp32']:.1f} dB"))

    t0 = time.perf_counter()
    fp32 = torch.compile(model, backend="inductor")
    with torch.no_grad():
        fp32(**x)
    measure("inductor_fp32", lambda: fp32(**x), time.perf_counter() - t0)

    bf16_model = demo_sd3(num_layers=a.layers, num_attention_heads=a.heads, joint_attention_dim=width,
                          caption_projection_dim=width, dual_attention_layers=()).to(torch.bfloat16)
    xb = {k: v.to(torch.bfloat16) if torch.is_tensor(v) and v.is_floating_point() else v for k, v in x.items()}
    t0 = time.perf_counter()
    bf16 = torch.compile(bf16_model, backend="inductor")
    with torch.no_grad():
        out = bf16(**xb).sample
    measure("inductor_bf16", lambda: bf16(**xb), time.perf_counter() - t0, out)

    for act in ("dynamic", "static"):
        t0 = time.perf_counter()
        q = torch.compile(model, backend="segquant", options={"activations": act})
        with torch.no_grad():
            if act == "static":
                with sq.calibrate(q, progress=False):
                    for s in range(1, 5):
                        q(**sd3_inputs(model, batch=a.batch, resolution=a.resolution, seed=s))
            out = q(**x).sample
        measure(f"segquant_int8_{act}", lambda: q(**x), time.perf_counter() - t0, out)

    share = linear_share(model, x)
    result = {
        "benchmark": "cpu_e2e", "device": cpu_name(), "threads": torch.get_num_threads(),
        "torch": torch.__version__, "triton": _version("triton"), "diffusers": _version("diffusers"),
        "model": {"kind": "SD3Transformer2DModel (random weights)", "layers": a.layers, "width": width,
                  "heads": a.heads, "batch": a.batch, "image_tokens": tokens, "text_tokens": 77,
                  "params_M": round(sum(p.numel() for p in model.parameters()) / 1e6, 1)},
        "linear_share_of_fp32_eager": round(share, 3),
        "timings": rows,
        "speedup_vs_inductor_fp32": {k: rows["inductor_fp32"]["median_s"] / v["median_s"] for k, v in rows.items()},
        "speedup_vs_inductor_bf16": {k: rows["inductor_bf16"]["median_s"] / v["median_s"] for k, v in rows.items()},
    }
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(result, indent=1))
    print(json.dumps(result["speedup_vs_inductor_fp32"], indent=1))
    print(f"linear share of fp32 eager time: {share:.0%}; wrote {a.out}")


def _version(name):
    try:
        from importlib.metadata import version
        return version(name)
    except Exception:
        return None


if __name__ == "__main__":
    main()
