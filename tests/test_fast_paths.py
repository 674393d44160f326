"""Every fast path gives the plain path's log_prob and training step, within tolerance, on CPU."""

from __future__ import annotations

import copy
import os

import pytest
import torch

from couplings.config import PixelTrainConfig as TrainConfig
from couplings.models import NICE, Glow, RealNVP
from couplings.training.optim import make_adam
from couplings.training.pixel import training_nll

MODELS = {
    "nice": lambda: NICE(couplings=2, hidden_layers=1, hidden_units=16),
    "realnvp": lambda: RealNVP(hidden=4, blocks=1),
    "glow": lambda: Glow(steps=2, hidden=4, blocks=1),
    # the fast presets' ingredients: gated networks (channels-last on CPU), bounded scales, a
    # variational dequantizer, no batch norm
    "realnvp_fast": lambda: RealNVP(hidden=4, blocks=1, net="gated", scale="bounded", batch_norm=False, alpha=1e-5,
                                    per_scale=1, final=2, dequantization="variational", dequant_hidden=4),
}

# Option -> (training-config overrides, relative tolerance). bf16 keeps about 3 significant digits.
OPTIONS = {
    "channels_last": ({"channels_last": True}, 1e-5),
    "foreach_adam": ({"adam": "foreach"}, 1e-5),
    "fused_adam": ({"adam": "fused"}, 1e-5),
    "auto_adam": ({"adam": "auto"}, 1e-5),  # the default: fused here
    "bf16": ({"precision": "bf16"}, 3e-2),
    "compile": ({"compile": True}, 1e-4),
}


def _batch(n: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """8-bit pixels and their uniform dequantization noise, as the trainer draws them."""
    generator = torch.Generator().manual_seed(1)
    pixels = torch.randint(0, 256, (n, 1, 28, 28), dtype=torch.uint8, generator=generator)
    return pixels, torch.rand(pixels.shape, generator=generator)


def _dequantized(batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    pixels, noise = batch
    return (pixels.float() + noise) / 256


def _adam(params, cfg: TrainConfig) -> torch.optim.Adam:
    return make_adam(params, lr=1e-3, betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay, kernel=cfg.adam)


def _one_step(model, cfg: TrainConfig, x: torch.Tensor, device: torch.device = torch.device("cpu"),
              ) -> tuple[float, torch.Tensor, torch.Tensor]:
    """The loss on ``x``, its gradient and the change of every parameter in one Adam step
    (flattened, on the CPU), with the model and ``x`` on ``device``."""
    x = tuple(t.to(device) for t in x)
    before = torch.cat([p.detach().flatten() for p in model.parameters()])
    nll = training_nll(model, cfg, device)
    optimizer = _adam(model.parameters(), cfg)
    loss = nll(*x)
    loss.backward()
    grad = torch.cat([p.grad.flatten() for p in model.parameters()])
    optimizer.step()
    return loss.item(), grad.cpu(), (torch.cat([p.detach().flatten() for p in model.parameters()]) - before).cpu()


def _slow(name: str, option: str) -> bool:
    """Compiling a convolutional flow takes minutes on 2 CPU cores: run it with COUPLINGS_SLOW_TESTS=1."""
    return option == "compile" and name != "nice" and not os.environ.get("COUPLINGS_SLOW_TESTS")


@pytest.mark.parametrize("option", OPTIONS)
@pytest.mark.parametrize("name", MODELS)
def test_fast_path_matches_the_plain_path(name, option):
    if _slow(name, option):
        pytest.skip("compiling a convolutional flow takes minutes on CPU; set COUPLINGS_SLOW_TESTS=1")
    overrides, rtol = OPTIONS[option]
    torch.manual_seed(0)
    plain = MODELS[name]()
    x = _batch()
    plain.log_prob(_dequantized(x)[:8])  # data-dependent initialisation (ActNorm) before copying
    fast = copy.deepcopy(plain)

    # log_prob (as the mean negative log-likelihood), eval mode, the same weights, through each path.
    plain.eval(), fast.eval()
    with torch.no_grad():
        plain_nll = training_nll(plain, TrainConfig(), torch.device("cpu"))(*x).item()
        fast_nll = training_nll(fast, TrainConfig(**overrides), torch.device("cpu"))(*x).item()
    assert fast_nll == pytest.approx(plain_nll, rel=rtol)
    plain.train(), fast.train()

    # One training step: the loss, the gradient and (for the Adam kernels) the update.
    plain_loss, plain_grad, plain_step = _one_step(plain, TrainConfig(adam="default"), x)
    fast_loss, fast_grad, fast_step = _one_step(fast, TrainConfig(**overrides), x)
    assert fast_loss == pytest.approx(plain_loss, rel=rtol)
    scale = plain_grad.abs().max()
    if option == "bf16":  # rounded activations: the same direction, not the same digits
        assert torch.nn.functional.cosine_similarity(fast_grad, plain_grad, dim=0) > 0.99
    else:
        # atol: a batch norm's log-scale gradient is a sum of B*H*W terms that cancel to about 0, so
        # float32 rounding in another summation order (compile) leaves a few 1e-4 there.
        torch.testing.assert_close(fast_grad, plain_grad, rtol=1e-3, atol=1e-4 * scale)
    if option.endswith("_adam"):  # the same gradient in: the same update and the same model out
        torch.testing.assert_close(fast_step, plain_step, rtol=1e-4, atol=1e-7)  # lr is 1e-3
        plain.eval(), fast.eval()
        with torch.inference_mode():
            torch.testing.assert_close(fast.log_prob(_dequantized(x)), plain.log_prob(_dequantized(x)), rtol=1e-5, atol=1e-3)


def test_training_loss_is_float32_under_bf16_autocast():
    torch.manual_seed(0)
    model = MODELS["glow"]()
    x = _batch()
    loss = training_nll(model, TrainConfig(precision="bf16"), torch.device("cpu"))(*x)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)


def test_unknown_fast_path_values_are_config_errors():
    from couplings.config import ConfigError

    with pytest.raises(ConfigError, match="precision must be fp32, bf16 or auto"):
        TrainConfig(precision="fp16")
    with pytest.raises(ConfigError, match="adam must be auto, default, foreach or fused"):
        TrainConfig(adam="sgd")


def test_auto_adam_is_the_fused_kernel_where_pytorch_has_one():
    weight = torch.nn.Parameter(torch.zeros(3))
    assert _adam([weight], TrainConfig()).defaults["fused"]  # PyTorch 2.13 has a fused CPU Adam
    assert not _adam([weight], TrainConfig(adam="default")).defaults["fused"]


# --- On the GPU: every path against the CPU result on the same weights -------------------------

def _test_device() -> torch.device:
    """$COUPLINGS_TEST_DEVICE (default cuda); scripts/gpu_check.py --smoke sets cpu, so that the
    test below runs (CPU against CPU) where there is no GPU and cannot rot."""
    return torch.device(os.environ.get("COUPLINGS_TEST_DEVICE", "cuda"))


@pytest.fixture
def exact_float32():
    """No TF32 in cuDNN convolutions or matmuls while comparing float32 results with the CPU."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


@pytest.mark.cuda
@pytest.mark.parametrize("option", ["fp32", *OPTIONS])
@pytest.mark.parametrize("name", MODELS)
def test_fast_path_on_the_gpu_matches_the_cpu_result(name, option, exact_float32):
    device = _test_device()
    if device.type == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU (never run on one so far; scripts/gpu_check.py runs these there, --smoke on the CPU)")
    if device.type == "cpu" and _slow(name, option):
        pytest.skip("compiling a convolutional flow takes minutes on CPU; set COUPLINGS_SLOW_TESTS=1")
    overrides, rtol = ({}, 1e-5) if option == "fp32" else OPTIONS[option]
    torch.manual_seed(0)
    cpu = MODELS[name]()
    x = _batch()
    cpu.log_prob(_dequantized(x)[:8])  # data-dependent initialisation (ActNorm) before copying
    gpu = copy.deepcopy(cpu).to(device)

    cpu.eval(), gpu.eval()
    with torch.no_grad():
        cpu_nll = training_nll(cpu, TrainConfig(), torch.device("cpu"))(*x).item()
        gpu_nll = training_nll(gpu, TrainConfig(**overrides), device)(*(t.to(device) for t in x)).item()
    assert gpu_nll == pytest.approx(cpu_nll, rel=max(rtol, 1e-5))
    cpu.train(), gpu.train()

    cpu_loss, cpu_grad, cpu_step = _one_step(cpu, TrainConfig(adam="default"), x)
    gpu_loss, gpu_grad, gpu_step = _one_step(gpu, TrainConfig(**overrides), x, device)
    assert gpu_loss == pytest.approx(cpu_loss, rel=max(rtol, 1e-5))
    scale = cpu_grad.abs().max()
    if option == "bf16":
        assert torch.nn.functional.cosine_similarity(gpu_grad, cpu_grad, dim=0) > 0.99
        return
    torch.testing.assert_close(gpu_grad, cpu_grad, rtol=1e-3, atol=1e-4 * scale)
    # Adam's first step is about lr * sign(gradient): compare it where the gradient is clearly non-zero.
    clear = cpu_grad.abs() > 1e-2 * scale
    torch.testing.assert_close(gpu_step[clear], cpu_step[clear], rtol=1e-3, atol=1e-6)


def test_the_precision_probe_times_both_on_a_copy_and_chooses_by_its_rule(monkeypatch):
    from couplings.training import pixel

    torch.manual_seed(0)
    model = MODELS["glow"]()  # ActNorm starts from the first batch it sees: the probe must not be that batch
    before = copy.deepcopy(model.state_dict())
    pixels, _ = _batch()
    probe = pixel.probe_precision(model, TrainConfig(precision="auto", batch_size=8), torch.device("cpu"), pixels)
    assert probe["fp32_images_per_s"] > 0 and probe["bf16_images_per_s"] > 0
    faster = probe["bf16_images_per_s"] >= pixel.BF16_MIN_SPEEDUP * probe["fp32_images_per_s"]
    assert probe["chosen"] == ("bf16" if faster else "fp32")
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # the model trained on is untouched
    # The rule itself, on timings given: bf16 only where it is clearly faster.
    for fp32_s, bf16_s, chosen in ((1.0, 0.5, "bf16"), (1.0, 0.95, "fp32"), (1.0, 2.0, "fp32")):
        clock = iter([0.0, fp32_s * 3, 0.0, bf16_s * 3])
        monkeypatch.setattr(pixel.time, "perf_counter", lambda: next(clock))
        assert pixel.probe_precision(model, TrainConfig(batch_size=4), torch.device("cpu"), pixels)["chosen"] == chosen


def test_the_precision_probe_keeps_float32_for_the_mixture_couplings_bf16_harms(monkeypatch):
    from couplings.training import pixel

    torch.manual_seed(0)
    pixels, _ = _batch()
    mixture = Glow(steps=2, hidden=4, blocks=1, coupling="mixture", mixtures=2)
    monkeypatch.setattr(pixel.time, "perf_counter", lambda: pytest.fail("a model bf16 harms is not timed"))
    probe = pixel.probe_precision(mixture, TrainConfig(precision="auto", batch_size=4), torch.device("cpu"), pixels)
    assert probe["chosen"] == "fp32" and "mixture" in probe["bf16_harm"]
    assert pixel.bf16_harm(MODELS["glow"]()) is None  # the affine couplings are timed as before


def test_a_run_with_precision_auto_records_the_probe_and_trains_in_its_choice(tmp_path, monkeypatch):
    import json

    from conftest import write_tiny_dataset
    from couplings import data
    from couplings.cli import main

    monkeypatch.setitem(data.DATASETS, "tiny", write_tiny_dataset(tmp_path / "data"))
    monkeypatch.setenv("COUPLINGS_DATA", str(tmp_path / "data"))
    run = tmp_path / "run"
    common = ["--dataset", "tiny", "--set", "val_size=50", "--set", "size=small", "--set", "hidden=4", "--batch-size", "16",
              "--device", "cpu", "--quiet", "--out", str(run)]
    assert main(["train", "realnvp", "--precision", "auto", "--max-steps", "2", *common]) == 0
    config = json.loads((run / "config.json").read_text())
    assert config["train"]["precision"] == config["precision_probe"]["chosen"] in ("fp32", "bf16")
    assert main(["train", "realnvp", "--resume", "--max-steps", "3", *common]) == 0  # the choice is kept, not re-probed
    resumed = json.loads((run / "config.json").read_text())
    assert resumed["train"]["precision"] == config["train"]["precision"]
    assert resumed["precision_probe"] == config["precision_probe"]  # the record of the choice survives the rewrite
