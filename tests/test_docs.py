"""The docs site: ``mkdocs build --strict`` passes, so a broken link, a missing heading or an API
reference to a name that does not exist fails here, and the API reference is built from the
docstrings (their examples run as doctests: ``testpaths`` in pyproject.toml)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_strict_build_renders_the_api_reference(tmp_path):
    site = tmp_path / "site"
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file", str(ROOT / "mkdocs.yml"), "--site-dir", str(site)],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, f"mkdocs build --strict failed:\n{result.stdout}{result.stderr}"
    models = (site / "api" / "models" / "index.html").read_text()
    assert 'id="couplings.models.NICE"' in models  # mkdocstrings found the class
    assert "hidden_units" in models and "&gt;&gt;&gt;" in models  # ... with its doctested example
    # A link from docs/ to the committed results points at a copy inside the site.
    assert (site / "repo" / "results" / "README.md").is_file()
    assert 'href="../repo/results/README.md"' in (site / "results" / "index.html").read_text()
