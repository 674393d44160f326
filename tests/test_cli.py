"""The command line end to end on a synthetic dataset: train, resume, eval, sample, bad input."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import cli_child
from couplings import checkpoint, data
from couplings.cli import main
from couplings.likelihood import bits_per_dim, log_probs

TINY = ["--dataset", "tiny", "--set", "size=small", "--set", "hidden_units=32", "--set", "val_size=50",
        "--set", "samples_per_epoch=4", "--batch-size", "40", "--device", "cpu", "--quiet"]


def _train(out, *extra):
    return main(["train", "nice", "--out", str(out), *TINY, *extra])


@pytest.fixture
def run_dir(tiny_dataset, tmp_path):
    out = tmp_path / "run"
    assert _train(out, "--max-steps", "5") == 0
    return out


def _error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert err, "expected an error message"
    assert err[-1].startswith("error: ") and "Traceback" not in "\n".join(err)
    return err[-1]


def test_train_writes_a_complete_run_directory(run_dir):
    names = {p.name for p in run_dir.iterdir()}
    assert {"config.json", "last.pt", "best.pt", "metrics.jsonl", "samples"} <= names
    config = json.loads((run_dir / "config.json").read_text())
    assert config["model"] == "nice" and config["size"] == "small"
    assert config["model_config"]["hidden_units"] == 32 and config["model_config"]["hidden_layers"] == 4
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert len(lines) == 1 and lines[0]["step"] == 5 and lines[0]["partial_epoch"]
    for key in ("train_loss", "val_bpd", "seconds", "images_per_s"):
        assert lines[0][key] > 0
    assert (run_dir / "samples" / "epoch_0001.png").stat().st_size > 0
    state = checkpoint.load(run_dir / "last.pt")
    assert state.step == 5 and state.optimizer_state is not None
    assert set(state.rng) == {"torch", "cuda", "numpy", "python"}
    assert state.epoch == 0 and state.position["index"] == 1 and state.position["next"] == 5  # stopped inside epoch 1


def test_eval_and_sample_on_the_trained_run(run_dir, tmp_path, capsys):
    assert main(["eval", str(run_dir), "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "bits/dim" in out and "nats" in out
    result = json.loads((run_dir / "eval.json").read_text())["test"]
    assert result["num_images"] == 100 and result["dimensions"] == 784
    # Recomputed here from the checkpoint and the test images, with the same dequantization seed.
    model, _ = checkpoint.load_model(run_dir / "best.pt")
    images, _ = data.load("tiny", "test")
    assert result["bits_per_dim"] == pytest.approx(bits_per_dim(model, images, seed=0), abs=1e-6)
    assert result["log_likelihood_nats"] == pytest.approx(float(log_probs(model, images, seed=0).mean()), rel=1e-9)
    assert main(["eval", str(run_dir / "last.pt"), "--split", "val", "--device", "cpu"]) == 0
    assert set(json.loads((run_dir / "eval.json").read_text())) == {"test", "val"}

    png = tmp_path / "grid.png"
    assert main(["sample", str(run_dir), "-n", "6", "--temperature", "0.7", "-o", str(png), "--device", "cpu"]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_resume_continues_exactly_where_an_uninterrupted_run_would_be(tiny_dataset, tmp_path):
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert _train(straight, "--epochs", "2") == 0
    assert _train(split, "--epochs", "1") == 0
    assert _train(split, "--epochs", "2", "--resume") == 0
    a, b = checkpoint.load(straight / "last.pt"), checkpoint.load(split / "last.pt")
    assert a.epoch == b.epoch == 2 and a.step == b.step == 12
    for key in a.model_state:
        torch.testing.assert_close(a.model_state[key], b.model_state[key], atol=0, rtol=0)
    assert len((split / "metrics.jsonl").read_text().splitlines()) == 2


def test_existing_run_is_not_overwritten_without_resume(run_dir, capsys):
    before = (run_dir / "last.pt").read_bytes()
    assert _train(run_dir, "--max-steps", "2") == 1
    assert "already exists" in _error_line(capsys)
    assert (run_dir / "last.pt").read_bytes() == before


def test_resume_refuses_to_change_the_model(run_dir, capsys):
    assert main(["train", "nice", "--out", str(run_dir), "--resume", "--set", "hidden_units=64", "--quiet"]) == 2
    assert "cannot change hidden_units when resuming" in _error_line(capsys)


@pytest.mark.parametrize(
    "argv, code, message",
    [
        (["train", "maf"], 2, "invalid choice: 'maf'"),
        (["train", "nice", "--set", "hidden_unit=3"], 2, "unknown key 'hidden_unit'"),
        (["train", "nice", "--set", "hidden_units=x"], 2, "expected an integer"),
        (["train", "nice", "--set", "size=huge", "--dataset", "tiny"], 2, "size must be one of"),
        (["train", "nice", "--epochs", "0"], 2, "epochs must be >= 1"),
        (["sample", "RUN", "-o", "x.png", "--temperature", "0"], 2, "expected a number > 0"),
        (["sample", "RUN", "-o", "x.png", "-n", "0"], 2, "expected an integer >= 1"),
        (["eval", "does/not/exist"], 1, "no such checkpoint or run directory"),
        (["train", "nice", "--resume"], 2, "--resume needs --out"),
    ],
)
def test_bad_input_gives_one_error_line(tiny_dataset, tmp_path, monkeypatch, capsys, argv, code, message):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as info:
        raise SystemExit(main(argv))
    assert info.value.code == code
    assert message in _error_line(capsys)
    assert not (tmp_path / "runs").exists() and not (tmp_path / "x.png").exists()


def test_corrupt_checkpoint_writes_nothing(tmp_path, capsys):
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint at all")
    png = tmp_path / "out.png"
    assert main(["sample", str(tmp_path / "bad.pt"), "-o", str(png)]) == 1
    assert "not a readable couplings checkpoint" in _error_line(capsys)
    assert main(["eval", str(tmp_path / "bad.pt")]) == 1
    assert not png.exists() and not (tmp_path / "eval.json").exists()


def test_sample_refuses_missing_output_directory(run_dir, tmp_path, capsys):
    assert main(["sample", str(run_dir), "-o", str(tmp_path / "no" / "such" / "dir.png")]) == 2
    assert "does not exist" in _error_line(capsys)


def test_console_script_prints_no_traceback(tmp_path):
    (tmp_path / "bad.pt").write_bytes(b"junk")
    done = subprocess.run([sys.executable, "-m", "couplings.cli", "eval", str(tmp_path / "bad.pt")],
                          capture_output=True, text=True)
    assert done.returncode == 1
    assert done.stderr.startswith("error: ") and len(done.stderr.strip().splitlines()) == 1


def test_pretrained_export_and_use(run_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("COUPLINGS_PRETRAINED", str(tmp_path / "pretrained"))
    (tmp_path / "pretrained").mkdir()
    path = checkpoint.export_pretrained(run_dir, tmp_path / "pretrained" / "nice-tiny.pt", half=True,
                                        provenance={"command": "test"})
    state = checkpoint.load(path)
    assert state.stored_half_precision and state.optimizer_state is None
    assert all(v.dtype == torch.float16 for v in state.model_state.values() if v.is_floating_point())
    model, _ = checkpoint.load_model(path)
    assert next(model.parameters()).dtype == torch.float32
    assert main(["sample", "--pretrained", "nice-tiny", "-n", "4", "-o", str(tmp_path / "p.png")]) == 0
    assert main(["eval", "--pretrained", "nice-tiny", "--dataset", "tiny", "--samples", "0"]) == 0
    assert "bits/dim" in capsys.readouterr().out
    assert main(["sample", "--pretrained", "nope", "-o", str(tmp_path / "q.png")]) == 1
    assert "no pretrained model 'nope'" in _error_line(capsys) and not (tmp_path / "q.png").exists()
    assert main(["sample", str(run_dir), "--pretrained", "nice-tiny", "-o", str(tmp_path / "q.png")]) == 2
    assert "either RUN_DIR_OR_CHECKPOINT or --pretrained" in _error_line(capsys)


def test_resume_recreates_a_missing_samples_directory(run_dir):
    # A run directory copied without its samples/ folder once crashed the resumed run at the
    # end of its first epoch, before that epoch's checkpoint was written.
    shutil.rmtree(run_dir / "samples")
    assert _train(run_dir, "--resume", "--max-steps", "7") == 0
    assert checkpoint.load(run_dir / "last.pt").step == 7 and any((run_dir / "samples").iterdir())


@pytest.mark.processes
def test_sigterm_stops_after_the_current_step_and_checkpoints(tiny_dataset, tmp_path):
    out = tmp_path / "run"
    argv = cli_child("train", "nice", "--out", str(out), *TINY, "--epochs", "100000")
    process = subprocess.Popen(argv, stderr=subprocess.PIPE, text=True)  # inherits $COUPLINGS_DATA
    deadline = time.monotonic() + 120
    while not (out / "metrics.jsonl").exists():  # the first epoch is done: training is under way
        assert process.poll() is None and time.monotonic() < deadline, "training did not start"
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 128 + signal.SIGTERM
    assert "stopped by SIGTERM" in err and "--resume" in err and "Traceback" not in err
    state = checkpoint.load(out / "last.pt")
    last_line = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert last_line["step"] == state.step > 0  # the stopped epoch was logged and checkpointed
    assert _train(out, "--resume", "--max-steps", str(state.step + 2)) == 0


def test_every_train_flag_is_a_config_field_parsed_and_checked_there():
    """The train flags stand for --set FIELD=VALUE: the same field, the same parser, the same check."""
    import dataclasses

    from couplings import cli
    from couplings.config import PixelTrainConfig

    fields = {f.name for f in dataclasses.fields(PixelTrainConfig)}
    assert set(cli.TRAIN_FLAGS) <= fields
    parser = cli.build_parser()
    args = parser.parse_args(["train", "realnvp", "--epochs", "3", "--max-minutes", "1.5", "--precision", "bf16",
                              "--compile", "--seed", "7"])
    assert (args.epochs, args.max_minutes, args.precision, args.compile, args.seed) == (3, 1.5, "bf16", True, 7)
    assert args.batch_size is None and args.channels_last is None  # not given: the model's recipe decides
    helps = {a.dest: a.help for a in parser._subparsers._group_actions[0].choices["train"]._actions}
    assert all(f"--set {name}=" in helps[name] for name in cli.TRAIN_FLAGS)
