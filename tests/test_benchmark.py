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
