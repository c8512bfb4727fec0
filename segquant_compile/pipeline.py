"""quantize_pipeline(): a diffusers pipeline's denoiser compiled with segquant, calibrated by
running the pipeline itself (as at inference: guidance on, every timestep seen), saved."""
from __future__ import annotations

DENOISERS = ("transformer", "unet")


def denoiser_name(pipe) -> str:
    """The attribute holding the pipeline's denoiser: `transformer` (DiT pipelines) or `unet`."""
    for name in DENOISERS:
        if getattr(pipe, name, None) is not None:
            return name
    raise TypeError(f"segquant_compile.quantize_pipeline: {type(pipe).__name__} has no `transformer` or `unet` "
                    f"to quantize")


def quantize_pipeline(pipe, prompts, options=None, save=None, progress: bool = True,
                      **pipe_kwargs):
    """Compile `pipe`'s denoiser with backend="segquant" (static activations unless `options` say
    otherwise), calibrate it by calling `pipe(prompt, **pipe_kwargs)` for each prompt, write it to
    `save` if given, and return the pipeline. With options={"load": path} nothing is calibrated:
    the saved steps and options are used. Under torch.distributed (`torchrun --nproc-per-node N`)
    each rank calibrates its share of the prompts (`prompts[rank::N]`), the statistics are merged
    and rank 0 saves."""
    from tqdm.auto import tqdm

    from segquant_compile.backend import compile
    from segquant_compile import distributed
    from segquant_compile.calibration import calibrate
    from segquant_compile.config import QuantConfig
    from segquant_compile.options import resolve_options
    from segquant_compile.persist import save as save_to
    name = denoiser_name(pipe)
    denoiser = getattr(pipe, name)
    if hasattr(denoiser, "_orig_mod"):
        raise ValueError(f"segquant_compile.quantize_pipeline: pipe.{name} is compiled already; pass the "
                         f"float pipeline")
    if isinstance(options, QuantConfig):
        options = options.to_flat()
    options = dict(options or {})
    if "load" not in options and "preset" not in options:
        options.setdefault("activations", "static")
    config = resolve_options(options)       # errors now, before any pipeline call
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    distributed.init_from_env()
    mine = distributed.shard_items(prompts, distributed.shard_of(distributed.calibration_group()))
    compiled = compile(denoiser, **options)
    setattr(pipe, name, compiled)
    bar = lambda items: tqdm(items, desc="segquant calibration", unit="prompt", disable=not progress)
    if config.activations == "static" and not config.load:
        if not prompts:
            raise ValueError("segquant_compile.quantize_pipeline: static activations need calibration prompts")
        with calibrate(compiled, progress=False):
            for prompt in bar(mine):
                pipe(prompt, **pipe_kwargs)
    elif save is not None and prompts:
        pipe(prompts[0], **pipe_kwargs)               # dynamic or loaded: one call makes the states to save
    if save is not None:
        save_to(compiled, save)
    return pipe
