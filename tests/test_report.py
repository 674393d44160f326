"""`couplings compare`: the report's table against eval.json, seeds aggregated, cells that do not
apply, and the HTML as a real browser renders it."""

from __future__ import annotations

import json
import os
import shutil
import statistics
from html.parser import HTMLParser
from pathlib import Path

import pytest

from conftest import write_tiny_dataset
from couplings import data
from couplings.report import collect as report_collect
from couplings.cli import main
from couplings.evaluation import NO_PIXEL_BPD, Evaluation
from couplings.report import HEADERS, RunSummary, table
from couplings.report.table import COST, QUALITY, against_pretrained, published_gaps

ARTIFACTS = Path(os.environ.get("COUPLINGS_TEST_ARTIFACTS", Path(__file__).parent.parent / "test-artifacts"))
COMMON = ["--dataset", "tiny", "--set", "val_size=50", "--set", "samples_per_epoch=4", "--device", "cpu", "--quiet"]


def _train_tiny_runs(root: Path) -> list[Path]:
    """Two seeds of a tiny NICE and one tiny Real NVP."""
    runs = []
    for seed in (0, 1):
        runs.append(root / f"nice-seed{seed}")
        assert main(["train", "nice", "--out", str(runs[-1]), "--set", "size=small", "--set", "hidden_units=16",
                     "--batch-size", "50", "--max-steps", "4", "--seed", str(seed), *COMMON]) == 0
    runs.append(root / "realnvp")
    assert main(["train", "realnvp", "--out", str(runs[-1]), "--set", "size=small", "--set", "hidden=4",
                 "--batch-size", "16", "--max-steps", "2", *COMMON]) == 0
    return runs


class _Tables(HTMLParser):
    """Collects every <table id=...> of an HTML page as rows of cell texts."""

    def __init__(self):
        super().__init__()
        self.tables: dict[str, list[list[str]]] = {}
        self._table = self._row = self._cell = None

    def handle_starttag(self, tag, attrs):
        if tag == "table":
            self._table = self.tables.setdefault(dict(attrs).get("id", ""), [])
        elif tag == "tr" and self._table is not None:
            self._row = []
            self._table.append(self._row)
        elif tag in ("td", "th") and self._row is not None:
            self._cell = []

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None:
            self._row.append("".join(self._cell))
            self._cell = None
        elif tag == "table":
            self._table = None

    def handle_data(self, text):
        if self._cell is not None:
            self._cell.append(text)


def _compare(runs, out) -> int:
    return main(["compare", *map(str, runs), "--out", str(out), "--samples", "16", "--draws", "2",
                 "--ood-dataset", "tiny", "--device", "cpu"])


@pytest.fixture(scope="module")
def built_report(tmp_path_factory):
    """One report from three tiny runs, shared by the tests of this module."""
    root = tmp_path_factory.mktemp("report")
    with pytest.MonkeyPatch.context() as monkeypatch:
        monkeypatch.setitem(data.DATASETS, "tiny", write_tiny_dataset(root / "data"))
        monkeypatch.setenv("COUPLINGS_DATA", str(root / "data"))
        runs = _train_tiny_runs(root)
        assert _compare(runs, root / "report") == 0
        yield runs, root / "report"


def test_report_table_matches_eval_json(built_report, monkeypatch):
    runs, out = built_report
    for name in ("report.md", "report.html", "curves.png", "ood.png", "samples-2-realnvp.png",
                 "interpolation-2-realnvp.png"):
        assert (out / name).is_file(), name
    parser = _Tables()
    parser.feed((out / "report.html").read_text())
    quality, *quality_rows = parser.tables["quality"]
    cost, *cost_rows = parser.tables["cost"]
    assert quality == QUALITY and cost == COST and len(quality_rows) == len(cost_rows) == 2  # the NICE seeds share a row
    assert len(quality) <= 10 and len(cost) <= 8  # readable without scrolling sideways
    cells = [dict(zip(quality + cost, q + c)) for q, c in zip(quality_rows, cost_rows)]
    assert all(q[0] == c[0] for q, c in zip(quality_rows, cost_rows))  # both tables name the runs in the same order
    evals = [json.loads((run / "eval.json").read_text())["test"] for run in runs]
    for entry in evals:
        assert len(entry["bits_per_dim_draws"]) == 2 and entry["bits_per_dim_draws"][0] == entry["bits_per_dim"]

    nice, realnvp = cells
    assert realnvp["test bits/dim"] == f"{evals[2]['bits_per_dim']:.3f}"
    assert realnvp["test log-likelihood (nats)"] == f"{evals[2]['log_likelihood_nats']:.1f}"
    assert realnvp["parameters"] == f"{evals[2]['parameters']:,}"
    assert realnvp["bits/dim std over dequantization draws"] == f"{statistics.stdev(evals[2]['bits_per_dim_draws']):.4f}"
    seeds = [e["bits_per_dim"] for e in evals[:2]]
    assert nice["test bits/dim"] == f"{statistics.mean(seeds):.3f} ± {statistics.stdev(seeds):.3f}"
    assert "2 seeds: 0, 1" in nice["run"]
    # No classifier exists for the synthetic dataset: the cells say so instead of showing a number.
    assert realnvp["FID"] == "skipped: no feature classifier for tiny"
    md = (out / "report.md").read_text()
    gaps = [line for line in md.splitlines() if "no published figure for this model on this dataset" in line]
    assert len(gaps) == 2 and "How far each is from its published figure" in md  # one line per recipe
    assert float(realnvp["sampling s / 64 images"]) > 0 and float(realnvp["inference s / 64 images"]) > 0
    assert [row[0] for row in parser.tables["anchors"][1:3]] == ["NICE", "MAF (5)"]
    markdown = (out / "report.md").read_text()
    assert realnvp["test bits/dim"] in markdown and "(curves.png)" in markdown

    # A second compare reuses the current eval.json entries instead of evaluating again.
    def refuse(*args, **kwargs):
        raise AssertionError("evaluate_checkpoint should not run for a current eval.json")

    monkeypatch.setattr(report_collect, "evaluate_checkpoint", refuse)
    assert _compare(runs[:2], out.parent / "report-again") == 0


def test_cells_that_do_not_apply_say_why(tmp_path):
    latent = RunSummary(
        name="latent", path=tmp_path, history=[{"stage": "autoencoder", "epoch": 2, "elapsed": 60.0},
                                               {"stage": "flow", "epoch": 3, "elapsed": 120.0}],
        config={"model": "latent-realnvp", "model_config": {"conditional": True}, "train": {"seed": 0}},
        result=Evaluation("latent-realnvp", "mnist", parameters=10, sample_quality={
            "fid": 1.0, "kid": 2.0, "conditional_accuracy": 0.9, "nearest_train_l2": 3.0}),
        seconds_per_64={"sampling": 0.1, "inference": 0.2},
    )
    row = dict(zip(HEADERS, table([latent])[0]))
    assert row["test bits/dim"] == row["bits/dim std over dequantization draws"] == NO_PIXEL_BPD
    assert row["epochs"] == "autoencoder 2, flow 3" and row["training wall-clock"] == "2.0 min"
    assert row["conditional accuracy"] == "0.900"
    latent.result.sample_quality = {"fid": 1.0, "kid": 2.0, "nearest_train_l2": 3.0}
    assert dict(zip(HEADERS, table([latent])[0]))["conditional accuracy"] == "unconditional model"
    latent.result.sample_quality = None
    assert dict(zip(HEADERS, table([latent])[0]))["FID"] == "not computed (--samples 0)"


def test_compare_refuses_a_directory_that_is_not_a_run(tmp_path, capsys):
    assert main(["compare", str(tmp_path), "--out", str(tmp_path / "report")]) == 2
    assert "is not a run directory" in capsys.readouterr().err
    assert not (tmp_path / "report").exists()


def _browser():
    """Headless Debian chromium through selenium and chromedriver, or None if they are missing."""
    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if not (chromium and driver):
        return None
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,2000"):
        options.add_argument(flag)
    return webdriver.Chrome(service=Service(driver), options=options)


def test_report_renders_in_a_real_browser(built_report):
    _, out = built_report
    browser = _browser()
    if browser is None:
        if os.environ.get("COUPLINGS_REQUIRE_BROWSER"):
            pytest.fail("chromium and chromedriver are required (COUPLINGS_REQUIRE_BROWSER is set)")
        pytest.skip("needs Debian's chromium and chromium-driver (apt-get install chromium chromium-driver)")
    try:
        browser.get((out / "report.html").resolve().as_uri())
        widths = browser.execute_script(
            "return Array.from(document.images).map(i => i.complete ? i.naturalWidth : 0);")
        rows = browser.execute_script("return document.querySelectorAll('table#quality tbody tr').length;")
        # How far each results table would scroll sideways in the browser window (1400 px wide).
        overflow = browser.execute_script(
            "return ['quality', 'cost'].map(id => { const d = document.getElementById(id).parentElement;"
            " return d.scrollWidth - d.clientWidth; });")
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        browser.save_screenshot(str(ARTIFACTS / "report.png"))
    finally:
        browser.quit()
    assert len(widths) >= 5 and all(w > 0 for w in widths), widths  # curves, 2 sample grids, 1 strip, ood
    assert rows == 2
    assert overflow == [0, 0], overflow


def test_each_recipe_gets_one_line_on_its_distance_from_the_published_figure(tmp_path):
    def run(name, seed, model="realnvp", dataset="mnist", bpd=1.2, published=True, num_classes=0):
        result = Evaluation(model, dataset, bits_per_dim=bpd, estimate="bound, one draw")
        if published:
            result.published_bits_per_dim, result.published_source = 1.06, "FFJORD paper table"
        return RunSummary(name=name, path=tmp_path, history=[], result=result, seconds_per_64={},
                          config={"model": model, "model_config": {"num_classes": num_classes},
                                  "train": {"seed": seed, "dataset": dataset}})

    latent = run("latent", 0, model="latent-realnvp", bpd=None, published=False)
    latent.result.latent_dimensions = 20
    seeds = [run("fast-0", 0, bpd=1.10), run("fast-1", 1, bpd=1.14)]
    fashion = run("fashion", 0, dataset="fashion-mnist", published=False)
    conditional = run("cond", 0, model="glow", bpd=1.08, num_classes=10)
    lines = published_gaps([*seeds, latent, fashion, conditional])
    assert len(lines) == 4, lines
    assert lines[0] == ("fast-0 and 1 more seeds (realnvp): 1.120 bits/dim, bound, one draw, against the published "
                        "1.060 (FFJORD paper table), 0.060 above it (5.7%)")
    assert "no published figure" in lines[1] and "20-d embeddings" in lines[1]
    assert "no published figure for this model on this dataset" in lines[2]
    assert lines[3].endswith("0.020 above it (1.9%); of p(x | y), the label given, against a published figure of p(x), "
                             "so not like for like")


def test_a_pretrained_model_is_copied_into_a_run_directory_that_loads_like_the_shipped_file(tmp_path):
    from couplings import checkpoint

    run = report_collect.as_run_directory("pretrained:nice-small-mnist", tmp_path)
    assert run == tmp_path / "pretrained-nice-small-mnist"
    shipped = checkpoint.pretrained_path("nice-small-mnist")
    assert (run / "best.pt").read_bytes() == shipped.read_bytes()
    config = json.loads((run / "config.json").read_text())
    assert config["model"] == "nice" and config["model_config"] == checkpoint.load(shipped).model_config
    assert report_collect.as_run_directory(tmp_path / "elsewhere", tmp_path) == tmp_path / "elsewhere"


def test_compare_refuses_an_unknown_pretrained_name_before_writing(tmp_path, capsys):
    assert main(["compare", "pretrained:no-such-model", "--out", str(tmp_path / "report")]) != 0
    assert "no-such-model" in capsys.readouterr().err
    assert not (tmp_path / "report").exists()


@pytest.mark.network  # scores the shipped model on the MNIST test set
def test_compare_takes_a_pretrained_model_like_a_run(tmp_path):
    from couplings import checkpoint

    out = tmp_path / "report"
    assert main(["compare", "pretrained:nice-small-mnist", "--out", str(out), "--samples", "0", "--draws", "1",
                 "--ood-images", "50", "--device", "cpu"]) == 0
    stored = checkpoint.load(checkpoint.pretrained_path("nice-small-mnist")).provenance["test_bits_per_dim"]
    scored = json.loads((out / "pretrained-nice-small-mnist" / "eval.json").read_text())["test"]["bits_per_dim"]
    assert scored == pytest.approx(stored, abs=1e-4)  # the same model, scored on the same test set
    assert "pretrained-nice-small-mnist" in (out / "report.md").read_text()


@pytest.mark.network  # trains on MNIST and scores a shipped model on its test images
def test_short_runs_beside_shipped_models_scored_on_the_same_test_images_two_at_a_time(tmp_path):
    from couplings.evaluation import evaluate_checkpoint

    run = tmp_path / "nice-small"
    assert main(["train", "nice", "--set", "size=small", "--set", "hidden_units=16", "--set", "val_size=100",
                 "--batch-size", "50", "--max-steps", "3", "--out", str(run), "--device", "cpu", "--quiet"]) == 0
    out = tmp_path / "report"

    def compare(test_images: int) -> dict[str, dict]:
        assert main(["compare", str(run), "pretrained:nice-small-mnist", "--out", str(out), "--test-images",
                     str(test_images), "--samples", "0", "--draws", "1", "--ood-images", "50", "--jobs", "2",
                     "--device", "cpu"]) == 0
        return {d.name: json.loads((d / "eval.json").read_text())["test"] for d in (run, out / "pretrained-nice-small-mnist")}

    scored = compare(300)
    assert [(r["num_images"], r["image_limit"]) for r in scored.values()] == [(300, 300)] * 2
    # The evaluation in a worker process is the one this process would have made.
    alone = evaluate_checkpoint(run, num_images=300, samples=0)
    assert scored["nice-small"]["bits_per_dim"] == pytest.approx(alone.bits_per_dim, abs=1e-9)
    ours, theirs = scored["nice-small"]["bits_per_dim"], scored["pretrained-nice-small-mnist"]["bits_per_dim"]
    report = (out / "report.md").read_text()
    assert "The first 300 test images of each run's dataset" in report
    assert "## How far short runs are from long ones" in report
    assert (f"- nice-small against the shipped nice-small-mnist: test bits/dim {ours:.3f} against {theirs:.3f} "
            f"({ours - theirs:+.3f})") in report

    rescored = compare(200)  # an evaluation on other images is not reused
    assert [r["num_images"] for r in rescored.values()] == [200, 200]


def test_only_runs_trained_here_are_set_against_the_shipped_model_of_their_kind(tmp_path):
    def run(name, model="realnvp", bpd=1.3, fid=200.0, minutes=5.0, num_classes=0, pretrained=None):
        result = Evaluation(model, "mnist", bits_per_dim=bpd, parameters=1,
                            sample_quality={"fid": fid, "kid": 0.1, "nearest_train_l2": 1.0})
        if pretrained:
            result.training_seconds = minutes * 60
        return RunSummary(name=name, path=tmp_path, result=result, seconds_per_64={"sampling": 0, "inference": 0},
                          history=[] if pretrained else [{"epoch": 1, "elapsed": minutes * 60}],
                          config={"model": model, "model_config": {"num_classes": num_classes}, "train": {}},
                          pretrained=pretrained)

    runs = [run("realnvp-fast"), run("glow-cond", model="glow", num_classes=10),
            run("pretrained-realnvp", bpd=1.094, fid=88.4, minutes=240, pretrained="realnvp-fast-mnist"),
            run("pretrained-glow", model="glow", bpd=1.08, fid=20.3, minutes=242, pretrained="glow-mnist")]
    lines = against_pretrained(runs)
    # The conditional Glow has no shipped model of its kind here (the shipped Glow is unconditional).
    assert lines == [("realnvp-fast against the shipped realnvp-fast-mnist: test bits/dim 1.300 against 1.094 "
                      "(+0.206), FID 200.0 against 88.4; 5.0 against 240 minutes of training")]
