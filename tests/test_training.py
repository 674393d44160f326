"""couplings.training: planning a run, options a trainer does not read, and the run-directory lock."""

from __future__ import annotations

import math
import re
import signal
import subprocess
import time

import pytest
import torch

from conftest import cli_child
from couplings import checkpoint
from couplings.cli import main
from couplings.config import ConfigError, LatentTrainConfig, PixelTrainConfig
from couplings.training import plan_run, train

LATENT = ["--dataset", "tiny", "--set", "size=small", "--set", "val_size=50", "--set", "ae_epochs=1",
          "--epochs", "1", "--batch-size", "25", "--device", "cpu", "--quiet"]
NICE = ["--dataset", "tiny", "--set", "size=small", "--set", "hidden_units=32", "--set", "val_size=50",
        "--set", "samples_per_epoch=4", "--batch-size", "40", "--device", "cpu", "--quiet"]

# Every option the pixel trainer reads and the latent trainer does not, as the CLI takes it.
PIXEL_ONLY = {
    "compile": ["--compile"],
    "precision": ["--precision", "bf16"],
    "channels_last": ["--channels-last"],
    "adam": ["--set", "adam=fused"],
    "target_bpd": ["--set", "target_bpd=1.5"],
    "samples_per_epoch": ["--set", "samples_per_epoch=8"],
    "eval_batch_size": ["--set", "eval_batch_size=10"],
    "wn_l2": ["--set", "wn_l2=0.001"],
    "ema_decay": ["--set", "ema_decay=0.999"],
    "init_from": ["--set", "init_from=pretrained:nice-small-mnist"],
    "discriminative_weight": ["--set", "discriminative_weight=0.1"],
    "discriminative_images": ["--set", "discriminative_images=4"],
}


def test_the_table_covers_every_pixel_only_option():
    pixel = {f for f in PixelTrainConfig.__dataclass_fields__}
    latent = {f for f in LatentTrainConfig.__dataclass_fields__}
    assert set(PIXEL_ONLY) == pixel - latent


@pytest.mark.parametrize("option", sorted(PIXEL_ONLY))
def test_an_option_the_latent_trainer_does_not_read_is_refused(tiny_dataset, tmp_path, capsys, option):
    out = tmp_path / "run"
    capsys.readouterr()
    try:
        code = main(["train", "latent-realnvp", "--out", str(out), *LATENT, *PIXEL_ONLY[option]])
    except SystemExit as e:
        code = e.code
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and err.startswith("error: "), err
    assert option in err and "latent-realnvp" in err
    assert not out.exists()  # nothing written


def test_the_python_api_refuses_them_too(tiny_dataset, tmp_path):
    with pytest.raises(ConfigError, match="compile: not an option of latent-realnvp"):
        train("latent-realnvp", tmp_path / "run", train_overrides={"compile": True})
    assert not (tmp_path / "run").exists()


def test_plan_run_checks_the_dataset_and_writes_nothing(tiny_dataset, tmp_path):
    with pytest.raises(ConfigError, match="dataset must be one of"):
        plan_run("nice", tmp_path / "run", train_overrides={"dataset": "cifar10"})
    plan = plan_run("nice", tmp_path / "run", train_overrides={"dataset": "tiny", "val_size": 50}, size="small")
    assert plan.state is None and len(plan.train_data[0]) == 250 and len(plan.val_data[0]) == 50
    assert not (tmp_path / "run").exists()


def _wait_for(predicate, seconds: float = 60) -> None:
    deadline = time.monotonic() + seconds
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("timed out")
        time.sleep(0.1)


@pytest.mark.processes
def test_a_second_train_into_a_live_run_is_refused_and_a_killed_run_resumes(tiny_dataset, tmp_path):
    out = tmp_path / "run"
    first = subprocess.Popen(cli_child("train", "nice", "--out", str(out), *NICE, "--epochs", "100000"),
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        _wait_for(lambda: (out / "last.pt").is_file() and (out / "metrics.jsonl").is_file())
        for extra in (["--resume"], []):
            second = subprocess.run(cli_child("train", "nice", "--out", str(out), *NICE, "--max-steps", "1", *extra),
                                    capture_output=True, text=True, timeout=120)
            lines = second.stderr.strip().splitlines()
            assert second.returncode == 1 and len(lines) == 1, second.stderr
            expected = f"is in use by another 'couplings train' (pid {first.pid})" if extra else "already exists"
            assert expected in lines[0], lines[0]
        assert first.poll() is None  # the first run trains on, undisturbed
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    # The kernel released the dead process's lock: resuming works at once.
    step = checkpoint.load(out / "last.pt").step
    resumed = subprocess.run(cli_child("train", "nice", "--out", str(out), "--resume", "--max-steps", str(step + 2),
                                       "--quiet"), capture_output=True, text=True, timeout=120)
    assert resumed.returncode == 0, resumed.stderr
    assert checkpoint.load(out / "last.pt").step == step + 2


def test_learning_rate_schedules():
    from couplings.config import TrainConfig
    from couplings.training.optim import lr_factor

    warm = TrainConfig(warmup_steps=4)
    assert [lr_factor(warm, s, 10) for s in (0, 1, 3, 50)] == [0.25, 0.5, 1.0, 1.0]
    exponential = TrainConfig(lr_schedule="exponential", lr_decay=0.5)
    assert lr_factor(exponential, 0, 10) == 1.0 and lr_factor(exponential, 20, 10) == pytest.approx(0.25)
    assert lr_factor(exponential, 5, 10) == pytest.approx(0.5**0.5)  # per epoch, continuously
    cosine = TrainConfig(lr_schedule="cosine", schedule_steps=100, warmup_steps=10)
    assert lr_factor(cosine, 10, 7) == 1.0 and lr_factor(cosine, 60, 7) == pytest.approx(0.5)
    assert lr_factor(cosine, 110, 7) == pytest.approx(0.0, abs=1e-12)
    assert lr_factor(cosine, 500, 7) == pytest.approx(0.0, abs=1e-12)
    assert lr_factor(TrainConfig(lr_schedule="cosine", epochs=2), 10, 10) == pytest.approx(0.5)  # default: all epochs
    with pytest.raises(ConfigError, match="lr_schedule"):
        TrainConfig(lr_schedule="step")


def test_ema_averages_floating_state_and_swaps_it_in_and_out():
    import torch

    from couplings.training.optim import EMA

    model = torch.nn.Linear(2, 1)
    with torch.no_grad():
        model.weight.fill_(1.0)
    ema = EMA(model, decay=0.75)
    with torch.no_grad():
        model.weight.fill_(3.0)
    ema.update(model, step=1000)
    torch.testing.assert_close(ema.state_dict()["weight"], torch.full((1, 2), 1.5))  # 0.75 * 1 + 0.25 * 3
    ema.update(model, step=0)  # early: decay (1 + 0) / (10 + 0) = 0.1, not 0.75
    torch.testing.assert_close(ema.state_dict()["weight"], torch.full((1, 2), 0.1 * 1.5 + 0.9 * 3))
    with ema.applied(model):
        assert torch.equal(model.weight, ema.state_dict()["weight"])
    assert torch.equal(model.weight, torch.full((1, 2), 3.0))


FAST = ["--dataset", "tiny", "--set", "size=small", "--set", "hidden=4", "--set", "val_size=50", "--set", "net=gated",
        "--set", "scale=bounded", "--set", "dequantization=variational", "--set", "dequant_hidden=4",
        "--set", "batch_norm=false", "--set", "alpha=1e-5", "--set", "ema_decay=0.9", "--set", "lr_schedule=cosine",
        "--set", "warmup_steps=2", "--set", "samples_per_epoch=4", "--batch-size", "25", "--device", "cpu", "--quiet"]


def test_a_run_with_every_fast_learning_option_resumes_exactly_and_evaluates_its_averaged_weights(
        tiny_dataset, tmp_path, capsys):
    import json

    import torch

    straight, split = tmp_path / "straight", tmp_path / "split"
    assert main(["train", "realnvp", "--out", str(straight), *FAST, "--max-steps", "14"]) == 0
    assert main(["train", "realnvp", "--out", str(split), *FAST, "--max-steps", "5"]) == 0
    assert main(["train", "realnvp", "--out", str(split), "--resume", "--max-steps", "14", "--quiet"]) == 0
    a, b = checkpoint.load(straight / "last.pt"), checkpoint.load(split / "last.pt")
    assert a.step == b.step == 14 and a.ema_state.keys() == a.model_state.keys()
    for key in a.model_state:
        assert torch.equal(a.model_state[key], b.model_state[key]), key
        assert torch.equal(a.ema_state[key], b.ema_state[key]), key
    model, state = checkpoint.load_model(straight / "last.pt")
    averaged = {k: v for k, v in model.state_dict().items()}
    assert all(torch.equal(averaged[k], state.ema_state[k]) for k in averaged)  # eval and sampling use them
    capsys.readouterr()
    assert main(["eval", str(straight), "--samples", "0", "--importance-samples", "3", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "importance-weighted, 3 draws of variational dequantization" in out
    result = json.loads((straight / "eval.json").read_text())["test@K=3"]
    assert result["importance_samples"] == 3 and result["reconstruction_max_abs_error"] < 1e-4


def test_class_conditional_glow_trains_evaluates_and_samples_by_label(tiny_dataset, tmp_path, capsys):
    run = tmp_path / "glow"
    assert main(["train", "glow", "--out", str(run), "--dataset", "tiny", "--set", "size=small", "--set", "hidden=4",
                 "--set", "num_classes=10", "--set", "val_size=50", "--set", "samples_per_epoch=4",
                 "--max-steps", "3", "--batch-size", "25", "--device", "cpu", "--quiet"]) == 0
    assert main(["eval", str(run), "--samples", "0", "--device", "cpu"]) == 0
    assert "bits/dim" in capsys.readouterr().out
    assert main(["sample", str(run), "--label", "7", "-n", "3", "-o", str(tmp_path / "sevens.png")]) == 0
    assert main(["interpolate", str(run), "-o", str(tmp_path / "i.png")]) == 2
    assert "class-conditional" in capsys.readouterr().err


def test_a_preset_may_set_training_options_and_what_is_given_wins(tiny_dataset, tmp_path):
    plan = plan_run("realnvp", tmp_path / "a", size="fast", train_overrides={"dataset": "tiny", "val_size": 50})
    assert plan.cfg.grad_clip == 500.0 and plan.model_config["dequantization"] == "variational"
    plan = plan_run("realnvp", tmp_path / "b", size="fast", train_overrides={"dataset": "tiny", "val_size": 50,
                                                                             "grad_clip": 10.0})
    assert plan.cfg.grad_clip == 10.0


def test_passes_are_shuffled_per_seed_and_epoch_unless_shuffle_is_off():
    import torch

    from couplings.training.loop import start_pass

    def order(**options):
        return torch.cat(start_pass(100, 1, PixelTrainConfig(batch_size=30, **options), torch.device("cpu"), None).batches)

    assert len(order()) == 90 and not torch.equal(order(), torch.arange(90))  # full batches of a permutation
    assert torch.equal(order(), order()) and not torch.equal(order(), order(seed=1))
    assert torch.equal(order(shuffle=False), torch.arange(90))  # the stored order, the ragged batch dropped


def test_init_from_starts_a_new_run_from_the_weights_of_another(tiny_dataset, tmp_path):
    first, second = tmp_path / "first", tmp_path / "second"
    options = {"dataset": "tiny", "val_size": 50, "batch_size": 40, "samples_per_epoch": 4, "ema_decay": 0.9}
    train("nice", first, train_overrides={**options, "max_steps": 3}, model_overrides={"hidden_units": 32},
          size="small", progress=False)
    averaged = checkpoint.load(first / "best.pt").ema_state
    plan = plan_run("nice", second, train_overrides={**options, "init_from": str(first)},
                    model_overrides={"hidden_units": 32}, size="small")
    start = plan.model_object.state_dict()
    assert all(torch.equal(start[k], v) for k, v in averaged.items())  # the Polyak averages, where it kept them
    fresh = plan_run("nice", second, train_overrides=options, model_overrides={"hidden_units": 32}, size="small")
    assert not all(torch.equal(fresh.model_object.state_dict()[k], v) for k, v in averaged.items())
    train("nice", second, train_overrides={**options, "init_from": str(first), "max_steps": 1},
          model_overrides={"hidden_units": 32}, size="small", progress=False)
    state = checkpoint.load(second / "last.pt")
    assert state.step == 1 and state.train["init_from"] == str(first)  # a fresh optimizer: one step of its own


def test_init_from_a_pretrained_model(tiny_dataset, tmp_path):
    plan = plan_run("nice", tmp_path / "run", size="small",
                    train_overrides={"dataset": "tiny", "val_size": 50, "init_from": "pretrained:nice-small-mnist"})
    shipped = checkpoint.load(checkpoint.pretrained_path("nice-small-mnist")).model_state
    assert all(torch.equal(plan.model_object.state_dict()[k], v.float()) for k, v in shipped.items())


def test_init_from_a_model_with_a_tuple_option(tiny_dataset, tmp_path):
    # checkpoints keep image_shape as the tuple it is; the new run's options compare as JSON
    conditional = {"num_classes": 10, "class_prior": "position", "class_couplings": True}
    plan = plan_run("glow", tmp_path / "run", size="fast", model_overrides=conditional,
                    train_overrides={"dataset": "tiny", "val_size": 50, "init_from": "pretrained:glow-cond-mnist"})
    shipped = checkpoint.load(checkpoint.pretrained_path("glow-cond-mnist"))
    assert isinstance(shipped.model_config["image_shape"], tuple)
    assert all(torch.equal(plan.model_object.state_dict()[k], v.float()) for k, v in shipped.model_state.items())


def test_init_from_may_add_or_drop_the_glow_class_loss(tiny_dataset, tmp_path):
    """class_loss_weight only adds a classifier that starts at zero, so it may differ from the
    source's: added, the flow's weights are the source's and the classifier is zero; dropped, the
    classifier is left behind."""
    conditional = {"num_classes": 10, "class_prior": "position"}
    with_loss = {**conditional, "class_loss_weight": 0.05}
    options = {"dataset": "tiny", "val_size": 50, "batch_size": 20, "samples_per_epoch": 1, "max_steps": 1}
    source, added = tmp_path / "source", tmp_path / "added"
    train("glow", source, size="fast", model_overrides=conditional, train_overrides=options, progress=False)
    from_source = {**options, "init_from": str(source)}
    start = plan_run("glow", added, size="fast", model_overrides=with_loss, train_overrides=from_source)
    start = start.model_object.state_dict()
    trained = checkpoint.load(source / "last.pt").model_state
    assert all(torch.equal(start[k], v) for k, v in trained.items())
    assert start["classifier.weight"].abs().sum() == 0
    assert set(start) - set(trained) == {"classifier.weight", "classifier.bias"}
    train("glow", added, size="fast", model_overrides=with_loss, train_overrides=from_source, progress=False)
    plan = plan_run("glow", tmp_path / "dropped", size="fast", model_overrides=conditional,
                    train_overrides={**options, "init_from": str(added / "last.pt")})
    assert "classifier.weight" not in plan.model_object.state_dict()
    with pytest.raises(ConfigError, match="a model with other options; class_prior=channel"):
        plan_run("glow", tmp_path / "other", size="fast", model_overrides={**conditional, "class_prior": "channel"},
                 train_overrides={**options, "init_from": str(added / "last.pt")})


def test_the_class_loss_trains_but_is_not_the_reported_loss():
    from couplings.models import Glow
    from couplings.training.pixel import pixel_objective

    torch.manual_seed(0)
    model = Glow(image_shape=(1, 8, 8), steps=2, hidden=4, blocks=0, num_classes=3, class_loss_weight=0.05)
    pixels, labels = torch.randint(0, 256, (6, 1, 8, 8)), torch.tensor([0, 1, 2, 0, 1, 2])
    loss, total = pixel_objective(model, PixelTrainConfig(), pixels, torch.device("cpu"), labels)(
        torch.arange(6), torch.Generator().manual_seed(1))
    noise = torch.rand((6, 1, 8, 8), generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(loss, -model.pixel_log_prob(pixels, noise, labels).mean())  # bits/dim stay pure
    torch.testing.assert_close(total - loss, torch.tensor(0.05 * 64 * math.log(3)))  # the classifier starts uniform


def test_the_discriminative_loss_is_bayes_cross_entropy_and_not_the_reported_loss():
    """discriminative_weight=w adds w D times the cross-entropy of softmax_c log p(x | c) on the
    first discriminative_images images (dequantization held fixed); the reported loss stays the NLL."""
    from couplings.models import Glow
    from couplings.training.pixel import pixel_objective

    torch.manual_seed(0)
    model = Glow(image_shape=(1, 8, 8), steps=2, hidden=4, blocks=0, num_classes=3, class_couplings=True,
                 dequantization="variational", dequant_hidden=4)
    with torch.no_grad():  # away from the identity, so that the classes differ
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    pixels, labels = torch.randint(0, 256, (6, 1, 8, 8)), torch.tensor([0, 1, 2, 0, 1, 2])
    cfg = PixelTrainConfig(discriminative_weight=0.1, discriminative_images=4)
    loss, total = pixel_objective(model, cfg, pixels, torch.device("cpu"), labels)(
        torch.arange(6), torch.Generator().manual_seed(1))
    noise = torch.rand((6, 1, 8, 8), generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(loss, -model.pixel_log_prob(pixels, noise, labels).mean())
    x = model.dequantize(pixels[:4], noise[:4])[0]
    expected = 0.1 * 64 * torch.nn.functional.cross_entropy(model.class_log_likelihoods(x), labels[:4])
    torch.testing.assert_close(total - loss, expected)
    assert expected > 0.01
    model.zero_grad()
    (total - loss).backward()
    grads = {name: p.grad for name, p in model.named_parameters()}
    assert all(g is None or not g.any() for name, g in grads.items() if name.startswith("dequantizer."))  # the flow only
    assert any(g is not None and g.abs().sum() > 0 for name, g in grads.items() if not name.startswith("dequantizer."))


def test_the_discriminative_loss_teaches_the_model_to_classify():
    """A few Adam steps on the discriminative loss alone raise the model's own classifier p(c | x)
    on images whose class sets their brightness (a loss that does nothing fails this)."""
    from couplings.models import Glow
    from couplings.training.pixel import discriminative_loss

    torch.manual_seed(0)
    model = Glow(image_shape=(1, 8, 8), steps=2, hidden=8, blocks=0, num_classes=2, class_couplings=True)
    labels = torch.tensor([0, 1] * 8)
    pixels = (60 + 120 * labels[:, None, None, None] + torch.randint(0, 40, (16, 1, 8, 8))).clamp(0, 255)
    noise = torch.rand(16, 1, 8, 8)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)

    def ce():
        return discriminative_loss(model, pixels, noise, labels, 1 / 64)
    with torch.no_grad():
        before = float(ce())
    for _ in range(30):
        optimizer.zero_grad()
        ce().backward()
        optimizer.step()
    with torch.no_grad():
        assert float(ce()) < 0.2 * before


def test_discriminative_weight_needs_a_class_conditional_model(tiny_dataset, tmp_path):
    with pytest.raises(ConfigError, match="discriminative_weight needs a class-conditional model"):
        plan_run("glow", tmp_path / "run", size="small", model_overrides={"image_shape": (1, 8, 8)},
                 train_overrides={"dataset": "tiny", "val_size": 50, "discriminative_weight": 0.1})
    with pytest.raises(ConfigError, match="discriminative_weight >= 0"):
        PixelTrainConfig(discriminative_weight=-1)
    with pytest.raises(ConfigError, match="discriminative_images must be >= 1"):
        PixelTrainConfig(discriminative_images=0)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("model, size, model_overrides, source, message", [
    ("realnvp", "small", {}, "pretrained:nice-small-mnist", "holds a 'nice' model, not a 'realnvp' one"),
    ("nice", "small", {"hidden_units": 32}, "pretrained:nice-small-mnist", "hidden_units=32 (it has "),
    ("nice", "small", {}, "pretrained:no-such-model", "no pretrained model 'no-such-model'"),
    ("nice", "small", {}, "missing.pt", "no such checkpoint or run directory: missing.pt"),
])
def test_init_from_refuses_what_does_not_fit_and_writes_nothing(tiny_dataset, tmp_path, model, size, model_overrides,
                                                                  source, message):
    with pytest.raises(ConfigError, match=re.escape(f"init_from={source}: ") + ".*" + re.escape(message)):
        plan_run(model, tmp_path / "run", size=size, model_overrides=model_overrides,
                 train_overrides={"dataset": "tiny", "val_size": 50, "init_from": source})
    assert not (tmp_path / "run").exists()
