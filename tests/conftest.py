"""Shared fixtures: synthetic IDX datasets registered under a throwaway name; the stress mode of
the tests that start processes."""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from couplings import data

_TYPE_CODES = {np.dtype(np.uint8): 0x08, np.dtype(np.int32): 0x0C, np.dtype(np.float32): 0x0D}


def idx_bytes(array: np.ndarray) -> bytes:
    """Encodes an array in the IDX format (big-endian payload)."""
    code = _TYPE_CODES[array.dtype]
    header = bytes([0, 0, code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(array.dtype.newbyteorder(">")).tobytes()


def synthetic_images(n: int, seed: int, size: int = 28) -> tuple[np.ndarray, np.ndarray]:
    """Bright squares on a dark background, the square's position set by the label."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 10, n).astype(np.uint8)
    images = rng.integers(0, 30, (n, size, size)).astype(np.uint8)
    for img, label in zip(images, labels):
        r, c = 2 + 2 * (label // 4), 2 + 2 * (label % 4)
        img[r : r + size // 3, c : c + size // 3] = 200 + rng.integers(0, 56)
    return images, labels


def write_tiny_dataset(root: Path) -> data.DatasetSpec:
    """Writes dataset "tiny" (300 train / 100 test synthetic 28x28 images) under ``root`` and
    returns its spec, whose checksums are those of the bytes written."""
    (root / "tiny").mkdir(parents=True)
    md5 = {}
    for split, n, seed in (("train", 300, 0), ("test", 100, 1)):
        images, labels = synthetic_images(n, seed)
        image_file, label_file = data.SPLIT_FILES[split]
        for name, array in ((image_file, images), (label_file, labels)):
            raw = idx_bytes(array)
            md5[name] = hashlib.md5(raw).hexdigest()
            (root / "tiny" / f"{name}.gz").write_bytes(gzip.compress(raw))
    return data.DatasetSpec(name="tiny", md5=md5)


@pytest.fixture
def tiny_dataset(tmp_path, monkeypatch) -> Path:
    """Registers dataset "tiny" and returns the data root, also set as $COUPLINGS_DATA."""
    root = tmp_path / "data"
    monkeypatch.setitem(data.DATASETS, "tiny", write_tiny_dataset(root))
    monkeypatch.setenv("COUPLINGS_DATA", str(root))
    return root


# Runs `couplings` in a child process that knows the synthetic dataset "tiny" ($COUPLINGS_DATA is inherited).
_CHILD = (
    "import json, sys\n"
    "from couplings import data\n"
    "from couplings.cli import main\n"
    "data.DATASETS['tiny'] = data.DatasetSpec(name='tiny', md5=json.loads(sys.argv[1]))\n"
    "sys.exit(main(sys.argv[2:]))\n"
)


def cli_child(*argv: str) -> list[str]:
    """The command line of a child process running ``couplings *argv`` with dataset "tiny"."""
    return [sys.executable, "-c", _CHILD, json.dumps(data.DATASETS["tiny"].md5), *argv]


# Tests marked `network` read the real MNIST and Fashion-MNIST files (fetched through the data
# layer's sources once, then cached). Where no source is reachable they are skipped with the
# reason, unless $COUPLINGS_REQUIRE_NETWORK=1 (set by CI) makes that a failure.
_UNREACHABLE: dict[str, str | None] = {}


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    if item.get_closest_marker("network") is None:
        return
    for name in ("mnist", "fashion-mnist"):
        if name not in _UNREACHABLE:
            try:
                data.fetch(name)
                _UNREACHABLE[name] = None
            except data.DatasetError as e:
                _UNREACHABLE[name] = str(e)
        if _UNREACHABLE[name]:
            message = f"no source of {name} reachable: {_UNREACHABLE[name]}"
            if os.environ.get("COUPLINGS_REQUIRE_NETWORK") == "1":
                pytest.fail(f"{message} ($COUPLINGS_REQUIRE_NETWORK=1 makes the real datasets required)")
            pytest.skip(f"{message}; set COUPLINGS_REQUIRE_NETWORK=1 to make this a failure")


# Tests marked `processes` start training processes and time signals, kills, locks or faults
# against them (torchrun, SIGKILL sweeps, write faults). COUPLINGS_STRESS=N runs each of them N
# times while a CPU hog (one busy process per core) runs beside it, as on a loaded CI machine.
# Unset, nothing changes and no hog runs.
STRESS = int(os.environ.get("COUPLINGS_STRESS") or 0)

# The hog's loop; it ends by itself if pytest dies without stopping it.
_HOG = "import os\nparent = os.getppid()\nwhile os.getppid() == parent:\n    for _ in range(10**6):\n        pass\n"


def pytest_configure(config):
    config.addinivalue_line("markers", "processes: starts training processes and signals, kills or faults them "
                                       "($COUPLINGS_STRESS=N: N times beside a CPU hog)")


def pytest_generate_tests(metafunc):
    if STRESS and metafunc.definition.get_closest_marker("processes"):
        metafunc.fixturenames.append("stress_round")
        metafunc.parametrize("stress_round", range(1, STRESS + 1), ids=lambda i: f"stress{i}of{STRESS}")


def pytest_collection_modifyitems(items):
    """Under COUPLINGS_STRESS, round by round: every test once, then every test again, so that a
    run cut short still holds whole rounds and a failing test shows in the first round."""
    if STRESS:
        items.sort(key=lambda item: getattr(item, "callspec", None) and item.callspec.params.get("stress_round") or 0)


@pytest.fixture(autouse=True)
def _cpu_hog(request):
    """Under COUPLINGS_STRESS, a busy process per core beside each test marked `processes`."""
    if not STRESS or request.node.get_closest_marker("processes") is None:
        yield
        return
    hogs = [subprocess.Popen([sys.executable, "-c", _HOG]) for _ in os.sched_getaffinity(0)]
    try:
        yield
    finally:
        for hog in hogs:
            hog.kill()
            hog.wait()
