"""The small MNIST / Fashion-MNIST classifier whose features the sample-quality metrics use."""

from __future__ import annotations

from importlib import resources

import torch
from torch import Tensor, nn

__all__ = ["FEATURE_EXTRACTOR", "Classifier", "load_classifier"]

FEATURE_EXTRACTOR = "couplings-cnn-{dataset} (128-d penultimate features of the project's own classifier; not Inception)"


class Classifier(nn.Module):
    """Two conv blocks and a 128-unit hidden layer; ``features`` is that hidden layer.

    Inputs are images in [0, 1] of shape (B, 1, 28, 28).
    """

    def __init__(self, num_classes: int = 10, feature_dim: int = 128):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # (B, 1, 28, 28) -> (B, 32, 14, 14)
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # -> (B, 64, 7, 7)
            nn.Flatten(), nn.Dropout(0.25), nn.Linear(64 * 7 * 7, feature_dim), nn.ReLU(),
        )
        self.head = nn.Sequential(nn.Dropout(0.25), nn.Linear(feature_dim, num_classes))

    def features(self, x: Tensor) -> Tensor:
        return self.body(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.body(x))


def load_classifier(dataset: str = "mnist", device: str | torch.device = "cpu") -> Classifier:
    """The committed classifier for ``dataset`` (made by ``scripts/train_classifier.py``), in eval mode."""
    name = f"classifier-{dataset}.pt"
    weights = resources.files("couplings") / "weights" / name
    if not weights.is_file():
        raise FileNotFoundError(f"no committed classifier weights {name}; expected them in couplings/weights/")
    with resources.as_file(weights) as path:
        state = torch.load(path, map_location="cpu", weights_only=True)
    model = Classifier()
    model.load_state_dict(state["model_state"])
    return model.to(device).eval()
