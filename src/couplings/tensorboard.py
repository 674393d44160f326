"""TensorBoard logging of a run (``couplings train --tensorboard``; the optional extra
``couplings[tensorboard]``): event files in ``RUN/tensorboard/``.

Every ``STEP_EVERY`` steps: the training loss, the learning rate and the gradient norm. After each
(possibly partial) epoch: every number of its ``metrics.jsonl`` line (validation bits/dim or NLL,
images/s, skipped steps, ...) and the grid of samples. ``tensorboard --logdir runs/`` shows them.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from couplings.config import ConfigError

__all__ = ["STEP_EVERY", "TensorBoard", "check_available"]

STEP_EVERY = 10


def check_available() -> None:
    """Raises `ConfigError` (before a run writes anything) when tensorboard is not installed."""
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        raise ConfigError("--tensorboard needs the tensorboard package: pip install 'couplings[tensorboard]'") from None


class TensorBoard:
    """Writes a run's events; a resumed run (``resumed_at``: its checkpoint's step + 1) drops the
    events logged from that step on, which the resumed run logs again.

    Raises:
        ConfigError: The tensorboard package is not installed.
    """

    def __init__(self, directory: Path, resumed_at: int | None = None):
        check_available()
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(directory), purge_step=resumed_at)

    def step(self, step: int, loss: float, lr: float, grad_norm: float | None) -> None:
        if step % STEP_EVERY:
            return
        self.writer.add_scalar("train/loss", loss, step)
        self.writer.add_scalar("train/lr", lr, step)
        if grad_norm is not None:
            self.writer.add_scalar("train/grad_norm", grad_norm, step)

    def epoch(self, record: dict) -> None:
        """The numbers of one metrics.jsonl record, under ``epoch/``, at its step."""
        for key, value in record.items():
            if key in ("epoch", "step") or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            if math.isfinite(value):
                self.writer.add_scalar(f"epoch/{key}", value, record["step"])
        self.writer.flush()

    def samples(self, grid: torch.Tensor, step: int) -> None:
        """A sample grid (C, H, W) with values in [0, 1]."""
        self.writer.add_image("samples", grid, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()
