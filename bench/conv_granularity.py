"""How fine a conv's activation steps must be on the terrain UNet (issue 28, static convs): per conv
site, the output SQNR of the conv with its input quantized at each granularity, on the inputs the
site sees over the fidelity benchmark's calibration set (bench/fidelity_unet.py: sigmas 0.14 to
80), weights int8 per output channel. Offline (plain torch on the float model's recorded inputs):
it bounds what any static step could do, without building a quantized model.

Granularities: `segment` (one static step per K segment: segquant static), `channel` (one static
step per input channel: a bound, not an integer GEMM: the steps do not factor out of the sums),
`smooth-0.5` / `smooth-0.8` (SmoothQuant's per-channel divisors at that alpha folded into the
weight, then one static step: what segquant static with conv smoothing runs), `image` and
`image-channel` (a step per map, per map and channel: dynamic), `input-pixel` (a step per input
pixel over its channels: segquant dynamic on convs since issue 28 part 4), `output-pixel` (a step
per im2col row, the output pixel's receptive field: segquant dynamic before). For these two also
the SQNR after a 3x3 mean filter of output and error (`-mean3`): how far later averaging brings a
spatially independent or correlated error down. DualScale (separate positive and
negative steps) where the input's minimum is above -0.3 (SiLU outputs), symmetric elsewhere.
Writes bench/results/conv_granularity.json.

    .venv/bin/python bench/conv_granularity.py                       # the sites below
    .venv/bin/python bench/conv_granularity.py --sites out.2 output_blocks.23.0.in_layers.2
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from segquant_compile.examples import terrain_unet as tu
from segquant_compile.lowering import quantize as Q
from segquant_compile.lowering.quantize import sqnr_db

sys.path.insert(0, str(Path(__file__).parent))
import fidelity_unet as fu  # noqa: E402
from fidelity import git_state, version  # noqa: E402

RESULTS = Path(__file__).parent / "results"
# the eight static conv sites of lowest SQNR in segquant static on this model (its report)
SITES = ("out.2", "output_blocks.23.0.in_layers.2", "output_blocks.22.0.in_layers.2",
         "output_blocks.21.0.out_layers.3", "output_blocks.24.0.skip_connection",
         "input_blocks.16.0.skip_connection", "output_blocks.9.0.skip_connection", "input_blocks.5.0.in_layers.2")


def quantize(x, pos, neg, dual: bool):
    """x on segquant's int8 grid (Q._round) with maxima `pos`, `neg` (broadcast to x), dequantized."""
    pos_lim, neg_lim = Q.LIMITS["int8"]
    if dual:
        d, dn, scheme = (pos / pos_lim).clamp(min=Q.EPS), (neg / neg_lim).clamp(min=Q.EPS), Q.DUALSCALE
    else:
        d = dn = (torch.maximum(pos, neg) / pos_lim).clamp(min=Q.EPS)
        scheme = Q.SYMMETRIC
    return Q.dequantize_segment(Q._round(x, d, dn, None, scheme).float(), d, dn, None, scheme)


def maxima(x, dims):
    return x.amax(dim=dims, keepdim=True).clamp(min=0), (-x).amax(dim=dims, keepdim=True).clamp(min=0)


def weight_grid(w):
    """The conv weight on segquant's per-output-channel int8 grid, dequantized."""
    flat = w.reshape(w.shape[0], -1)
    d = Q.weight_steps(flat)
    return (Q.quantize_weight(flat, d).t().float() * d[:, None]).reshape(w.shape)


def mean3(t):
    """A 3x3 mean filter: the averaging a later conv or pooling applies to an error field."""
    return F.avg_pool2d(t, 3, 1, 1, count_include_pad=False)


def output_pixel_sqnr(conv, x, wq, dual: bool) -> tuple[float, float]:
    """Each im2col row quantized with its own range, map by map (the whole [M, K] would not fit);
    also the SQNR with output and error through mean3."""
    w_flat, wq_flat = conv.weight.detach().float().flatten(1), wq.flatten(1)
    err = energy = err3 = energy3 = 0.0
    for b in range(len(x)):
        cols = F.unfold(x[b:b + 1], conv.kernel_size, padding=conv.padding, stride=conv.stride)[0]   # [K, L]
        ref = w_flat @ cols
        got = wq_flat @ quantize(cols, *maxima(cols, (0,)), dual)
        err += float((ref - got).pow(2).sum())
        energy += float(ref.pow(2).sum())
        ho, wo = conv_out_size(conv, x.shape[2], x.shape[3])
        ref3, got3 = mean3(ref.view(1, -1, ho, wo)), mean3(got.view(1, -1, ho, wo))
        err3 += float((ref3 - got3).pow(2).sum())
        energy3 += float(ref3.pow(2).sum())
    return 10 * math.log10(energy / err), 10 * math.log10(energy3 / err3)


def conv_out_size(conv, h, w):
    (kh, kw), (sh, sw), (ph, pw) = conv.kernel_size, conv.stride, conv.padding
    return (h + 2 * ph - kh) // sh + 1, (w + 2 * pw - kw) // sw + 1


def site_row(conv, x) -> dict:
    w = conv.weight.detach().float()
    run = lambda xq, wq: F.conv2d(xq, wq, None, conv.stride, conv.padding)   # noqa: E731
    ref = run(x, w)
    dual = bool(x.min() > -0.3)
    wq = weight_grid(w)
    pos_c, neg_c = maxima(x, (0, 2, 3))
    out = {"scheme": "dualscale" if dual else "symmetric",
           "segment": sqnr_db(ref, run(quantize(x, pos_c.max(), neg_c.max(), dual), wq)),
           "channel": sqnr_db(ref, run(quantize(x, pos_c, neg_c, dual), wq))}
    w_c = w.abs().amax(dim=(0, 2, 3)).clamp(min=1e-5).reshape(1, -1, 1, 1)
    for alpha in (0.5, 0.8):
        s = torch.maximum(pos_c, neg_c).clamp(min=1e-5) ** alpha / w_c ** (1 - alpha)
        xs = x / s
        p, n = maxima(xs, (0, 1, 2, 3))
        out[f"smooth-{alpha}"] = sqnr_db(ref, run(quantize(xs, p, n, dual), weight_grid(w * s)))
    for label, dims in {"image": (1, 2, 3), "image-channel": (2, 3), "input-pixel": (1,)}.items():
        got = run(quantize(x, *maxima(x, dims), dual), wq)
        out[label] = sqnr_db(ref, got)
    out["input-pixel-mean3"] = sqnr_db(mean3(ref), mean3(got))
    out["output-pixel"], out["output-pixel-mean3"] = output_pixel_sqnr(conv, x, wq, dual)
    per_map = x.abs().amax(dim=(1, 2, 3))
    out["per_map_max"] = {"min": float(per_map.min()), "median": float(per_map.median()), "max": float(per_map.max())}
    return {k: round(v, 2) if isinstance(v, float) else v for k, v in out.items()}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sites", nargs="+", default=list(SITES))
    p.add_argument("--out", default=str(RESULTS / "conv_granularity.json"))
    a = p.parse_args(argv)
    net = tu.load_unet().eval()
    modules = dict(net.named_modules())
    seen = {n: [] for n in a.sites}
    hooks = [modules[n].register_forward_pre_hook(lambda m, args, n=n: seen[n].append(args[0].detach().float()))
             for n in a.sites]
    calibration = fu.calibration_set(net, 8, fu.CALIBRATION_BATCHES)   # 32 maps
    with torch.no_grad():
        for b in calibration:
            tu.denoise(net, *b)
        for h in hooks:
            h.remove()
        rows = {n: site_row(modules[n], torch.cat(seen[n])) for n in a.sites}
    doc = {"command": "python bench/conv_granularity.py " + " ".join(argv or sys.argv[1:]),
           "torch": version("torch"), "git": git_state(), "maps": sum(len(b[0]) for b in calibration),
           "unit": "output SQNR dB of the conv, weights int8 per output channel", "sites": rows}
    Path(a.out).write_text(json.dumps(doc, indent=1) + "\n")
    keys = ["segment", "channel", "smooth-0.5", "smooth-0.8", "image", "image-channel", "input-pixel", "output-pixel",
            "input-pixel-mean3", "output-pixel-mean3"]
    print("| site | scheme | " + " | ".join(keys) + " |")
    for n, r in rows.items():
        print(f"| {n} | {r['scheme']} | " + " | ".join(f"{r[k]:.1f}" for k in keys) + " |")


if __name__ == "__main__":
    main()
