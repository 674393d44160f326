"""Drawing samples: batches with their labels, per-digit grids, temperature sweeps, and latent
interpolation between images."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["draw_samples", "interpolate", "label_grid", "sample_labels", "temperature_sweep"]


@torch.inference_mode()
def temperature_sweep(model, temperatures: list[float], n: int, seed: int = 0) -> Tensor:
    """``n`` samples per temperature from the same base noise, stacked row by row:
    (len(temperatures) * n, C, H, W). Lower temperatures give smoother, more typical images."""
    if not temperatures or min(temperatures) <= 0:
        raise ValueError(f"temperatures must be a non-empty list of numbers > 0, found {temperatures}")
    generator = torch.Generator(device=model.prior.device).manual_seed(seed)
    noise = model.prior.sample(n, 1.0, generator)
    return torch.cat([model.inverse(t * noise)[0] for t in temperatures])


@torch.inference_mode()
def interpolate(model, x_a: Tensor, x_b: Tensor, steps: int = 8) -> Tensor:
    """Decodes ``steps`` evenly spaced points on the line between the latents of image pairs.

    Args:
        x_a, x_b: Images (P, C, H, W) in [0, 1]; each row of the output goes from x_a[i] to x_b[i].

    Returns:
        (P * steps, C, H, W): row i is the interpolation of pair i; its ends reconstruct the inputs.
    """
    if steps < 2:
        raise ValueError(f"steps must be >= 2, found {steps}")
    z_a, _ = model.transform(x_a)
    z_b, _ = model.transform(x_b)
    weights = torch.linspace(0, 1, steps, device=z_a.device, dtype=z_a.dtype).view(1, steps, 1)
    path = (1 - weights) * z_a.unsqueeze(1) + weights * z_b.unsqueeze(1)  # (P, steps, D)
    return model.inverse(path.flatten(0, 1))[0]


@torch.inference_mode()
def draw_samples(
    model, n: int, *, temperature: float = 1.0, seed: int = 0, batch_size: int = 1000
) -> tuple[Tensor, Tensor | None]:
    """``n`` samples in [0, 1] (CPU) and, for a class-conditional model, the labels they were
    drawn for (0, 1, ..., 9, 0, ...); labels are None for an unconditional model.

    Raises:
        ArithmeticError: Some samples are not finite (they are never dropped).
    """
    device = model.prior.device
    generator = torch.Generator(device=device).manual_seed(seed)
    labels = sample_labels(model, n)
    chunks = []
    for start in range(0, n, batch_size):
        y = None if labels is None else labels[start : start + batch_size]
        count = min(batch_size, n - start)
        chunks.append(model.sample(count, y, temperature=temperature, generator=generator).float().cpu())
    samples = torch.cat(chunks)
    bad = int((~torch.isfinite(samples)).flatten(1).any(1).sum())
    if bad:
        raise ArithmeticError(f"{bad} of {n} samples are not finite")
    return samples, None if labels is None else labels.cpu()


@torch.inference_mode()
def label_grid(
    model, per_row: int, *, labels: list[int] | None = None, temperature: float = 1.0,
    generator: torch.Generator | None = None,
) -> Tensor:
    """A class-conditional model's samples, one row of ``per_row`` per label (default: every
    class), each row sorted by log-density, densest first: (rows * per_row, C, H, W)."""
    rows = []
    for label in labels if labels is not None else range(model.num_classes):
        y = torch.full((per_row,), label, device=model.prior.device)
        images, log_prob = model.sample_with_log_prob(per_row, y, temperature, generator)
        rows.append(images[log_prob.argsort(descending=True)])
    return torch.cat(rows)


def sample_labels(model, n: int) -> Tensor | None:
    """The labels 0, 1, ..., num_classes - 1, 0, ... (n of them, on the model's device) for a
    class-conditional model; None for an unconditional one."""
    return torch.arange(n, device=model.prior.device) % model.num_classes if model.conditional else None
