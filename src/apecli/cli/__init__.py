"""The command line (the only part of apecli that imports typer and rich)."""

from apecli.cli.app import app, main

__all__ = ["app", "main"]
