"""The benchmark script runs and prints the numbers it promises."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "nice_speed.py"


def test_nice_speed_prints_train_and_sample_throughput():
    done = subprocess.run([sys.executable, str(SCRIPT), "--size", "small", "--steps", "2", "--batch-size", "16"],
                          capture_output=True, text=True, check=True)
    rows = [json.loads(line) for line in done.stdout.splitlines()]
    assert [r["measure"] for r in rows] == ["train_images_per_s", "sample_images_per_s"]
    assert all(r["value"] > 0 and r["hardware"].startswith("CPU") for r in rows)
