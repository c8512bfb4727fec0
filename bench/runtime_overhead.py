"""Per-call overhead of the segquant runtime (state lookup and weight checks) on the demo model.

    .venv/bin/python bench/runtime_overhead.py [--label after] [--out bench/results/runtime_overhead.json]

Times, on the `segquant demo` SD3-style transformer (39.7 M parameters, 36 linear sites) at a
tiny input where compute is small: (1) the runner's per-call lookup of its QuantStates with the
weight checks (`states_of_call`; `states_for` in the runtime before the redesign), called directly
on the arguments of a real call; (2) the whole compiled forward, segquant dynamic against Inductor
float32, median of interleaved calls. Results append to the JSON under --label, with versions.
"""
from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch

from machine import cpu_name  # noqa: E402  (bench/machine.py)


def median_us(fn, reps: int) -> float:
    from segquant_compile.demo import median_seconds
    return median_seconds(fn, warmup=10, reps=reps) * 1e6


def main() -> None:
    import segquant_compile  # noqa: F401
    from segquant_compile import runtime
    from segquant_compile.examples.sd3_demo import demo_sd3, sd3_inputs
    p = argparse.ArgumentParser()
    p.add_argument("--label", default="after")
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "runtime_overhead.json"))
    p.add_argument("--reps", type=int, default=300)
    args = p.parse_args()
    torch.manual_seed(0)
    model = demo_sd3()
    x = sd3_inputs(model, batch=1, resolution=64, tokens=8, seed=0)
    calls = []
    original = runtime.GraphRunner.__call__

    def recording(self, *a):
        calls.append((self, a))
        return original(self, *a)
    runtime.GraphRunner.__call__ = recording
    with torch.no_grad():
        quant = torch.compile(model, backend="segquant")
        quant(**x)
    runtime.GraphRunner.__call__ = original
    runner, call_args = max(calls, key=lambda c: len(c[0].plan))
    lookup = getattr(runner, "states_of_call", None) or getattr(runner, "states_for")
    n_sites = len(runner.plan)
    with torch.no_grad():
        t_lookup = median_us(lambda: lookup(call_args), args.reps)
        fp32 = torch.compile(model, backend="inductor")
        fp32(**x)
        rounds = [(median_us(lambda: quant(**x), 50), median_us(lambda: fp32(**x), 50)) for _ in range(4)]
    t_quant = statistics.median(r[0] for r in rounds)
    t_fp32 = statistics.median(r[1] for r in rounds)
    row = {"label": args.label, "sites": n_sites, "lookup_and_checks_us": round(t_lookup, 1),
           "lookup_us_per_site": round(t_lookup / n_sites, 2), "segquant_forward_us": round(t_quant, 1),
           "inductor_fp32_forward_us": round(t_fp32, 1),
           "shape": "demo SD3 (39.7 M params), batch 1, 64 px (16 image + 8 text tokens)",
           "device": cpu_name(), "threads": torch.get_num_threads(),
           "torch": torch.__version__}
    try:
        import triton
        row["triton"] = triton.__version__
    except ImportError:
        pass
    out = Path(args.out)
    data = json.loads(out.read_text()) if out.exists() else {"runs": []}
    data["runs"] = [r for r in data["runs"] if r["label"] != args.label] + [row]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(data, indent=1) + "\n")
    print(json.dumps(row, indent=1))


if __name__ == "__main__":
    main()
