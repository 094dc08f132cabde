"""Metadata fields read as the format says they are (docs/cache-format.md): a field of another type is
refused in one line that names the file and the field, never left to fail later as a traceback."""

from __future__ import annotations

from typing import Any, Mapping

from apecli import store
from apecli.errors import InputError

TEXT = (str,)
WHOLE = (int,)
NUMBER = (int, float)
OBJECT = (dict,)
LIST = (list,)
NAMES = {str: "text", int: "a whole number", float: "a number", dict: "an object", list: "a list", bool: "true or false"}


def checked(artifact: store.Artifact, metadata: Mapping[str, Any], name: str, kinds: tuple[type, ...],
          default: Any = ..., optional: bool = False) -> Any:
    """``metadata[name]`` when it is of one of ``kinds`` (None too where ``optional``); ``default`` where it is
    absent (refused as missing when no default is given)."""
    if name not in metadata:
        if default is ...:
            raise InputError(artifact.path, f"its header is damaged (metadata '{name}' is missing)")
        return default
    value = metadata[name]
    if value is None and optional:
        return None
    if isinstance(value, bool) and bool not in kinds or not isinstance(value, kinds):
        said = " or ".join(NAMES[kind] for kind in kinds) + (" or null" if optional else "")
        raise InputError(artifact.path, f"its header is damaged (metadata '{name}' is {type(value).__name__}, where "
                                        f"the format says {said})")
    return value


def each(artifact: store.Artifact, values: list, name: str, kinds: tuple[type, ...]) -> list:
    """A list field's items, each of one of ``kinds``."""
    for value in values:
        if isinstance(value, bool) and bool not in kinds or not isinstance(value, kinds):
            said = " or ".join(NAMES[kind] for kind in kinds)
            raise InputError(artifact.path, f"its header is damaged (metadata '{name}' holds {type(value).__name__}, "
                                            f"where the format says {said})")
    return values
