"""LatentRealNVP: autoencoder shapes, the conditional flow's contract, and its CLI."""

from __future__ import annotations

import json
import math
from dataclasses import asdict

import pytest
import torch

from couplings import checkpoint, data
from couplings.cli import main
from couplings.likelihood import bits_per_dim
from couplings.models import LatentRealNVP


@pytest.fixture
def model():
    torch.manual_seed(0)
    m = LatentRealNVP(couplings=3, hidden_units=16)
    with torch.no_grad():  # move the zero-initialised coupling outputs so that every layer acts
        for name, p in m.named_parameters():
            if name.startswith("flow."):
                p.add_(0.05 * torch.randn_like(p))
    return m.eval()


def test_default_architecture():
    m = LatentRealNVP()
    assert m.config.embedding_dim == 20 and m.config.couplings == 9 and m.config.conditional
    kinds = [type(t).__name__ for t in m.flow.transforms]
    assert kinds == ["AffineCoupling", "BatchNormFlow", "Permutation"] * 9
    assert m.autoencoder.encode(torch.rand(2, 1, 28, 28)).shape == (2, 20)
    assert m.autoencoder.decode(torch.randn(2, 20)).shape == (2, 1, 28, 28)


def test_contract_and_flow_round_trip(model):
    x, y = torch.rand(4, 1, 28, 28), torch.tensor([0, 3, 3, 9])
    z, ld = model.transform(x, y)
    assert z.shape == (4, 20) and ld.shape == (4,)
    torch.testing.assert_close(model.log_prob(x, y), model.prior.log_prob(z).sum(-1) + ld)
    e = model.autoencoder.encode(x)
    e_back, _ = model.flow.inverse(z, model.context(y, 4))
    torch.testing.assert_close(e_back, e, atol=1e-5, rtol=0)
    assert model.inverse(z, y)[0].shape == (4, 1, 28, 28)


def test_labels_are_required_and_checked(model):
    x = torch.rand(2, 1, 28, 28)
    with pytest.raises(ValueError, match="class-conditional"):
        model.log_prob(x)
    with pytest.raises(ValueError, match=r"labels of shape \(2,\) in 0..9"):
        model.log_prob(x, torch.tensor([1, 10]))


def test_sample_log_prob_matches_the_density_of_the_embedding(model):
    model = model.double()
    y = torch.arange(6) % 10
    images, log_prob = model.sample_with_log_prob(6, y, temperature=0.8, generator=torch.Generator().manual_seed(0))
    assert images.shape == (6, 1, 28, 28) and images.dtype == torch.float64
    assert images.min() >= 0 and images.max() <= 1
    z = 0.8 * torch.randn(6, 20, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    e, _ = model.flow.inverse(z, model.context(y, 6))
    torch.testing.assert_close(log_prob, model.embedding_log_prob(e, y))


def test_unconditional_mode(model):
    m = LatentRealNVP(couplings=2, hidden_units=8, conditional=False).eval()
    x = torch.rand(3, 1, 28, 28)
    assert m.log_prob(x).shape == (3,)
    assert m.sample(5).shape == (5, 1, 28, 28)


def test_embedding_density_integrates_to_one_in_2d():
    torch.manual_seed(1)
    m = LatentRealNVP(embedding_dim=2, couplings=3, hidden_units=8, conditional=False).double().eval()
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name.startswith("flow."):
                p.add_(0.2 * torch.randn_like(p))
    side = torch.linspace(-12, 12, 801, dtype=torch.float64)
    grid = torch.cartesian_prod(side, side)
    with torch.no_grad():
        mass = m.embedding_log_prob(grid).exp().sum() * (side[1] - side[0]) ** 2
    assert abs(float(mass) - 1) < 2e-3


def test_every_parameter_gets_a_gradient(model):
    model.train()
    x, y = torch.rand(8, 1, 28, 28), torch.arange(8)
    (model.autoencoder.loss(x) - model.log_prob(x, y).mean()).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_no_pixel_bits_per_dim(model):
    with pytest.raises(TypeError, match="no pixel log-likelihood"):
        bits_per_dim(model, torch.zeros(2, 28, 28, dtype=torch.uint8))


def test_save_load_gives_equal_outputs(model, tmp_path):
    checkpoint.save(checkpoint.Checkpoint("latent-realnvp", asdict(model.config), model.state_dict()), tmp_path / "m.pt")
    loaded, _ = checkpoint.load_model(tmp_path / "m.pt")
    x, y = torch.rand(3, 1, 28, 28), torch.tensor([1, 2, 3])
    torch.testing.assert_close(loaded.log_prob(x, y), model.log_prob(x, y), atol=0, rtol=0)


TINY = ["--dataset", "tiny", "--set", "size=small", "--set", "val_size=50", "--set", "ae_epochs=1",
        "--epochs", "1", "--batch-size", "25", "--device", "cpu", "--quiet"]


def test_cli_two_stages_eval_and_sample(tiny_dataset, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "latent-realnvp", "--out", str(run), *TINY]) == 0
    stages = [json.loads(line)["stage"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert stages == ["autoencoder", "flow"]
    assert (run / "best.pt").is_file() and checkpoint.load(run / "last.pt").stage == "flow"
    # Resuming a finished run with more flow epochs trains only the flow.
    assert main(["train", "latent-realnvp", "--out", str(run), "--resume", "--epochs", "2", "--quiet"]) == 0
    stages = [json.loads(line)["stage"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert stages == ["autoencoder", "flow", "flow"]
    capsys.readouterr()

    assert main(["eval", str(run), "--device", "cpu", "--samples", "0"]) == 0
    assert "latent density: no pixel bits/dim" in capsys.readouterr().out
    result = json.loads((run / "eval.json").read_text())["test"]
    assert result["bits_per_dim"] is None
    # The latent NLL, recomputed here: the flow's density of each test image's embedding given its label.
    model, _ = checkpoint.load_model(run)
    images, labels = data.load("tiny", "test")
    x = torch.as_tensor(images).unsqueeze(1).float() / 255
    with torch.no_grad():
        nll = -model.embedding_log_prob(model.autoencoder.encode(x), torch.as_tensor(labels).long()).double().mean()
    assert result["latent_nll_nats"] == pytest.approx(float(nll), rel=1e-6)
    assert result["latent_nll_nats"] > -1e3 and result["num_images"] == 100

    assert main(["sample", str(run), "--label", "3", "-n", "5", "-o", str(tmp_path / "three.png")]) == 0
    assert main(["sample", str(run), "-n", "4", "-o", str(tmp_path / "grid.png")]) == 0
    from PIL import Image

    assert Image.open(tmp_path / "grid.png").size[1] > 4 * Image.open(tmp_path / "three.png").size[1]


def test_cli_label_errors(tiny_dataset, tmp_path, capsys):
    assert main(["train", "nice", "--out", str(tmp_path / "nice"), "--dataset", "tiny", "--set", "size=small",
                 "--set", "val_size=50", "--max-steps", "1", "--quiet"]) == 0
    assert main(["sample", str(tmp_path / "nice"), "--label", "3", "-o", str(tmp_path / "x.png")]) == 2
    assert "needs a class-conditional model" in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:
        main(["sample", str(tmp_path / "nice"), "--label", "10", "-o", str(tmp_path / "x.png")])
    assert info.value.code == 2 and not (tmp_path / "x.png").exists()


def test_class_prior_round_trips_and_its_density_integrates_to_one_per_class():
    torch.manual_seed(2)
    m = LatentRealNVP(embedding_dim=2, couplings=2, hidden_units=8, num_classes=3, class_prior=True).double().eval()
    with torch.no_grad():
        for name, p in m.named_parameters():
            if not name.startswith("autoencoder."):
                p.add_(0.3 * torch.randn_like(p))
    x, y = torch.rand(4, 1, 28, 28, dtype=torch.float64), torch.tensor([0, 1, 2, 1])
    z, ld = m.transform(x, y)
    torch.testing.assert_close(m.log_prob(x, y), m.prior.log_prob(z).sum(-1) + ld)
    h, _ = m.class_prior.inverse(z, y)
    torch.testing.assert_close(m.flow.inverse(h, m.context(y, 4))[0], m.autoencoder.encode(x), atol=1e-10, rtol=0)
    assert m.inverse(z, y)[0].shape == (4, 1, 28, 28)
    side = torch.linspace(-15, 15, 601, dtype=torch.float64)
    grid = torch.cartesian_prod(side, side)
    for label in range(3):
        with torch.no_grad():
            density = m.embedding_log_prob(grid, torch.full((len(grid),), label)).exp()
        assert abs(float(density.sum() * (side[1] - side[0]) ** 2) - 1) < 2e-3
    with pytest.raises(ValueError, match="class_prior needs a class-conditional model"):
        LatentRealNVP(conditional=False, class_prior=True)


def test_class_prior_sample_log_prob_matches_the_density_of_the_embedding():
    torch.manual_seed(3)
    m = LatentRealNVP(couplings=2, hidden_units=8, class_prior=True).double().eval()
    with torch.no_grad():
        for name, p in m.named_parameters():
            if not name.startswith("autoencoder."):
                p.add_(0.1 * torch.randn_like(p))
    y = torch.arange(5)
    _, log_prob = m.sample_with_log_prob(5, y, generator=torch.Generator().manual_seed(0))
    z = torch.randn(5, 20, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    h, _ = m.class_prior.inverse(z, y)
    e, _ = m.flow.inverse(h, m.context(y, 5))
    torch.testing.assert_close(log_prob, m.embedding_log_prob(e, y))


def test_presets_default_is_the_measured_recipe_and_origin_the_seed_projects():
    from couplings.models import MODELS

    entry = MODELS["latent-realnvp"]
    assert next(iter(entry.presets)) == "default"
    model, train = entry.preset("default")
    assert model == {"hidden_units": 256, "class_prior": True, "ae_channels": 64}
    assert train == {"lr": 1e-3, "epochs": 20, "ae_lr": 3e-3}
    model, train = entry.preset("origin")
    assert model == {} and train == {"epochs": 20}  # 9 couplings x 100 units, Adam 1e-4, 10 + 20 epochs
    assert LatentRealNVP().config.couplings == 9 and entry.train_config().lr == 1e-4


def test_each_stage_counts_its_own_learning_rate_schedule(tiny_dataset, tmp_path, monkeypatch):
    """The autoencoder's cosine runs over its own epochs, and the flow's cosine starts at its full
    rate at the flow's first step (not part-way through, counted from the autoencoder's steps)."""
    from couplings.training import loop

    factors = []

    def recording(optimizer, loss, *, grad_clip, lr_factor):
        factors.append(lr_factor)
        return real(optimizer, loss, grad_clip=grad_clip, lr_factor=lr_factor)

    real = loop.optimizer_step
    monkeypatch.setattr(loop, "optimizer_step", recording)
    options = ["--set", "ae_epochs=2", "--epochs", "2", "--set", "ae_lr_schedule=cosine", "--set", "lr_schedule=cosine"]
    assert main(["train", "latent-realnvp", "--out", str(tmp_path / "run"), *TINY, *options]) == 0
    per_epoch = (len(data.load("tiny", "train")[0]) - 50) // 25
    cosine = [0.5 * (1 + math.cos(math.pi * s / (2 * per_epoch))) for s in range(2 * per_epoch)]
    assert factors == pytest.approx(cosine + cosine)


def test_autoencoder_width_is_an_option():
    narrow, origin = LatentRealNVP(ae_channels=8), LatentRealNVP(ae_channels=32)
    assert narrow.autoencoder.encoder[0].out_channels == 8 and narrow.autoencoder.encoder[2].out_channels == 16
    assert narrow.autoencoder.decode(narrow.autoencoder.encode(torch.rand(2, 1, 28, 28))).shape == (2, 1, 28, 28)
    assert origin.autoencoder.encoder[0].out_channels == 32  # the seed project's
    with pytest.raises(ValueError, match="ae_channels"):
        LatentRealNVP(ae_channels=0)


def test_encoder_convolutions_can_be_bias_free_as_in_the_seed_projects_demo():
    encoder = LatentRealNVP(ae_conv_bias=False).autoencoder.encoder
    assert encoder[0].bias is None and encoder[2].bias is None and encoder[5].bias is not None  # the linear keeps its
    assert LatentRealNVP().autoencoder.encoder[0].bias is not None
