"""Training: `train` a model into a run directory, or `plan_run` to check a run first.

One file per concern: ``run`` (planning and starting a run), ``loop`` (passes, budget, signals,
`train_pass`: one training step top to bottom), ``optim`` (Adam, one optimizer step),
``faults`` (non-finite steps, rollback, random states), and the two trainers ``pixel`` and
``latent``.
"""

from couplings.training.errors import StoppedBySignal, TrainingError
from couplings.training.faults import NumericalFault
from couplings.training.run import RESUMABLE_OPTIONS, RunPlan, plan_run, run_plan, train

__all__ = ["RESUMABLE_OPTIONS", "NumericalFault", "RunPlan", "StoppedBySignal", "TrainingError", "plan_run", "run_plan", "train"]
