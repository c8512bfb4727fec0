"""The real terrain UNet from ../shared/data/terrain_unet (guided-diffusion UNet, one-step EDM
consistency model): rebuilt, sampled in float, and planned. Every plan fact here is read off the
graph by the planner, on a model nobody adapted to it."""
import re

import pytest
import torch

from conftest import MIN_K
from segquant_compile import explain
from segquant_compile.examples import terrain_unet as tu

pytestmark = pytest.mark.real_defaults   # the real models run with the shipped defaults


@pytest.fixture(scope="module")
def unet(shared_data):
    path = tu.weights_path()
    if not path.exists():
        pytest.skip(f"{path} not found (see ../shared/data/README.md)")
    return tu.load_unet(path)


def test_loads_strictly_with_the_spec_counts(unet):
    from safetensors.torch import load_file
    assert set(unet.state_dict()) == set(load_file(str(tu.weights_path())))   # load_unet is strict
    assert sum(p.numel() for p in unet.parameters()) == 10_456_545
    convs = [m for m in unet.modules() if isinstance(m, torch.nn.Conv2d)]
    assert len(convs) == 196 and sum(m.kernel_size == (3, 3) for m in convs) == 112
    assert sum(isinstance(m, torch.nn.Linear) for m in unet.modules()) == 59
    assert sum(isinstance(m, torch.nn.GroupNorm) for m in unet.modules()) == 139
    assert sum(isinstance(m, tu.AttentionBlock) for m in unet.modules()) == 28


def test_sigma_embedding_and_preconditioning_match_the_spec():
    bits = [1065353216, 1058010522, 1050798235, 1043732614, 1036831948, 1030116802, 1023510242, 1016180026,
            1008981769, 1001931930, 995049011, 988353833, 981668462, 974350868, 967166817, 960132946]
    assert tu.sigma_frequencies().view(torch.int32).tolist() == bits       # README section 3, bit for bit
    seen = {}

    def net(x, c_noise, d01):
        seen.update(c_in=float(x[0, 0, 0, 0]), c_noise=float(c_noise[0]))
        return torch.ones_like(x)
    d = tu.denoise(net, torch.ones(1, 1, 16, 16), torch.tensor([80.0]), torch.zeros(1))
    assert seen["c_in"] == pytest.approx(0.0124998, abs=1e-7)              # README section 2, sigma 80
    assert seen["c_noise"] == pytest.approx(1095.507, abs=1e-3)
    assert float(d[0, 0, 0, 0]) == pytest.approx(0.4999777 + 3.906e-5, abs=1e-6)   # c_out + c_skip
    assert tu.variation_sigma(0.5) == pytest.approx(0.4)
    assert tu.denoise(net, torch.full((1, 1, 16, 16), 3.0), torch.tensor([0.002]), torch.zeros(1)).max() == 1


# Float facts measured once (torch 2.13 CPU, 1 and 2 threads agree to ~1e-6):
# `python -c "from segquant_compile.examples import terrain_unet as tu; m, d = tu.generate(tu.load_unet(), 2, seed=0,
# difficulty=[1, 100]); print([(float(x.min()), float(x.max()), float(x.mean()), float(x.std())) for x in m])"`
ONE_STEP = {1: (-0.833014, -0.077242, -0.291578, 0.103146), 100: (-0.786441, 0.702374, 0.378554, 0.237732)}


@pytest.fixture(scope="module")
def one_step(unet):
    return tu.generate(unet, count=2, seed=0, difficulty=[1, 100])


def test_one_step_sample_float_facts(unet, one_step):
    maps, d = one_step
    assert maps.shape == (2, 1, 128, 128) and maps.dtype == torch.float32 and d.tolist() == [1, 100]
    for x, di in zip(maps, d):
        facts = (x.min(), x.max(), x.mean(), x.std())
        assert [float(f) for f in facts] == pytest.approx(ONE_STEP[int(di)], abs=1e-3)
    # the difficulty label does what it says: difficulty 100 is far taller than difficulty 1
    peak = tu.model_to_heights(maps).amax(dim=(-2, -1)).flatten()
    assert peak[0] < 1.0 < 5.0 < peak[1] < tu.H_MAX
    # deterministic for a seed: the same seed draws the same noise (the first map's does not depend
    # on the batch it is drawn in), and the network adds no randomness
    first, _ = tu.generate(unet, count=1, seed=0, difficulty=1)
    assert torch.equal(first, tu.generate(unet, count=1, seed=0, difficulty=1)[0])
    torch.testing.assert_close(first[0], maps[0], atol=1e-5, rtol=0)     # batch 1 vs 2: ~2e-6 apart


def test_variation_sampler(unet, one_step):
    source = tu.model_to_heights(one_step[0][1:])             # the difficulty-100 map, in metres
    assert tu.vary(unet, source, strength=0)[0].equal(tu.heights_to_model(source))
    var, d = tu.vary(unet, source, strength=0.5, seed=1, difficulty=100)     # sigma 0.4
    src = tu.heights_to_model(source)
    assert var.shape == (1, 1, 128, 128) and d.tolist() == [100]
    assert -1 <= var.min() and var.max() <= 1
    rms = float((var - src).pow(2).mean().sqrt())
    assert 0.01 < rms < 0.4 * 0.5, f"a variation at sigma 0.4 should stay near its source, rms {rms:.3f}"


# ------------------------------------------------------------------ the plan

@pytest.fixture(scope="module")
def plan_report():
    """explain() on the meta device (no weights needed: the plan reads the graph only), at batch
    2: the heads fold into the batch dim (N*heads), unlike batch 1. min_k is the shipped default,
    given here because a module fixture runs before the `real_defaults` marker restores it."""
    model = tu.TerrainUNet().to("meta").eval()
    x, c_noise, d01 = torch.empty(2, 1, 128, 128), torch.empty(2), torch.empty(2)
    return explain(model, *(t.to("meta") for t in (x, c_noise, d01)), options={"min_k": MIN_K})


def sites(report, pattern):
    return [s for s in report.sites if re.fullmatch(pattern, s.name)]


def test_plan_counts(plan_report):
    t = plan_report.totals()
    assert t["sites"] == 59 + 196 and t["conv_sites"] == 196 and t["graphs"] == 1 and t["float_calls"] == 0
    # 55 emb_layers (scale | shift) + 28 qkv (q | k | v)
    assert t["output_segmented"] == 55 + 28
    # time_embed.0 (cos | sin) + 28 proj_out (heads) + 25 skip_connection + 19 in_layers.2 behind GroupNorm
    assert t["input_segmented"] == 1 + 28 + 25 + 19
    # 55 emb_layers + time_embed.2 + label_emb.2; 55 in_layers.2 + 55 out_layers.3 + out.2: all after SiLU
    assert t["dualscale"] == 57 + 111 and t["dualscale_partial"] == 0
    # the shipped min_k (64) keeps the narrow ones float: K = 1, 9 and 32
    assert set(plan_report.fallbacks) == {"label_emb.0", "time_embed.0", "input_blocks.0.0",
                                          "input_blocks.11.0.skip_connection"}


def test_attention_of_1x1_convs(plan_report):
    qkv, proj = sites(plan_report, r".*\.qkv"), sites(plan_report, r".*\.proj_out")
    assert len(qkv) == len(proj) == 28
    for s in qkv:                # the qkv conv's output is cut q | k | v after the (N, 3C, T) reshape
        c = s.out_features // 3
        assert s.output_segments.sizes == (c, c, c) and s.output_segments.pattern == "chunk"
        assert s.input_segments is None and not s.dualscale.any
    for s in proj:               # proj_out reads the heads merged channel-first: one segment per head
        assert s.input_segments.sizes == (32,) * (s.out_features // 32)
        assert s.input_segments.pattern == "head_merge" and s.output_segments is None
        assert any("folded into dim 0" in n for n in s.notes)


# first ResBlock of each decoder level: (h, skip) widths, GroupNorm(32) group width
SKIP_WIDTHS = {0: (128, 128), 4: (128, 96), 5: (128, 96), 6: (96, 96), 9: (96, 64), 10: (96, 64),
               11: (64, 64), 14: (64, 32), 15: (64, 32), 16: (32, 32), 20: (32, 32)}


def _widths(j):
    return SKIP_WIDTHS[max(k for k in SKIP_WIDTHS if k <= j)]


def test_decoder_skip_concatenations(plan_report):
    kept = []
    for j in range(25):
        h, skip = _widths(j)
        s = plan_report.plan[f"output_blocks.{j}.0.skip_connection"]
        assert s.input_segments.sizes == (h, skip) and s.input_segments.pattern == "cat"
        assert not s.dualscale.any                       # the cat of two residual streams: no activation
        conv = plan_report.plan[f"output_blocks.{j}.0.in_layers.2"]
        group = (h + skip) // 32
        assert conv.dualscale.all and set(conv.dualscale.sources) == {"silu"}
        if h % group == 0:       # no GroupNorm group straddles the boundary: segments survive the norm
            assert conv.input_segments.sizes == (h * 9, skip * 9)
            kept.append(j)
        else:
            assert conv.input_segments is None
            assert any("straddles" in n for n in conv.notes)
    assert kept == [0, 1, 2, 3, 6, 7, 8, 11, 12, 13, *range(16, 25)]    # 224, 160, 96 wide cats straddle


def test_linears_and_dualscale(plan_report):
    linears = [s for s in plan_report.sites if s.conv is None]
    assert len(linears) == 59
    emb = sites(plan_report, r".*\.emb_layers\.1")
    assert len(emb) == 55
    for s in emb:               # [scale | shift] = chunk(2) of SiLU(emb) @ W
        half = s.out_features // 2
        assert s.output_segments.sizes == (half, half) and s.dualscale.sources == ("silu",)
    assert plan_report.plan["time_embed.0"].input_segments.sizes == (16, 16)         # cat(cos, sin)
    assert any("new dim" in n for n in plan_report.plan["label_emb.0"].notes)     # d01[:, None]: K = 1
    for name in ("time_embed.2", "label_emb.2"):
        assert plan_report.plan[name].dualscale.sources == ("silu",)
    # the resampling ResBlocks pool or upsample between SiLU and conv: the range, and DualScale, survive
    for name in ("input_blocks.5.0", "input_blocks.20.0", "output_blocks.4.2", "output_blocks.19.1"):
        assert plan_report.plan[f"{name}.in_layers.2"].dualscale.sources == ("silu",)
