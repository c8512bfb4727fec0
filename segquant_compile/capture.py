"""Run dynamo over a model and keep the graphs it hands a backend (for explain)."""
from __future__ import annotations

import torch
import torch._dynamo


def lifted_recompile_limits():
    """A fresh backend is a new cache entry for every code object dynamo traces: lift the
    recompile limits while a private backend compiles, so repeated runs on one class keep
    reaching it (instead of falling back to eager)."""
    patches = {"recompile_limit": 10_000, "accumulated_recompile_limit": 100_000}
    return torch._dynamo.config.patch(**{k: v for k, v in patches.items() if hasattr(torch._dynamo.config, k)})


def private_compile(model, backend, **kwargs):
    """torch.compile with a backend of segquant's own (explain, sensitivity), in its own recompile
    region where torch has them (2.13): its cache entries then never count against the recompile
    limit of the user's own torch.compile of the same model (which would silently fall back to
    eager after a few explains)."""
    from inspect import signature
    if "isolate_recompiles" in signature(torch.compile).parameters:
        kwargs["isolate_recompiles"] = True
    return torch.compile(model, backend=backend, **kwargs)


def capture_graphs(model, args: tuple, kwargs: dict, dynamic: bool | None = False
                   ) -> list[tuple[torch.fx.GraphModule, list]]:
    """Every FX graph (with its example inputs) dynamo produces for one call of `model`."""
    graphs: list = []

    def backend(gm, example_inputs, **_):
        graphs.append((gm, list(example_inputs)))
        return gm.forward

    with lifted_recompile_limits(), torch.no_grad():
        compiled = private_compile(model, backend, dynamic=dynamic)
        compiled(*args, **kwargs)
    return graphs
