"""The real MNIST DiT from ../shared/data: rebuilt, sampled, and planned."""
import pytest
import torch

from segquant_compile import explain
from segquant_compile.examples import mnist_dit as md

pytestmark = pytest.mark.real_defaults   # the real models run with the shipped defaults


@pytest.fixture(scope="module")
def dit(shared_data):
    return md.load_dit()


def test_sampling_gives_recognisable_digits(dit):
    labels = torch.arange(20) % 10
    images = md.sample(dit, labels, seed=0)
    acc = md.accuracy(md.load_classifier(), images, labels)
    assert images.shape == (20, 1, 28, 28)
    assert acc >= 0.8, f"classifier recognised only {acc:.0%} of the samples"


def test_classifier_on_real_images(shared_data):
    images, labels = md.test_images(500)
    assert md.accuracy(md.load_classifier(), images, labels) >= 0.95


def test_plan(dit):
    y = torch.tensor([3, 7])
    report = explain(dit, torch.randn(2, 1, 28, 28), torch.zeros(2), y)
    assert report.totals()["sites"] == 41 and report.totals()["conv_sites"] == 1    # 40 linears + its patch conv
    for i in range(3):
        seg = report.plan[f"dits.{i}.lv"].input_segments
        assert seg.sizes == (64,) * 4 and seg.pattern == "head_merge"
    assert report.plan["time_emb.1"].input_segments.sizes == (32, 32)
    assert report.totals()["dualscale"] == report.totals()["dualscale_partial"] == 0
    segmented = {s.name for s in report.sites if s.input_segments or s.output_segments}
    assert segmented == {"dits.0.lv", "dits.1.lv", "dits.2.lv", "time_emb.1"}


def psnr(ref, out):
    """Images in [-1, 1]: peak-to-peak 2."""
    return float(10 * torch.log10(4 / (ref - out).pow(2).mean()))


def quantized_samples(dit, options, labels):
    """Calibrated on two sampling runs of other seeds (200 digits, 70 denoiser calls) at the
    evaluation's batch: the quantized graph compiles once, for one shape."""
    import segquant_compile as sq
    compiled = torch.compile(dit, backend="segquant", options=options)
    with sq.calibrate(compiled, progress=False):
        for run in range(2):
            md.sample(compiled, labels, seed=1000 + run)
    return md.sample(compiled, labels, seed=0)


@pytest.mark.slow
def test_static_w8a8_fidelity(dit):
    labels = torch.arange(100) % 10
    clf = md.load_classifier()
    ref = md.sample(dit, labels, seed=0)
    seg = quantized_samples(dit, {"activations": "static"}, labels)
    plain = quantized_samples(dit, {"activations": "static", "weights": "per-tensor", "seglinear": False,
                                    "dualscale": False}, labels)
    acc_ref, acc_seg, acc_plain = (md.accuracy(clf, x, labels) for x in (ref, seg, plain))
    p_seg, p_plain = psnr(ref, seg), psnr(ref, plain)
    print(f"\nMNIST DiT, 100 samples: float acc {acc_ref:.2f}; SegQuant static W8A8 PSNR {p_seg:.2f} dB acc "
          f"{acc_seg:.2f}; plain per-tensor W8A8 PSNR {p_plain:.2f} dB acc {acc_plain:.2f}")
    assert p_seg >= 35
    assert abs(acc_seg - acc_ref) <= 0.02
    assert p_plain < p_seg
