"""What training raises when it cannot start, cannot go on, or was asked to stop."""

from __future__ import annotations

__all__ = ["StoppedBySignal", "TrainingError"]


class TrainingError(RuntimeError):
    """Training cannot start or cannot go on (bad run directory, a loss that stays non-finite)."""


class StoppedBySignal(Exception):
    """SIGINT or SIGTERM stopped training after the current step; the run was checkpointed."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signum = signum
