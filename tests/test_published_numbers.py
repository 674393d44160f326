"""Every published figure read back from the committed file it names.

The README's results and learning-curve tables, the pretrained models' table and the
learning-curve tables of docs/results.md name their files in their rows; each figure printed
there is compared with that file to its printed precision, so a changed file or a hand-edited
number fails here. A table cell may hold only figures that a rule below checks: a new kind of
figure needs a new rule. `results/provenance.txt` must be what `scripts/provenance.py` prints,
and nothing in the repository may link outside it. Fast: no training, no model is run.
"""

from __future__ import annotations

import importlib.util
import json
import math
import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README, RESULTS, PRETRAINED = ROOT / "README.md", ROOT / "docs/results.md", ROOT / "src/couplings/pretrained/README.md"
DECIMAL = r"\d+\.\d+(?:e-\d+)?"
MNIST_TRAIN_IMAGES = 60_000  # both datasets' training split, of which `val_size` validate


# --- reading Markdown -------------------------------------------------------------------------

def tables(path: Path) -> list[list[list[str]]]:
    """The Markdown tables of ``path``, each a list of rows of cells (the header row first)."""
    found, current = [], []
    for line in path.read_text().splitlines() + [""]:
        if line.startswith("|"):
            if not re.fullmatch(r"\|(\s*:?-+:?\s*\|)+", line.strip()):  # not the |---| rule
                current.append([cell.strip() for cell in line.strip().strip("|").split("|")])
        elif current:
            found.append(current)
            current = []
    return found


def linked_files(cell: str, base: Path) -> list[Path]:
    """The files a cell links to, ``[text](path)`` or a backquoted ``results/...`` path."""
    linked = [(base / p).resolve() for p in re.findall(r"\]\(([^)#]+)\)", cell)]
    return linked + [ROOT / p for p in re.findall(r"`(results/[^`]+\.json)`", cell)]


def agrees(printed: str, value: float) -> bool:
    """Whether ``value`` rounds to ``printed`` at its printed precision (a half unit either way)."""
    printed = printed.replace(",", "")
    mantissa, _, exponent = printed.partition("e")
    decimals = len(mantissa.partition(".")[2])
    unit = 10.0 ** (-decimals + (int(exponent) if exponent else 0))
    return abs(float(printed) - value) <= unit / 2 + 1e-12


def check_all_figures_used(cell: str, patterns: list[str]) -> None:
    """Every decimal figure of ``cell`` is inside a match of one of ``patterns``."""
    rest = cell
    for pattern in patterns:
        rest = re.sub(pattern, " ", rest)
    assert not re.search(DECIMAL, rest), f"a figure no rule checks in {cell!r} (left: {rest!r})"


# --- what the run files say -------------------------------------------------------------------

def run_config(eval_path: Path) -> dict:
    config = eval_path.parent / "config.json"
    return json.loads(config.read_text()) if config.exists() else {}


def passes(eval_path: Path, entry: dict) -> float:
    train = run_config(eval_path)["train"]
    return entry["step"] * train["batch_size"] / (MNIST_TRAIN_IMAGES - train["val_size"])


def hardware(eval_path: Path, entry: dict) -> list[str]:
    return [entry.get("training_hardware", ""), run_config(eval_path).get("hardware", "")]


def check_training(cell: str, files: list[Path]) -> None:
    """Minutes, passes, epochs and threads of a training cell against the runs' files."""
    entries = [json.loads(f.read_text())["test"] for f in files]
    minutes = [e["training_seconds"] / 60 for e in entries]
    for printed in re.findall(r"(\d+(?:\.\d+)?) min\b", cell):
        assert any(agrees(printed, m) for m in [*minutes, sum(minutes)]), f"{printed} min: the files say {minutes}"
    for printed in re.findall(r"(\d+(?:\.\d+)?) passes", cell):
        run_passes = [passes(f, e) for f, e in zip(files, entries)]
        assert any(agrees(printed, p) for p in [*run_passes, sum(run_passes)]), f"{printed} passes: the files say {run_passes}"
    configs = [run_config(f).get("train", {}) for f in files]
    for printed in re.findall(r"(\d+) epochs", cell):
        assert any(int(printed) in (e["epoch"], c.get("epochs")) for e, c in zip(entries, configs)), f"{printed} epochs"
    for printed in re.findall(r"(\d+) autoencoder and", cell):
        assert any(int(printed) == c.get("ae_epochs") for c in configs), f"{printed} autoencoder epochs"
    for printed in re.findall(r"(\d+) flow epochs", cell):
        assert any(int(printed) == c["epochs"] for c in configs), f"{printed} flow epochs"
    named = [("Intel Xeon", "Xeon"), ("AMD EPYC", "AMD EPYC")]
    said = [h for f, e in zip(files, entries) for h in hardware(f, e)]
    for threads, cpu in re.findall(r"(\d|one) threads? of an? (Intel Xeon|AMD EPYC)", cell):
        key = dict(named)[cpu]
        pattern = "" if threads == "one" else f"({threads} threads)"
        assert any(key in h and pattern in h for h in said), f"{threads} thread(s) of {cpu}: the files say {said}"


def check_bits(cell: str, evaluation: dict) -> None:
    """A bits/dim cell: the bound or exact figure first, then importance-weighted ones, then the published one."""
    test = evaluation["test"]
    if "nats" in cell:
        printed = re.search(rf"({DECIMAL}) nats", cell).group(1)
        assert agrees(printed, test["latent_nll_nats"])
        return check_all_figures_used(cell, [rf"{DECIMAL} nats"])
    first = re.search(DECIMAL, cell).group(0)
    assert agrees(first, test["bits_per_dim"]), f"{first}: the file says {test['bits_per_dim']}"
    for printed, k in re.findall(rf"({DECIMAL})\**\s+importance-weighted, K = (\d+)", cell):
        assert agrees(printed, evaluation[f"test@K={k}"]["bits_per_dim"])
    published = re.findall(rf"\(({DECIMAL})", cell)
    for printed in published:
        assert agrees(printed, test["published_bits_per_dim"]), f"published {printed}: {test['published_bits_per_dim']}"
    if "none published" in cell:
        assert test.get("published_bits_per_dim") is None
    check_all_figures_used(cell, [rf"^\**{re.escape(first)}", rf"{DECIMAL}\**\s+importance-weighted", rf"\({DECIMAL}"])


def check_quality(cell: str, test: dict) -> None:
    """A sample-quality cell: FID first, then the conditional accuracy and its standard error."""
    quality = test["sample_quality"]
    first = re.search(DECIMAL, cell).group(0)
    assert agrees(first, quality["fid"]), f"FID {first}: the file says {quality['fid']}"
    accuracy = quality.get("conditional_accuracy")
    for printed in re.findall(rf"conditional accuracy ({DECIMAL})%", cell):
        assert agrees(printed, 100 * accuracy)
    for printed in re.findall(rf"± ({DECIMAL})", cell):
        n = quality["num_samples"]
        assert agrees(printed, 100 * math.sqrt(accuracy * (1 - accuracy) / n))
    check_all_figures_used(cell, [rf"^\**{re.escape(first)}", rf"accuracy {DECIMAL}%", rf"± {DECIMAL}"])


# --- the README's results table ---------------------------------------------------------------

def results_rows() -> list[list[str]]:
    table = next(t for t in tables(README) if t[0][:2] == ["model", "parameters"])
    return table[1:]


@pytest.mark.parametrize("row", results_rows(), ids=lambda row: re.sub(r"\W+", "-", row[0])[:60])
def test_a_readme_results_row_holds_the_figures_of_its_files(row):
    model, parameters, bits, quality, training, files_cell = row
    files = linked_files(files_cell, ROOT)
    assert files and all(f.exists() for f in files), f"the row names no file, or a missing one: {files_cell}"
    evaluation = json.loads(files[0].read_text())
    assert int(parameters.replace(",", "")) == evaluation["test"]["parameters"]
    check_bits(bits, evaluation)
    check_quality(quality, evaluation["test"])
    check_training(training, files)


# --- learning curves --------------------------------------------------------------------------

def curve_tables() -> list[tuple[Path, list[list[str]]]]:
    return [(path, table) for path in (README, RESULTS) for table in tables(path)
            if table[0][0] == "training minutes" and table[0][-1] == "file"]


def test_the_curve_tables_are_found():
    assert [path.name for path, _ in curve_tables()] == ["README.md", "results.md", "results.md", "results.md"]


@pytest.mark.parametrize("path, table", curve_tables(), ids=lambda x: x.name if isinstance(x, Path) else "")
def test_a_learning_curve_table_holds_the_validation_figures_of_its_curves(path, table):
    minutes = [float(m) for m in table[0][1:-1]]
    for row in table[1:]:
        files = linked_files(row[-1], path.parent)
        if "references.md" in row[-1]:
            continue  # a published reference, written down in docs/references.md
        assert len(files) == 1 and files[0].suffix == ".jsonl", f"{row[0]}: no curve file"
        records = [json.loads(line) for line in files[0].read_text().splitlines() if line.strip()]
        for minute, printed in zip(minutes, row[1:-1]):
            nearest = min(records, key=lambda r: abs(r["train_seconds"] - 60 * minute))
            assert abs(nearest["train_seconds"] - 60 * minute) < 30, f"{row[0]}: no point near {minute} min"
            assert agrees(printed.strip("*"), nearest["val_bpd"]), f"{row[0]} at {minute} min: {printed}, file {nearest['val_bpd']}"
        if "parameters" in row[0]:
            assert f"{records[0]['parameters']:,} parameters" in row[0]


def roofline_table() -> tuple[Path, list[list[str]]]:
    (table,) = [t for t in tables(RESULTS) if t[0][0].startswith("model ([file]") and t[0][1] == "threads"]
    return table


def test_the_roofline_table_holds_the_figures_of_its_file():
    """Each row of the roofline table is the record of its model, precision and threads."""
    table = roofline_table()
    (path,) = linked_files(table[0][0], RESULTS.parent)
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    for row in table[1:]:
        model, precision, compiled = re.fullmatch(r"(Real NVP|Glow) `size=fast`, (float32|bf16)(, compiled)?", row[0]).groups()
        options = {f"precision={'fp32' if precision == 'float32' else 'bf16'}", f"compile={'true' if compiled else 'false'}"}
        (record,) = [r for r in records if r["model"] == {"Real NVP": "realnvp", "Glow": "glow"}[model]
                     and r["threads"] == int(row[1]) and options <= set(r["overrides"])]
        fields = [record["train_images_per_s"], record["mflop_per_image"], record["achieved_gflops"],
                  record["conv_mix_fp32_peak_gflops"], 100 * record["share_of_conv_mix_peak"]]
        for printed, value in zip(row[2:7], fields):
            assert agrees(printed.rstrip("%"), value), f"{row[0]}, {row[1]} threads: {printed} against {value}"
        fp32, bf16 = row[7].split(" / ")
        assert agrees(fp32, record["matmul_1024_fp32_gflops"]) and agrees(bf16, record["matmul_1024_bf16_gflops"])
        shares = re.findall(r"(\d+)%", row[8])
        assert [int(x) for x in shares] == [round(100 * op["self_share"]) for op in record["top_ops"][:len(shares)]], row[8]


def test_the_compile_table_holds_the_figures_of_its_file():
    """Each row of the --compile table is the ab_step record of its model and precision."""
    (table,) = [t for t in tables(RESULTS) if t[0][0].startswith("model ([file]") and t[0][1] == "step"]
    (path,) = linked_files(table[0][0], RESULTS.parent)
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    for row in table[1:]:
        model = {"Real NVP `size=fast`": "realnvp", "Glow `size=fast`": "glow"}[row[0]]
        precision = {"float32": "fp32", "bf16": "bf16"}[row[1]]
        (record,) = [r for r in records if r["model"] == model and f"precision={precision}" in r["overrides"]
                     and r["against"] == ["compile=true"]]
        assert agrees(row[2], record["base_images_per_s"]) and agrees(row[3], record["variant_images_per_s"]), row
        assert agrees(row[4].rstrip("x"), record["speedup"]), row


# Rows of a run's table over its training, one column per point of its metrics.jsonl, and the field each reads.
RUN_ROWS = {
    "passes": lambda r, batch, train: r["step"] * batch / train,
    "passes over the data": lambda r, batch, train: r["step"] * batch / train,
    "validation bits/dim": lambda r, batch, train: r["val_bpd"],
    "validation bits/dim (Polyak weights)": lambda r, batch, train: r["val_bpd"],
    "training bits/dim (raw weights, over the epoch)": lambda r, batch, train: r["train_bpd"],
    "minutes": lambda r, batch, train: r["elapsed"] / 60,
}


def run_tables() -> list[tuple[Path, list[list[str]]]]:
    """docs/results.md's tables of a run over its training: the first cell links the run's metrics.jsonl."""
    return [(RESULTS, table) for table in tables(RESULTS) if "metrics.jsonl)" in table[0][0]]


def test_the_run_tables_are_found():
    assert len(run_tables()) == 8


@pytest.mark.parametrize("path, table", run_tables(), ids=lambda x: "" if isinstance(x, Path) else x[0][0].split(" (")[0])
def test_a_run_table_holds_the_figures_of_its_metrics(path, table):
    (metrics,) = linked_files(table[0][0], path.parent)
    records = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    train = json.loads((metrics.parent / "config.json").read_text())["train"]
    batch, train_images = train["batch_size"], MNIST_TRAIN_IMAGES - train["val_size"]
    by_epoch = table[0][0].startswith("epoch")
    for column, key in enumerate(table[0][1:], start=1):
        if by_epoch:  # the end of that epoch
            record = [r for r in records if r["epoch"] == int(key)][-1]
        else:  # the point nearest those minutes of wall-clock
            record = min(records, key=lambda r: abs(r["elapsed"] / 60 - float(key)))
            assert agrees(key, record["elapsed"] / 60), f"no point of {metrics} at {key} minutes"
        for row in table[1:]:
            value = RUN_ROWS[row[0]](record, batch, train_images)
            assert agrees(row[column].strip("*"), value), f"{row[0]} at {key}: {row[column]}, the file says {value}"


# --- the pretrained models' table -------------------------------------------------------------

def pretrained_rows() -> list[list[str]]:
    table = next(t for t in tables(PRETRAINED) if t[0][0] == "name")
    return table[1:]


def load_provenance(name: str) -> dict:
    from couplings import checkpoint

    return checkpoint.load(checkpoint.pretrained_path(name)).provenance


@pytest.mark.parametrize("row", pretrained_rows(), ids=lambda row: row[0].strip("`"))
def test_a_pretrained_row_holds_the_figures_of_its_run_and_of_its_file(row):
    name, _, _, trained, score = (cell.strip() for cell in row)
    name = name.strip("`")
    files = linked_files(score, PRETRAINED.parent)
    assert len(files) == 1 and files[0].name == "eval.json" and files[0].exists(), f"{name}: no eval.json named"
    evaluation = json.loads(files[0].read_text())
    test, quality = evaluation["test"], evaluation["test"].get("sample_quality", {})
    rules = {
        rf"({DECIMAL}) bits/dim importance-weighted over (\d+) draws": lambda p, k: evaluation[f"test@K={k}"]["bits_per_dim"],
        rf"({DECIMAL}) bits/dim(?! importance)": lambda p: test["bits_per_dim"],
        rf"latent NLL ({DECIMAL}) nats": lambda p: test["latent_nll_nats"],
        rf"\(({DECIMAL}) nats\)": lambda p: test["log_likelihood_nats"],
        rf"FID ({DECIMAL})": lambda p: quality["fid"],
        rf"conditional accuracy ({DECIMAL})%": lambda p: 100 * quality["conditional_accuracy"],
        rf"precision ({DECIMAL})": lambda p: quality["precision"],
        rf"recall ({DECIMAL})": lambda p: quality["recall"],
        rf"reconstruction error ({DECIMAL})": lambda p: test["reconstruction_max_abs_error"],
        rf"T = ({DECIMAL})": lambda p: quality["temperature"],
    }
    for pattern, value in rules.items():
        for match in re.finditer(pattern, score):
            assert agrees(match.group(1), value(*match.groups())), f"{name}: {match.group(0)} against {files[0]}"
    check_all_figures_used(score, list(rules))
    runs = [ROOT / run / "eval.json" for run in re.findall(r"`(results/[\w.-]+)`", trained)]
    check_training(trained, [files[0], *(run for run in runs if run.exists())])
    # The file itself: its stored provenance names the same run and holds the same scores.
    provenance = load_provenance(name)
    assert provenance.get("source") in (None, str(files[0].parent.relative_to(ROOT)))
    stored = provenance.get("test_bits_per_dim", provenance.get("test_bits_per_dim_float32"))
    if stored is not None:
        assert stored == pytest.approx(test["bits_per_dim"], abs=1e-9)
    if "fid" in provenance:
        assert provenance["fid"] == pytest.approx(quality["fid"], abs=1e-9)


def test_the_pretrained_table_lists_every_shipped_file():
    shipped = sorted(p.stem for p in (ROOT / "src/couplings/pretrained").glob("*.pt"))
    assert sorted(row[0].strip().strip("`") for row in pretrained_rows()) == shipped


# --- provenance and links ---------------------------------------------------------------------

def test_results_provenance_txt_is_what_the_script_prints():
    spec = importlib.util.spec_from_file_location("provenance", ROOT / "scripts/provenance.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    assert (ROOT / "results/provenance.txt").read_text().splitlines() == script.provenance_lines(ROOT)


def tracked_text_files() -> list[Path]:
    listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True,
                            text=True, check=True).stdout.split()
    suffixes = {".md", ".py", ".txt", ".toml", ".yml", ".ipynb", ".sh", ".json", ".cfg"}
    return [ROOT / p for p in listed if Path(p).suffix in suffixes or Path(p).name in ("Makefile", "run")]


def test_nothing_points_outside_the_repository():
    outside = [f"{p.relative_to(ROOT)}" for p in tracked_text_files()
               if p.exists() and p.name != Path(__file__).name and ("../shared" in (text := p.read_text(errors="ignore"))
                                                                    or "REFERENCES.md" in text)]
    assert not outside, f"links or words that point outside the repository: {outside}"


def test_every_relative_markdown_link_resolves_inside_the_repository():
    broken = []
    for page in [README, PRETRAINED, ROOT / "results/README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for target in re.findall(r"\]\(([^)\s#]+)(?:#[^)]*)?\)", page.read_text()):
            if re.match(r"[a-z]+:", target):
                continue  # an address, not a file
            resolved = (page.parent / target).resolve()
            if not resolved.exists() or ROOT not in resolved.parents:
                broken.append(f"{page.relative_to(ROOT)} -> {target}")
    assert not broken, broken


# --- the index of results/ ---------------------------------------------------------------------

def _indexed_names() -> list[str]:
    """The paths (relative to results/) named in backquotes in the first column of results/README.md,
    with ``{a,b}`` expanded."""
    names = []
    for row in tables(ROOT / "results/README.md")[0][1:]:
        for name in re.findall(r"`([^`]+)`", row[0]):
            head, brace, rest = name.partition("{")
            names += [head + part + rest.partition("}")[2] for part in rest.partition("}")[0].split(",")] if brace else [name]
    return names


def test_the_index_of_results_names_every_entry_and_only_files_that_exist():
    names = _indexed_names()
    missing = [name for name in names if not list((ROOT / "results").glob(name.rstrip("/")))]
    assert not missing, f"results/README.md names files that are not there: {missing}"
    tracked = subprocess.run(["git", "ls-files", "results"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    entries = {path.split("/")[1] for path in tracked.split()} - {"README.md"}
    unlisted = sorted(entries - {name.split("/")[0] for name in names})
    assert not unlisted, f"entries of results/ that results/README.md does not list: {unlisted}"


def test_the_readme_is_short_and_its_first_screen_gives_the_two_commands():
    lines = README.read_text().splitlines()
    assert len(lines) <= 100, f"README.md has {len(lines)} lines; the details belong in docs/"
    first_screen = "\n".join(lines[:40])
    for command in ("make demo", "make test"):
        assert re.search(rf"^{command}\s+#.*\d", first_screen, re.MULTILINE), f"no '{command}  # ...' line with its time"
