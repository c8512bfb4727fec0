"""Fidelity on the two real models in ../shared/data (issue 9): mean per-image PSNR of quantized
samples against the float samples (same seeds, same labels) and classifier accuracy, for segquant's
configurations and torchao's int8 dynamic peers. Writes bench/results/fidelity.json and a bar chart
bench/results/fidelity.png beside it, and prints a table.

    .venv/bin/python bench/fidelity.py                       # all configurations, 5 seeds x 100 images
    .venv/bin/python bench/fidelity.py --seeds 1 --images 20 # quick check
    .venv/bin/python bench/fidelity.py --configs default static torchao-asym --models dit
    .venv/bin/python bench/fidelity.py --models unet         # the terrain UNet: bench/fidelity_unet.py

Models (both sampled with their own samplers from segquant_compile.examples.mnist_dit / mnist_vit):
  dit: MNIST DiT, EDM Heun 18 steps, images in [-1, 1]: PSNR = 10 log10(2^2 / mse) per image
  vit: MNIST ViT (nn.TransformerEncoderLayer, GELU), rectified flow 50 steps + CFG, images in [0, 1]:
       PSNR = 10 log10(1 / mse) per image
Seeds 1..N (N = --seeds), --images per seed, labels 0..9 repeated. The metric is the mean of the
per-image PSNRs over all seeds' images (a per-image mse of 0 is floored at 1e-12, i.e. a capped PSNR).
Static calibration runs the sampler on other seeds (1000..1009, 10 images each, labels 0..9), never
on the evaluation seeds. The terrain UNet (`--models unet`, alone) is measured per denoiser call at
three sigmas, against PT2E and torchao, with CPU speed: its options are bench/fidelity_unet.py's. torchao (the `bench` extra: pip install '.[bench]') quantizes with
`quantize_(copy, Int8DynamicActivationInt8WeightConfig(...))` and compiles with Inductor; it
quantizes nn.Linear modules only (on the ViT, the attention's packed in_proj_weight stays float
there, while segquant quantizes it).
"""
from __future__ import annotations

import argparse
import importlib.metadata
import json
import logging
import math
import os
import platform
import shlex
import subprocess
import sys
import time
import traceback
import warnings
from pathlib import Path

import torch

import segquant_compile as sq
from segquant_compile.examples import mnist_dit, mnist_vit
from machine import cpu_name  # noqa: E402  (bench/machine.py)

RESULTS = Path(__file__).resolve().parent / "results"
CALIBRATION_SEEDS = range(1000, 1010)
CALIBRATION_IMAGES = 10
TORCHAO_MISSING = "torchao not installed (pip install '.[bench]')"

# key -> (display name, kind, options); kind "segquant": torch.compile options; "torchao": act mapping
CONFIGS = {
    # weight_rounding "auto": GPTQ on the first call's rows (seed 1's first denoiser call)
    "default": ("segquant dynamic default", "segquant", {}),
    "dynamic-rtn": ("segquant dynamic, weights rounded to nearest", "segquant", {"weight_rounding": "rtn"}),
    # static activations: weight_rounding "auto" rounds the weights by GPTQ on the calibration rows
    "static": ("segquant static", "segquant", {"activations": "static"}),
    "static-rtn": ("segquant static, weights rounded to nearest", "segquant",
                   {"activations": "static", "weight_rounding": "rtn"}),
    # static steps from the calibrated range as seen (the default clip-searches it)
    "static-absmax": ("segquant static, activation ranges unclipped", "segquant",
                      {"activations": "static", "activation_clip": "absmax"}),
    "symmetric": ("segquant symmetric", "segquant", {"dualscale": False}),
    "dualscale": ("segquant dualscale", "segquant", {"dualscale": True}),
    "asymmetric": ("segquant asymmetric", "segquant", {"dualscale": False, "asymmetric": True}),
    "auto": ("segquant auto", "segquant", {"dualscale": "auto"}),
    # both real models have 4 heads: 2 groups of 2 adjacent heads, and 1 (one step per token)
    "heads2": ("segquant head_groups=2", "segquant", {"head_groups": 2}),
    "heads1": ("segquant head_groups=1", "segquant", {"head_groups": 1}),
    # the DiT's two K=16 patch-embedding sites, which its sensitivity ranks first (issue 10's bench)
    "embed-float": ("segquant, patch embedding float", "segquant", {"skip": ["conv", "patch_emb"]}),
    # every site quantized, the thin (K < 64) patch embeddings too: the default before min_k
    "all-sites": ("segquant min_k=0 (every site)", "segquant", {"min_k": 0}),
    "groups32": ("segquant activation groups of 32", "segquant", {"activation_group_size": 32}),
    "groups16": ("segquant activation groups of 16", "segquant", {"activation_group_size": 16}),
    # static SmoothQuant: "auto" (the default) is "search" there; the default before it, none
    "static-smooth": ("segquant static, SmoothQuant searched", "segquant", {"activations": "static", "smooth": "search"}),
    "static-unsmoothed": ("segquant static, no SmoothQuant", "segquant", {"activations": "static", "smooth": None}),
    "static-groups32": ("segquant static, activation groups of 32", "segquant",
                        {"activations": "static", "activation_group_size": 32}),
    "static-groups16": ("segquant static, activation groups of 16", "segquant",
                        {"activations": "static", "activation_group_size": 16}),
    # SmoothQuant with dynamic activations: alpha searched per site on the first call's rows
    "dynamic-smooth": ("segquant dynamic, SmoothQuant searched on the first call", "segquant", {"smooth": "search"}),
    "dynamic-smooth-rtn": ("segquant dynamic, SmoothQuant searched on the first call, weights rounded to nearest",
                           "segquant", {"smooth": "search", "weight_rounding": "rtn"}),
    # calibrated dynamic: int8 weights rounded by GPTQ on the calibration runs' rows (weights hold
    # most of the error), SmoothQuant searched on them (smooth "auto")
    "gptq": ("segquant dynamic, calibrated (GPTQ weights, SmoothQuant)", "segquant", {"weight_rounding": "gptq"}),
    # the sites torchao quantizes: nn.MultiheadAttention's in_proj is a bare parameter, not an nn.Linear
    "torchao-sites": ("segquant dynamic default, torchao's sites", "segquant", {"skip": ["*.in_proj"]}),
    "static-torchao-sites": ("segquant static, torchao's sites", "segquant",
                             {"activations": "static", "skip": ["*.in_proj"]}),
    # in_proj's weights int8, its activations float: what static activations cost there
    "static-in-proj-weight-only": ("segquant static, in_proj int8 weight-only", "segquant",
                                   {"activations": "static", "formats": {"*.in_proj": "int8-weight-only"}}),
    "torchao-sites-rtn": ("segquant dynamic rtn, torchao's sites", "segquant",
                          {"skip": ["*.in_proj"], "weight_rounding": "rtn"}),
    "torchao-sym": ("torchao int8 dynamic symmetric", "torchao", "symmetric"),
    "torchao-asym": ("torchao int8 dynamic asymmetric", "torchao", "asymmetric"),
}

MODELS = {
    "dit": dict(title="MNIST DiT (EDM, ReLU MLPs)", load=mnist_dit.load_dit, sample=mnist_dit.sample,
                peak2=4.0, zero_one=False, data="mnist_dit_edm"),
    "vit": dict(title="MNIST ViT (rectified flow + CFG, GELU MLPs)", load=mnist_vit.load_vit,
                sample=mnist_vit.sample, peak2=1.0, zero_one=True, data="mnist_vit_rf"),
}


def labels_for(n: int) -> torch.Tensor:
    return torch.arange(n) % 10


def per_image_psnr(ref: torch.Tensor, out: torch.Tensor, peak2: float) -> torch.Tensor:
    mse = (ref.double() - out.double()).pow(2).flatten(1).mean(1).clamp_min(1e-12)
    return 10 * torch.log10(peak2 / mse)


def version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def git_state() -> dict:
    root = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                                check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, check=True).stdout.split("\n")
        return {"commit": commit, "modified_files": sorted(l[3:] for l in dirty if l.strip())}
    except (OSError, subprocess.CalledProcessError):
        return {"commit": None}


def torchao_api():
    """(quantize_, Int8DynamicActivationInt8WeightConfig, MappingType), or a reason string."""
    # torchao logs (at import) the CUDA-only extensions it cannot load on a CPU torch: keep those
    # lines for the JSON instead of the console
    log = logging.getLogger("torchao")
    handler = _Collect()
    log.addHandler(handler)
    propagate, log.propagate = log.propagate, False
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_
            from torchao.quantization.quant_primitives import MappingType
    except ImportError:
        return TORCHAO_MISSING
    except Exception as e:   # installed but broken on this torch
        return f"torchao failed to import: {type(e).__name__}: {e}"
    finally:
        log.removeHandler(handler)
        log.propagate = propagate
    TORCHAO_IMPORT_LOG.extend(handler.lines)
    return quantize_, Int8DynamicActivationInt8WeightConfig, MappingType


TORCHAO_IMPORT_LOG: list[str] = []


class _Collect(logging.Handler):
    def __init__(self):
        super().__init__(logging.INFO)
        self.lines = []

    def emit(self, record):
        self.lines.append(record.getMessage())


def build(model_key: str, config_key: str):
    """A fresh float model, quantized per the configuration; returns (callable, info) or raises Skip."""
    spec = MODELS[model_key]
    _, kind, opts = CONFIGS[config_key]
    net = spec["load"]()
    info = {}
    if kind == "segquant":
        try:
            sq.resolve_options(opts)
        except ValueError as e:
            raise Skip(str(e)) from None
        compiled = torch.compile(net, backend="segquant", options=dict(opts))
        if opts.get("activations") == "static" or opts.get("weight_rounding") == "gptq":
            t0 = time.perf_counter()
            with sq.calibrate(compiled, progress=False):
                for s in CALIBRATION_SEEDS:
                    spec["sample"](compiled, labels_for(CALIBRATION_IMAGES), s)
            info["calibration"] = {"seeds": [CALIBRATION_SEEDS.start, CALIBRATION_SEEDS.stop - 1],
                                   "images_per_seed": CALIBRATION_IMAGES,
                                   "seconds": time.perf_counter() - t0}
        return compiled, info
    api = torchao_api()
    if isinstance(api, str):
        raise Skip(api)
    quantize_, Int8Dyn, MappingType = api
    mapping = MappingType.ASYMMETRIC if opts == "asymmetric" else MappingType.SYMMETRIC
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")   # torchao 0.17 deprecation notices on its AQT path
        quantize_(net, Int8Dyn(act_mapping_type=mapping))
    info["torchao_config"] = f"Int8DynamicActivationInt8WeightConfig(act_mapping_type=MappingType.{mapping.name})"
    info["quantized_linears"] = sorted(n for n, m in net.named_modules()
                                       if isinstance(m, torch.nn.Linear)
                                       and type(m.weight).__name__ != "Parameter")
    return torch.compile(net), info


class Skip(Exception):
    pass


def evaluate(spec, net, seeds, images, refs, classifier):
    """Per seed: the per-image PSNRs against the float samples `refs`, the classifier accuracy,
    and the samples."""
    psnrs, accs, outs = [], [], []
    for s in seeds:
        out = spec["sample"](net, labels_for(images), s)
        psnrs.append(per_image_psnr(refs[s], out, spec["peak2"]))
        accs.append(mnist_dit.accuracy(classifier, out, labels_for(images), zero_one=spec["zero_one"]))
        outs.append(out)
    return psnrs, accs, outs


def run_config(model_key, config_key, seeds, images, refs, classifier):
    spec = MODELS[model_key]
    name, kind, opts = CONFIGS[config_key]
    torch._dynamo.reset()
    row = {"name": name, "kind": kind,
           "options": opts if kind == "segquant" else {"act_mapping_type": opts}}
    t0 = time.perf_counter()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            net, info = build(model_key, config_key)
            row.update(info)
            psnrs, accs, outs = evaluate(spec, net, seeds, images, refs, classifier)
    except Skip as e:
        row["skipped"] = str(e)
        print(f"  [{model_key}] {name}: skipped: {e}", flush=True)
        return row, None
    except Exception as e:
        traceback.print_exc()
        row["error"] = f"{type(e).__name__}: {e}"
        row["wall_s"] = time.perf_counter() - t0
        print(f"  [{model_key}] {name}: ERROR {row['error']}", flush=True)
        return row, None
    if kind == "segquant":   # what ran quantized (a site dynamo never reached would stay float)
        row["quantized_sites"] = len(sq.report(net).states)
    allp = torch.cat(psnrs)
    row.update({
        "psnr_mean_db": allp.mean().item(),
        "psnr_min_db": allp.min().item(),
        "psnr_median_db": allp.median().item(),
        "psnr_per_seed_mean_db": {str(s): p.mean().item() for s, p in zip(seeds, psnrs)},
        "accuracy": sum(accs) / len(accs),
        "accuracy_per_seed": {str(s): a for s, a in zip(seeds, accs)},
        "wall_s": time.perf_counter() - t0,
    })
    per_seed = list(row["psnr_per_seed_mean_db"].values())
    print(f"  [{model_key}] {name}: mean PSNR {row['psnr_mean_db']:.2f} dB (seeds {min(per_seed):.2f}.."
          f"{max(per_seed):.2f}), min {row['psnr_min_db']:.2f}, acc {row['accuracy']:.3f}, "
          f"{row['wall_s']:.0f} s", flush=True)
    return row, torch.cat(outs)


def run_model(model_key, config_keys, seeds, images, classifier, results, save):
    spec = MODELS[model_key]
    print(f"{model_key}: {spec['title']}", flush=True)
    torch._dynamo.reset()
    net = spec["load"]()
    t0 = time.perf_counter()
    refs = {s: spec["sample"](net, labels_for(images), s) for s in seeds}
    float_acc = {str(s): mnist_dit.accuracy(classifier, refs[s], labels_for(images), zero_one=spec["zero_one"])
                 for s in seeds}
    result = {"title": spec["title"], "data": spec["data"],
              "psnr_peak_to_peak": math.sqrt(spec["peak2"]),
              "float": {"accuracy": sum(float_acc.values()) / len(float_acc), "accuracy_per_seed": float_acc,
                        "wall_s": time.perf_counter() - t0},
              "configs": {}}
    results["models"][model_key] = result
    save()
    print(f"  [{model_key}] float: acc {result['float']['accuracy']:.3f}, {result['float']['wall_s']:.0f} s",
          flush=True)
    samples = {}
    for key in config_keys:
        row, out = run_config(model_key, key, seeds, images, refs, classifier)
        if out is not None:
            same = [CONFIGS[k][0] for k, o in samples.items() if torch.equal(o, out)]
            if same:
                row["identical_samples_to"] = same
                print(f"  [{model_key}] {row['name']}: samples bit-identical to {same}", flush=True)
            samples[key] = out
        result["configs"][row["name"]] = row
        save()   # partial results survive an interrupted run ("complete": false)
    return result


def chart(results: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(results["models"])
    fig, axes = plt.subplots(1, len(models), figsize=(6.5 * len(models), 4.8), squeeze=False)
    for ax, mk in zip(axes[0], models):
        m = results["models"][mk]
        rows = list(m["configs"].values())
        names = [r["name"] for r in rows]
        vals = [r.get("psnr_mean_db", 0.0) for r in rows]
        colors = ["tab:orange" if r["kind"] == "torchao" else "tab:blue" for r in rows]
        lo = [r["psnr_mean_db"] - min(r["psnr_per_seed_mean_db"].values()) if "psnr_mean_db" in r else 0
              for r in rows]
        hi = [max(r["psnr_per_seed_mean_db"].values()) - r["psnr_mean_db"] if "psnr_mean_db" in r else 0
              for r in rows]
        y = range(len(rows))
        bars = ax.barh(y, vals, color=colors, xerr=[lo, hi], capsize=3)
        for r, b, h in zip(rows, bars, hi):
            if r["kind"] == "torchao":
                b.set_hatch("//")
            label = (f"{r['psnr_mean_db']:.2f}  acc {r['accuracy']:.3f}" if "psnr_mean_db" in r
                     else ("skipped" if "skipped" in r else "error"))
            ax.text(0.5 if "psnr_mean_db" not in r else b.get_width() + h + 0.2, b.get_y() + b.get_height() / 2,
                    label, va="center", fontsize=8)
        ok = [v for v, r in zip(vals, rows) if "psnr_mean_db" in r]
        if ok:
            ax.set_xlim(min(ok) - 4 if min(ok) > 10 else 0, max(ok) + 4)
            best_ao = [r["psnr_mean_db"] for r in rows if r["kind"] == "torchao" and "psnr_mean_db" in r]
            if best_ao:
                ax.axvline(max(best_ao), color="tab:orange", ls="--", lw=1, label="best torchao")
                ax.legend(loc="lower right", fontsize=8)
        ax.set_yticks(list(y), names, fontsize=8)
        ax.invert_yaxis()
        ax.set_xlabel("mean per-image PSNR vs float samples (dB)")
        ax.set_title(f"{m['title']}\nfloat acc {m['float']['accuracy']:.3f}, "
                     f"{results['seeds']} seeds x {results['images_per_seed']} images", fontsize=9)
    fig.suptitle("segquant (blue) vs torchao int8 dynamic (orange, hatched), CPU\n"
                 "whiskers: min..max of the per-seed means", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def table(results: dict) -> str:
    lines = [f"{'model':5s} {'configuration':34s} {'PSNR':>7s} {'min':>6s} {'seeds (min..max)':>16s} "
             f"{'acc':>6s} {'float':>6s} {'wall s':>7s}"]
    for mk, m in results["models"].items():
        for r in m["configs"].values():
            if "psnr_mean_db" in r:
                ps = list(r["psnr_per_seed_mean_db"].values())
                lines.append(f"{mk:5s} {r['name']:34s} {r['psnr_mean_db']:7.2f} {r['psnr_min_db']:6.2f} "
                             f"{min(ps):7.2f}..{max(ps):7.2f} {r['accuracy']:6.3f} "
                             f"{m['float']['accuracy']:6.3f} {r['wall_s']:7.0f}"
                             + ("  (= " + ", ".join(r["identical_samples_to"]) + ")"
                                if r.get("identical_samples_to") else ""))
            else:
                why = r.get("skipped") or r.get("error")
                lines.append(f"{mk:5s} {r['name']:34s} {'skipped' if 'skipped' in r else 'ERROR'}: {why[:90]}")
    return "\n".join(lines)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--models", nargs="+", default=[])
    known, rest = pre.parse_known_args(argv)
    if "unet" in known.models:   # its own inputs, metric, peers and options
        if known.models != ["unet"]:
            pre.error("--models unet runs alone")
        import fidelity_unet
        return fidelity_unet.main(rest)
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", nargs="+", default=list(CONFIGS), metavar="NAME",
                   help=f"configuration keys or display names (default: all): {', '.join(CONFIGS)}")
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=[*MODELS, "unet"],
                   help="unet: alone, bench/fidelity_unet.py's options (--models unet --help)")
    p.add_argument("--seeds", type=int, default=5, help="evaluation seeds 1..N (default 5)")
    p.add_argument("--images", type=int, default=100, help="images per seed (default 100)")
    p.add_argument("--out", default=str(RESULTS / "fidelity.json"))
    p.add_argument("--png", default=None, help="chart path (default: --out with .png)")
    a = p.parse_args(argv)
    by_name = {v[0]: k for k, v in CONFIGS.items()}
    keys = []
    for c in a.configs:
        k = c if c in CONFIGS else by_name.get(c)
        if k is None:
            p.error(f"unknown configuration {c!r}; choose from {list(CONFIGS)} (or their display names)")
        keys.append(k)

    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    ao = torchao_api()
    if isinstance(ao, str) and any(CONFIGS[k][1] == "torchao" for k in keys):
        print(f"torchao: {ao}", flush=True)
    seeds = list(range(1, a.seeds + 1))
    t0 = time.perf_counter()
    results = {
        "benchmark": "fidelity (issue 9): mean per-image PSNR of quantized samples vs float samples",
        "command": shlex.join([sys.executable, *sys.argv]),
        "seeds": a.seeds, "evaluation_seeds": seeds, "images_per_seed": a.images,
        "labels": "0..9 repeated",
        "calibration": {"seeds": [CALIBRATION_SEEDS.start, CALIBRATION_SEEDS.stop - 1],
                        "images_per_seed": CALIBRATION_IMAGES, "labels": "0..9"},
        "environment": {
            "device": "cpu", "cpu": cpu_name(), "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "python": platform.python_version(),
            "torch": torch.__version__, "triton": version("triton"), "torchao": version("torchao"),
            "torchao_status": "ok" if not isinstance(ao, str) else ao,
            "torchao_import_log": TORCHAO_IMPORT_LOG,
            "diffusers": version("diffusers"), "numpy": version("numpy"), "segquant_compile": sq.__version__,
            "git": git_state(),
        },
        "models": {},
    }
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)

    def save():
        results["wall_s"] = time.perf_counter() - t0
        out.write_text(json.dumps(results, indent=2) + "\n")

    classifier = mnist_dit.load_classifier()
    results["complete"] = False
    with torch.no_grad():
        for mk in a.models:
            run_model(mk, keys, seeds, a.images, classifier, results, save)
    results["complete"] = True
    save()
    png = Path(a.png) if a.png else out.with_suffix(".png")
    try:
        chart(results, png)
        print(f"wrote {out} and {png}")
    except ImportError:
        print(f"wrote {out}; no chart: matplotlib not installed (pip install '.[bench]')")
    print()
    print(table(results))
    print(f"\n{a.seeds} seeds x {a.images} images; total {results['wall_s']:.0f} s")


if __name__ == "__main__":
    main()
