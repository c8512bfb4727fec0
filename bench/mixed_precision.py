"""Mixed precision on the two real models in ../shared/data (issue 10): uniform int8, uniform w4a8
(round to nearest and GPTQ), and formats allocated from measured sensitivity (Qua2SeDiMo) at
average weight bits 4.5, 5 and 6. Mean per-image PSNR against float samples and classifier
accuracy, as bench/fidelity.py measures them (same seeds, labels, samplers). Writes
bench/results/mixed_precision.json, a chart beside it, and the sensitivity pages
(bench/results/sensitivity_<model>.html / .json).

    .venv/bin/python bench/mixed_precision.py                 # 5 seeds x 100 images, both models
    .venv/bin/python bench/mixed_precision.py --seeds 1 --images 20 --models dit   # quick check

Sensitivity is measured on whole sampling runs of a calibration seed (`sensitivity(..., run=)`,
fidelity.CALIBRATION_SEEDS.start, never an evaluation seed): the error of the final samples, each
step's error compounded, the measure the allocation is judged by. `--measure calls` measures
SENSITIVITY_CALLS single denoiser calls spread over the trajectory instead (the previous bench;
summed over sites, their errors did not predict the samples' PSNR). GPTQ rows come from
calibrating on the calibration seeds.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path

import torch

import segquant_compile as sq
from fidelity import (CALIBRATION_IMAGES, CALIBRATION_SEEDS, MODELS, RESULTS, evaluate, git_state,  # noqa: E402
                      labels_for, version)
from machine import cpu_name  # noqa: E402
from segquant_compile.examples import mnist_dit

BUDGETS = (4.5, 5.0, 6.0)
# w4a8 beside SVDQuant's low-rank branch (issue 29): variants the allocation may pick, their
# branch's bits counted per site in the budget
LOW_RANK = ("w4a8+r8", "w4a8+r16")
FORMATS = ("int8", "w4a8", "int8-weight-only", "int4-weight-only", *LOW_RANK)
A8 = ("int8", "w4a8")   # the mix of the targets: weight bits change, activations stay int8
SENSITIVITY_CALLS = 6


class Recorder(torch.nn.Module):
    """The float model, recording the arguments of every call (sensitivity inputs)."""

    def __init__(self, net):
        super().__init__()
        self.net, self.calls = net, []

    def forward(self, *args):
        self.calls.append(tuple(a.clone() if isinstance(a, torch.Tensor) else a for a in args))
        return self.net(*args)


def sensitivity_inputs(spec) -> list[tuple]:
    rec = Recorder(spec["load"]())
    with torch.no_grad():
        spec["sample"](rec, labels_for(CALIBRATION_IMAGES), CALIBRATION_SEEDS.start)
    picks = torch.linspace(0, len(rec.calls) - 1, SENSITIVITY_CALLS).round().long().tolist()
    return [rec.calls[i] for i in picks]


def calibrate(compiled, spec) -> None:
    with sq.calibrate(compiled, progress=False):
        for s in CALIBRATION_SEEDS:
            spec["sample"](compiled, labels_for(CALIBRATION_IMAGES), s)


def configs(sens: dict[str, Path]) -> dict[str, dict]:
    # round to nearest named: weight_rounding "auto" (the default) rounds by GPTQ on the first call
    out = {"int8": {"weight_rounding": "rtn"}, "w4a8 rtn": {"format": "w4a8", "weight_rounding": "rtn"},
           "w4a8 gptq": {"format": "w4a8", "weight_rounding": "gptq"}}
    for b in BUDGETS:
        out[f"mix {b:g} bits"] = {"format": "auto", "budget": {"weight_bits": b}, "sensitivity": str(sens["a8"]),
                                  "weight_rounding": "rtn"}
    out["mix 5 bits gptq"] = {**out["mix 5 bits"], "weight_rounding": "gptq"}
    for b in BUDGETS:   # w4a8 with a low-rank branch too (its bits in the budget)
        out[f"mix {b:g} bits, low-rank"] = {"format": "auto", "budget": {"weight_bits": b},
                                            "sensitivity": str(sens["a8-low-rank"]), "weight_rounding": "rtn"}
    out["mix 6 bits gptq, low-rank"] = {**out["mix 6 bits, low-rank"], "weight_rounding": "gptq"}
    for b in BUDGETS:   # the weight-only formats too: float activations where they pay
        out[f"mix {b:g} bits, all formats"] = {"format": "auto", "budget": {"weight_bits": b},
                                               "sensitivity": str(sens["plain"]), "weight_rounding": "rtn"}
    return out


def measure_config(spec, opts: dict, seeds, images, refs, classifier) -> tuple:
    """(the compiled model, its row): one configuration compiled from a fresh model, calibrated
    where it rounds by GPTQ, sampled on the evaluation seeds against the float samples `refs`."""
    torch._dynamo.reset()
    t0 = time.perf_counter()
    compiled = torch.compile(spec["load"](), backend="segquant", options=dict(opts))
    if opts.get("weight_rounding") == "gptq":
        calibrate(compiled, spec)
    psnrs, accs, _ = evaluate(spec, compiled, seeds, images, refs, classifier)
    totals = sq.report(compiled).totals()
    allp = torch.cat(psnrs)
    return compiled, {"options": opts, "psnr_mean_db": allp.mean().item(),
                      "psnr_per_seed_mean_db": {str(s): p.mean().item() for s, p in zip(seeds, psnrs)},
                      "accuracy": sum(accs) / len(accs), "formats": totals.get("formats"),
                      "average_weight_bits": totals.get("average_weight_bits"), "float_sites": totals["float"],
                      "wall_s": time.perf_counter() - t0}


def run(model_key: str, seeds, images, classifier, measure: str = "run", only=None) -> dict:
    spec = MODELS[model_key]
    torch._dynamo.reset()
    net = spec["load"]()
    t0 = time.perf_counter()
    refs = {s: spec["sample"](net, labels_for(images), s) for s in seeds}
    float_acc = sum(mnist_dit.accuracy(classifier, refs[s], labels_for(images), zero_one=spec["zero_one"])
                    for s in seeds) / len(seeds)
    result = {"title": spec["title"], "float": {"accuracy": float_acc, "wall_s": time.perf_counter() - t0},
              "configs": {}}
    t0 = time.perf_counter()
    if measure == "run":
        sens = sq.sensitivity(spec["load"](), run=lambda m: spec["sample"](m, labels_for(CALIBRATION_IMAGES),
                                                                            CALIBRATION_SEEDS.start),
                              formats=FORMATS, progress=False)
    else:
        sens = sq.sensitivity(spec["load"](), sensitivity_inputs(spec), formats=FORMATS, progress=False)
    sens_path = RESULTS / f"sensitivity_{model_key}.json"
    sens.save(sens_path)
    sens.save(sens_path.with_suffix(".html"))
    a8_path = RESULTS / f"sensitivity_{model_key}_a8.json"
    sens.only(A8).save(a8_path)
    plain_path, low_rank_path = (RESULTS / f"sensitivity_{model_key}_{n}.json" for n in ("plain", "a8_low_rank"))
    sens.only(tuple(f for f in FORMATS if f not in LOW_RANK)).save(plain_path)
    sens.only(A8 + LOW_RANK).save(low_rank_path)
    result["sensitivity"] = {"seconds": time.perf_counter() - t0, "measure": measure,
                             "calls": SENSITIVITY_CALLS if measure == "calls" else None,
                             "formats": list(FORMATS), "table": str(sens)}
    print(sens, flush=True)
    for name, opts in configs({"plain": plain_path, "a8": a8_path, "a8-low-rank": low_rank_path}).items():
        if only and name not in only:
            continue
        _, row = measure_config(spec, opts, seeds, images, refs, classifier)
        result["configs"][name] = row
        print(f"  [{model_key}] {name}: {row['psnr_mean_db']:.2f} dB, acc {row['accuracy']:.3f}, "
              f"{row['average_weight_bits']} bits {row['formats']}", flush=True)
    return result


def chart(results: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    models = list(results["models"])
    fig, axes = plt.subplots(1, len(models), figsize=(6 * len(models), 4), squeeze=False)
    for ax, key in zip(axes[0], models):
        rows = results["models"][key]["configs"]
        names = list(rows)
        ax.bar(range(len(names)), [rows[n]["psnr_mean_db"] for n in names], color="#4c72b0")
        ax.set_xticks(range(len(names)), [f"{n} ({rows[n]['average_weight_bits']} b)" for n in names],
                      fontsize=7, rotation=40, ha="right")
        ax.set_ylabel("mean per-image PSNR vs float (dB)")
        ax.set_title(results["models"][key]["title"], fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--images", type=int, default=100)
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    p.add_argument("--out", type=Path, default=RESULTS / "mixed_precision.json")
    p.add_argument("--measure", choices=("run", "calls"), default="run",
                   help="sensitivity on whole sampling runs (default) or on single denoiser calls")
    p.add_argument("--configs", nargs="+", default=None, help="only these configurations (names as in the JSON)")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    classifier = mnist_dit.load_classifier()
    seeds = list(range(1, args.seeds + 1))
    results = {"command": " ".join([".venv/bin/python bench/mixed_precision.py", *sys.argv[1:]]),
               "device": cpu_name(), "torch": torch.__version__, "triton": version("triton"),
               "git": git_state(), "seeds": seeds, "images_per_seed": args.images,
               "calibration": {"seeds": [CALIBRATION_SEEDS.start, CALIBRATION_SEEDS.stop - 1],
                               "images_per_seed": CALIBRATION_IMAGES},
               "budgets_weight_bits": list(BUDGETS), "models": {}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for key in args.models:
            results["models"][key] = run(key, seeds, args.images, classifier, args.measure, args.configs)
            args.out.write_text(json.dumps(results, indent=1))
    try:
        chart(results, args.out.with_suffix(".png"))
        print(f"wrote {args.out} and {args.out.with_suffix('.png')}")
    except ImportError:   # matplotlib: the `bench` extra
        print(f"wrote {args.out}; no chart: matplotlib is not installed (pip install '.[bench]')")


if __name__ == "__main__":
    sys.exit(main())
