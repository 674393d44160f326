"""The wheel, installed (not editable) into a fresh virtual environment, run from another
directory: `couplings sample --pretrained` and `couplings eval --pretrained` work."""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.network  # eval reads the MNIST test set
@pytest.mark.skipif(not os.environ.get("COUPLINGS_SLOW_TESTS"), reason="builds and installs a wheel; set COUPLINGS_SLOW_TESTS=1")
def test_the_installed_wheel_samples_and_evaluates_pretrained_models(tmp_path):
    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(wheels),
                    str(ROOT)], check=True, capture_output=True, cwd=tmp_path)
    (wheel,) = wheels.glob("couplings-*.whl")
    assert wheel.stat().st_size < 20e6  # the large pretrained model stays out
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = venv / "bin" / "python"
    # The dependencies (torch, ...) come from this environment, the package itself from the wheel.
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          check=True, capture_output=True, text=True).stdout.strip()
    Path(site, "dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([str(python), "-m", "pip", "install", "--no-deps", "-q", str(wheel)], check=True, capture_output=True)

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "COUPLINGS_PRETRAINED"}
    couplings = str(venv / "bin" / "couplings")
    where = subprocess.run([str(python), "-c", "import couplings; print(couplings.__file__)"], cwd=elsewhere, env=env,
                           check=True, capture_output=True, text=True).stdout
    assert where.startswith(site), where  # the installed copy, not the source tree
    sample = subprocess.run([couplings, "sample", "--pretrained", "glow-cond-mnist", "-n", "8", "-o", "out.png"],
                            cwd=elsewhere, env=env, capture_output=True, text=True)
    assert sample.returncode == 0, sample.stderr
    assert (elsewhere / "out.png").stat().st_size > 0
    evaluated = subprocess.run([couplings, "eval", "--pretrained", "nice-small-mnist", "--samples", "0"],
                               cwd=elsewhere, env=env, capture_output=True, text=True)
    assert evaluated.returncode == 0, evaluated.stderr
    assert "bits/dim" in evaluated.stdout + evaluated.stderr

    missing = subprocess.run([couplings, "eval", "--pretrained", "nice-mnist", "--samples", "0"], cwd=elsewhere, env=env,
                             capture_output=True, text=True)
    assert missing.returncode == 1
    assert "too large for the wheel" in missing.stderr and "COUPLINGS_PRETRAINED" in missing.stderr
    env["COUPLINGS_PRETRAINED"] = str(ROOT / "src" / "couplings" / "pretrained")
    found = subprocess.run([couplings, "sample", "--pretrained", "nice-mnist", "-n", "4", "-o", "nice.png"], cwd=elsewhere,
                           env=env, capture_output=True, text=True)
    assert found.returncode == 0, found.stderr
