"""Evaluating a trained run: likelihood on a split and sample quality, as one JSON-ready dict."""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

import torch

from couplings import checkpoint, metrics
from couplings.data import load_split
from couplings.classifier import load_classifier
from couplings.config import TrainConfig
from couplings.evaluate import dequantize, log_probs, nats_to_bits_per_dim
from couplings.hardware import describe
from couplings.models import MODELS

__all__ = ["NO_PIXEL_BPD", "draw_samples", "evaluate_checkpoint", "reconstruction_error", "update_eval_file"]

NO_PIXEL_BPD = "latent density: no pixel bits/dim"


@torch.inference_mode()
def draw_samples(
    model, n: int, *, temperature: float = 1.0, seed: int = 0, batch_size: int = 1000
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``n`` samples in [0, 1] (CPU) and, for a class-conditional model, the labels they were
    drawn for (0, 1, ..., 9, 0, ...); labels are None for an unconditional model."""
    conditional = getattr(getattr(model, "config", None), "conditional", False)
    device = model.prior.device
    generator = torch.Generator(device=device).manual_seed(seed)
    labels = torch.arange(n) % model.config.num_classes if conditional else None
    chunks = []
    for start in range(0, n, batch_size):
        y = None if labels is None else labels[start : start + batch_size].to(device)
        count = min(batch_size, n - start)
        chunks.append(model.sample(count, y, temperature=temperature, generator=generator).float().cpu())
    samples = torch.cat(chunks)
    bad = int((~torch.isfinite(samples)).flatten(1).any(1).sum())
    if bad:
        raise ArithmeticError(f"{bad} of {n} samples are not finite")
    return samples, labels


@torch.inference_mode()
def reconstruction_error(model, images, *, batch_size: int = 1000, seed: int = 0) -> float:
    """``max |inverse(transform(x)) - x|`` over dequantized ``images`` (uint8, (N, H, W))."""
    device = model.prior.device
    dtype = model.prior.dtype
    generator = torch.Generator(device=device).manual_seed(seed)
    pixels = torch.as_tensor(images).unsqueeze(1)  # (N, H, W) -> (N, 1, H, W)
    model.eval()
    worst = 0.0
    for start in range(0, len(pixels), batch_size):
        x = dequantize(pixels[start : start + batch_size].to(device), generator, dtype)
        z, _ = model.transform(x)
        worst = max(worst, float((model.inverse(z) - x).abs().max()))
    return worst


def evaluate_checkpoint(
    path: str | os.PathLike,
    *,
    dataset: str | None = None,
    split: str = "test",
    samples: int = 10_000,
    temperature: float = 1.0,
    seed: int = 0,
    batch_size: int = 1000,
    device: str | torch.device = "cpu",
    progress: bool = False,
) -> dict:
    """Scores a checkpoint (or run directory) on ``split`` of ``dataset``.

    Pixel-space models get bits/dim and the log-likelihood in nats; latent models get their
    latent NLL and ``bits_per_dim: None`` with the reason. With ``samples > 0`` and a committed
    classifier for the dataset, the sample-quality metrics of `couplings.metrics` are added.
    """
    started = time.perf_counter()
    model, state = checkpoint.load_model(path, device)
    train_config = state.get("train", {})
    dataset = dataset or train_config.get("dataset", "mnist")
    val_size = train_config.get("val_size", TrainConfig.val_size)
    images, labels = load_split(dataset, split, val_size)
    result = {
        "checkpoint": str(checkpoint.resolve(path)),
        "model": state["model"],
        "parameters": sum(p.numel() for p in model.parameters()),
        "dataset": dataset,
        "split": split,
        "num_images": len(images),
        "epoch": state.get("epoch"),
        "step": state.get("step"),
        "training_seconds": state.get("elapsed"),
        "training_hardware": state.get("hardware"),
    }
    if getattr(model, "has_pixel_density", True):
        lp = log_probs(model, images, batch_size=batch_size, seed=seed, progress=progress)
        dim = math.prod(images.shape[1:])
        result.update({
            "dimensions": dim,
            "bits_per_dim": nats_to_bits_per_dim(float(lp.mean()), dim),
            "log_likelihood_nats": float(lp.mean()),
            "dequantization_seed": seed,
            "reconstruction_max_abs_error": reconstruction_error(model, images, batch_size=batch_size, seed=seed),
        })
        published = MODELS[state["model"]].published
        if published and dataset == "mnist":
            result["published_bits_per_dim"], result["published_source"] = published
    else:
        pixels = torch.as_tensor(images).unsqueeze(1).float().div(255).to(device)  # (N, H, W) -> (N, 1, H, W)
        y = torch.as_tensor(labels).long().to(device)
        with torch.inference_mode():
            nll = torch.cat([-model.log_prob(pixels[i : i + batch_size], y[i : i + batch_size]).double().cpu()
                             for i in range(0, len(pixels), batch_size)])
        result.update({
            "bits_per_dim": None,
            "bits_per_dim_note": NO_PIXEL_BPD,
            "latent_nll_nats": float(nll.mean()),
            "latent_dimensions": model.config.embedding_dim,
        })
    if samples > 0:
        try:
            classifier = load_classifier(dataset, device)
        except FileNotFoundError as e:
            result["sample_quality"] = {"skipped": str(e)}
        else:
            sample_started = time.perf_counter()
            drawn, drawn_labels = draw_samples(model, samples, temperature=temperature, seed=seed, batch_size=batch_size)
            sampling_seconds = time.perf_counter() - sample_started
            train_images, _ = load_split(dataset, "train", val_size)
            quality = metrics.sample_quality(classifier.cpu(), drawn, images, train_images, dataset=dataset,
                                             sample_labels=drawn_labels)
            result["sample_quality"] = {**quality, "temperature": temperature, "sampling_seconds": sampling_seconds}
    result["seconds"] = time.perf_counter() - started
    result["hardware"] = describe(torch.device(device))
    return result


def update_eval_file(run_dir: str | os.PathLike, key: str, result: dict) -> Path:
    """Sets ``eval.json[key] = result`` in a run directory, keeping the other entries; atomic."""
    path = Path(run_dir) / "eval.json"
    entries = json.loads(path.read_text()) if path.is_file() else {}
    entries[key] = result
    tmp = path.with_name(f".eval.json.tmp{os.getpid()}")
    tmp.write_text(json.dumps(entries, indent=2) + "\n")
    os.replace(tmp, path)
    return path
