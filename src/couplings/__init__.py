"""couplings: coupling-layer normalizing flows (NICE, Real NVP, Glow) on MNIST and Fashion-MNIST.

Public API::

    from couplings import data, NICE, bits_per_dim, load_model

Names are imported on first use, so ``import couplings.models`` (or ``couplings.transforms``)
loads neither the data layer, training, the CLI nor the report.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# public name -> the module that defines it
_EXPORTS = {
    "MODELS": "couplings.models",
    "NICE": "couplings.models",
    "RealNVP": "couplings.models",
    "Glow": "couplings.models",
    "LatentRealNVP": "couplings.models",
    "Flow": "couplings.models",
    "AdditiveCoupling": "couplings.transforms",
    "Composite": "couplings.transforms",
    "DiagonalScaling": "couplings.transforms",
    "Transform": "couplings.transforms",
    "bits_per_dim": "couplings.likelihood",
    "dequantize": "couplings.likelihood",
    "log_probs": "couplings.likelihood",
    "load_model": "couplings.checkpoint",
    "train": "couplings.training",
    "data": "couplings.data",
}

__all__ = [*_EXPORTS, "__version__"]


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'couplings' has no attribute {name!r}")
    module = importlib.import_module(_EXPORTS[name])
    value = module if module.__name__ == f"couplings.{name}" else getattr(module, name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
