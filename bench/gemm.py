"""GEMM kernels on a GPU: segquant int8 (single scale, DualScale, 24 K segments) and fp8 against
cuBLASLt int8 (`torch._int_mm`), `torch._scaled_mm` fp8 and bf16 `torch.mm`, over the GEMM shapes of
SD3.5-medium and FLUX.1-dev (from their plans) at 1024x1024, batch 1 and 2. JSON to bench/results/.

    python bench/gemm.py [--models sd3.5-medium flux.1-dev] [--batch 1 2] [--resolution 1024]

Needs CUDA (sm89+ for fp8). `--list` prints the shapes without timing (works on CPU).
"""
from __future__ import annotations

import argparse
import json
import platform
import subprocess
from pathlib import Path

import torch


def gemm_shapes(model_name: str, batch: int, resolution: int) -> list[dict]:
    """Distinct (M, N, K) of a model's linear sites, with whether any site of that shape is
    DualScale, input-segmented (how many segments), as the plan says."""
    from segquant_compile import explain
    from segquant_compile.examples import models
    model = models.build(models.load_config(model_name), device="meta")
    report = explain(model, **models.example_inputs(model, batch=batch, resolution=resolution))
    shapes: dict = {}
    for s in report.sites:
        if s.rows is None:
            continue
        row = shapes.setdefault((s.rows, s.out_features, s.in_features),
                                {"model": model_name, "batch": batch, "M": s.rows, "N": s.out_features,
                                 "K": s.in_features, "sites": 0, "dual": False, "segments": 1})
        row["sites"] += 1
        row["dual"] |= s.dualscale.any
        if s.input_segments:
            row["segments"] = max(row["segments"], len(s.input_segments.sizes))
    return list(shapes.values())


def time_shape(row: dict, device: str = "cuda", bench=None) -> dict:
    """ms and TFLOP/s of each kernel on this shape (`bench(fn)` -> ms: triton's do_bench by
    default; bench/gpu_suite.py --dry-run passes a wall-clock timer and runs on the CPU under the
    Triton interpreter). A kernel that fails records its error."""
    from segquant_compile.lowering.triton_gemm import ensure, launch
    if bench is None:
        from triton.testing import do_bench
        bench = lambda fn: do_bench(fn, warmup=25, rep=100)  # noqa: E731
    m, n, k = row["M"], row["N"], row["K"]
    dev = device
    a = torch.randint(-127, 128, (m, k), dtype=torch.int8, device=dev)
    w = torch.randint(-127, 128, (k, n), dtype=torch.int8, device=dev)
    # K-major (column-major B): the layout cuBLASLt int8 wants and the one sites pack for CUDA
    # (quantize.packed_layout)
    wt = w.t().contiguous().t()
    d = torch.rand(m, 1, device=dev) * 0.01
    dw = torch.rand(n, device=dev) * 0.01
    bias = torch.randn(n, device=dev, dtype=torch.bfloat16)
    ab, wb = a.to(torch.bfloat16), w.to(torch.bfloat16)
    seg = [i * k // 24 for i in range(25)] if k % 24 == 0 else [0, k]
    out = {}

    def time(name, fn, variant=None):
        try:
            if variant:
                ensure(m, n, k, variant, torch.device(dev))
            ms = bench(fn)
            out[name] = {"ms": ms, "tflops": 2 * m * n * k / ms / 1e9}
        except Exception as e:    # e.g. _scaled_mm without an sm89+ GPU
            out[name] = {"error": f"{type(e).__name__}: {e}"[:300]}

    time("segquant_int8", lambda: launch(a, d, d, wt, dw, bias, [0, k], [0], torch.bfloat16), "int8")
    time("segquant_int8_dual", lambda: launch(a, d, d, wt, dw, bias, [0, k], [1], torch.bfloat16), "int8-dual")
    if len(seg) == 25:
        ds = d.expand(m, 24).contiguous()
        time("segquant_int8_24seg", lambda: launch(a, ds, ds, wt, dw, bias, seg, [0] * 24, torch.bfloat16), "int8")
    if m > 16 and k % 8 == 0 and n % 8 == 0:
        time("cublaslt_int8_no_epilogue", lambda: torch._int_mm(a, wt))
    time("bf16_mm", lambda: torch.mm(ab, wb))
    if dev != "cuda" or torch.cuda.get_device_capability() >= (8, 9):
        a8 = ab.to(torch.float8_e4m3fn)
        w8 = wb.t().contiguous().to(torch.float8_e4m3fn)
        time("segquant_fp8", lambda: launch(a8, d, d, w8.t(), dw, bias, [0, k], [0], torch.bfloat16), "fp8")
        time("scaled_mm_fp8_rowwise", lambda: torch._scaled_mm(a8, w8.t(), scale_a=d, scale_b=dw[None, :],
                                                                  out_dtype=torch.bfloat16))
    return {**row, "timings": out}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--models", nargs="+", default=["sd3.5-medium", "flux.1-dev"])
    p.add_argument("--batch", nargs="+", type=int, default=[1, 2])
    p.add_argument("--resolution", type=int, default=1024)
    p.add_argument("--list", action="store_true")
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "gemm.json"))
    a = p.parse_args()
    rows = [r for m in a.models for b in a.batch for r in gemm_shapes(m, b, a.resolution)]
    if a.list:
        for r in rows:
            print(r)
        return
    if not torch.cuda.is_available():
        raise SystemExit("bench/gemm.py times GPU kernels: no CUDA device here (use --list to see the shapes)")
    results = [time_shape(r) for r in rows]
    import triton
    driver = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                            capture_output=True, text=True).stdout.strip()
    meta = {"benchmark": "gemm", "device": torch.cuda.get_device_name(), "driver": driver,
            "torch": torch.__version__, "triton": triton.__version__, "python": platform.python_version(),
            "resolution": a.resolution, "rows": results}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(meta, indent=1))
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
