"""The real terrain UNet from ../shared/data/terrain_unet (guided-diffusion UNet, one-step EDM
consistency model): rebuilt from its README and sampled in float."""
import pytest
import torch

from segquant_compile import terrain_unet as tu

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
# `python -c "from segquant_compile import terrain_unet as tu; m, d = tu.generate(tu.load_unet(), 2, seed=0,
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
