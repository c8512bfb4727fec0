"""SVDQuant's low-rank branch (option `low_rank`): the split, the site's math beside the quantized
residual (linear and conv), the report, save/load and refusing a damaged branch."""
import pytest
import torch
import torch.nn.functional as F

import segquant_compile as sq
from segquant_compile.compiled import find
from segquant_compile.lowering import low_rank
from segquant_compile.lowering import quantize as Q
from segquant_compile.lowering.conv import quantized_conv2d
from segquant_compile.lowering.linear import quantized_linear
from segquant_compile.lowering.site_lowering import ConvGeometry


def outlier_weight(n, k, rank=2, seed=0):
    """A weight whose few large singular directions set every 4-bit step (what the branch is for)."""
    g = torch.Generator().manual_seed(seed)
    return 0.02 * torch.randn(n, k, generator=g) + torch.randn(n, rank, generator=g) @ torch.randn(rank, k, generator=g)


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a = torch.nn.Linear(128, 192)
        self.b = torch.nn.Linear(192, 96)
        with torch.no_grad():
            self.a.weight.copy_(outlier_weight(192, 128, seed=1))
            self.b.weight.copy_(outlier_weight(96, 192, seed=2) / 8)

    def forward(self, x):
        return self.b(F.gelu(self.a(x)))


@pytest.fixture(scope="module")
def net():
    torch.manual_seed(0)
    return Net().eval().requires_grad_(False)


def compiled(model, **options):
    torch._dynamo.reset()
    return torch.compile(model, backend="segquant", options={"inductor": False, **options})


def inputs(batch, seed):
    return torch.randn(batch, 8, 128, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("smoothed", [False, True])
def test_split_is_exact_and_the_branch_reads_the_raw_input(smoothed):
    w = outlier_weight(48, 64)
    smooth = torch.rand(64) + 0.5 if smoothed else None
    ws = w * smooth if smoothed else w
    residual, l1, l2 = low_rank.split(ws, 8, smooth, torch.float32)
    assert l1.shape == (64, 8) and l2.shape == (8, 48)
    x = torch.randn(5, 64)
    xs = x / smooth if smoothed else x
    # residual on the smoothed input + branch on the raw input = the float site
    torch.testing.assert_close(xs @ residual.t() + low_rank.apply(x, l1, l2), x @ w.t(), rtol=1e-4, atol=1e-4)
    # the branch takes the largest directions: what is left is small
    assert residual.norm() < 0.1 * ws.norm()


def test_site_rank_is_capped_at_half_the_smaller_side():
    assert low_rank.site_rank(32, 128, 512) == 32
    assert low_rank.site_rank(32, 40, 512) == 20
    assert low_rank.site_rank(None, 128, 128) is None
    assert low_rank.site_rank(4, 1, 64) is None


def test_linear_site_adds_the_branch_beside_the_quantized_gemm():
    """quantized_linear with (l1, l2) is the same call without them plus (x @ l1) @ l2."""
    from segquant_compile.lowering.ops import column_sums  # noqa: F401  (registers the ops)
    from segquant_compile.lowering.site_lowering import SiteLowering
    from segquant_compile.lowering.formats import Format, Scheme
    lo = SiteLowering(Format.INT8, "dynamic", "per-channel", (0, 64), (Scheme.SYMMETRIC,), None)
    w = outlier_weight(32, 64)
    residual, l1, l2 = low_rank.split(w, 4, None, torch.float32)
    packed, d_w, _ = Q.pack_weight(residual, lo)
    x = torch.randn(3, 7, 64)
    args = (x, packed, d_w, None, None, None, None, None, None, lo.k_bounds, lo.codes)
    with_branch = quantized_linear(*args, l1=l1, l2=l2)
    torch.testing.assert_close(with_branch, quantized_linear(*args) + (x @ l1) @ l2)


def test_conv_site_adds_the_branch_as_two_convolutions():
    g = ConvGeometry(8, (3, 3), (1, 1), (1, 1))
    from segquant_compile.lowering.site_lowering import SiteLowering
    from segquant_compile.lowering.formats import Format, Scheme
    lo = SiteLowering(Format.INT8, "dynamic", "per-channel", (0, 72), (Scheme.SYMMETRIC,), None, conv=g)
    w = outlier_weight(16, 72)
    residual, l1, l2 = low_rank.split(w, 4, None, torch.float32)
    packed, d_w, _ = Q.pack_weight(residual, lo)
    x = torch.randn(2, 8, 6, 6)
    args = (x, packed, d_w, None, None, None, None, None, None, lo.k_bounds, lo.codes)
    got = quantized_conv2d(*args, conv=g, l1=l1, l2=l2)
    branch = F.conv2d(x, (l1 @ l2).t().reshape(16, 8, 3, 3), padding=1)
    torch.testing.assert_close(got, quantized_conv2d(*args, conv=g) + branch, rtol=1e-5, atol=1e-5)


def test_the_branch_recovers_weights_whose_outliers_set_the_4bit_steps(net):
    x = inputs(4, 3)
    ref = net(x)
    plain = Q.sqnr_db(ref, compiled(net, format="w4a8", weight_rounding="rtn")(x))
    c = compiled(net, format="w4a8", weight_rounding="rtn", low_rank=8)
    branched = Q.sqnr_db(ref, c(x))
    assert branched > plain + 6, (plain, branched)
    states = {st.name: st for st in find(c).quant_states}
    assert states["a"].l1.shape == (128, 8) and states["a"].l2.shape == (8, 192)
    assert states["a"].lowering.low_rank == 8


def test_report_gives_the_rank_and_the_branch_share_and_counts_its_bytes(net):
    c = compiled(net, format="w4a8", weight_rounding="rtn", low_rank=8)
    c(inputs(2, 1))
    report = sq.report(c)
    row = {r["site"]: r for r in report.rows()}["a"]["quant"]
    assert row["low_rank"]["rank"] == 8
    assert row["low_rank"]["flops_share"] == pytest.approx(8 * (128 + 192) / (128 * 192 + 8 * (128 + 192)), abs=1e-4)
    assert 0 < row["low_rank"]["bytes_share"] < 1
    # 4-bit weights plus 32-bit factors of 8 x (K + N) per site (this float32 model's dtype)
    numel = 128 * 192 + 192 * 96
    want = (4 * numel + 32 * 8 * (128 + 192 + 192 + 96)) / numel
    assert report.totals()["average_weight_bits"] == pytest.approx(want, abs=1e-3)
    assert "low-rank 8" in str(report)


def test_rank_capped_on_a_thin_site_is_said_in_the_report():
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(64, 40)).eval().requires_grad_(False)
    c = compiled(m, low_rank=32, min_k=0)
    c(torch.randn(3, 64))
    st = find(c).quant_states[0]
    assert st.lowering.low_rank == 20 and st.l1.shape == (64, 20)
    assert any("rank 20 here" in r for r in st.lowering.reasons)


def test_static_gptq_with_the_branch_saves_and_loads_bit_identically(net, tmp_path):
    options = dict(format="w4a8", activations="static", weight_rounding="gptq", low_rank=8)
    c = compiled(net, **options)
    with sq.calibrate(c, progress=False):
        for seed in range(2):
            c(inputs(16, 20 + seed))
    x = inputs(3, 9)
    want = c(x)
    saved = {st.name: st for st in find(c).quant_states}
    sq.save(c, tmp_path / "q")
    loaded = compiled(net, load=str(tmp_path / "q"))
    assert torch.equal(loaded(x), want)
    for st in find(loaded).quant_states:
        for f in ("packed", "l1", "l2", "d_pos"):
            assert torch.equal(getattr(st, f), getattr(saved[st.name], f)), f


def test_a_damaged_branch_is_refused_on_load(net, tmp_path):
    from safetensors.torch import load_file, save_file
    c = compiled(net, low_rank=8, weight_rounding="rtn")
    c(inputs(2, 1))
    sq.save(c, tmp_path / "q")
    tensors = load_file(str(tmp_path / "q" / "tensors.safetensors"))
    tensors["a.l1"][0, 0] = float("nan")
    save_file(tensors, str(tmp_path / "q" / "tensors.safetensors"))
    with pytest.raises(torch._dynamo.exc.BackendCompilerFailed, match="a.l1. is not finite"):
        compiled(net, load=str(tmp_path / "q"))(inputs(2, 1))


def test_a_nonfinite_input_row_stays_nonfinite_through_the_branch(net):
    c = compiled(net, low_rank=8, weight_rounding="rtn")
    x = inputs(2, 1)
    x[0, 3, 5] = float("nan")
    out = c(x)
    assert torch.isnan(out[0, 3]).all() and torch.isfinite(out[1]).all()


def test_low_rank_option_is_checked():
    with pytest.raises(ValueError, match="low_rank"):
        sq.resolve_options({"low_rank": 0})


def test_a_format_entry_carries_its_own_rank(net):
    c = compiled(net, formats={"a": "w4a8+r8", "b": "w4a8"}, weight_rounding="rtn")
    c(inputs(2, 1))
    st = {s.name: s for s in find(c).quant_states}
    assert st["a"].lowering.low_rank == 8 and st["a"].l1.shape == (128, 8)
    assert st["b"].lowering.low_rank is None and st["b"].l1 is None


@pytest.mark.parametrize("name", ["w4a8+r0", "w4a8+r", "w3a8+r8", "w4a8+8"])
def test_a_bad_format_variant_is_named(name):
    with pytest.raises(ValueError, match=r"formats\['a'\].*'w4a8\+r32'"):
        sq.resolve_options({"formats": {"a": name}})


def test_sensitivity_measures_variants_and_allocation_counts_the_branch_bits(net):
    from segquant_compile.allocation import allocate
    calls = [(inputs(2, s),) for s in range(2)]
    sens = sq.sensitivity(net, calls, formats=("w4a8", "w4a8+r8"), options={"weight_rounding": "rtn"},
                          progress=False)
    by = {s.name: s for s in sens.sites}
    assert by["a"].error["w4a8+r8"] < by["a"].error["w4a8"] / 4   # the branch takes the planted outliers
    numel = 128 * 192 + 192 * 96
    branch = 16 * 8 * (128 + 192 + 192 + 96)
    # every site with the branch costs 4 bits per element plus its branch: feasible only from there
    alloc = allocate(sens, weight_bits=(4 * numel + branch) / numel + 1e-9)
    assert set(alloc.formats.values()) <= {"w4a8+r8", "w4a8", "float"}
    assert alloc.average_bits == pytest.approx(sum(
        (4 * s.weight_numel + (16 * 8 * (s.in_features + s.out_features) if f == "w4a8+r8" else 0)) if f != "float"
        else 16 * s.weight_numel for s, f in ((by[n], f) for n, f in alloc.formats.items())) / numel)
    assert alloc.formats == {"a": "w4a8+r8", "b": "w4a8+r8"}


@pytest.mark.parametrize("activations", ["dynamic", "static"])
def test_a_compiled_conv_site_runs_its_branch(activations):
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Conv2d(16, 32, 3, padding=1), torch.nn.SiLU(),
                            torch.nn.Conv2d(32, 32, 1)).eval().requires_grad_(False)
    with torch.no_grad():
        m[0].weight.copy_(outlier_weight(32, 144, seed=3).reshape(32, 16, 3, 3))
    x = torch.randn(2, 16, 8, 8)
    scores = {}
    for rank in (None, 4):
        c = compiled(m, low_rank=rank, activations=activations, weight_rounding="rtn")
        if activations == "static":
            with sq.calibrate(c, progress=False):
                c(torch.randn(4, 16, 8, 8))
        scores[rank] = Q.sqnr_db(m(x), c(x))
    st = {s.name: s for s in find(c).quant_states}
    assert st["0"].l1.shape == (144, 4) and st["0"].lowering.conv is not None
    assert scores[4] > scores[None] + 3, scores


def test_an_edited_weight_gets_a_new_branch():
    torch.manual_seed(0)
    m = Net().eval().requires_grad_(False)
    c = compiled(m, format="w4a8", weight_rounding="rtn", low_rank=8)
    x = inputs(2, 1)
    c(x)
    with torch.no_grad():
        m.a.weight.copy_(outlier_weight(192, 128, seed=11))
    got = c(x)
    fresh = compiled(m, format="w4a8", weight_rounding="rtn", low_rank=8)(x)
    assert torch.equal(got, fresh)
