"""How commands talk: input artifacts from arguments or stdin, results to stdout, messages to stderr."""

from __future__ import annotations

import functools
import json
import os
import stat
import sys
from pathlib import Path
from typing import Any, Callable, Iterable, TypeVar

import typer
from rich.console import Console

from apecli import store
from apecli.cli.errors import in_flags
from apecli.errors import ApecliError, ChoiceError, first_line


def _width(stream) -> int | None:
    """A console's width: the terminal's (or $COLUMNS), else wide enough that a table written to a file or
    a pipe keeps every column whole (rich would fit it to 80 columns, cutting each cell to a few letters)."""
    try:
        interactive = stream.isatty()
    except (AttributeError, ValueError):
        interactive = False
    return None if interactive or os.environ.get("COLUMNS") else 1000


console = Console(stderr=True, highlight=False, soft_wrap=True, width=_width(sys.stderr))  # messages, progress, the
# tables beside an artifact
out = Console(highlight=False, soft_wrap=True, width=_width(sys.stdout))  # a command's report, when it is the result


def say(message: str) -> None:
    """A message from the library on stderr, in the command line's words."""
    console.print(in_flags(message), markup=False)
Command = TypeVar("Command", bound=Callable[..., Any])
OUT_OF_MEMORY = ("out of memory; fewer images at a time (--batch-size), a smaller search grid, or a machine with more "
                 "would do")


def reports_errors(command: Command) -> Command:
    """Turn a user error, or the file system's refusal, into one line on stderr and exit status 1."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except ApecliError as error:
            typer.echo(f"apecli: error: {in_flags(str(error))}", err=True)  # a value outside fixed choices is a
            raise typer.Exit(2 if isinstance(error, ChoiceError) else 1) from None  # mistyped command line: 2
        except OSError as error:  # the file system's word: a full disk, a read-only or missing folder
            typer.echo(f"apecli: error: {error.strerror or error}: {error.filename or ''}".rstrip(": "), err=True)
            raise typer.Exit(1) from None
        except KeyboardInterrupt:
            typer.echo("apecli: interrupted", err=True)
            raise typer.Exit(130) from None
        except MemoryError:
            typer.echo(f"apecli: error: {OUT_OF_MEMORY}", err=True)
            raise typer.Exit(1) from None
        except RuntimeError as error:
            if "DefaultCPUAllocator: can't allocate memory" in str(error):  # torch's MemoryError
                typer.echo(f"apecli: error: {OUT_OF_MEMORY}", err=True)
                raise typer.Exit(1) from None
            if type(error).__name__ != "OutOfMemoryError":  # torch's, for a GPU's memory: torch need not be loaded
                raise
            reason = ". ".join(str(error).split("\n")[0].split(". ")[:2])  # "CUDA out of memory. Tried to allocate …"
            typer.echo(f"apecli: error: the GPU ran out of memory ({reason}); a smaller --batch-size, another "
                       "process's memory freed, or --device cpu would do", err=True)
            raise typer.Exit(1) from None

    return wrapper  # type: ignore[return-value]


def _stdin_is_piped() -> bool:
    """True when stdin is a pipe or a file (a pipeline), not a terminal, /dev/null or closed."""
    if sys.stdin is None or getattr(sys.stdin, "closed", False):
        return False
    try:
        descriptor = sys.stdin.fileno()
    except (AttributeError, OSError, ValueError):
        return True  # an in-memory stream, as under a test runner
    try:
        mode = os.fstat(descriptor).st_mode
    except OSError:
        return False  # a descriptor closed under it
    return stat.S_ISFIFO(mode) or stat.S_ISREG(mode)


def resolve_input(value: str | None, store_dir: Path, kinds: Iterable[str]) -> store.Artifact:
    """The artifact a command reads: the path given, a path read from stdin, or the newest in the store."""
    kinds = tuple(kinds)
    if value == "-" or (value is None and _stdin_is_piped()):
        try:
            text = sys.stdin.read() if sys.stdin is not None else ""
        except (OSError, ValueError) as error:  # closed, or not text
            raise ApecliError(f"cannot read an artifact path on stdin ({first_line(error)})") from None
        lines = [line.strip() for line in text.splitlines() if line.strip()]
        if not lines:
            raise ApecliError("no artifact path on stdin (did the previous command fail?)")
        value = lines[-1]
        if value.startswith(("{", "[")):  # the previous command ran with --json
            try:
                value = json.loads(value)["artifact"]
            except (ValueError, KeyError, TypeError, IndexError):
                value = None
            if not isinstance(value, str) or not value:
                raise ApecliError("stdin holds JSON without an 'artifact' path")
    if value is None:
        artifact = store.newest_artifact(store_dir, kinds)
        console.print(f"using the newest {artifact.kind} artifact: {artifact.path}")
        return artifact
    return store.open_artifact(value, kinds)


def piped_input(kinds: Iterable[str]) -> store.Artifact | None:
    """The artifact whose path stdin holds when stdin is piped, else None (for commands whose default without
    a pipe is something other than the newest artifact)."""
    return resolve_input("-", Path(), kinds) if _stdin_is_piped() else None


def emit(artifact: store.Artifact | Path, result: dict[str, Any], as_json: bool) -> None:
    """The command's result on stdout: the artifact path, or one JSON object with ``--json``."""
    path = str(artifact.path if isinstance(artifact, store.Artifact) else artifact)
    if sys.stdout is None or getattr(sys.stdout, "closed", False):  # the result would be lost without a word
        raise ApecliError(f"stdout is closed: the result cannot be printed (it is {path})")
    if as_json:
        typer.echo(json.dumps({"artifact": path, **result}, default=_plain))
    else:
        typer.echo(path)


def report(artifact: store.Artifact | Path, result: dict[str, Any], as_json: bool, lines: Iterable[Any]) -> None:
    """A command whose result is a report: the report on stdout (rich renderables or lines of text), or
    with ``--json`` one JSON object (the artifact's path in it)."""
    if as_json:
        emit(artifact, result, True)
        return
    if sys.stdout is None or getattr(sys.stdout, "closed", False):
        raise ApecliError("stdout is closed: the report cannot be printed")
    for line in lines:
        out.print(line, markup=False) if isinstance(line, str) else out.print(line)


def _plain(value: Any) -> Any:
    if hasattr(value, "tolist"):
        return value.tolist()
    return str(value)


def outline(value: Any, indent: int = 0, shown: int = 8) -> list[str]:
    """A nested mapping as indented ``key  value`` lines for people: floats to 10 significant digits,
    lists past ``shown`` items cut short with their length, empty values as "none" (``--json`` keeps
    everything)."""
    lines = []
    pad = "  " * indent
    width = min(28, max((len(str(key)) for key in value), default=0))
    for key, item in value.items():
        if isinstance(item, dict) and item:
            lines.append(f"{pad}{key}")
            lines += outline(item, indent + 1, shown)
        else:
            lines.append(f"{pad}{str(key):<{width}}  {_brief(item, shown)}")
    return lines


def _brief(value: Any, shown: int) -> str:
    if isinstance(value, (list, tuple, dict)) and not value:
        return "none"
    if isinstance(value, float):
        return f"{value:.10g}"
    if isinstance(value, (list, tuple)):
        items = [_brief(item, shown) for item in value[:shown]]
        more = f", … ({len(value)} in all)" if len(value) > shown else ""
        return f"[{', '.join(items)}{more}]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{key}: {_brief(item, shown)}" for key, item in value.items()) + "}"
    return str(value)

