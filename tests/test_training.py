"""couplings.training: planning a run, options a trainer does not read, and the run-directory lock."""

from __future__ import annotations

import signal
import subprocess
import time

import pytest

from conftest import cli_child
from couplings import checkpoint
from couplings.cli import main
from couplings.config import ConfigError, LatentTrainConfig, PixelTrainConfig
from couplings.training import plan_run, train

LATENT = ["--dataset", "tiny", "--set", "size=small", "--set", "val_size=50", "--set", "ae_epochs=1",
          "--epochs", "1", "--batch-size", "25", "--device", "cpu", "--quiet"]
NICE = ["--dataset", "tiny", "--set", "size=small", "--set", "hidden_units=32", "--set", "val_size=50",
        "--set", "samples_per_epoch=4", "--batch-size", "40", "--device", "cpu", "--quiet"]

# Every option the pixel trainer reads and the latent trainer does not, as the CLI takes it.
PIXEL_ONLY = {
    "compile": ["--compile"],
    "precision": ["--precision", "bf16"],
    "channels_last": ["--channels-last"],
    "adam": ["--set", "adam=fused"],
    "target_bpd": ["--set", "target_bpd=1.5"],
    "samples_per_epoch": ["--set", "samples_per_epoch=8"],
    "eval_batch_size": ["--set", "eval_batch_size=10"],
    "wn_l2": ["--set", "wn_l2=0.001"],
}


def test_the_table_covers_every_pixel_only_option():
    pixel = {f for f in PixelTrainConfig.__dataclass_fields__}
    latent = {f for f in LatentTrainConfig.__dataclass_fields__}
    assert set(PIXEL_ONLY) == pixel - latent


@pytest.mark.parametrize("option", sorted(PIXEL_ONLY))
def test_an_option_the_latent_trainer_does_not_read_is_refused(tiny_dataset, tmp_path, capsys, option):
    out = tmp_path / "run"
    capsys.readouterr()
    try:
        code = main(["train", "latent-realnvp", "--out", str(out), *LATENT, *PIXEL_ONLY[option]])
    except SystemExit as e:
        code = e.code
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and err.startswith("error: "), err
    assert option in err and "latent-realnvp" in err
    assert not out.exists()  # nothing written


def test_the_python_api_refuses_them_too(tiny_dataset, tmp_path):
    with pytest.raises(ConfigError, match="compile: not an option of latent-realnvp"):
        train("latent-realnvp", tmp_path / "run", train_overrides={"compile": True})
    assert not (tmp_path / "run").exists()


def test_plan_run_checks_the_dataset_and_writes_nothing(tiny_dataset, tmp_path):
    with pytest.raises(ConfigError, match="dataset must be one of"):
        plan_run("nice", tmp_path / "run", train_overrides={"dataset": "cifar10"})
    plan = plan_run("nice", tmp_path / "run", train_overrides={"dataset": "tiny", "val_size": 50}, size="small")
    assert plan.state is None and len(plan.train_data[0]) == 250 and len(plan.val_data[0]) == 50
    assert not (tmp_path / "run").exists()


def _wait_for(predicate, seconds: float = 60) -> None:
    deadline = time.monotonic() + seconds
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("timed out")
        time.sleep(0.1)


def test_a_second_train_into_a_live_run_is_refused_and_a_killed_run_resumes(tiny_dataset, tmp_path):
    out = tmp_path / "run"
    first = subprocess.Popen(cli_child("train", "nice", "--out", str(out), *NICE, "--epochs", "100000"),
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        _wait_for(lambda: (out / "last.pt").is_file() and (out / "metrics.jsonl").is_file())
        for extra in (["--resume"], []):
            second = subprocess.run(cli_child("train", "nice", "--out", str(out), *NICE, "--max-steps", "1", *extra),
                                    capture_output=True, text=True, timeout=120)
            lines = second.stderr.strip().splitlines()
            assert second.returncode == 1 and len(lines) == 1, second.stderr
            expected = f"is in use by another 'couplings train' (pid {first.pid})" if extra else "already exists"
            assert expected in lines[0], lines[0]
        assert first.poll() is None  # the first run trains on, undisturbed
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    # The kernel released the dead process's lock: resuming works at once.
    step = checkpoint.load(out / "last.pt")["step"]
    resumed = subprocess.run(cli_child("train", "nice", "--out", str(out), "--resume", "--max-steps", str(step + 2),
                                       "--quiet"), capture_output=True, text=True, timeout=120)
    assert resumed.returncode == 0, resumed.stderr
    assert checkpoint.load(out / "last.pt")["step"] == step + 2
