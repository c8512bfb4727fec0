"""`segquant` console script: inspect, demo."""
from __future__ import annotations

import argparse
import json
import sys

from segquant_compile import models


def _add_model_args(p: argparse.ArgumentParser, default: str | None):
    p.add_argument("model", nargs="?" if default else None, default=default,
                   help=f"a shipped config ({', '.join(models.shipped())}) or a local diffusers model folder")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--resolution", type=int, default=1024, help="image side in pixels")
    p.add_argument("--text-tokens", type=int, default=None)
    p.add_argument("--options", type=json.loads, default=None, help="segquant options as JSON")


def cmd_inspect(args) -> int:
    from segquant_compile.explain import explain
    model = models.build(models.load_config(args.model), device="meta")
    inputs = models.example_inputs(model, batch=args.batch, resolution=args.resolution,
                                   text_tokens=args.text_tokens)
    report = explain(model, **inputs, options=args.options)
    print(report.summary() if args.summary else report)
    for path in args.save or ():
        print(f"wrote {report.save(path)}")
    return 0


def cmd_autotune(args) -> int:
    """Tune every GEMM shape of a model's plan at the given batch sizes and resolutions."""
    import os

    import torch
    from tqdm.auto import tqdm

    from segquant_compile.config import QuantConfig
    from segquant_compile.explain import explain
    from segquant_compile.lowering import autotune
    from segquant_compile.runtime import lowering_of
    interpret = os.environ.get("TRITON_INTERPRET") == "1"
    if not torch.cuda.is_available() and not interpret:
        raise ValueError("autotune times the Triton kernels on a CUDA GPU; none is visible "
                         "(TRITON_INTERPRET=1 exercises the path on CPU, timings meaningless)")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.cache:
        autotune.set_cache_dir(args.cache)
    config = QuantConfig.from_options(args.options)
    model = models.build(models.load_config(args.model), device="meta")
    shapes = {}   # one tuning per key: rows in the same M bucket share it
    for batch in args.batch:
        for resolution in args.resolution:
            inputs = models.example_inputs(model, batch=batch, resolution=resolution, text_tokens=args.text_tokens)
            for site in explain(model, **inputs, options=args.options).sites:
                if site.rows is None:
                    continue
                _, dual = lowering_of(site, config)
                fmt = "fp8" if config.format == "fp8" else "int8"
                shape = (site.rows, site.out_features, site.in_features, autotune.variant_name(fmt, any(dual)))
                shapes.setdefault(autotune.key(*shape, device), shape)
    for m, n, k, variant in tqdm(sorted(shapes.values()), desc="segquant autotune", unit="shape"):
        autotune.tune(m, n, k, variant, device)
    print(f"tuned {len(shapes)} GEMM shapes; cache: {autotune.cache_path()}")
    return 0


def cmd_demo(args) -> int:
    from segquant_compile import demo
    demo.run(args.model, args.activations, args.save)
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="segquant", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("inspect", help="the SegLinear/DualScale plan of a model (meta device: no weights)")
    _add_model_args(p, default="sd3.5-medium")
    p.add_argument("--save", action="append", metavar="PATH", help="write the report (.json, .dot, .html)")
    p.add_argument("--summary", action="store_true", help="totals only")
    p.set_defaults(func=cmd_inspect)
    p = sub.add_parser("autotune", help="tune the GEMM kernels for every shape of a model; persist the cache")
    p.add_argument("model", help=f"a shipped config ({', '.join(models.shipped())}) or a local diffusers folder")
    p.add_argument("--batch", type=int, nargs="+", default=[1])
    p.add_argument("--resolution", type=int, nargs="+", default=[1024])
    p.add_argument("--text-tokens", type=int, default=None)
    p.add_argument("--options", type=json.loads, default=None)
    p.add_argument("--cache", default=None, help="cache folder (default: SEGQUANT_CACHE_DIR or ~/.cache/segquant)")
    p.set_defaults(func=cmd_autotune)
    p = sub.add_parser("demo", help="quantize an embedded default model: plan, SQNR and time against float")
    p.add_argument("--model", choices=["sd3", "mnist"], default="sd3",
                   help="sd3: an SD3-style transformer with random weights; mnist: the real DiT in ../shared/data")
    p.add_argument("--activations", choices=["static", "dynamic"], default="static")
    p.add_argument("--save", action="append", metavar="PATH", help="write the report (.json, .dot, .html)")
    p.set_defaults(func=cmd_demo)
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (FileNotFoundError, ValueError) as e:
        print(f"segquant: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
