"""Datasets of one's own: a ``.npz`` file or a folder of PNG images (docs/own-data.md).

Read from a path: its files' bytes (`_own_files`), their sha256 (`_digest`, which
`couplings.data.fingerprint` returns), the ``.npz`` reader, the PNG folder reader, and the fixed
order and held-out tenth that make the train and test splits (`_own_splits`). Whether a name is
such a path (`couplings.data.is_path_dataset`) is decided in ``couplings.data``, beside the
registry of named datasets.
"""

from __future__ import annotations

import hashlib
import io
import os
import zipfile
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

from couplings.data.errors import DatasetError

OWN_DATASET = "the path of a .npz file or of a folder of PNG images"
_NPZ_ARRAYS = ("x", "y", "x_test", "y_test")
# Without a test split of its own, a dataset of one's own holds out the last tenth of its images.
_HELD_OUT_FRACTION = 10
# The fixed order that a dataset of one's own is put in before its splits are cut, so that a
# file or folder sorted by class still gives test and validation images of every class.
_ORDER_SEED = 0
# PNG modes read as they are, and those converted first (bilevel to grayscale, a palette to RGB).
_PNG_MODES = {"L": "L", "RGB": "RGB", "1": "L", "P": "RGB"}

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
