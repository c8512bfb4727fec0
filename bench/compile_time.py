"""Cold compile to the first output, and where it goes (issue 28 part 5): torch.compile with
Inductor float32 against the segquant backend (dynamic default: first-call decisions included),
each in a fresh process with a fresh Inductor cache, on the demo SD3 model and the terrain UNet
(whole model, and regionally: each ResBlock/attention block compiled once, as diffusers'
compile_repeated_blocks does). Writes bench/results/compile_time.json.

    .venv/bin/python bench/compile_time.py                      # both models, both backends
    .venv/bin/python bench/compile_time.py --models demo --backends segquant

Phases (seconds, summed over every graph): `plan` (segquant's planning of the FX graph),
`first_call` (the observer graph's float run and the first-call decisions: schemes, GPTQ),
`inductor` (compile_fx of the rewritten graph: lowering, codegen and the C++ build), of it
`cpp_build` (the C++ compiler), and `rest` (dynamo's tracing, AOTAutograd, the first run).
Generated code: the lines of the .py and .cpp files Inductor wrote into its fresh cache.
Times are only comparable on a quiet machine: the JSON records the load average at the start.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


class Timers:
    def __init__(self):
        self.seconds: dict[str, float] = {}

    def wrap(self, owner, name: str, phase: str) -> None:
        fn = getattr(owner, name)
        timers = self

        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                timers.seconds[phase] = timers.seconds.get(phase, 0.0) + time.perf_counter() - t0
        setattr(owner, name, timed)


def generated_lines(cache: Path) -> dict:
    out = {"py_lines": 0, "cpp_lines": 0, "files": 0}
    for p in cache.rglob("*"):
        if p.suffix in (".py", ".cpp") and p.is_file():
            out["files"] += 1
            out[f"{p.suffix[1:]}_lines"] += sum(1 for _ in p.open(errors="ignore"))
    return out


def one(model_key: str, backend: str, regional: bool) -> dict:
    """In this (fresh) process: compile and run once; the phases."""
    import torch
    timers = Timers()
    from torch._inductor import cpp_builder
    timers.wrap(cpp_builder.CppBuilder, "build", "cpp_build")
    if backend == "segquant":
        import segquant_compile.backend as be
        from segquant_compile import runtime
        timers.wrap(be, "build_plan", "plan")
        timers.wrap(runtime.GraphRunner, "choose_schemes", "first_call")
        timers.wrap(runtime.GraphRunner, "_compile", "inductor")
    torch.manual_seed(0)
    if model_key == "demo":
        from segquant_compile.examples.sd3_demo import demo_sd3, sd3_inputs
        model = demo_sd3()
        inputs = sd3_inputs(model, resolution=256)
        call = lambda m: m(**inputs)   # noqa: E731
    else:
        from segquant_compile.examples import terrain_unet as tu
        model = tu.load_unet()
        x = torch.randn(4, 1, 64, 64)
        sigma, d01 = torch.full((4,), 5.0), torch.rand(4)
        call = lambda m: tu.denoise(m, x, sigma, d01)   # noqa: E731
    model.requires_grad_(False)
    kwargs = {"backend": "segquant"} if backend == "segquant" else {}
    t0 = time.perf_counter()
    with torch.no_grad():
        if regional:
            blocks = [m for m in model.modules() if type(m).__name__ in ("ResBlock", "AttentionBlock")]
            for b in blocks:
                b.compile(**kwargs)
            call(model)
        else:
            call(torch.compile(model, **kwargs))
    total = time.perf_counter() - t0
    phases = {k: round(v, 2) for k, v in timers.seconds.items()}
    if backend == "segquant":
        phases["inductor_without_cpp"] = round(phases.get("inductor", 0) - phases.get("cpp_build", 0), 2)
        phases["rest"] = round(total - sum(phases.get(k, 0) for k in ("plan", "first_call", "inductor")), 2)
    else:
        phases["rest"] = round(total - phases.get("cpp_build", 0), 2)
    return {"total_s": round(total, 2), "phases_s": phases}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", nargs="+", default=["demo", "unet", "unet-regional"],
                   choices=["demo", "unet", "unet-regional"])
    p.add_argument("--backends", nargs="+", default=["inductor", "segquant"], choices=["inductor", "segquant"])
    p.add_argument("--one", nargs=2, metavar=("MODEL", "BACKEND"), help=argparse.SUPPRESS)
    p.add_argument("--out", type=Path, default=RESULTS / "compile_time.json")
    a = p.parse_args(argv)
    if a.one:
        model, backend = a.one
        print(json.dumps(one(model.removesuffix("-regional"), backend, model.endswith("-regional"))))
        return 0
    import torch
    from machine import cpu_name  # noqa: E402  (bench/machine.py)
    results = {"command": " ".join([".venv/bin/python bench/compile_time.py", *sys.argv[1:]]),
               "cpu": cpu_name(), "torch": torch.__version__, "threads": torch.get_num_threads(),
               "load_average_at_start": os.getloadavg(), "runs": {}}
    for model in a.models:
        for backend in a.backends:
            with tempfile.TemporaryDirectory() as cache:
                env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache}
                proc = subprocess.run([sys.executable, __file__, "--one", model, backend], env=env,
                                      capture_output=True, text=True)
                if proc.returncode:
                    row = {"error": proc.stderr[-2000:]}
                else:
                    row = {**json.loads(proc.stdout.strip().splitlines()[-1]), **generated_lines(Path(cache))}
            results["runs"][f"{model} {backend}"] = row
            print(model, backend, row, flush=True)
            a.out.write_text(json.dumps(results, indent=1))
        base, quant = (results["runs"].get(f"{model} {b}", {}) for b in ("inductor", "segquant"))
        if "total_s" in base and "total_s" in quant:
            results["runs"][f"{model} ratio"] = round(quant["total_s"] / base["total_s"], 2)
    a.out.write_text(json.dumps(results, indent=1))
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
