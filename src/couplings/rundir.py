"""The run directory: the one module that knows its layout, and the only writer of its files.

A run directory holds:

- ``config.json``: the run's model, size, model config, training options and hardware;
- ``last.pt``, ``previous.pt`` and ``best.pt``: the newest checkpoint, the one before it, and
  the one with the best validation score (`couplings.checkpoint` owns their file format, which
  carries a checksum); a resume takes the newest of them that loads and verifies;
- ``metrics.jsonl``: one JSON line per (possibly partial) epoch; a torn last line (a kill inside
  an append) is dropped with a warning, any other bad line is an error naming its number;
- ``samples/epoch_NNNN.png``: a grid of samples after each epoch;
- ``eval.json``: evaluations by split and temperature (``couplings eval``, ``couplings compare``);
- ``tensorboard/``: TensorBoard event files, for a run trained with ``--tensorboard``;
- ``.lock``: held (``flock``) by the process training into the directory.

Every file is written through `couplings.files.atomic_write` (``metrics.jsonl`` through
`couplings.files.append_line`, one synced line at a time); a refused write raises
`couplings.files.WriteError` naming the file.
"""

from __future__ import annotations

import errno
import fcntl
import functools
import json
import os
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from couplings import checkpoint
from couplings.evaluation import Evaluation
from couplings.files import (
    WriteError,
    append_line,
    atomic_write,
    remove_stale_temporaries,
)
from couplings.images import save_grid

__all__ = ["MetricsError", "RunDir", "RunDirBusy", "TornLineWarning"]


class RunDirBusy(RuntimeError):
    """Another live process is training into the run directory."""


class MetricsError(ValueError):
    """A line of ``metrics.jsonl`` other than a torn last one is not a JSON object."""


class TornLineWarning(UserWarning):
    """The last line of ``metrics.jsonl`` was cut short (a kill inside an append) and is ignored."""


def _writes(method):
    """Marks a method that writes the directory: a no-op in a `RunDir` that is not its writer."""
    @functools.wraps(method)
    def write(self, *args, **kwargs):
        return method(self, *args, **kwargs) if self.writer else None
    return write


class RunDir:
    """A run directory at ``path`` (which need not exist yet).

    Under torchrun every rank has one, but only rank 0's is the ``writer``: on the other ranks
    the methods that write (and `lock`) do nothing, so that each file has one writer.
    """

    CONFIG, METRICS, SAMPLES, EVAL, LOCK = "config.json", "metrics.jsonl", "samples", "eval.json", ".lock"
    TENSORBOARD = "tensorboard"

    def __init__(self, path: str | os.PathLike, writer: bool = True):
        self.path = Path(path)
        self.writer = writer
        self.saved: str | None = None  # the checkpoint this process wrote last, as "PATH (step N)"

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    @property
    def last(self) -> Path:
        return self.path / checkpoint.LAST

    @property
    def best(self) -> Path:
        return self.path / checkpoint.BEST

    @property
    def previous(self) -> Path:
        return self.path / checkpoint.PREVIOUS

    def is_empty(self) -> bool:
        """True when nothing of a run is there yet: no directory, or one with at most a lock file."""
        if not self.path.exists():
            return True
        return self.path.is_dir() and all(p.name == self.LOCK for p in self.path.iterdir())

    def never_checkpointed(self) -> bool:
        """True for a run killed before its first checkpoint: the directory holds only what a run
        writes before it (``config.json``, the lock, an empty ``samples/``, temporary files)."""
        if not self.path.is_dir():
            return False
        for p in self.path.iterdir():
            if p.name == self.SAMPLES and p.is_dir() and not any(p.iterdir()):
                continue
            if p.name not in (self.LOCK, self.CONFIG) and not (p.name.startswith(".") and ".tmp" in p.name):
                return False
        return True

    @_writes
    def create(self) -> None:
        (self.path / self.SAMPLES).mkdir(parents=True, exist_ok=True)

    # ---- config.json ---------------------------------------------------------------------

    @_writes
    def write_config(self, run: dict[str, Any]) -> Path:
        return atomic_write(self.path / self.CONFIG, json.dumps(run, indent=2) + "\n")

    def read_config(self) -> dict[str, Any]:
        return json.loads((self.path / self.CONFIG).read_text())

    # ---- checkpoints ---------------------------------------------------------------------

    @_writes
    def save_checkpoint(self, ckpt: checkpoint.Checkpoint, *, best: bool) -> None:
        """Writes ``last.pt``, keeping the one it replaces as ``previous.pt``; when ``best``, the
        file is written as ``best.pt`` first and ``last.pt`` then points at it. ``previous.pt``
        and ``last.pt`` are swapped in as hard links (no copy) by a rename, so every name always
        holds a complete file, and a kill between two renames leaves ``last.pt`` at an older,
        intact state from which a resume redoes the same steps."""
        if self.last.is_file():
            self._link(self.last, self.previous)
        checkpoint.save(ckpt, self.best if best else self.last)
        if best:
            self._link(self.best, self.last)
        self.saved = f"{self.last} (step {ckpt.step})"

    def _link(self, source: Path, name: Path) -> None:
        """Points ``name`` at ``source``'s file: a hard link under a temporary name, renamed into
        place (a full copy where the filesystem has no hard links)."""
        tmp = name.with_name(f".{name.name}.tmp{os.getpid()}")
        try:
            tmp.unlink(missing_ok=True)
            try:
                os.link(source, tmp)
            except OSError as e:
                if e.errno not in (errno.EPERM, errno.EXDEV, errno.EMLINK, errno.ENOTSUP):
                    raise
                atomic_write(name, source.read_bytes())
                return
            os.replace(tmp, name)
        except WriteError:
            raise
        except OSError as e:
            raise WriteError(e.errno, e.strerror or str(e), str(name)) from None

    def checkpoints(self) -> list[Path]:
        """The run's checkpoint files that exist, newest first by construction: last, previous, best."""
        return [p for p in (self.last, self.previous, self.best) if p.is_file()]

    def newest_intact(self) -> tuple[Path, checkpoint.Checkpoint, list[tuple[Path, Exception]]]:
        """The newest checkpoint of the run that loads, verifies and fits its model (``last.pt``
        if it does, else the later of ``previous.pt`` and ``best.pt``), its contents, and the
        damaged ones met on the way with their errors. Reads only.

        Raises:
            CheckpointError: None of them is intact (each one's reason is given), or none exists.
        """
        candidates = self.checkpoints()
        if not candidates:
            raise checkpoint.CheckpointError(f"cannot resume: {self.last} does not exist")
        intact, damaged = [], []
        for path in candidates:
            try:
                intact.append((path, checkpoint.load_model(path)[1]))
            except checkpoint.CheckpointError as e:
                damaged.append((path, e))
            if path == self.last and intact:
                break  # last.pt is the newest there is
        if not intact:
            reasons = "; ".join(str(e) for _, e in damaged)
            raise checkpoint.CheckpointError(f"cannot resume {self.path}: no intact checkpoint ({reasons})")
        path, state = max(intact, key=lambda item: item[1].step)
        return path, state, damaged

    @_writes
    def resume_from(self, path: Path, damaged: list[tuple[Path, Exception]], say) -> None:
        """Makes ``path`` (from `newest_intact`) the run's ``last.pt`` and moves each damaged
        checkpoint aside as ``NAME.damaged`` (so that no later save rotates it into
        ``previous.pt``), telling ``say`` (a function of one line) what was done."""
        for bad, error in damaged:
            os.replace(bad, bad.with_name(bad.name + ".damaged"))
            say(f"warning: {error}; moved it to {bad.name}.damaged")
        if path != self.last:
            self._link(path, self.last)
            say(f"warning: resuming from {path.name}, the newest intact checkpoint of the run")
        self.remove_stale_temporaries()

    def remove_stale_temporaries(self) -> list[Path]:
        """Removes the temporary files of writes that a kill interrupted."""
        return remove_stale_temporaries(self.path) + remove_stale_temporaries(self.path / self.SAMPLES)

    # ---- metrics.jsonl -------------------------------------------------------------------

    @_writes
    def append_metrics(self, record: dict[str, Any]) -> None:
        append_line(self.path / self.METRICS, json.dumps(record))

    def read_metrics(self) -> list[dict[str, Any]]:
        """The records of ``metrics.jsonl`` (none if it does not exist). A torn last line is
        dropped with a `TornLineWarning`.

        Raises:
            MetricsError: Another line is not a JSON object (its file and line number are named).
        """
        return self._metrics()[0]

    def _metrics(self) -> tuple[list[dict[str, Any]], bool]:
        """(records, whether a torn last line was dropped)."""
        path = self.path / self.METRICS
        if not path.is_file():
            return [], False
        text = path.read_text(errors="replace")
        lines = text.split("\n")  # a complete file ends with a newline: its last piece is empty
        records, torn = [], False
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                if not isinstance(record, dict):
                    raise ValueError("not a JSON object")
            except ValueError as e:
                if number == len(lines):  # no newline after it: a write that was cut short
                    warnings.warn(f"{path}: dropped a torn last line {number} (a write cut short)", TornLineWarning,
                                  stacklevel=3)
                    torn = True
                    continue
                raise MetricsError(f"{path}: line {number} is not a JSON object ({e}); fix or delete that line") from None
            records.append(record)
        return records, torn

    @_writes
    def forget_metrics_after(self, step: int) -> None:
        """Drops metrics lines past ``step`` (written after the checkpoint a run resumes from) and
        a torn last line, rewriting the file (atomically) if either was there."""
        records, torn = self._metrics()
        kept = [r for r in records if r.get("step", 0) <= step]
        if torn or len(kept) != len(records):
            atomic_write(self.path / self.METRICS, "".join(json.dumps(r) + "\n" for r in kept))

    # ---- samples/ ------------------------------------------------------------------------

    @_writes
    def save_samples(self, images: torch.Tensor, index: int, nrow: int = 8) -> Path:
        directory = self.path / self.SAMPLES
        try:
            directory.mkdir(exist_ok=True)  # a run directory copied without it must not crash the run
        except OSError as e:
            raise WriteError(e.errno, e.strerror or str(e), str(directory)) from None
        return save_grid(images, directory / f"epoch_{index:04d}.png", nrow=nrow)

    # ---- eval.json -----------------------------------------------------------------------

    def read_eval(self) -> dict[str, Evaluation]:
        """``eval.json``'s evaluations by key (``test``, ``val``, ``test@K=16``, ...)."""
        path = self.path / self.EVAL
        stored = json.loads(path.read_text()) if path.is_file() else {}
        return {key: Evaluation.from_json(entry) for key, entry in stored.items()}

    @_writes
    def update_eval(self, key: str, result: Evaluation) -> Path:
        """Sets ``eval.json[key] = result``, keeping the other entries."""
        entries = {k: v.to_json() for k, v in {**self.read_eval(), key: result}.items()}
        return atomic_write(self.path / self.EVAL, json.dumps(entries, indent=2) + "\n")

    # ---- .lock ---------------------------------------------------------------------------

    @contextmanager
    def lock(self) -> Iterator[None]:
        """Holds an exclusive lock on the directory (created if need be) while a run trains.

        The lock is an ``flock`` on ``.lock``, which the kernel releases when the holder exits,
        however it exits: a lock left by a killed process never blocks a later ``--resume``.

        Raises:
            RunDirBusy: Another live process holds it.
        """
        if not self.writer:
            yield
            return
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
