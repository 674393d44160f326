"""couplings.rundir and couplings.files: the run directory's files, and the one atomic write."""

from __future__ import annotations

import json

import pytest
import torch

from couplings import checkpoint
from couplings.evaluation import Evaluation
from couplings.files import atomic_write
from couplings.rundir import RunDir, RunDirBusy


def test_an_empty_run_directory_may_hold_only_its_lock(tmp_path):
    run = RunDir(tmp_path / "run")
    assert run.is_empty()
    with run.lock():
        assert run.is_empty() and (tmp_path / "run" / ".lock").is_file()
    run.create()
    assert not run.is_empty()  # samples/ makes it a run
    assert not RunDir(tmp_path).is_empty()


def test_the_lock_is_exclusive_and_released(tmp_path):
    run = RunDir(tmp_path / "run")
    with run.lock():
        with pytest.raises(RunDirBusy, match=r"in use by another 'couplings train' \(pid \d+\)"):
            with RunDir(tmp_path / "run").lock():
                pass
    with run.lock():  # free again
        pass


def test_checkpoints_metrics_and_eval(tmp_path):
    run = RunDir(tmp_path)
    run.save_checkpoint(checkpoint.Checkpoint("nice", {}, {"w": torch.ones(2)}, step=1), best=True)
    run.save_checkpoint(checkpoint.Checkpoint("nice", {}, {"w": torch.ones(2)}, step=2), best=False)
    assert checkpoint.load(run.last).step == 2 and checkpoint.load(run.best).step == 1
    assert checkpoint.load(run.previous).step == 1 and run.checkpoints() == [run.last, run.previous, run.best]
    for step in (1, 2, 3):
        run.append_metrics({"epoch": step, "step": 10 * step})
    run.forget_metrics_after(20)
    assert [r["step"] for r in run.read_metrics()] == [10, 20]
    run.update_eval("test", Evaluation("nice", "tiny", bits_per_dim=2.0))
    run.update_eval("val", Evaluation("nice", "tiny", "val", bits_per_dim=2.1))
    assert json.loads((tmp_path / "eval.json").read_text()) == {
        "test": {"model": "nice", "dataset": "tiny", "split": "test", "bits_per_dim": 2.0},
        "val": {"model": "nice", "dataset": "tiny", "split": "val", "bits_per_dim": 2.1}}
    assert run.read_eval()["val"] == Evaluation("nice", "tiny", "val", bits_per_dim=2.1)
    # A latent model's entry keeps its null bits/dim; an entry with a key no version wrote is refused.
    assert Evaluation("latent-realnvp", "mnist").to_json()["bits_per_dim"] is None
    with pytest.raises(ValueError, match=r"unknown keys \['bpd'\]"):
        Evaluation.from_json({"model": "nice", "dataset": "tiny", "bpd": 2.0})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.pt", "eval.json", "last.pt", "metrics.jsonl", "previous.pt"]


def test_a_failed_atomic_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    path = atomic_write(tmp_path / "f.txt", "old")

    def half_then_fail(f):
        f.write(b"half a ne")
        raise OSError(28, "No space left on device", str(path))

    with pytest.raises(OSError, match="No space left"):
        atomic_write(path, half_then_fail)
    assert path.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["f.txt"]
    atomic_write(path, b"new")
    assert path.read_bytes() == b"new"
