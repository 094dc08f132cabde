"""Files written whole and files read whole, and files inside tar shards.

A file is written beside its destination under a temporary name, then put in its place by one
``os.replace``, so that a reader (or a killed run) never sees half of it. A file inside a tar shard
(:class:`ShardMember`) is read where it lies, never unpacked to disk.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
from dataclasses import dataclass
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
    _check_replaceable(path)
    temporary = path.parent / f".{path.name}.{os.getpid()}.tmp"
    try:
        yield temporary
        os.replace(temporary, path)
    except BaseException as error:
        temporary.unlink(missing_ok=True)
        if isinstance(error, OSError):
            raise OSError(error.errno, error.strerror or first_line(error), str(path)) from None
        raise


def _check_replaceable(path: Path) -> None:
    """Refuse to put a file where something other than a regular file is (a folder, a symbolic link, a
    device, a FIFO): replacing it would destroy it, or write where the link points."""
    import stat

    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    except OSError as error:
        raise InputError(path, f"cannot be written ({error.strerror or first_line(error)})") from None
    if stat.S_ISDIR(mode):
        raise InputError(path, "is a folder; give the path of a file to write")
    if stat.S_ISLNK(mode):
        raise InputError(path, "is a symbolic link; give the path of a file to write (nothing was written)")
    if not stat.S_ISREG(mode):
        raise InputError(path, "is not a regular file (a device, a FIFO or a socket); give the path of a file to "
                               "write (nothing was written)")


def file_sha256(path: str | os.PathLike[str]) -> str:
    """The SHA-256 of a file's bytes, read in blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@dataclass(frozen=True)
class ShardMember:
    """A file inside an uncompressed tar shard: its bytes lie at ``offset`` (``size`` of them), read by a
    seek and a read, never unpacked. It stands where an image's path stands (``str`` names it
    ``shard.tar:member``)."""

    shard: Path
    name: str
    offset: int
    size: int

    def __str__(self) -> str:
        return f"{self.shard}:{self.name}"

    @property
    def suffix(self) -> str:
        return Path(self.name).suffix

    def read_bytes(self) -> bytes:
        with open(self.shard, "rb") as handle:
            handle.seek(self.offset)
            data = handle.read(self.size)
        if len(data) != self.size:
            raise OSError(f"{self}: the shard ends {self.size - len(data)} bytes into it (truncated?)")
        return data

    def open_binary(self) -> io.BytesIO:
        return io.BytesIO(self.read_bytes())

