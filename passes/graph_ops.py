"""What an FX node does, read from its target and arguments (torch-level dynamo graphs)."""
from __future__ import annotations

import operator

import torch
import torch.fx

from .shapes import example, norm_dim, shape


def name(node: torch.fx.Node) -> str:
    """`torch.chunk`, `Tensor.chunk` and `"chunk"` all read as "chunk"."""
    if node.op == "call_method":
        return str(node.target)
    if node.op == "call_function":
        target = node.target
        if target is operator.getitem:
            return "getitem"
        return getattr(target, "__name__", str(target)).lstrip("_")
    return node.op


def arg(node: torch.fx.Node, index: int, key: str, default=None):
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(key, default)


def is_tensor(x) -> bool:
    return isinstance(x, torch.fx.Node) and isinstance(example(x), torch.Tensor)


LINEAR_TARGETS = {torch._C._nn.linear, torch.nn.functional.linear}
MATMUL_NAMES = {"matmul", "mm", "addmm"}

# Activations DualScale recognises, by config name.
ACTIVATIONS = {
    "silu": {"silu"}, "gelu": {"gelu"}, "mish": {"mish"}, "hardswish": {"hardswish"},
    "elu": {"elu"}, "selu": {"selu"}, "celu": {"celu"}, "softplus": {"softplus"},
    "relu": {"relu"}, "leaky_relu": {"leaky_relu"}, "relu6": {"relu6", "hardtanh"},
    "sigmoid": {"sigmoid"}, "tanh": {"tanh"},
}


def activation(node: torch.fx.Node) -> str | None:
    """The config name of the activation this node computes, if it is one."""
    n = name(node)
    for key, names in ACTIVATIONS.items():
        if n in names:
            if n == "gelu":
                approx = node.kwargs.get("approximate", node.args[1] if len(node.args) > 1 else "none")
                return f"gelu(approximate={approx!r})" if approx != "none" else "gelu"
            return key
    return None


def tensor_inputs(node: torch.fx.Node) -> list[torch.fx.Node]:
    return [a for a in node.all_input_nodes if is_tensor(a)]


def split_parts(node: torch.fx.Node) -> tuple[int, list] | None:
    """(dim, piece sizes along dim) of a split-family node, from its tuple example value."""
    value = example(node)
    src = node.args[0] if node.args else node.kwargs.get("input", node.kwargs.get("self"))
    src_shape = shape(src)
    if src_shape is None or not isinstance(value, (tuple, list)):
        return None
    n = name(node)
    default = 0
    dim = arg(node, 1 if n == "unbind" else 2, "dim", default)
    dim = norm_dim(int(dim), len(src_shape))
    if n == "unbind":
        return dim, [1] * len(value)
    return dim, [t.shape[dim] for t in value]


def cat_dim(node: torch.fx.Node) -> int | None:
    """The output dim a cat/stack joins along (for stack, the new dim)."""
    out = shape(node)
    return None if out is None else norm_dim(int(arg(node, 1, "dim", 0)), len(out))


def cat_inputs(node: torch.fx.Node) -> list:
    seq = node.args[0] if node.args else node.kwargs.get("tensors")
    return list(seq) if isinstance(seq, (list, tuple)) else []


def permutation(node: torch.fx.Node, ndim: int) -> list[int] | None:
    """Output dim i holds input dim perm[i]."""
    n = name(node)
    args = list(node.args[1:])
    if n == "permute":
        dims = args[0] if len(args) == 1 and isinstance(args[0], (list, tuple)) else args
        dims = dims or node.kwargs.get("dims")
        return [norm_dim(int(d), ndim) for d in dims]
    perm = list(range(ndim))
    if n == "t":
        if ndim < 2:
            return perm
        perm[0], perm[1] = 1, 0
        return perm
    if n in ("transpose", "swapaxes", "swapdims"):
        a = norm_dim(int(arg(node, 1, "dim0")), ndim)
        b = norm_dim(int(arg(node, 2, "dim1")), ndim)
        perm[a], perm[b] = perm[b], perm[a]
        return perm
    if n in ("movedim", "moveaxis"):
        src, dst = arg(node, 1, "source"), arg(node, 2, "destination")
        src = [src] if isinstance(src, int) else list(src)
        dst = [dst] if isinstance(dst, int) else list(dst)
        src = [norm_dim(d, ndim) for d in src]
        dst = [norm_dim(d, ndim) for d in dst]
        rest = [d for d in range(ndim) if d not in src]
        out: list = [None] * ndim
        for s, d in zip(src, dst):
            out[d] = s
        it = iter(rest)
        return [o if o is not None else next(it) for o in out]
    return None
