"""Inline the opaque calls that hide linears from the plan.

Dynamo keeps `F.multi_head_attention_forward` (nn.MultiheadAttention, nn.Transformer*) as one
node (torch's trace rules list it as an in-graph function), so its in_proj and out_proj linears
never appear in the graph; nn.TransformerEncoderLayer's fast path (eval, no_grad) is one fused
op, `torch._transformer_encoder_layer_fwd`, hiding all four of its linears. Replay such a call
on its fake example values under a TorchFunctionMode and put the torch-level ops it runs into
the graph in its place.

Under dynamic shapes (a recompile after the batch changed, CFG doubling it, for instance) the
replay's ops take symbolic sizes (`bsz * num_heads`): each is rebuilt in the graph from
`sym_size` nodes of the call's inputs, so the attention linears stay sites whatever the shapes.
"""
from __future__ import annotations

import operator
import types

import sympy
import torch
import torch.fx
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from .shapes import example


class Unsupported(Exception):
    """The call cannot be replayed as a static torch-level graph; the message says why."""


def _unchecked(fn):
    """`fn` without its `has_torch_function` early exit, so a mode sees the ops inside it."""
    body = types.FunctionType(fn.__code__, dict(fn.__globals__, has_torch_function=lambda *_: False),
                              fn.__name__, fn.__defaults__, fn.__closure__)
    body.__kwdefaults__ = fn.__kwdefaults__
    return body


_ATTENTION = _unchecked(F.multi_head_attention_forward)


def _encoder_layer(src, embed_dim, num_heads, qkv_weight, qkv_bias, proj_weight, proj_bias, use_gelu, norm_first,
                   eps, norm_weight_1, norm_bias_1, norm_weight_2, norm_bias_2, ffn_weight_1, ffn_bias_1,
                   ffn_weight_2, ffn_bias_2, mask=None, mask_type=None):
    """`torch._transformer_encoder_layer_fwd` (nn.TransformerEncoderLayer's fast path in eval
    under no_grad, batch_first) written as the layer's own slow path: its four linears become
    sites. Masked calls are left fused (the op merges its mask types its own way)."""
    if mask is not None:
        raise Unsupported("a masked fast-path call (src_mask / src_key_padding_mask) is left fused")

    def attention(x):
        x = x.transpose(0, 1)
        out = _ATTENTION(x, x, x, embed_dim, num_heads, qkv_weight, qkv_bias, None, None, False, 0.0,
                         proj_weight, proj_bias, training=False, need_weights=False)[0]
        return out.transpose(0, 1)

    def feed_forward(x):
        h = F.linear(x, ffn_weight_1, ffn_bias_1)
        return F.linear(F.gelu(h) if use_gelu else F.relu(h), ffn_weight_2, ffn_bias_2)

    shape = (embed_dim,)
    if norm_first:
        x = src + attention(F.layer_norm(src, shape, norm_weight_1, norm_bias_1, eps))
        return x + feed_forward(F.layer_norm(x, shape, norm_weight_2, norm_bias_2, eps))
    x = F.layer_norm(src + attention(src), shape, norm_weight_1, norm_bias_1, eps)
    return F.layer_norm(x + feed_forward(x), shape, norm_weight_2, norm_bias_2, eps)


INLINABLE = {F.multi_head_attention_forward: _ATTENTION,
             torch._transformer_encoder_layer_fwd: _encoder_layer}


def inline_opaque(gm: torch.fx.GraphModule) -> dict[str, str]:
    """Inline every INLINABLE call of `gm` in place; returns {node name: reason} for the calls
    left opaque."""
    left: dict[str, str] = {}
    calls = [n for n in gm.graph.nodes if n.op == "call_function" and n.target in INLINABLE]
    for node in calls:
        try:
            _inline(gm.graph, node)
        except Unsupported as e:
            left[node.name] = str(e)
    if len(left) < len(calls):
        gm.graph.lint()
        gm.recompile()
    return left


def _inline(graph: torch.fx.Graph, node: torch.fx.Node) -> None:
    single = isinstance(example(node), torch.Tensor)   # one tensor out, else a tuple read by getitem
    for user in node.users:
        if not single and user.target is not operator.getitem:
            raise Unsupported(f"{user.name} uses the whole result")
    values = [example(n) for n in node.all_input_nodes]
    if any(not isinstance(v, (torch.Tensor, torch.SymInt, torch.SymFloat)) for v in values):
        raise Unsupported("an input is neither a tensor nor a symbolic number")
    fake_mode = next((v.fake_mode for v in values if hasattr(v, "fake_mode")), None)
    if fake_mode is None:
        raise Unsupported("no fake example values")
    args, kwargs = torch.fx.node.map_arg((node.args, node.kwargs), example)
    recorder = _Recorder(graph, {id(example(n)): n for n in node.all_input_nodes}, node.meta)
    with graph.inserting_before(node):
        try:
            with fake_mode, recorder:
                result = INLINABLE[node.target](*args, **kwargs)
            outputs = None if single else [recorder.node_of(result[u.args[1]]) for u in node.users]
            whole = recorder.node_of(result) if single else None
        except Exception as e:   # an op the replay cannot take: leave the call opaque, say why
            recorder.erase()
            raise e if isinstance(e, Unsupported) else Unsupported(f"replay failed: {e}") from e
    if single:
        node.replace_all_uses_with(whole)
    else:
        for user, new in zip(list(node.users), outputs):
            user.replace_all_uses_with(new)
            graph.erase_node(user)
    graph.erase_node(node)
    recorder.prune()


class _Recorder(TorchFunctionMode):
    """Runs each torch function on fake tensors and adds a node for every tensor it returns."""

    def __init__(self, graph: torch.fx.Graph, env: dict[int, torch.fx.Node], meta: dict):
        super().__init__()
        self.graph, self.env, self.created = graph, env, []
        # symbol -> (graph value, SymInt): an input that is the symbol itself, or a sym_size node
        # made on first use from `dims` (symbol -> (input node, dim, SymInt))
        self.symbols: dict[sympy.Symbol, tuple] = {}
        self.dims: dict[sympy.Symbol, tuple] = {}
        for node in list(env.values()):
            value = example(node)
            if isinstance(value, torch.SymInt) and isinstance(value.node.expr, sympy.Symbol):
                self.symbols[value.node.expr] = (node, value)
            for d, size in enumerate(value.shape if isinstance(value, torch.Tensor) else ()):
                if isinstance(size, torch.SymInt) and isinstance(size.node.expr, sympy.Symbol):
                    self.dims.setdefault(size.node.expr, (node, d, size))
        self.meta = {k: meta[k] for k in ("stack_trace", "nn_module_stack") if k in meta}
        self.alive: list = []   # keeps recorded tensors alive: env is keyed by id()

    def __torch_function__(self, func, types_, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        tensors = [t for t in (out if isinstance(out, (tuple, list)) else [out]) if isinstance(t, torch.Tensor)]
        if not tensors:
            return out
        op, target = _target(func)
        node = self._add(op, target, *torch.fx.node.map_aggregate((args, kwargs), self._arg), out)
        if isinstance(out, torch.Tensor):
            self.env[id(out)] = node
        else:
            for i, t in enumerate(out):
                if isinstance(t, torch.Tensor):
                    self.env[id(t)] = self._add("call_function", operator.getitem, (node, i), {}, t)
        self.alive.append(out)
        return out

    def _add(self, op, target, args, kwargs, value) -> torch.fx.Node:
        node = self.graph.create_node(op, target, tuple(args), dict(kwargs))
        node.meta.update(self.meta, example_value=value)
        self.created.append(node)
        return node

    def _arg(self, a):
        if isinstance(a, torch.Tensor):
            return self.node_of(a)
        if isinstance(a, (torch.SymInt, torch.SymFloat, torch.SymBool)) and id(a) in self.env:
            return self.env[id(a)]     # an input itself (dropout's p)
        if isinstance(a, torch.SymInt):
            return self._size(a.node.expr)[0]
        if isinstance(a, (torch.SymFloat, torch.SymBool)):
            raise Unsupported(f"a symbolic {type(a).__name__} reaches an op")
        return a

    def _size(self, e) -> tuple:
        """(graph value, SymInt or int) of the size expression `e`, built from the inputs'
        sym_size nodes with +, * and //; a symbol the inputs do not hold cannot be built."""
        from torch.utils._sympy.functions import FloorDiv
        if e.is_Integer:
            return int(e), int(e)
        if isinstance(e, sympy.Symbol):
            if e not in self.symbols:
                if e not in self.dims:
                    raise Unsupported(f"the symbolic size {e} is not a size of the call's inputs")
                source, d, size = self.dims[e]
                self.symbols[e] = (self._add("call_function", torch.ops.aten.sym_size.int, (source, d), {}, size), size)
            return self.symbols[e]
        ops = {sympy.Mul: operator.mul, sympy.Add: operator.add, FloorDiv: operator.floordiv}
        op = next((f for t, f in ops.items() if isinstance(e, t)), None)
        if op is None:
            raise Unsupported(f"the symbolic size {e} ({type(e).__name__}) reaches an op")
        node, value = self._size(e.args[0])
        for arg in e.args[1:]:
            n, v = self._size(arg)
            value = op(value, v)
            node = self._add("call_function", op, (node, n), {}, value)
        return node, value

    def node_of(self, t) -> torch.fx.Node:
        if id(t) not in self.env:
            raise Unsupported("a tensor from outside the call (not an input)")
        return self.env[id(t)]

    def erase(self):
        for n in reversed(self.created):
            self.graph.erase_node(n)

    def prune(self):
        """Drop what the call computed but nothing uses (need_weights=False leaves some)."""
        for n in reversed(self.created):
            if not n.users and not str(n.target).endswith("_"):
                self.graph.erase_node(n)


def _target(func) -> tuple[str, object]:
    name = getattr(func, "__name__", "")
    if name.startswith("__") and name.endswith("__"):
        fn = getattr(operator, name.strip("_"), None)
        if fn is None or name.startswith("__r"):
            raise Unsupported(f"operator {name}")
        return "call_function", fn
    if getattr(torch.Tensor, name, None) is func:
        return "call_method", name
    return "call_function", func
