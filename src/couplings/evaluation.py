"""Evaluating a trained run: likelihood on a split and sample quality, as one typed `Evaluation`
(what ``eval.json`` stores, by split and setting)."""

from __future__ import annotations

import math
import os
import time
from dataclasses import asdict, dataclass, fields
from typing import Any

import torch

from couplings import checkpoint, metrics
from couplings.classifier import load_classifier
from couplings.config import TrainConfig
from couplings.data import fingerprint, is_path_dataset, load_split, with_channels
from couplings.hardware import describe
from couplings.likelihood import dequantize, log_probs, nats_to_bits_per_dim
from couplings.models import MODELS
from couplings.sampling import draw_samples

__all__ = ["NO_PIXEL_BPD", "Evaluation", "evaluate_checkpoint", "reconstruction_error"]

NO_PIXEL_BPD = "latent density: no pixel bits/dim"


@dataclass
class Evaluation:
    """One evaluation of a checkpoint on a split: what `evaluate_checkpoint` returns and
    ``eval.json`` keeps under a key such as ``test`` or ``test@K=16``
    (`couplings.rundir.RunDir.update_eval`). A field that does not apply is None and is left
    out of the file, except ``bits_per_dim``, whose null says "no pixel density"."""

    model: str
    dataset: str
    split: str = "test"
    checkpoint: str | None = None
    parameters: int | None = None
    num_images: int | None = None
    image_limit: int | None = None  # the first so many images were scored (None: all)
    dataset_sha256: str | None = None  # of a dataset of one's own
    # The checkpoint's training.
    epoch: int | None = None
    step: int | None = None
    training_seconds: float | None = None
    training_hardware: str | None = None
    # A pixel density.
    dimensions: int | None = None
    bits_per_dim: float | None = None
    log_likelihood_nats: float | None = None
    estimate: str | None = None  # the one-draw bound, or the importance-weighted estimate over K draws
    importance_samples: int | None = None
    dequantization_seed: int | None = None
    bits_per_dim_draws: list[float] | None = None  # under several dequantization seeds (`couplings compare`)
    reconstruction_max_abs_error: float | None = None
    published_bits_per_dim: float | None = None
    published_source: str | None = None
    # A latent density.
    bits_per_dim_note: str | None = None
    latent_nll_nats: float | None = None
    latent_dimensions: int | None = None
    # Samples: `couplings.metrics.sample_quality` with the temperature and time, or {"skipped": why}.
    sample_quality: dict[str, Any] | None = None
    seconds: float | None = None
    hardware: str | None = None

    @property
    def has_pixel_density(self) -> bool:
        return self.bits_per_dim is not None

    def to_json(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None or k == "bits_per_dim"}

    @classmethod
    def from_json(cls, entry: dict[str, Any]) -> Evaluation:
        """An entry of ``eval.json``, as any version of couplings wrote it.

        Raises:
            ValueError: It holds a key no version wrote.
        """
        unknown = sorted(set(entry) - {f.name for f in fields(cls)})
        if unknown:
            raise ValueError(f"unknown keys {unknown} in an eval.json entry")
        return cls(**entry)


@torch.inference_mode()
def reconstruction_error(model, images, *, labels=None, batch_size: int = 1000, seed: int = 0) -> float:
    """``max |inverse(transform(x)) - x|`` over dequantized ``images`` (uint8, (N, H, W) or
    (N, C, H, W)), given their ``labels`` for a class-conditional model."""
    device = model.prior.device
    dtype = model.prior.dtype
    generator = torch.Generator(device=device).manual_seed(seed)
    pixels = torch.as_tensor(with_channels(images))  # (N, C, H, W)
    model.eval()
    worst = 0.0
    for start in range(0, len(pixels), batch_size):
        x = dequantize(pixels[start : start + batch_size].to(device), generator, dtype)
        y = None if labels is None else torch.as_tensor(labels[start : start + batch_size]).long().to(device)
        z, _ = model.transform(x, y)
        worst = max(worst, float((model.inverse(z, y)[0] - x).abs().max()))
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
    importance_samples: int = 1,
    num_images: int | None = None,
    device: str | torch.device = "cpu",
    progress: bool = False,
) -> Evaluation:
    """Scores a checkpoint (or run directory) on ``split`` of ``dataset``.

    Pixel-space models get bits/dim and the log-likelihood in nats, with ``estimate`` saying
    which: the dequantization bound of one draw, or (``importance_samples`` K > 1) the
    importance-weighted estimate over K draws; latent models get their latent NLL and
    ``bits_per_dim: None`` with the reason. With ``samples > 0`` and a committed classifier for
    the dataset, the sample-quality metrics of `couplings.metrics` are added; for a dataset of
    one's own they are skipped with the reason, and its ``dataset_sha256`` is recorded.
    ``num_images`` scores the first that many images of the split (None: all of them); the
    sample metrics then compare with those same images.
    """
    started = time.perf_counter()
    model, state = checkpoint.load_model(path, device)
    train_config = state.train
    dataset = dataset or train_config.get("dataset", "mnist")
    val_size = train_config.get("val_size", TrainConfig.val_size)
    images, labels = load_split(dataset, split, val_size)
    if num_images is not None:
        images, labels = images[:num_images], labels[:num_images]
    result = Evaluation(
        state.model, dataset, split, checkpoint=str(checkpoint.resolve(path)),
        parameters=sum(p.numel() for p in model.parameters()), num_images=len(images), image_limit=num_images,
        epoch=state.epoch, step=state.step, training_seconds=state.elapsed, training_hardware=state.hardware,
        dataset_sha256=fingerprint(dataset) if is_path_dataset(dataset) else None,
    )
    if model.has_pixel_density:
        _score_pixel_density(result, model, images, labels, batch_size=batch_size, seed=seed,
                             importance_samples=importance_samples, progress=progress)
    else:
        _score_latent_density(result, model, images, labels, batch_size=batch_size, device=device)
    if samples > 0:
        result.sample_quality = _sample_quality(model, dataset, images, val_size, samples=samples,
                                                temperature=temperature, seed=seed, batch_size=batch_size, device=device)
    result.seconds = time.perf_counter() - started
    result.hardware = describe(torch.device(device))
    return result


def _score_pixel_density(result: Evaluation, model, images, labels, *, batch_size: int, seed: int,
                         importance_samples: int, progress: bool) -> None:
    """Bits/dim and nats (the one-draw bound, or the importance-weighted estimate over K draws),
    the reconstruction error and the model's published figure on MNIST, into ``result``."""
    given = labels if model.conditional else None
    lp = log_probs(model, images, batch_size=batch_size, seed=seed, importance_samples=importance_samples,
                   labels=given, progress=progress)
    dim = math.prod(images.shape[1:])
    kind = "variational" if model.dequantizer is not None else "uniform"
    result.estimate = (f"importance-weighted, {importance_samples} draws of {kind} dequantization"
                       if importance_samples > 1 else f"bound, one draw of {kind} dequantization")
    result.dimensions, result.importance_samples, result.dequantization_seed = dim, importance_samples, seed
    result.log_likelihood_nats = float(lp.mean())
    result.bits_per_dim = nats_to_bits_per_dim(result.log_likelihood_nats, dim)
    result.reconstruction_max_abs_error = reconstruction_error(model, images, labels=given, batch_size=batch_size,
                                                               seed=seed)
    published = MODELS[result.model].published
    if published and result.dataset == "mnist":
        result.published_bits_per_dim = published.bits_per_dim(dim)
        result.published_source = (published.source if published.unit == "bits/dim"
                                   else f"{published.source}: {published.value:g} {published.unit}")


def _score_latent_density(result: Evaluation, model, images, labels, *, batch_size: int, device) -> None:
    """A latent model's negative log-likelihood of its embeddings (no pixel bits/dim), into ``result``."""
    pixels = torch.as_tensor(with_channels(images)).float().div(255).to(device)  # (N, C, H, W)
    y = torch.as_tensor(labels).long().to(device)
    with torch.inference_mode():
        nll = torch.cat([-model.log_prob(pixels[i : i + batch_size], y[i : i + batch_size]).double().cpu()
                         for i in range(0, len(pixels), batch_size)])
    result.bits_per_dim_note, result.latent_nll_nats = NO_PIXEL_BPD, float(nll.mean())
    result.latent_dimensions = model.config.embedding_dim


def _sample_quality(model, dataset: str, images, val_size: int, *, samples: int, temperature: float, seed: int,
                    batch_size: int, device) -> dict[str, Any]:
    """`couplings.metrics.sample_quality` of ``samples`` samples against ``images`` with the
    temperature and the sampling time, or ``{"skipped": why}`` where no classifier fits the dataset."""
    if is_path_dataset(dataset):
        return {"skipped": "FID, KID, precision and recall use the features of a classifier of "
                           f"MNIST or Fashion-MNIST images; there is none for {dataset}"}
    try:
        classifier = load_classifier(dataset, device)
    except FileNotFoundError as e:
        return {"skipped": str(e)}
    started = time.perf_counter()
    drawn, drawn_labels = draw_samples(model, samples, temperature=temperature, seed=seed, batch_size=batch_size)
    sampling_seconds = time.perf_counter() - started
    train_images, _ = load_split(dataset, "train", val_size)
    quality = metrics.sample_quality(classifier.cpu(), drawn, images, train_images, dataset=dataset,
                                     sample_labels=drawn_labels)
    return {**quality, "temperature": temperature, "sampling_seconds": sampling_seconds}
