"""Collecting what the report says about each run: its evaluation (reused from ``eval.json``
when current), dequantization spread, timings, out-of-distribution scores and figures."""

from __future__ import annotations

import json
import math
import multiprocessing
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch

from couplings import checkpoint, data
from couplings.evaluation import Evaluation, evaluate_checkpoint
from couplings.files import atomic_write
from couplings.likelihood import dequantize, log_probs, nats_to_bits_per_dim
from couplings.report.figures import sample_figures
from couplings.rundir import RunDir
from couplings.sampling import sample_labels

__all__ = ["OOD_COUNTERPART", "Report", "RunSummary", "as_run_directory", "evaluate_in_parallel", "summarize_run"]

OOD_COUNTERPART = {"mnist": "fashion-mnist", "fashion-mnist": "mnist"}
# Training options that may differ between runs of one row (the seed, and budgets that only
# say how long a run was allowed to go on).
_NOT_RECIPE = ("seed", "epochs", "max_steps", "max_minutes")


@dataclass
class RunSummary:
    """Everything the report says about one run."""

    name: str
    path: Path
    config: dict  # config.json
    history: list[dict]  # metrics.jsonl
    result: Evaluation  # the run's eval.json["test"], with the dequantization draws added
    seconds_per_64: dict[str, float]  # "sampling" and "inference", on the report's device
    ood: dict | None = None  # per-image bits/dim in and out of distribution
    figures: dict[str, Path] = field(default_factory=dict)
    pretrained: str | None = None  # the shipped model's name, for a pretrained:NAME run

    @property
    def has_pixel_density(self) -> bool:
        return self.result.has_pixel_density

    def group_key(self) -> str:
        """Runs with the same key are seeds of one recipe; a shipped model is a row of its own."""
        recipe = {k: v for k, v in self.config.get("train", {}).items() if k not in _NOT_RECIPE}
        return json.dumps([self.config["model"], self.config.get("model_config"), recipe, self.pretrained], sort_keys=True)


@dataclass
class Report:
    runs: list[RunSummary]
    headers: list[str]
    rows: list[list[str]]
    directory: Path


PRETRAINED_PREFIX = "pretrained:"


def as_run_directory(run: str | Path, out: Path) -> Path:
    """``run`` itself, or for ``pretrained:NAME`` a run directory ``out/pretrained-NAME`` that
    holds a copy of that shipped model as its ``best.pt``, so that the report evaluates it on the
    same images with the same settings as the runs beside it."""
    if not str(run).startswith(PRETRAINED_PREFIX):
        return Path(run)
    name = str(run).removeprefix(PRETRAINED_PREFIX)
    source = checkpoint.pretrained_path(name)  # CheckpointError naming the models there are
    payload = checkpoint.load(source)
    directory = RunDir(out / f"pretrained-{name}")
    directory.path.mkdir(parents=True, exist_ok=True)
    if not directory.best.is_file() or directory.best.read_bytes() != source.read_bytes():
        atomic_write(directory.best, source.read_bytes())
        directory.write_config(payload.description())
    return directory.path


def _eval_is_current(entry: Evaluation | None, run: Path, samples: int, test_images: int | None) -> bool:
    """A stored test evaluation counts if it scored this run's checkpoint, after the checkpoint
    was last written, on as many test images and with as many samples as asked for."""
    if not entry:
        return False
    ckpt = checkpoint.resolve(run)
    eval_file = run / RunDir.EVAL
    quality = entry.sample_quality or {}
    drawn = quality.get("num_samples", 0) if "fid" in quality else 0
    return (
        Path(entry.checkpoint or "").resolve() == ckpt.resolve()
        and eval_file.stat().st_mtime >= ckpt.stat().st_mtime
        and entry.image_limit == test_images
        and (drawn == samples or (samples == 0 and entry.sample_quality is None) or "skipped" in quality)
    )


def _evaluated(run: Path, *, samples: int, draws: int, test_images: int | None, device: torch.device,
               progress: bool = False) -> Evaluation:
    """The run's test evaluation with its ``draws`` dequantization draws of bits/dim: read from
    its ``eval.json`` when current, otherwise computed and stored there."""
    run_dir = RunDir(run)
    result = run_dir.read_eval().get("test")
    if not _eval_is_current(result, run, samples, test_images):
        _log(f"evaluating {run} on the test set ({samples} samples)")
        result = evaluate_checkpoint(run, samples=samples, num_images=test_images, device=device, progress=progress)
    if result.has_pixel_density and draws == 1:
        result.bits_per_dim_draws = [result.bits_per_dim]
    elif result.has_pixel_density and len(result.bits_per_dim_draws or []) < draws:
        _log(f"{run}: test bits/dim under {draws} dequantization draws")
        model, _ = checkpoint.load_model(run, device)
        images, labels = _test_images(result)
        result.bits_per_dim_draws = [
            result.bits_per_dim if seed == 0 else
            nats_to_bits_per_dim(float(log_probs(model, images, seed=seed, labels=labels if model.conditional else None)
                                       .mean()), result.dimensions)
            for seed in range(draws)
        ]
    run_dir.update_eval("test", result)
    return result


def _test_images(result: Evaluation):
    """The test images (and labels) that ``result`` scored."""
    images, labels = data.load(result.dataset, "test")
    return images[: result.num_images], labels[: result.num_images]


def _evaluate_in_worker(run: str, samples: int, draws: int, test_images: int | None, threads: int) -> None:
    torch.set_num_threads(threads)
    _evaluated(Path(run), samples=samples, draws=draws, test_images=test_images, device=torch.device("cpu"))


def evaluate_in_parallel(runs: list[Path], jobs: int, *, samples: int, draws: int, test_images: int | None) -> None:
    """Evaluates on the CPU the runs whose ``eval.json`` is not current, ``jobs`` at a time, each in
    a fresh process with its share of this process's threads; `summarize_run` then reads them."""
    if jobs < 2:
        return
    runs = list(dict.fromkeys(Path(run) for run in runs))
    stale = [run for run in runs if not _eval_is_current(RunDir(run).read_eval().get("test"), run, samples, test_images)]
    if len(stale) < 2:
        return
    threads = max(1, torch.get_num_threads() // jobs)
    _log(f"evaluating {len(stale)} runs, {jobs} at a time on {threads} thread(s) each")
    # spawn, not fork: a forked child of a process whose OpenMP threads have run can hang.
    with ProcessPoolExecutor(max_workers=jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = [pool.submit(_evaluate_in_worker, str(run), samples, draws, test_images, threads) for run in stale]
        for future in futures:
            future.result()  # an evaluation's error is raised here


@torch.inference_mode()
def _seconds_per_64(fn, repeats: int = 5) -> float:
    """Median wall-clock of ``fn`` after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _log(message: str) -> None:
    print(f"compare: {message}", file=sys.stderr)


def summarize_run(
    run: Path,
    out: Path,
    index: int,
    *,
    samples: int,
    draws: int,
    device: torch.device,
    test_images: int | None = None,
    ood_dataset: str | None = None,
    ood_images: int | None = None,
    progress: bool = False,
) -> RunSummary:
    """Evaluates one run (or reuses its current ``eval.json``), times it on ``device`` and draws
    its figures into ``out``."""
    run, run_dir = Path(run), RunDir(run)
    if not (run / RunDir.CONFIG).is_file():
        raise FileNotFoundError(f"{run} has no {RunDir.CONFIG}; expected a run directory written by 'couplings train'")
    config = run_dir.read_config()
    result = _evaluated(run, samples=samples, draws=draws, test_images=test_images, device=device, progress=progress)
    model, _ = checkpoint.load_model(run, device)
    images, labels = _test_images(result)

    _log(f"{run}: timings and figures")
    x = torch.as_tensor(data.with_channels(images[:64])).to(device)  # (64, C, H, W) uint8
    x = dequantize(x, torch.Generator(device=device).manual_seed(0), model.prior.dtype)
    y = torch.as_tensor(labels[:64]).long().to(device) if model.conditional else None
    generator = torch.Generator(device=device).manual_seed(0)
    timing = {
        "sampling": _seconds_per_64(lambda: model.sample(64, sample_labels(model, 64), generator=generator)),
        "inference": _seconds_per_64(lambda: model.log_prob(x, y)),
    }
    summary = RunSummary(run.name, run, config, run_dir.read_metrics(), result, timing)
    summary.figures = sample_figures(model, summary, images, out, index, device)
    other = ood_dataset or OOD_COUNTERPART.get(result.dataset)
    if summary.has_pixel_density and other and not model.conditional:  # p(x | y) needs labels the other set lacks
        summary.ood = _ood_bits_per_dim(model, result.dataset, other, ood_images)
    return summary


def _ood_bits_per_dim(model, dataset: str, ood_dataset: str, n: int | None) -> dict:
    """Per-image test bits/dim of ``model`` on its own dataset and on another one."""
    out = {"dataset": dataset, "ood_dataset": ood_dataset}
    for key, name in (("in", dataset), ("out", ood_dataset)):
        images, _ = data.load(name, "test")
        images = images[:n] if n else images
        dim = math.prod(images.shape[1:])
        out[key] = [nats_to_bits_per_dim(v, dim) for v in log_probs(model, images).tolist()]
    return out

