"""Fidelity and CPU speed on the real terrain UNet (issue 28): `bench/fidelity.py --models unet`.

Mean per-map PSNR in model space (peak-to-peak 2: 10 log10(4 / mse) per map) of the denoiser's
output D(x, sigma, d) against the float model's on the same inputs (same noise, same labels), at
sigma 80 (one-step generation from noise) and at the variation sigmas 0.4 and 5.66 (strength 0.5
and 0.75: float-generated maps plus noise, as `terrain_unet.vary` builds them), for segquant's
configurations and the peers a PyTorch CPU user picks, all in one run: PT2E static int8 with
`X86InductorQuantizer` (convs and linears, `torchao.quantization.pt2e`, lowered by Inductor with
freezing) and torchao int8 dynamic (`quantize_`, linears only). Then the median time of one
denoiser forward at a fixed batch for each, against `torch.compile` (Inductor) float32 in the same
run. Writes bench/results/fidelity_unet.json and a chart beside it (.png).

    .venv/bin/python bench/fidelity.py --models unet                     # everything
    .venv/bin/python bench/fidelity.py --models unet --no-speed          # fidelity only
    .venv/bin/python bench/fidelity.py --models unet --speed-only        # speed only: replaces the
                                                                          # speed part of --out
    .venv/bin/python bench/fidelity.py --models unet --maps 16 --configs default pt2e-x86   # quick
    .venv/bin/python bench/fidelity.py --models unet --chart-only        # the chart from --out

Evaluation inputs (batches of --batch maps, the samplers' own draws): sigma 80: `generate`'s
inputs for seed 1 (random difficulties); sigma 0.4 / 5.66: the float model's sigma-80 maps of that
set as sources, each with its own difficulty, noised with `vary`'s draws for seed 2 / 3.
Calibration (segquant static, PT2E observers, and the first call of every dynamic segquant
configuration, whose GPTQ rounding and "auto" schemes are fixed on it): CALIBRATION_BATCHES
batches from other seeds and other sigmas: per batch, half the maps at sigma 80 from noise (seed
1000 + i) and half variations, in pairs at strengths 0.4, 0.6, 0.7, 0.9 (sigma 0.139, 1.16, 3.33,
27.7), of float maps generated from seed 2000.
"""
from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import shlex
import statistics
import subprocess
import sys
import time
import traceback
import warnings
from pathlib import Path

import numpy as np
import torch

import segquant_compile as sq
from segquant_compile.examples import terrain_unet as tu
from fidelity import CONFIGS as SHARED, RESULTS, Skip, git_state, per_image_psnr, torchao_api, version  # noqa: E402
from fidelity import TORCHAO_IMPORT_LOG  # noqa: E402
from machine import cpu_name, cpu_ticks, other_cores  # noqa: E402

PEAK2 = 4.0                                   # model space [-1, 1]: peak-to-peak 2
EVAL_SIGMAS = {"80": (None, 1), "0.4": (0.5, 2), "5.66": (0.75, 3)}   # label -> (strength, seed)
CALIBRATION_BATCHES = 4
CALIBRATION_SEED, CALIBRATION_SOURCE_SEED = 1000, 2000
CALIBRATION_STRENGTHS = (0.4, 0.6, 0.7, 0.9)

# key -> (display name, kind, options); kinds: segquant (torch.compile options), pt2e, torchao, float
CONFIGS = {
    "float-inductor": ("Inductor float32", "float", {}),
    "default": SHARED["default"],
    "static": SHARED["static"],
    "convs-off": ("segquant dynamic default, convs float", "segquant", {"convs": False}),
    "static-convs-off": ("segquant static, convs float", "segquant", {"activations": "static", "convs": False}),
    "symmetric": SHARED["symmetric"],
    "dualscale": SHARED["dualscale"],
    "asymmetric": SHARED["asymmetric"],
    "pt2e-x86": ("PT2E X86InductorQuantizer static int8", "pt2e", {}),
    "torchao-sym": ("torchao int8 dynamic (linears)", "torchao", "symmetric"),
}
# issue 29: SVDQuant's low-rank branch (bench/low_rank.py's configurations; w4a8 quantizes the
# linears only, the convs staying float: conv sites are lowered for int8 only). Calibrated where
# they round by GPTQ, activations dynamic. Not in the default run: `--configs` names them.
LOW_RANK = {
    "w4a8-rtn": ("w4a8 rtn", "segquant", {"format": "w4a8", "weight_rounding": "rtn"}),
    "w4a8-gptq": ("w4a8 gptq", "segquant", {"format": "w4a8", "weight_rounding": "gptq"}),
    **{f"w4a8-gptq-r{r}": (f"w4a8 gptq + low-rank {r}", "segquant",
                           {"format": "w4a8", "weight_rounding": "gptq", "low_rank": r}) for r in (8, 16, 32, 64)},
    "int8-gptq": ("int8 gptq", "segquant", {"weight_rounding": "gptq"}),
    "int8-gptq-r32": ("int8 gptq + low-rank 32", "segquant", {"weight_rounding": "gptq", "low_rank": 32}),
}
QUIET_OTHER_CORES = 0.2   # other processes' CPU while timing, in cores: above it the timings are not valid
SPEED_ONLY = {   # timed, never evaluated: the float baseline with the freezing PT2E compiles with
    "float-inductor-freezing": ("Inductor float32, freezing", "float", {"freezing": True}),
}


# ------------------------------------------------------------------ inputs

def _batches(rng, base, sigmas, d, batch):
    """The denoiser's inputs (x, sigma, d01) per batch, drawing the noise as the samplers do."""
    out = []
    for i in range(0, len(d), batch):
        b = len(d[i:i + batch])
        noise = torch.from_numpy(rng.standard_normal((b, 1, 128, 128), dtype=np.float32))
        sig = torch.as_tensor(np.asarray(sigmas[i:i + b], dtype=np.float32))
        x = noise * sig.reshape(-1, 1, 1, 1) if base is None else base[i:i + b] + sig.reshape(-1, 1, 1, 1) * noise
        out.append((x, sig, tu.difficulty01(d[i:i + b])))
    return out


def generation_inputs(count, seed, batch):
    """`terrain_unet.generate(net, count, seed)`'s denoiser inputs: sigma 80, random difficulties."""
    rng = np.random.default_rng(seed)
    d = tu._labels(rng, "random", count)
    return _batches(rng, None, [tu.SIGMA_MAX] * count, d, batch), d


def variation_inputs(source_maps, d, strengths, seed, batch):
    """`terrain_unet.vary(net, model_to_heights(source_maps), strength, seed, difficulty=d)`'s
    denoiser inputs; `strengths` one per map (or a single float)."""
    src = tu.heights_to_model(tu.model_to_heights(source_maps)).clamp(-1, 1)
    rng = np.random.default_rng(seed)
    d = tu._labels(rng, d, len(src))
    s = np.broadcast_to(np.asarray(strengths, dtype=np.float64), (len(src),))
    return _batches(rng, src, [tu.variation_sigma(float(v)) for v in s], d, batch)


@torch.no_grad()
def run_batches(net, batches):
    return torch.cat([tu.denoise(net, *b) for b in batches])


def evaluation_set(float_net, maps, batch):
    """{sigma label: input batches}, and the float references {sigma label: maps}."""
    sets, refs = {}, {}
    gen, d = generation_inputs(maps, EVAL_SIGMAS["80"][1], batch)
    sets["80"], refs["80"] = gen, run_batches(float_net, gen)
    for label, (strength, seed) in EVAL_SIGMAS.items():
        if strength is not None:
            sets[label] = variation_inputs(refs["80"], d, strength, seed, batch)
            refs[label] = run_batches(float_net, sets[label])
    return sets, refs


def calibration_set(float_net, batch, n_batches=CALIBRATION_BATCHES):
    """Per batch: batch//2 maps at sigma 80 (seed 1000 + i), then batch - batch//2 variations of
    float maps generated from seed 2000, in pairs at the calibration strengths; sigma per map."""
    half = batch // 2
    n_var = (batch - half) * n_batches
    src_in, d_src = generation_inputs(n_var, CALIBRATION_SOURCE_SEED, batch)
    sources = run_batches(float_net, src_in)
    strengths = [CALIBRATION_STRENGTHS[(i // 2) % len(CALIBRATION_STRENGTHS)] for i in range(batch - half)]
    out = []
    for i in range(n_batches):
        (gx, gs, gd), = generation_inputs(half, CALIBRATION_SEED + i, batch)[0]
        sl = slice(i * (batch - half), (i + 1) * (batch - half))
        (vx, vs, vd), = variation_inputs(sources[sl], d_src[sl], strengths, CALIBRATION_SEED + 100 + i, batch)
        out.append((torch.cat([gx, vx]), torch.cat([gs, vs]), torch.cat([gd, vd])))
    return out


class _Record(torch.nn.Module):
    """Records the network's inputs (for torch.export's example)."""

    def __init__(self):
        super().__init__()
        self.args = None

    def forward(self, *args):
        self.args = args
        return torch.zeros_like(args[0])


# ------------------------------------------------------------------ building the configurations

def lookup(key):
    """(display name, kind, options) of a configuration key."""
    return CONFIGS.get(key) or LOW_RANK.get(key) or SPEED_ONLY[key]


def build(key, float_net, calibration):
    """The configuration's network (a callable with the network's signature) and facts about it."""
    _, kind, opts = lookup(key)
    info = {}
    net = copy.deepcopy(float_net)
    if kind == "float":
        compiled = torch.compile(net)
        if opts.get("freezing"):
            with torch._inductor.config.patch(freezing=True), torch.no_grad():
                tu.denoise(compiled, *calibration[0])      # compiles here, under the patch
        return compiled, info
    if kind == "segquant":
        try:
            sq.resolve_options(opts)
        except ValueError as e:
            raise Skip(str(e)) from None
        compiled = torch.compile(net, backend="segquant", options=dict(opts))
        t0 = time.perf_counter()
        with torch.no_grad():
            if opts.get("activations") == "static" or opts.get("weight_rounding") == "gptq":
                with sq.calibrate(compiled, progress=False):
                    for b in calibration:
                        tu.denoise(compiled, *b)
                info["calibration"] = {"batches": len(calibration), "seconds": round(time.perf_counter() - t0, 1)}
            else:   # the first call fixes GPTQ's rounding and the "auto" schemes: a calibration batch
                tu.denoise(compiled, *calibration[0])
                info["first_call"] = {"batch": "calibration batch 0", "seconds": round(time.perf_counter() - t0, 1)}
        report = sq.report(compiled)
        t = report.totals()
        info["sites"] = {"total": t["sites"], "conv": t["conv_sites"], "quantized": len(report.states),
                         "quantized_conv": sum(1 for s in report.sites if s.conv is not None and s.name in report.states),
                         "float": t["float"]}
        info["schemes"] = scheme_counts(report)
        info["average_weight_bits"] = t.get("average_weight_bits")
        if key in LOW_RANK:   # the branch's cost (bench/low_rank.py)
            from low_rank import costs
            info["costs"] = costs(compiled)
        return compiled, info
    if kind == "pt2e":
        return build_pt2e(net, calibration, info), info
    api = torchao_api()
    if isinstance(api, str):
        raise Skip(api)
    quantize_, Int8Dyn, MappingType = api
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quantize_(net, Int8Dyn())
    info["torchao_config"] = "Int8DynamicActivationInt8WeightConfig()"
    info["quantized_linears"] = sum(1 for m in net.modules() if isinstance(m, torch.nn.Linear)
                                    and type(m.weight).__name__ != "Parameter")
    return torch.compile(net), info


def scheme_counts(report) -> dict:
    """Per site kind (linear / conv): how many quantized segments took each activation scheme, and
    the median of the sites' own SQNR on rows where the report has it."""
    out: dict = {}
    for s in report.sites:
        st = report.states.get(s.name)
        if st is None:
            continue
        kind = out.setdefault("conv" if s.conv is not None else "linear", {"schemes": {}, "sqnr_db": []})
        summary = st.summary()
        for sch in summary.get("schemes", []):
            kind["schemes"][str(sch)] = kind["schemes"].get(str(sch), 0) + 1
        if "sqnr_db" in summary:
            kind["sqnr_db"].append(summary["sqnr_db"])
    for kind in out.values():
        v = kind.pop("sqnr_db")
        kind["site_sqnr_db_median"] = round(statistics.median(v), 2) if v else None
        kind["sites_with_sqnr"] = len(v)
    return out


def _shim_transpose_dimname():
    """torchao 0.17's convert_pt2e (PortNodeMetaForQDQ) lists `aten.transpose.Dimname`, an overload
    torch 2.13 no longer has (AttributeError). The list is only compared against node targets: give
    the name a placeholder no node can have as its target."""
    packet = torch.ops.aten.transpose
    try:
        packet.Dimname
    except AttributeError:
        setattr(packet, "Dimname", object())


def build_pt2e(net, calibration, info):
    """torchao's PT2E X86 Inductor tutorial: export, prepare_pt2e with X86InductorQuantizer's
    default (static int8) config, calibrate, convert_pt2e, torch.compile with freezing."""
    try:
        from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
        import torchao.quantization.pt2e.quantizer.x86_inductor_quantizer as xiq
    except ImportError as e:
        raise Skip(f"torchao pt2e not importable: {e}") from None
    _shim_transpose_dimname()
    rec = _Record()
    tu.denoise(rec, *calibration[0])
    t0 = time.perf_counter()
    with torch.no_grad():
        exported = torch.export.export(net, rec.args, strict=True).module()
        quantizer = xiq.X86InductorQuantizer()
        quantizer.set_global(xiq.get_default_x86_inductor_quantization_config())
        prepared = prepare_pt2e(exported, quantizer)
        for b in calibration:
            tu.denoise(prepared, *b)
        converted = convert_pt2e(prepared)
    info["calibration"] = {"batches": len(calibration), "seconds": round(time.perf_counter() - t0, 1)}
    ops = [str(n.target) for n in converted.graph.nodes if n.op == "call_function"]
    info["quantized_weights"] = sum("dequantize_per_channel" in o for o in ops)
    info["quantizer"] = "X86InductorQuantizer, get_default_x86_inductor_quantization_config()"
    info["reference"] = converted              # the q/dq graph, evaluated eagerly too
    compiled = torch.compile(converted)
    with torch._inductor.config.patch(freezing=True), torch.no_grad():
        tu.denoise(compiled, *calibration[0])   # compiles here, with freezing (TORCHINDUCTOR_FREEZING=1)
    return compiled


# ------------------------------------------------------------------ measuring

def psnr_rows(net, sets, refs):
    per = {}
    for label, batches in sets.items():
        per[label] = per_image_psnr(refs[label], run_batches(net, batches), PEAK2)
    allp = torch.cat(list(per.values()))
    return {
        "psnr_mean_db": round(allp.mean().item(), 3),
        "psnr_per_sigma_db": {k: round(v.mean().item(), 3) for k, v in per.items()},
        "psnr_min_per_sigma_db": {k: round(v.min().item(), 3) for k, v in per.items()},
        "maps_per_sigma": {k: len(v) for k, v in per.items()},
    }


def load_average() -> list[float]:
    return [round(v, 2) for v in os.getloadavg()]


def uptime() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return ""


def time_forward(net, inputs, reps):
    """Median seconds of one denoiser forward (after one warm-up call), and the load around it."""
    before = load_average()
    with torch.no_grad():
        tu.denoise(net, *inputs)
        ticks = cpu_ticks()
        times = []
        for _ in range(reps):
            t = time.perf_counter()
            tu.denoise(net, *inputs)
            times.append(time.perf_counter() - t)
    return {"median_s": round(statistics.median(times), 4), "min_s": round(min(times), 4),
            "times_s": [round(t, 4) for t in times], "load_before": before, "load_after": load_average(),
            "other_cores": other_cores(ticks, cpu_ticks())}


def run_config(key, float_net, calibration, sets, refs, speed_inputs, a, results, save):
    name, kind, opts = lookup(key)
    torch._dynamo.reset()
    row = {"key": key, "name": name, "kind": kind, "options": opts if kind != "torchao" else {}}
    t0 = time.perf_counter()
    net = None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            net, info = build(key, float_net, calibration)
            row["build_s"] = round(time.perf_counter() - t0, 1)
            reference = info.pop("reference", None)
            row.update(info)
            if not a.speed_only and key not in SPEED_ONLY:
                t1 = time.perf_counter()
                row.update(psnr_rows(net, sets, refs))
                row["evaluate_s"] = round(time.perf_counter() - t1, 1)
                results["configs"][key] = row
                save()
                if reference is not None:      # PT2E's q/dq graph, eagerly: the int8 grid without oneDNN
                    row["reference_qdq_eager"] = psnr_rows(reference, sets, refs)
            if not a.no_speed:
                row["speed"] = time_forward(net, speed_inputs, a.reps)
    except Skip as e:
        row["skipped"] = str(e)
        print(f"  {name}: skipped: {e}", flush=True)
    except Exception as e:
        traceback.print_exc()
        row["error"] = f"{type(e).__name__}: {e}"
        print(f"  {name}: ERROR {row['error']}", flush=True)
    row["wall_s"] = round(time.perf_counter() - t0, 1)
    results["configs"][key] = row
    save()
    msg = [f"  {name}:"]
    if "psnr_mean_db" in row:
        msg.append(f"PSNR {row['psnr_mean_db']:.2f} dB (" + ", ".join(
            f"sigma {k}: {v:.2f}" for k, v in row["psnr_per_sigma_db"].items()) + ")")
    if "reference_qdq_eager" in row:
        msg.append(f"[q/dq eager {row['reference_qdq_eager']['psnr_mean_db']:.2f}]")
    if "speed" in row:
        msg.append(f"{row['speed']['median_s'] * 1e3:.0f} ms/forward (load {row['speed']['load_before'][0]:.1f})")
    print(" ".join(msg) + f", {row['wall_s']:.0f} s", flush=True)
    del net
    gc.collect()
    return row


# ------------------------------------------------------------------ output

def speed_table(results) -> dict:
    base = results["configs"].get("float-inductor", {}).get("speed")
    out = {}
    for k, r in results["configs"].items():
        if "speed" in r:
            out[k] = {"median_ms": round(r["speed"]["median_s"] * 1e3, 1),
                      "vs_inductor_fp32": round(base["median_s"] / r["speed"]["median_s"], 3) if base else None}
    return out


def chart(results: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in results["configs"].values() if "psnr_mean_db" in r]
    timed = [r for r in results["configs"].values() if "speed" in r]
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(14, 0.45 * max(len(rows), len(timed)) + 2.5),
                                  gridspec_kw={"width_ratios": [3, 2]})
    sigmas = list(EVAL_SIGMAS)
    colors = {"80": "tab:blue", "0.4": "tab:green", "5.66": "tab:purple"}
    h = 0.8 / (len(sigmas) + 1)
    for j, r in enumerate(rows):
        for i, s in enumerate(sigmas):
            v = r["psnr_per_sigma_db"][s]
            ax.barh(j + (i - 1.5) * h, v, h, color=colors[s], label=f"sigma {s}" if j == 0 else None,
                    hatch="//" if r["kind"] in ("pt2e", "torchao") else None)
        ax.barh(j + 1.5 * h, r["psnr_mean_db"], h, color="0.3", label="mean" if j == 0 else None)
        ax.text(r["psnr_mean_db"] + 0.3, j + 1.5 * h, f"{r['psnr_mean_db']:.2f}", va="center", fontsize=7)
    ax.set_yticks(range(len(rows)), [r["name"] for r in rows], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("mean per-map PSNR vs float (dB, peak-to-peak 2)")
    ax.legend(fontsize=8, loc="lower right")
    ax.set_title(f"terrain UNet, {results['maps_per_sigma']} maps per sigma (hatched: PT2E / torchao)", fontsize=9)
    base = results["configs"].get("float-inductor", {}).get("speed")
    vals = [r["speed"]["median_s"] * 1e3 for r in timed]
    bars = ax2.barh(range(len(timed)), vals, color=["tab:orange" if r["kind"] in ("pt2e", "torchao") else
                                                    ("0.6" if r["kind"] == "float" else "tab:blue") for r in timed])
    for b, r in zip(bars, timed):
        x = f"{b.get_width():.0f} ms" + (f"  {base['median_s'] / r['speed']['median_s']:.2f}x" if base else "")
        ax2.text(b.get_width(), b.get_y() + b.get_height() / 2, " " + x, va="center", fontsize=7)
    ax2.set_yticks(range(len(timed)), [r["name"] for r in timed], fontsize=8)
    ax2.invert_yaxis()
    sp = results.get("speed", {})
    ax2.set_xlabel(f"median ms per denoiser forward, batch {sp.get('batch')}")
    ax2.set_title(f"CPU speed ({results['environment']['cpu']}, {results['environment']['torch_threads']} threads)\n"
                  f"load {sp.get('load_min', '?')}..{sp.get('load_max', '?')}"
                  + ("" if sp.get("quiet") else ": machine busy, timings not valid"), fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def table(results) -> str:
    sigmas = list(EVAL_SIGMAS)
    lines = [f"{'configuration':44s} {'mean':>6s} " + " ".join(f"{'s=' + s:>7s}" for s in sigmas)
             + f" {'ms':>8s} {'vs fp32':>7s}"]
    speeds = speed_table(results)
    for k, r in results["configs"].items():
        if "skipped" in r or "error" in r:
            lines.append(f"{r['name']:44s} {'skipped' if 'skipped' in r else 'ERROR'}: "
                         f"{(r.get('skipped') or r.get('error'))[:80]}")
            continue
        p = (f"{r['psnr_mean_db']:6.2f} " + " ".join(f"{r['psnr_per_sigma_db'][s]:7.2f}" for s in sigmas)
             if "psnr_mean_db" in r else f"{'':6s} " + " ".join(f"{'':7s}" for _ in sigmas))
        sp = speeds.get(k)
        t = f" {sp['median_ms']:8.0f} {sp['vs_inductor_fp32'] or 0:6.2f}x" if sp else ""
        lines.append(f"{r['name']:44s} {p}{t}")
        if "reference_qdq_eager" in r:
            q = r["reference_qdq_eager"]
            lines.append(f"{'  (its q/dq graph, eager)':44s} {q['psnr_mean_db']:6.2f} "
                         + " ".join(f"{q['psnr_per_sigma_db'][s]:7.2f}" for s in sigmas))
    return "\n".join(lines)


def write_chart(results, png: Path) -> str:
    try:
        chart(results, png)
        return f"wrote {png}"
    except ImportError:
        return f"no chart: matplotlib is not importable here (install it, then --chart-only renders {png})"


def merge(docs, names) -> dict:
    """One document from runs on the same inputs: the first's header, every run's configurations
    (a later run's row for a key wins), each run's command, environment and time under "runs"."""
    for d in docs[1:]:
        for k in ("maps_per_sigma", "batch", "evaluation", "calibration"):
            if d[k] != docs[0][k]:
                raise SystemExit(f"cannot merge: {k} differs")
    timed = [d for d in docs if d.get("speed")]
    # speeds compare only within one run: keep the run that timed the float baseline
    base = next((d for d in timed if "speed" in d["configs"].get("float-inductor", {})),
                timed[0] if timed else None)
    doc = dict(docs[0])
    doc["configs"], doc["runs"] = {}, []
    for name, d in zip(names, docs):
        for k, r in d["configs"].items():
            r = {f: v for f, v in r.items() if d is base or f != "speed"}
            have = doc["configs"].get(k)
            if have is None or "error" in have or "skipped" in have:
                doc["configs"][k] = r
            elif "error" not in r and "skipped" not in r:
                have.update(r)
        doc["runs"].append({"file": name, "command": d["command"], "environment": d["environment"],
                            "wall_s": d.get("wall_s"), "complete": d.get("complete"),
                            "configs": list(d["configs"]), "speed": d.get("speed")})
    doc["command"] = [r["command"] for r in doc["runs"]]
    doc["complete"] = all(r["complete"] for r in doc["runs"])
    if base is not None:
        doc["speed"] = dict(base["speed"], from_run=names[docs.index(base)])
        doc["speed"]["table"] = speed_table(doc)
    else:
        doc.pop("speed", None)
    return doc


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                prog="fidelity.py --models unet")
    p.add_argument("--configs", nargs="+", default=list(CONFIGS), metavar="NAME",
                   help=f"configuration keys (default: all): {', '.join(CONFIGS)}; low-rank (issue 29): "
                        f"{', '.join(LOW_RANK)}; speed only: {', '.join(SPEED_ONLY)}")
    p.add_argument("--maps", type=int, default=48, help="maps per sigma (default 48)")
    p.add_argument("--batch", type=int, default=16, help="maps per denoiser call, also the timed batch (default 16)")
    p.add_argument("--reps", type=int, default=5, help="timed forwards per configuration (median; default 5)")
    p.add_argument("--speed-only", action="store_true", help="time only; replaces the speed part of --out")
    p.add_argument("--no-speed", action="store_true", help="fidelity only")
    p.add_argument("--chart-only", action="store_true", help="render the chart from --out and stop")
    p.add_argument("--merge", nargs="+", default=None, metavar="JSON",
                   help="merge the configurations of these runs' JSONs (same inputs) into --out and stop")
    p.add_argument("--out", default=str(RESULTS / "fidelity_unet.json"))
    p.add_argument("--png", default=None, help="chart path (default: --out with .png)")
    p.add_argument("--inputs", default=None, metavar="PATH",
                   help="a .pt file of the calibration and evaluation inputs and the float references: "
                        "read if it exists (for these --maps and --batch), else written")
    a = p.parse_args(argv)
    out = Path(a.out)
    png = Path(a.png) if a.png else out.with_suffix(".png")
    if a.chart_only:
        print(write_chart(json.loads(out.read_text()), png))
        return
    if a.merge:
        doc = merge([json.loads(Path(f).read_text()) for f in a.merge], a.merge)
        out.write_text(json.dumps(doc, indent=2) + "\n")
        print(f"wrote {out}; {write_chart(doc, png)}\n\n{table(doc)}")
        return
    if a.speed_only and a.no_speed:
        p.error("--speed-only and --no-speed exclude each other")
    keys = list(a.configs)
    for k in keys:
        if k not in CONFIGS and k not in LOW_RANK and k not in SPEED_ONLY:
            p.error(f"unknown configuration {k!r}; choose from {list(CONFIGS) + list(LOW_RANK) + list(SPEED_ONLY)}")
    if not a.no_speed:
        if "float-inductor" not in keys:
            keys.insert(0, "float-inductor")
        if "pt2e-x86" in keys and "float-inductor-freezing" not in keys:
            keys.append("float-inductor-freezing")
    if not tu.weights_path().exists():
        sys.exit(f"{tu.weights_path()} not found (see ../shared/data/README.md)")

    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    ao = torchao_api()
    t0 = time.perf_counter()
    results = {
        "benchmark": "fidelity_unet (issue 28): mean per-map PSNR of the denoiser output vs float, and CPU speed",
        "command": shlex.join([sys.executable, *sys.argv]),
        "model": "terrain UNet (../shared/data/terrain_unet, one-step EDM consistency model, 128x128)",
        "metric": "mean over maps of 10 log10(4 / mse) against the float model's output on the same inputs "
                  "(model space, peak-to-peak 2; mse floored at 1e-12)",
        "maps_per_sigma": a.maps, "batch": a.batch,
        "evaluation": {"sigma 80": "generate's inputs, seed 1, random difficulties",
                       "sigma 0.4": "vary's inputs at strength 0.5, seed 2, sources = the float sigma-80 maps, "
                                    "their difficulties",
                       "sigma 5.66": "vary's inputs at strength 0.75, seed 3, same sources"},
        "calibration": {"batches": CALIBRATION_BATCHES, "batch": a.batch,
                        "sigma 80": f"{a.batch // 2} maps per batch, seeds {CALIBRATION_SEED}.."
                                    f"{CALIBRATION_SEED + CALIBRATION_BATCHES - 1}",
                        "variations": f"{a.batch - a.batch // 2} maps per batch, strengths "
                                      f"{list(CALIBRATION_STRENGTHS)} in pairs (sigmas "
                                      f"{[round(tu.variation_sigma(s), 3) for s in CALIBRATION_STRENGTHS]}), "
                                      f"noise seeds {CALIBRATION_SEED + 100}.., float sources generated "
                                      f"from seed {CALIBRATION_SOURCE_SEED}",
                        "used_by": "segquant static (calibrate), PT2E (observers), and batch 0 as the first "
                                   "call of every dynamic segquant configuration"},
        "environment": {
            "device": "cpu", "cpu": cpu_name(), "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "python": sys.version.split()[0],
            "torch": torch.__version__, "torchao": version("torchao"),
            "torchao_status": "ok" if not isinstance(ao, str) else ao, "torchao_import_log": TORCHAO_IMPORT_LOG,
            "numpy": version("numpy"), "segquant_compile": sq.__version__, "git": git_state(),
            "code": {m: sys.modules[m].__file__ for m in ("segquant_compile", "segquant_compile.passes",
                                                           "segquant_compile.lowering")},
            "uptime_at_start": uptime(),
        },
        "configs": {},
    }
    old = None
    if a.speed_only and out.exists():
        old = json.loads(out.read_text())

    def save():
        results["wall_s"] = round(time.perf_counter() - t0, 1)
        if not a.no_speed:
            loads = [v for r in results["configs"].values() if "speed" in r
                     for v in (r["speed"]["load_before"][0], r["speed"]["load_after"][0])]
            others = [r["speed"]["other_cores"] for r in results["configs"].values()
                      if r.get("speed", {}).get("other_cores") is not None]
            results["speed"] = {
                "batch": a.batch, "reps": a.reps, "measure": "median of reps denoiser forwards after one warm-up",
                "load_min": min(loads, default=None), "load_max": max(loads, default=None),
                "other_cores_max": max(others, default=None),
                "quiet": bool(others) and max(others) < QUIET_OTHER_CORES,
                "note": f"timings are valid only on a quiet machine: other processes busy on less than "
                        f"{QUIET_OTHER_CORES} of a core while each configuration was timed (/proc/stat; the load "
                        f"average also counts this process's own threads)",
                "table": speed_table(results)}
        doc = results
        if old is not None:      # --speed-only: keep the fidelity results, replace the timings
            doc = dict(old)
            doc["speed"] = results.get("speed")
            doc["speed_run"] = {k: results[k] for k in ("command", "environment", "wall_s")}
            for k, r in results["configs"].items():
                row = dict(doc["configs"].get(k, {"key": k, "name": r["name"], "kind": r["kind"]}))
                for f in ("speed", "error", "skipped"):
                    row.pop(f, None)
                    if f in r:
                        row[f] = r[f]
                doc["configs"][k] = row
            doc["speed"]["table"] = speed_table(doc)
        out.write_text(json.dumps(doc, indent=2) + "\n")

    out.parent.mkdir(parents=True, exist_ok=True)
    results["complete"] = False
    float_net = tu.load_unet()
    with torch.no_grad():
        t1 = time.perf_counter()
        cached = torch.load(a.inputs) if a.inputs and Path(a.inputs).exists() else None
        if cached is not None and (cached["maps"], cached["batch"]) != (a.maps, a.batch):
            sys.exit(f"{a.inputs} holds --maps {cached['maps']} --batch {cached['batch']}")
        if cached is None:
            calibration = calibration_set(float_net, a.batch)
            sets, refs = ({}, {}) if a.speed_only else evaluation_set(float_net, a.maps, a.batch)
            if a.inputs and not a.speed_only:
                torch.save({"maps": a.maps, "batch": a.batch, "calibration": calibration, "sets": sets,
                            "refs": refs}, a.inputs)
        else:
            calibration, sets, refs = cached["calibration"], cached["sets"], cached["refs"]
            results["inputs_from"] = a.inputs
        results["reference_s"] = round(time.perf_counter() - t1, 1)
        speed_inputs = calibration[1]        # a fixed batch of a.batch maps, mixed sigmas
        print(f"terrain UNet: inputs and float references in {results['reference_s']:.0f} s; "
              f"load {load_average()}", flush=True)
        for k in keys:
            run_config(k, float_net, calibration, sets, refs, speed_inputs, a, results, save)
        if not a.no_speed:      # the baseline again at the end: drift over the run
            torch._dynamo.reset()
            fp32 = torch.compile(copy.deepcopy(float_net))
            results["configs"]["float-inductor"]["speed_again_at_end"] = time_forward(fp32, speed_inputs, a.reps)
    results["environment"]["uptime_at_end"] = uptime()
    results["complete"] = True
    save()
    doc = json.loads(out.read_text())
    print(f"wrote {out}; {write_chart(doc, png)}")
    print()
    print(table(doc))
    if not a.no_speed and not doc["speed"]["quiet"]:
        print(f"\nother processes used up to {doc['speed'].get('other_cores_max')} cores while timing (load "
              f"average {doc['speed']['load_min']}..{doc['speed']['load_max']}): the machine was busy, the "
              "timings are not valid (rerun with --speed-only on a quiet machine)")
    print(f"\ntotal {results['wall_s']:.0f} s")


if __name__ == "__main__":
    main()
