"""The real MNIST DiT from ../shared/data: rebuilt, sampled, and planned."""
import pytest
import torch

from segquant_compile import explain
from segquant_compile import mnist_dit as md


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
    assert report.totals()["sites"] == 40
    for i in range(3):
        seg = report.plan[f"dits.{i}.lv"].input_segments
        assert seg.sizes == (64,) * 4 and seg.pattern == "head_merge"
    assert report.plan["time_emb.1"].input_segments.sizes == (32, 32)
    assert report.totals()["dualscale"] == report.totals()["dualscale_partial"] == 0
    segmented = {s.name for s in report.sites if s.input_segments or s.output_segments}
    assert segmented == {"dits.0.lv", "dits.1.lv", "dits.2.lv", "time_emb.1"}
