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


def capture_graphs(model, args: tuple, kwargs: dict, dynamic: bool | None = False
                   ) -> list[tuple[torch.fx.GraphModule, list]]:
    """Every FX graph (with its example inputs) dynamo produces for one call of `model`."""
    graphs: list = []

    def backend(gm, example_inputs, **_):
        graphs.append((gm, list(example_inputs)))
        return gm.forward

    with lifted_recompile_limits(), torch.no_grad():
        compiled = torch.compile(model, backend=backend, dynamic=dynamic)
        compiled(*args, **kwargs)
    return graphs
