"""`make demo`, read without running it (`make -n`): every model it trains is in its report, each
training is on one CPU thread with the stated budget, and every option it sets is one the model has."""

from __future__ import annotations

import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

from couplings.cli import main

ROOT = Path(__file__).resolve().parents[1]


def demo_commands() -> list[list[str]]:
    if shutil.which("make") is None:
        pytest.skip("needs make")
    text = subprocess.run(["make", "-n", "--no-print-directory", "demo", "DEMO_MINUTES=7"], cwd=ROOT,
                          capture_output=True, text=True, check=True).stdout
    return [shlex.split(line) for line in text.replace("\\\n", " ").splitlines() if "couplings" in line]


def test_make_demo_reports_every_model_it_trains_each_on_one_thread():
    commands = demo_commands()
    trains = [c for c in commands if len(c) > 3 and c[2] == "train"]
    assert {c[3] for c in trains} == {"nice", "realnvp", "glow", "latent-realnvp"}
    compare = next(c for c in commands if c[0].endswith("couplings") and c[1] == "compare")
    outs = [c[c.index("--out") + 1] for c in trains]
    assert sorted(outs) == sorted(compare[2:compare.index("--out")])  # the runs it compares
    for c in trains:
        assert c[0] == "OMP_NUM_THREADS=1" and c[c.index("--device") + 1] == "cpu"
        if c[3] != "latent-realnvp":  # the pixel-space models train for DEMO_MINUTES each
            assert c[c.index("--max-minutes") + 1] == "7"


def test_every_option_the_demo_sets_is_one_its_model_has(capsys):
    for c in demo_commands():
        if len(c) > 3 and c[2] == "train":
            sets = [a for i, a in enumerate(c) if i and c[i - 1] == "--set"]
            assert main(["config", c[3], *[x for s in sets for x in ("--set", s)]]) == 0, c
    capsys.readouterr()
