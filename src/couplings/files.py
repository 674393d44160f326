"""The two ways couplings writes a file: whole files under a temporary name, synced, then renamed
into place (`atomic_write`), and synced lines appended to a log (`append_line`).

Both raise `WriteError` (an `OSError`) naming the file for whatever the filesystem refuses: a full
disk, an I/O error, a read-only, vanished or forbidden directory.

Two test-only hooks, read from the environment on every write so that a test can set them for a
child process (both are off unless set):

- ``COUPLINGS_TEST_WRITE_PAUSE=SECONDS``: each write pauses half-way (after part of the bytes,
  before the sync and the rename), so that a kill lands inside a write; a line on stderr marks
  the start of the pause and the end of the write;
- ``COUPLINGS_TEST_WRITE_FAULT=ERRNO:PATTERN``: a write to a file whose name matches the glob
  ``PATTERN`` fails half-way with ``ERRNO`` (a name from `errno`, e.g. ``ENOSPC``).
"""

from __future__ import annotations

import errno
import fnmatch
import os
import sys
import time
from collections.abc import Callable
from io import BytesIO
from pathlib import Path
from typing import BinaryIO

__all__ = ["WriteError", "append_line", "atomic_write", "remove_stale_temporaries"]


class WriteError(OSError):
    """A file could not be written; ``filename`` names it and nothing half-written is left under it."""


def atomic_write(path: str | os.PathLike, content: bytes | str | Callable[[BinaryIO], object]) -> Path:
    """Writes ``content`` to ``path`` so that the final name only ever holds a complete file.

    ``content`` is bytes, text (UTF-8) or a function that writes into a binary file. The data go
    to ``.NAME.tmpPID`` beside ``path``, are flushed and fsynced, and the file is renamed over
    ``path``; whatever fails (a full disk, a kill, an exception in ``content``) leaves the
    previous file, if any, as it was. A failure removes the temporary file; a kill leaves it,
    and `remove_stale_temporaries` clears it later.

    Raises:
        WriteError: The filesystem refused (full disk, I/O error, read-only or missing directory).
    """
    path = Path(path)
    if callable(content):
        buffer = BytesIO()
        content(buffer)
        data = buffer.getvalue()
    else:
        data = content.encode() if isinstance(content, str) else content
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            _write(f, data, path)
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        raise _write_error(e, path) from None
    finally:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:  # the directory itself is gone or unreadable: nothing was left in it
            pass
    return path


def append_line(path: str | os.PathLike, line: str) -> None:
    """Appends ``line`` and a newline to ``path`` and fsyncs it. A kill inside the write can
    leave a torn last line, without its newline; readers drop such a line (`couplings.rundir`).

    Raises:
        WriteError: As `atomic_write`.
    """
    path = Path(path)
    try:
        with open(path, "ab") as f:
            _write(f, (line + "\n").encode(), path)
            os.fsync(f.fileno())
    except OSError as e:
        raise _write_error(e, path) from None


def remove_stale_temporaries(directory: str | os.PathLike) -> list[Path]:
    """Removes the temporary files that killed writers left in ``directory``; returns them."""
    stale = [p for p in Path(directory).glob(".*.tmp*") if p.is_file()]
    for p in stale:
        p.unlink(missing_ok=True)
    return stale


def _write(f: BinaryIO, data: bytes, path: Path) -> None:
    """Writes ``data`` in two halves, honouring the test hooks between them."""
    half = len(data) // 2
    f.write(data[:half])
    fault = os.environ.get("COUPLINGS_TEST_WRITE_FAULT")
    if fault:
        name, _, pattern = fault.partition(":")
        if fnmatch.fnmatch(path.name, pattern or "*"):
            code = getattr(errno, name)
            raise OSError(code, os.strerror(code), str(path))
    pause = os.environ.get("COUPLINGS_TEST_WRITE_PAUSE")
    if pause:
        f.flush()
        print(f"couplings-test: inside a write of {path.name}", file=sys.stderr, flush=True)
        time.sleep(float(pause))
    f.write(data[half:])
    f.flush()
    if pause:
        print("couplings-test: write done", file=sys.stderr, flush=True)


def _write_error(error: OSError, path: Path) -> WriteError:
    if isinstance(error, WriteError):
        return error
    return WriteError(error.errno, error.strerror or str(error), str(path))
