"""The contract every invertible layer follows, and the one composite that chains layers."""

from __future__ import annotations

from collections.abc import Callable, Iterable

from torch import Tensor, nn

__all__ = ["Composite", "Inverse", "Transform", "batch_is_shared", "check_labels", "per_sample_sum", "set_share_mean",
           "share_mean"]

# How the layers that start from their first batch (ActNorm, DiagonalScaling with init="data")
# average its statistics when several processes each hold a share of that batch. None: one
# process holds the whole batch. The trainer installs an all-reduce for a multi-process run
# (`couplings.training.run`), so that no layer needs to know how many processes train it.
_SHARE_MEAN: Callable[[Tensor], Tensor] | None = None


def set_share_mean(mean: Callable[[Tensor], Tensor] | None) -> None:
    """Installs ``mean`` (a tensor -> its element-wise mean over the processes that share a
    batch), or with None goes back to one process."""
    global _SHARE_MEAN
    _SHARE_MEAN = mean


def batch_is_shared() -> bool:
    """Whether several processes each hold a share of the batch."""
    return _SHARE_MEAN is not None


def share_mean(t: Tensor) -> Tensor:
    """``t``'s element-wise mean over the processes that share the batch (``t`` itself on one)."""
    return t if _SHARE_MEAN is None else _SHARE_MEAN(t)


class Transform(nn.Module):
    """An invertible map between data space and noise space.

    Every subclass MUST implement both directions with this contract:

    * ``forward(x, y=None) -> (z, logabsdet)`` maps data ``x`` to noise ``z``;
    * ``inverse(z, y=None) -> (x, logabsdet)`` maps noise back to data;
    * ``logabsdet`` has shape ``(B,)`` and is ``log |det dz/dx|`` for ``forward`` and
      ``log |det dx/dz|`` for ``inverse``, so the two sum to zero on a round trip;
    * ``y`` is an optional context (e.g. a class label) that a layer may ignore.

    Models (`couplings.models.Flow`) keep the same contract under the names ``transform`` and
    ``inverse``, with flat latents ``z`` of shape (B, D).
    """

    def forward(self, x: Tensor, y: Tensor | None = None) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def inverse(self, z: Tensor, y: Tensor | None = None) -> tuple[Tensor, Tensor]:
        raise NotImplementedError


class Composite(Transform):
    """Applies transforms in order (``forward``) or in reverse order (``inverse``)."""

    def __init__(self, transforms: Iterable[Transform]):
        super().__init__()
        self.transforms = nn.ModuleList(transforms)

    def forward(self, x: Tensor, y: Tensor | None = None) -> tuple[Tensor, Tensor]:
        logabsdet = x.new_zeros(x.shape[0])
        for t in self.transforms:
            x, ld = t(x, y)
            logabsdet = logabsdet + ld
        return x, logabsdet

    def inverse(self, z: Tensor, y: Tensor | None = None) -> tuple[Tensor, Tensor]:
        logabsdet = z.new_zeros(z.shape[0])
        for t in reversed(self.transforms):
            z, ld = t.inverse(z, y)
            logabsdet = logabsdet + ld
        return z, logabsdet


class Inverse(Transform):
    """A transform run backwards: ``Inverse(t).forward`` is ``t.inverse`` and vice versa
    (e.g. a sigmoid as the inverse of `couplings.transforms.Logit`)."""

    def __init__(self, transform: Transform):
        super().__init__()
        self.transform = transform

    def forward(self, x: Tensor, y: Tensor | None = None) -> tuple[Tensor, Tensor]:
        return self.transform.inverse(x, y)

    def inverse(self, z: Tensor, y: Tensor | None = None) -> tuple[Tensor, Tensor]:
        return self.transform(z, y)


def per_sample_sum(x: Tensor) -> Tensor:
    """(B, ...) -> (B,): the sum over everything but the batch dimension."""
    return x.flatten(1).sum(1)


def check_labels(y: Tensor | None, batch: int, num_classes: int) -> None:
    """Raises a clear error unless ``y`` is a batch of ``batch`` labels in 0..num_classes-1 (the
    context of a class-conditional layer)."""
    if y is None or y.shape != (batch,) or y.min() < 0 or y.max() >= num_classes:
        found = None if y is None else y.tolist()
        raise ValueError(f"this flow is class-conditional: expected labels of shape ({batch},) "
                         f"in 0..{num_classes - 1}, found {found}")
