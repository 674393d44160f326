"""Sample-quality metrics: known answers on Gaussians, then on real MNIST with the committed classifier."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from couplings import checkpoint, data, metrics
from couplings.classifier import Classifier, load_classifier
from couplings.evaluation import evaluate_checkpoint


def _gaussian(n: int, seed: int, scale: float = 1.0, shift=(0.0, 0.0, 0.0, 0.0)) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return scale * torch.randn(n, 4, generator=g, dtype=torch.float64) + torch.tensor(shift, dtype=torch.float64)


def test_fid_known_answers_on_gaussians():
    a = _gaussian(50_000, 0)
    assert metrics.fid(a, a) < 1e-9
    # N(0, I) vs N(mu, 4 I) in 4-d: |mu|^2 + tr(I + 4I - 2 * 2I) = 5 + 4.
    assert metrics.fid(a, _gaussian(50_000, 1, scale=2.0, shift=(1.0, 2.0, 0.0, 0.0))) == pytest.approx(9.0, abs=0.15)
    assert metrics.fid(a, _gaussian(50_000, 2)) < 0.01


def test_kid_is_unbiased_near_zero_and_positive_for_different_sets():
    a, b = _gaussian(4000, 0), _gaussian(4000, 1)
    mean, std = metrics.kid(a, b, subsets=20, subset_size=500)
    assert abs(mean) < 3 * std + 1e-3
    far, _ = metrics.kid(a, _gaussian(4000, 2, shift=(2.0, 0.0, 0.0, 0.0)), subsets=20, subset_size=500)
    assert far > 0.1


def test_precision_recall_extremes():
    a = _gaussian(500, 0)
    assert metrics.precision_recall(a, a) == (1.0, 1.0)
    assert metrics.precision_recall(a, a + 100.0) == (0.0, 0.0)


def test_nearest_neighbour_distance():
    train = torch.randint(0, 256, (50, 28, 28), dtype=torch.uint8)
    assert metrics.nearest_neighbour_distance(train[:5], train) < 1e-6
    assert metrics.nearest_neighbour_distance(torch.ones(3, 1, 28, 28), torch.zeros(4, 28, 28, dtype=torch.uint8)) == pytest.approx(28.0)


@pytest.fixture(scope="module")
def mnist_test():
    return data.load("mnist", "test")


@pytest.fixture(scope="module")
def classifier() -> Classifier:
    return load_classifier("mnist")


@pytest.mark.network
def test_committed_classifier_accuracy_and_size(classifier, mnist_test):
    images, labels = mnist_test
    assert metrics.conditional_accuracy(classifier, images, torch.as_tensor(labels)) >= 0.99
    assert sum(p.numel() for p in classifier.parameters()) * 4 <= 2 * 1024 * 1024


@pytest.mark.network
def test_fid_on_mnist_features(classifier, mnist_test):
    images, _ = mnist_test
    feats = metrics.features(classifier, images)
    assert feats.shape == (10_000, 128)
    assert metrics.fid(feats, feats) < 1e-6
    # Random halves: the official test set's first and last 5000 come from different writers.
    order = torch.randperm(10_000, generator=torch.Generator().manual_seed(0))
    halves = metrics.fid(feats[order[:5000]], feats[order[5000:]])
    noise = torch.rand(10_000, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    noisy = metrics.fid(feats, metrics.features(classifier, noise))
    assert halves < 5.0, halves
    assert noisy > 100 * max(halves, 0.01), (noisy, halves)


@pytest.mark.network
def test_sample_quality_names_its_features(classifier, mnist_test):
    images, labels = mnist_test
    train, _ = data.load("mnist", "train")
    result = metrics.sample_quality(classifier, torch.as_tensor(images[:2000]), images[2000:4000], train[:5000],
                                    dataset="mnist", sample_labels=torch.as_tensor(labels[:2000]), nn_samples=100)
    assert "not Inception" in result["feature_extractor"] and "mnist" in result["feature_extractor"]
    assert result["conditional_accuracy"] >= 0.98
    assert result["fid"] < 5 and result["precision"] > 0.5 and result["recall"] > 0.5
    assert result["nearest_train_l2"] > 0


class _DigitDealer:
    """A stand-in class-conditional MNIST model: asked for digit y, it "samples" a real test image
    of y that the committed classifier reads as y, except for the digits in ``wrong``, for which
    it hands out an image of digit y + 1 (which the classifier reads as y + 1). It has no pixel
    density, so `evaluate_checkpoint` scores it like a latent model (log_prob is 0)."""

    conditional, num_classes, has_pixel_density = True, 10, False

    def __init__(self, pool: dict[int, torch.Tensor], wrong: set[int]):
        self.pool, self.wrong, self.dealt = pool, wrong, [0] * 10
        self.prior = SimpleNamespace(device=torch.device("cpu"), dtype=torch.float32)
        self.config = SimpleNamespace(embedding_dim=1)
        self.asked_for: list[int] = []

    def parameters(self):
        return iter(())

    def log_prob(self, x, y=None):
        return x.new_zeros(len(x))

    def sample(self, n, y, temperature=1.0, generator=None):
        assert y is not None and len(y) == n, "a class-conditional model is asked for samples of given labels"
        images = []
        for label in y.tolist():
            digit = (label + 1) % 10 if label in self.wrong else label
            images.append(self.pool[digit][self.dealt[digit] % len(self.pool[digit])])
            self.dealt[digit] += 1
        self.asked_for += y.tolist()
        return torch.stack(images)


@pytest.mark.network
def test_conditional_accuracy_end_to_end_is_the_fraction_of_samples_of_the_asked_label(
        classifier, mnist_test, tmp_path, monkeypatch):
    """Labels drawn by `draw_samples` -> the model's samples of them -> the committed classifier ->
    the conditional accuracy `evaluate_checkpoint` reports: with 2 digits of 10 answered by an image
    of another digit, exactly 0.8."""
    images, labels = mnist_test
    pixels = torch.as_tensor(images[:1000]).unsqueeze(1).float() / 255  # (N, 1, 28, 28) in [0, 1]
    with torch.inference_mode():
        predicted = classifier(pixels).argmax(1)
    read_right = predicted == torch.as_tensor(labels[:1000]).long()
    pool = {d: pixels[read_right & (predicted == d)] for d in range(10)}
    assert all(len(p) >= 20 for p in pool.values())
    dealer = _DigitDealer(pool, wrong={3, 7})
    # Scored on the 1,000 validation images (val_size), not the 10,000 test images: quicker on 2 cores.
    state = checkpoint.Checkpoint("latent-realnvp", {}, {}, train={"dataset": "mnist", "val_size": 1000})
    monkeypatch.setattr(checkpoint, "load_model", lambda path, device="cpu": (dealer, state))
    stand_in = tmp_path / "dealer.pt"
    stand_in.write_bytes(b"")  # evaluate_checkpoint names the file it scored
    # 200 samples drawn 64 at a time: the labels of every chunk must line up with its samples.
    result = evaluate_checkpoint(stand_in, split="val", samples=200, batch_size=64)
    quality = result.sample_quality
    assert dealer.asked_for == [i % 10 for i in range(200)]  # every digit equally often, in order
    assert result.num_images == 1000 and quality["num_samples"] == 200
    assert quality["conditional_accuracy"] == 160 / 200 == 0.8
    assert quality["nearest_train_l2"] > 0  # test images, none of them in the training split


@pytest.mark.network
def test_committed_fashion_classifier_accuracy():
    images, labels = data.load("fashion-mnist", "test")
    accuracy = metrics.conditional_accuracy(load_classifier("fashion-mnist"), images, torch.as_tensor(labels))
    assert accuracy >= 0.90
