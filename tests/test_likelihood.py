"""couplings.likelihood: dequantization and bits/dim, by known answers."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from couplings.likelihood import NonFiniteLogProbError, bits_per_dim, dequantize, log_probs
from couplings.models import NICE, LatentRealNVP


class _Constant:
    """A density that is constant on [0, 1]^D: log p = c for every image."""

    def __init__(self, c: float):
        self.c = c

    def log_prob(self, x):
        return torch.full((x.shape[0],), self.c)


def test_bits_per_dim_of_uniform_density_is_exactly_8():
    images = torch.randint(0, 256, (50, 28, 28), dtype=torch.uint8)
    assert bits_per_dim(_Constant(0.0), images, batch_size=7) == 8.0
    assert bits_per_dim(_Constant(0.0), images.unsqueeze(1).numpy()) == 8.0


def test_bits_per_dim_formula_and_dimension_from_the_images():
    images = torch.zeros(10, 1, 4, 4, dtype=torch.uint8)  # D = 16
    c = 16 * math.log(2)  # one bit per dimension better than uniform
    assert bits_per_dim(_Constant(c), images) == pytest.approx(7.0, abs=1e-6)


def test_bits_per_dim_refuses_non_finite_log_probs():
    class Broken:
        def log_prob(self, x):
            out = torch.zeros(x.shape[0])
            out[::4] = float("nan")
            return out

    with pytest.raises(NonFiniteLogProbError, match="3 of 10 images"):
        bits_per_dim(Broken(), torch.zeros(10, 28, 28, dtype=torch.uint8))


def test_dequantization_fills_each_pixel_bin():
    pixels = torch.tensor([0, 17, 255], dtype=torch.uint8).repeat(1000)
    x = dequantize(pixels, torch.Generator().manual_seed(0))
    k = pixels.float()
    assert ((x >= k / 256) & (x < (k + 1) / 256)).all()
    assert abs(float((x * 256 - k).mean()) - 0.5) < 0.02  # u ~ U(0, 1)


def test_bits_per_dim_of_an_identity_nice_is_the_logistic_density_of_the_dequantized_pixels():
    """With its coupling outputs at zero and its scaling at 0, NICE is the identity map, so
    log p(x) is the standard logistic log-density summed over the pixels of the very draw
    ``seed`` makes: a known answer for the whole path (dequantization, batching, formula)."""
    model = NICE(hidden_layers=1, hidden_units=8)
    with torch.no_grad():
        for coupling in model.flow.transforms[:-1]:
            coupling.shift[-1].weight.zero_()
            coupling.shift[-1].bias.zero_()
    images = torch.randint(0, 256, (20, 28, 28), dtype=torch.uint8)
    x = dequantize(images.unsqueeze(1), torch.Generator().manual_seed(1)).double()
    log_p = -(F.softplus(x) + F.softplus(-x)).flatten(1).sum(1)
    expected = 8 - float(log_p.mean()) / (784 * math.log(2))
    assert bits_per_dim(model, images, seed=1, batch_size=6) == pytest.approx(expected, abs=1e-5)
    torch.testing.assert_close(log_probs(model, images, seed=1), log_p, atol=1e-3, rtol=1e-6)
    assert bits_per_dim(model, images, seed=2) != bits_per_dim(model, images, seed=1)


def test_a_latent_density_has_no_bits_per_dim():
    with pytest.raises(TypeError, match="no pixel log-likelihood"):
        bits_per_dim(LatentRealNVP(couplings=1, hidden_units=4), torch.zeros(2, 28, 28, dtype=torch.uint8))
