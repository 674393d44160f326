"""--tensorboard: the event file holds the step and epoch scalars and the sample grids."""

from __future__ import annotations

import json

import pytest

from _require import require
from couplings.cli import main
from couplings.tensorboard import STEP_EVERY


TINY = ["--dataset", "tiny", "--set", "size=small", "--set", "hidden_units=32", "--set", "val_size=50",
        "--set", "samples_per_epoch=4", "--batch-size", "20", "--device", "cpu", "--quiet"]  # 12 steps per epoch


@pytest.fixture(autouse=True)
def event_accumulator():
    """TensorBoard's event reader: each test here skips without it (fails with $COUPLINGS_REQUIRE_TENSORBOARD=1)."""
    return require("tensorboard.backend.event_processing.event_accumulator", "COUPLINGS_REQUIRE_TENSORBOARD")


def _events(event_accumulator, run):
    events = event_accumulator.EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    return events


def test_a_run_logs_losses_learning_rate_gradient_norm_epoch_metrics_and_samples(tiny_dataset, tmp_path, event_accumulator):
    run = tmp_path / "run"
    assert main(["train", "nice", "--out", str(run), *TINY, "--epochs", "2", "--tensorboard"]) == 0
    events = _events(event_accumulator, run)
    tags = events.Tags()
    assert {"train/loss", "train/lr", "train/grad_norm", "epoch/val_bpd", "epoch/train_bpd", "epoch/images_per_s",
            "epoch/skipped_steps"} <= set(tags["scalars"])
    assert [e.step for e in events.Scalars("train/loss")] == list(range(STEP_EVERY, 25, STEP_EVERY))
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    logged = events.Scalars("epoch/val_bpd")
    assert [e.step for e in logged] == [m["step"] for m in metrics] == [12, 24]
    assert [e.value for e in logged] == pytest.approx([m["val_bpd"] for m in metrics])
    assert events.Scalars("train/lr")[0].value == pytest.approx(1e-3)
    assert all(e.value > 0 for e in events.Scalars("train/grad_norm"))
    assert [e.step for e in events.Images("samples")] == [12, 24]


def test_a_resumed_run_keeps_one_line_per_step(tiny_dataset, tmp_path, event_accumulator):
    run = tmp_path / "run"
    assert main(["train", "nice", "--out", str(run), *TINY, "--epochs", "2", "--max-steps", "15", "--tensorboard"]) == 0
    assert main(["train", "nice", "--out", str(run), "--resume", "--set", "max_steps=none", "--quiet", "--tensorboard"]) == 0
    steps = [e.step for e in _events(event_accumulator, run).Scalars("epoch/val_bpd")]
    assert steps == [12, 15, 24]  # the partial epoch 2 at step 15, then the whole of it
