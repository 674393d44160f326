"""Datasets of one's own (`couplings.data.is_path_dataset`): a .npz file or a folder of PNG
images, generated here, trained on by every model, and every clear error they can give."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import synthetic_images
from couplings import checkpoint, data
from couplings.cli import main
from couplings.likelihood import bits_per_dim
from couplings.models import build_model

MODELS = ["nice", "realnvp", "glow", "latent-realnvp"]
# Tiny sizes: 120 images -> 12 held out for the test split, 20 for validation, 88 to train on.
TINY = {
    "nice": ["--set", "size=small", "--set", "hidden_units=16", "--set", "hidden_layers=1"],
    "realnvp": ["--set", "size=small", "--set", "hidden=4"],
    "glow": ["--set", "size=small", "--set", "hidden=4", "--set", "steps=1"],
    "latent-realnvp": ["--set", "size=small", "--set", "hidden_units=8", "--set", "ae_epochs=1"],
}
COMMON = ["--set", "val_size=20", "--batch-size", "40", "--device", "cpu", "--quiet"]
SAMPLES = ["--set", "samples_per_epoch=4"]  # not an option of the latent trainer


def _gray(n: int = 120, size: int = 16, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    images, labels = synthetic_images(n, seed, size)
    return images, labels % 3


def _rgb(n: int = 120, size: int = 16) -> tuple[np.ndarray, np.ndarray]:
    images, labels = _gray(n, size)
    return np.stack([images, 255 - images, images // 2], axis=1), labels  # (N, 3, H, W)


def _npz(path: Path, **arrays) -> Path:
    np.savez(path, **arrays)
    return path


def _png_folder(root: Path, images: np.ndarray, labels: np.ndarray) -> Path:
    """One subfolder per class ("class-a", ...), the images as PNG files."""
    for i, (image, label) in enumerate(zip(images, labels)):
        folder = root / f"class-{'abc'[label]}"
        folder.mkdir(parents=True, exist_ok=True)
        pixels = image if image.ndim == 2 else image.transpose(1, 2, 0)  # (3, H, W) -> (H, W, 3)
        Image.fromarray(pixels).save(folder / f"{i:03d}.png")
    return root


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread: these models are tiny, and on a busy machine a second thread waiting
    for a core makes each step ~50x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def datasets(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("own")
    x, y = _gray()
    return {
        "npz": _npz(root / "gray.npz", x=x, y=y),
        "png": _png_folder(root / "gray-png", x, y),
        "rgb": _npz(root / "rgb.npz", x=_rgb()[0], y=y),
    }


def _train(model: str, dataset: Path, out: Path, *extra: str) -> int:
    steps = "4" if model == "latent-realnvp" else "2"  # its autoencoder epoch (2 steps), then 2 flow steps
    samples = [] if model == "latent-realnvp" else SAMPLES
    return main(["train", model, "--dataset", str(dataset), "--max-steps", steps, "--out", str(out),
                 *TINY[model], *samples, *COMMON, *extra])


def _fails(capsys, code: int, argv_or_call, *fragments: str) -> str:
    result = argv_or_call() if callable(argv_or_call) else main(argv_or_call)
    err = capsys.readouterr().err
    assert result == code, err
    for fragment in fragments:
        assert fragment in err, err
    return err


def test_load_formats_splits_and_labels(datasets):
    images, labels = data.load(str(datasets["png"]), "train")
    test_images, test_labels = data.load(str(datasets["png"]), "test")
    assert images.shape == (108, 16, 16) and images.dtype == np.uint8 and test_images.shape == (12, 16, 16)
    assert set(labels) | set(test_labels) == {0, 1, 2}  # class-a, class-b, class-c
    assert len(set(labels[-20:])) == 3  # the validation images (the last 20) are of every class, not the last one

    def every_image(kind):  # both splits, each image with its label, in one order
        splits = [data.load(str(datasets[kind]), split) for split in ("train", "test")]
        rows = [np.append(image.ravel(), label) for images, labels in splits for image, label in zip(images, labels)]
        return np.array(sorted(rows, key=bytes))

    np.testing.assert_array_equal(every_image("npz"), every_image("png"))
    rgb, _ = data.load(str(datasets["rgb"]), "train")
    assert rgb.shape == (108, 3, 16, 16) and data.image_shape(rgb) == (3, 16, 16)
    assert data.short_name(str(datasets["npz"])) == "gray" and not data.is_path_dataset("mnist")


def test_the_fingerprint_follows_the_data_not_its_path(tmp_path):
    x, y = _gray(30)
    one_pixel = x.copy()
    one_pixel[7, 3, 4] ^= 1
    one_label = y.copy()
    one_label[7] = (y[7] + 1) % 3

    def fingerprint(path):
        return data.fingerprint(str(path))

    # .npz: the sha256 of the file's bytes (what sha256sum prints), wherever the file lies.
    npz = _npz(tmp_path / "d.npz", x=x, y=y)
    (tmp_path / "elsewhere").mkdir()
    copy = tmp_path / "elsewhere" / "other-name.npz"
    copy.write_bytes(npz.read_bytes())
    assert fingerprint(copy) == fingerprint(npz) == hashlib.sha256(npz.read_bytes()).hexdigest()
    # A PNG folder: its files' names (relative to it) and bytes; written twice, at two paths, alike.
    png = _png_folder(tmp_path / "png", x, y)
    assert fingerprint(_png_folder(tmp_path / "elsewhere" / "png-again", x, y)) == fingerprint(png)
    assert fingerprint(png) != fingerprint(npz)
    # One pixel or one label changed: another fingerprint, in either format.
    assert fingerprint(_npz(tmp_path / "pixel.npz", x=one_pixel, y=y)) != fingerprint(npz)
    assert fingerprint(_npz(tmp_path / "label.npz", x=x, y=one_label)) != fingerprint(npz)
    assert fingerprint(_png_folder(tmp_path / "png-pixel", one_pixel, y)) != fingerprint(png)
    assert fingerprint(_png_folder(tmp_path / "png-label", x, one_label)) != fingerprint(png)  # 007.png in another class folder


def test_npz_with_a_test_split_of_its_own(tmp_path):
    x, y = _gray(40)
    path = _npz(tmp_path / "d.npz", x=x[:30, None], y=y[:30], x_test=x[30:, None], y_test=y[30:])  # (N, 1, H, W)
    images, _ = data.load(str(path), "train")
    test_images, test_labels = data.load(str(path), "test")
    assert images.shape == (30, 16, 16)  # nothing held out
    np.testing.assert_array_equal(test_images, x[30:])
    np.testing.assert_array_equal(test_labels, y[30:])


# Learning rates at which 4 steps (2 epochs of 2 batches) fit these images clearly: the default
# ones are tuned for long MNIST runs (Glow's also warms up over 2,000 steps).
LEARN = {
    "nice": ["--set", "lr=0.05"],
    "realnvp": ["--set", "lr=0.01"],
    "glow": ["--set", "lr=0.01", "--set", "warmup_steps=0"],
    "latent-realnvp": ["--set", "lr=0.01", "--set", "ae_lr=0.01"],  # its autoencoder epoch, then 2 flow steps
}


def _at_step_zero(trained, payload):
    """The run's model as it started (the seed alone sets the initial weights), given the trained
    model's normalisation statistics: running means and variances move in training mode without
    any optimizer step, so what the model is better by after training is the optimizer's doing."""
    with torch.random.fork_rng():
        torch.manual_seed(payload.train["seed"])
        model = build_model(payload.model, payload.model_config)
    statistics = {k: v for k, v in trained.state_dict().items() if k.endswith(("running_mean", "running_var"))}
    model.load_state_dict(statistics, strict=False)
    return model.eval()


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("kind", ["npz", "png"])
def test_every_model_trains_on_both_formats(model, kind, datasets, tmp_path):
    run = tmp_path / "run"
    assert _train(model, datasets[kind], run, "--max-steps", "4", *LEARN[model]) == 0
    config = json.loads((run / "config.json").read_text())
    assert config["train"]["dataset"] == str(datasets[kind].resolve())
    assert config["dataset_sha256"] == data.fingerprint(str(datasets[kind]))
    shape_option = {"nice": "image_shape", "realnvp": "image_shape", "glow": "image_shape", "latent-realnvp": "image_size"}
    assert config["model_config"][shape_option[model]] in ([1, 16, 16], 16)  # followed the data
    assert checkpoint.load(run / "last.pt").step == 4

    # It learned: the validation score it logged for its last epoch (that of last.pt) is clearly
    # better than the same model's at step 0 on the same 20 validation images.
    logged = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    trained, payload = checkpoint.load_model(run / "last.pt")
    start = _at_step_zero(trained, payload)
    val_images, val_labels = data.load_split(str(datasets[kind]), "val", 20)
    if model != "latent-realnvp":
        labels = val_labels if trained.conditional else None
        final = logged[-1]["val_bpd"]
        assert bits_per_dim(trained, val_images, seed=payload.train["seed"], labels=labels) == pytest.approx(final, abs=1e-4)
        before = bits_per_dim(start, val_images, seed=payload.train["seed"], labels=labels)
        # Measured: 0.30 (NICE), 1.33-1.36 (Real NVP), 0.53-0.54 (Glow) bits/dim below; 0 with the optimizer's step a no-op.
        assert final < before - 0.1, (model, before, [m["val_bpd"] for m in logged])
    else:  # no pixel density: the autoencoder's BCE, then the flow's NLL of the trained encoder's embeddings
        pixels = torch.as_tensor(val_images).unsqueeze(1).float() / 255
        y = torch.as_tensor(val_labels).long() if trained.conditional else None
        with torch.no_grad():
            bce_before = float(start.autoencoder.loss(pixels))
            start.autoencoder.load_state_dict(trained.autoencoder.state_dict())
            nll_before = float(-start.embedding_log_prob(trained.autoencoder.encode(pixels), y).mean())
        bce = [m["val_bce"] for m in logged if m["stage"] == "autoencoder"][-1]
        nll = [m["val_nll"] for m in logged if m["stage"] == "flow"][-1]
        # Measured: 37-40 nats below in BCE, 2.6-3.9 nats in NLL; 0 in each with its optimizer's step a no-op.
        assert bce < bce_before - 10, (bce_before, bce)
        assert nll < nll_before - 1, (nll_before, nll)


@pytest.mark.parametrize("model", ["nice", "realnvp", "glow"])
def test_image_flows_train_on_rgb_and_evaluate_on_its_test_split(model, datasets, tmp_path, capsys):
    run = tmp_path / "run"
    assert _train(model, datasets["rgb"], run) == 0
    trained, _ = checkpoint.load_model(run)
    assert tuple(trained.event_shape) == (3, 16, 16) and trained.sample(2).shape == (2, 3, 16, 16)
    assert main(["eval", str(run), "--samples", "4", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    result = json.loads((run / "eval.json").read_text())["test"]
    assert result["num_images"] == 12 and result["dimensions"] == 768 and result["dataset"] == str(datasets["rgb"].resolve())
    assert "there is none for" in result["sample_quality"]["skipped"] and "sample quality skipped" in out


def test_the_report_names_the_dataset(datasets, tmp_path):
    run, report = tmp_path / "run", tmp_path / "report"
    assert _train("realnvp", datasets["rgb"], run) == 0
    assert main(["compare", str(run), "--out", str(report), "--samples", "0", "--draws", "1", "--device", "cpu"]) == 0
    assert str(datasets["rgb"].resolve()) in (report / "report.md").read_text()


def test_latent_model_refuses_colour_images(datasets, tmp_path, capsys):
    _fails(capsys, 2, lambda: _train("latent-realnvp", datasets["rgb"], tmp_path / "run"),
           "latent-realnvp on the 3x16x16 images of", "its autoencoder takes square grayscale images")
    assert not (tmp_path / "run").exists()


def test_sides_the_model_cannot_squeeze(tmp_path, capsys):
    x, y = _gray(size=18)
    dataset = _npz(tmp_path / "d18.npz", x=x, y=y)
    for model, option in (("realnvp", "scales"), ("glow", "levels")):
        _fails(capsys, 2, lambda: _train(model, dataset, tmp_path / "run"), f"{model} on the 1x18x18 images of {dataset}",
               f"image sides must divide by 2^2 = 4 for {option}=2", f"found 18x18; lower {option} to 1")
    _fails(capsys, 2, lambda: _train("glow", dataset, tmp_path / "run", "--set", "image_shape=1,16,16"),
           "image_shape=(1, 16, 16) does not fit them, they need (1, 18, 18); leave image_shape unset")
    assert not (tmp_path / "run").exists()
    assert _train("realnvp", dataset, tmp_path / "run", "--set", "scales=1") == 0


def test_mixed_image_sizes(tmp_path, capsys):
    x, y = _gray(30)
    folder = _png_folder(tmp_path / "mixed", x, y)
    Image.fromarray(np.zeros((18, 18), np.uint8)).save(folder / "class-b" / "odd.png")
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(folder / "class-c" / "rgb.png")
    first = sorted((folder / "class-a").iterdir())[0].name
    _fails(capsys, 1, lambda: _train("nice", folder, tmp_path / "run"),
           f"mixed image sizes: class-a/{first} is 16x16 grayscale, class-b/odd.png is 18x18 grayscale")
    x_test = _rgb(10)[0]
    _fails(capsys, 1, lambda: _train("nice", _npz(tmp_path / "m.npz", x=x, x_test=x_test), tmp_path / "run"),
           "mixed image sizes: x holds 16x16 grayscale images, x_test holds 16x16 RGB ones")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("arrays, fragment", [
    ({"x": np.zeros((120, 16, 16), np.float32)}, "x: expected uint8 pixels (0-255), found float32"),
    ({"x": np.zeros((120, 2, 16, 16), np.uint8)}, "or (N, 3, H, W), found (120, 2, 16, 16)"),
    ({"x": np.zeros((120, 16, 16), np.uint8), "y": np.zeros(120, np.float64)}, "y: expected integer labels of shape (120,)"),
    ({"x": np.zeros((120, 16, 16), np.uint8), "labels": np.zeros(120, np.int64)}, "found unexpected array 'labels'"),
    ({"images": np.zeros((120, 16, 16), np.uint8)}, "expected an array 'x'"),
    ({"x": np.zeros((120, 16, 16), np.uint8), "y": np.zeros(120, np.int64), "x_test": np.zeros((9, 16, 16), np.uint8)},
     "expected y_test only beside x_test, and labels for both splits or for neither"),
])
def test_malformed_npz(arrays, fragment, tmp_path, capsys):
    dataset = _npz(tmp_path / "bad.npz", **arrays)
    _fails(capsys, 1, lambda: _train("nice", dataset, tmp_path / "run"), f"{dataset}", fragment)
    assert not (tmp_path / "run").exists()


def test_not_an_npz_archive(tmp_path, capsys):
    dataset = tmp_path / "bad.npz"
    dataset.write_bytes(b"not a zip archive")
    _fails(capsys, 1, lambda: _train("nice", dataset, tmp_path / "run"), f"cannot read {dataset} as a .npz archive")


def test_non_image_files_in_a_png_folder(tmp_path, capsys):
    x, y = _gray(30)
    folder = _png_folder(tmp_path / "pngs", x, y)
    (folder / "class-a" / ".DS_Store").write_bytes(b"hidden files are left out")
    (folder / "class-b" / "notes.txt").write_text("not an image")
    _fails(capsys, 1, lambda: _train("nice", folder, tmp_path / "run"),
           f"{folder / 'class-b' / 'notes.txt'} is not a PNG file; expected only .png files")
    (folder / "class-b" / "notes.txt").unlink()
    (folder / "class-c" / "broken.png").write_bytes(b"\x89PNG but not really")
    _fails(capsys, 1, lambda: _train("nice", folder, tmp_path / "run"),
           f"{folder / 'class-c' / 'broken.png'}: not a readable PNG")
    (folder / "class-c" / "broken.png").unlink()
    Image.fromarray(np.zeros((16, 16, 4), np.uint8)).save(folder / "class-c" / "alpha.png")
    _fails(capsys, 1, lambda: _train("nice", folder, tmp_path / "run"),
           f"{folder / 'class-c' / 'alpha.png'}: expected an 8-bit grayscale or RGB PNG, found mode RGBA")
    (folder / "class-c" / "alpha.png").unlink()
    Image.fromarray(np.zeros((16, 16), np.uint8)).save(folder / "loose.png")
    _fails(capsys, 1, lambda: _train("nice", folder, tmp_path / "run"),
           "expected PNG files, or one subfolder of PNG files per class, found both")
    assert not (tmp_path / "run").exists()


def test_too_few_images(tmp_path, capsys):
    x, y = _gray(50)
    _fails(capsys, 1, lambda: _train("nice", _npz(tmp_path / "few.npz", x=x, y=y), tmp_path / "run"),
           "found 45 images besides the test split, needed at least 60 (val_size=20 for validation plus one batch "
           "of batch_size=40)")
    _fails(capsys, 1, lambda: _train("nice", _npz(tmp_path / "nine.npz", x=x[:9]), tmp_path / "run"),
           "found 9 images, needed at least 10 (a tenth of them is held out as the test split)")
    assert not (tmp_path / "run").exists()


def test_unknown_path_is_a_usage_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        main(["train", "nice", "--dataset", str(tmp_path / "missing.npz")])
    err = capsys.readouterr().err
    assert info.value.code == 2 and f"argument --dataset: invalid choice: '{tmp_path / 'missing.npz'}'" in err
    assert "or give the path of a .npz file or of a folder of PNG images" in err


def test_resume_refuses_a_changed_dataset(tmp_path, capsys):
    x, y = _gray()
    dataset, run = _npz(tmp_path / "d.npz", x=x, y=y), tmp_path / "run"
    assert _train("nice", dataset, run) == 0
    assert _train("nice", dataset, run, "--resume", "--max-steps", "3") == 0  # unchanged: continues
    x[0, 0, 0] ^= 1
    _npz(dataset, x=x, y=y)
    _fails(capsys, 2, lambda: _train("nice", dataset, run, "--resume", "--max-steps", "4"),
           f"--resume: {dataset} has changed since {run} started training on it")
    assert checkpoint.load(run / "last.pt").step == 3


@pytest.mark.parametrize("count, val_size, batch_size", [(300, 27, 200), (50, 4, 41)])
def test_a_small_dataset_trains_with_the_defaults(count, val_size, batch_size, tmp_path):
    """No --set: a tenth of the images besides the test split validates, and a batch is cut to
    what is left to train on (NICE size=small trains in batches of 200)."""
    x, y = _gray(count)
    run = tmp_path / "run"
    argv = ["train", "nice", "--dataset", str(_npz(tmp_path / "d.npz", x=x, y=y)), "--set", "size=small",
            "--max-steps", "1", "--out", str(run), "--device", "cpu", "--quiet"]
    assert main(argv) == 0
    train = json.loads((run / "config.json").read_text())["train"]
    assert (train["val_size"], train["batch_size"]) == (val_size, batch_size)
    assert json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])["step"] == 1


def test_the_validation_default_is_capped_at_mnist_s_ten_thousand(tmp_path, monkeypatch):
    from couplings.config import PixelTrainConfig
    from couplings.training import run as run_module

    monkeypatch.setattr(run_module.data, "load", lambda *a, **k: (np.zeros((150_000, 1, 2, 2), np.uint8), None))
    cfg = PixelTrainConfig(dataset="big.npz")
    run_module._fit_to_own_data(cfg, {}, None)
    assert (cfg.val_size, cfg.batch_size) == (10_000, PixelTrainConfig.batch_size)
    cfg = PixelTrainConfig(dataset="big.npz", val_size=500)
    run_module._fit_to_own_data(cfg, {"val_size": 500}, None)  # what is given stays
    assert cfg.val_size == 500
