"""Models: the pixel-space contract, NICE's paper configuration, and known-answer densities."""

from __future__ import annotations

import dataclasses
import math
import subprocess
import sys
from dataclasses import asdict

import pytest
import torch

from couplings import checkpoint
from couplings.likelihood import log_probs
from couplings.models import MODELS, NICE, Glow, RealNVP
from couplings.models.dequantization import VariationalDequantizer


def small_models():
    """One small instance of every pixel-space model, for the shared contract tests."""
    return {
        "nice-logistic": NICE(dim=784, couplings=4, hidden_layers=2, hidden_units=16),
        "nice-gaussian": NICE(dim=784, couplings=3, hidden_layers=1, hidden_units=8, prior="gaussian"),
        "nice-data-init": NICE(dim=784, couplings=2, hidden_layers=1, hidden_units=8, scale_init="data"),
        "realnvp": RealNVP(hidden=4, blocks=1),
        "glow": Glow(steps=2, hidden=4, blocks=1),
        "glow-fast-layers": Glow(steps=2, hidden=4, blocks=1, alpha=1e-5, net="gated", scale="bounded"),
        "realnvp-mixture": RealNVP(hidden=4, blocks=1, per_scale=1, final=2, coupling="mixture", mixtures=2),
        "glow-mixture": Glow(steps=1, hidden=4, blocks=1, net="gated", coupling="mixture", mixtures=2),
    }


def _perturbed(m):
    """Every parameter moved off its (often identity-like) initial value, ActNorm initialised."""
    m.train()
    with torch.no_grad():
        m.log_prob(torch.rand(16, *m.event_shape))  # ActNorm's data-dependent init, BN statistics
        for p in m.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return m.eval()


@pytest.fixture(params=sorted(small_models()))
def model(request):
    torch.manual_seed(0)
    return _perturbed(small_models()[request.param])


def test_nice_paper_parameter_count():
    assert sum(p.numel() for p in NICE().parameters()) == 19_158_352


def test_contract_shapes_and_log_prob_identity(model):
    x = torch.rand(5, 1, 28, 28)
    z, ld = model.transform(x)
    assert z.shape == (5, 784) and ld.shape == (5,)
    lp = model.log_prob(x)
    assert lp.shape == (5,)
    torch.testing.assert_close(lp, model.prior.log_prob(z).sum(-1) + ld)
    torch.testing.assert_close(model.log_prob(x.reshape(5, 784)), lp)  # flat inputs work too
    x_back, ld_inverse = model.inverse(z)
    torch.testing.assert_close(x_back, x, atol=1e-4, rtol=0)
    torch.testing.assert_close(ld_inverse, -ld, atol=1e-3, rtol=1e-5)  # the same contract as every layer
    assert model.sample(3).shape == (3, 1, 28, 28)
    samples, log_prob = model.sample_with_log_prob(3, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        torch.testing.assert_close(log_prob, model.log_prob(samples), atol=1e-2, rtol=1e-4)
    assert model.has_pixel_density and not model.conditional


def test_every_parameter_gets_a_gradient(model):
    model.train()
    model.log_prob(torch.rand(4, 1, 28, 28)).mean().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


def test_float64_including_sampling(model):
    model = model.double()
    x = torch.rand(3, 1, 28, 28, dtype=torch.float64)
    assert model.log_prob(x).dtype == torch.float64
    samples = model.sample(4, temperature=0.5)
    assert samples.dtype == torch.float64 and torch.isfinite(samples).all()
    z, _ = model.transform(x)
    torch.testing.assert_close(model.inverse(z)[0], x, atol=1e-12, rtol=0)


def test_temperature_scales_the_prior(model):
    g = lambda: torch.Generator().manual_seed(3)  # noqa: E731
    z_cold = model.prior.sample(5, 0.5, g())
    z_hot = model.prior.sample(5, 1.0, g())
    torch.testing.assert_close(z_cold, 0.5 * z_hot)
    with pytest.raises(ValueError, match="temperature"):
        model.sample(2, temperature=0.0)


def test_save_load_gives_equal_outputs(model, tmp_path):
    name = {NICE: "nice", RealNVP: "realnvp", Glow: "glow"}[type(model)]
    checkpoint.save(checkpoint.Checkpoint(name, asdict(model.config), model.state_dict()), tmp_path / "m.pt")
    loaded, _ = checkpoint.load_model(tmp_path / "m.pt")
    x = torch.rand(4, 1, 28, 28)
    torch.testing.assert_close(loaded.log_prob(x), model.eval().log_prob(x), atol=0, rtol=0)


def test_wrong_input_shape_is_a_clear_error(model):
    with pytest.raises(ValueError, match=r"expects inputs of shape \(B, 1, 28, 28\) or \(B, 784\), found \(2, 1, 27, 27\)"):
        model.log_prob(torch.rand(2, 1, 27, 27))


def test_nice_data_init_spreads_the_first_batch_like_the_prior():
    torch.manual_seed(0)
    model = NICE(dim=784, couplings=2, hidden_layers=1, hidden_units=8, scale_init="data")
    x = torch.rand(256, 784) / 256 + (torch.rand(256, 784) < 0.2)  # mostly dequantization noise, like MNIST
    model.train()
    model.log_prob(x)
    z, _ = model.transform(x)
    torch.testing.assert_close(z.std(dim=0, unbiased=False), torch.full((784,), math.pi / math.sqrt(3)), rtol=1e-3, atol=0)
    assert float(model.flow.transforms[-1].log_scale.abs().min()) > 0.1  # not the paper's s = 0
    with pytest.raises(ValueError, match="scale_init"):
        NICE(scale_init="ones")


@pytest.mark.parametrize("prior", ["logistic", "gaussian"])
def test_nice_density_integrates_to_one_in_2d(prior):
    torch.manual_seed(0)
    model = NICE(dim=2, couplings=4, hidden_layers=2, hidden_units=8, prior=prior).double()
    with torch.no_grad():
        model.flow.transforms[-1].log_scale.copy_(torch.tensor([0.3, -0.2]))
    side = torch.linspace(-40, 40, 1601, dtype=torch.float64)
    grid = torch.cartesian_prod(side, side)
    with torch.no_grad():
        density = model.log_prob(grid).exp()
    cell = (side[1] - side[0]) ** 2
    assert abs(float(density.sum() * cell) - 1.0) < 2e-3


@pytest.mark.parametrize("cls", [RealNVP, Glow])
@pytest.mark.parametrize("shape", [(1, 4, 4), (1, 8, 8), (2, 4, 8)])
def test_multiscale_log_det_matches_the_whole_model_jacobian(cls, shape):
    torch.manual_seed(0)
    kwargs = {"image_shape": shape, "hidden": 4, "blocks": 1}
    kwargs.update({"scales": 2} if cls is RealNVP else {"levels": 2, "steps": 2})
    m = _perturbed(cls(**kwargs)).double()
    x = torch.rand(2, *shape, dtype=torch.float64) * 0.9 + 0.05
    z, ld = m.transform(x)
    for i in range(2):
        jac = torch.autograd.functional.jacobian(lambda row: m.transform(row.unsqueeze(0))[0][0], x[i])
        _, expected = torch.linalg.slogdet(jac.reshape(z.shape[1], -1))
        torch.testing.assert_close(ld[i], expected, atol=1e-8, rtol=0)
    torch.testing.assert_close(m.inverse(z)[0], x, atol=1e-10, rtol=0)


def test_multiscale_structure_and_parameter_counts():
    r = RealNVP()
    kinds = [type(t).__name__ for t in r.levels[0].transforms]
    assert kinds == ["AffineCoupling2d", "BatchNormFlow"] * 3 + ["Squeeze"] + ["AffineCoupling2d", "BatchNormFlow"] * 3
    assert [type(t.mask).__name__ for t in r.levels[0].transforms if hasattr(t, "mask")] == ["Checkerboard"] * 3 + ["ChannelSplit"] * 3
    assert len(r.final.transforms) == 8 and r.out_shapes == [(2, 14, 14), (4, 7, 7), (4, 7, 7)]
    assert sum(p.numel() for p in r.parameters()) == 9_587_131
    g = Glow()
    assert g.out_shapes == [(2, 14, 14), (8, 7, 7)]
    assert sum(p.numel() for p in g.parameters()) == 9_821_516
    with pytest.raises(ValueError, match="divide by 2"):
        RealNVP(image_shape=(1, 6, 6))


def test_actnorm_initialisation_survives_a_checkpoint(tmp_path):
    torch.manual_seed(0)
    g = Glow(image_shape=(1, 8, 8), steps=2, hidden=4, blocks=0)
    g.train()
    g.log_prob(torch.rand(8, 1, 8, 8))
    checkpoint.save(checkpoint.Checkpoint("glow", asdict(g.config), g.state_dict()), tmp_path / "g.pt")
    loaded, _ = checkpoint.load_model(tmp_path / "g.pt")
    loaded.train()
    x = torch.rand(4, 1, 8, 8) * 5  # a batch unlike the first: re-initialising would change outputs
    torch.testing.assert_close(loaded.transform(x)[0], g.transform(x)[0])


@pytest.mark.parametrize("name", ["realnvp", "glow"])
def test_presets_build(name):
    entry = MODELS[name]
    assert list(entry.presets)[0] == "mnist" and "small" in entry.presets
    for size in entry.presets:
        model_part, train_part = entry.preset(size)
        entry.cls(**model_part)
        assert set(train_part) <= {f.name for f in dataclasses.fields(entry.train_config)}
    if name == "realnvp":
        model_part, train_part = entry.preset("fast")
        assert entry.cls(**model_part).dequantizer is not None and train_part == {"grad_clip": 500.0, "precision": "auto"}
    model = entry.cls(entry.config(**entry.presets["small"]))
    assert model.event_shape == (1, 28, 28)
    assert model.config == entry.cls(**entry.presets["small"]).config  # a config or its fields as keywords


def test_models_and_transforms_import_no_data_training_processes_cli_or_report():
    code = ("import sys, couplings.models, couplings.transforms; "
            "print(sorted(m for m in sys.modules if m.startswith('couplings.')))")
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    for name in ("couplings.data", "couplings.training", "couplings.distributed", "couplings.cli", "couplings.report",
                 "couplings.checkpoint"):
        assert f"'{name}" not in loaded, loaded


def test_variational_dequantizer_starts_uniform_and_its_log_q_is_its_jacobian():
    torch.manual_seed(0)
    deq = VariationalDequantizer(1, couplings=2, hidden=4, blocks=1).double()
    noise = torch.rand(3, 1, 4, 4, dtype=torch.float64) * 0.98 + 0.01
    pixels = torch.randint(0, 256, (3, 1, 4, 4)).double()
    u, log_q = deq(noise, pixels)
    torch.testing.assert_close(u, noise, atol=1e-12, rtol=0)  # zero-initialised couplings: q is uniform
    torch.testing.assert_close(log_q, torch.zeros(3, dtype=torch.float64), atol=1e-12, rtol=0)
    with torch.no_grad():
        for p in deq.parameters():
            p.add_(0.3 * torch.randn_like(p))
    u, log_q = deq(noise, pixels)
    assert ((u > 0) & (u < 1)).all()
    for i in range(3):  # log q(u | k) = log 1 - log |det du/d noise|
        jac = torch.autograd.functional.jacobian(lambda row: deq(row.unsqueeze(0), pixels[i : i + 1])[0][0], noise[i])
        torch.testing.assert_close(log_q[i], -torch.linalg.slogdet(jac.reshape(16, 16))[1], atol=1e-9, rtol=0)
    assert not torch.allclose(deq(noise, pixels.flip(0))[0], u)  # conditioned on the image


def test_a_variationally_dequantized_model_scores_its_bound_and_the_importance_weighted_estimate():
    torch.manual_seed(0)
    model = _perturbed(RealNVP(image_shape=(1, 4, 4), scales=1, hidden=4, blocks=1, per_scale=1, final=1,
                               net="gated", scale="bounded", batch_norm=False, alpha=1e-5,
                               dequantization="variational", dequant_hidden=4)).double()
    assert model.dequantizer is not None and any(n.startswith("dequantizer.") for n, _ in model.named_parameters())
    pixels = torch.randint(0, 256, (5, 4, 4), dtype=torch.uint8)
    # The bound of one draw: log p(x) - log q(u | k) at x = (k + u) / 256, u from the dequantizer.
    generator = torch.Generator().manual_seed(3)
    noise = torch.rand(5, 1, 4, 4, generator=generator, dtype=torch.float64)
    u, log_q = model.dequantizer(noise, pixels.unsqueeze(1).double())
    with torch.no_grad():
        expected = model.log_prob((pixels.unsqueeze(1).double() + u) / 256) - log_q
    torch.testing.assert_close(log_probs(model, pixels, seed=3), expected, atol=1e-9, rtol=0)
    # K draws: log mean exp of the K bounds, never below their mean (Jensen).
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        draws = torch.stack([model.pixel_log_prob(pixels.unsqueeze(1), torch.rand(5, 1, 4, 4, generator=generator,
                                                                                  dtype=torch.float64))
                             for _ in range(4)])
    weighted = log_probs(model, pixels, seed=3, importance_samples=4)
    torch.testing.assert_close(weighted, torch.logsumexp(draws, 0) - math.log(4), atol=1e-9, rtol=0)
    assert (weighted >= draws.mean(0) - 1e-9).all()
    model.train()
    model.pixel_log_prob(pixels.unsqueeze(1), noise).mean().backward()
    assert all(p.grad is not None for p in model.dequantizer.parameters())  # trained by the same loss


def test_class_conditional_glow_has_a_prior_per_class():
    torch.manual_seed(0)
    g = _perturbed_conditional(Glow(image_shape=(1, 8, 8), steps=2, hidden=4, blocks=0, num_classes=3))
    assert g.conditional and g.num_classes == 3
    x = torch.rand(3, 1, 8, 8, dtype=torch.float64)
    y = torch.tensor([0, 1, 2])
    z, ld = g.transform(x, y)
    for i in range(3):  # the whole model's log-det, given the label, is its Jacobian's
        jac = torch.autograd.functional.jacobian(lambda row: g.transform(row.unsqueeze(0), y[i : i + 1])[0][0], x[i])
        torch.testing.assert_close(ld[i], torch.linalg.slogdet(jac.reshape(64, 64))[1], atol=1e-8, rtol=0)
    back, ld_inv = g.inverse(z, y)
    torch.testing.assert_close(back, x, atol=1e-10, rtol=0)
    torch.testing.assert_close(ld_inv, -ld, atol=1e-8, rtol=0)
    assert not torch.allclose(g.log_prob(x, y), g.log_prob(x, y.roll(1)))  # the label changes the density
    samples = g.sample(4, torch.tensor([2, 2, 0, 1]), generator=torch.Generator().manual_seed(0))
    assert samples.shape == (4, 1, 8, 8) and torch.isfinite(samples).all()
    with pytest.raises(ValueError, match="class-conditional: expected labels"):
        g.log_prob(x)


def _perturbed_conditional(g):
    g = g.double().train()
    with torch.no_grad():
        g.log_prob(torch.rand(16, *g.event_shape, dtype=torch.float64), torch.arange(16) % g.num_classes)
        for p in g.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return g.eval()


def test_class_conditional_glow_can_learn_a_template_per_class():
    """class_prior="position": the top latent's mean and scale per class, channel and position."""
    torch.manual_seed(0)
    g = _perturbed_conditional(Glow(image_shape=(1, 8, 8), steps=2, hidden=4, blocks=0, num_classes=3,
                                    class_prior="position"))
    prior = g.final.transforms[-1]
    assert prior.shape == (2, 2) and prior.embedding.weight.shape == (3, 2 * 8 * 4)  # 8 channels at 2x2
    x, y = torch.rand(3, 1, 8, 8, dtype=torch.float64), torch.tensor([0, 1, 2])
    z, ld = g.transform(x, y)
    for i in range(3):
        jac = torch.autograd.functional.jacobian(lambda row: g.transform(row.unsqueeze(0), y[i : i + 1])[0][0], x[i])
        torch.testing.assert_close(ld[i], torch.linalg.slogdet(jac.reshape(64, 64))[1], atol=1e-8, rtol=0)
    back, _ = g.inverse(z, y)
    torch.testing.assert_close(back, x, atol=1e-10, rtol=0)
    with torch.no_grad():  # one class's mean at one position moves that position's latent, and only there
        z0 = g.transform(x[:1], y[:1])[0]
        prior.embedding.weight[0, 0] += 1.0
        moved = (g.transform(x[:1], y[:1])[0] - z0).abs() > 1e-9
    assert moved.sum() == 1
    with pytest.raises(ValueError, match="class_prior must be one of"):
        Glow(image_shape=(1, 8, 8), num_classes=3, class_prior="pixel")


def test_glow_class_couplings_give_every_coupling_network_the_label():
    """class_couplings=true: each coupling network also sees one-hot label maps; still exact."""
    torch.manual_seed(0)
    g = _perturbed_conditional(Glow(image_shape=(1, 8, 8), steps=2, hidden=4, blocks=0, num_classes=3,
                                    class_couplings=True, scale="bounded", net="gated"))
    x, y = torch.rand(3, 1, 8, 8, dtype=torch.float64), torch.tensor([0, 1, 2])
    z, ld = g.transform(x, y)
    for i in range(3):
        jac = torch.autograd.functional.jacobian(lambda row: g.transform(row.unsqueeze(0), y[i : i + 1])[0][0], x[i])
        torch.testing.assert_close(ld[i], torch.linalg.slogdet(jac.reshape(64, 64))[1], atol=1e-8, rtol=0)
    torch.testing.assert_close(g.inverse(z, y)[0], x, atol=1e-10, rtol=0)
    prior = g.final.transforms[-1]
    with torch.no_grad():  # with the prior's embedding at zero, the label still moves z: through the couplings
        prior.embedding.weight.zero_()
        assert not torch.allclose(g.transform(x, y)[0], g.transform(x, y.roll(1))[0])
    with pytest.raises(ValueError, match="class_couplings=true needs a class-conditional model"):
        Glow(image_shape=(1, 8, 8), class_couplings=True)


def test_glow_class_loss_classifies_the_top_latent_and_stays_out_of_the_density():
    """class_loss_weight=w: w D cross-entropy (nats) of a linear classifier of the top latent's
    channel means (the latent before its class prior); log p(x | y) does not depend on it."""
    torch.manual_seed(0)
    g = _perturbed_conditional(Glow(image_shape=(1, 8, 8), steps=2, hidden=4, blocks=0, num_classes=3,
                                    class_prior="position", class_loss_weight=0.05))
    pixels, noise, y = torch.randint(0, 256, (6, 1, 8, 8)), torch.rand(6, 1, 8, 8), torch.tensor([0, 1, 2, 0, 1, 2])
    log_p, z = g.pixel_log_prob_and_latent(pixels, noise, y)
    torch.testing.assert_close(log_p, g.pixel_log_prob(pixels, noise, y))
    with torch.no_grad():
        g.classifier.weight.zero_()
        g.classifier.bias.zero_()
    torch.testing.assert_close(g.class_loss(z, y), torch.tensor(0.05 * 64 * math.log(3), dtype=torch.float64))  # uniform over 3 classes
    with torch.no_grad():  # the classifier's input is the top latent before the prior: h = z sigma(y) + mu(y)
        top = g.final.transforms[-1].inverse(z[:, -32:].reshape(6, 8, 2, 2), y)[0]
        g.classifier.weight.normal_()
        expected = 0.05 * 64 * torch.nn.functional.cross_entropy(g.classifier(top.mean(dim=(2, 3))), y)
        torch.testing.assert_close(g.class_loss(z, y), expected)
        torch.testing.assert_close(g.pixel_log_prob(pixels, noise, y), log_p)  # the density ignores the classifier
    g.zero_grad()
    g.class_loss(g.pixel_log_prob_and_latent(pixels, noise, y)[1], y).backward()
    flow_grads = [p.grad for name, p in g.named_parameters() if not name.startswith("classifier.")]
    assert any(grad is not None and grad.abs().sum() > 0 for grad in flow_grads)  # it trains the flow too
    assert Glow(image_shape=(1, 8, 8), num_classes=3).class_loss(z, y) is None
    with pytest.raises(ValueError, match="class_loss_weight must be >= 0, and > 0 only with num_classes"):
        Glow(image_shape=(1, 8, 8), class_loss_weight=0.1)
    with pytest.raises(ValueError, match="class_loss_weight needs class_couplings=false"):
        Glow(image_shape=(1, 8, 8), num_classes=3, class_couplings=True, class_loss_weight=0.1)


def test_class_log_likelihoods_are_the_density_under_every_class():
    """Column c of class_log_likelihoods(x) is log p(x | c), so its softmax is Bayes' rule."""
    torch.manual_seed(0)
    g = _perturbed_conditional(Glow(image_shape=(1, 8, 8), steps=2, hidden=4, blocks=0, num_classes=3,
                                    class_couplings=True, class_prior="position"))
    x = torch.rand(4, 1, 8, 8, dtype=torch.float64)
    table = g.class_log_likelihoods(x)
    assert table.shape == (4, 3)
    for c in range(3):
        torch.testing.assert_close(table[:, c], g.log_prob(x, torch.full((4,), c)))
    assert not torch.allclose(table[:, 0], table[:, 1])  # the classes differ, so the classifier has something to read
    with pytest.raises(ValueError, match="needs a class-conditional model"):
        Glow(image_shape=(1, 8, 8), steps=1, hidden=4, blocks=0).class_log_likelihoods(x)


MIXTURE_MODELS = {  # tiny models whose couplings are all Flow++'s logistic-mixture CDF couplings
    "realnvp": lambda: RealNVP(image_shape=(1, 8, 8), scales=2, hidden=4, blocks=1, per_scale=2, final=2,
                               coupling="mixture", mixtures=3),
    "glow": lambda: Glow(image_shape=(1, 8, 8), levels=2, steps=2, hidden=4, blocks=1, net="gated",
                         coupling="mixture", mixtures=3),
    "glow-labelled": lambda: Glow(image_shape=(1, 8, 8), levels=2, steps=2, hidden=4, blocks=0, coupling="mixture",
                                  mixtures=2, num_classes=3, class_couplings=True),
}


@pytest.mark.parametrize("name", sorted(MIXTURE_MODELS))
def test_mixture_coupling_models_round_trip_score_and_train(name):
    """coupling="mixture": every coupling is a `MixtureCoupling2d`; the float32 round trip (the
    inverse by bisection) and finite log_prob, the whole model's float64 log-det against its
    Jacobian, and one Adam step on the loss leaves every parameter, the loss and samples finite."""
    torch.manual_seed(0)
    model = MIXTURE_MODELS[name]().train()
    kinds = [type(m).__name__ for m in model.modules()]
    assert "MixtureCoupling2d" in kinds and "AffineCoupling2d" not in kinds
    labels = (lambda n: torch.arange(n) % 3) if model.conditional else (lambda n: None)  # noqa: E731
    with torch.no_grad():  # ActNorm's data-dependent init, batch-norm statistics, then every weight moved
        model.log_prob(torch.rand(16, 1, 8, 8), labels(16))
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    model.eval()
    x, y = torch.rand(6, 1, 8, 8), labels(6)
    z, ld = model.transform(x, y)
    log_p = model.log_prob(x, y)
    assert torch.isfinite(z).all() and torch.isfinite(log_p).all()
    x_back, ld_inv = model.inverse(z, y)
    assert (x_back - x).abs().max() < 1e-5  # measured: 4e-7 to 1.1e-6
    torch.testing.assert_close(ld_inv, -ld, atol=1e-3, rtol=1e-5)

    model64 = MIXTURE_MODELS[name]()  # the same weights in float64: the log-det is the Jacobian's
    model64.load_state_dict(model.state_dict())
    model64 = model64.double().eval()
    x64, y64 = x[:2].double(), labels(2)
    z64, ld64 = model64.transform(x64, y64)
    for i in range(2):
        y_i = None if y is None else y64[i : i + 1]
        jac = torch.autograd.functional.jacobian(lambda row: model64.transform(row.unsqueeze(0), y_i)[0][0], x64[i])
        torch.testing.assert_close(ld64[i], torch.linalg.slogdet(jac.reshape(64, 64))[1], atol=1e-8, rtol=0)
    torch.testing.assert_close(model64.inverse(z64, y64)[0], x64, atol=1e-10, rtol=0)

    model.train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    loss = -model.log_prob(x, y).mean()
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    optimizer.step()
    assert all(torch.isfinite(p).all() for p in model.parameters())
    model.eval()
    with torch.no_grad():
        assert torch.isfinite(model.log_prob(x, y)).all()
        assert not torch.equal(model.log_prob(x, y), log_p)  # the step did change the model
        samples = model.sample(3, labels(3), generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(samples).all()


@pytest.mark.parametrize("name", ["realnvp", "glow"])
def test_the_coupling_option_is_checked_and_affine_stays_the_default(name):
    config = MODELS[name].config
    assert config().coupling == "affine" and config().mixtures == 8
    with pytest.raises(ValueError, match="coupling must be one of affine, mixture; found 'spline'"):
        config(coupling="spline")
    with pytest.raises(ValueError, match="mixtures must be >= 1, found 0"):
        config(coupling="mixture", mixtures=0)
