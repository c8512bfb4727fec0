"""Calibration cost (issue 30's targets): observer overhead per calibration call against a float
forward, freeze time per 100 sites, and two gloo processes calibrating the inputs against one.

    .venv/bin/python bench/calibration_scale.py   # quiet machine; bench/results/calibration_scale.json

Every process runs with one thread, so two processes use the machine's two cores. A process's
calibration time is its inputs at its measured time per observed call (the block's first call,
which compiles, is not timed; the ranks start the timed calls together) plus the block's measured exit (merge, freeze, exchange, summary); the float forward is eager, as
the observed graph runs uncompiled. A third run (one process, weight_rounding="rtn") times the
observer without GPTQ's Hessians."""
from __future__ import annotations

import datetime
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from machine import cpu_name  # noqa: E402

CALLS = 8
DEMO = dict(resolution=256, tokens=32)


def _model_and_inputs():
    from segquant_compile.examples.sd3_demo import demo_sd3, sd3_inputs
    model = demo_sd3()
    return model, [sd3_inputs(model, seed=s, **DEMO) for s in range(CALLS)]


OPTIONS = {"activations": "static", "inductor": False}
# the same without GPTQ's Hessians: what the rest of the observer costs
RTN = {**OPTIONS, "weight_rounding": "rtn"}


def worker(out: str, options: dict) -> None:
    """One rank: calibrate inputs[rank::world]; write its timings to OUT/rank{r}.json. The first
    call of the block compiles (dynamo, planning) and is not timed."""
    import segquant_compile as sq
    from segquant_compile import calibration
    torch.set_num_threads(1)
    world, rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
    if world > 1:
        torch.distributed.init_process_group("gloo", timeout=datetime.timedelta(seconds=600))
    timed = {"freeze_s": 0.0, "merge_s": 0.0}

    def timer(fn, key):
        def run(*args, **kwargs):
            t = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                timed[key] += time.perf_counter() - t
        return run
    if world > 1:   # the ranks' share of the freeze and the exchange of its records
        calibration.Session._freeze_over_group = timer(calibration.Session._freeze_over_group, "freeze_s")
    else:
        calibration.freeze = timer(calibration.freeze, "freeze_s")
    calibration.Session._merge_over_group = timer(calibration.Session._merge_over_group, "merge_s")
    model, inputs = _model_and_inputs()
    mine = inputs[rank::world]
    with torch.no_grad():
        model(**mine[0])
        t = time.perf_counter()
        for x in mine[1:]:
            model(**x)
        eager = (time.perf_counter() - t) / (len(mine) - 1)
    compiled = torch.compile(model, backend="segquant", options=options)
    with sq.calibrate(compiled, progress=False):
        compiled(**mine[0])
        if world > 1:   # the timed part starts together: a rank's slower compile is no other's wait
            torch.distributed.barrier()
        t = time.perf_counter()
        for x in mine[1:]:
            compiled(**x)
        observed = (time.perf_counter() - t) / (len(mine) - 1)
        t = time.perf_counter()
    timed["exit_s"] = time.perf_counter() - t   # merge, freeze, exchange, the summary's quantized call
    sites = len(sq.report(compiled).states)
    Path(out, f"rank{rank}.json").write_text(json.dumps({
        "inputs": len(mine), "float_eager_s": eager, "observed_call_s": observed, "sites": sites, **timed}))
    if world > 1:
        torch.distributed.destroy_process_group()


def _launch(out: Path, world: int, options: dict = OPTIONS) -> list[dict]:
    out.mkdir(parents=True, exist_ok=True)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": str(world),
           "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, __file__, "--worker", str(out), json.dumps(options)],
                              env={**env, "RANK": str(r)})
             for r in range(world)]
    assert all(p.wait() == 0 for p in procs)
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(world)]


def gemm_work() -> None:
    """A fixed one-thread fp32 GEMM workload; prints its wall time."""
    torch.set_num_threads(1)
    a = torch.randn(1024, 1024)
    a @ a
    t = time.perf_counter()
    for _ in range(40):
        a @ a
    print(time.perf_counter() - t)


def parallel_slowdown() -> float:
    """How much slower each of two copies of gemm_work runs at once than one alone: what this
    machine gives two processes (1.0: two full cores; shared cores or memory: more)."""
    run = lambda n: [subprocess.Popen([sys.executable, __file__, "--gemm"], stdout=subprocess.PIPE, text=True)  # noqa: E731
                     for _ in range(n)]
    alone = [float(p.communicate()[0]) for p in run(1)][0]
    both = [float(p.communicate()[0]) for p in run(2)]
    return round(sum(both) / len(both) / alone, 2)


def main() -> dict:
    import tempfile
    slowdown = parallel_slowdown()
    with tempfile.TemporaryDirectory() as tmp:
        one, = _launch(Path(tmp) / "one", 1)
        two = _launch(Path(tmp) / "two", 2)
        rtn, = _launch(Path(tmp) / "rtn", 1, RTN)
    # a process's calibration: its inputs at the measured time per observed call, then the block's
    # exit (the merge, its share of the freeze, the exchange, the summary's quantized call)
    time_of = lambda r: r["inputs"] * r["observed_call_s"] + r["exit_s"]   # noqa: E731
    return {"cpu": cpu_name(), "torch": torch.__version__, "model": "segquant demo SD3", "shape": DEMO,
            "inputs": CALLS, "threads_per_process": 1,
            "options": OPTIONS,
            "observed_call_over_float_eager": round(one["observed_call_s"] / one["float_eager_s"], 2),
            "observed_call_over_float_eager_rtn": round(rtn["observed_call_s"] / rtn["float_eager_s"], 2),
            "freeze_s_per_100_sites": round(one["freeze_s"] / one["sites"] * 100, 2),
            "two_processes_over_one": round(max(map(time_of, two)) / time_of(one), 2),
            # each rank's freeze share against half the one process's freeze (1.0: a perfect split)
            "freeze_share_over_half": round(max(r["freeze_s"] for r in two) / (one["freeze_s"] / 2), 2),
            "two_gemm_copies_slowdown": slowdown,
            "one_process": one, "two_processes": two, "one_process_rtn": {"options": RTN, **rtn}}


if __name__ == "__main__":
    if sys.argv[1:2] == ["--gemm"]:
        gemm_work()
        sys.exit()
    if sys.argv[1:2] == ["--worker"]:
        worker(sys.argv[2], json.loads(sys.argv[3]))
    else:
        result = main()
        path = Path(__file__).parent / "results" / "calibration_scale.json"
        path.write_text(json.dumps(result, indent=1))
        print({k: v for k, v in result.items() if k not in ("one_process", "two_processes")})
