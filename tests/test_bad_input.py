"""Bad input at the command line: exit code 2 for usage errors and 1 for runtime errors, exactly
one stderr line that starts with ``error:`` and says what was expected and what was found, no
traceback, and nothing written or changed on disk.

docs/reliability.md lists every case here with the message it produces.
"""

from __future__ import annotations

import errno
import gzip
import hashlib
import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import idx_bytes, write_tiny_dataset
from couplings import checkpoint, data, files
from couplings.cli import main

SMALL = ["--set", "size=small", "--set", "hidden_units=8", "--set", "val_size=50", "--set", "samples_per_epoch=2",
         "--device", "cpu", "--quiet"]
TINY = ["--dataset", "tiny", *SMALL, "--batch-size", "50"]


def _tree(root: Path, skip: tuple[str, ...] = ()) -> dict[str, bytes | None]:
    """Every path under ``root`` with its bytes (None for directories): equal trees mean byte-identical."""
    return {str(p.relative_to(root)): None if p.is_dir() else p.read_bytes()
            for p in sorted(root.rglob("*")) if p.relative_to(root).parts[0] not in skip}


def _fails(capsys, argv: list[str], code: int, *fragments: str) -> str:
    """Runs the CLI and checks: the exit code, a single stderr line 'error: ...' holding every
    fragment, no traceback, nothing on stdout. Returns that line."""
    capsys.readouterr()
    try:
        result = main(argv)
    except SystemExit as e:  # argparse's usage errors
        result = e.code
    captured = capsys.readouterr()
    assert result == code, captured.err
    assert len(captured.err.splitlines()) == 1, captured.err
    line = captured.err.strip()
    assert line.startswith("error: ") and "Traceback" not in captured.err
    for fragment in fragments:
        assert fragment in line
    assert captured.out == ""
    return line


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A finished two-step tiny NICE run (read only: tests copy it before changing anything)."""
    root = tmp_path_factory.mktemp("trained")
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(data.DATASETS, "tiny", write_tiny_dataset(root / "data"))
        mp.setenv("COUPLINGS_DATA", str(root / "data"))
        assert main(["train", "nice", "--out", str(root / "run"), *TINY, "--max-steps", "2"]) == 0
    return root / "run"


@pytest.fixture
def run_copy(trained, tmp_path) -> Path:
    return Path(shutil.copytree(trained, tmp_path / "run"))


# Config and command line --------------------------------------------------------------------


@pytest.mark.parametrize(
    "argv, fragments",
    [
        # unknown keys
        (["--set", "hidden_unit=3"], ["unknown key 'hidden_unit'", "known keys:"]),
        (["--set", "learning_rate=0.1"], ["unknown key 'learning_rate'"]),
        # wrong types
        (["--set", "lr=abc"], ["lr: expected a number, found 'abc'"]),
        (["--set", "hidden_units=1.5"], ["hidden_units: expected an integer, found '1.5'"]),
        (["--set", "betas=0.9"], ["betas: expected 2 comma-separated values, found '0.9'"]),
        (["--set", "lr=nan"], ["lr: expected a finite number, found 'nan'"]),
        (["--set", "grad_clip=inf"], ["grad_clip: expected a finite number, found 'inf'"]),
        (["--set", "size="], ["size: expected a value after '=', found nothing"]),
        (["--set", "hidden_units"], ["expected key=value, found 'hidden_units'"]),
        # zero or negative sizes, other values out of range
        (["--set", "hidden_units=0"], ["hidden_units must be >= 1, found 0"]),
        (["--set", "couplings=-2"], ["couplings must be >= 1, found -2"]),
        (["--set", "batch_size=-1"], ["batch_size must be >= 1, found -1"]),
        (["--set", "val_size=0"], ["val_size must be >= 1, found 0"]),
        (["--set", "lr=-0.1"], ["need lr > 0", "found -0.1"]),
        (["--set", "betas=0.9,1.5"], ["betas must be two numbers in [0, 1), found (0.9, 1.5)"]),
        (["--set", "prior=cauchy"], ["prior must be 'logistic' or 'gaussian', found 'cauchy'"]),
        (["--set", "size=huge"], ["size must be one of ['paper', 'small'] for nice, found 'huge'"]),
        (["--set", "seed=-1"], ["seed must be an integer in [0, 2**32), found -1"]),
    ],
)
def test_bad_training_options(tiny_dataset, tmp_path, capsys, argv, fragments):
    before = _tree(tmp_path)
    _fails(capsys, ["train", "nice", "--dataset", "tiny", "--out", str(tmp_path / "run"), "--quiet", *argv], 2, *fragments)
    assert _tree(tmp_path) == before  # no run directory, nothing else


@pytest.mark.parametrize(
    "argv, fragments",
    [
        (["train", "maf"], ["argument model: invalid choice: 'maf'"]),
        (["train", "nice", "--dataset", "cifar10"], ["argument --dataset: invalid choice: 'cifar10'"]),
        (["train", "nice", "--epochs", "0"], ["argument --epochs: epochs must be >= 1, found 0"]),
        (["train", "nice", "--batch-size", "-1"], ["argument --batch-size: batch_size must be >= 1, found -1"]),
        (["train", "nice", "--max-steps", "ten"], ["argument --max-steps: max_steps: expected an integer, found 'ten'"]),
        (["train", "nice", "--max-minutes", "nan"], ["argument --max-minutes: max_minutes: expected a finite number, found 'nan'"]),
        (["train", "nice", "--seed", "18446744073709551616"], ["argument --seed: seed must be an integer in [0, 2**32)"]),
        (["train", "nice", "--resume"], ["--resume needs --out"]),
        (["sample", "RUN", "-o", "x.png", "--temperature", "0"], ["argument --temperature: expected a number > 0, found 0"]),
        (["sample", "RUN", "-o", "x.png", "--temperature", "-1"], ["expected a number > 0, found -1"]),
        (["sample", "RUN", "-o", "x.png", "--temperature", "inf"], ["expected a number > 0, found inf"]),
        (["sample", "RUN", "-o", "x.png", "--temperatures", "0.5,0"], ["expected temperatures > 0, found 0.5,0"]),
        (["sample", "RUN", "-o", "x.png", "--temperatures", "0.5,nan"], ["expected temperatures > 0, found 0.5,nan"]),
        (["eval", "RUN", "--temperature", "0"], ["argument --temperature: expected a number > 0, found 0"]),
        (["sample", "RUN", "-o", "x.png", "--label", "10"], ["argument --label: expected a digit label 0-9, found 10"]),
        (["sample", "RUN", "-o", "x.png", "--label", "-1"], ["expected a digit label 0-9, found -1"]),
        (["sample", "RUN", "-o", "x.png", "--label", "seven"], ["expected a digit label 0-9, found seven"]),
        (["sample", "RUN", "-o", "x.png", "-n", "0"], ["argument -n: expected an integer >= 1, found 0"]),
        (["eval", "RUN", "--batch-size", "0"], ["argument --batch-size: expected an integer >= 1, found 0"]),
        (["eval", "RUN", "--samples", "-5"], ["argument --samples: expected an integer >= 0, found -5"]),
        (["compare", "RUN", "--draws", "0"], ["argument --draws: expected an integer >= 1, found 0"]),
        (["sample", "-o", "x.png"], ["give either RUN_DIR_OR_CHECKPOINT or --pretrained NAME"]),
        (["sample", "RUN", "-o", "x.jpg"], ["output must be a .png file, found x.jpg"]),
    ],
)
def test_bad_arguments(tiny_dataset, tmp_path, monkeypatch, capsys, argv, fragments):
    monkeypatch.chdir(tmp_path)
    before = _tree(tmp_path)
    _fails(capsys, argv, 2, *fragments)
    assert _tree(tmp_path) == before


def test_label_on_an_unconditional_model(trained, tmp_path, capsys):
    _fails(capsys, ["sample", str(trained), "--label", "3", "-o", str(tmp_path / "x.png")], 2,
           "--label needs a class-conditional model", "is not one")
    assert not any(tmp_path.iterdir())


def test_existing_run_without_resume_is_left_byte_identical(tiny_dataset, run_copy, capsys):
    before = _tree(run_copy)
    for extra in ([], ["--set", "hidden_units=16"], ["--epochs", "3"]):
        _fails(capsys, ["train", "nice", "--out", str(run_copy), *TINY, "--max-steps", "2", *extra], 1,
               f"{run_copy} already exists and is not empty; pass --resume to continue it")
        assert _tree(run_copy) == before


@pytest.mark.parametrize(
    "make, target, fragments",
    [
        (lambda d: (d / "taken").write_text("x"), "taken", ["--out {d}/taken: expected a directory, found a file"]),
        (lambda d: (d / "taken").write_text("x"), "taken/run",
         ["--out {d}/taken/run: expected a directory, found a file at {d}/taken"]),
    ],
)
def test_train_and_compare_refuse_an_unwritable_out(tiny_dataset, trained, tmp_path, capsys, make, target, fragments):
    make(tmp_path)
    before = _tree(tmp_path)
    fragments = [f.format(d=tmp_path) for f in fragments]
    _fails(capsys, ["train", "nice", "--out", str(tmp_path / target), *TINY, "--max-steps", "1"], 2, *fragments)
    _fails(capsys, ["compare", str(trained), "--out", str(tmp_path / target), "--samples", "0", "--device", "cpu"], 2,
           *fragments)
    assert _tree(tmp_path) == before


def test_sample_refuses_an_unwritable_output(trained, tmp_path, capsys):
    (tmp_path / "taken").write_text("x")
    (tmp_path / "grid.png").mkdir()
    before = _tree(tmp_path)
    _fails(capsys, ["sample", str(trained), "-o", str(tmp_path / "taken" / "x.png")], 2,
           f"output directory {tmp_path}/taken: expected a directory, found a file")
    _fails(capsys, ["sample", str(trained), "-o", str(tmp_path / "grid.png")], 2,
           f"output {tmp_path}/grid.png: expected a .png file, found a directory")
    _fails(capsys, ["sample", str(trained), "-o", str(tmp_path / "no" / "x.png")], 2,
           f"output directory {tmp_path}/no does not exist; expected an existing directory")
    assert _tree(tmp_path) == before


def test_compare_refuses_a_bad_checkpoint_before_any_output(trained, tiny_dataset, tmp_path, capsys):
    good = Path(shutil.copytree(trained, tmp_path / "good"))
    broken = Path(shutil.copytree(trained, tmp_path / "broken"))
    for name in ("best.pt", "last.pt"):
        (broken / name).write_bytes(b"junk")
    before = _tree(tmp_path)
    _fails(capsys, ["compare", str(good), str(broken), "--out", str(tmp_path / "report"), "--samples", "0",
                    "--draws", "1", "--device", "cpu"], 1, f"{broken}/best.pt is not a readable couplings checkpoint")
    assert _tree(tmp_path) == before  # no report directory, no eval.json in the good run


def test_full_disk_while_writing_a_report_leaves_no_report(trained, tiny_dataset, tmp_path, monkeypatch, capsys):
    from couplings import report

    def full_disk(result, meta):
        path = result.directory / "report.md"
        path.write_text("# half a rep")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    monkeypatch.setattr(report, "write", full_disk)
    run = Path(shutil.copytree(trained, tmp_path / "run"))
    code = main(["compare", str(run), "--out", str(tmp_path / "report"), "--samples", "0", "--draws", "1",
                 "--device", "cpu"])
    err = capsys.readouterr().err
    assert code == 1 and "Traceback" not in err  # progress lines come first: the failure is mid-way
    assert err.splitlines()[-1] == f"error: {tmp_path}/report/report.md: No space left on device"
    assert not (tmp_path / "report").exists()


# Checkpoints ----------------------------------------------------------------------------------


class _Exploit:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _bad_checkpoints(trained: Path, directory: Path) -> dict[str, Path]:
    """Checkpoint files that must all be refused, by case."""
    state = checkpoint.load(trained / "last.pt").to_payload()
    blob = (trained / "last.pt").read_bytes()
    paths = {}

    def put(name, content):
        paths[name] = directory / f"{name}.pt"
        if isinstance(content, bytes):
            paths[name].write_bytes(content)
        else:
            torch.save(content, paths[name])

    put("random-bytes", np.random.default_rng(0).bytes(2000))
    put("truncated", blob[: len(blob) // 2])
    put("newer-format", {**state, "format_version": checkpoint.FORMAT_VERSION + 1})
    put("missing-keys", {"format_version": 1, "model": "nice"})
    put("unknown-model", {**state, "model": "maf"})
    put("another-model-config", {**state, "model_config": {**state["model_config"], "hidden_units": 16}})
    put("another-model-name", {**state, "model": "glow"})
    with open(directory / "code.pt", "wb") as f:
        pickle.dump({"format_version": 1, "model": "nice", "payload": _Exploit(directory / "pwned")}, f, protocol=2)
    paths["code"] = directory / "code.pt"
    return paths


CHECKPOINT_MESSAGES = {
    "random-bytes": "is not a readable couplings checkpoint",
    "truncated": "is damaged: ",
    "newer-format": "is newer than this couplings understands",
    "missing-keys": "missing keys ['model_config', 'model_state']; expected a couplings checkpoint",
    "unknown-model": "unknown model 'maf'; expected one of",
    "another-model-config": "weights do not fit model 'nice': size mismatch for flow.",
    "another-model-name": "weights do not fit model 'glow'",
    "code": "is not a readable couplings checkpoint: refused by the safe (weights-only) loader: "
            "Trying to load unsupported GLOBAL",
}


@pytest.mark.parametrize("case", sorted(CHECKPOINT_MESSAGES))
def test_bad_checkpoints_are_refused_by_eval_and_sample(trained, tiny_dataset, tmp_path, capsys, case):
    (tmp_path / "ckpt").mkdir()
    path = _bad_checkpoints(trained, tmp_path / "ckpt")[case]
    before = _tree(tmp_path)
    _fails(capsys, ["eval", str(path), "--samples", "0", "--device", "cpu"], 1, CHECKPOINT_MESSAGES[case])
    _fails(capsys, ["sample", str(path), "-o", str(tmp_path / "grid.png"), "--device", "cpu"], 1, CHECKPOINT_MESSAGES[case])
    assert _tree(tmp_path) == before  # no eval.json, no grid.png, and the pickle's code never ran
    assert not (tmp_path / "ckpt" / "pwned").exists()


@pytest.mark.parametrize("case", ["random-bytes", "truncated", "newer-format", "another-model-config", "code"])
def test_resume_refuses_a_bad_last_checkpoint_and_changes_nothing(trained, tiny_dataset, run_copy, capsys, case):
    # Every checkpoint of the run is bad: with an intact one, --resume takes it (test_write_faults.py).
    bad = _bad_checkpoints(trained, run_copy.parent)[case]
    for name in ("last.pt", "previous.pt", "best.pt"):
        (run_copy / name).unlink(missing_ok=True)
        shutil.copy(bad, run_copy / name)
    before = _tree(run_copy)
    _fails(capsys, ["train", "nice", "--out", str(run_copy), "--resume", "--quiet", "--max-steps", "4"], 1,
           CHECKPOINT_MESSAGES[case])
    assert _tree(run_copy) == before
    assert not (run_copy.parent / "pwned").exists()


def test_resume_with_another_model_is_a_usage_error(tiny_dataset, run_copy, capsys):
    before = _tree(run_copy)
    _fails(capsys, ["train", "realnvp", "--out", str(run_copy), "--resume", "--quiet"], 2,
           f"--resume: expected a 'realnvp' run in {run_copy}, found a 'nice' run")
    _fails(capsys, ["train", "nice", "--out", str(run_copy), "--resume", "--set", "hidden_units=64", "--quiet"], 2,
           "cannot change hidden_units when resuming")
    assert _tree(run_copy) == before


# Data -----------------------------------------------------------------------------------------


def _images(n: int) -> np.ndarray:
    return np.random.default_rng(n).integers(0, 256, (n, 28, 28)).astype(np.uint8)


GOOD_FILES = {
    "train-images-idx3-ubyte": idx_bytes(_images(60)),
    "train-labels-idx1-ubyte": idx_bytes(np.arange(60, dtype=np.uint8) % 10),
    "t10k-images-idx3-ubyte": idx_bytes(_images(10)),
    "t10k-labels-idx1-ubyte": idx_bytes(np.arange(10, dtype=np.uint8)),
}
_IMAGES = "train-images-idx3-ubyte"
_LABELS = "train-labels-idx1-ubyte"


def _register(monkeypatch, root: Path, files: dict[str, bytes], name: str = "odd", fallback=None) -> Path:
    """Writes ``files`` as dataset ``name`` under ``root`` with checksums that match them, so the
    reader itself has to catch what is wrong; returns the dataset directory."""
    (root / name).mkdir(parents=True, exist_ok=True)
    for f, raw in files.items():
        (root / name / f).write_bytes(raw)
    spec = data.DatasetSpec(name, {f: hashlib.md5(raw).hexdigest() for f, raw in files.items()},
                            registry_fallback=fallback)
    monkeypatch.setitem(data.DATASETS, name, spec)
    monkeypatch.setenv("COUPLINGS_DATA", str(root))
    return root / name


ODD = ["--dataset", "odd", *SMALL, "--set", "val_size=10", "--batch-size", "10", "--max-steps", "1"]


@pytest.mark.parametrize(
    "files, fragments",
    [
        ({_IMAGES: GOOD_FILES[_IMAGES][:-5]}, ["train-images-idx3-ubyte: truncated: shape (60, 28, 28) needs 47056 bytes, found 47051"]),
        ({_IMAGES: GOOD_FILES[_IMAGES] + b"\0"}, ["train-images-idx3-ubyte: too long: shape (60, 28, 28) needs 47056 bytes, found 47057"]),
        ({_IMAGES: GOOD_FILES[_IMAGES][:10]}, ["train-images-idx3-ubyte: truncated header: expected 16 bytes for 3 dimensions, found 10"]),
        ({_IMAGES: b"\x00\x00\x07\x03" + GOOD_FILES[_IMAGES][4:]}, ["train-images-idx3-ubyte: bad magic number 0x00000703; expected 0x0000TTNN"]),
        ({_IMAGES: b"GIF89a" + GOOD_FILES[_IMAGES][6:]}, ["bad magic number 0x47494638"]),
        ({_LABELS: idx_bytes(np.zeros(59, np.uint8))}, ["expected 60 labels in train-labels-idx1-ubyte (one per image), found 59"]),
        ({_IMAGES: idx_bytes(_images(60).astype(np.int32))}, ["expected uint8 images of shape (N, H, W), found int32 (60, 28, 28)"]),
        ({_IMAGES: idx_bytes(_images(60).reshape(60, 784))}, ["expected uint8 images of shape (N, H, W), found uint8 (60, 784)"]),
    ],
)
def test_malformed_idx_files(tmp_path, monkeypatch, capsys, files, fragments):
    _register(monkeypatch, tmp_path / "data", {**GOOD_FILES, **files})
    _fails(capsys, ["train", "nice", "--out", str(tmp_path / "run"), *ODD], 1, *fragments)
    assert not (tmp_path / "run").exists()


def test_validation_split_larger_than_the_data(tiny_dataset, tmp_path, capsys):
    _fails(capsys, ["train", "nice", "--out", str(tmp_path / "run"), *TINY, "--set", "val_size=300"], 1,
           "val_size must be between 1 and 299 for tiny, found 300")
    assert not (tmp_path / "run").exists()


def test_damaged_gzip_in_the_cache(tmp_path, monkeypatch, capsys):
    directory = _register(monkeypatch, tmp_path / "data", GOOD_FILES)
    packed = gzip.compress(GOOD_FILES[_LABELS])
    (directory / _LABELS).unlink()
    (directory / f"{_LABELS}.gz").write_bytes(packed[:10] + b"\xff" * 20)  # zlib.error, not an OSError
    _fails(capsys, ["train", "nice", "--out", str(tmp_path / "run"), *ODD], 1,
           "train-labels-idx1-ubyte.gz is a damaged gzip file", "expected a complete gzip stream")
    assert not (tmp_path / "run").exists()


def test_checksum_mismatch_is_reported_and_the_file_kept(tmp_path, monkeypatch, capsys):
    directory = _register(monkeypatch, tmp_path / "data", GOOD_FILES)
    flipped = bytearray(GOOD_FILES[_LABELS])
    flipped[-1] ^= 1
    (directory / _LABELS).write_bytes(bytes(flipped))
    before = _tree(tmp_path)
    expected, found = data.DATASETS["odd"].md5[_LABELS], hashlib.md5(bytes(flipped)).hexdigest()
    for argv in (["train", "nice", "--out", str(tmp_path / "run"), *ODD], ["data", "fetch", "odd"]):
        _fails(capsys, argv, 1, f"checksum mismatch for {directory / _LABELS}: expected md5 {expected}",
               f"found {found}; delete the file to fetch it again")
    assert _tree(tmp_path) == before  # reported, not replaced, and no run directory


def test_data_directory_that_is_a_file(tiny_dataset, tmp_path, monkeypatch, capsys):
    (tmp_path / "blocker").write_text("x")
    for root, found in ((tmp_path / "blocker", "a file at"), (tmp_path / "blocker" / "sub", "a file at")):
        monkeypatch.setenv("COUPLINGS_DATA", str(root))
        _fails(capsys, ["data", "fetch", "tiny"], 1, f"data directory {root}/tiny: expected a directory, found {found} "
               f"{tmp_path}/blocker")
        _fails(capsys, ["train", "nice", "--out", str(tmp_path / "run"), *TINY, "--max-steps", "1"], 1,
               "expected a directory, found a file")
    assert not (tmp_path / "run").exists()


class _FullDisk:
    """A file whose writes stop with ENOSPC after ``room`` bytes, as on a disk that fills up."""

    def __init__(self, f, room: int):
        self.f, self.room = f, room

    def write(self, b):
        if len(b) > self.room:
            self.f.write(b[: self.room])
            self.f.flush()
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.room -= len(b)
        return self.f.write(b)

    def __getattr__(self, name):
        return getattr(self.f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()


@pytest.mark.parametrize("where", ["write", "fsync"])
def test_full_disk_while_writing_the_cache_leaves_no_partial_file(tmp_path, monkeypatch, capsys, where):
    def registry(files, dest):  # the download: puts the raw files into the staging directory
        for f in files:
            (dest / f).write_bytes(GOOD_FILES[f])

    directory = _register(monkeypatch, tmp_path / "data", {}, fallback=registry)
    data.DATASETS["odd"].md5.update({f: hashlib.md5(raw).hexdigest() for f, raw in GOOD_FILES.items()})
    victim = "t10k-images-idx3-ubyte"  # the disk fills up while this file is written into the cache
    real_open, real_fsync, half_written = open, os.fsync, []

    def full_open(path, mode="r", *args, **kwargs):
        f = real_open(path, mode, *args, **kwargs)
        if where == "write" and Path(path).parent == directory and victim in Path(path).name:
            half_written.append(Path(path))
            return _FullDisk(f, room=len(GOOD_FILES[victim]) // 2)
        return f

    def full_fsync(fd):
        if where == "fsync" and victim in os.readlink(f"/proc/self/fd/{fd}"):
            half_written.append(fd)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))  # delayed allocation fails at sync
        return real_fsync(fd)

    monkeypatch.setattr(files, "open", full_open, raising=False)  # every write goes through couplings.files
    monkeypatch.setattr(files.os, "fsync", full_fsync)
    _fails(capsys, ["data", "fetch", "odd"], 1, f"cannot write {directory / victim}: No space left on device",
           f"(needed {len(GOOD_FILES[victim])} bytes); nothing was left under that name")
    assert half_written, "the full disk was not simulated"
    left = sorted(p.name for p in directory.iterdir())
    assert victim not in left and not any(".tmp" in n or n.startswith(".fetch-") for n in left), left
    for name in left:  # whatever did land is complete and verified
        assert (directory / name).read_bytes() == GOOD_FILES[name]

    monkeypatch.undo()  # space is free again: the same command completes the cache
    monkeypatch.setitem(data.DATASETS, "odd", data.DatasetSpec(
        "odd", {f: hashlib.md5(raw).hexdigest() for f, raw in GOOD_FILES.items()}, registry_fallback=registry))
    assert main(["data", "fetch", "odd", "--root", str(tmp_path / "data")]) == 0
    assert sorted(p.name for p in directory.iterdir()) == sorted(GOOD_FILES)


# Permissions, checked in a subprocess (as root, one without the capability to override them) -----

_SCRIPT = """
import contextlib, io, json, sys
from couplings import data
from couplings.cli import main
md5, cases = json.loads(sys.argv[1]), json.loads(sys.argv[2])
data.DATASETS['tiny'] = data.DatasetSpec(name='tiny', md5=md5)
results = []
for argv in cases:
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            code = main(argv)
        except SystemExit as e:
            code = e.code
    results.append([code, err.getvalue()])
print(json.dumps(results))
"""


def _without_permission_override() -> list[str]:
    """A command prefix under which file permissions apply, also to root."""
    if os.geteuid() != 0:
        return []
    drop = ["setpriv", "--inh-caps=-dac_override,-dac_read_search", "--bounding-set=-dac_override,-dac_read_search"]
    if shutil.which("setpriv") is None or subprocess.run([*drop, "true"], capture_output=True).returncode != 0:
        pytest.skip("running as root, which ignores file permissions, and setpriv cannot drop that capability")
    return drop


def test_unreadable_cache_and_read_only_outputs(tiny_dataset, trained, tmp_path):
    prefix = _without_permission_override()
    locked, read_only = tiny_dataset / "tiny", tmp_path / "read-only"
    read_only.mkdir()
    cases = [
        (["data", "fetch", "tiny"], 1, f"cannot read data directory {locked}: Permission denied; "
                                       "expected a readable directory"),
        (["train", "nice", "--out", str(tmp_path / "run"), *TINY, "--max-steps", "1"], 1,
         f"cannot read data directory {locked}: Permission denied"),
        (["sample", str(trained), "-o", str(read_only / "x.png"), "--device", "cpu"], 2,
         f"output directory {read_only}: expected a writable directory, found {read_only} read-only"),
        (["train", "nice", "--out", str(read_only / "run"), *TINY, "--max-steps", "1"], 2,
         f"--out {read_only}/run: expected a writable directory, found {read_only} read-only"),
        (["compare", str(trained), "--out", str(read_only / "report"), "--samples", "0", "--device", "cpu"], 2,
         f"--out {read_only}/report: expected a writable directory, found {read_only} read-only"),
    ]
    locked.chmod(0)
    read_only.chmod(0o555)
    try:
        done = subprocess.run([*prefix, sys.executable, "-c", _SCRIPT, json.dumps(data.DATASETS["tiny"].md5),
                               json.dumps([argv for argv, _, _ in cases])], capture_output=True, text=True, timeout=300)
    finally:
        locked.chmod(0o755)
        read_only.chmod(0o755)
    assert done.returncode == 0, done.stderr
    for (argv, code, message), (got_code, err) in zip(cases, json.loads(done.stdout)):
        assert (got_code, len(err.splitlines())) == (code, 1), (argv, err)
        assert err.startswith("error: ") and message in err and "Traceback" not in err, (argv, err)
    assert not any(read_only.iterdir()) and not (tmp_path / "run").exists()


def test_console_script_usage_and_runtime_errors(tmp_path):
    script = Path(sys.executable).with_name("couplings")
    command = [str(script)] if script.exists() else [sys.executable, "-m", "couplings.cli"]
    (tmp_path / "bad.pt").write_bytes(b"\x80\x02junk")
    for argv, code, message in (
        (["train", "nice", "--set", "lr=abc"], 2, "error: lr: expected a number, found 'abc'"),
        (["eval", "bad.pt"], 1, "error: bad.pt is not a readable couplings checkpoint"),
    ):
        done = subprocess.run([*command, *argv], capture_output=True, text=True, cwd=tmp_path, timeout=120)
        assert done.returncode == code and done.stdout == ""
        assert len(done.stderr.splitlines()) == 1 and done.stderr.startswith(message), done.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.pt"]
