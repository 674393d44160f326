"""The benchmark script runs and prints the numbers it promises."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "speed.py"


@pytest.mark.parametrize("model", ["nice", "realnvp", "glow"])
def test_speed_prints_train_and_sample_throughput(model):
    done = subprocess.run([sys.executable, str(SCRIPT), "--model", model, "--size", "small", "--steps", "2",
                           "--batch-size", "8", "--sample-batch", "8"], capture_output=True, text=True, check=True)
    rows = [json.loads(line) for line in done.stdout.splitlines()]
    assert [r["measure"] for r in rows] == ["train_images_per_s", "sample_images_per_s"]
    assert all(r["model"] == model and r["value"] > 0 and r["hardware"].startswith("CPU") for r in rows)


def test_speed_runs_the_fast_paths():
    done = subprocess.run([sys.executable, str(SCRIPT), "--model", "nice", "--size", "small", "--steps", "2",
                           "--batch-size", "8", "--sample-batch", "8", "--adam", "fused", "--channels-last"],
                          capture_output=True, text=True, check=True)
    rows = [json.loads(line) for line in done.stdout.splitlines()]
    assert all(r["adam"] == "fused" and r["channels_last"] and r["value"] > 0 for r in rows)


def test_time_to_target_reads_a_run(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model": "nice", "size": "small", "hardware": "CPU: test"}))
    lines = [{"epoch": 1, "step": 10, "val_bpd": 5.0, "elapsed": 60.0}, {"epoch": 2, "step": 20, "val_bpd": 4.4, "elapsed": 150.0}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    script = SCRIPT.with_name("time_to_target.py")
    done = subprocess.run([sys.executable, str(script), f"{tmp_path}:4.5", f"{tmp_path}:1.3"],
                          capture_output=True, text=True, check=True)
    reached, missed = (json.loads(line) for line in done.stdout.splitlines())
    assert reached["reached"] and reached["minutes"] == 2.5 and reached["epoch"] == 2
    assert not missed["reached"] and missed["best_val_bpd"] == 4.4 and missed["trained_minutes"] == 2.5
