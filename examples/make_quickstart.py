"""Writes examples/quickstart.ipynb, without outputs, from the cells below: edit them here and
run ``python examples/make_quickstart.py`` (tests/test_notebook.py checks that the two agree)."""

from __future__ import annotations

from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

NOTEBOOK = Path(__file__).with_name("quickstart.ipynb")

# (kind, source) in order; the first line of each markdown cell is its heading.
CELLS: list[tuple[str, str]] = [
    ("markdown", """\
# couplings quickstart

A tour of the library in six steps; the first five take seconds on a laptop CPU:

1. load the pretrained NICE of the paper's configuration,
2. sample it at several temperatures,
3. score test images in bits per dimension,
4. interpolate between digits in latent space,
5. tell Fashion-MNIST from MNIST by bits/dim alone (out-of-distribution detection),
6. train a tiny NICE for a minute and sample from it.

MNIST and Fashion-MNIST are downloaded on first use into `~/.cache/couplings` (or
`couplings data fetch mnist` beforehand). The training budget of step 6 is
`$COUPLINGS_NOTEBOOK_MINUTES` minutes (default 1). Run it with
`pip install -e '.[test]'` (which brings `ipykernel`) and `jupyter lab examples/quickstart.ipynb`,
or from the tests: `pytest tests/test_notebook.py`."""),
    ("code", """\
import os
import tempfile
import warnings

import matplotlib.pyplot as plt
import numpy as np
import torch

# couplings' progress bars use tqdm.auto, which warns in a notebook without ipywidgets
warnings.filterwarnings("ignore", message="IProgress not found")"""),
    ("code", """\
from couplings import bits_per_dim, data, dequantize, load_model, log_probs, train
from couplings.checkpoint import pretrained_path
from couplings.images import grid
from couplings.likelihood import nats_to_bits_per_dim
from couplings.sampling import interpolate, temperature_sweep


def show(images, title, nrow=8, row_labels=None):
    \"\"\"Draws a (N, C, H, W) batch in [0, 1] as one grid, optionally with a label per row.\"\"\"
    picture = grid(images, nrow=nrow)
    fig, ax = plt.subplots(figsize=(nrow * 0.6, picture.shape[0] / picture.shape[1] * nrow * 0.6))
    ax.imshow(picture, cmap="gray", vmin=0, vmax=255)
    ax.set_title(title)
    ax.set_xticks([])
    if row_labels:
        height = images.shape[-2] + 2  # grid() pads every image by 2 pixels
        ax.set_yticks([2 + height * r + height / 2 - 1 for r in range(len(row_labels))], row_labels)
    else:
        ax.set_yticks([])"""),
    ("markdown", """\
## 1. Load a pretrained model

`src/couplings/pretrained/` ships five models (its README says how each was trained).
`load_model` rebuilds a model from its checkpoint file alone and returns it in eval mode, with
the `Checkpoint` with its provenance. `nice-mnist` is NICE as in the paper (Dinh et al., 2014):
four additive couplings of 5 x 1000-unit MLPs and a diagonal scaling, trained for 110 minutes on
2 CPU cores and stored in float16. It is in a source checkout but, at 38 MB, not in the wheel:
with an installed couplings, use `nice-small-mnist` (or set `$COUPLINGS_PRETRAINED`)."""),
    ("code", """\
model, checkpoint = load_model(pretrained_path("nice-mnist"))
provenance = checkpoint.provenance
print(f"{type(model).__name__}, size {checkpoint.size}, {sum(p.numel() for p in model.parameters()):,} parameters")
print(f"trained with: {provenance['command']}")
print(f"{provenance['training_seconds'] / 60:.0f} min on {provenance['hardware']}")"""),
    ("markdown", """\
## 2. Sample at several temperatures

A flow samples by inverting the map: draw `z` from the prior and decode it. Scaling `z` by a
temperature `T < 1` trades variety for cleaner, more typical digits. `temperature_sweep` decodes
the same noise at each temperature, one row per temperature."""),
    ("code", """\
temperatures = [0.5, 0.7, 0.85, 1.0]
samples = temperature_sweep(model, temperatures, n=8, seed=0)  # (4 * 8, 1, 28, 28)
show(samples, "nice-mnist samples", row_labels=[f"T = {t}" for t in temperatures])"""),
    ("markdown", """\
## 3. Bits per dimension of test images

`bits_per_dim` dequantizes uint8 pixels (`x = (k + u) / 256`) and reports
`8 - log p(x) / (784 ln 2)`, averaged: lower is better, and a uniform density scores exactly 8.
On the first 500 test images; the whole test set gives 4.252 (`couplings eval --pretrained
nice-mnist`; the paper reports 4.36)."""),
    ("code", """\
images, labels = data.load("mnist", "test")  # uint8 (10000, 28, 28), uint8 (10000,)
print(f"{bits_per_dim(model, images[:500]):.3f} bits/dim on 500 MNIST test images")"""),
    ("markdown", """\
## 4. Interpolate in latent space

`interpolate` maps two images to their latents, walks the straight line between them and
decodes each point; the ends of each row reconstruct the inputs."""),
    ("code", """\
first = [int(np.flatnonzero(labels == digit)[0]) for digit in range(10)]  # the first test image of each digit
pixels = torch.as_tensor(images[first]).unsqueeze(1)  # (10, 28, 28) -> (10, 1, 28, 28)
x = dequantize(pixels, generator=torch.Generator().manual_seed(0))
path = interpolate(model, x[0::2], x[1::2], steps=8)  # 0 -> 1, 2 -> 3, ..., 8 -> 9
show(path, "latent interpolation", row_labels=[f"{a} -> {a + 1}" for a in range(0, 10, 2)])"""),
    ("markdown", """\
## 5. Out-of-distribution detection by bits/dim

A model of MNIST should find Fashion-MNIST clothes unlikely. `log_probs` gives each image's
log-density; in bits/dim, Fashion-MNIST should score far worse (higher). The AUROC is the chance
that a random Fashion-MNIST image scores higher than a random MNIST one (1 separates them
perfectly, 0.5 is chance), computed here from all 500 x 500 pairs. (Trained the other way round,
on Fashion-MNIST, flows famously rate MNIST *more* likely: Nalisnick et al., 2019.)"""),
    ("code", """\
fashion, _ = data.load("fashion-mnist", "test")
mnist_bpd = nats_to_bits_per_dim(log_probs(model, images[:500]).numpy(), 784)
fashion_bpd = nats_to_bits_per_dim(log_probs(model, fashion[:500]).numpy(), 784)


def auroc(inliers, outliers):
    \"\"\"P(an outlier scores higher than an inlier), ties counted half: the area under the ROC curve.\"\"\"
    higher = (outliers[:, None] > inliers[None, :]).mean()
    ties = (outliers[:, None] == inliers[None, :]).mean()
    return float(higher + 0.5 * ties)


score = auroc(mnist_bpd, fashion_bpd)
everything = np.concatenate([mnist_bpd, fashion_bpd])
bins = np.geomspace(everything.min(), everything.max(), 60)
fig, ax = plt.subplots(figsize=(7, 3))
ax.set_xscale("log")
ax.hist(mnist_bpd, bins, alpha=0.6, label=f"MNIST test (mean {mnist_bpd.mean():.2f})")
ax.hist(fashion_bpd, bins, alpha=0.6, label=f"Fashion-MNIST test (mean {fashion_bpd.mean():.2f})")
ax.set_xlabel("bits/dim under nice-mnist (log scale)")
ax.set_ylabel("images")
ax.legend()
print(f"AUROC (Fashion-MNIST vs MNIST, by bits/dim): {score:.5f}")"""),
    ("markdown", """\
## 6. Train a tiny model for a minute

`train` writes a run directory (checkpoints, `config.json`, `metrics.jsonl`, sample grids) and
stops after `max_minutes` of wall-clock; here it goes into a temporary directory (`couplings
train nice --set size=small` on the command line keeps one). A small NICE (1.6M parameters)
makes about 150 optimizer steps a minute on 2 CPU cores, under one epoch: its samples show digit
outlines in noise, and it scores about 9.8 bits/dim, worse than a uniform density's 8. That is
where NICE starts: its couplings preserve volume and its one diagonal scaling starts at 1, so an
untrained NICE scores at least 10 bits/dim (a standard logistic density is at most 1/4, and
8 + log2 4 = 10), and Adam moves each log-scale by about the learning rate, 1e-3, a step.
`nice-mnist` above took 44 epochs to reach 4.43. Validation uses the last 1,000 training images
instead of 10,000, to keep the end of the minute short."""),
    ("code", """\
minutes = float(os.environ.get("COUPLINGS_NOTEBOOK_MINUTES", "1.0"))
with tempfile.TemporaryDirectory() as run:
    train("nice", run, size="small", progress=False,
          train_overrides={"dataset": "mnist", "max_minutes": minutes, "val_size": 1000})
    tiny, state = load_model(run)  # best.pt, by validation bits/dim
print(f"{state.step} steps in {state.elapsed:.0f} s: "
      f"{bits_per_dim(tiny, images[:500]):.3f} bits/dim on the same 500 test images")
show(temperature_sweep(tiny, [0.8], n=16, seed=0), f"NICE after {minutes:g} min, T = 0.8")"""),
]


def notebook() -> nbformat.NotebookNode:
    """The notebook, with no outputs and stable cell ids (so regenerating it changes nothing)."""
    cells = [(new_markdown_cell if kind == "markdown" else new_code_cell)(source) for kind, source in CELLS]
    for i, cell in enumerate(cells):
        cell.id = f"cell-{i:02d}"
    return new_notebook(cells=cells, metadata={
        "kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"},
        "language_info": {"name": "python"},
    })


def main() -> None:
    nb = notebook()
    nbformat.validate(nb)
    nbformat.write(nb, NOTEBOOK)
    print(f"wrote {NOTEBOOK}")


if __name__ == "__main__":
    main()
