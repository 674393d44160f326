"""Every invertible layer: round trip, finite outputs, log-det against an autograd Jacobian."""

from __future__ import annotations

import pytest
import torch
from torch.autograd.functional import jacobian

from couplings.nn import coupling_net
from couplings.transforms import (
    ActNorm,
    AdditiveCoupling,
    AffineCoupling,
    AffineCoupling2d,
    BatchNormFlow,
    BoundedScale,
    Checkerboard,
    ClassConditionalPrior,
    Composite,
    Context,
    DiagonalScaling,
    InvConv1x1,
    Inverse,
    LearnedSplitPrior,
    Logit,
    MixtureCoupling2d,
    OneHotLabels,
    Permutation,
    Shift,
    Squeeze,
    Transform,
    affine_coupling2d,
    mixture_coupling2d,
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
    "scaling-data-init": lambda: _initialized(DiagonalScaling(6, init="data", target_std=1.8), (6,)),
    "composite": lambda: Composite(
        [AdditiveCoupling(6, 0, 1, 8), AdditiveCoupling(6, 1, 1, 8), DiagonalScaling(6)]
    ),
    "affine": lambda: AffineCoupling(EVEN, hidden_layers=2, hidden_units=8),
    "affine-conditional": lambda: AffineCoupling(~EVEN, hidden_layers=1, hidden_units=8, conditioner=Context(3)),
    "batchnorm-eval": lambda: _with_running_stats(BatchNormFlow(6)).eval(),
    "permutation": lambda: Permutation(6, seed=3),
    "class-prior-flat": lambda: ClassConditionalPrior(6, num_classes=3),
    "latent-stack": lambda: Composite(
        [AffineCoupling(EVEN, 1, 8, Context(3)), _with_running_stats(BatchNormFlow(6)), Permutation(6)]
    ).eval(),
}
CONDITIONAL = {"affine-conditional", "latent-stack"}
LABELLED = {"class-prior-flat", "class-prior-image", "class-prior-per-position",  # layers whose context is a label (B,)
            "coupling-channel-bounded-gated-labelled", "coupling-checkerboard-sigmoid-labelled",
            "mixture-checkerboard-labelled", "mixture-channel-gated-labelled", "coupling-composed"}

# Image layers run on (B, C, H, W) inputs of these shapes; flat layers on (B, 6) or (B, 5).
IMAGE_LAYERS = {
    "logit": (lambda: Logit(0.05), (1, 2, 2)),
    "logit-tiny-alpha": (lambda: Logit(1e-6), (1, 2, 2)),
    "squeeze": (lambda: Squeeze(), (2, 2, 4)),
    "actnorm": (lambda: _initialized(ActNorm(3), (3, 2, 2)), (3, 2, 2)),
    "invconv1x1": (lambda: InvConv1x1(3, seed=1), (3, 2, 2)),
    "batchnorm2d-eval": (lambda: BatchNormFlow(2, spatial=True, momentum=0.05, eps=1e-4).eval(), (2, 2, 2)),
    "shift": (lambda: Shift(-0.5), (1, 2, 2)),
    "class-prior-image": (lambda: ClassConditionalPrior(2, num_classes=3), (2, 2, 2)),
    "class-prior-per-position": (lambda: ClassConditionalPrior(2, num_classes=3, shape=(2, 3)), (2, 2, 3)),
    "coupling-checkerboard-tanh": (lambda: affine_coupling2d(1, "checkerboard", 0, 4, 1).eval(), (1, 4, 4)),
    "coupling-checkerboard-odd": (lambda: affine_coupling2d(2, "checkerboard", 1, 4, 0).eval(), (2, 2, 2)),
    "coupling-channel-tanh": (lambda: affine_coupling2d(4, "channel", 0, 4, 1).eval(), (4, 2, 2)),
    "coupling-channel-sigmoid": (lambda: affine_coupling2d(4, "channel", 1, 4, 0, scale="sigmoid").eval(), (4, 2, 2)),
    "coupling-sigmoid-min-scale": (lambda: affine_coupling2d(4, "channel", 0, 4, 0, "sigmoid", 0.1).eval(), (4, 2, 2)),
    "coupling-checkerboard-bounded-gated": (lambda: affine_coupling2d(2, "checkerboard", 0, 4, 1, scale="bounded",
                                                                     net="gated"), (2, 4, 4)),
    "coupling-channel-bounded-gated": (lambda: affine_coupling2d(4, "channel", 1, 4, 2, scale="bounded", net="gated"),
                                       (4, 2, 2)),
    "coupling-channel-bounded-gated-labelled": (lambda: affine_coupling2d(4, "channel", 0, 4, 1, scale="bounded",
                                                                         net="gated", num_classes=3), (4, 2, 2)),
    "coupling-checkerboard-sigmoid-labelled": (lambda: affine_coupling2d(2, "checkerboard", 1, 4, 0, "sigmoid", 0.2,
                                                                        num_classes=3).eval(), (2, 2, 2)),
    "mixture-checkerboard": (lambda: mixture_coupling2d(2, "checkerboard", 0, 4, 1, mixtures=3).eval(), (2, 4, 4)),
    "mixture-checkerboard-labelled": (lambda: mixture_coupling2d(1, "checkerboard", 1, 4, 0, mixtures=2,
                                                                num_classes=3).eval(), (1, 4, 4)),
    "mixture-channel-gated": (lambda: mixture_coupling2d(4, "channel", 1, 4, 1, mixtures=4, net="gated"), (4, 2, 2)),
    "mixture-channel-gated-labelled": (lambda: mixture_coupling2d(4, "channel", 0, 4, 1, mixtures=3, net="gated",
                                                                 num_classes=3), (4, 2, 2)),
    # Built from its parts, not by name: a checkerboard, a gated network of the image, the mask
    # channel and 3 one-hot label channels, a bounded scale per transformed channel.
    "coupling-composed": (lambda: AffineCoupling2d(Checkerboard(1), coupling_net("gated", 2 + 1 + 3, 2 * 2, 4, 1),
                                                   BoundedScale(2), OneHotLabels(3)), (2, 4, 4)),
    "mixture-one-logistic": (lambda: mixture_coupling2d(4, "channel", 0, 4, 0, mixtures=1).eval(), (4, 2, 2)),
    "sigmoid": (lambda: Inverse(Logit(0.0)), (1, 2, 2)),
    "glow-step": (lambda: Composite([_initialized(ActNorm(4), (4, 2, 2)), InvConv1x1(4),
                                     affine_coupling2d(4, "channel", 0, 4, 0, scale="sigmoid")]).eval(), (4, 2, 2)),
}
LAYERS.update({name: factory for name, (factory, _) in IMAGE_LAYERS.items()})


def _initialized(layer: Transform, shape) -> Transform:
    """A layer (ActNorm, DiagonalScaling) after its data-dependent initialisation on a batch unlike the test inputs."""
    layer(3 * torch.randn(16, *shape) + 1)
    return layer


def _with_running_stats(layer: BatchNormFlow) -> BatchNormFlow:
    layer.running_mean.copy_(torch.linspace(-1, 1, 6))
    layer.running_var.copy_(torch.linspace(0.5, 2, 6))
    return layer


def _context(name: str, batch: int = 4) -> torch.Tensor | None:
    if name in LABELLED:
        return torch.arange(batch) % 3
    if name not in CONDITIONAL:
        return None
    return torch.nn.functional.one_hot(torch.arange(batch) % 3, 3).double()


def _input(layer_name: str, batch: int = 4) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1)
    if layer_name.startswith("logit"):  # data in (0, 1)
        return torch.rand(batch, *IMAGE_LAYERS[layer_name][1], dtype=torch.float64, generator=generator) * 0.98 + 0.01
    if layer_name in IMAGE_LAYERS:
        return torch.randn(batch, *IMAGE_LAYERS[layer_name][1], dtype=torch.float64, generator=generator)
    dim = 5 if layer_name == "additive-odd-dim" else 6
    return torch.randn(batch, dim, dtype=torch.float64, generator=generator)


@pytest.mark.parametrize("name", sorted(LAYERS))
def test_round_trip_and_finite(name):
    layer = _randomized(LAYERS[name]())
    x, y = _input(name), _context(name)
    z, ld = layer(x, y)
    x_back, ld_inv = layer.inverse(z, y)
    assert z.shape[0] == x.shape[0] and z.numel() == x.numel() and ld.shape == (x.shape[0],)
    assert torch.isfinite(z).all() and torch.isfinite(ld).all()
    torch.testing.assert_close(x_back, x, atol=1e-12, rtol=0)
    torch.testing.assert_close(ld_inv, -ld, atol=1e-12, rtol=0)


@pytest.mark.parametrize("name", sorted(LAYERS))
@pytest.mark.parametrize("direction", ["forward", "inverse"])
def test_logabsdet_matches_autograd_jacobian(name, direction):
    layer = _randomized(LAYERS[name]())
    x, y = _input(name), _context(name)
    if direction == "inverse":
        x = layer(x, y)[0].detach()  # a point in the inverse's domain (e.g. squeezed, or real-valued)
    fn = layer.forward if direction == "forward" else layer.inverse
    _, ld = fn(x, y)
    for i in range(x.shape[0]):
        y_i = None if y is None else y[i : i + 1]
        jac = jacobian(lambda row: fn(row.unsqueeze(0), y_i)[0].flatten(), x[i]).reshape(x[i].numel(), -1)
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


def test_scaling_data_init_gives_the_target_spread_once():
    layer = DiagonalScaling(3, init="data", target_std=2.0)
    x = torch.randn(500, 3) * torch.tensor([0.001, 1.0, 30.0]) + 5
    z, ld = layer(x)
    torch.testing.assert_close(z.std(dim=0, unbiased=False), torch.full((3,), 2.0), rtol=1e-3, atol=0)
    torch.testing.assert_close(ld, layer.log_scale.sum().expand(500))
    scale = layer.log_scale.detach().clone()
    layer(torch.randn(10, 3))  # a second batch leaves it alone
    assert torch.equal(layer.log_scale, scale)
    loaded = DiagonalScaling(3, init="data")
    loaded.load_state_dict(layer.state_dict())
    assert bool(loaded.initialized) and torch.equal(loaded.log_scale, scale)
    with pytest.raises(ValueError, match="init"):
        DiagonalScaling(3, init="ones")


def test_bad_arguments():
    with pytest.raises(ValueError, match="dim >= 2"):
        AdditiveCoupling(1, 0, 1, 4)
    with pytest.raises(ValueError, match="parity"):
        AdditiveCoupling(4, 2, 1, 4)


def test_affine_coupling_starts_as_identity_and_needs_its_context():
    layer = AffineCoupling(EVEN, 1, 4, Context(2))
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


@pytest.mark.parametrize("spatial", [False, True])
def test_batchnorm_training_mode_equals_a_direct_computation_from_the_batch_statistics(spatial):
    """What every Real NVP and LatentRealNVP training loss uses: the batch's own mean and biased
    variance per feature (per channel over batch, height and width for images), the learned
    scale and shift, a log-det of H * W * sum(log_gamma - log(var + eps) / 2), and running
    averages moved ``momentum`` of the way towards the batch's mean and unbiased variance."""
    torch.manual_seed(0)
    shape = (6, 3, 4, 5) if spatial else (6, 3)
    layer = BatchNormFlow(3, spatial=spatial, momentum=0.2, eps=1e-3).double()
    with torch.no_grad():
        layer.log_gamma.copy_(torch.tensor([0.3, -0.7, 1.1]).view_as(layer.log_gamma))
        layer.beta.copy_(torch.tensor([-1.0, 0.5, 2.0]).view_as(layer.beta))
    x = torch.randn(*shape, dtype=torch.float64) * 3 + 2
    z, ld = layer.train()(x)

    columns = x.movedim(1, -1).reshape(-1, 3)  # every value of a feature in one column
    mean, var = columns.mean(0), columns.var(0, unbiased=False)
    gamma, beta = torch.tensor([0.3, -0.7, 1.1]).double().exp(), torch.tensor([-1.0, 0.5, 2.0]).double()
    view = (1, 3, 1, 1) if spatial else (1, 3)
    expected = (x - mean.view(view)) / torch.sqrt(var.view(view) + 1e-3) * gamma.view(view) + beta.view(view)
    pixels = 4 * 5 if spatial else 1
    expected_ld = pixels * (gamma.log() - 0.5 * torch.log(var + 1e-3)).sum()
    torch.testing.assert_close(z, expected, atol=1e-12, rtol=0)
    torch.testing.assert_close(ld, expected_ld.expand(6), atol=1e-10, rtol=0)
    torch.testing.assert_close(layer.running_mean.flatten(), 0.2 * mean, atol=1e-12, rtol=0)
    torch.testing.assert_close(layer.running_var.flatten(), 0.8 + 0.2 * columns.var(0, unbiased=True),
                               atol=1e-12, rtol=0)
    # Its log-det is the Jacobian's, with the batch statistics held constant (as in Real NVP).
    frozen = BatchNormFlow(3, spatial=spatial, eps=1e-3).double().eval()
    frozen.load_state_dict({**layer.state_dict(), "running_mean": mean.view_as(layer.running_mean),
                            "running_var": var.view_as(layer.running_var)})
    torch.testing.assert_close(frozen(x)[0], z, atol=1e-12, rtol=0)
    jac = jacobian(lambda row: frozen(row.unsqueeze(0))[0][0], x[0])
    torch.testing.assert_close(torch.linalg.slogdet(jac.reshape(x[0].numel(), -1))[1], ld[0], atol=1e-10, rtol=0)


def test_a_coupling_conditioned_on_an_image_context():
    torch.manual_seed(0)
    layer = _randomized(affine_coupling2d(1, "checkerboard", 1, 4, 1, scale="bounded", net="gated", context_channels=2))
    x, y = torch.randn(3, 1, 4, 4, dtype=torch.float64), torch.randn(3, 2, 4, 4, dtype=torch.float64)
    z, ld = layer(x, y)
    back, ld_inv = layer.inverse(z, y)
    torch.testing.assert_close(back, x, atol=1e-12, rtol=0)
    torch.testing.assert_close(ld_inv, -ld, atol=1e-12, rtol=0)
    for i in range(3):
        jac = jacobian(lambda row: layer(row.unsqueeze(0), y[i : i + 1])[0][0], x[i])
        torch.testing.assert_close(torch.linalg.slogdet(jac.reshape(16, 16))[1], ld[i], atol=1e-10, rtol=0)
    assert not torch.allclose(layer(x, y.flip(0))[0], z)  # the context matters
    with pytest.raises(ValueError, match=r"expected a context of shape \(B, 2, 4, 4\), found None"):
        layer(x)


def test_the_bounded_scale_can_expand_and_contract_but_never_past_its_bound():
    layer = affine_coupling2d(4, "channel", 0, 8, 0, scale="bounded", net="gated").eval()
    with torch.no_grad():
        layer.net.tail.bias.copy_(torch.tensor([-40.0, 40.0, 0.0, 0.0]))  # h far below and above 0: (h, h, t, t)
    x = torch.randn(2, 4, 3, 3)
    z, ld = layer(x)
    torch.testing.assert_close(z[:, 2] / x[:, 2], torch.full_like(z[:, 2], torch.e ** -1))  # c = exp(0) = 1
    torch.testing.assert_close(z[:, 3] / x[:, 3], torch.full_like(z[:, 3], torch.e))
    torch.testing.assert_close(ld, torch.zeros(2), atol=1e-5, rtol=0)  # -1 and +1 per pixel cancel


def test_learned_split_prior_round_trip_and_log_det_given_the_kept_half():
    torch.manual_seed(0)
    prior = _randomized(LearnedSplitPrior(kept_channels=2, out_channels=3))
    h = torch.randn(4, 2, 3, 3, dtype=torch.float64)
    z_out = torch.randn(4, 3, 3, 3, dtype=torch.float64)
    eps, ld = prior(z_out, h)
    back, ld_inv = prior.inverse(eps, h)
    torch.testing.assert_close(back, z_out, atol=1e-12, rtol=0)
    torch.testing.assert_close(ld_inv, -ld, atol=1e-12, rtol=0)
    for i in range(4):
        jac = jacobian(lambda row: prior(row.unsqueeze(0), h[i : i + 1])[0][0], z_out[i])
        torch.testing.assert_close(torch.linalg.slogdet(jac.reshape(27, 27))[1], ld[i], atol=1e-10, rtol=0)


def test_permutation_survives_save_load():
    a, b = Permutation(10, seed=1), Permutation(10, seed=2)
    assert not torch.equal(a.order, b.order)
    b.load_state_dict(a.state_dict())
    assert torch.equal(a.order, b.order)


def test_actnorm_data_init_and_flag_survives_load():
    layer = ActNorm(3)
    x = torch.randn(64, 3, 4, 4) * torch.tensor([0.5, 2.0, 4.0]).view(1, 3, 1, 1) + 3
    z, _ = layer(x)
    torch.testing.assert_close(z.mean(dim=(0, 2, 3)), torch.zeros(3), atol=1e-5, rtol=0)
    torch.testing.assert_close(z.std(dim=(0, 2, 3), unbiased=False), torch.ones(3), atol=1e-4, rtol=0)
    fresh = ActNorm(3)
    fresh.load_state_dict(layer.state_dict())
    assert bool(fresh.initialized)
    z2, _ = fresh(torch.randn(8, 3, 4, 4))  # must not re-initialise on this batch
    torch.testing.assert_close(fresh.bias, layer.bias, atol=0, rtol=0)


def test_couplings_start_near_identity():
    x = torch.randn(2, 4, 4, 4)
    z, ld = affine_coupling2d(4, "checkerboard", 0, 8, 1).eval()(x)
    assert torch.equal(z, x) and torch.equal(ld, torch.zeros(2))  # tanh factor 0 and a zero last conv
    z, ld = affine_coupling2d(4, "channel", 0, 8, 1, scale="sigmoid").eval()(x)
    torch.testing.assert_close(z[:, 2:], x[:, 2:] * torch.sigmoid(torch.tensor(2.0)))  # Glow's sigmoid(h + 2)


def test_glow_coupling_inverts_in_float32_when_it_contracts_hard():
    # A trained Glow coupling can reach scale ~1e-5 beside shifts ~10. With x * scale + t the
    # inverse lost x to rounding (error ~0.01); Glow's (x + t) * scale keeps it to ~1e-6.
    layer = affine_coupling2d(4, "channel", 0, 8, 0, scale="sigmoid").eval()
    with torch.no_grad():
        layer.net.tail[-1].bias.copy_(torch.tensor([-12.0, -12.0, 10.0, -10.0]))  # (h, h, t, t)
    x = torch.randn(8, 4, 6, 6, generator=torch.Generator().manual_seed(0))
    z, ld = layer(x)
    assert ld.max() < -100  # it does contract: scale sigmoid(-10) on half the entries
    x_back, _ = layer.inverse(z)
    assert (x_back - x).abs().max() < 1e-4


def test_min_scale_bounds_the_glow_scale():
    layer = affine_coupling2d(4, "channel", 0, 8, 0, scale="sigmoid", min_scale=0.1).eval()
    with torch.no_grad():
        layer.net.tail[-1].bias.copy_(torch.tensor([-40.0, 40.0, 0.0, 0.0]))  # h far below and above 0
    x = torch.ones(1, 4, 1, 1)
    z, ld = layer(x)
    torch.testing.assert_close(z[0, 2:, 0, 0], torch.tensor([0.1, 1.0]))
    torch.testing.assert_close(ld, torch.log(torch.tensor([0.1])))
    with pytest.raises(ValueError, match="min_scale"):
        affine_coupling2d(4, "channel", 0, 8, 0, scale="tanh", min_scale=0.1)


def test_a_coupling_trains_after_it_was_evaluated_under_inference_mode():
    layer = affine_coupling2d(1, "checkerboard", 0, 4, 1)
    x = torch.rand(2, 1, 4, 4)
    with torch.inference_mode():
        layer(x)  # builds (and caches) the checkerboard mask as an inference tensor
    z, ld = layer(x)
    (z.sum() + ld.sum()).backward()  # would fail if the cached inference-mode mask were reused


def _mixture_with_parameters(logits, means, log_scales, a_pre: float, b: float, dtype) -> MixtureCoupling2d:
    """A 2-channel, channel-mask mixture coupling whose network outputs the given constants at every
    pixel (its last convolution's weights zero, its bias the parameters): with one transformed
    channel the output channels are (a's pre-activation, b, K logits, K means, K log-scales)."""
    layer = mixture_coupling2d(2, "channel", 0, 4, 0, mixtures=len(logits), net="gated").to(dtype)
    with torch.no_grad():
        layer.net.tail.bias.copy_(torch.tensor([a_pre, b, *logits, *means, *log_scales]))
    return layer


def test_mixture_coupling_starts_as_the_identity():
    """Zero last convolution: equal weights, means 0, scales 1, a = b = 0, so logit(F(x)) = x."""
    x = torch.randn(3, 4, 4, 4) * 5
    x[0, 0, 0, 0], x[0, 0, 0, 1] = 20.0, -20.0  # the far tails too
    for layer in (mixture_coupling2d(4, "checkerboard", 1, 8, 1, mixtures=5).eval(),
                  mixture_coupling2d(4, "channel", 0, 8, 1, mixtures=5, net="gated")):
        z, ld = layer(x)
        torch.testing.assert_close(z, x, atol=1e-5, rtol=0)
        torch.testing.assert_close(ld, torch.zeros(3), atol=1e-4, rtol=0)


@pytest.mark.parametrize("mask", ["checkerboard", "channel"])
def test_mixture_coupling_round_trip_in_float32_including_far_tails(mask):
    """float32, random non-zero weights (the zero-initialised last convolution too: means spread
    over about +-1.5, log-scales over about +-1.5, a up to about 0.9), random inputs with every
    seventh entry at +-20 and a few at +-15: the bisection inverse reconstructs x to below 1e-5
    (measured: at most 3.8e-6, two float32 spacings of x at 20)."""
    torch.manual_seed(0)
    layer = mixture_coupling2d(4, mask, 1, 8, 1, mixtures=4, net="gated", num_classes=3 if mask == "channel" else 0)
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(0.05 * torch.randn_like(p))
    y = torch.arange(16) % 3 if mask == "channel" else None
    x = torch.randn(16, 4, 6, 6) * 3
    x.view(-1)[::7] = 20.0 * torch.randn(x.numel())[::7].sign()
    x.view(-1)[3::50] = 15.0 * torch.randn(x.numel())[3::50].sign()
    z, ld = layer(x, y)
    assert torch.isfinite(z).all() and torch.isfinite(ld).all()
    assert (z - x).abs().max() > 1.0  # not the identity
    x_back, ld_inv = layer.inverse(z, y)
    assert (x_back - x).abs().max() < 1e-5
    torch.testing.assert_close(ld_inv, -ld, atol=1e-3, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("a_pre", [-40.0, 40.0])
def test_mixture_coupling_bisection_solves_for_extreme_parameters(dtype, a_pre):
    """Weights from 0.5 down to e^-32, means from -40 to 35, log-scales from the clamp (-7) to 6, a
    at its bound (+-1), and inputs and outputs up to 1e3 and 1e4 in size: the inverse finds the x
    with logit(F(x)) exp(a) + b = z to the precision of the dtype, in both orders of the round
    trip. Where such a mixture is flat between two sharp components no float can tell x apart,
    so the check is that the equation is solved: z comes back to within a few float spacings of
    z, or of x times the map's slope dz/dx there (each image is one pixel, so the per-sample
    log-det is that pixel's log slope)."""
    layer = _mixture_with_parameters([2.0, -30.0, 0.0, 1.5], [-40.0, -1.0, 0.5, 35.0], [-30.0, -7.0, 3.0, 6.0],
                                     a_pre, 100.0, dtype)
    eps = torch.finfo(dtype).eps
    generator = torch.Generator().manual_seed(0)
    a_part = torch.randn(64, 1, 1, 1, dtype=dtype, generator=generator)
    normal = torch.randn(2, 32, dtype=dtype, generator=generator)
    x_b = torch.cat([torch.linspace(-1e3, 1e3, 32, dtype=dtype), 20 * normal[0]])
    z_b = torch.cat([torch.linspace(-1e4, 1e4, 32, dtype=dtype), 50 * normal[1]])
    for start in (x_b, z_b):  # x -> z -> x -> z, and z -> x -> z
        z = torch.cat([a_part, start.view(64, 1, 1, 1)], 1)
        if start is x_b:
            z = layer(z)[0]
        x, ld_inv = layer.inverse(z)
        z_again, ld = layer(x)
        assert torch.isfinite(x).all() and torch.isfinite(ld).all() and torch.equal(x[:, :1], a_part)
        torch.testing.assert_close(ld_inv, -ld, atol=0, rtol=0)
        z_err = (z_again - z)[:, 1].flatten().abs()
        spacing = eps * (z[:, 1].flatten().abs() + 1 + ld.exp() * x[:, 1].flatten().abs())
        assert (z_err <= 8 * spacing).all(), (z_err / spacing).max()
        if start is x_b:  # and x comes back to within what z's rounding, divided by the slope, allows
            x_err = (x[:, 1].flatten() - x_b).abs()
            allowed = eps * ((z[:, 1].flatten().abs() + 1) * (-ld).exp() + x_b.abs())
            assert (x_err <= 8 * allowed).all(), (x_err / allowed).max()


def test_mixture_coupling_bad_arguments():
    with pytest.raises(ValueError, match="mixtures must be >= 1, found 0"):
        mixture_coupling2d(4, "channel", 0, 4, 0, mixtures=0)
    with pytest.raises(ValueError, match="a channel mask needs an even number of channels"):
        mixture_coupling2d(3, "channel", 0, 4, 0)
    with pytest.raises(ValueError, match="this flow is class-conditional"):
        mixture_coupling2d(4, "channel", 0, 4, 0, num_classes=3)(torch.randn(2, 4, 2, 2))


@pytest.mark.parametrize("kind", ["resnet", "gated"])
def test_coupling_nets_give_the_same_values_and_gradients_in_either_memory_format(kind):
    """On CPU the coupling networks compute in channels-last (faster convolutions); the result is
    that of the plain NCHW layers, in the usual contiguous layout."""
    from couplings.nn import coupling_net

    torch.manual_seed(0)
    net = coupling_net(kind, 2, 4, hidden=8, blocks=1)
    for p in net.parameters():  # the zeroed tail would hide differences
        torch.nn.init.normal_(p, std=0.3)
    x = torch.randn(3, 2, 6, 6, requires_grad=True)
    out = net(x)
    assert out.is_contiguous()
    (grad,) = torch.autograd.grad(out.square().sum(), x)
    plain = net._layers(x)
    (plain_grad,) = torch.autograd.grad(plain.square().sum(), x)
    torch.testing.assert_close(out, plain, rtol=1e-4, atol=1e-4)  # the convolutions sum in another order
    torch.testing.assert_close(grad, plain_grad, rtol=1e-4, atol=1e-4)
