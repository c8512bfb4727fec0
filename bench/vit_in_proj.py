"""Where the MNIST ViT's in_proj error is, and what in_proj's weights alone can win back (issue 9).
segquant's dynamic default quantizes nn.MultiheadAttention's packed in_proj, which torchao leaves
float; this measures the cost of its int8 weights and the remedies tried on them. Each row edits
in_proj's float weights outside segquant (rounded onto an int8 grid and back), then compiles with
the default options and `skip: ["*.in_proj"]`, so in_proj runs in float with those weights and
every other site as the default runs it. Mean per-image PSNR against the float samples.

    .venv/bin/python bench/vit_in_proj.py                 # seeds 1-2 x 100 images, ~5 min quiet
    .venv/bin/python bench/vit_in_proj.py --modes float rtn v --seeds 5

Modes (per-channel absmax int8 steps unless said):
  float         in_proj's weights as trained
  rtn           all of in_proj rounded to nearest
  q, k, v       only that third of in_proj (its query, key or value rows) rounded to nearest
  groups32/16   one step per output channel and group of 32 / 16 input columns
  gptq-first    GPTQ on the first denoiser call's rows (seed 1's), FIRST_CALL_DAMP
  gptq-cal      GPTQ on the calibration runs' rows (fidelity.py's seeds 1000-1009), DAMP
  *-bc          then the bias corrected by the mean output error on the first call's rows, or
                (`-bc-cal`) on the calibration runs' rows
"""
from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import fidelity as F  # noqa: E402  (bench/fidelity.py: models, samplers, PSNR, versions)
from segquant_compile.examples import mnist_dit  # noqa: E402
from segquant_compile.lowering.gptq import DAMP, FIRST_CALL_DAMP, gptq_int8, segment_hessians  # noqa: E402

MODES = ("float", "rtn", "q", "k", "v", "groups32", "groups16", "gptq-first", "gptq-cal",
         "rtn-bc", "rtn-bc-cal", "gptq-first-bc", "gptq-first-bc-cal")
SPEC = F.MODELS["vit"]


def rounded(w: torch.Tensor, group: int | None = None) -> torch.Tensor:
    """w [N, K] on the symmetric int8 grid, one absmax step per row (and group of columns)."""
    n, k = w.shape
    wg = w.reshape(n, k // (group or k), group or k)
    step = wg.abs().amax(-1, keepdim=True) / 127
    return (torch.round(wg / step).clamp(-127, 127) * step).reshape(n, k)


def attention_inputs(net, run) -> dict[int, torch.Tensor]:
    """Each layer's in_proj input rows over what `run(net)` calls."""
    rows = {i: [] for i in range(len(net.transformer))}
    hooks = [layer.self_attn.register_forward_pre_hook(
        lambda m, a, i=i: rows[i].append(a[0].reshape(-1, a[0].shape[-1]).detach()))
        for i, layer in enumerate(net.transformer)]
    try:
        run(net)
    finally:
        for h in hooks:
            h.remove()
    return {i: torch.cat(r) for i, r in rows.items()}


class _Stop(Exception):
    pass


def first_call(net, seed: int, images: int):
    """Seed `seed`'s sampler, stopped after its first denoiser call."""
    def once(*args):
        net(*args)
        raise _Stop
    try:
        SPEC["sample"](once, F.labels_for(images), seed)
    except _Stop:
        pass


def calibration_runs(net):
    for s in F.CALIBRATION_SEEDS:
        SPEC["sample"](net, F.labels_for(F.CALIBRATION_IMAGES), s)


@torch.no_grad()
def edited(mode: str, first_seed: int, images: int):
    net = SPEC["load"]()
    if mode == "float":
        return net
    first = attention_inputs(net, lambda n: first_call(n, first_seed, images))
    cal = attention_inputs(net, calibration_runs) if mode.endswith("cal") else None
    for i, layer in enumerate(net.transformer):
        w, b = layer.self_attn.in_proj_weight, layer.self_attn.in_proj_bias
        d, w0 = w.shape[1], w.clone()
        thirds = {"q": slice(0, d), "k": slice(d, 2 * d), "v": slice(2 * d, 3 * d)}
        if mode in thirds:
            w[thirds[mode]] = rounded(w[thirds[mode]])
        elif mode.startswith("groups"):
            w.copy_(rounded(w, int(mode[len("groups"):])))
        elif mode.startswith("gptq"):
            rows, damp = (cal[i], DAMP) if mode.startswith("gptq-cal") else (first[i], FIRST_CALL_DAMP)
            steps = w.abs().amax(1) / 127
            w.copy_(gptq_int8(w, segment_hessians(rows, (0, d)), (0, d), steps, damp).t().float() * steps[:, None])
        else:
            w.copy_(rounded(w))
        if "-bc" in mode:
            b.sub_((cal[i] if mode.endswith("cal") else first[i]).mean(0) @ (w - w0).t())
    return net


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    p.add_argument("--seeds", type=int, default=2, help="evaluation seeds 1..N (default 2)")
    p.add_argument("--images", type=int, default=100)
    p.add_argument("--out", default=str(F.RESULTS / "vit_in_proj.json"))
    a = p.parse_args(argv)
    seeds = list(range(1, a.seeds + 1))
    classifier = mnist_dit.load_classifier()
    t0 = time.perf_counter()
    with torch.no_grad():
        base = SPEC["load"]()
        refs = {s: SPEC["sample"](base, F.labels_for(a.images), s) for s in seeds}
    results = {"benchmark": "MNIST ViT: in_proj's int8 weights, edited outside segquant, the rest the dynamic default",
               "command": shlex.join([sys.executable, *sys.argv]), "evaluation_seeds": seeds,
               "images_per_seed": a.images, "options": {"skip": ["*.in_proj"]},
               "environment": {"device": "cpu", "cpu": F.cpu_name(), "torch": torch.__version__,
                               "triton": F.version("triton"), "git": F.git_state()},
               "modes": {}}
    out = Path(a.out)
    for mode in a.modes:
        torch._dynamo.reset()
        t = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            net = torch.compile(edited(mode, seeds[0], a.images), backend="segquant",
                                options={"skip": ["*.in_proj"]})
            psnrs, accs, _ = F.evaluate(SPEC, net, seeds, a.images, refs, classifier)
        allp = torch.cat(psnrs)
        results["modes"][mode] = {"psnr_mean_db": allp.mean().item(), "accuracy": sum(accs) / len(accs),
                                  "wall_s": time.perf_counter() - t}
        print(f"{mode:18s} {allp.mean():.2f} dB  acc {sum(accs) / len(accs):.3f}  "
              f"({time.perf_counter() - t:.0f} s)", flush=True)
        results["wall_s"] = time.perf_counter() - t0
        out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
