"""What a quantized conv costs on the CPU, per conv of the terrain UNet (issue 28 part 4): each conv
site's float conv2d against the segquant op it runs, dynamic (steps per input pixel: on this
CPU the input quantized and dequantized in one pass, then one fp32 conv) and static (the input
quantized once per pixel, then exact fp32 convolutions over channel chunks), on the inputs the
conv sees in a real denoiser call, one thread, the minimum of --reps runs each. The dynamic
path's step computation (`input_pixel_steps`) is also timed alone. Writes
bench/results/conv_cost.json.

    .venv/bin/python bench/conv_cost.py            # batch 4 at sigma 80 and 0.4
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

import segquant_compile as sq
from segquant_compile.demo import timed_runs
from segquant_compile.examples import terrain_unet as tu
from segquant_compile.lowering import conv as C

sys.path.insert(0, str(Path(__file__).parent))
from fidelity import git_state, version  # noqa: E402
from machine import cpu_name  # noqa: E402

RESULTS = Path(__file__).parent / "results"


def weight(st):
    """The weight operands a site's graph passes in its CPU form: the dequantized weight ("fp32")
    or the packed grid and its steps ("int8")."""
    return (st.dequantized, None) if st.lowering.cpu_gemm == "fp32" else (st.params.packed, st.params.d_w)


def best(fn, reps: int) -> float:
    return min(timed_runs(fn, 1, reps))


def inputs_of_convs(net, x, sigma, d01) -> dict[str, torch.Tensor]:
    seen, hooks = {}, []
    for name, m in net.named_modules():
        if isinstance(m, torch.nn.Conv2d):
            hooks.append(m.register_forward_pre_hook(lambda mod, args, name=name: seen.setdefault(name, args[0])))
    with torch.no_grad():
        tu.denoise(net, x, sigma, d01)
    for h in hooks:
        h.remove()
    return seen


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=RESULTS / "conv_cost.json")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    net = tu.load_unet()
    b = a.batch
    sigma = torch.tensor([80.0] * (b // 2) + [0.4] * (b - b // 2))
    x = torch.randn(b, 1, 128, 128) * sigma.reshape(-1, 1, 1, 1)
    d01 = torch.rand(b)
    conv_inputs = inputs_of_convs(net, x, sigma, d01)
    modules = dict(net.named_modules())
    compiled = {}
    for mode in ("dynamic", "static"):
        torch._dynamo.reset()
        c = torch.compile(tu.load_unet(), backend="segquant", options={"activations": mode, "inductor": False})
        with torch.no_grad():
            if mode == "static":
                with sq.calibrate(c, progress=False):
                    tu.denoise(c, x, sigma, d01)
            else:
                tu.denoise(c, x, sigma, d01)     # the first call decides schemes and rounding
        compiled[mode] = sq.report(c)
    rows = []
    with torch.no_grad():
        for name, st in compiled["dynamic"].states.items():
            if st.site.conv is None:
                continue
            module = modules[name]
            xin = conv_inputs[name]
            row = {"site": name, "input": list(xin.shape), "kernel": list(module.kernel_size),
                   "stride": list(module.stride), "out_channels": module.out_channels}
            row["float_s"] = best(lambda: F.conv2d(xin, module.weight, module.bias, module.stride, module.padding), a.reps)
            pd, lo = st.params, st.lowering
            k_bounds, schemes = list(lo.k_bounds), list(lo.codes)
            row["dynamic_steps_s"] = best(lambda: C.input_pixel_steps(xin, lo.conv, k_bounds, schemes), a.reps)
            w, d_w = weight(st)
            row["dynamic_s"] = best(lambda: C.quantized_conv2d(xin, w, d_w, module.bias, None, None, None,
                                                                None, pd.colsum, lo.k_bounds, lo.codes,
                                                                conv=lo.conv), a.reps)
            ss = compiled["static"].states.get(name)
            if ss is not None and ss.site.conv is not None:
                ps, ls = ss.params, ss.lowering
                ws, d_ws = weight(ss)
                row["static_s"] = best(lambda: C.quantized_conv2d(xin, ws, d_ws, module.bias, ps.d_pos,
                                                                   ps.d_neg, ps.zp, None, ps.colsum, ls.k_bounds,
                                                                   ls.codes, conv=ls.conv), a.reps)
            rows.append(row)
            print(f"{name:40} {str(row['input']):22} float {row['float_s'] * 1e3:7.2f} ms  dynamic "
                  f"{row['dynamic_s'] * 1e3:7.2f} (steps {row['dynamic_steps_s'] * 1e3:6.2f})  static "
                  f"{row.get('static_s', float('nan')) * 1e3:7.2f}", flush=True)
    total = {k: sum(r.get(k, 0.0) for r in rows) for k in ("float_s", "dynamic_s", "dynamic_steps_s", "static_s")}
    out = {"benchmark": "conv_cost (issue 28 part 4): float conv2d vs segquant's dynamic and static conv ops, "
                        "per conv site of the terrain UNet, eager, minimum of reps",
           "command": " ".join([".venv/bin/python bench/conv_cost.py", *(argv or sys.argv[1:])]),
           "device": cpu_name(), "threads": a.threads, "torch": torch.__version__, "triton": version("triton"),
           "git": git_state(), "batch": b, "reps": a.reps, "sites": len(rows), "total_s": total,
           "dynamic_over_float": total["dynamic_s"] / total["float_s"],
           "static_over_float": total["static_s"] / total["float_s"],
           "steps_share_of_dynamic": total["dynamic_steps_s"] / total["dynamic_s"], "rows": rows}
    a.out.write_text(json.dumps(out, indent=1))
    print(f"{len(rows)} conv sites: float {total['float_s']:.3f} s, dynamic {total['dynamic_s']:.3f} s "
          f"({out['dynamic_over_float']:.1f}x; steps {out['steps_share_of_dynamic']:.0%} of it), static "
          f"{total['static_s']:.3f} s ({out['static_over_float']:.1f}x); wrote {a.out}")


if __name__ == "__main__":
    main()
