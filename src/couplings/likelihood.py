"""Likelihoods of images: dequantization, per-image log-densities and bits per dimension."""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from couplings.models import Flow

__all__ = ["NonFiniteLogProbError", "bits_per_dim", "dequantize", "log_probs", "nats_to_bits_per_dim"]


class NonFiniteLogProbError(ArithmeticError):
    """A model gave NaN or infinite log-probabilities; they are never dropped from an average."""


def dequantize(pixels: Tensor, generator: torch.Generator | None = None, dtype: torch.dtype = torch.float32) -> Tensor:
    """uint8 pixels k -> x = (k + u) / 256 with u ~ U(0, 1), so x lies in [0, 1]."""
    noise = torch.rand(pixels.shape, generator=generator, device=pixels.device, dtype=dtype)
    return (pixels.to(dtype) + noise) / 256


def nats_to_bits_per_dim(log_prob: float, dim: int) -> float:
    """Bits/dim of 8-bit data from a log-density on [0, 1]^dim: ``8 - log p / (dim ln 2)``."""
    return 8.0 - log_prob / (dim * math.log(2))


def _as_image_batch(images: np.ndarray | Tensor) -> Tensor:
    """(N, H, W) or (N, C, H, W) uint8 -> a uint8 tensor (N, C, H, W)."""
    images = torch.as_tensor(np.asarray(images) if not isinstance(images, Tensor) else images)
    if images.dtype != torch.uint8:
        raise TypeError(f"expected uint8 pixels, found {images.dtype}")
    if images.dim() == 3:
        images = images.unsqueeze(1)  # (N, H, W) -> (N, 1, H, W)
    if images.dim() != 4:
        raise ValueError(f"expected images of shape (N, H, W) or (N, C, H, W), found {tuple(images.shape)}")
    return images


def _draw_log_prob(model, pixels: Tensor, y: Tensor | None, generator: torch.Generator, dtype: torch.dtype) -> Tensor:
    """One dequantization draw's ``log p(x) - log q(u | k)`` per image: through the model's own
    dequantization (`couplings.models.Flow.pixel_log_prob`), or uniform noise for any other
    object with ``log_prob(x)``."""
    noise = torch.rand(pixels.shape, generator=generator, device=pixels.device, dtype=dtype)
    if isinstance(model, Flow):
        return model.pixel_log_prob(pixels, noise, y)
    return model.log_prob((pixels.to(dtype) + noise) / 256)


@torch.inference_mode()
def log_probs(
    model,
    images: np.ndarray | Tensor,
    *,
    batch_size: int = 1000,
    seed: int = 0,
    importance_samples: int = 1,
    labels: np.ndarray | Tensor | None = None,
    progress: bool = False,
) -> Tensor:
    """Per-image log-density (nats, float64, shape (N,)) of the dequantized images.

    With ``importance_samples=1`` it is one dequantization draw of ``log p(x) - log q(u | k)``
    (q = 1 for uniform dequantization): the variational bound. With K > 1 it is the
    importance-weighted estimate ``log mean_k exp(log p(x_k) - log q(u_k | k))`` over K draws,
    a tighter bound (what papers with variational dequantization report). The draws are fixed by
    ``seed``, so repeated calls agree. ``model`` is a `couplings.models.Flow` or anything with
    ``log_prob(x)`` on (B, C, H, W) floats; modules are run in eval mode and on their own device
    and dtype. A class-conditional model scores ``log p(x | y)`` for the given ``labels``.

    Raises:
        NonFiniteLogProbError: Some log-probabilities are NaN or infinite.
    """
    if importance_samples < 1:
        raise ValueError(f"importance_samples must be >= 1, found {importance_samples}")
    if isinstance(model, Flow) and not model.has_pixel_density:
        raise TypeError(f"{type(model).__name__} models a latent density: it has no pixel log-likelihood or bits/dim")
    pixels = _as_image_batch(images)
    params = next(model.parameters(), None) if hasattr(model, "parameters") else None
    device = params.device if params is not None else torch.device("cpu")
    dtype = params.dtype if params is not None and params.is_floating_point() else torch.float32
    generator = torch.Generator(device=device).manual_seed(seed)
    was_training = getattr(model, "training", False)
    if hasattr(model, "eval"):
        model.eval()
    try:
        chunks = []
        for start in tqdm(range(0, len(pixels), batch_size), desc="eval", leave=False, disable=not progress):
            batch = pixels[start : start + batch_size].to(device)
            y = None if labels is None else torch.as_tensor(labels[start : start + batch_size]).long().to(device)
            draws = torch.stack([_draw_log_prob(model, batch, y, generator, dtype).double()
                                 for _ in range(importance_samples)])  # (K, B)
            chunks.append((torch.logsumexp(draws, 0) - math.log(importance_samples)).cpu())
    finally:
        if was_training:
            model.train()
    result = torch.cat(chunks)
    bad = int((~torch.isfinite(result)).sum())
    if bad:
        raise NonFiniteLogProbError(
            f"{bad} of {len(result)} images gave a non-finite log-probability; refusing to average them away"
        )
    return result


def bits_per_dim(model, images: np.ndarray | Tensor, batch_size: int = 1000, seed: int = 0,
                 importance_samples: int = 1, labels: np.ndarray | Tensor | None = None, progress: bool = False) -> float:
    """Mean bits/dim over ``images`` (uint8, (N, H, W) or (N, C, H, W)) under ``model``.

    Each image is dequantized, x = (k + u) / 256, and scored as ``8 - L / (D ln 2)`` with
    D = C * H * W and L the `log_probs` estimate (``log p(x) - log q(u | k)``, or its
    importance-weighted form); a uniform density gives exactly 8.

    Examples:
        The uniform density on [0, 1]^D (log p = 0 everywhere) spends exactly 8 bits per pixel;
        any `couplings.models.Flow`, or any object with ``log_prob``, is scored the same way.

        >>> import torch
        >>> from couplings import NICE, bits_per_dim
        >>> images = torch.randint(0, 256, (4, 28, 28), dtype=torch.uint8)
        >>> class Uniform:
        ...     def log_prob(self, x):
        ...         return x.new_zeros(len(x))
        >>> bits_per_dim(Uniform(), images)
        8.0
        >>> bpd = bits_per_dim(NICE(couplings=2, hidden_layers=1, hidden_units=16), images)
        >>> isinstance(bpd, float) and bpd > 0
        True
    """
    lp = log_probs(model, images, batch_size=batch_size, seed=seed, importance_samples=importance_samples,
                   labels=labels, progress=progress)
    pixels_per_image = math.prod(_as_image_batch(images).shape[1:])
    return nats_to_bits_per_dim(float(lp.mean()), pixels_per_image)
