"""The run directory: the one module that knows its layout, and the only writer of its files.

A run directory holds:

- ``config.json``: the run's model, size, model config, training options and hardware;
- ``last.pt`` and ``best.pt``: the newest checkpoint and the one with the best validation score
  (`couplings.checkpoint` owns their file format);
- ``metrics.jsonl``: one JSON line per (possibly partial) epoch;
- ``samples/epoch_NNNN.png``: a grid of samples after each epoch;
- ``eval.json``: evaluations by split and temperature (``couplings eval``, ``couplings compare``);
- ``.lock``: held (``flock``) by the process training into the directory.

Every file is written through `couplings.files.atomic_write` (``metrics.jsonl`` is appended to,
one synced line at a time).
"""

from __future__ import annotations

import fcntl
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from couplings import checkpoint
from couplings.files import atomic_write
from couplings.images import save_grid

__all__ = ["RunDir", "RunDirBusy"]


class RunDirBusy(RuntimeError):
    """Another live process is training into the run directory."""


class RunDir:
    """A run directory at ``path`` (which need not exist yet)."""

    CONFIG, METRICS, SAMPLES, EVAL, LOCK = "config.json", "metrics.jsonl", "samples", "eval.json", ".lock"

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    @property
    def last(self) -> Path:
        return self.path / checkpoint.LAST

    @property
    def best(self) -> Path:
        return self.path / checkpoint.BEST

    def is_empty(self) -> bool:
        """True when nothing of a run is there yet: no directory, or one with at most a lock file."""
        if not self.path.exists():
            return True
        return self.path.is_dir() and all(p.name == self.LOCK for p in self.path.iterdir())

    def create(self) -> None:
        (self.path / self.SAMPLES).mkdir(parents=True, exist_ok=True)

    # ---- config.json ---------------------------------------------------------------------

    def write_config(self, run: dict[str, Any]) -> Path:
        return atomic_write(self.path / self.CONFIG, json.dumps(run, indent=2) + "\n")

    def read_config(self) -> dict[str, Any]:
        return json.loads((self.path / self.CONFIG).read_text())

    # ---- checkpoints ---------------------------------------------------------------------

    def save_checkpoint(self, payload: dict[str, Any], *, best: bool) -> None:
        """Writes ``last.pt``, and ``best.pt`` too when ``best``."""
        checkpoint.save(payload, self.last)
        if best:
            checkpoint.save(payload, self.best)

    def load_last(self) -> dict[str, Any]:
        return checkpoint.load(self.last)

    # ---- metrics.jsonl -------------------------------------------------------------------

    def append_metrics(self, record: dict[str, Any]) -> None:
        with open(self.path / self.METRICS, "a") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def read_metrics(self) -> list[dict[str, Any]]:
        path = self.path / self.METRICS
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []

    def forget_metrics_after(self, step: int) -> None:
        """Drops metrics lines past ``step`` (written after the checkpoint a run resumes from)."""
        path = self.path / self.METRICS
        if not path.is_file():
            return
        lines = path.read_text().splitlines()
        kept = [line for line in lines if line.strip() and json.loads(line).get("step", 0) <= step]
        if len(kept) != len(lines):
            atomic_write(path, "".join(line + "\n" for line in kept))

    # ---- samples/ ------------------------------------------------------------------------

    def save_samples(self, images: torch.Tensor, index: int, nrow: int = 8) -> Path:
        directory = self.path / self.SAMPLES
        directory.mkdir(exist_ok=True)  # a run directory copied without it must not crash the run
        return save_grid(images, directory / f"epoch_{index:04d}.png", nrow=nrow)

    # ---- eval.json -----------------------------------------------------------------------

    def read_eval(self) -> dict[str, Any]:
        path = self.path / self.EVAL
        return json.loads(path.read_text()) if path.is_file() else {}

    def update_eval(self, key: str, result: dict[str, Any]) -> Path:
        """Sets ``eval.json[key] = result``, keeping the other entries."""
        return atomic_write(self.path / self.EVAL, json.dumps({**self.read_eval(), key: result}, indent=2) + "\n")

    # ---- .lock ---------------------------------------------------------------------------

    @contextmanager
    def lock(self) -> Iterator[None]:
        """Holds an exclusive lock on the directory (created if need be) while a run trains.

        The lock is an ``flock`` on ``.lock``, which the kernel releases when the holder exits,
        however it exits: a lock left by a killed process never blocks a later ``--resume``.

        Raises:
            RunDirBusy: Another live process holds it.
        """
        self.path.mkdir(parents=True, exist_ok=True)
        with open(self.path / self.LOCK, "a+") as f:
            try:
                fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                f.seek(0)
                holder = f.read().strip() or "unknown"
                raise RunDirBusy(
                    f"{self.path} is in use by another 'couplings train' (pid {holder}); "
                    "wait for it to finish or stop it first"
                ) from None
            f.seek(0)
            f.truncate()
            f.write(f"{os.getpid()}\n")
            f.flush()
            try:
                yield
            finally:
                fcntl.flock(f.fileno(), fcntl.LOCK_UN)
