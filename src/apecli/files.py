"""Files written whole and files read whole.

A file is written beside its destination under a temporary name, then put in its place by one
``os.replace``, so that a reader (or a killed run) never sees half of it.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from pathlib import Path
from typing import Iterator

from apecli.errors import InputError, first_line


@contextlib.contextmanager
def replacing(path: str | os.PathLike[str]) -> Iterator[Path]:
    """The temporary path to write ``path``'s new content to; when the block ends it replaces ``path``,
    and when the block fails it is removed, leaving ``path`` as it was. The file system's refusal (a full
    disk, a read-only folder) stays an ``OSError``, so that work kept for resuming stays too, but it
    names ``path``, not the temporary file."""
    path = Path(path)
    if path.is_dir():
        raise InputError(path, "is a folder; give the path of a file to write")
    temporary = path.parent / f".{path.name}.{os.getpid()}.tmp"
    try:
        yield temporary
        os.replace(temporary, path)
    except BaseException as error:
        temporary.unlink(missing_ok=True)
        if isinstance(error, OSError):
            raise OSError(error.errno, error.strerror or first_line(error), str(path)) from None
        raise


def file_sha256(path: str | os.PathLike[str]) -> str:
    """The SHA-256 of a file's bytes, read in blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
