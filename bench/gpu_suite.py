"""Everything a lent GPU should run, in one command and at most 8 minutes on one H100:

    python3 bench/gpu_suite.py              # on the GPU machine, from the project root
    .venv/bin/python bench/gpu_suite.py --dry-run   # CPU, Triton interpreter, tiny shapes (CI)

1. installs ../shared/wheels/gpu (diffusers, torchao: the GPU image lacks them) as its README says:
   copied to .whl/, `pip install --target /tmp/site`, the project editable; then re-runs itself
2. `pytest -m gpu`
3. the GEMM kernels on SD3.5-medium and FLUX.1-dev shapes at 1024x1024, batch 1 (bench/gemm.py):
   segquant int8 plain / DualScale / 24 head segments, fp8, against `torch._int_mm`,
   `torch._scaled_mm` row-wise and bf16 `mm`
4. one FLUX.1-dev double block and single block at full width, 4096 image + 512 text tokens, and
   the whole SD3.5-medium transformer at 1024x1024 batch 1: Inductor bf16, segquant int8 dynamic /
   static / fp8, torchao int8 and fp8 dynamic, all under torch.compile (random weights)
5. a torch.profiler breakdown of one segquant forward of the SD3.5-medium transformer
then writes one JSON (device, driver, versions, every stage's result or error) to
bench/results/gpu_suite.json. Each stage gets what is left of the budget; a stage that runs out
or fails is recorded as such and the others still run.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BUDGET_S = 480
SITE = "/tmp/site"


def install_wheels() -> str:
    """The shared GPU wheels into /tmp/site and the project editable (the GPU image reaches no
    package index); returns what was done. Skipped when diffusers and torchao already import."""
    try:
        import diffusers  # noqa: F401
        import torchao  # noqa: F401
        return "diffusers and torchao already importable"
    except ImportError:
        pass
    source = next((p for p in (ROOT.parent / "shared" / "wheels" / "gpu", ROOT / "shared" / "wheels" / "gpu",
                               ROOT / ".whl") if p.is_dir() and any(p.glob("*.whl"))), None)
    if source is None:
        return "no wheels found in ../shared/wheels/gpu or .whl/"
    whl = ROOT / ".whl"
    whl.mkdir(exist_ok=True)
    for w in source.glob("*.whl"):
        if w.parent != whl:
            shutil.copy2(w, whl)
    pip = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps"]
    subprocess.run(pip + ["--no-compile", "--target", SITE, *map(str, sorted(whl.glob("*.whl")))], check=True)
    subprocess.run(pip + ["--no-build-isolation", "-e", str(ROOT)], check=True)
    return f"installed {len(list(whl.glob('*.whl')))} wheels from {source} into {SITE}, project editable"


class Budget:
    def __init__(self, seconds: float):
        self.end = time.monotonic() + seconds

    def left(self) -> float:
        return self.end - time.monotonic()


def stage(results: dict, name: str, budget: Budget, fn, *args):
    """Run one stage, record its result or its error and its time; never raise."""
    t0 = time.monotonic()
    if budget.left() < 5:
        results[name] = {"skipped": "budget spent"}
        return
    print(f"[{budget.left():5.0f} s left] {name}", flush=True)
    try:
        results[name] = {"result": fn(budget, *args)}
    except Exception as e:   # recorded: the next stages still run
        results[name] = {"error": f"{type(e).__name__}: {e}"[:2000]}
        print(f"  {name} failed: {results[name]['error'][:300]}", flush=True)
    results[name]["seconds"] = round(time.monotonic() - t0, 1)


def timer(dry: bool):
    """ms per call: CUDA events through triton's do_bench on a GPU; one wall-clock call in a dry run."""
    if dry:
        def once(fn):
            fn()
            t = time.perf_counter()
            fn()
            return (time.perf_counter() - t) * 1e3
        return once
    from triton.testing import do_bench
    return lambda fn: do_bench(fn, warmup=5, rep=20)


# ---------------------------------------------------------------- stages
def run_pytest(budget: Budget, dry: bool) -> dict:
    cmd = [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider", str(ROOT / "tests")]
    if dry:
        cmd.append("--collect-only")
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=max(10.0, min(budget.left() - 5, 150)),
                         cwd=ROOT)
    return {"returncode": out.returncode, "tail": out.stdout.strip().splitlines()[-3:]}


def gemm_kernels(budget: Budget, dry: bool) -> list:
    """bench/gemm.py's timing per distinct shape (the GPU autotunes each variant first)."""
    sys.path.insert(0, str(ROOT / "bench"))
    import gemm
    if dry:
        rows = [{"model": "tiny", "batch": 1, "M": 20, "N": 48, "K": 48, "sites": 1, "dual": True, "segments": 24}]
    else:
        rows = [r for m in ("sd3.5-medium", "flux.1-dev") for r in gemm.gemm_shapes(m, 1, 1024)]
    out = []
    for r in rows:
        if budget.left() < 20:
            out.append({**r, "skipped": "budget spent"})
            continue
        out.append(gemm.time_shape(r, device="cpu" if dry else "cuda", bench=timer(dry) if dry else None))
    return out


def variants(dry: bool) -> dict:
    """name -> (module, inputs, calibration inputs) -> a compiled callable. A dry run checks the
    suite's own code, not Inductor's: segquant's graphs run uncompiled and the float baseline on
    dynamo's eager backend (Inductor's code for segquant graphs is the test suite's job), which
    keeps the dry run in CI to a minute."""
    import torch

    import segquant_compile as sq
    run = {"inductor": False} if dry else {}

    def segquant(options, static=False):
        def make(module, inputs, calibration):
            fn = torch.compile(module, backend="segquant", options={**options, **run})
            if static:
                with sq.calibrate(fn, progress=False):
                    for x in calibration:
                        fn(**x)
            return fn
        return make

    def torchao(kind):
        def make(module, inputs, calibration):
            from torchao.quantization import quantize_
            if kind == "int8":
                from torchao.quantization import Int8DynamicActivationInt8WeightConfig as Config
                config = Config()
            else:
                from torchao.quantization import Float8DynamicActivationFloat8WeightConfig as Config
                from torchao.quantization import PerRow
                config = Config(granularity=PerRow())
            quantize_(module, config)
            return torch.compile(module)
        return make

    baseline = {"backend": "eager"} if dry else {}
    out = {"inductor_bf16": lambda module, inputs, calibration: torch.compile(module, **baseline),
           "segquant_int8_dynamic": segquant({}),
           "segquant_int8_static": segquant({"activations": "static"}, static=True),
           "segquant_fp8_dynamic": segquant({"format": "fp8"})}
    out["torchao_int8_dynamic"] = torchao("int8")
    out["torchao_fp8_dynamic"] = torchao("fp8")
    return out


def time_module(budget: Budget, module, inputs: dict, calibration: list, dry: bool) -> dict:
    import torch

    from segquant_compile.lowering.quantize import sqnr_db
    measure = timer(dry)
    with torch.no_grad():
        ref = _first(module(**inputs)).float()
        rows = {}
        for name, make in variants(dry).items():
            if budget.left() < 30:
                rows[name] = {"skipped": "budget spent"}
                continue
            try:
                t0 = time.monotonic()
                fn = make(copy.deepcopy(module), inputs, calibration)
                out = _first(fn(**inputs)).float()
                rows[name] = {"setup_s": round(time.monotonic() - t0, 1), "ms": measure(lambda: fn(**inputs)),
                              "sqnr_db_vs_eager": round(float(sqnr_db(ref, out)), 2)}
            except Exception as e:   # torchao missing (the dry run), an fp8 path on an sm80 GPU, ...
                rows[name] = {"error": f"{type(e).__name__}: {e}"[:500]}
            print(f"  {name}: {rows[name]}", flush=True)
            torch._dynamo.reset()
    return rows


def _first(y):
    y = y[0] if isinstance(y, tuple) else y
    return getattr(y, "sample", y)


def flux_blocks(budget: Budget, dry: bool) -> dict:
    """FLUX.1-dev's double (joint) and single blocks at full width, 4096 image + 512 text tokens."""
    import torch

    from segquant_compile.examples import models
    config = models.load_config("flux.1-dev")
    config.update(num_layers=1, num_single_layers=1)
    if dry:
        config.update(num_attention_heads=2, attention_head_dim=32, joint_attention_dim=64, in_channels=16,
                      pooled_projection_dim=32, axes_dims_rope=[8, 12, 12])
    device, dtype = ("cpu", torch.float32) if dry else ("cuda", torch.bfloat16)
    model = models.build(config, device=device, dtype=dtype)
    image, text = (64, 16) if dry else (4096, 512)
    width = model.inner_dim
    g = torch.Generator().manual_seed(0)

    def rand(*shape):
        return torch.randn(*shape, generator=g).to(device=device, dtype=dtype)
    ids = torch.zeros(text + image, 3)
    ids[text:, 1] = torch.arange(image) // int(image ** 0.5)
    ids[text:, 2] = torch.arange(image) % int(image ** 0.5)
    with torch.no_grad():
        rope = model.pos_embed(ids.to(device=device, dtype=dtype))

    def inputs(seed=0):
        g.manual_seed(seed)
        return dict(hidden_states=rand(1, image, width), encoder_hidden_states=rand(1, text, width),
                    temb=rand(1, width), image_rotary_emb=rope)
    calibration = [inputs(s) for s in (1, 2)]
    return {name: time_module(budget, block, inputs(), calibration, dry)
            for name, block in (("double_block", model.transformer_blocks[0]),
                                ("single_block", model.single_transformer_blocks[0]))}


def sd3_model(dry: bool):
    import torch

    from segquant_compile.examples import models
    config = models.load_config("sd3.5-medium")
    if dry:
        config.update(num_layers=1, num_attention_heads=2, attention_head_dim=32, joint_attention_dim=64,
                      caption_projection_dim=64, pooled_projection_dim=32, dual_attention_layers=[0])
    device, dtype = ("cpu", torch.float32) if dry else ("cuda", torch.bfloat16)
    return models.build(config, device=device, dtype=dtype)


def sd3_inputs(model, dry: bool, seed=0):
    import torch

    from segquant_compile.examples import models
    return models.example_inputs(model, batch=1, resolution=64 if dry else 1024, text_tokens=8 if dry else None,
                                 generator=torch.Generator().manual_seed(seed))


def sd3_transformer(budget: Budget, dry: bool) -> dict:
    model = sd3_model(dry)
    return time_module(budget, model, sd3_inputs(model, dry), [sd3_inputs(model, dry, s) for s in (1, 2)], dry)


def profile(budget: Budget, dry: bool) -> list:
    """The 25 ops of one segquant int8 dynamic forward that take the most device (dry: CPU) time."""
    import torch
    from torch.profiler import ProfilerActivity
    model = sd3_model(dry)
    x = sd3_inputs(model, dry)
    fn = torch.compile(model, backend="segquant")
    activities = [ProfilerActivity.CPU] + ([] if dry else [ProfilerActivity.CUDA])
    with torch.no_grad():
        fn(**x)
        fn(**x)
        with torch.profiler.profile(activities=activities) as prof:
            fn(**x)
            if not dry:
                torch.cuda.synchronize()
    key = "self_cpu_time_total" if dry else "self_device_time_total"
    events = sorted(prof.key_averages(), key=lambda e: getattr(e, key, 0.0), reverse=True)[:25]
    return [{"op": e.key, "calls": e.count, "self_us": round(getattr(e, key, 0.0), 1)} for e in events]


# ---------------------------------------------------------------- main
def environment(dry: bool) -> dict:
    import torch
    import triton
    out = {"python": platform.python_version(), "torch": torch.__version__, "triton": triton.__version__,
           "dry_run": dry}
    for name in ("diffusers", "torchao"):
        try:
            out[name] = __import__(name).__version__
        except Exception as e:
            out[name] = f"unavailable: {type(e).__name__}"
    if torch.cuda.is_available():
        out["device"] = torch.cuda.get_device_name()
        out["capability"] = "sm_%d%d" % torch.cuda.get_device_capability()
        smi = shutil.which("nvidia-smi")
        out["driver"] = subprocess.run([smi, "--query-gpu=driver_version", "--format=csv,noheader"],
                                       capture_output=True, text=True).stdout.strip() if smi else None
    else:
        out["device"] = "cpu (Triton interpreter)" if dry else "cpu"
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dry-run", action="store_true", help="CPU, Triton interpreter, tiny shapes: the suite runs")
    p.add_argument("--budget", type=float, default=None,
                   help=f"seconds of wall time for all stages (default {BUDGET_S}; a dry run: 1800)")
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "gpu_suite.json"))
    p.add_argument("--stages", nargs="+", default=["pytest", "gemm", "flux_blocks", "sd3_transformer", "profile"])
    a = p.parse_args(argv)
    dry = a.dry_run
    a.budget = a.budget or (1800.0 if dry else BUDGET_S)
    installed = "dry run: nothing installed"
    if dry:
        os.environ["TRITON_INTERPRET"] = "1"     # before triton is imported: kernels run on the CPU
    elif os.environ.get("SEGQUANT_GPU_SUITE_INSTALLED") != "1":
        installed = install_wheels()
        print(installed, flush=True)
        env = dict(os.environ, SEGQUANT_GPU_SUITE_INSTALLED="1",
                   PYTHONPATH=os.pathsep.join(filter(None, [SITE, os.environ.get("PYTHONPATH")])))
        return subprocess.run([sys.executable, __file__, *(argv if argv is not None else sys.argv[1:])],
                              env=env).returncode   # a fresh interpreter sees /tmp/site
    import torch
    if not dry and not torch.cuda.is_available():
        raise SystemExit("bench/gpu_suite.py: no CUDA device (use --dry-run on a CPU)")
    torch._dynamo.config.cache_size_limit = 64
    budget = Budget(a.budget)
    results = {"suite": "gpu_suite", "environment": environment(dry), "install": installed,
               "budget_s": a.budget, "stages": {}}
    table = {"pytest": run_pytest, "gemm": gemm_kernels, "flux_blocks": flux_blocks,
             "sd3_transformer": sd3_transformer, "profile": profile}
    for name in a.stages:
        stage(results["stages"], name, budget, table[name], dry)
    results["wall_s"] = round(a.budget - budget.left(), 1)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(results, indent=1))
    print(f"wrote {a.out} ({results['wall_s']} s)")
    failed = [n for n, r in results["stages"].items() if "error" in r]
    return 1 if failed and not dry else 0


if __name__ == "__main__":
    sys.exit(main())
