"""Writing image grids as PNG files (Pillow, no torchvision)."""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
from PIL import Image
from torch import Tensor

from couplings.files import atomic_write

__all__ = ["save_grid"]


def grid(images: Tensor, nrow: int = 8, padding: int = 2) -> np.ndarray:
    """(N, C, H, W) floats in [0, 1] -> one uint8 array (rows, cols) or (rows, cols, C)."""
    if images.dim() != 4:
        raise ValueError(f"expected images of shape (N, C, H, W), found {tuple(images.shape)}")
    n, c, h, w = images.shape
    ncol = max(1, min(nrow, n))
    nrows = math.ceil(n / ncol)
    pixels = (images.detach().float().clamp(0, 1) * 255).round().byte().cpu().numpy()
    canvas = np.zeros((c, nrows * (h + padding) + padding, ncol * (w + padding) + padding), np.uint8)
    for i in range(n):
        r, col = divmod(i, ncol)
        top, left = padding + r * (h + padding), padding + col * (w + padding)
        canvas[:, top : top + h, left : left + w] = pixels[i]
    return canvas[0] if c == 1 else canvas.transpose(1, 2, 0)


def save_grid(images: Tensor, path: str | os.PathLike, nrow: int = 8, scale: int = 2) -> Path:
    """Saves a grid of images as a PNG (`couplings.files.atomic_write`)."""
    path = Path(path)
    picture = Image.fromarray(grid(images, nrow))
    if scale > 1:
        picture = picture.resize((picture.width * scale, picture.height * scale), Image.NEAREST)
    return atomic_write(path, lambda f: picture.save(f, format="PNG"))
