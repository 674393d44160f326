"""The benchmark script runs and prints the numbers it promises."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

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


def test_learning_curve_counts_training_time_only_and_plots(tiny_dataset, tmp_path):
    script = SCRIPT.with_name("learning_curve.py")
    spec = importlib.util.spec_from_file_location("learning_curve", script)
    learning_curve = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(learning_curve)  # in this process, which knows the dataset "tiny"
    out = tmp_path / "curve.jsonl"
    threads = torch.get_num_threads()
    try:
        assert learning_curve.main(["realnvp", "--set", "dataset=tiny", "--set", "val_size=50", "--set", "size=small",
                                    "--set", "hidden=4", "--set", "batch_size=25", "--minutes", "0.04",
                                    "--eval-every", "0.8", "--val-images", "20", "--out", str(out)]) == 0
    finally:
        torch.set_num_threads(threads)  # the script runs on one thread; the other tests on all
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(records) == 3 and records[-1]["train_seconds"] >= 2.4
    times = [r["train_seconds"] for r in records]
    assert times == sorted(times) and all(b - a < 2.0 for a, b in zip([0.0, *times], times))  # evaluation not counted
    assert records[-1]["val_images"] == 20 and records[-1]["step"] > records[0]["step"] > 0
    png = tmp_path / "curves.png"
    subprocess.run([sys.executable, str(script), "plot", str(out), "-o", str(png)], check=True, capture_output=True)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_roofline_counts_the_step_and_prints_its_table_row():
    script = SCRIPT.with_name("roofline.py")
    done = subprocess.run([sys.executable, str(script), "realnvp", "--set", "size=small", "--batch-size", "4",
                           "--seconds", "0.2", "--markdown"], capture_output=True, text=True, check=True)
    result, row = done.stdout.splitlines()[-2:]
    result = json.loads(result)
    assert result["mflop_per_image"] > 0 and result["train_images_per_s"] > 0 and result["achieved_gflops"] > 0
    assert 0 < result["share_of_conv_mix_peak"] and result["dominant_convolutions"] and result["top_ops"]
    assert row.startswith("| realnvp size=small | 1 |")


def test_ab_step_times_both_variants():
    script = SCRIPT.with_name("ab_step.py")
    done = subprocess.run([sys.executable, str(script), "nice", "--set", "size=small", "--set", "batch_size=8",
                           "--against", "adam=fused", "--steps", "2"], capture_output=True, text=True, check=True)
    result = json.loads(done.stdout)
    assert result["against"] == ["adam=fused"] and result["base_images_per_s"] > 0 and result["variant_images_per_s"] > 0
    assert result["speedup"] > 0 and set(result["warmup_seconds"]) == {"base", "variant"}
