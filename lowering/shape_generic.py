"""Eager quantization inside the CPU site ops (conv2d_dynamic, dynamic_activation), run by one
shape-generic compiled kernel when the tensor is large.

A CPU site op's body runs eagerly: its traced graph is one node, so the model's generated code
does not grow with its sites. Eager elementwise chains make a pass over memory per op; on large
tensors they run instead as one compiled kernel per function and constant arguments (scheme),
compiled with `dynamic=True` so that every site, shape and batch shares it. Small tensors stay
eager: a tiny model compiles nothing extra."""
from __future__ import annotations

import functools
from typing import Callable

import torch
from torch import Tensor

# tensors of at least this many elements go through the compiled kernel
COMPILED_MIN = 1 << 20


@functools.cache
def _compiled(fn: Callable) -> Callable:
    return torch.compile(fn, dynamic=True, fullgraph=True)


def run(fn: Callable, x: Tensor, *args):
    """fn(x, *args), compiled when x is large and no compile is under way (a compile inside a
    compile would be traced into the outer graph). The kernel reads x contiguous: a slice's
    storage offset (0 or not) and strides would each be a guard, and a recompile."""
    if x.numel() >= COMPILED_MIN and not torch.compiler.is_compiling():
        return _compiled(fn)(x.contiguous(), *args)
    return fn(x, *args)
