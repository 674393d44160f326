"""Every invertible layer: round trip, finite outputs, log-det against an autograd Jacobian."""

from __future__ import annotations

import pytest
import torch
from torch.autograd.functional import jacobian

from couplings.transforms import (
    AdditiveCoupling,
    AffineCoupling,
    BatchNormFlow,
    Composite,
    DiagonalScaling,
    Permutation,
    Transform,
)

EVEN = torch.arange(6) % 2 == 0


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
    "affine": lambda: AffineCoupling(EVEN, hidden_layers=2, hidden_units=8),
    "affine-conditional": lambda: AffineCoupling(~EVEN, hidden_layers=1, hidden_units=8, context_dim=3),
    "batchnorm-eval": lambda: _with_running_stats(BatchNormFlow(6)).eval(),
    "permutation": lambda: Permutation(6, seed=3),
    "latent-stack": lambda: Composite(
        [AffineCoupling(EVEN, 1, 8, context_dim=3), _with_running_stats(BatchNormFlow(6)), Permutation(6)]
    ).eval(),
}
CONDITIONAL = {"affine-conditional", "latent-stack"}


def _with_running_stats(layer: BatchNormFlow) -> BatchNormFlow:
    layer.running_mean.copy_(torch.linspace(-1, 1, 6))
    layer.running_var.copy_(torch.linspace(0.5, 2, 6))
    return layer


def _context(name: str, batch: int = 4) -> torch.Tensor | None:
    if name not in CONDITIONAL:
        return None
    return torch.nn.functional.one_hot(torch.arange(batch) % 3, 3).double()


def _input(layer_name: str, batch: int = 4) -> torch.Tensor:
    dim = 5 if layer_name == "additive-odd-dim" else 6
    return torch.randn(batch, dim, dtype=torch.float64, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("name", sorted(LAYERS))
def test_round_trip_and_finite(name):
    layer = _randomized(LAYERS[name]())
    x, y = _input(name), _context(name)
    z, ld = layer(x, y)
    x_back, ld_inv = layer.inverse(z, y)
    assert z.shape == x.shape and ld.shape == (x.shape[0],)
    assert torch.isfinite(z).all() and torch.isfinite(ld).all()
    torch.testing.assert_close(x_back, x, atol=1e-12, rtol=0)
    torch.testing.assert_close(ld_inv, -ld, atol=1e-12, rtol=0)


@pytest.mark.parametrize("name", sorted(LAYERS))
@pytest.mark.parametrize("direction", ["forward", "inverse"])
def test_logabsdet_matches_autograd_jacobian(name, direction):
    layer = _randomized(LAYERS[name]())
    fn = layer.forward if direction == "forward" else layer.inverse
    x, y = _input(name), _context(name)
    _, ld = fn(x, y)
    for i in range(x.shape[0]):
        y_i = None if y is None else y[i : i + 1]
        jac = jacobian(lambda row: fn(row.unsqueeze(0), y_i)[0].squeeze(0), x[i])
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


def test_affine_coupling_starts_as_identity_and_needs_its_context():
    layer = AffineCoupling(EVEN, 1, 4, context_dim=2)
    x = torch.randn(3, 6)
    z, ld = layer(x, torch.zeros(3, 2))
    assert torch.equal(z, x) and torch.equal(ld, torch.zeros(3))
    with pytest.raises(ValueError, match=r"expected a context of shape \(3, 2\), found None"):
        layer(x)
    with pytest.raises(ValueError, match="mask must be"):
        AffineCoupling(torch.ones(4, dtype=torch.bool), 1, 4)


def test_batchnorm_training_mode_normalises_and_counts_its_log_det():
    layer = BatchNormFlow(3).double()
    x = torch.randn(500, 3, dtype=torch.float64) * torch.tensor([0.5, 2.0, 3.0], dtype=torch.float64) + 4
    z, ld = layer(x)
    torch.testing.assert_close(z.mean(0), torch.zeros(3, dtype=torch.float64), atol=1e-10, rtol=0)
    torch.testing.assert_close(z.std(0, unbiased=False), torch.ones(3, dtype=torch.float64), atol=1e-4, rtol=0)
    expected = -0.5 * torch.log(x.var(0, unbiased=False) + layer.eps).sum()
    torch.testing.assert_close(ld, expected.expand(500))
    assert layer.running_mean.sub(0.4).abs().max() < 0.05  # one step of momentum 0.1 towards 4


def test_permutation_survives_save_load():
    a, b = Permutation(10, seed=1), Permutation(10, seed=2)
    assert not torch.equal(a.order, b.order)
    b.load_state_dict(a.state_dict())
    assert torch.equal(a.order, b.order)
