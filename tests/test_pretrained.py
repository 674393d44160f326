"""The pretrained models shipped in the package: each one loads and scores what it is known to score.

The subset figures below are the test bits/dim (latent NLL for LatentRealNVP) of the first 1,000
MNIST test images under dequantization seed 0, measured when the files were re-scored after the
redesign (the full-set figures in results/redesign/pretrained-eval-after.txt came from the same
files; the small Real NVP and Glow were replaced on 2026-12-06 by the long class-conditional Glow,
and that on 2026-12-07 by its discriminative fine-tune;
latent-realnvp-mnist was replaced on 2026-12-02 by the size=default model of
results/latent-default-mnist, and on 2026-12-04 by the 64-channel-autoencoder model of
results/latent-ae64-mnist, each pinned then); any change to a layer, a model or the likelihood path that changes what these files
compute fails here. With COUPLINGS_SLOW_TESTS=1 the whole test set is scored and compared with
the figure recorded in each file's provenance.
"""

from __future__ import annotations

import os

import pytest
import torch

from couplings import checkpoint, data
from couplings.likelihood import bits_per_dim

SUBSET = {
    "nice-mnist": 4.235117928687647,  # the paper configuration fine-tuned with Polyak averaging, 2026-12-06
    "nice-small-mnist": 4.5872734588027555,
    "realnvp-fast-mnist": 1.068803191371897,  # the long run of size=fast at 16.8 passes, re-exported 2026-12-04
    "glow-cond-mnist": 1.066954589645432,  # of p(x | y); the long class-conditional Glow fine-tuned with its own classifier, 2026-12-07
    "latent-realnvp-mnist": 24.480090424537657,  # nats on the 20-d embedding (size=default, 64-channel autoencoder, 2026-12-04)
}
SLOW = os.environ.get("COUPLINGS_SLOW_TESTS") == "1"


def _score(name: str, n: int | None) -> float:
    model, _ = checkpoint.load_model(checkpoint.pretrained_path(name))
    images, labels = data.load("mnist", "test")
    images, labels = images[:n], labels[:n]
    if model.has_pixel_density:
        return bits_per_dim(model, images, seed=0, labels=labels if model.conditional else None)
    x = torch.as_tensor(images).unsqueeze(1).float() / 255  # (N, 28, 28) uint8 -> (N, 1, 28, 28) in [0, 1]
    with torch.inference_mode():
        return float(-model.log_prob(x, torch.as_tensor(labels).long()).double().mean())


def test_every_shipped_model_is_pinned():
    shipped = sorted(p.stem for p in checkpoint.pretrained_path("nice-mnist").parent.glob("*.pt"))
    assert shipped == sorted(SUBSET)


@pytest.mark.network
@pytest.mark.parametrize("name", sorted(SUBSET))
def test_pretrained_model_scores_its_known_figure_on_a_fixed_subset(name):
    assert _score(name, 1000) == pytest.approx(SUBSET[name], abs=1e-4)
    provenance = checkpoint.load(checkpoint.pretrained_path(name)).provenance
    assert provenance["command"] and provenance["commit"] and provenance["hardware"]


@pytest.mark.network
@pytest.mark.skipif(not SLOW, reason="scores the whole test set; set COUPLINGS_SLOW_TESTS=1")
@pytest.mark.parametrize("name", ["nice-mnist", "nice-small-mnist", "realnvp-fast-mnist", "glow-cond-mnist"])
def test_pretrained_model_scores_its_provenance_figure_on_the_whole_test_set(name):
    provenance = checkpoint.load(checkpoint.pretrained_path(name)).provenance
    recorded = provenance.get("test_bits_per_dim", provenance.get("test_bits_per_dim_float32"))
    assert _score(name, None) == pytest.approx(recorded, abs=1e-3)
