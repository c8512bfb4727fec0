"""Run dynamo over a model and keep the graphs it hands a backend (for explain)."""
from __future__ import annotations

import torch
import torch._dynamo


def capture_graphs(model, args: tuple, kwargs: dict, dynamic: bool | None = False
                   ) -> list[tuple[torch.fx.GraphModule, list]]:
    """Every FX graph (with its example inputs) dynamo produces for one call of `model`."""
    graphs: list = []

    def backend(gm, example_inputs, **_):
        graphs.append((gm, list(example_inputs)))
        return gm.forward

    # A fresh backend is a new cache entry for every code object dynamo traces: lift the
    # recompile limits for this call so repeated explains of one class keep capturing.
    patches = {"recompile_limit": 10_000, "accumulated_recompile_limit": 100_000}
    patches = {k: v for k, v in patches.items() if hasattr(torch._dynamo.config, k)}
    with torch._dynamo.config.patch(**patches), torch.no_grad():
        compiled = torch.compile(model, backend=backend, dynamic=dynamic)
        compiled(*args, **kwargs)
    return graphs

