"""Crash-safe exact resume and numerical faults: kills, mid-epoch resumes, injected NaNs."""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import random
import shutil
import signal
import subprocess
import time

import pytest
import torch

from conftest import cli_child
from couplings import checkpoint
from couplings.cli import main
from couplings.models import MODELS, NICE
from couplings.training.optim import optimizer_step
from couplings.transforms import AdditiveCoupling

TINY = ["--dataset", "tiny", "--set", "size=small", "--set", "hidden_units=32", "--set", "val_size=50",
        "--set", "samples_per_epoch=4", "--batch-size", "40", "--device", "cpu", "--quiet"]  # 6 steps per epoch

def _train(out, *extra):
    return main(["train", "nice", "--out", str(out), *TINY, *extra])


def _child(out, *extra) -> list[str]:
    return cli_child("train", "nice", "--out", str(out), *TINY, *extra)


def _assert_same_weights(a, b):
    a, b = checkpoint.load(a), checkpoint.load(b)
    assert a.step == b.step and a.epoch == b.epoch
    for key in a.model_state:
        torch.testing.assert_close(a.model_state[key], b.model_state[key], atol=0, rtol=0)
    # The whole optimizer state: every moment and step count, and the param groups (learning rates).
    assert a.optimizer_state["param_groups"] == b.optimizer_state["param_groups"]
    assert a.optimizer_state["state"].keys() == b.optimizer_state["state"].keys()
    for x, y in zip(a.optimizer_state["state"].values(), b.optimizer_state["state"].values()):
        assert x.keys() == y.keys() == {"step", "exp_avg", "exp_avg_sq"}
        for key in x:
            torch.testing.assert_close(x[key], y[key], atol=0, rtol=0)


# --- Exact resume -------------------------------------------------------------------------------

def test_stopping_mid_epoch_and_resuming_gives_bitwise_equal_weights(tiny_dataset, tmp_path):
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert _train(straight, "--epochs", "2") == 0
    assert _train(split, "--epochs", "2", "--max-steps", "3") == 0  # stops inside epoch 1
    state = checkpoint.load(split / "last.pt")
    assert state.epoch == 0 and state.position["next"] == 3
    assert _train(split, "--epochs", "2", "--resume", "--max-steps", "8") == 0  # inside epoch 2
    assert _train(split, "--epochs", "2", "--resume", "--set", "max_steps=none") == 0
    _assert_same_weights(straight / "last.pt", split / "last.pt")
    lines = [json.loads(line) for line in (split / "metrics.jsonl").read_text().splitlines()]
    assert [(r["epoch"], r["step"], r["partial_epoch"]) for r in lines] == [
        (1, 3, True), (1, 6, False), (2, 8, True), (2, 12, False)]
    full = [json.loads(line) for line in (straight / "metrics.jsonl").read_text().splitlines()]
    # The epoch's mean training loss is over all its batches, whichever invocation ran them.
    assert lines[1]["train_loss"] == pytest.approx(full[0]["train_loss"], rel=1e-6)


def test_checkpoint_every_writes_mid_epoch_checkpoints(tiny_dataset, tmp_path, monkeypatch):
    written = []
    save = checkpoint.save

    def record(payload, path):
        written.append((path.name, payload.step, (payload.position or {}).get("next")))
        return save(payload, path)

    monkeypatch.setattr(checkpoint, "save", record)
    assert _train(tmp_path / "run", "--epochs", "2", "--checkpoint-every", "4") == 0
    # A checkpoint that is the best so far is written as best.pt and then linked as last.pt.
    newest = [(step, position) for name, step, position in written if name in ("last.pt", "best.pt")]
    assert newest == [(0, None), (4, 4), (6, None), (8, 2), (12, None)]


def test_resume_drops_metrics_written_after_the_checkpoint(tiny_dataset, tmp_path):
    out = tmp_path / "run"
    assert _train(out, "--epochs", "1") == 0
    with open(out / "metrics.jsonl", "a") as f:  # as if killed between logging and checkpointing
        f.write(json.dumps({"epoch": 2, "step": 12, "val_bpd": 1.0}) + "\n")
    assert _train(out, "--epochs", "2", "--resume") == 0
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [6, 12]


def _start(argv, out) -> tuple[subprocess.Popen, float]:
    """Starts a training process; returns it once its step-0 checkpoint exists, with that time."""
    process = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not (out / "last.pt").exists():
        assert process.poll() is None and time.monotonic() < deadline, "training did not start"
        time.sleep(0.01)
    return process, time.monotonic()


def test_sigkill_at_a_random_moment_then_resume_matches_an_uninterrupted_run(tiny_dataset, tmp_path):
    args = ("--epochs", "6", "--checkpoint-every", "2")  # 36 steps
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    process, started = _start(_child(straight, *args), straight)
    assert process.wait(timeout=600) == 0
    training_time = time.monotonic() - started

    seed = int.from_bytes(os.urandom(4), "little")
    rng = random.Random(seed)
    for attempt in range(4):  # a loaded machine may run faster than the first run did: retry sooner
        delay = rng.uniform(0.05, 0.6) * training_time / 2**attempt  # a moment inside the training
        process, _ = _start(_child(killed, *args), killed)
        time.sleep(delay)
        if process.poll() is None:
            break
        shutil.rmtree(killed)
    else:
        pytest.fail(f"seed {seed}: every run ended before its kill")
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=60)
    stopped_at = checkpoint.load(killed / "last.pt").step
    print(f"killed after {delay:.2f} of {training_time:.2f} s, last checkpoint at step {stopped_at} (seed {seed})")

    done = subprocess.run(_child(killed, *args, "--resume"), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    _assert_same_weights(straight / "last.pt", killed / "last.pt")
    steps = [json.loads(line)["step"] for line in (killed / "metrics.jsonl").read_text().splitlines()]
    assert steps == [6, 12, 18, 24, 30, 36], f"seed {seed}, delay {delay:.2f} s"


def test_target_bpd_stops_at_the_first_epoch_that_reaches_it(tiny_dataset, tmp_path):
    out = tmp_path / "run"
    assert _train(out, "--epochs", "3") == 0
    first = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])["val_bpd"]
    stopped = tmp_path / "stopped"
    assert _train(stopped, "--epochs", "3", "--set", f"target_bpd={first + 1e-6}") == 0
    lines = (stopped / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 1 and checkpoint.load(stopped / "last.pt").epoch == 1


# --- Numerical faults ---------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["nan loss", "inf gradient"])
def test_a_non_finite_step_never_reaches_the_weights(kind):
    weight = torch.nn.Parameter(torch.tensor([0.0, 1.0]))
    optimizer = torch.optim.Adam([weight], lr=0.1)
    assert optimizer_step(optimizer, (weight - 2).square().sum(), grad_clip=10.0, lr_factor=1.0) is not None  # a good step
    before, moments = weight.detach().clone(), {k: v.clone() for k, v in optimizer.state[weight].items()}
    # d sqrt(u)/du is infinite at u = 0, while sqrt(0) = 0 is a finite loss.
    objective = weight.sum() * float("nan") if kind == "nan loss" else (weight - weight.detach()).sqrt().sum()
    assert optimizer_step(optimizer, objective, grad_clip=10.0, lr_factor=1.0) is None
    assert torch.equal(weight.detach(), before) and weight.grad is None
    for key, value in optimizer.state[weight].items():
        assert torch.equal(value, moments[key])


@pytest.fixture
def faulty_coupling(monkeypatch):
    """Makes the third layer of NICE (flow.transforms.2) output NaN on chosen training calls.

    Returns a function that takes the set of bad call numbers (1-based), or a predicate on them.
    """
    original = AdditiveCoupling.forward
    calls = itertools.count(1)
    schedule = {"bad": lambda n: False}

    def forward(self, x, y=None):
        z, logabsdet = original(self, x, y)
        if self.training and getattr(self, "faulty", False) and schedule["bad"](next(calls)):
            z = z * float("nan")
        return z, logabsdet

    class MarkedNICE(NICE):
        def __init__(self, config):
            super().__init__(config)
            self.flow.transforms[2].faulty = True

    monkeypatch.setattr(AdditiveCoupling, "forward", forward)
    monkeypatch.setitem(MODELS, "nice", dataclasses.replace(MODELS["nice"], cls=MarkedNICE))

    def set_bad(bad):
        schedule["bad"] = bad if callable(bad) else bad.__contains__
    return set_bad


def test_isolated_bad_steps_are_skipped_and_counted(tiny_dataset, tmp_path, faulty_coupling):
    faulty_coupling({3, 4, 9})
    out = tmp_path / "run"
    assert _train(out, "--epochs", "2") == 0
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["skipped_steps"] for r in lines] == [2, 1] and lines[-1]["rollbacks"] == 0
    state = checkpoint.load(out / "last.pt")
    assert state.step == 12 and state.lr_scale == 1.0
    assert all(torch.isfinite(v).all() for v in state.model_state.values())


def test_a_bad_streak_rolls_back_with_a_lower_learning_rate(tiny_dataset, tmp_path, faulty_coupling):
    faulty_coupling({8, 9, 10})  # three in a row inside epoch 2; the re-run (call 11) is fine
    out = tmp_path / "run"
    assert _train(out, "--epochs", "3", "--set", "max_bad_steps=3") == 0
    state = checkpoint.load(out / "last.pt")
    assert state.step == 18 and state.rollbacks == 1 and state.lr_scale == 0.5
    assert all(g["lr"] == pytest.approx(0.5 * g["base_lr"]) for g in state.optimizer_state["param_groups"])
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    # Epoch 2 was rolled back to its start (the epoch-1 checkpoint) and trained again in full.
    assert [(r["epoch"], r["skipped_steps"], r["lr_scale"]) for r in lines] == [(1, 0, 1.0), (2, 0, 0.5), (3, 0, 0.5)]


def test_a_persistent_fault_stops_with_the_step_and_the_layer(tiny_dataset, tmp_path, faulty_coupling, capsys):
    faulty_coupling(lambda n: n >= 4)
    out = tmp_path / "run"
    assert _train(out, "--epochs", "3", "--set", "max_bad_steps=3") == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len([line for line in err if line.startswith("error:")]) == 1 and "Traceback" not in "\n".join(err)
    message = err[-1]
    # Steps 4-6 fail, training rolls back to step 0 with half the learning rate, and steps 1-3 fail.
    assert message.startswith("error: training diverged: 3 consecutive non-finite steps ending at step 3;")
    assert "output of layer flow.transforms.2 (AdditiveCoupling)" in message and "after 1 rollback(s)" in message
    state = checkpoint.load(out / "last.pt")  # the last good state is intact and finite
    assert state.step == 0 and all(torch.isfinite(v).all() for v in state.model_state.values())
