"""Size and stored provenance (pretrained models) or metadata (classifiers) of every committed .pt file.

    OMP_NUM_THREADS=1 python scripts/provenance.py > results/provenance.txt

tests/test_published_numbers.py checks that results/provenance.txt is what this prints.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

from couplings import checkpoint

ROOT = Path(__file__).resolve().parent.parent
COMMAND = "$ OMP_NUM_THREADS=1 python scripts/provenance.py"


def provenance_lines(root: Path = ROOT) -> list[str]:
    """One line per committed .pt file: its path, size in MB and stored metadata."""
    files = sorted((root / "src/couplings/weights").glob("*.pt")) + sorted((root / "src/couplings/pretrained").glob("*.pt"))
    lines = [COMMAND]
    for path in files:
        # pretrained files carry a checksum header (couplings.checkpoint.save); the classifiers are plain torch files
        pretrained = path.parent.name == "pretrained"
        if pretrained:
            meta = checkpoint.load(path).provenance
        else:
            payload = torch.load(path, weights_only=True, map_location="cpu")
            meta = {k: v for k, v in payload.items() if isinstance(v, (str, int, float)) or v is None}
        lines.append(f"{path.relative_to(root)} ({os.path.getsize(path) / 1e6:.1f} MB): {meta}")
    return lines


if __name__ == "__main__":
    print("\n".join(provenance_lines()))
