"""The transparency classifier, one-piece cats/splits, MultiheadAttention sites, float calls."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from segquant_compile.capture import capture_graphs
from segquant_compile.passes import FloatCall, Plan, Transparency, build_plan, classify, graph_ops, merge

from conftest import mha_fastpath
from test_plan_chains import plan_of

T = Transparency
X = torch.randn(2, 5, 8)


def node_kinds(fn, *args) -> dict[str, Transparency]:
    """Classification of every call in the graph of `fn`, by FX node name."""
    (gm, _), = capture_graphs(fn, args, {})
    return {n.name: classify(n) for n in gm.graph.nodes if n.op in ("call_function", "call_method")}


@pytest.mark.parametrize("fn,op,kind", [
    (lambda x: x.float() + 0, "float", T.VALUE),
    (lambda x: F.dropout(x, 0.0) + 0, "dropout", T.VALUE),
    (lambda x: torch.cat([x], -1) + 0, "cat", T.VALUE),                 # one piece: a copy
    (lambda x: torch.stack([x], -1).sum(), "stack", T.RESHAPE),         # one piece: an unsqueeze
    (lambda x: x.sigmoid().sum(), "sigmoid", T.POINTWISE),
    (lambda x: F.hardswish(x).sum(), "hardswish", T.POINTWISE),
    (lambda x: (x * 0.5).sum(), "mul", T.POINTWISE),
    (lambda x: (x + torch.ones(8)).sum(), "add", T.BROADCAST),
    (lambda x: torch.where(x > 0, x, x * 2).sum(), "where", T.BROADCAST),
    (lambda x: x.expand(3, 2, 5, 8).sum(), "expand", T.EXPAND),
    (lambda x: x.unflatten(-1, (2, 4)).sum(), "unflatten", T.RESHAPE),
    (lambda x: x.transpose(0, 1).sum(), "transpose", T.PERMUTE),
    (lambda x: torch.cat([x, x], -1).sum(), "cat", T.CAT),
    (lambda x: x[..., 1:3].sum(), "getitem", T.INDEX),
    (lambda x: x.narrow(1, 0, 2).sum(), "narrow", T.INDEX),
    (lambda x: x.softmax(-1).sum(), "softmax", T.MIXING),
    (lambda x: F.layer_norm(x, (8,)).sum(), "layer_norm", T.MIXING),
    (lambda x: x.mean(-1, keepdim=True) + 0, "mean", T.MIXING),
    (lambda x: (x @ x.transpose(-1, -2)).sum(), "matmul", T.MIXING),
])
def test_classify(fn, op, kind):
    (gm, _), = capture_graphs(fn, (X,), {})
    node, = [n for n in gm.graph.nodes if n.op in ("call_function", "call_method") and graph_ops.name(n) == op]
    assert classify(node) is kind


def test_split_pieces_and_other_tuples():
    kinds = node_kinds(lambda x: (x.chunk(2, -1)[0] + x.max(-1)[0].unsqueeze(-1)).sum(), X)
    by_kind = {}
    for name, kind in kinds.items():
        by_kind.setdefault(kind, []).append(name)
    assert len(by_kind[T.SPLIT]) == 1 and len(by_kind[T.PIECE]) == 1   # chunk and its getitem
    assert any(n.startswith("getitem") for n in by_kind[T.MIXING])     # max's (values, indices)


def test_keeps_values():
    assert all(k.keeps_values for k in (T.VALUE, T.RESHAPE, T.PERMUTE, T.INDEX, T.PIECE, T.CAT, T.EXPAND))
    assert not any(k.keeps_values for k in (T.POINTWISE, T.BROADCAST, T.MIXING))


# ------------------------------------------------------------------ one piece is no segmentation
class Lin(nn.Module):
    def __init__(self, fn, k=8, n=12):
        super().__init__()
        self.fn, self.lin = fn, nn.Linear(k, n)

    def forward(self, x):
        return self.fn(self, x)


@pytest.mark.parametrize("fn", [
    lambda m, x: m.lin(torch.cat([x], -1)),
    lambda m, x: m.lin(torch.cat((x,), dim=2).contiguous()),
    lambda m, x: m.lin(torch.stack([x], -2).flatten(-2)),
    lambda m, x: m.lin(torch.chunk(x, 1, -1)[0]),
    lambda m, x: m.lin(x).chunk(1, -1),
    lambda m, x: torch.split(m.lin(x), 12, dim=-1),
    lambda m, x: m.lin(x)[..., 0:12] * 2,
])
def test_one_piece_is_no_segmentation(fn):
    site = plan_of(Lin(fn), X)["lin"]
    assert site.output_segments is None and site.input_segments is None


def test_one_piece_cat_keeps_dualscale_and_pattern():
    assert plan_of(Lin(lambda m, x: m.lin(torch.cat([F.silu(x)], -1))), X)["lin"].dualscale.sources == ("silu",)
    # a one-piece chunk beside a real slice: only the slice is evidence
    site = plan_of(Lin(lambda m, x: (lambda y: (y.chunk(1, -1)[0], y[..., :4]))(m.lin(x))), X)["lin"]
    assert site.output_segments.sizes == (4, 8) and site.output_segments.pattern == "slice"


# ------------------------------------------------------------------ nn.MultiheadAttention
E, HEADS, LAYERS = 16, 4, 2


@pytest.fixture
def no_fastpath():
    with mha_fastpath(False):
        yield


def encoder(batch_first: bool):
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(E, HEADS, 32, dropout=0.0, batch_first=batch_first)
    model = nn.Sequential(nn.TransformerEncoder(layer, LAYERS, enable_nested_tensor=False)).eval()
    return model, torch.randn(2, 5, E) if batch_first else torch.randn(5, 2, E)


@pytest.mark.parametrize("batch_first", [True, False])
def test_encoder_attention_linears_are_sites(no_fastpath, batch_first):
    model, x = encoder(batch_first)
    plan = plan_of(model, x)
    assert len(plan) == 4 * LAYERS and plan.float_calls == ()
    for i in range(LAYERS):
        qkv = plan[f"0.layers.{i}.self_attn.in_proj"]
        assert qkv.weight == f"0.layers.{i}.self_attn.in_proj_weight" and qkv.bias
        assert qkv.output_segments.sizes == (E,) * 3 and qkv.input_segments is None
        out = plan[f"0.layers.{i}.self_attn.out_proj"]
        assert out.input_segments.sizes == (E // HEADS,) * HEADS and out.input_segments.pattern == "head_merge"
        assert out.output_segments is None
    assert len({s.name for s in plan}) == len(plan)


def test_inlined_attention_computes_the_same(no_fastpath):
    model, x = encoder(batch_first=True)
    (gm, inputs), = capture_graphs(model, (x,), {})
    before = gm(*inputs)[0]
    plan = build_plan(gm)
    assert not any(n.target is F.multi_head_attention_forward for n in gm.graph.nodes)
    assert {plan[s.name].node for s in plan} <= {n.name for n in gm.graph.nodes}
    torch.testing.assert_close(gm(*inputs)[0], before, rtol=0, atol=0)
    torch.testing.assert_close(before, model(x))


def test_attention_with_weights_and_separate_projections():
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(E, HEADS, kdim=8, vdim=8)     # need_weights=True: the bmm path
    q, kv = torch.randn(5, 2, E), torch.randn(7, 2, 8)
    plan = plan_of(lambda q, kv: mha(q, kv, kv), q, kv)
    assert {s.name for s in plan} == {"q_proj", "k_proj", "v_proj", "out_proj"}
    assert plan["k_proj"].in_features == 8 and plan["q_proj"].output_segments is None
    # this path merges heads through (T, B*H, D) -> (T*B, H*D): batch and heads share a dim,
    # which the walk does not split, so out_proj is a site without head segments
    assert plan["out_proj"].input_segments is None and plan["out_proj"].notes
    assert plan.float_calls == ()     # q @ k^T and attn @ v are not linear calls


@pytest.mark.parametrize("batch_first", [True, False])
def test_symbolic_attention_is_inlined(no_fastpath, batch_first):
    """Under dynamic shapes (a recompile after the batch changed) the replay's sizes are symbolic
    (bsz * num_heads): rebuilt from sym_size nodes, the attention linears stay sites with their
    segments, and the graph computes what the opaque call did."""
    model, x = encoder(batch_first)
    torch._dynamo.mark_dynamic(x, 0)
    torch._dynamo.mark_dynamic(x, 1)
    (gm, inputs), = capture_graphs(model, (x,), {}, dynamic=True)
    value = next(n.meta["example_value"] for n in gm.graph.nodes if n.op == "placeholder"
                 and isinstance(n.meta.get("example_value"), torch.Tensor) and n.meta["example_value"].dim() == 3)
    assert all(isinstance(s, torch.SymInt) for s in value.shape[:2])     # the trace really is symbolic
    before = gm(*inputs)[0]
    plan = build_plan(gm)
    assert plan.float_calls == () and len(plan) == 4 * LAYERS
    assert not any(n.target is F.multi_head_attention_forward for n in gm.graph.nodes)
    assert any(n.target is torch.ops.aten.sym_size.int for n in gm.graph.nodes)
    for i in range(LAYERS):
        assert plan[f"0.layers.{i}.self_attn.in_proj"].output_segments.sizes == (E,) * 3
        out = plan[f"0.layers.{i}.self_attn.out_proj"]
        assert out.input_segments.sizes == (E // HEADS,) * HEADS and out.input_segments.pattern == "head_merge"
    torch.testing.assert_close(gm(*inputs)[0], before, rtol=0, atol=0)


def test_symbolic_size_from_outside_the_call_stays_opaque():
    """A size the call's inputs do not hold cannot be rebuilt: the call stays opaque, with why."""
    from segquant_compile.passes.inline import Unsupported, _Recorder
    import sympy
    graph = torch.fx.Graph()
    recorder = _Recorder(graph, {}, {})
    with pytest.raises(Unsupported, match="not a size of the call's inputs"):
        recorder._size(sympy.Symbol("s9"))


def test_fastpath_encoder_layer_is_planned_through():
    """The fused fast path (explain-style capture runs under no_grad) is inlined as the layer's
    slow path: its four linears are sites, none is left inside the fused op (issue 27)."""
    model, x = encoder(batch_first=True)
    with mha_fastpath(True):
        plan = plan_of(model, x)
    assert not [f for f in plan.float_calls if f.kind == "transformer_encoder_layer_fwd"]
    assert {s.name for s in plan} >= {f"0.layers.{i}.{m}" for i in range(LAYERS)
                                      for m in ("self_attn.in_proj", "self_attn.out_proj", "linear1", "linear2")}


# ------------------------------------------------------------------ float calls
class Odd(nn.Module):
    """Linear calls whose weight no site can take, next to activation x activation matmuls."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(8, 8))
        self.left = nn.Parameter(torch.randn(5, 5))
        self.w3 = nn.Parameter(torch.randn(2, 8, 8))
        self.lin = nn.Linear(8, 8)

    def forward(self, x, w_in):
        a = F.linear(x, self.w * 2)          # weight computed from a parameter
        b = F.linear(x, w_in)                # weight is a graph input
        c = self.left @ x                    # parameter on the left
        d = x @ self.w3                      # 3-D weight
        q = self.lin(x)
        scores = q @ q.transpose(-1, -2)     # attention-like: no parameter operand
        return a + b + c + d + scores @ q


def test_float_calls_with_reasons():
    plan = plan_of(Odd(), X, torch.randn(8, 8))
    assert [s.name for s in plan] == ["lin"]
    reasons = {(f.name, f.kind): f.reason for f in plan.float_calls}
    assert reasons == {
        ("w", "linear"): "weight is not a parameter (computed in the graph)",
        ("b", "linear"): "weight is not a parameter (a graph input)",   # the FX node's name
        ("left", "matmul"): "the parameter is the left operand",
        ("w3", "matmul"): "weight is not 2-D",
    }


def test_merge_carries_float_calls():
    a = FloatCall("linear", "w", "linear", "weight is not a parameter (a graph input)", graph=0)
    b = FloatCall("linear", "w", "linear", "weight is not a parameter (a graph input)", graph=1)
    merged = merge([Plan((), float_calls=(a,)), Plan((), float_calls=(b, a))])
    assert merged.float_calls == (a, b)
