"""The `segquant` torch.compile backend (registered through the torch_dynamo_backends entry point)."""
from __future__ import annotations

import torch

from segquant_compile.config import QuantConfig
from segquant_compile.passes import build_plan


def segquant_backend(gm: torch.fx.GraphModule, example_inputs, options: dict | None = None,
                     mode: str | None = None):
    """Plan the graph's linear sites, then hand it to Inductor. Quantized rewriting comes in the
    quantized-execution stage; until then graphs run in float."""
    config = QuantConfig.from_options(options, mode)
    gm.meta["segquant_plan"] = build_plan(gm, config.activation_set, config.seglinear)
    if not config.inductor:
        return gm.forward
    from torch._inductor.compile_fx import compile_fx
    patches = torch._inductor.list_mode_options(config.mode) if config.mode != "default" else {}
    return compile_fx(gm, example_inputs, config_patches=patches)
