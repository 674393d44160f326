"""scripts/gpu_check.py: refused without a GPU, and its --smoke mode on the CPU (in CI) so that
the prepared GPU check cannot rot."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "gpu_check.py"


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_without_a_gpu_the_check_says_so_and_points_at_smoke_mode(tmp_path):
    result = subprocess.run([sys.executable, str(SCRIPT), "--out", str(tmp_path / "x.json")], capture_output=True, text=True)
    assert result.returncode == 2
    assert "no CUDA GPU is visible" in result.stderr and "--smoke" in result.stderr
    assert not (tmp_path / "x.json").exists()


@pytest.mark.network  # the training part reads MNIST
@pytest.mark.skipif(not os.environ.get("COUPLINGS_SLOW_TESTS"), reason="about 90 s on 2 cores; set COUPLINGS_SLOW_TESTS=1")
def test_smoke_mode_runs_every_part_and_writes_one_json_file(tmp_path):
    out = tmp_path / "smoke.json"
    result = subprocess.run([sys.executable, str(SCRIPT), "--smoke", "--out", str(out)], capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr
    report = json.loads(out.read_text())
    assert report["failed"] == [] and report["mode"].startswith("smoke")
    assert report["tests"]["rc"] == 0 and " passed" in report["tests"]["tail"]  # CPU against CPU, not all skipped
    assert {p["command"].split("--model ")[1].split()[0] for p in report["speed"]} == {"nice", "realnvp", "glow"}
    for part in report["speed"]:
        assert [line["measure"] for line in part["json"]] == ["train_images_per_s", "sample_images_per_s"]
        assert all(line["value"] > 0 for line in part["json"])
    assert report["peer"].get("skipped") or report["peer"]["json"][0]["results"]
    assert report["training"]["rc"] == 0 and report["training"]["epochs"][0]["step"] == 3
