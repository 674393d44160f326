"""benchmarks/peer.py: couplings and normflows models of equal size, timed side by side."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

from _require import require
from couplings.likelihood import dequantize
from couplings.transforms import LearnedSplitPrior, TanhScale
from couplings.nn import WeightNormConv2d

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "peer.py"
_spec = importlib.util.spec_from_file_location("peer_benchmark", SCRIPT)
peer = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = peer  # dataclasses look their module up there
_spec.loader.exec_module(peer)

ROW_KEYS = {"arch", "mode", "images", "couplings_images_per_s", "normflows_images_per_s", "ratio",
            "couplings_parameters", "normflows_parameters"}


@pytest.fixture(autouse=True)
def normflows_installed(request):
    """Each test here but the one of a missing normflows skips without normflows (benchmarks/peer.py
    imports it only when it builds a pair), and fails instead with $COUPLINGS_REQUIRE_PEER=1."""
    if request.function.__name__ != "test_a_missing_normflows_says_how_to_install_it":
        require("normflows", "COUPLINGS_REQUIRE_PEER")


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny tensors: more threads only add synchronisation, which a busy machine makes very slow."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _batch(n: int = 4) -> torch.Tensor:
    pixels = torch.randint(0, 256, (n, 1, 28, 28), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    return dequantize(pixels, generator=torch.Generator().manual_seed(1))


# Parameter counts of the default small pairs, (couplings, normflows). They differ only where the
# libraries' layers do: couplings' Real NVP has a learned tanh factor per output channel of each
# coupling (16 in all), and its Glow has 36 parameters more in its split prior and couplings.
PARAMETERS = {"nice": (1_595_696, 1_595_696), "realnvp": (45_360, 45_344), "glow": (66_604, 66_568)}


@pytest.mark.parametrize("arch", peer.ARCHS)
def test_both_models_have_the_pinned_sizes_and_score_the_batch(arch):
    x = _batch()
    pair = peer.build(arch)  # the default small size, as the benchmark runs it
    assert (pair["couplings"].parameters, pair["normflows"].parameters) == PARAMETERS[arch]
    scores = {name: contender.log_prob(x) for name, contender in pair.items()}
    for log_prob in scores.values():
        assert log_prob.shape == (4,) and torch.isfinite(log_prob).all()
    if arch == "realnvp":
        # Both start with every coupling at the identity, so at initialisation both are the same
        # function: the logit preprocessing under a standard normal.
        torch.testing.assert_close(scores["couplings"], scores["normflows"], atol=1e-3, rtol=1e-5)
        couplings_model = pair["couplings"].model
        tanh_factors = sum(m.factor.numel() for m in couplings_model.modules() if isinstance(m, TanhScale))
        assert tanh_factors == PARAMETERS["realnvp"][0] - PARAMETERS["realnvp"][1]
    assert torch.equal(x, _batch()), "a model changed its input in place"


def _conv_and_norm_layers(model: torch.nn.Module, skip: tuple[type, ...] = ()) -> tuple[list, int]:
    """Every convolution's (weight shape, weight-normed?), sorted, and the number of batch norms,
    outside ``skip``."""
    skipped = {id(m) for s in model.modules() if isinstance(s, skip) for m in s.modules()}
    convs, norms = [], 0
    for m in model.modules():
        if id(m) in skipped:
            continue
        if isinstance(m, (torch.nn.Conv2d, WeightNormConv2d)):
            weight_normed = isinstance(m, WeightNormConv2d) or torch.nn.utils.parametrize.is_parametrized(m, "weight")
            convs.append((tuple(m.weight.shape), weight_normed))
        norms += isinstance(m, torch.nn.BatchNorm2d)
    return sorted(convs), norms


@pytest.mark.parametrize("size", ["small", "fast"])
@pytest.mark.parametrize("arch", ["realnvp", "glow"])
def test_image_pairs_have_the_same_convolutions_and_normalisations(arch, size):
    """Equal work: the s/t nets have the same convolutions (in, out, kernel, weight norm) and
    batch norms on both sides; only couplings' Glow has more, the learned prior's convolution
    per split. The parameter counts differ by Real NVP's tanh factors and Glow's priors only.
    The fast size keeps its preset's widths and depth (32 channels, 1 residual block)."""
    pair = peer.build(arch, size)
    if size == "fast":
        widths = {shape[0] for shape, _ in _conv_and_norm_layers(pair["couplings"].model, skip=(LearnedSplitPrior,))[0]}
        assert max(widths) == 32
    ours = _conv_and_norm_layers(pair["couplings"].model, skip=(LearnedSplitPrior,))
    theirs = _conv_and_norm_layers(pair["normflows"].model)
    assert ours == theirs
    assert ours[1] > 0 and all(shape[-2:] == (3, 3) for shape, _ in ours[0]) and any(wn for _, wn in ours[0])
    assert pair["couplings"].parameters - pair["normflows"].parameters == {"realnvp": 16, "glow": 36}[arch]
    plain = peer.build(arch, size, normflows_weight_norm=False)["normflows"].model
    assert not any(wn for _, wn in _conv_and_norm_layers(plain)[0])


def test_nice_pair_is_the_same_function_given_the_same_weights():
    """The odd/even splits line up: with couplings' weights copied over (normflows subtracts the
    shift from data to noise, so the last layer is negated), both log-densities agree."""
    pair = peer.build("nice", hidden=16)
    ours, theirs = pair["couplings"].model, pair["normflows"].model
    *couplings, scaling = ours.flow.transforms
    blocks = list(theirs.flows)[:0:-1]  # noise-to-data order, scaling first
    with torch.no_grad():
        for layer, block in zip(couplings, blocks, strict=True):
            src = [m for m in layer.shift if isinstance(m, torch.nn.Linear)]
            dst = [m for m in block.flows[1].param_map.net if isinstance(m, torch.nn.Linear)]
            for i, (a, b) in enumerate(zip(src, dst, strict=True)):
                sign = -1.0 if i == len(src) - 1 else 1.0
                b.weight.copy_(sign * a.weight)
                b.bias.copy_(sign * a.bias)
        scaling.log_scale.normal_(0, 0.1)
        theirs.flows[0].s.copy_(-scaling.log_scale)  # normflows scales by exp(-s) from data to noise
    x = _batch()
    torch.testing.assert_close(pair["couplings"].log_prob(x), pair["normflows"].log_prob(x), rtol=1e-5, atol=1e-3)


def test_benchmark_reports_positive_throughputs_for_every_arch_and_mode():
    report = peer.benchmark(steps=1, batch_size=4, sample_batch=4, hidden=16, threads=1)
    assert {"hardware", "torch", "normflows", "batch_size", "results"} <= set(report)
    assert report["hardware"].startswith("CPU") and report["batch_size"] == 4 and report["threads"] == 1
    assert [(r["arch"], r["mode"]) for r in report["results"]] == [
        (arch, mode) for arch in peer.ARCHS for mode in ("train", "sample")]
    for row in report["results"]:
        assert set(row) == ROW_KEYS
        assert row["couplings_images_per_s"] > 0 and row["normflows_images_per_s"] > 0
        assert row["ratio"] == pytest.approx(row["couplings_images_per_s"] / row["normflows_images_per_s"], rel=0.01)
    json.dumps(report)


def test_main_prints_one_json_object(capsys):
    peer.main(["--arch", "nice", "--mode", "sample", "--steps", "1", "--batch-size", "4", "--sample-batch", "4",
               "--hidden", "16", "--threads", "1"])
    report = json.loads(capsys.readouterr().out)
    assert [(r["arch"], r["mode"]) for r in report["results"]] == [("nice", "sample")]


def test_a_missing_normflows_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "normflows", None)  # makes `import normflows` fail
    with pytest.raises(ImportError, match="pip install normflows: a benchmark-only dependency"):
        peer.build("nice")
