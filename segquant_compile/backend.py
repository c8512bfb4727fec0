"""The `segquant` torch.compile backend (registered through the torch_dynamo_backends entry point)."""
from __future__ import annotations

import torch

from segquant_compile.config import QuantConfig
from segquant_compile.options import resolve_options
from segquant_compile.passes import build_plan


def segquant_backend(gm: torch.fx.GraphModule, example_inputs, options: dict | None = None,
                     mode: str | None = None):
    """Plan the graph's linear sites and return a GraphRunner: quantized sites lowered to the
    segquant GEMM, the rest of the graph compiled by Inductor."""
    from segquant_compile.runtime import GraphRunner
    config = resolve_options(options, mode)
    if config.release_float_weights:
        from segquant_compile.weight_watch import guard_released_weights
        guard_released_weights()
    plan = build_plan(gm, config.activation_set, config.seglinear)
    return GraphRunner(gm, list(example_inputs), plan, config)


def compile(model, config: QuantConfig | str | None = None, **options):
    """torch.compile(model, backend="segquant", options=...), with the options checked now: torch
    hands options to a backend only at the first call, where an error arrives wrapped in
    torch._dynamo.exc.BackendCompilerFailed (ours is its `.inner_exception`). `config`: a
    QuantConfig (`sq.presets.W8A8_STATIC`) or a preset's name; `options`: flat options over it."""
    if config is not None:
        options = {"preset": config, **options}
    resolve_options(options)
    if isinstance(options.get("preset"), QuantConfig):   # torch keeps plain data
        options = {**options.pop("preset").to_flat(), **options}
    return torch.compile(model, backend="segquant", options=options or None)
