"""The IDX format that MNIST and Fashion-MNIST ship in: `read_idx`, its parser, the type codes,
and the reading of a raw or gzip-compressed file whose bytes the checksums are taken of."""

from __future__ import annotations

import gzip
import math
import os
import zlib
from pathlib import Path

import numpy as np

from couplings.data.errors import DatasetError

# IDX type codes (third magic byte) -> big-endian numpy dtype.
_IDX_DTYPES = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}

# What gzip.decompress raises on damaged input: BadGzipFile (an OSError), EOFError, zlib.error.
_GZIP_ERRORS = (OSError, EOFError, zlib.error)


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Reads an IDX file (raw or gzip-compressed) into a native-endian array.

    The magic number, the dimensions and the payload length are all validated.

    Raises:
        DatasetError: The file is unreadable, not IDX, or truncated / too long.
    """
    path = Path(path)
    return _parse_idx(_read_bytes(path), path.name)


def _read_bytes(path: Path) -> bytes:
    """Returns a file's bytes, decompressed if it is gzip."""
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise DatasetError(f"cannot read {path}: {e.strerror or e}; expected a readable IDX file") from None
    if raw[:2] == b"\x1f\x8b":
        try:
            return gzip.decompress(raw)
        except _GZIP_ERRORS as e:
            raise DatasetError(f"{path} is a damaged gzip file: {e}; expected a complete gzip stream") from None
    return raw


def _parse_idx(data: bytes, name: str) -> np.ndarray:
    if len(data) < 4:
        raise DatasetError(f"{name}: expected an IDX header of at least 4 bytes, found {len(data)} bytes")
    if data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES or data[3] == 0:
        raise DatasetError(
            f"{name}: bad magic number 0x{data[:4].hex()}; expected 0x0000TTNN with type TT in "
            f"{{{', '.join(f'{k:02x}' for k in _IDX_DTYPES)}}} and NN >= 1 dimensions"
        )
    dtype, ndim = _IDX_DTYPES[data[2]], data[3]
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DatasetError(f"{name}: truncated header: expected {header} bytes for {ndim} dimensions, found {len(data)}")
    shape = tuple(int(d) for d in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    expected = header + math.prod(shape) * dtype.itemsize  # exact: np.prod would overflow on huge dims
    if len(data) != expected:
        what = "truncated" if len(data) < expected else "too long"
        raise DatasetError(f"{name}: {what}: shape {shape} needs {expected} bytes, found {len(data)}")
    try:
        array = np.frombuffer(data, dtype=dtype, offset=header).reshape(shape)
    except ValueError:  # an empty array whose other dimensions are too large for numpy
        raise DatasetError(f"{name}: expected dimensions an array can hold, found shape {shape}") from None
    return array.astype(dtype.newbyteorder("="))
