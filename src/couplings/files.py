"""The one way couplings writes a file: under a temporary name, synced, then renamed into place."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

__all__ = ["atomic_write"]


def atomic_write(path: str | os.PathLike, content: bytes | str | Callable[[BinaryIO], object]) -> Path:
    """Writes ``content`` to ``path`` so that the final name only ever holds a complete file.

    ``content`` is bytes, text (UTF-8) or a function that writes into the open binary file. The
    data go to ``.NAME.tmpPID`` beside ``path``, are flushed and fsynced, and the file is renamed
    over ``path``; whatever fails (a full disk, a kill, an exception in ``content``) leaves the
    previous file, if any, as it was and no temporary file behind.

    Raises:
        OSError: From the filesystem, unchanged (its ``filename`` names the file).
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            if callable(content):
                content(f)
            else:
                f.write(content.encode() if isinstance(content, str) else content)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path
