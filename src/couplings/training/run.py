"""Starting a run: planning a new or resumed run (every check, nothing written), then `train`,
which holds the run directory's lock and hands the run to its model's trainer."""

from __future__ import annotations

import importlib
import json
import os
import sys
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch

from couplings import checkpoint, data, distributed
from couplings.checkpoint import Checkpoint
from couplings.config import (
    ConfigError,
    TrainConfig,
    apply_overrides,
    format_value,
    from_stored,
)
from couplings.files import WriteError
from couplings.hardware import describe, resolve_device
from couplings.models import MODELS, Flow, build_model
from couplings.rundir import RunDir
from couplings.tensorboard import TensorBoard, check_available
from couplings.training.errors import TrainingError
from couplings.training.faults import (
    FaultCounter,
    NumericalFault,
    roll_back,
    set_rng_states,
)
from couplings.training.loop import Budget, Console, Context, TrainState
from couplings.training.pixel import probe_precision
from couplings.transforms.base import set_share_mean

__all__ = ["RESUMABLE_OPTIONS", "RunPlan", "plan_run", "run_plan", "train"]

# Options that may change when a run is resumed; the rest define the run and stay fixed.
RESUMABLE_OPTIONS = ("epochs", "max_steps", "max_minutes", "target_bpd", "checkpoint_every", "max_bad_steps", "max_rollbacks",
                     "rollback_lr_factor", "compile", "precision", "channels_last", "adam")


@dataclass
class RunPlan:
    """A checked run, ready to train: what it is, its options, its data, and the checkpoint it
    resumes from."""

    model: str
    size: str
    model_config: dict[str, Any]
    cfg: TrainConfig
    run_dir: RunDir
    state: Checkpoint | None  # last.pt of a resumed run
    model_object: Flow  # built (new run) or loaded from last.pt (resumed run)
    train_data: tuple[np.ndarray, np.ndarray] | None = None
    val_data: tuple[np.ndarray, np.ndarray] | None = None
    note: str | None = None  # a line for stderr when training starts
    dataset_sha256: str | None = None  # a dataset of one's own: `couplings.data.fingerprint`

    def record(self) -> dict[str, Any]:
        """config.json's content, without the hardware."""
        own = {"dataset_sha256": self.dataset_sha256} if self.dataset_sha256 else {}
        return {"model": self.model, "size": self.size, "model_config": self.model_config, "train": asdict(self.cfg), **own}


def plan_run(
    model_name: str,
    out: str | os.PathLike,
    *,
    train_overrides: dict[str, Any] | None = None,
    model_overrides: dict[str, Any] | None = None,
    size: str | None = None,
    resume: bool = False,
    data_root: str | os.PathLike | None = None,
) -> RunPlan:
    """Checks everything about a run that can be checked before training, loads its data, and
    writes nothing.

    Raises:
        ConfigError: An unknown model, size or dataset; an option this model's trainer does not
            support (named with the model); a value out of range; with ``resume``, a change to
            an option that defines the run.
        TrainingError: ``out`` is not empty (without ``resume``), or has no ``last.pt`` (with it).
        CheckpointError: ``last.pt`` is unreadable or does not fit its model.
        DatasetError: The dataset's files are missing or damaged, or a dataset of one's own has
            too few images for the validation split and a batch.

    For a dataset of one's own (`couplings.data.is_path_dataset`), the model's image-size
    options that were not given follow the data (`couplings.models.ModelEntry.shape_options`).
    """
    if model_name not in MODELS:
        raise ConfigError(f"unknown model {model_name!r}; expected one of {sorted(MODELS)}")
    entry = MODELS[model_name]
    train_overrides, model_overrides = dict(train_overrides or {}), dict(model_overrides or {})
    supported = {f.name for f in fields(entry.train_config)}
    unsupported = sorted(set(train_overrides) - supported)
    if unsupported:
        raise ConfigError(
            f"{', '.join(unsupported)}: not an option of {model_name} (its trainer, couplings.training.{entry.trainer}, "
            f"does not read {'it' if len(unsupported) == 1 else 'them'})"
        )
    if data.is_path_dataset(train_overrides.get("dataset")):  # the same run, from whichever directory
        train_overrides["dataset"] = str(Path(train_overrides["dataset"]).resolve())
    run_dir = RunDir(out)
    plan = _resumed(model_name, run_dir, size, model_overrides, train_overrides, data_root) if resume else \
        _new(model_name, run_dir, size, model_overrides, train_overrides, data_root=data_root)
    cfg = plan.cfg
    if cfg.batch_size % distributed.world_size():
        raise ConfigError(f"batch_size {cfg.batch_size} must be a multiple of the {distributed.world_size()} processes "
                          "(it is the global batch; each process trains on an equal share of it)")
    if getattr(cfg, "discriminative_weight", 0) and not plan.model_object.conditional:
        raise ConfigError(f"discriminative_weight needs a class-conditional model (it trains the model's own classifier "
                          f"p(c | x)); this {model_name} is not: set num_classes")
    if cfg.dataset not in data.DATASETS and not data.is_path_dataset(cfg.dataset):
        raise ConfigError(f"dataset must be one of {sorted(data.DATASETS)} or {data.OWN_DATASET}, found {cfg.dataset!r}")
    if data.is_path_dataset(cfg.dataset):
        _check_own_dataset(plan)
    plan.train_data = data.load_split(cfg.dataset, "train", cfg.val_size, data_root)
    plan.val_data = data.load_split(cfg.dataset, "val", cfg.val_size, data_root)
    image_shape, event_shape = data.image_shape(plan.train_data[0]), tuple(plan.model_object.event_shape)
    if event_shape != image_shape:
        raise ConfigError(f"{model_name} models images of shape {event_shape}, "
                          f"but {cfg.dataset} images have shape {image_shape}")
    _check_labels(plan)
    return plan


def _check_own_dataset(plan: RunPlan) -> None:
    """A dataset of one's own holds the validation images and a batch besides; a resumed run
    finds the bytes it started on (its sha256 is in config.json)."""
    cfg = plan.cfg
    found, needed = len(data.load(cfg.dataset, "train")[0]), cfg.val_size + cfg.batch_size
    if found < needed:
        raise data.DatasetError(f"{cfg.dataset}: found {found} images besides the test split, needed at least {needed} "
                                f"(val_size={cfg.val_size} for validation plus one batch of batch_size={cfg.batch_size}); "
                                "add images or lower val_size or batch_size")
    plan.dataset_sha256 = data.fingerprint(cfg.dataset)
    try:
        started_on = plan.run_dir.read_config().get("dataset_sha256") if plan.state is not None else None
    except (OSError, ValueError):  # a resume needs the checkpoint, not config.json; without it there is nothing to compare
        started_on = None
    if started_on and started_on != plan.dataset_sha256:
        raise ConfigError(f"--resume: {cfg.dataset} has changed since {plan.run_dir.path} started training on it "
                          f"(sha256 {started_on}, now {plan.dataset_sha256}); restore it, or train a new run on it")


# A dataset of one's own validates on a tenth of its training images, at most MNIST's 10,000.
OWN_VAL_FRACTION, OWN_VAL_MAX = 10, 10_000


def _fit_to_own_data(cfg: TrainConfig, given: dict, data_root) -> None:
    """The defaults of ``val_size`` and ``batch_size`` are MNIST's; for a dataset of one's own,
    those not given follow its size: a tenth of the images validates (at most 10,000), and a
    batch is no larger than what is left to train on."""
    found = len(data.load(cfg.dataset, "train", data_root)[0])
    if "val_size" not in given:
        cfg.val_size = max(1, min(OWN_VAL_MAX, found // OWN_VAL_FRACTION))
    if "batch_size" not in given:
        processes = distributed.world_size()
        cfg.batch_size = max(processes, min(cfg.batch_size, (found - cfg.val_size) // processes * processes))


def _check_labels(plan: RunPlan) -> None:
    """A class-conditional model has a class for every label of the data."""
    model = plan.model_object
    labels = [int(split[1].max()) for split in (plan.train_data, plan.val_data) if len(split[1])]
    if model.conditional and labels and max(labels) >= model.num_classes:
        raise ConfigError(f"{plan.cfg.dataset} has labels up to {max(labels)}, but this {plan.model} has "
                          f"num_classes={model.num_classes}; --set num_classes={max(labels) + 1}")


def _model_config(model_name: str, cfg: TrainConfig, preset: dict, given: dict, data_root) -> Any:
    """The model's config: its preset, then for a dataset of one's own the options that fit the
    model to its images (`couplings.models.ModelEntry.shape_options`), then what was given."""
    entry = MODELS[model_name]
    if not data.is_path_dataset(cfg.dataset):
        return apply_overrides(entry.config(), {**preset, **given})
    shape = data.image_shape(data.load(cfg.dataset, "train", data_root)[0])
    where = f"{model_name} on the {'x'.join(map(str, shape))} images of {cfg.dataset}"
    try:
        fitted = entry.shape_options(shape)
        misfit = next((k for k, v in fitted.items() if k in given and given[k] != v), None)
        if misfit:
            raise ValueError(f"{misfit}={given[misfit]} does not fit them, they need {fitted[misfit]}; "
                             f"leave {misfit} unset and it follows the data")
        return apply_overrides(entry.config(), {**preset, **fitted, **given})
    except (ConfigError, ValueError) as e:
        raise ConfigError(f"{where}: {e}") from None


def _new(model_name: str, run_dir: RunDir, size: str | None, model_overrides: dict, train_overrides: dict,
         restart: bool = False, data_root=None) -> RunPlan:
    entry = MODELS[model_name]
    if not restart and not run_dir.is_empty():
        raise TrainingError(f"{run_dir.path} already exists and is not empty; pass --resume to continue it or choose another --out")
    size = size or next(iter(entry.presets))  # the first preset is the default (for most models the paper's size)
    if size not in entry.presets:
        raise ConfigError(f"size must be one of {sorted(entry.presets)} for {model_name}, found {size!r}")
    preset_model, preset_train = entry.preset(size)
    cfg = apply_overrides(entry.train_config(), {**preset_train, **train_overrides})  # what is given wins
    if data.is_path_dataset(cfg.dataset):
        _fit_to_own_data(cfg, {**preset_train, **train_overrides}, data_root)
    model_config = asdict(_model_config(model_name, cfg, preset_model, model_overrides, data_root))
    torch.manual_seed(cfg.seed)  # the initial weights depend on the seed alone
    model = build_model(model_name, model_config)
    if getattr(cfg, "init_from", None):
        _load_initial_weights(model_name, model_config, model, cfg.init_from)
    return RunPlan(model_name, size, model_config, cfg, run_dir, None, model)


# Model options that may differ from an init_from source: they only add layers that start at zero
# (so the new run starts from the source's function), under these module names.
ADDED_FROM_ZERO = ("class_loss_weight",)
ADDED_FROM_ZERO_MODULES = ("classifier.",)


def _load_initial_weights(model_name: str, model_config: dict, model: Flow, source: str) -> None:
    """Loads the weights named by option ``init_from`` (a checkpoint, a run directory or
    ``pretrained:NAME``; the Polyak averages where it kept them) into a new run's model, which
    must have the model options they were trained with."""
    name = source.removeprefix("pretrained:")
    try:
        payload = checkpoint.load(checkpoint.pretrained_path(name) if name != source else source)
    except checkpoint.CheckpointError as e:
        raise ConfigError(f"init_from={source}: {e}") from None
    if payload.model != model_name:
        raise ConfigError(f"init_from={source}: it holds a {payload.model!r} model, not a {model_name!r} one")
    ours, theirs = (json.loads(json.dumps(c)) for c in (model_config, payload.model_config))  # tuples as lists
    differ = [f"{k}={format_value(ours[k])} (it has {format_value(v)})"
              for k, v in theirs.items() if k in ours and ours[k] != v and k not in ADDED_FROM_ZERO]
    if differ:  # an option it lacks was added to couplings after it was trained, at its default
        raise ConfigError(f"init_from={source}: a model with other options; {', '.join(differ)}")
    try:  # shapes must match; of the names, only the layers that start at zero may be on one side alone
        loaded = model.load_state_dict(payload.weights(), strict=False)
    except RuntimeError as e:
        raise ConfigError(f"init_from={source}: its weights do not fit this {model_name}: "
                          f"{checkpoint.first_mismatch(e)}") from None
    for side, names in (("lacks", loaded.missing_keys), ("has an unknown", loaded.unexpected_keys)):
        unfit = [k for k in names if not k.startswith(ADDED_FROM_ZERO_MODULES)]
        if unfit:
            raise ConfigError(f"init_from={source}: its weights do not fit this {model_name}: it {side} {unfit[0]}")


def _resumed(model_name: str, run_dir: RunDir, size: str | None, model_overrides: dict, train_overrides: dict,
             data_root=None) -> RunPlan:
    if not run_dir.checkpoints() and run_dir.never_checkpointed():  # killed before its step-0 checkpoint
        plan = _new(model_name, run_dir, size, model_overrides, train_overrides, restart=True, data_root=data_root)
        plan.note = f"warning: {run_dir.path} stopped before its first checkpoint; starting it from the beginning"
        return plan
    _, state, _ = run_dir.newest_intact()  # readable, verified, and its weights fit the model it names
    model = build_model(state.model, state.model_config)  # its weights are loaded when training starts
    if state.model != model_name:
        raise ConfigError(f"--resume: expected a {model_name!r} run in {run_dir.path}, found a {state.model!r} run")
    stored = from_stored(MODELS[model_name].train_config, state.train)
    changed = [k for k, v in model_overrides.items() if state.model_config.get(k) != v]
    changed += [k for k, v in train_overrides.items() if k not in RESUMABLE_OPTIONS and getattr(stored, k) != v]
    if size is not None and size != state.size:
        changed.insert(0, "size")
    if changed:
        raise ConfigError(
            f"cannot change {', '.join(changed)} when resuming; only {', '.join(RESUMABLE_OPTIONS)} may change"
        )
    trained_on, now = state.world_size, distributed.world_size()
    if trained_on != now:  # each rank's share of a batch, so the float rounding and batch-norm statistics, would change
        launch = f"torchrun --nproc_per_node {trained_on}" if trained_on > 1 else "one process, without torchrun"
        raise ConfigError(f"--resume: {run_dir.path} was trained on {trained_on} process(es), not {now}; "
                          f"resume it the same way ({launch}) to continue it exactly")
    # A time budget belongs to one invocation: a resumed run has none unless given again.
    resumable = {k: v for k, v in train_overrides.items() if k in RESUMABLE_OPTIONS}
    cfg = apply_overrides(stored, {"max_minutes": None, **resumable})
    return RunPlan(model_name, state.size, state.model_config, cfg, run_dir, state, model)


def train(
    model_name: str,
    out: str | os.PathLike,
    *,
    train_overrides: dict[str, Any] | None = None,
    model_overrides: dict[str, Any] | None = None,
    size: str | None = None,
    device: str = "auto",
    resume: bool = False,
    data_root=None,
    progress: bool = True,
    tensorboard: bool = False,
) -> Path:
    """Trains ``model_name`` into run directory ``out`` and returns ``out``.

    The run directory (`couplings.rundir.RunDir`) gets ``config.json``, ``last.pt`` and
    ``best.pt``, ``metrics.jsonl`` and ``samples/``. ``last.pt`` is written at step 0, after
    every epoch and every ``checkpoint_every`` steps; ``resume=True`` continues from it exactly,
    mid-epoch included. While training, the directory is locked: a second ``train`` into it is
    refused (`couplings.rundir.RunDirBusy`).

    Training stops after ``epochs`` epochs, or earlier at ``max_steps`` optimizer steps or
    ``max_minutes`` of wall-clock; a stopped epoch is validated and checkpointed like a full one.
    SIGINT and SIGTERM stop it the same way and then raise `StoppedBySignal`.

    A step whose loss or gradient is not finite is skipped; after ``max_bad_steps`` in a row,
    training rolls back to ``last.pt`` with the learning rate times ``rollback_lr_factor``
    (at most ``max_rollbacks`` times) and then raises `TrainingError` naming the step and layer.

    Raises:
        ConfigError, TrainingError, CheckpointError, DatasetError: As `plan_run`, before anything
            is written.
    """
    plan = plan_run(model_name, out, train_overrides=train_overrides, model_overrides=model_overrides, size=size,
                    resume=resume, data_root=data_root)
    return run_plan(plan, device=device, progress=progress, tensorboard=tensorboard)


def run_plan(plan: RunPlan, *, device: str = "auto", progress: bool = True, tensorboard: bool = False) -> Path:
    """Trains a run that `plan_run` checked (see `train`; ``tensorboard``: also log to
    ``RUN/tensorboard/``, `couplings.tensorboard`); returns its directory."""
    if tensorboard:
        check_available()
    dev = distributed.device_for(resolve_device(device))
    run_dir = plan.run_dir
    run_dir.writer = distributed.is_main()
    joined = distributed.start(dev)  # under torchrun: returns once every rank has planned the run
    if distributed.world_size() > 1:  # ActNorm's start: the statistics of the global batch
        set_share_mean(distributed.mean_over_ranks)
    try:
        with run_dir.lock():
            if plan.note and run_dir.writer:
                print(plan.note, file=sys.stderr)
            if plan.state is not None:  # another process may have trained on since the plan was made
                if run_dir.writer:
                    path, plan.state, damaged = run_dir.newest_intact()
                    run_dir.resume_from(path, damaged, lambda line: print(line, file=sys.stderr))
                distributed.barrier()  # the other ranks read the checkpoint rank 0 chose, once it has moved damaged ones aside
                if not run_dir.writer:
                    plan.state = run_dir.newest_intact()[1]
            try:
                _train(plan, dev, progress and run_dir.writer, tensorboard and run_dir.writer)
            except WriteError as e:
                raise TrainingError(f"cannot write {e.filename}: {e.strerror}; {_last_good(run_dir)}") from None
            except distributed.DistributedError as e:
                raise TrainingError(f"{e}; {_last_good(run_dir)}") from None
    finally:
        set_share_mean(None)
        if joined:
            distributed.stop()
    return run_dir.path


def _last_good(run_dir: RunDir) -> str:
    """Where a run that a failed write stopped can continue from, as the end of its error line."""
    if not run_dir.path.is_dir():
        return f"the run directory {run_dir.path} no longer exists"
    good = run_dir.saved
    if good is None and run_dir.checkpoints():
        try:
            good = str(run_dir.newest_intact()[0])
        except checkpoint.CheckpointError:
            pass
    return (f"the last good checkpoint is {good}; fix that and continue with --resume" if good
            else "no checkpoint had been written yet")


def _earlier_probe(run_dir: RunDir) -> dict:
    """The ``precision_probe`` record of a resumed run's ``config.json`` (empty if it has none), so
    that rewriting the file on resume keeps how the run's precision was chosen."""
    try:
        earlier = run_dir.read_config()
    except (OSError, ValueError):
        return {}
    return {"precision_probe": earlier["precision_probe"]} if "precision_probe" in earlier else {}


def _train(plan: RunPlan, device: torch.device, progress: bool, tensorboard: bool) -> None:
    cfg, state, run_dir, model = plan.cfg, plan.state, plan.run_dir, plan.model_object
    model.to(device).train()
    faults = FaultCounter(cfg.max_bad_steps)
    budget = Budget(cfg.max_steps, cfg.max_minutes)
    if state is not None:
        model.load_state_dict(state.model_state)
        set_rng_states(state.rng)
        budget.already = state.elapsed
        faults.lr_scale, faults.rollbacks = state.lr_scale, state.rollbacks
        run_dir.forget_metrics_after(state.step)
    else:
        run_dir.create()
    processes = distributed.world_size()
    probe = _earlier_probe(run_dir) if state is not None else {}
    if state is None and getattr(cfg, "precision", None) == "auto":
        pixels = torch.as_tensor(data.with_channels(plan.train_data[0][:cfg.batch_size]))
        labels = torch.as_tensor(plan.train_data[1][:cfg.batch_size]).long() if model.conditional else None
        probe = {"precision_probe": probe_precision(model, cfg, device, pixels, labels)}
        cfg.precision = probe["precision_probe"]["chosen"]  # config.json and a resume keep the choice
        if run_dir.writer:
            rates = probe["precision_probe"]
            why = (rates["bf16_harm"] if "bf16_harm" in rates else
                   f"{rates['fp32_images_per_s']:.1f} images/s in float32, {rates['bf16_images_per_s']:.1f} in bf16 on this machine")
            print(f"precision=auto: {why}; training in {cfg.precision}", file=sys.stderr)
    run = {**plan.record(), **probe, "hardware": describe(device) + (f", {processes} processes (torchrun)" if processes > 1 else "")}
    run_dir.write_config(run)
    console = Console(progress)
    board = TensorBoard(run_dir.path / run_dir.TENSORBOARD, None if state is None else state.step + 1) if tensorboard else None
    ctx = Context(run, cfg, model, device, plan.train_data, plan.val_data, state, run_dir, budget, faults, console, board)
    if state is None:
        ctx.checkpoint(TrainState())  # something to resume or roll back to at once
    trainer = importlib.import_module(f"couplings.training.{MODELS[plan.model].trainer}")
    try:
        with budget.stop_on_signals(run_dir, console):
            while True:
                try:
                    trainer.fit(ctx)
                    break
                except NumericalFault as fault:  # continue from last.pt with a lower learning rate, or raise
                    ctx.state = roll_back(fault, faults, run_dir, model, cfg.max_rollbacks, cfg.rollback_lr_factor)
                    console.say(f"{fault}; rolled back to step {ctx.state.step} with the learning rate x{faults.lr_scale:g}")
    finally:
        if board is not None:
            board.close()
