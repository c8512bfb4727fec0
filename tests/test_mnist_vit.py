"""The real MNIST ViT (rectified flow, torch TransformerEncoderLayer) from ../shared/data:
rebuilt, sampled in float, and sampled through the segquant backend."""
import pytest
import torch

from segquant_compile.examples import mnist_vit as mv

pytestmark = pytest.mark.real_defaults   # the real models run with the shipped defaults

LABELS = torch.arange(100) % 10


@pytest.fixture(scope="module")
def vit(shared_data):
    path = shared_data / "mnist_vit_rf" / "vit_rf_mnist.safetensors"
    if not path.exists():
        pytest.skip(f"{path} not found (see ../shared/data/README.md)")
    return mv.load_vit(path)


@pytest.fixture(scope="module")
def float_samples(vit):
    return mv.sample(vit, LABELS, seed=0)


def test_loads_strictly(vit, shared_data):
    from safetensors.torch import load_file
    weights = load_file(str(shared_data / "mnist_vit_rf" / "vit_rf_mnist.safetensors"))
    assert set(vit.state_dict()) == set(weights)              # load_vit is strict; this names any mismatch
    assert sum(p.numel() for p in vit.parameters()) == 208_705
    assert not torch.backends.mha.get_fastpath_enabled()     # else the compiler sees no Linear modules


def test_float_sampling_gives_recognisable_digits(float_samples):
    acc = mv.accuracy(mv.load_classifier(), float_samples, LABELS, zero_one=True)
    print(f"\nMNIST ViT-RF float, 100 samples: classifier accuracy {acc:.2f}")
    assert float_samples.shape == (100, 1, 28, 28)
    assert 0 <= float_samples.min() and float_samples.max() <= 1
    assert acc >= 0.95, f"classifier recognised only {acc:.0%} of the samples"


def psnr_per_image(ref, out):
    """Images in [0, 1]: peak 1."""
    return 10 * torch.log10(1 / (ref - out).pow(2).mean((1, 2, 3)))


@pytest.mark.slow
def test_dynamic_int8_fidelity(vit, float_samples):
    compiled = torch.compile(vit, backend="segquant")          # default: int8 W, dynamic per-token int8 A
    out = mv.sample(compiled, LABELS, seed=0)
    clf = mv.load_classifier()
    acc_ref, acc_q = (mv.accuracy(clf, x, LABELS, zero_one=True) for x in (float_samples, out))
    psnr = psnr_per_image(float_samples, out)
    print(f"\nMNIST ViT-RF, 100 samples: float acc {acc_ref:.2f}; segquant dynamic int8 acc {acc_q:.2f}, "
          f"mean per-image PSNR {psnr.mean():.2f} dB (min {psnr.min():.2f})")
    assert not torch.equal(out, float_samples), "no site was quantized: the backend ran the model in float"
    assert abs(acc_q - acc_ref) <= 0.02
