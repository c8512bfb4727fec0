"""Symbolic sizes under dynamic shapes: resolved with sympy, or left unsegmented with a reason."""
import torch
from torch import nn

from segquant_compile.capture import capture_graphs
from segquant_compile.passes import build_plan


class Heads(nn.Module):
    def __init__(self):
        super().__init__()
        self.ada = nn.Linear(8, 24)
        self.out = nn.Linear(8, 8)

    def forward(self, x):
        b, s, _ = x.shape
        shift, scale, gate = self.ada(x.mean(1)).chunk(3, dim=1)
        h = x * (1 + scale[:, None]) + shift[:, None]
        h = h.view(b, s, 2, 4).transpose(1, 2).softmax(-1).transpose(1, 2).reshape(b, s, 8)
        return self.out(h) * gate[:, None]


def test_dynamic_batch_and_tokens():
    m = Heads()
    x = torch.randn(3, 7, 8)
    torch._dynamo.mark_dynamic(x, 0)
    torch._dynamo.mark_dynamic(x, 1)
    (gm, _), = capture_graphs(m, (x,), {}, dynamic=True)
    shapes = [n.meta["example_value"].shape for n in gm.graph.nodes if n.op == "placeholder"
              and isinstance(n.meta.get("example_value"), torch.Tensor)]
    assert any(isinstance(s[0], torch.SymInt) for s in shapes)  # the trace really is symbolic
    plan = build_plan(gm)
    assert plan["ada"].output_segments.sizes == (8, 8, 8)
    assert plan["out"].input_segments.sizes == (4, 4)


class SymSplit(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(8, 16)

    def forward(self, x):
        n = x.shape[1]
        a, b = torch.split(self.lin(x), [n, 16 - n], dim=-1)
        return a.sum() + b.sum()


def test_symbolic_split_is_not_segmented():
    x = torch.randn(2, 5, 8)
    torch._dynamo.mark_dynamic(x, 1, min=2, max=10)
    (gm, _), = capture_graphs(SymSplit(), (x,), {}, dynamic=True)
    site = build_plan(gm)["lin"]
    assert site.output_segments is None
    assert any("symbolic" in n for n in site.notes)


class JointSlice(nn.Module):
    """SD3's joint attention: tokens sliced at a symbolic length before the head-merged to_out."""

    def __init__(self):
        super().__init__()
        self.to_out = nn.Linear(8, 8)

    def forward(self, x, ctx):
        b, s, _ = x.shape
        joint = torch.cat([x, ctx], dim=1).view(b, -1, 2, 4).transpose(1, 2).softmax(-1)
        joint = joint.transpose(1, 2).reshape(b, -1, 8)
        return self.to_out(joint[:, : x.shape[1]])


def test_symbolic_token_slice_before_head_merge():
    x, ctx = torch.randn(2, 6, 8), torch.randn(2, 3, 8)
    torch._dynamo.mark_dynamic(x, 1)
    (gm, _), = capture_graphs(JointSlice(), (x, ctx), {}, dynamic=True)
    assert build_plan(gm)["to_out"].input_segments.sizes == (4, 4)
