"""Which sites run how: thin sites (K < min_k) stay float and say so; activation groups give a
per-token step to each group of K columns, never across a segment."""
import pytest
import torch
from torch import nn

import segquant_compile as sq
from segquant_compile.lowering.quantize import sqnr_db
from segquant_compile.passes.site_rules import split_segments


class Embed(nn.Module):
    """A K=16 patch embedding, then a K=64 linear: the thin site stays float by default."""

    def __init__(self):
        super().__init__()
        self.embed, self.proj = nn.Linear(16, 64), nn.Linear(64, 32)

    def forward(self, x):
        return self.proj(torch.relu(self.embed(x)))


@pytest.mark.real_defaults
def test_thin_sites_stay_float_by_default_and_are_named():
    assert sq.QuantConfig().min_k == 64
    torch.manual_seed(0)
    m = Embed()
    x = torch.randn(4, 16)
    c = torch.compile(m, backend="segquant")
    with torch.no_grad():
        c(x)
    r = sq.report(c)
    assert set(r.states) == {"proj"}
    assert "K=16 < min_k=64" in r.fallbacks["embed"] and "min_k" in str(r)
    torch._dynamo.reset()
    every = torch.compile(m, backend="segquant", options={"min_k": 0})
    with torch.no_grad():
        every(x)
    assert set(sq.report(every).states) == {"embed", "proj"}
    torch._dynamo.reset()   # a `formats` entry naming the site is an explicit choice: it wins
    named = torch.compile(m, backend="segquant", options={"formats": {"embed": "int8"}})
    with torch.no_grad():
        named(x)
    assert set(sq.report(named).states) == {"embed", "proj"}


@pytest.mark.parametrize("bad", [-1, True, 1.5, "64"])
def test_min_k_refuses_bad_values(bad):
    with pytest.raises(ValueError, match="min_k"):
        sq.resolve_options({"min_k": bad})


@pytest.mark.parametrize("bad", [24, 32.0, 0, True, "32"])
def test_activation_group_size_refuses_bad_values(bad):
    with pytest.raises(ValueError, match="activation_group_size"):
        sq.resolve_options({"activation_group_size": bad})


def test_split_segments_never_straddles_a_segment():
    bounds, sources = split_segments((0, 48, 96, 100), ("silu", None, "gelu"), 32)
    assert bounds == (0, 32, 48, 80, 96, 100)
    assert sources == ("silu", "silu", None, None, "gelu")


def per_group_reference(x, w, b, bounds):
    """Symmetric per-token steps per K group (absmax / 127) and per-channel weight steps."""
    xq = torch.empty_like(x)
    for a, e in zip(bounds[:-1], bounds[1:]):
        d = (x[:, a:e].abs().amax(dim=1, keepdim=True) / 127).clamp(min=1e-12)
        xq[:, a:e] = torch.round(x[:, a:e] / d) * d
    dw = w.abs().amax(dim=1, keepdim=True) / 127
    return xq @ (torch.round(w / dw) * dw).t() + b


def test_activation_groups_compute_per_group_steps_and_help_on_outlier_groups():
    torch.manual_seed(0)
    lin = nn.Linear(96, 32)
    x = torch.randn(64, 96)
    x[:, :32] *= 30   # one group of channels much larger: one step per token wastes the rest
    opts = {"dualscale": False, "min_k": 0}
    with torch.no_grad():
        ref = lin(x)
        plain = torch.compile(lin, backend="segquant", options=opts)
        y_plain = plain(x)
        torch._dynamo.reset()
        grouped = torch.compile(lin, backend="segquant", options={**opts, "activation_group_size": 32})
        y = grouped(x)
    lo = next(iter(sq.report(grouped).states.values())).lowering
    assert lo.k_bounds == (0, 32, 64, 96) and lo.act_groups == 32
    assert "activation groups of 32 (3 steps per token)" in lo.describe()
    assert torch.allclose(y, per_group_reference(x, lin.weight, lin.bias, lo.k_bounds), rtol=1e-4, atol=1e-4)
    assert sqnr_db(ref, y) > sqnr_db(ref, y_plain) + 3


def test_activation_groups_save_and_load_bit_identical(tmp_path):
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 64))
    opts = {"activations": "static", "activation_group_size": 32, "inductor": False}
    c = torch.compile(m, backend="segquant", options=opts)
    x = torch.randn(8, 64)
    with torch.no_grad():
        with sq.calibrate(c, progress=False):
            for s in range(3):
                c(torch.randn(16, 64, generator=torch.Generator().manual_seed(s)))
        before = c(x)
    assert sq.report(c).states["2"].lowering.k_bounds == (0, 32, 64, 96, 128)
    sq.save(c, tmp_path / "q")
    torch._dynamo.reset()
    c2 = torch.compile(m, backend="segquant", options={**opts, "load": str(tmp_path / "q")})
    with torch.no_grad():
        assert torch.equal(c2(x), before)


def test_conv_sites_keep_one_step_per_segment():
    """A conv's K segments must cut at channel boundaries: activation groups are not applied."""
    torch.manual_seed(0)
    m = nn.Conv2d(8, 8, 3)   # K = 72
    c = torch.compile(m, backend="segquant", options={"activation_group_size": 32})
    with torch.no_grad():
        c(torch.randn(1, 8, 6, 6))
    lo = next(iter(sq.report(c).states.values())).lowering
    assert lo.k_bounds == (0, 72) and lo.act_groups is None
