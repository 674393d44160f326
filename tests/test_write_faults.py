"""Reliability under real faults (docs/reliability.md, "Write faults"): a full disk, an I/O error,
a read-only or vanished run directory at every write site; torn metrics lines; damaged
checkpoints; and a sweep of kills at random moments, inside writes included."""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
import torch
from _kill_sweep import sweep
from conftest import cli_child
from test_bad_input import _without_permission_override
from test_reliability import TINY, _assert_same_weights, _train

from couplings import checkpoint
from couplings.cli import main
from couplings.files import WriteError, append_line, atomic_write
from couplings.rundir import MetricsError, RunDir


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _temporaries(root: Path) -> list[Path]:
    return [p for p in root.rglob(".*.tmp*")]


def _error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, err
    return lines[0]


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    """A finished two-epoch tiny NICE run (tests copy it before changing it)."""
    from conftest import write_tiny_dataset

    from couplings import data

    root = tmp_path_factory.mktemp("finished")
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(data.DATASETS, "tiny", write_tiny_dataset(root / "data"))
        mp.setenv("COUPLINGS_DATA", str(root / "data"))
        assert main(["train", "nice", "--out", str(root / "run"), *TINY, "--epochs", "2"]) == 0
    return root / "run"


# --- The write primitives ----------------------------------------------------------------------

@pytest.mark.parametrize("code", ["ENOSPC", "EIO", "EROFS", "EACCES"])
def test_a_refused_write_names_the_file_and_leaves_the_old_one(tmp_path, monkeypatch, code):
    target, log = tmp_path / "file.bin", tmp_path / "log.jsonl"
    target.write_bytes(b"old")
    append_line(log, '{"a": 1}')
    monkeypatch.setenv("COUPLINGS_TEST_WRITE_FAULT", f"{code}:*")
    with pytest.raises(WriteError) as caught:
        atomic_write(target, b"new content")
    assert caught.value.filename == str(target) and caught.value.errno == getattr(errno, code)
    assert target.read_bytes() == b"old" and not _temporaries(tmp_path)
    with pytest.raises(WriteError):
        append_line(log, '{"a": 2}')
    monkeypatch.delenv("COUPLINGS_TEST_WRITE_FAULT")
    # The failed append left half a line: what readers drop as torn (below).
    assert log.read_text().startswith('{"a": 1}\n') and not log.read_text().endswith("\n")


def test_a_vanished_directory_is_a_write_error(tmp_path):
    with pytest.raises(WriteError) as caught:
        atomic_write(tmp_path / "gone" / "x.json", "{}")
    assert caught.value.filename == str(tmp_path / "gone" / "x.json")


# --- metrics.jsonl -----------------------------------------------------------------------------

def test_a_torn_metrics_line_is_dropped_with_a_warning_and_the_run_resumes_exactly(finished, tiny_dataset, tmp_path, capsys):
    straight = Path(shutil.copytree(finished, tmp_path / "straight"))
    torn = Path(shutil.copytree(finished, tmp_path / "torn"))
    assert _train(straight, "--epochs", "3", "--resume") == 0
    with open(torn / "metrics.jsonl", "a") as f:  # what a kill inside an append leaves
        f.write('{"epoch": 3, "step": 18, "val_b')
    with pytest.warns(UserWarning, match="dropped a torn last line 3"):
        assert len(RunDir(torn).read_metrics()) == 2
    with pytest.warns(UserWarning, match="dropped a torn last line 3"):  # the CLI prints it as "warning: ..."
        assert _train(torn, "--epochs", "3", "--resume") == 0
    _assert_same_weights(straight / "last.pt", torn / "last.pt")
    assert (torn / "metrics.jsonl").read_text().endswith("\n")
    assert [r["step"] for r in RunDir(torn).read_metrics()] == [6, 12, 18]


def test_any_other_bad_metrics_line_is_an_error_naming_file_and_line(finished, tiny_dataset, tmp_path, capsys):
    run = Path(shutil.copytree(finished, tmp_path / "run"))
    lines = (run / "metrics.jsonl").read_text().splitlines()
    (run / "metrics.jsonl").write_text(lines[0] + "\n" + "not json\n" + lines[1] + "\n")
    with pytest.raises(MetricsError, match=r"metrics.jsonl: line 2 is not a JSON object"):
        RunDir(run).read_metrics()
    before = _tree(run)
    assert _train(run, "--epochs", "3", "--resume") == 1
    assert "metrics.jsonl: line 2 is not a JSON object" in _error_line(capsys)
    assert _tree(run) == before


# --- Damaged checkpoints -----------------------------------------------------------------------

def _flip_a_byte(path: Path) -> None:
    blob = bytearray(path.read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    path.write_bytes(bytes(blob))


def test_bit_rot_is_caught_by_the_checksum_before_unpickling(finished, tmp_path, monkeypatch):
    path = Path(shutil.copy(finished / "last.pt", tmp_path / "rot.pt"))
    _flip_a_byte(path)

    def must_not_run(*args, **kwargs):
        raise AssertionError("torch.load ran on a file that failed its checksum")

    monkeypatch.setattr(checkpoint.torch, "load", must_not_run)
    with pytest.raises(checkpoint.CheckpointError, match="do not match the SHA-256 stored with it"):
        checkpoint.load(path)
    Path(tmp_path / "short.pt").write_bytes((finished / "last.pt").read_bytes()[:-10])
    with pytest.raises(checkpoint.CheckpointError, match="bytes after the header, expected"):
        checkpoint.load(tmp_path / "short.pt")


@pytest.mark.parametrize("damage", ["truncated", "bit rot", "missing"])
def test_a_damaged_newest_checkpoint_resumes_from_the_newest_intact_one(finished, tiny_dataset, tmp_path, capsys, damage):
    straight = Path(shutil.copytree(finished, tmp_path / "straight"))
    assert _train(straight, "--epochs", "3", "--resume") == 0
    run = Path(shutil.copytree(finished, tmp_path / "run"))
    last = run / "last.pt"
    last.unlink()  # break the hard link to best.pt first, as a broken copy would be its own file
    shutil.copy(finished / "last.pt", last)
    if damage == "truncated":
        last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])
    elif damage == "bit rot":
        _flip_a_byte(last)
    else:
        last.unlink()
    capsys.readouterr()
    assert _train(run, "--epochs", "3", "--resume") == 0
    err = capsys.readouterr().err
    assert "resuming from" in err
    if damage != "missing":
        assert (run / "last.pt.damaged").is_file() and "moved it to last.pt.damaged" in err
    _assert_same_weights(straight / "last.pt", run / "last.pt")


def test_resume_refuses_only_when_no_checkpoint_of_the_run_is_intact(finished, tiny_dataset, tmp_path, capsys):
    run = Path(shutil.copytree(finished, tmp_path / "run"))
    for name in ("last.pt", "previous.pt", "best.pt"):
        (run / name).unlink()
        (run / name).write_bytes(b"not a checkpoint")
    before = _tree(run)
    assert _train(run, "--epochs", "3", "--resume") == 1
    line = _error_line(capsys)
    assert "no intact checkpoint" in line and "last.pt" in line and "best.pt" in line
    assert _tree(run) == before


def test_the_previous_checkpoint_is_kept_beside_the_newest(finished):
    last, previous = checkpoint.load(finished / "last.pt"), checkpoint.load(finished / "previous.pt")
    assert (last.step, previous.step) == (12, 6)


# --- A refused write at every site -------------------------------------------------------------

TRAIN_SITES = {"last.pt": "last.pt", "best.pt": "best.pt", "metrics.jsonl": "metrics.jsonl",
               "sample grid": "epoch_*.png", "config.json": "config.json"}


@pytest.mark.parametrize("site", sorted(TRAIN_SITES))
@pytest.mark.parametrize("code", ["ENOSPC", "EIO"])
def test_training_stops_with_one_line_naming_the_file_and_the_last_good_checkpoint(
        finished, tiny_dataset, tmp_path, monkeypatch, capsys, site, code):
    run = Path(shutil.copytree(finished, tmp_path / "run"))
    monkeypatch.setenv("COUPLINGS_TEST_WRITE_FAULT", f"{code}:{TRAIN_SITES[site]}")
    assert _train(run, "--epochs", "3", "--resume", "--checkpoint-every", "2") == 1
    line = _error_line(capsys)
    assert f"cannot write {run}/" in line and os.strerror(getattr(errno, code)) in line
    assert f"the last good checkpoint is {run}/last.pt" in line
    assert not _temporaries(run)
    monkeypatch.delenv("COUPLINGS_TEST_WRITE_FAULT")
    for path in RunDir(run).checkpoints():
        checkpoint.load(path)  # every checkpoint under its final name is complete and verifies
    assert _train(run, "--epochs", "3", "--resume") == 0  # and the run goes on once the fault is gone


def test_a_refused_write_before_any_checkpoint_says_so(tiny_dataset, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("COUPLINGS_TEST_WRITE_FAULT", "ENOSPC:last.pt")
    assert _train(tmp_path / "run", "--epochs", "1") == 1
    assert _error_line(capsys).endswith("no checkpoint had been written yet")


@pytest.mark.parametrize("command", ["eval", "sample", "compare", "export"])
def test_eval_sample_compare_and_export_stop_with_one_line_naming_the_file(finished, tiny_dataset, tmp_path,
                                                                          monkeypatch, capsys, command):
    run = Path(shutil.copytree(finished, tmp_path / "run"))
    before = _tree(run)
    argv, pattern, final = {
        "eval": (["eval", str(run), "--samples", "0", "--device", "cpu"], "eval.json", run / "eval.json"),
        "sample": (["sample", str(run), "-o", str(tmp_path / "grid.png"), "--device", "cpu"], "grid.png",
                   tmp_path / "grid.png"),
        "compare": (["compare", str(run), "--out", str(tmp_path / "report"), "--samples", "0", "--draws", "1",
                     "--device", "cpu"], "*.png", tmp_path / "report"),
        "export": (None, "tiny.pt", tmp_path / "tiny.pt"),
    }[command]
    monkeypatch.setenv("COUPLINGS_TEST_WRITE_FAULT", f"ENOSPC:{pattern}")
    if argv is None:  # the pretrained export is a library call
        with pytest.raises(WriteError, match="No space left on device"):
            checkpoint.export_pretrained(run, final)
    else:
        assert main(argv) == 1
        line = _error_line(capsys)
        assert "No space left on device" in line and str(tmp_path) in line
    assert not final.exists() and not _temporaries(tmp_path)
    if command == "compare":  # its evaluations of the run are complete files, kept in the run's eval.json
        before["eval.json"] = (run / "eval.json").read_bytes()
    assert _tree(run) == before


# --- Real filesystems: a small tmpfs -----------------------------------------------------------

@contextlib.contextmanager
def _tmpfs(size: str):
    """A tmpfs of ``size`` mounted on a new directory, where this machine lets the test mount one."""
    mount_point = Path(tempfile.mkdtemp(prefix="couplings-tmpfs-"))
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mount_point)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        mount_point.rmdir()
        pytest.skip(f"cannot mount a tmpfs here ({done.stderr.strip() or 'mount failed'}); "
                    "the injected faults above cover the same sites")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], capture_output=True)
        mount_point.rmdir()


@pytest.mark.processes
def test_a_real_full_disk_stops_training_with_one_line_and_keeps_the_checkpoints(tiny_dataset, tmp_path):
    probe = tmp_path / "probe"
    assert _train(probe, "--max-steps", "1") == 0
    checkpoint_bytes = (probe / "last.pt").stat().st_size
    with _tmpfs(f"{int(2.5 * checkpoint_bytes) // 1024}k") as disk:
        run = disk / "run"
        done = subprocess.run(cli_child("train", "nice", "--out", str(run), *TINY, "--epochs", "50",
                                        "--checkpoint-every", "1"), capture_output=True, text=True)
        assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
        line = done.stderr.strip().splitlines()[-1]
        assert line.startswith(f"error: cannot write {run}/") and "No space left on device" in line
        assert "the last good checkpoint is" in line
        assert not _temporaries(run)
        for path in RunDir(run).checkpoints():
            checkpoint.load(path)
        moved = Path(shutil.copytree(run, tmp_path / "moved"))  # room again: the run continues
    assert _train(moved, "--epochs", "2", "--resume") == 0


def _start_slow_run(run: Path, prefix: list[str] = ()) -> subprocess.Popen:
    """A long tiny run whose writes pause, returned once it has written two checkpoints."""
    env = {**os.environ, "COUPLINGS_TEST_WRITE_PAUSE": "0.05"}
    process = subprocess.Popen([*prefix, *cli_child("train", "nice", "--out", str(run), *TINY, "--epochs", "50",
                                                     "--checkpoint-every", "1")],
                               env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not (run / "previous.pt").exists():
        assert process.poll() is None and time.monotonic() < deadline, "training did not start"
        time.sleep(0.02)
    return process


def _last_error(process: subprocess.Popen) -> str:
    _, err = process.communicate(timeout=120)
    assert process.returncode == 1 and "Traceback" not in err, err
    return err.strip().splitlines()[-1]


@pytest.mark.processes
def test_a_run_directory_made_read_only_mid_run(tiny_dataset, tmp_path):
    run = tmp_path / "run"
    process = _start_slow_run(run, _without_permission_override())
    run.chmod(0o555)
    try:
        line = _last_error(process)
    finally:
        run.chmod(0o755)
    assert line.startswith(f"error: cannot write {run}/") and "Permission denied" in line
    assert f"the last good checkpoint is {run}/last.pt" in line
    for path in RunDir(run).checkpoints():
        checkpoint.load(path)


@pytest.mark.processes
def test_a_run_directory_that_vanishes_mid_run(tiny_dataset, tmp_path):
    run = tmp_path / "run"
    process = _start_slow_run(run)
    # Moved away first, at once: rmtree alone lists, deletes and then removes the directory, and a
    # checkpoint written in between kept it there (seen under COUPLINGS_STRESS), so the run went on.
    shutil.rmtree(run.rename(tmp_path / "gone"))
    line = _last_error(process)
    assert line.startswith(f"error: cannot write {run}/") and f"the run directory {run} no longer exists" in line


# --- Kills at random moments -------------------------------------------------------------------

KILLS = int(os.environ.get("COUPLINGS_KILL_SWEEP", "30"))


@pytest.mark.processes
def test_a_sweep_of_kills_at_random_moments_then_resume_ends_bitwise_equal(tiny_dataset, tmp_path):
    """At least 30 SIGKILLs (``COUPLINGS_KILL_SWEEP=N`` for more) at random moments of one tiny
    run whose every write pauses half-way, so that many land inside a checkpoint, metrics or
    sample write; each is followed by ``--resume``. The final weights and Adam state must equal
    an uninterrupted run's, and each epoch must be logged once."""
    args = ("--epochs", "20", "--checkpoint-every", "1")  # 120 steps, a checkpoint after each
    env = {**os.environ, "COUPLINGS_TEST_WRITE_PAUSE": "0.03"}
    straight = tmp_path / "straight"
    assert subprocess.run(cli_child("train", "nice", "--out", str(straight), *TINY, *args), env=env,
                          capture_output=True, check=False).returncode == 0
    run = tmp_path / "killed"

    def start(resume: bool, log: Path) -> subprocess.Popen:
        argv = cli_child("train", "nice", "--out", str(run), *TINY, *args, *(["--resume"] if resume else []))
        with open(log, "w") as err:
            return subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=err)

    line = sweep(start, subprocess.Popen.kill, run, tmp_path / "child.log", KILLS, timeout=150)
    print(f"kill sweep: {line}")
    seed = line.split(",")[0]
    _assert_same_weights(straight / "last.pt", run / "last.pt")
    assert [r["step"] for r in RunDir(run).read_metrics()] == list(range(6, 121, 6)), seed
    assert not _temporaries(run)
    assert torch.equal(checkpoint.load(straight / "best.pt").model_state["flow.transforms.0.shift.0.weight"],
                       checkpoint.load(run / "best.pt").model_state["flow.transforms.0.shift.0.weight"])
