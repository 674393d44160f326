"""Every invertible layer: round trip, finite outputs, log-det against an autograd Jacobian."""

from __future__ import annotations

import pytest
import torch
from torch.autograd.functional import jacobian

from couplings.transforms import AdditiveCoupling, Composite, DiagonalScaling, Transform


def _randomized(layer: Transform) -> Transform:
    """Float64 copy with all parameters moved off their (often identity) initial values."""
    torch.manual_seed(0)
    layer = layer.double()
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return layer


LAYERS = {
    "additive-even": lambda: AdditiveCoupling(6, parity=0, hidden_layers=2, hidden_units=8),
    "additive-odd": lambda: AdditiveCoupling(6, parity=1, hidden_layers=2, hidden_units=8),
    "additive-odd-dim": lambda: AdditiveCoupling(5, parity=1, hidden_layers=1, hidden_units=4),
    "scaling": lambda: DiagonalScaling(6),
    "composite": lambda: Composite(
        [AdditiveCoupling(6, 0, 1, 8), AdditiveCoupling(6, 1, 1, 8), DiagonalScaling(6)]
    ),
}


def _input(layer_name: str, batch: int = 4) -> torch.Tensor:
    dim = 5 if layer_name == "additive-odd-dim" else 6
    return torch.randn(batch, dim, dtype=torch.float64, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("name", sorted(LAYERS))
def test_round_trip_and_finite(name):
    layer = _randomized(LAYERS[name]())
    x = _input(name)
    z, ld = layer(x)
    x_back, ld_inv = layer.inverse(z)
    assert z.shape == x.shape and ld.shape == (x.shape[0],)
    assert torch.isfinite(z).all() and torch.isfinite(ld).all()
    torch.testing.assert_close(x_back, x, atol=1e-12, rtol=0)
    torch.testing.assert_close(ld_inv, -ld, atol=1e-12, rtol=0)


@pytest.mark.parametrize("name", sorted(LAYERS))
@pytest.mark.parametrize("direction", ["forward", "inverse"])
def test_logabsdet_matches_autograd_jacobian(name, direction):
    layer = _randomized(LAYERS[name]())
    fn = layer.forward if direction == "forward" else layer.inverse
    x = _input(name)
    _, ld = fn(x)
    for i in range(x.shape[0]):
        jac = jacobian(lambda row: fn(row.unsqueeze(0))[0].squeeze(0), x[i])
        _, expected = torch.linalg.slogdet(jac)
        torch.testing.assert_close(ld[i], expected, atol=1e-10, rtol=0)


def test_additive_coupling_leaves_conditioning_half_unchanged():
    layer = _randomized(AdditiveCoupling(6, parity=1, hidden_layers=1, hidden_units=4))
    x = _input("additive-odd")
    z, _ = layer(x)
    torch.testing.assert_close(z[:, 1::2], x[:, 1::2], atol=0, rtol=0)
    assert not torch.allclose(z[:, 0::2], x[:, 0::2])


def test_scaling_starts_as_identity():
    x = torch.randn(3, 4)
    z, ld = DiagonalScaling(4)(x)
    assert torch.equal(z, x) and torch.equal(ld, torch.zeros(3))


def test_bad_arguments():
    with pytest.raises(ValueError, match="dim >= 2"):
        AdditiveCoupling(1, 0, 1, 4)
    with pytest.raises(ValueError, match="parity"):
        AdditiveCoupling(4, 2, 1, 4)
