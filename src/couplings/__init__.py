"""couplings: coupling-layer normalizing flows (NICE, Real NVP, Glow) on MNIST and Fashion-MNIST.

Public API::

    from couplings import data, NICE, bits_per_dim, load_model
"""

from couplings import data
from couplings.checkpoint import load_model
from couplings.evaluate import bits_per_dim, dequantize, log_probs
from couplings.models import MODELS, NICE, Flow
from couplings.transforms import AdditiveCoupling, Composite, DiagonalScaling, Transform

__version__ = "0.1.0"

__all__ = [
    "MODELS",
    "NICE",
    "AdditiveCoupling",
    "Composite",
    "DiagonalScaling",
    "Flow",
    "Transform",
    "bits_per_dim",
    "data",
    "dequantize",
    "load_model",
    "log_probs",
    "__version__",
]
