"""Why the terrain UNet's "auto" schemes score below all-asymmetric (docs/results.md, "Dynamic
convs on the CPU"): mean per-map PSNR of both per sigma, the sites where "auto" chose other than
asymmetric with their per-segment SQNR on the first call's rows, and the output conv's own SQNR
under each scheme on the evaluation inputs (float weight: the activation's quantization alone).

    .venv/bin/python bench/unet_auto_schemes.py --inputs /tmp/unet_inputs16.pt

The inputs file is bench/fidelity.py's (`--models unet --maps 16 --inputs PATH` writes it). Runs
eagerly (`inductor: False`): fidelity only, no timing. Writes bench/results/unet_auto_schemes.json."""
from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from fidelity_unet import psnr_rows  # noqa: E402

import segquant_compile as sq  # noqa: E402
from segquant_compile.examples import terrain_unet as tu  # noqa: E402
from segquant_compile.lowering import quantize as Q  # noqa: E402
from segquant_compile.lowering.formats import Scheme  # noqa: E402
from segquant_compile.lowering.site_lowering import ConvGeometry  # noqa: E402

CONFIGS = {"default": {}, "asymmetric": {"dualscale": False, "asymmetric": True}}


def configuration(float_net, options, calibration, sets, refs) -> dict:
    torch._dynamo.reset()
    net = torch.compile(copy.deepcopy(float_net), backend="segquant", options={"inductor": False, **options})
    with torch.no_grad():
        tu.denoise(net, *calibration[0])      # the first call decides the schemes, as the bench's
        rows = psnr_rows(net, sets, refs)
    other = {}
    for name, st in sq.report(net).states.items():
        chosen = st.params.chosen
        if chosen and any(s != "asymmetric" for s in chosen):
            other[name] = {"chosen": list(chosen),
                           "sqnr_db": [{k: round(v, 2) for k, v in c.items()} for c in st.params.candidates]}
    return {**rows, "not_asymmetric": other}


def output_conv(float_net, sets, name="out.2") -> dict:
    """The conv `name` with its float weight and each scheme's dynamic steps per input pixel, on
    the first evaluation batch of each sigma: output SQNR against the float conv."""
    conv = dict(float_net.named_modules())[name]
    seen = []
    hook = conv.register_forward_pre_hook(lambda m, a: seen.append(a[0].detach().clone()))
    out = {}
    with torch.no_grad():
        for label, batches in sets.items():
            seen.clear()
            tu.denoise(float_net, *batches[0])
            x = seen[0]
            ref = torch.nn.functional.conv2d(x, conv.weight, conv.bias, conv.stride, conv.padding)
            geo = ConvGeometry(conv.in_channels, conv.kernel_size, conv.stride, conv.padding)
            w = conv.weight.reshape(conv.out_channels, -1).t().contiguous()
            kb = [0, w.shape[0]]
            out[label] = {s.value: round(Q.sqnr_db(ref, torch.ops.segquant.conv2d_dynamic(
                x, w, None, conv.bias, kb, [s.code], geo.as_list(), x.dtype)), 2)
                for s in (Scheme.SYMMETRIC, Scheme.ASYMMETRIC, Scheme.DUALSCALE)}
    hook.remove()
    return {name: out}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--inputs", required=True, help="bench/fidelity.py's cached UNet inputs")
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "unet_auto_schemes.json")
    a = p.parse_args()
    torch.set_num_threads(2)
    cached = torch.load(a.inputs, weights_only=False)
    calibration, sets, refs = cached["calibration"], cached["sets"], cached["refs"]
    float_net = tu.load_unet()
    result = {"command": " ".join([".venv/bin/python", *sys.argv]), "torch": torch.__version__,
              "maps_per_sigma": cached["maps"], "first_call": "calibration batch 0",
              "configs": {k: configuration(float_net, o, calibration, sets, refs) for k, o in CONFIGS.items()},
              "output_conv_sqnr_db": output_conv(float_net, sets)}
    a.out.write_text(json.dumps(result, indent=1) + "\n")
    for k, c in result["configs"].items():
        print(k, c["psnr_mean_db"], c["psnr_per_sigma_db"], f"{len(c['not_asymmetric'])} sites not asymmetric")
    print(result["output_conv_sqnr_db"])


if __name__ == "__main__":
    main()
