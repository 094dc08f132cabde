"""Docs that stay true: the command reference is the command line's own help, regenerated."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_command_reference_is_current(tmp_path):
    """docs/cli.md is what `make docs` writes from the Typer app now: a changed option or help text
    without a regenerated reference fails here."""
    fresh = tmp_path / "cli.md"
    done = subprocess.run([sys.executable, "-m", "typer", "apecli.cli.app", "utils", "docs", "--name", "apecli",
                           "--title", "apecli command reference", "--output", str(fresh)], capture_output=True,
                          text=True, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    assert (ROOT / "docs" / "cli.md").read_text() == fresh.read_text(), "docs/cli.md is out of date: run make docs"
    assert "## `apecli eval`" in fresh.read_text() and "## `apecli methods`" in fresh.read_text()


def test_the_plugin_page_shows_the_method_the_tests_install():
    """docs/plugins.md's complete method is the example plugin's code (in at most 50 lines), so the page
    shows what test_plugins.py runs."""
    page = (ROOT / "docs" / "plugins.md").read_text()
    shown = page.split("```python\n", 1)[1].split("```", 1)[0]
    installed = (ROOT / "tests" / "plugins" / "nearest_mean" / "apecli_nearest_mean.py").read_text()
    assert len(shown.splitlines()) <= 50 and shown.strip() in installed
    assert 'nearest-mean = "apecli_nearest_mean:NearestMean"' in page
    assert 'nearest-mean = "apecli_nearest_mean:NearestMean"' in \
        (ROOT / "tests" / "plugins" / "nearest_mean" / "pyproject.toml").read_text()
