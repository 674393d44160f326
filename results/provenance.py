"""Size and stored provenance (pretrained models) or metadata (classifiers) of every committed .pt file.

    OMP_NUM_THREADS=1 python results/provenance.py > results/provenance.txt
"""
import glob
import os

import torch

from couplings import checkpoint

for f in sorted(glob.glob("src/couplings/weights/*.pt")) + sorted(glob.glob("src/couplings/pretrained/*.pt")):
    # pretrained files carry a checksum header (couplings.checkpoint.save); the classifiers are plain torch files
    c = checkpoint.load(f) if "/pretrained/" in f else torch.load(f, weights_only=True, map_location="cpu")
    meta = c.get("provenance") or {k: v for k, v in c.items() if isinstance(v, (str, int, float)) or v is None}
    print(f"{f} ({os.path.getsize(f) / 1e6:.1f} MB): {meta}")
