"""CPU end to end: segquant int8 (dynamic and static) against torch.compile (Inductor) in float32
and bfloat16 on an SD3-style transformer at real token counts, timed in interleaved rounds in
one process (min and median), with SQNR against float32 eager and minor page faults per
forward. Writes JSON to bench/results/.

    .venv/bin/python bench/cpu_e2e.py                       # 1024 + 77 and 4096 + 77 tokens
    .venv/bin/python bench/cpu_e2e.py --resolutions 512 --rounds 5
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import time
from pathlib import Path

import torch

import segquant_compile as sq
from segquant_compile.examples.sd3_demo import demo_sd3, sd3_inputs
from segquant_compile.lowering.cpu_linear import cpu_gemm
from segquant_compile.lowering.quantize import sqnr_db
from machine import cpu_name  # noqa: E402  (bench/machine.py)


def build(layers: int, heads: int, dtype=torch.float32):
    width = heads * 64
    return demo_sd3(num_layers=layers, num_attention_heads=heads, joint_attention_dim=width,
                    caption_projection_dim=width, dual_attention_layers=()).to(dtype)


def minor_faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def run_resolution(a, resolution: int) -> dict:
    model = build(a.layers, a.heads)
    x = sd3_inputs(model, batch=1, resolution=resolution)
    xb = {k: v.to(torch.bfloat16) if torch.is_tensor(v) and v.is_floating_point() else v for k, v in x.items()}
    with torch.no_grad():
        ref = model(**x).sample
    fns, setup, outs = {}, {}, {}

    def add(name, make, inputs):
        t0 = time.perf_counter()
        fn = make()
        with torch.no_grad():
            outs[name] = fn(**inputs).sample.float()
        setup[name] = time.perf_counter() - t0
        fns[name] = lambda: fn(**inputs)
        print(f"  {name}: compiled and ran once in {setup[name]:.1f} s", flush=True)

    add("inductor_fp32", lambda: torch.compile(model, backend="inductor"), x)
    add("inductor_bf16", lambda: torch.compile(build(a.layers, a.heads, torch.bfloat16), backend="inductor"), xb)
    add("segquant_int8_dynamic", lambda: torch.compile(model, backend="segquant"), x)

    def static():
        q = torch.compile(model, backend="segquant", options={"activations": "static"})
        with torch.no_grad(), sq.calibrate(q, progress=False):
            for s in range(1, 1 + a.calibration):
                q(**sd3_inputs(model, batch=1, resolution=resolution, seed=s))
        return q
    add("segquant_int8_static", static, x)

    times = {n: [] for n in fns}
    faults = {n: [] for n in fns}
    with torch.no_grad():
        for n, fn in fns.items():   # one warm call each before timing
            fn()
        for _ in range(a.rounds):   # interleaved: drifts of the machine hit every variant alike
            for n, fn in fns.items():
                f0, t0 = minor_faults(), time.perf_counter()
                fn()
                times[n].append(time.perf_counter() - t0)
                faults[n].append(minor_faults() - f0)
    rows = {n: {"min_s": min(t), "median_s": statistics.median(t), "setup_s": setup[n],
                "minor_faults_per_forward": statistics.median(faults[n]),
                "sqnr_db_vs_fp32_eager": sqnr_db(ref, outs[n])} for n, t in times.items()}
    tokens = (resolution // 16) ** 2
    for n, r in rows.items():
        print(f"  {n:24s} min {r['min_s'] * 1e3:8.1f} ms  median {r['median_s'] * 1e3:8.1f} ms  "
              f"SQNR {r['sqnr_db_vs_fp32_eager']:5.1f} dB  faults {r['minor_faults_per_forward']:.0f}")
    ratio = lambda peer, stat: {n: rows[peer][stat] / r[stat] for n, r in rows.items()}  # noqa: E731
    return {"image_tokens": tokens, "text_tokens": 77, "resolution": resolution, "timings": rows,
            "speedup_vs_inductor_bf16_min": ratio("inductor_bf16", "min_s"),
            "speedup_vs_inductor_bf16_median": ratio("inductor_bf16", "median_s"),
            "speedup_vs_inductor_fp32_min": ratio("inductor_fp32", "min_s"),
            "params_M": round(sum(p.numel() for p in model.parameters()) / 1e6, 1)}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--resolutions", type=int, nargs="+", default=[512, 1024])   # 1024 and 4096 image tokens
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--calibration", type=int, default=4, help="random inputs to calibrate static steps on")
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "cpu_e2e.json"))
    a = p.parse_args()
    torch._dynamo.config.cache_size_limit = 64
    results = []
    for r in a.resolutions:
        print(f"resolution {r} ({(r // 16) ** 2} + 77 tokens):", flush=True)
        results.append(run_resolution(a, r))
    out = {"benchmark": "cpu_e2e", "device": cpu_name(), "threads": torch.get_num_threads(),
           "torch": torch.__version__, "triton": _version("triton"), "diffusers": _version("diffusers"),
           "cpu_gemm": cpu_gemm(), "rounds": a.rounds,
           "model": {"kind": "SD3Transformer2DModel (random weights)", "layers": a.layers,
                     "width": a.heads * 64, "heads": a.heads, "batch": 1},
           "command": "python bench/cpu_e2e.py " + " ".join(f"--{k} {v}" for k, v in vars(a).items()
                                                            if k != "out" and not isinstance(v, list))
                      + " --resolutions " + " ".join(map(str, a.resolutions)),
           "results": results}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(out, indent=1))
    print(f"wrote {a.out}")


def _version(name):
    try:
        from importlib.metadata import version
        return version(name)
    except Exception:
        return None


if __name__ == "__main__":
    main()
