"""Sample-quality metrics on the features of the project's own classifier.

Inception features mean little on 28x28 digits (and Inception weights cannot be fetched
here), so FID, KID and precision/recall use the 128-d penultimate layer of
`couplings.classifier.Classifier`. Numbers are comparable only with the same classifier:
every result names its feature extractor.

References:
    Heusel et al., "GANs Trained by a Two Time-Scale Update Rule", 2017 (FID).
    Binkowski et al., "Demystifying MMD GANs", 2018 (KID).
    Kynkaanniemi et al., "Improved Precision and Recall Metric", 2019.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

from couplings.classifier import FEATURE_EXTRACTOR, Classifier

__all__ = [
    "as_float_images",
    "conditional_accuracy",
    "features",
    "fid",
    "kid",
    "nearest_neighbour_distance",
    "precision_recall",
    "sample_quality",
]


def as_float_images(images: np.ndarray | Tensor) -> Tensor:
    """uint8 (N, H, W) / (N, 1, H, W) pixels -> floats in [0, 1]; floats pass through, clamped."""
    images = torch.as_tensor(images)
    if images.dtype == torch.uint8:
        images = images.float() / 255
    if images.dim() == 3:
        images = images.unsqueeze(1)  # (N, H, W) -> (N, 1, H, W)
    return images.float().clamp(0, 1)


@torch.inference_mode()
def features(classifier: Classifier, images: np.ndarray | Tensor, batch_size: int = 1000) -> Tensor:
    """Penultimate-layer features (N, 128) in float64."""
    images = as_float_images(images)
    device = next(classifier.parameters()).device
    return torch.cat(
        [classifier.features(images[i : i + batch_size].to(device)).double().cpu() for i in range(0, len(images), batch_size)]
    )


def _sqrtm_psd(matrix: Tensor) -> Tensor:
    values, vectors = torch.linalg.eigh(matrix)
    return (vectors * values.clamp(min=0).sqrt()) @ vectors.T


def fid(a: Tensor, b: Tensor) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets (N, F) and (M, F)."""
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = torch.cov(a.T), torch.cov(b.T)
    root_a = _sqrtm_psd(cov_a)
    # tr sqrt(A B) = tr sqrt(A^1/2 B A^1/2), and the latter is symmetric PSD.
    cross = _sqrtm_psd(root_a @ cov_b @ root_a).trace()
    value = (mu_a - mu_b).square().sum() + cov_a.trace() + cov_b.trace() - 2 * cross
    return max(float(value), 0.0)


def kid(a: Tensor, b: Tensor, subsets: int = 50, subset_size: int = 1000, seed: int = 0) -> tuple[float, float]:
    """Kernel inception distance: unbiased MMD^2 with the kernel (x.y / F + 1)^3, mean and std over subsets."""
    generator = torch.Generator().manual_seed(seed)
    m = min(subset_size, len(a), len(b))
    dim = a.shape[1]
    values = []
    for _ in range(subsets):
        x = a[torch.randperm(len(a), generator=generator)[:m]]
        y = b[torch.randperm(len(b), generator=generator)[:m]]
        k_xx, k_yy, k_xy = ((u @ v.T / dim + 1) ** 3 for u, v in ((x, x), (y, y), (x, y)))
        off_diagonal = (k_xx.sum() - k_xx.trace() + k_yy.sum() - k_yy.trace()) / (m * (m - 1))
        values.append(float(off_diagonal - 2 * k_xy.mean()))
    return float(np.mean(values)), float(np.std(values))


def _knn_radii(x: Tensor, k: int) -> Tensor:
    distances = torch.cdist(x, x)
    return distances.kthvalue(k + 1, dim=1).values  # +1: each point is its own nearest neighbour


def _coverage(points: Tensor, centres: Tensor, radii: Tensor, batch: int = 2000) -> float:
    """Fraction of ``points`` inside at least one ball (centre, radius)."""
    inside = [(torch.cdist(points[i : i + batch], centres) <= radii).any(1) for i in range(0, len(points), batch)]
    return float(torch.cat(inside).double().mean())


def precision_recall(real: Tensor, fake: Tensor, k: int = 3) -> tuple[float, float]:
    """k-NN manifold precision (fake inside the real manifold) and recall (real inside the fake one)."""
    return _coverage(fake, real, _knn_radii(real, k)), _coverage(real, fake, _knn_radii(fake, k))


@torch.inference_mode()
def conditional_accuracy(classifier: Classifier, images: np.ndarray | Tensor, labels: Tensor) -> float:
    """How often the classifier agrees with the label each sample was drawn for."""
    images = as_float_images(images)
    device = next(classifier.parameters()).device
    predicted = torch.cat([classifier(images[i : i + 1000].to(device)).argmax(1).cpu() for i in range(0, len(images), 1000)])
    return float((predicted == torch.as_tensor(labels).long().cpu()).double().mean())


@torch.inference_mode()
def nearest_neighbour_distance(samples: np.ndarray | Tensor, train: np.ndarray | Tensor, batch: int = 500) -> float:
    """Mean L2 distance (pixels in [0, 1]) from each sample to its nearest training image.

    Near 0 would mean the model reproduces training images (memorisation).
    """
    s = as_float_images(samples).flatten(1).double()  # float64: exact zeros for exact copies
    t = as_float_images(train).flatten(1).double()
    nearest = [torch.cdist(s[i : i + batch], t).min(1).values for i in range(0, len(s), batch)]
    return float(torch.cat(nearest).double().mean())


def sample_quality(
    classifier: Classifier,
    samples: Tensor,
    test_images: np.ndarray,
    train_images: np.ndarray,
    *,
    dataset: str,
    sample_labels: Tensor | None = None,
    nn_samples: int = 1000,
) -> dict:
    """Every metric for one set of samples, as a JSON-ready dict that names its feature extractor."""
    fake, real = features(classifier, samples), features(classifier, test_images)
    kid_mean, kid_std = kid(real, fake)
    precision, recall = precision_recall(real[:5000], fake[:5000])
    result = {
        "feature_extractor": FEATURE_EXTRACTOR.format(dataset=dataset),
        "num_samples": len(samples),
        "fid": fid(real, fake),
        "kid": kid_mean,
        "kid_std": kid_std,
        "precision": precision,
        "recall": recall,
        "nearest_train_l2": nearest_neighbour_distance(samples[:nn_samples], train_images),
        "nearest_train_l2_samples": min(nn_samples, len(samples)),
    }
    if sample_labels is not None:
        result["conditional_accuracy"] = conditional_accuracy(classifier, samples, sample_labels)
    if not all(math.isfinite(v) for v in result.values() if isinstance(v, float)):
        raise ArithmeticError(f"a sample-quality metric is not finite: {result}")
    return result
