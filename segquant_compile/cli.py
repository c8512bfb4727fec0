"""`segquant` console script: inspect, quantize, autotune, sensitivity, demo."""
from __future__ import annotations

import argparse
import json
import sys

from segquant_compile.examples import models
from segquant_compile.lowering.formats import Format, FormatChoice
from segquant_compile.sensitivity import DEFAULT_FORMATS


class _Parser(argparse.ArgumentParser):
    """Bad arguments: one line on stderr and exit status 2 (no usage dump, no traceback)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def _format_name(text: str) -> str:
    try:
        return str(FormatChoice.parse(text))
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def resolution(text: str) -> int:
    value = positive_int(text)
    if value % models.VAE_FACTOR:
        raise argparse.ArgumentTypeError(f"must be a multiple of {models.VAE_FACTOR} pixels, got {value}")
    return value


def json_object(text: str, what: str) -> dict:
    try:
        value = json.loads(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"not valid JSON ({e})") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"must be a JSON object of {what}")
    return value


def json_file(text: str) -> str:
    if text and not text.endswith(".json"):
        raise argparse.ArgumentTypeError(f"{text!r}: write .json")
    return text


def options_json(text: str) -> dict:
    value = json_object(text, "segquant options")
    from segquant_compile.options import resolve_options
    try:
        resolve_options(value)
    except (TypeError, ValueError) as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return value


def _add_model_args(p: argparse.ArgumentParser, default: str | None, many: bool = False):
    p.add_argument("model", nargs="?" if default else None, default=default,
                   help=f"a shipped config ({', '.join(models.shipped())}) or a local diffusers model folder")
    # inspect: None = what a pipeline call passes (see cmd_inspect)
    p.add_argument("--batch", type=positive_int, nargs="+" if many else None, default=[1] if many else None,
                   help="the denoiser's batch (with guidance: 2 per image)")
    p.add_argument("--resolution", type=resolution, nargs="+" if many else None, default=[1024] if many else None,
                   help="image side in pixels")
    p.add_argument("--text-tokens", type=positive_int, default=None)
    p.add_argument("--options", type=options_json, default=None, help="segquant options as JSON")


def cmd_inspect(args) -> int:
    """A folder is planned with the inputs its pipeline's default call gives the denoiser (side from
    the configs, batch 2 with guidance, the text mask): the plan the compiled pipeline makes. A
    shipped config keeps the documented batch 1 at 1024 px."""
    from pathlib import Path

    import torch

    from segquant_compile.explain import explain
    config = models.load_config(args.model)
    folder = None if args.model in models.shipped() else Path(args.model)
    if folder is not None and folder.name in ("transformer", "unet"):   # a pipeline's denoiser folder
        folder = folder.parent
    defaults = models.pipeline_defaults(config, folder)
    if folder is None:
        defaults["batch"] = 1
    batch, side = args.batch or defaults["batch"], args.resolution or defaults["resolution"]
    tokens = args.text_tokens or defaults["text_tokens"]
    model = models.build(config, device="meta")
    inputs = models.example_inputs(model, batch=batch, resolution=side, text_tokens=tokens,
                                   vae_factor=defaults["vae_factor"], attention_mask=folder is not None)
    print(f"planned for one denoiser call: batch {batch}, {side}x{side} px (latent {side // defaults['vae_factor']}), "
          f"{tokens} text tokens")
    report = explain(model, **inputs, options=args.options)
    if args.calibration_memory is None:
        print(report.summary() if args.summary else report)
    else:   # the plan's totals, then the bytes its calibration holds (calibration_memory.py)
        from segquant_compile.calibration_memory import calibration_memory
        memory = calibration_memory(report, getattr(torch, args.dtype))
        print(report.summary() + "\n\n" + memory.describe(per_site=not args.summary))
        if args.calibration_memory:
            print(f"wrote {memory.save(args.calibration_memory)}")
    for path in args.save or ():
        print(f"wrote {report.save(path)}")
    return 0


def possible_variants(lowering) -> set[str]:
    """The kernel variants a site may run: its own, or with dualscale="auto" every one the
    measurement can choose (DualScale only on segments it starts with, asymmetric anywhere)."""
    from segquant_compile.lowering.formats import Scheme
    from segquant_compile.lowering.site_lowering import variant_name
    if not lowering.auto:
        return {lowering.variant}
    duals = {False, True} if Scheme.DUALSCALE in lowering.schemes else {False}
    if lowering.conv is not None:
        return {lowering.conv.variant(lowering.format, d, a, not lowering.static) for d in duals for a in (False, True)}
    return {variant_name(lowering.format, d, False, a, lowering.low_rank is not None) for d in duals for a in (False, True)}


def cmd_autotune(args) -> int:
    """Tune every GEMM shape of a model's plan at the given batch sizes and resolutions."""
    import os

    import torch
    from tqdm.auto import tqdm

    from segquant_compile.explain import explain
    from segquant_compile.lowering import autotune
    from segquant_compile.lowering.site_lowering import SiteLowering
    from segquant_compile.lowering.triton_gemm import tune
    from segquant_compile.options import resolve_options
    from segquant_compile.passes.site_rules import lower_site
    interpret = os.environ.get("TRITON_INTERPRET") == "1"
    if not torch.cuda.is_available() and not interpret:
        raise ValueError("autotune times the Triton kernels on a CUDA GPU; none is visible "
                         "(TRITON_INTERPRET=1 exercises the path on CPU, timings meaningless)")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.cache:
        autotune.set_cache_dir(args.cache)
    config = resolve_options(args.options)
    model = models.build(models.load_config(args.model), device="meta")
    shapes = {}   # one tuning per key: rows in the same M bucket share it
    for batch in args.batch:
        for resolution in args.resolution:
            inputs = models.example_inputs(model, batch=batch, resolution=resolution, text_tokens=args.text_tokens)
            for site in explain(model, **inputs, options=args.options).sites:
                lowering = lower_site(site, config, "cuda")   # the kernel variant the GPU runs
                if site.rows is None or not isinstance(lowering, SiteLowering):
                    continue
                for variant in possible_variants(lowering):
                    shape = (site.rows, site.out_features, site.in_features, variant)
                    shapes.setdefault(autotune.key(*shape, device), (*shape, lowering.conv))
    for m, n, k, variant, conv in tqdm(sorted(shapes.values(), key=lambda s: s[:4]), desc="segquant autotune",
                                       unit="shape"):
        if conv is not None:
            from segquant_compile.lowering import triton_conv
            triton_conv.tune(m, n, conv, variant, device)
        else:
            tune(m, n, k, variant, device)
    print(f"tuned {len(shapes)} GEMM shapes; cache: {autotune.cache_path()}")
    return 0


def cmd_quantize(args) -> int:
    """Quantize a local pipeline folder's denoiser: calibrate on the prompts, save, print the report."""
    from pathlib import Path

    import torch
    from diffusers import DiffusionPipeline

    from segquant_compile.explain import report
    from segquant_compile.pipeline import denoiser_name, quantize_pipeline
    prompts = [line.strip() for line in Path(args.prompts).read_text().splitlines() if line.strip()]
    if not prompts:
        raise ValueError(f"{args.prompts} holds no prompts (one per line)")
    try:
        pipe = DiffusionPipeline.from_pretrained(args.folder, local_files_only=True)
    except (OSError, ValueError, TypeError, KeyError) as e:   # diffusers says what is missing: one line
        raise ValueError(f"{args.folder} is not a loadable diffusers pipeline ({e})") from None
    kwargs = dict(args.pipe_kwargs or {})
    if args.steps:
        kwargs["num_inference_steps"] = args.steps
    kwargs.setdefault("generator", torch.Generator().manual_seed(args.seed))
    quantize_pipeline(pipe, prompts, options=args.options, save=args.out, **kwargs)
    r = report(getattr(pipe, denoiser_name(pipe)))
    print(r.summary())
    if r.calibration is not None:
        print(r.calibration.describe())
    print(f"wrote {args.out}: load it with options={{'load': {str(args.out)!r}}}")
    return 0


def pipeline_folder(text: str) -> str:
    """A local diffusers pipeline folder (its model_index.json): nothing is downloaded, so a name
    that is no folder here is an error, not a hub id."""
    from pathlib import Path
    folder = Path(text)
    if not folder.is_dir():
        raise argparse.ArgumentTypeError(f"{text!r} is not a folder (a local diffusers pipeline folder; "
                                         f"nothing is downloaded)")
    if not (folder / "model_index.json").is_file():
        raise argparse.ArgumentTypeError(f"{text!r} holds no model_index.json: not a diffusers pipeline folder")
    return text


def pipe_kwargs_json(text: str) -> dict:
    return json_object(text, "pipeline call arguments")


def sampler_calls(sample, net, steps: int) -> list[tuple]:
    """`steps` of the calls a float sampling run `sample(fn)` makes to `net`, evenly spread over the
    run: the inputs the network really sees at those timesteps."""
    seen = []

    def record(*args):
        seen.append(tuple(a.clone() for a in args))
        return net(*args)
    sample(record)
    n = len(seen)
    return [seen[i] for i in sorted({min(n - 1, int((k + 0.5) * n / steps)) for k in range(steps)})]


def sensitivity_target(args):
    """(model with real weights, its calls or None, a whole run or None): an MNIST model on its
    sampler's inputs (seed 0, one image per digit) or, with --run, on that sampling run's final
    samples; or a local diffusers folder's denoiser on example inputs at `steps` timesteps."""
    import torch
    if args.model in ("mnist-dit", "mnist-vit"):
        from segquant_compile.examples import mnist_dit, mnist_vit
        mnist, load = {"mnist-dit": (mnist_dit, mnist_dit.load_dit), "mnist-vit": (mnist_vit, mnist_vit.load_vit)}[
            args.model]
        net = load()   # a missing file: FileNotFoundError, exit status 2

        def sample(fn):
            return mnist.sample(fn, torch.arange(10), seed=0)
        return (net, None, sample) if args.run else (net, sampler_calls(sample, net, args.steps), None)
    if args.run:
        raise ValueError("segquant sensitivity --run: a whole sampling run is known for mnist-dit and mnist-vit "
                         "only; a diffusers folder is measured on --steps calls")
    config = models.load_config(args.model)   # a shipped config builds on meta: sensitivity() refuses it
    folder = models.model_folder(args.model) if args.model not in models.shipped() else None
    if folder is None:
        model = models.build(config, device="meta")
    else:
        model = models.model_class(config).from_pretrained(folder, local_files_only=True).eval()
    pipeline = folder.parent if folder is not None and folder.name in ("transformer", "unet") else folder
    defaults = models.pipeline_defaults(config, pipeline)
    g = torch.Generator().manual_seed(0)
    calls = []
    for k in range(args.steps):
        x = models.example_inputs(model, batch=1, resolution=args.resolution or defaults["resolution"],
                                  text_tokens=args.text_tokens or defaults["text_tokens"], generator=g,
                                  vae_factor=defaults["vae_factor"])
        # example inputs sit mid-schedule: spread the steps evenly over (0, 2 x mid)
        x["timestep"] = x["timestep"] * (2 * (args.steps - k) / (args.steps + 1))
        calls.append(x)
    return model, calls, None


def cmd_sensitivity(args) -> int:
    from segquant_compile.sensitivity import sensitivity
    model, calls, run = sensitivity_target(args)
    sens = sensitivity(model, calls, formats=args.formats, options=args.options, run=run)
    print(sens)
    for path in args.out or ():
        print(f"wrote {sens.save(path)}")
    return 0


def sensitivity_file(text: str) -> str:
    if not text.endswith((".json", ".html")):
        raise argparse.ArgumentTypeError(f"{text!r}: write .json or .html")
    return text


def cmd_demo(args) -> int:
    from segquant_compile import demo
    demo.run(args.model, args.activations, args.save)
    return 0


def cmd_codegen_check(args) -> int:
    from segquant_compile.lowering import codegen_check
    return codegen_check.run(args.arch.split(","), args.json, args.every, args.write_table, args.jobs,
                             args.verbose, args.first)


def main(argv=None) -> int:
    parser = _Parser(prog="segquant", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    p = sub.add_parser("inspect", help="the SegLinear/DualScale plan of a model (meta device: no weights)")
    _add_model_args(p, default="sd3.5-medium")
    p.add_argument("--save", action="append", metavar="PATH", help="write the report (.json, .dot, .html)")
    p.add_argument("--summary", action="store_true", help="totals only")
    p.add_argument("--calibration-memory", nargs="?", const="", default=None, type=json_file, metavar="JSON",
                   help="the bytes a calibration under these options holds (Hessians, kept rows, packed weights, "
                        "float copies) per site and in total; optionally written to JSON")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32",
                   help="the model's float weights, for --calibration-memory (its own weights, low-rank branches)")
    p.set_defaults(func=cmd_inspect)
    p = sub.add_parser("quantize", help="calibrate a local diffusers pipeline folder's denoiser on prompts; save")
    p.add_argument("folder", type=pipeline_folder,
                   help="a local pipeline folder (DiffusionPipeline.from_pretrained, offline)")
    p.add_argument("--prompts", required=True, help="a text file, one calibration prompt per line")
    p.add_argument("--out", required=True, help="folder to save the quantized state to")
    p.add_argument("--options", type=options_json, default=None, help="segquant options as JSON (default static)")
    p.add_argument("--steps", type=positive_int, default=None, help="num_inference_steps per prompt")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--pipe-kwargs", type=pipe_kwargs_json, default=None,
                   help='more pipeline call arguments as JSON, e.g. \'{"guidance_scale": 4.5}\'')
    p.set_defaults(func=cmd_quantize)
    p = sub.add_parser("autotune", help="tune the GEMM kernels for every shape of a model; persist the cache")
    _add_model_args(p, default=None, many=True)
    p.add_argument("--cache", default=None, help="cache folder (default: SEGQUANT_CACHE_DIR or ~/.cache/segquant)")
    p.set_defaults(func=cmd_autotune)
    p = sub.add_parser("sensitivity", help="per site and format, the output error when only that site is "
                                           "quantized (real weights)")
    p.add_argument("model", help="mnist-dit, mnist-vit (../shared/data) or a local diffusers model folder with "
                                 "weights; shipped configs have none")
    p.add_argument("--formats", nargs="+", type=_format_name, default=list(DEFAULT_FORMATS),
                   help=f"{', '.join(Format.values())}, each optionally with a low-rank branch ('w4a8+r32')")
    p.add_argument("--steps", type=positive_int, default=4, help="sampler timesteps (one model call each)")
    p.add_argument("--run", action="store_true", help="MNIST models: the error of a whole sampling run's "
                                                      "final samples (every step compounded), not of --steps calls")
    p.add_argument("--out", type=sensitivity_file, action="append", metavar="PATH", help="write .json or .html")
    p.add_argument("--resolution", type=resolution, default=None, help="diffusers folders: image side in pixels")
    p.add_argument("--text-tokens", type=positive_int, default=None, help="diffusers folders: text length")
    p.add_argument("--options", type=options_json, default=None, help="segquant options as JSON")
    p.set_defaults(func=cmd_sensitivity)
    p = sub.add_parser("demo", help="quantize an embedded default model: plan, SQNR and time against float")
    p.add_argument("--model", choices=["sd3", "mnist"], default="sd3",
                   help="sd3: an SD3-style transformer with random weights; mnist: the real DiT in ../shared/data")
    p.add_argument("--activations", choices=["static", "dynamic"], default="static")
    p.add_argument("--save", action="append", metavar="PATH", help="write the report (.json, .dot, .html)")
    p.set_defaults(func=cmd_demo)
    p = sub.add_parser("codegen-check", help="compile every Triton kernel for NVIDIA archs on this machine: "
                                             "tensor cores, pipelining, registers, spills, shared memory")
    p.add_argument("--arch", default="sm_80,sm_89,sm_90", help="comma-separated: sm_80, sm_89, sm_90")
    p.add_argument("--json", default=None, metavar="FILE", help="write one row per (kernel, variant, config, arch)")
    p.add_argument("--every", action="store_true", help="every candidate config, not only those the pruner offers")
    p.add_argument("--write-table", action="store_true", help="with --every: write the pruner's table")
    p.add_argument("--jobs", type=positive_int, default=1, help="compile in this many processes")
    p.add_argument("--verbose", action="store_true", help="a line per compiled row")
    p.add_argument("--first", action="store_true", help="only the first config the pruner offers per kernel case")
    p.set_defaults(func=cmd_codegen_check)
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (FileNotFoundError, ValueError, TypeError) as e:
        print(f"segquant: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
