"""Optional test dependencies that CI requires: `require` skips a test whose package is missing,
unless the named environment variable is "1" (set in .ci/run), which makes that a failure."""

from __future__ import annotations

import importlib
import os
from types import ModuleType

import pytest

__all__ = ["require"]


def require(module: str, variable: str) -> ModuleType:
    """Imports ``module`` and returns it. If it cannot be imported, fails the test when
    ``$variable`` is "1" and skips it otherwise (called at module level: the whole file).

    The packages are in pyproject.toml's ``test`` extra, so `make install` installs them.
    """
    try:
        return importlib.import_module(module)
    except ImportError as e:
        error = e
    message = f"cannot import {module} ({error}); pip install -e '.[test]' installs it"
    if os.environ.get(variable) == "1":
        pytest.fail(f"{message}; ${variable}=1 makes it required", pytrace=False)
    pytest.skip(f"{message}; set {variable}=1 to make this a failure", allow_module_level=True)
