"""Plain neural-network building blocks used inside flow layers."""

from __future__ import annotations

from torch import nn

__all__ = ["ResNet", "ResidualBlock", "mlp"]


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


def _wn_conv(in_channels: int, out_channels: int, kernel: int) -> nn.Module:
    return nn.utils.parametrizations.weight_norm(nn.Conv2d(in_channels, out_channels, kernel, padding=kernel // 2))


class ResidualBlock(nn.Module):
    """BN -> ReLU -> 3x3 conv -> BN -> ReLU -> 3x3 conv, added to the input (weight-normed convs)."""

    def __init__(self, channels: int):
        super().__init__()
        self.body = nn.Sequential(
            nn.BatchNorm2d(channels), nn.ReLU(), _wn_conv(channels, channels, 3),
            nn.BatchNorm2d(channels), nn.ReLU(), _wn_conv(channels, channels, 3),
        )

    def forward(self, x):
        return x + self.body(x)


class ResNet(nn.Module):
    """The s/t network of Real NVP's image couplings: a weight-normed ResNet whose last
    convolution starts at zero, so a coupling built on it starts as (nearly) the identity.

    References:
        Dinh et al., Real NVP, 2017, section 4.1; Salimans and Kingma, weight normalization, 2016.
    """

    def __init__(self, in_channels: int, out_channels: int, hidden: int, blocks: int):
        super().__init__()
        if hidden < 1 or blocks < 0:
            raise ValueError(f"a ResNet needs hidden >= 1 channels and blocks >= 0, found {hidden} and {blocks}")
        self.head = _wn_conv(in_channels, hidden, 3)
        self.blocks = nn.Sequential(*[ResidualBlock(hidden) for _ in range(blocks)])
        self.tail = nn.Sequential(nn.BatchNorm2d(hidden), nn.ReLU(), nn.Conv2d(hidden, out_channels, 3, padding=1))
        nn.init.zeros_(self.tail[-1].weight)
        nn.init.zeros_(self.tail[-1].bias)

    def forward(self, x):
        return self.tail(self.blocks(self.head(x)))
