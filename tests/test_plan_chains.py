"""Plans where a linear feeds other linears: chains, fan-out, residuals (plan level only)."""
import torch
import torch.nn.functional as F
from torch import nn

from segquant_compile.capture import capture_graphs
from segquant_compile.passes import build_plan, merge


def plan_of(model, *args, **kwargs):
    """The merged plan of every graph dynamo makes of `model(*args, **kwargs)`."""
    graphs = capture_graphs(model, args, kwargs)
    return merge([build_plan(gm, graph_index=i) for i, (gm, _) in enumerate(graphs)])


def plain(site) -> bool:
    return site.output_segments is None and site.input_segments is None and site.dualscale.sources == (None,)


X = torch.randn(2, 5, 32)


def test_sequential_chain():
    plan = plan_of(nn.Sequential(nn.Linear(32, 32), nn.Linear(32, 32), nn.Linear(32, 16)), X)
    assert [s.name for s in plan] == ["0", "1", "2"]
    assert plan["1"].input_node == plan["0"].node and plan["2"].input_node == plan["1"].node
    assert all(plain(s) for s in plan)
    assert plan.float_calls == ()


def test_chain_through_activation_is_dualscale():
    plan = plan_of(nn.Sequential(nn.Linear(32, 64), nn.SiLU(), nn.Linear(64, 32), nn.GELU(), nn.Linear(32, 8)), X)
    assert [s.name for s in plan] == ["0", "2", "4"]
    assert [s.dualscale.sources for s in plan] == [(None,), ("silu",), ("gelu",)]
    assert plan["2"].input_node != plan["0"].node      # the activation stands in between


class FanOut(nn.Module):
    def __init__(self, chunked: bool):
        super().__init__()
        self.chunked = chunked
        self.src = nn.Linear(32, 48 if chunked else 32)
        self.a, self.b, self.c = (nn.Linear(16 if chunked else 32, 8) for _ in range(3))

    def forward(self, x):
        y = self.src(x)
        parts = y.chunk(3, -1) if self.chunked else (y, y, y)
        return self.a(parts[0]) + self.b(parts[1]) + self.c(parts[2])


def test_fan_out_of_the_whole_output_is_no_segmentation():
    plan = plan_of(FanOut(chunked=False), X)
    assert len(plan) == 4
    assert plan["src"].output_segments is None
    assert {plan[n].input_node for n in "abc"} == {plan["src"].node}
    assert all(plain(plan[n]) for n in "abc")


def test_fan_out_of_chunks_segments_the_producer_only():
    plan = plan_of(FanOut(chunked=True), X)
    seg = plan["src"].output_segments
    assert seg.sizes == (16, 16, 16) and seg.pattern == "chunk"
    assert all(plan[n].in_features == 16 and plain(plan[n]) for n in "abc")


class Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(32, 32)
        self.lin = nn.Linear(32, 32)

    def forward(self, x):
        h = self.inp(x)
        h = h + self.lin(h)           # the producer also feeds the residual
        return h + self.lin(F.silu(h))  # the same module again, after SiLU


def test_residual_and_reused_module():
    plan = plan_of(Residual(), X)
    assert [s.name for s in plan] == ["inp", "lin", "lin#2"]
    assert plan["lin"].input_node == plan["inp"].node
    assert plan["inp"].output_segments is None      # the residual add is no piecewise use
    assert plan["lin"].weight == plan["lin#2"].weight == "lin.weight"
    assert plan["lin"].dualscale.sources == (None,)
    assert plan["lin#2"].dualscale.sources == ("silu",)


def test_cat_of_two_linears_feeds_a_segmented_linear():
    class Cat(nn.Module):
        def __init__(self):
            super().__init__()
            self.p, self.q, self.out = nn.Linear(32, 16), nn.Linear(32, 24), nn.Linear(40, 8)

        def forward(self, x):
            return self.out(torch.cat([self.p(x), F.gelu(self.q(x))], -1))

    plan = plan_of(Cat(), X)
    seg = plan["out"].input_segments
    assert seg.sizes == (16, 24) and seg.pattern == "cat"
    assert plan["out"].dualscale.sources == (None, "gelu")
    assert plan["p"].output_segments is None and plan["q"].output_segments is None


def test_plan_does_not_depend_on_the_batch_size():
    """x + table: a (1, T, D) table is full-size at batch 1 and broadcast at batch 2; a
    segmentation seen through only one operand of a sum is none (PixArt's attn2.to_q)."""
    from conftest import tiny_inputs, tiny_pixart

    import segquant_compile as sq
    model = tiny_pixart()
    plans = []
    for batch in (1, 2):
        report = sq.explain(model, **tiny_inputs(model, batch=batch))
        plans.append({s.name: (s.input_segments and s.input_segments.sizes,
                               s.output_segments and s.output_segments.sizes) for s in report.sites})
    assert plans[0] == plans[1]
    assert plans[0]["transformer_blocks.0.attn2.to_q"] == (None, None)
