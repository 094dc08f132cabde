"""Whole-file writes: a file is written beside its destination under a temporary name, then put in its
place by one ``os.replace``, so that a reader (or a killed run) never sees half of it."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Iterator

from apecli.errors import ApecliError


@contextlib.contextmanager
def replacing(path: str | os.PathLike[str]) -> Iterator[Path]:
    """The temporary path to write ``path``'s new content to; when the block ends it replaces ``path``,
    and when the block fails it is removed, leaving ``path`` as it was. The file system's refusal (a full
    disk, a read-only folder) stays an ``OSError``, so that work kept for resuming stays too, but it
    names ``path``, not the temporary file."""
    path = Path(path)
    if path.is_dir():
        raise ApecliError(f"{path}: is a folder; give the path of a file to write")
    temporary = path.parent / f".{path.name}.{os.getpid()}.tmp"
    try:
        yield temporary
        os.replace(temporary, path)
    except BaseException as error:
        temporary.unlink(missing_ok=True)
        if isinstance(error, OSError):
            reason = error.strerror or str(error).split("\n")[0] or type(error).__name__
            raise OSError(error.errno, reason, str(path)) from None
        raise
