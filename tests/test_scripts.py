"""The repository's scripts: the results table reads what eval and training wrote."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _fake_run(path: Path, result: dict, stages: list[tuple[str, int, float]]) -> Path:
    path.mkdir()
    (path / "eval.json").write_text(json.dumps({"test": result}))
    (path / "metrics.jsonl").write_text("".join(
        json.dumps({"stage": s, "epoch": e, "elapsed": t}) + "\n" for s, e, t in stages))
    return path


def test_results_table_rows_come_from_eval_json(tmp_path):
    nice = _fake_run(tmp_path / "nice-run", {"model": "nice", "parameters": 19158352, "bits_per_dim": 4.5678,
                                             "training_hardware": "CPU: x", "sample_quality": {"fid": 12.345, "kid": 0.5,
                                             "precision": 0.1, "recall": 0.2, "nearest_train_l2": 7.0}},
                     [("train", 1, 60.0), ("train", 2, 120.0)])
    latent = _fake_run(tmp_path / "latent-run", {"model": "latent-realnvp", "parameters": 10, "bits_per_dim": None,
                                                 "bits_per_dim_note": "latent density: no pixel bits/dim",
                                                 "training_hardware": "CPU: x", "sample_quality": {
                                                     "fid": 1.0, "kid": 0.01, "precision": 0.9, "recall": 0.8,
                                                     "nearest_train_l2": 5.0, "conditional_accuracy": 0.97}},
                       [("autoencoder", 1, 30.0), ("flow", 1, 90.0)])
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "results_table.py"), str(nice), str(latent)],
                         capture_output=True, text=True, check=True).stdout
    rows = [line for line in out.splitlines() if line.startswith("| `")]
    assert "| 4.568 | 12.35 |" in rows[0] and "train 2.0 min" in rows[0] and "| n/a |" in rows[0]
    assert "latent density: no pixel bits/dim" in rows[1] and "autoencoder 0.5 min, flow 1.0 min" in rows[1]
    assert "| 0.970 |" in rows[1]
