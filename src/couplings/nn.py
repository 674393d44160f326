"""Plain neural-network building blocks used inside flow layers."""

from __future__ import annotations

from torch import nn

__all__ = ["mlp"]


def mlp(in_features: int, out_features: int, hidden_layers: int, hidden_units: int) -> nn.Sequential:
    """A ReLU MLP with ``hidden_layers`` hidden layers of ``hidden_units`` units and a linear output."""
    if hidden_layers < 1 or hidden_units < 1:
        raise ValueError(f"an MLP needs >= 1 hidden layer of >= 1 unit, found {hidden_layers} x {hidden_units}")
    layers: list[nn.Module] = []
    width = in_features
    for _ in range(hidden_layers):
        layers += [nn.Linear(width, hidden_units), nn.ReLU()]
        width = hidden_units
    layers.append(nn.Linear(width, out_features))
    return nn.Sequential(*layers)
