"""The command line (the only part of apecli that imports typer and rich)."""

from __future__ import annotations

from typing import Any

__all__ = ["app", "main"]


def main() -> None:
    """The console script. How OpenMP's threads wait is decided first, before numpy's and torch's
    libraries start any thread (see :mod:`apecli.cli.sharing`); then the command runs."""
    from apecli.cli.sharing import share_cores

    share_cores()
    from apecli.cli.commands import main as run

    run()


def __getattr__(name: str) -> Any:
    if name == "app":  # the Typer application, for tests and ``typer``'s tools: imported on first use
        from apecli.cli.commands import app

        globals()["app"] = app
        return app
    raise AttributeError(f"module 'apecli.cli' has no attribute '{name}'")
