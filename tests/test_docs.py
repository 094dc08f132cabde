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
    done = subprocess.run([sys.executable, "-m", "typer", "apecli.cli.commands", "utils", "docs", "--name", "apecli",
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


def test_a_cpu_only_install_takes_torch_from_the_cpu_wheels_with_the_projects_bounds(tmp_path):
    """`make install CPU=1` (as far as a machine without that index can check it): torch and torchvision
    from PyTorch's CPU-only index first, at pyproject.toml's bounds, then the project; without CPU=1,
    the project alone. The README shows the same commands."""
    import re
    import shutil

    if shutil.which("make") is None:
        import pytest

        pytest.skip("no make here")
    planned = lambda *extra: subprocess.run(["make", "-n", "install", f"VENV={tmp_path / 'venv'}", *extra],  # noqa: E731
                                            capture_output=True, text=True, cwd=ROOT, check=True).stdout.splitlines()
    cpu, plain = planned("CPU=1"), planned()
    pins = re.findall(r'^\s*"(torch(?:vision)?[<>=][^"]*)",', (ROOT / "pyproject.toml").read_text(), re.MULTILINE)
    assert len(pins) == 2, pins
    wheels = f"pip install {' '.join(repr(pin).replace(chr(34), chr(39)) for pin in pins)} --index-url " \
             "https://download.pytorch.org/whl/cpu"
    assert [line for line in cpu if "--index-url" in line] == [f"{tmp_path / 'venv'}/bin/python -m {wheels}"]
    assert cpu.index(next(line for line in cpu if "--index-url" in line)) < cpu.index(
        next(line for line in cpu if "install -e" in line))  # the CPU wheels first: the project's install keeps them
    assert not any("--index-url" in line for line in plain) and any("install -e '.[test]'" in line for line in plain)
    assert wheels in (ROOT / "README.md").read_text()
