"""Calibration memory (issue 30): the memory model (segquant_compile/calibration_memory.py) on the
shipped configs, and checked against a real CPU calibration.

1. Plans: SD3.5-medium, FLUX.1-dev, PixArt-Sigma and the SDXL UNet at 1024x1024 (batch 1, the
   default text lengths, as `segquant inspect`), static activations with the default GPTQ rounding,
   bfloat16 weights, on the meta device. Kept rows at their caps (enough calls to fill them).
   Float copies are those of the CPU "fp32" GEMM form (SEGQUANT_CPU_GEMM=fp32: CPUs without int8 dot
   instructions); a GPU, or a CPU of the "int8" form, holds none.
2. The check: a mid-size SD3-style transformer with random weights (inner width 1536, 2 blocks: sites
   of K 1536 and 6144) calibrated on the CPU in a fresh process, the peak resident memory read from
   /proc/self/status (VmHWM, reset by writing 5 to /proc/self/clear_refs) and the resident memory
   (VmRSS) at points of the calibration, with glibc's mmap threshold fixed at 64 KiB
   (MALLOC_MMAP_THRESHOLD_) so that every tensor of more than 64 KiB is returned to the system when
   freed. The baseline is taken after compiling and a first calibration, inside the block of a
   second one (calibrate(recalibrate=True) has dropped the first one's statistics); the estimate
   is the model's for the calls made. The check's options collect what static GPTQ collects but skip
   the freeze's searches (CHECK_OPTIONS), for its time.

    .venv/bin/python bench/calibration_memory.py   # writes bench/results/calibration_memory.json
"""
from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from machine import cpu_name  # noqa: E402

SHIPPED = {"sd3.5-medium": "SD3.5-medium", "flux.1-dev": "FLUX.1-dev", "pixart-sigma": "PixArt-Sigma",
           "sdxl-unet": "SDXL UNet"}
OPTIONS = {"activations": "static"}
GIB = 2 ** 30
# the check's model: SD3-style, random weights; sites of K 1536 (Hessians summed) and 6144 (rows kept)
MID = dict(num_layers=2, num_attention_heads=24, attention_head_dim=64, joint_attention_dim=1536,
           caption_projection_dim=1536, dual_attention_layers=(0,))
MID_CALL = dict(batch=2, resolution=256, tokens=77)
CALLS = 8
# the check's options: the statistics of OPTIONS (static steps, GPTQ: statistics.StatisticsSpec depends
# on nothing else), without the freeze's searches (smoothing alpha, clip, schemes), which take the time
CHECK_OPTIONS = {**OPTIONS, "smooth": None, "activation_clip": "absmax", "dualscale": True, "inductor": False}


def plans() -> dict:
    os.environ["SEGQUANT_CPU_GEMM"] = "fp32"
    from segquant_compile.calibration_memory import calibration_memory
    from segquant_compile.examples import models
    from segquant_compile.explain import explain
    out = {}
    for name in SHIPPED:
        config = models.load_config(name)
        model = models.build(config, device="meta")
        defaults = models.pipeline_defaults(config, None)
        inputs = models.example_inputs(model, batch=1, resolution=1024, text_tokens=defaults["text_tokens"])
        memory = calibration_memory(explain(model, **inputs, options=OPTIONS), torch.bfloat16)
        t = memory.totals()
        # rows GPTQ fits where the widest K segment is too wide to sum a Hessian (GPTQ_ROWS of them)
        wide = sum(x.row_bytes for x in memory.sites if x.shared_with is None and x.hessian_bytes == 0
                   and "GPTQ rounding" in x.serves)
        out[name] = {"model": SHIPPED[name], "text_tokens": defaults["text_tokens"],
                     **{f"{k}_gib": round(v / GIB, 3) for k, v in t.items()
                        if k in ("statistics", "hessians", "rows", "ranges", "packed", "float_copies", "weights")},
                     "rows_without_hessian_gib": round(wide / GIB, 3),
                     **{k: t[k] for k in ("sites", "statistics_sets", "hessians_summed")}, "serves": memory.serves()}
        del model
        gc.collect()
    return out


def _status() -> dict[str, int]:
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(("VmHWM", "VmRSS")):
            key, value = line.split(":")
            out[key] = int(value.split()[0]) * 1024
    return out


def _reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")


def worker(out: str) -> None:
    import segquant_compile as sq
    from segquant_compile.calibration_memory import calibration_memory
    from segquant_compile.examples.sd3_demo import demo_sd3, sd3_inputs
    torch.set_num_threads(2)
    model = demo_sd3(**MID)
    inputs = [sd3_inputs(model, seed=s, **MID_CALL) for s in range(CALLS)]
    opts = CHECK_OPTIONS
    memory = calibration_memory(sq.explain(model, **inputs[0], options=opts), calls=CALLS)
    gc.collect()
    with torch.no_grad():   # a float call's own transient memory (activations)
        model(**inputs[0])
        gc.collect()
        _reset_peak()
        before = _status()["VmRSS"]
        model(**inputs[0])
        forward = _status()["VmHWM"] - before
    compiled = torch.compile(model, backend="segquant", options=opts)
    with sq.calibrate(compiled, progress=False):   # compiles; a first calibration
        compiled(**inputs[0])
    points = {}
    t = time.perf_counter()
    with sq.calibrate(compiled, progress=False, recalibrate=True):   # its statistics dropped on entry
        gc.collect()
        _reset_peak()
        points["baseline"] = _status()["VmRSS"]
        for i, x in enumerate(inputs):
            compiled(**x)
            print(f"call {i}: {_status()}", file=sys.stderr, flush=True)
        points["held_after_calls"], points["peak_during_calls"] = _status()["VmRSS"], _status()["VmHWM"]
    points["peak_with_freeze"] = _status()["VmHWM"]
    gc.collect()
    points["after_calibration"] = _status()["VmRSS"]
    seconds = time.perf_counter() - t
    states = {id(st.stats): st.stats for st in sq.report(compiled).states.values()}
    kept = sum(s.kept.nbytes + (s.coded.nbytes if s.coded is not None else 0)
               for s in states.values() if s.kept is not None)
    base = points["baseline"]
    t = memory.totals()
    Path(out).write_text(json.dumps({
        "estimate_statistics": t["statistics"], "estimate_hessians": t["hessians"], "estimate_rows": t["rows"],
        "estimate_ranges": t["ranges"], "estimate_peak_during_calls": t["peak_during_calls"],
        "estimate_call_transient": t["call_transient"], "float_forward_transient": forward,
        "weights_fp32": sum(p.nbytes for p in model.parameters()), "sites": t["sites"],
        "statistics_sets": t["statistics_sets"], "calibration_s": round(seconds, 1),
        "rows_held_after_calibration": kept, **points,
        **{f"added_{k}": v - base for k, v in points.items() if k != "baseline"}}))


def check() -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "check.json"
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(64 * 1024)}
        subprocess.run([sys.executable, __file__, "--worker", str(path)], env=env, check=True)
        r = json.loads(path.read_text())
    est = r["estimate_statistics"]
    r["held_over_estimate"] = round(r["added_held_after_calls"] / est, 3)
    r["peak_over_estimate"] = round(r["added_peak_during_calls"] / est, 3)
    r["peak_less_forward_over_estimate"] = round((r["added_peak_during_calls"] - r["float_forward_transient"]) / est, 3)
    r["peak_with_freeze_over_estimate"] = round(r["added_peak_with_freeze"] / est, 3)
    # the model's peak (statistics + the largest set's call transient) against the measured peak
    # less the float forward's own activations
    r["peak_less_forward_over_peak_estimate"] = round(
        (r["added_peak_during_calls"] - r["float_forward_transient"]) / r["estimate_peak_during_calls"], 3)
    return {"model": "SD3-style transformer, random weights: " + json.dumps(MID), "call": MID_CALL, "calls": CALLS,
            "options": CHECK_OPTIONS,
            "measure": "VmRSS/VmHWM of /proc/self/status (clear_refs 5), MALLOC_MMAP_THRESHOLD_=65536", **r}


if __name__ == "__main__":
    if sys.argv[1:2] == ["--worker"]:
        worker(sys.argv[2])
        sys.exit(0)
    result = {"cpu": cpu_name(), "torch": torch.__version__, "options": OPTIONS, "resolution": 1024,
              "check": check(), "plans": plans()}
    path = Path(__file__).parent / "results" / "calibration_memory.json"
    path.write_text(json.dumps(result, indent=1))
    c = result["check"]
    print(f"check: estimate {c['estimate_statistics'] / 2**20:.1f} MiB of statistics; held after the calls "
          f"{c['added_held_after_calls'] / 2**20:.1f} MiB ({c['held_over_estimate']}x), peak during the calls "
          f"{c['added_peak_during_calls'] / 2**20:.1f} MiB ({c['peak_over_estimate']}x; a float call's own "
          f"{c['float_forward_transient'] / 2**20:.1f} MiB; less it, {c['peak_less_forward_over_peak_estimate']}x the "
          f"estimated peak {c['estimate_peak_during_calls'] / 2**20:.1f} MiB), with the freeze {c['added_peak_with_freeze'] / 2**20:.1f} MiB")
    for name, p in result["plans"].items():
        print(f"{p['model']}: statistics {p['statistics_gib']} GiB (Hessians {p['hessians_gib']}, rows {p['rows_gib']}"
              f", of which {p['rows_without_hessian_gib']} where no Hessian is summed), packed {p['packed_gib']}, "
              f"float copies {p['float_copies_gib']}, weights {p['weights_gib']} GiB")
