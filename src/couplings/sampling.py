"""Sampling tools: temperature sweeps and latent interpolation between images."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["interpolate", "temperature_sweep"]


@torch.inference_mode()
def temperature_sweep(model, temperatures: list[float], n: int, seed: int = 0) -> Tensor:
    """``n`` samples per temperature from the same base noise, stacked row by row:
    (len(temperatures) * n, C, H, W). Lower temperatures give smoother, more typical images."""
    if not temperatures or min(temperatures) <= 0:
        raise ValueError(f"temperatures must be a non-empty list of numbers > 0, found {temperatures}")
    generator = torch.Generator(device=model.prior.device).manual_seed(seed)
    noise = model.prior.sample(n, 1.0, generator)
    return torch.cat([model.inverse(t * noise) for t in temperatures])


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
    return model.inverse(path.flatten(0, 1))
