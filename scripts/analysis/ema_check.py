"""Validation and test bits/dim of a NICE run's best.pt with its raw weights and with its Polyak averages.

    OMP_NUM_THREADS=1 python scripts/analysis/ema_check.py runs/nice-paper-finetune/best.pt \
        > results/nice-mnist-ema/ema-check.txt
"""
import sys

from couplings import checkpoint, data
from couplings.likelihood import bits_per_dim
from couplings.models import build_model

payload = checkpoint.load(sys.argv[1])
val, _ = data.load_split("mnist", "val", 10000)
test, _ = data.load("mnist", "test")
print("step", payload.step, "epoch", payload.epoch)
for name in ("model_state", "ema_state"):
    model = build_model(payload.model, payload.model_config)
    model.load_state_dict(getattr(payload, name))
    model.eval()
    print(name, "val", round(bits_per_dim(model, val, seed=0), 4), "test", round(bits_per_dim(model, test, seed=0), 4))
