"""Reshaping layers: the squeeze that trades space for channels."""

from __future__ import annotations

from torch import Tensor

from couplings.transforms.base import Transform

__all__ = ["Squeeze"]


class Squeeze(Transform):
    """Trades space for channels: (B, C, H, W) -> (B, 4C, H/2, W/2), volume-preserving."""

    def forward(self, x: Tensor, y: Tensor | None = None) -> tuple[Tensor, Tensor]:
        b, c, h, w = x.shape
        if h % 2 or w % 2:
            raise ValueError(f"squeeze needs even height and width, found {h}x{w}")
        x = x.reshape(b, c, h // 2, 2, w // 2, 2)  # (B, C, H/2, 2, W/2, 2)
        x = x.permute(0, 1, 3, 5, 2, 4)  # (B, C, 2, 2, H/2, W/2)
        return x.reshape(b, 4 * c, h // 2, w // 2), x.new_zeros(b)

    def inverse(self, z: Tensor, y: Tensor | None = None) -> tuple[Tensor, Tensor]:
        b, c4, h, w = z.shape
        z = z.reshape(b, c4 // 4, 2, 2, h, w)  # (B, C, 2, 2, H/2, W/2)
        z = z.permute(0, 1, 4, 2, 5, 3)  # (B, C, H/2, 2, W/2, 2)
        return z.reshape(b, c4 // 4, 2 * h, 2 * w), z.new_zeros(b)

