"""The errors apecli raises for problems a user can fix (bad input, missing files, wrong settings).

A message names what a Python user can act on: a setting by its Python name (:class:`Setting`,
written ```val_shots``` or ```skip_bad=True```) and a library call (:class:`Step`, written
```evaluate_artifact()```). The error carries those names, with the path and value it concerns, so
that the command line can say the same in its own words (``--val-shots``, ``apecli eval``): its table
of flags is ``apecli.cli.errors``, the only place that knows them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any


class _Unset:
    def __repr__(self) -> str:
        return "unset"


UNSET: Any = _Unset()


@dataclass(frozen=True)
class Placeholder:
    """A value a message leaves for the user to fill in (``FILE``, ``DIR``)."""

    text: str

    def __repr__(self) -> str:
        return self.text


@dataclass(frozen=True)
class Setting:
    """A setting named in a message: its Python name, and the value the message suggests, if any."""

    name: str
    value: Any = UNSET

    def __str__(self) -> str:
        return f"`{self.name}`" if self.value is UNSET else f"`{self.name}={self.value!r}`"


class Step:
    """A library call named in a message, with the settings it would be called with:
    ``Step("evaluate_artifact", mode="proker")`` reads ```evaluate_artifact(mode='proker')```."""

    def __init__(self, name: str, **settings: Any) -> None:
        self.name, self.settings = name, settings

    def __str__(self) -> str:
        return f"`{self.name}({', '.join(f'{key}={value!r}' for key, value in self.settings.items())})`"

    def __repr__(self) -> str:
        return f"Step({self.name!r}, **{self.settings!r})"


Named = Setting | Step


class ApecliError(Exception):
    """A user-facing failure; the command line prints it as one line and exits 1.

    ``path``: the file or folder it concerns; ``option`` and ``value``: the setting it concerns, by its
    Python name, and the value refused; ``named``: every setting and call the message names."""

    def __init__(self, message: str, *named: Named, path: str | Path | None = None, option: str | None = None,
                 value: Any = UNSET) -> None:
        super().__init__(message)
        self.message = message
        self.named = tuple(named)
        self.path = path
        self.option = option
        self.value = value

    def __str__(self) -> str:
        return self.message

    def within(self, prefix: str) -> "ApecliError":
        """The same error, its message after ``prefix`` (a path, usually), keeping what it names."""
        return type(self)._rebuilt(self, f"{prefix}{self.message}")

    @classmethod
    def _rebuilt(cls, error: "ApecliError", message: str) -> "ApecliError":
        copy = cls.__new__(cls)
        ApecliError.__init__(copy, message, *error.named, path=error.path, option=error.option, value=error.value)
        return copy


class SettingError(ApecliError):
    """A setting's value refused: out of range, unknown, or not one this step takes."""

    def __init__(self, option: str, value: Any, message: str, *named: Named) -> None:
        super().__init__(message, Setting(option), *named, option=option, value=value)


class ChoiceError(SettingError):
    """A value outside a fixed set of choices (a mode, a kind, a device's name), which it lists."""

    def __init__(self, option: str, value: Any, message: str, choices: tuple[str, ...], *named: Named) -> None:
        super().__init__(option, value, message, *named)
        self.choices = tuple(choices)


class InputError(ApecliError):
    """A file, folder or artifact that cannot be used as it is."""

    def __init__(self, path: str | Path, message: str, *named: Named) -> None:
        super().__init__(f"{path}: {message}", *named, path=path)


def first_line(error: BaseException, limit: int | None = None) -> str:
    """What an exception says, in one line: its message's first line, or its type's name where it says
    nothing; past ``limit`` characters, cut at the last whole word before it, and ``…`` said."""
    line = str(error).split("\n")[0].rstrip() or type(error).__name__
    if limit is None or len(line) <= limit:
        return line
    cut = line[:limit].rsplit(" ", 1)[0] if " " in line[:limit] else line[:limit]
    return cut.rstrip(" ,;:(") + " …"
