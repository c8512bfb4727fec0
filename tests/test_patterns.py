"""SegLinear and DualScale rules on small hand-written modules (DESIGN.md table)."""
import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from segquant_compile import explain


class Fn(nn.Module):
    """A linear `lin` (K -> N) around a forward given as a function of (self, x)."""

    def __init__(self, fn, k=8, n=12, extra=()):
        super().__init__()
        self.fn = fn
        self.lin = nn.Linear(k, n)
        for name, (a, b) in dict(extra).items():
            setattr(self, name, nn.Linear(a, b))

    def forward(self, x):
        return self.fn(self, x)


def plan_of(fn, x, k=8, n=12, extra=(), options=None, **kw):
    report = explain(Fn(fn, k, n, extra), x, options=options)
    return report.plan["lin"], report


X3 = torch.randn(2, 5, 8)


# ------------------------------------------------------------------ output segments
@pytest.mark.parametrize("fn,sizes,pattern", [
    (lambda m, x: m.lin(x).chunk(3, -1), (4, 4, 4), "chunk"),
    (lambda m, x: torch.chunk(m.lin(x), 3, dim=2), (4, 4, 4), "chunk"),
    (lambda m, x: m.lin(x).split(4, dim=-1), (4, 4, 4), "split"),
    (lambda m, x: torch.split(m.lin(x), [2, 6, 4], -1), (2, 6, 4), "split"),
    (lambda m, x: m.lin(x).view(2, 5, 3, 4).unbind(2), (4, 4, 4), "unbind"),
    (lambda m, x: m.lin(x).reshape(2, 5, 3, 4).unbind(dim=-2), (4, 4, 4), "unbind"),
    (lambda m, x: (m.lin(x)[..., :5] * 2, m.lin(x)[..., 5:]), (5, 7), "slice"),
    (lambda m, x: m.lin(x)[:, :, 3:9].sum(), (3, 6, 3), "slice"),
    (lambda m, x: m.lin(x).reshape(2, 5, 3, 4)[:, :, 1], (4, 4, 4), "slice"),
    (lambda m, x: m.lin(x).narrow(-1, 0, 6), (6, 6), "narrow"),
    # transparent ops in between: cast, unsqueeze, per-channel table, permute of other dims
    (lambda m, x: (m.lin(x).float().unsqueeze(1) + torch.ones(12)).transpose(1, 2).chunk(2, dim=-1), (6, 6), "chunk"),
    # PixArt: reshape to (B, k, d), add a (1, k, d) table, chunk on the k dim
    (lambda m, x: (torch.ones(1, 6, 2) + m.lin(x[:, 0]).reshape(2, 6, -1)).chunk(6, dim=1), (2,) * 6, "chunk"),
])
def test_output_segments(fn, sizes, pattern):
    site, _ = plan_of(fn, X3)
    assert site.output_segments is not None
    assert site.output_segments.sizes == sizes
    assert site.output_segments.pattern == pattern
    assert site.input_segments is None


# ------------------------------------------------------------------ input segments
@pytest.mark.parametrize("fn,x,k,sizes,pattern", [
    (lambda m, x: m.lin(torch.cat([x, x[..., :3]], dim=-1)), torch.randn(2, 5, 5), 8, (5, 3), "cat"),
    (lambda m, x: m.lin(torch.cat((x.sin(), x.cos()), 2).contiguous()), torch.randn(2, 5, 4), 8, (4, 4), "cat"),
    (lambda m, x: m.lin(torch.stack([x, x * 2], dim=-2).flatten(-2)), torch.randn(2, 5, 4), 8, (4, 4), "stack"),
    # head merge (B, S, H, D) -> (B, S, H*D)
    (lambda m, x: m.lin(x.reshape(2, 5, 4, 2).softmax(-1).reshape(2, 5, 8)), X3, 8, (2, 2, 2, 2), "head_merge"),
    (lambda m, x: m.lin(x.view(2, 5, 2, 4).flatten(2, 3)), X3, 8, (4, 4), "head_merge"),
    # heads first, transposed back, merged (the attention processors' layout)
    (lambda m, x: m.lin(x.view(2, 5, 2, 4).transpose(1, 2).exp().transpose(1, 2).reshape(2, 5, 8)), X3, 8,
     (4, 4), "head_merge"),
    # channel-first head merge followed by a transpose: (B, H, D, S) -> (B, H*D, S) -> (B, S, H*D)
    (lambda m, x: m.lin(x.view(2, 5, 2, 4).permute(0, 2, 3, 1).reshape(2, 8, 5).transpose(1, 2)), X3, 8,
     (4, 4), "head_merge"),
    # heads folded into the batch, merged channel-first: (B*H, D, S) -> (B, H*D, S) (ADM's QKVAttention)
    (lambda m, x: m.lin(x.view(2, 5, 2, 4).permute(0, 2, 3, 1).reshape(4, 4, 5).exp().reshape(2, 8, 5)
                        .transpose(1, 2)), X3, 8, (4, 4), "head_merge"),
    # the token split before the projection (FLUX) is transparent
    (lambda m, x: m.lin(torch.split(x.view(2, 5, 2, 4).flatten(2, 3), [2, 3], dim=1)[1]), X3, 8, (4, 4),
     "head_merge"),
])
def test_input_segments(fn, x, k, sizes, pattern):
    site, _ = plan_of(fn, x, k=k)
    assert site.input_segments is not None
    assert site.input_segments.sizes == sizes
    assert site.input_segments.pattern == pattern
    assert site.output_segments is None


# ------------------------------------------------------------------ DualScale
@pytest.mark.parametrize("fn,expected", [
    (lambda m, x: m.lin(F.silu(x)), ("silu",)),
    (lambda m, x: m.lin(nn.SiLU()(x)), ("silu",)),
    (lambda m, x: m.lin(F.gelu(x)), ("gelu",)),
    (lambda m, x: m.lin(F.gelu(x, approximate="tanh")), ("gelu(approximate='tanh')",)),
    (lambda m, x: m.lin(F.dropout(F.silu(x).to(torch.float32), 0.0).contiguous()), ("silu",)),
    (lambda m, x: m.lin(F.silu(x) * 0.5), ("silu",)),
    (lambda m, x: m.lin(F.relu(x)), (None,)),                       # ReLU is not in the default set
    (lambda m, x: m.lin(F.mish(x)), (None,)),
])
def test_dualscale(fn, expected):
    site, _ = plan_of(fn, X3)
    assert site.dualscale.sources == expected


def test_dualscale_activation_named_in_config():
    site, _ = plan_of(lambda m, x: m.lin(F.mish(x)), X3,
                      options={"dualscale_activations": ["silu", "gelu", "mish"]})
    assert site.dualscale.sources == ("mish",)
    site, _ = plan_of(lambda m, x: m.lin(F.silu(x)), X3, options={"dualscale": False})
    assert site.dualscale.sources == (None,)


def test_dualscale_per_input_segment():
    site, _ = plan_of(lambda m, x: m.lin(torch.cat([x[..., :3], F.gelu(x[..., 3:])], -1)), X3)
    assert site.input_segments.sizes == (3, 5)
    assert site.dualscale.sources == (None, "gelu")


# ------------------------------------------------------------------ negatives
@pytest.mark.parametrize("fn", [
    lambda m, x: m.lin(x).chunk(5, dim=1),                 # chunk along tokens, not channels
    lambda m, x: torch.split(m.lin(x), 1, dim=0),          # batch split
    lambda m, x: m.lin(x)[:, 1:3],                         # token slice
    lambda m, x: m.lin(x).softmax(-1).chunk(2, -1),        # softmax mixes the channels first
    lambda m, x: m.lin(x).reshape(2, 5, 3, 4).transpose(1, 2).sum(),   # split but no piecewise use
    lambda m, x: m.lin(x).reshape(2, 5, 3, 4)[..., :2],    # slicing inside every part: interleaved
])
def test_no_output_segments(fn):
    site, _ = plan_of(fn, X3)
    assert site.output_segments is None


@pytest.mark.parametrize("fn,x", [
    (lambda m, x: (m.lin(x), torch.cat([x, x], -1)), X3),              # a cat that doesn't reach the linear
    (lambda m, x: m.lin(torch.cat([x, x], dim=1)), X3),                # cat along tokens
    (lambda m, x: m.lin(F.layer_norm(torch.cat([x[..., :4], x[..., 4:]], -1), (8,))), X3),  # norm mixes
    (lambda m, x: m.lin(x.reshape(2, 5, 8)), torch.randn(2, 5, 8)),    # reshape keeping the last dim
    (lambda m, x: m.lin(x.permute(0, 2, 3, 1).reshape(2, 4, 8)), torch.randn(2, 8, 2, 2)),  # patchify keeps C
    # (B*H, S, D) -> (B, S, H*D): the tokens sit between the folded heads and the width, no head merge
    (lambda m, x: m.lin(x.view(2, 5, 2, 4).permute(0, 2, 1, 3).reshape(4, 5, 4).exp().reshape(2, 5, 8)), X3),
])
def test_no_input_segments(fn, x):
    site, _ = plan_of(fn, x)
    assert site.input_segments is None


@pytest.mark.parametrize("fn", [
    lambda m, x: m.lin(F.layer_norm(F.silu(x), (8,))),     # a norm between activation and linear
    lambda m, x: m.lin(F.silu(x) * x),                     # GEGLU-like product
    lambda m, x: m.lin(F.silu(x) + 1.0),                   # shifted: no longer a narrow negative range
    lambda m, x: m.lin(F.silu(x) * -2.0),                  # negative scaling flips the sign pattern
    lambda m, x: m.lin(F.silu(x).softmax(-1)),
])
def test_no_dualscale(fn):
    site, _ = plan_of(fn, X3)
    assert site.dualscale.sources == (None,)


def test_seglinear_off():
    site, _ = plan_of(lambda m, x: m.lin(x).chunk(3, -1), X3, options={"seglinear": False})
    assert site.output_segments is None


# ------------------------------------------------------------------ generated
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(sizes=st.lists(st.integers(1, 6), min_size=1, max_size=5),
       ndim=st.integers(2, 4),
       op=st.sampled_from(["split_list", "tensor_split", "chunk_fn", "chunk_method", "split_int"]),
       negative=st.booleans(), keyword=st.booleans())
def test_generated_output_splits(sizes, ndim, op, negative, keyword):
    n = sum(sizes)
    dim = -1 if negative else ndim - 1
    x = torch.randn(*([2] * (ndim - 1)), 8)

    def fn(m, x):
        y = m.lin(x)
        if op == "split_list":
            return torch.split(y, sizes, dim=dim) if keyword else torch.split(y, sizes, dim)
        if op == "tensor_split":
            return y.split(sizes, dim)
        if op == "chunk_fn":
            return torch.chunk(y, len(sizes), dim=dim) if keyword else torch.chunk(y, len(sizes), dim)
        if op == "chunk_method":
            return y.chunk(len(sizes), dim=dim) if keyword else y.chunk(len(sizes), dim)
        return y.split(sizes[0], dim=dim)

    site, _ = plan_of(fn, x, n=n)
    ref = {"split_list": sizes, "tensor_split": sizes,
           "chunk_fn": [t.numel() for t in torch.arange(n).chunk(len(sizes))],
           "chunk_method": [t.numel() for t in torch.arange(n).chunk(len(sizes))],
           "split_int": [t.numel() for t in torch.arange(n).split(sizes[0])]}[op]
    expected = tuple(ref) if len(ref) > 1 else None
    got = site.output_segments.sizes if site.output_segments else None
    assert got == expected


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(widths=st.lists(st.integers(1, 6), min_size=2, max_size=4), other_dim=st.booleans())
def test_generated_input_cats(widths, other_dim):
    k = sum(widths)
    x = torch.randn(2, 3, k)

    def fn(m, x):
        pieces = torch.split(x, widths, -1)
        if other_dim:   # cat along tokens: the pieces must be equal width and it is no segmentation
            return m.lin(torch.cat([x, x], dim=1))
        return m.lin(torch.cat([p * (i + 1) for i, p in enumerate(pieces)], dim=-1))

    site, _ = plan_of(fn, x, k=k)
    if other_dim:
        assert site.input_segments is None
    else:
        assert site.input_segments.sizes == tuple(widths)


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(k=st.integers(2, 4), d=st.integers(2, 4), dim=st.sampled_from([0, 1]))
def test_generated_non_channel_splits(k, d, dim):
    x = torch.randn(4, 6, 8)
    site, _ = plan_of(lambda m, x: m.lin(x).chunk(2, dim=dim), x, n=k * d)
    assert site.output_segments is None
