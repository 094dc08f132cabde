"""The one list of methods: the built-in ones, and those other packages register under the entry-point
group ``apecli.methods`` (the entry point's name is the method's ``--mode``).

A method of another package is imported the first time the list is read in full; one that fails to
import, or is not a :class:`Method`, is named in one :class:`PluginWarning` and left out, and never keeps
the built-in methods from working.
"""

from __future__ import annotations

import functools
import warnings
from importlib.metadata import entry_points

from apecli.errors import ChoiceError, first_line
from apecli.methods.ape import APE
from apecli.methods.ape_t import APET
from apecli.methods.auto import Auto
from apecli.methods.base import Method
from apecli.methods.clap import CLAP
from apecli.methods.class_mean import ClassMean
from apecli.methods.gda import GDA
from apecli.methods.lp_plus_plus import LPPlusPlus
from apecli.methods.proker import ProKeR
from apecli.methods.timo import TIMO, TIMOS
from apecli.methods.tip_adapter import TipAdapter
from apecli.methods.tip_adapter_f import TipAdapterF
from apecli.methods.zero_shot import ZeroShot

GROUP = "apecli.methods"
DEFAULT = APE  # the method eval uses unless told (on an adapter: the method that reads adapters)
BENCH = (ZeroShot, TipAdapter, APE, GDA)  # the methods bench runs unless told
BUILT_IN: tuple[type[Method], ...] = (
    ZeroShot,
    TipAdapter,
    TipAdapterF,
    APE,
    APET,
    GDA,
    ProKeR,
    TIMO,
    TIMOS,
    LPPlusPlus,
    CLAP,
    ClassMean,
    Auto,
)


class PluginWarning(UserWarning):
    """A method of another package that could not be registered (its entry point names it)."""


def built_in_names() -> tuple[str, ...]:
    """The built-in methods' names, in the registry's order."""
    return tuple(method.name for method in BUILT_IN)


@functools.lru_cache(maxsize=None)
def methods() -> dict[str, type[Method]]:
    """Every usable method by name: the built-in ones, then other packages' (imported here)."""
    found = {method.name: method for method in BUILT_IN}
    for point in sorted(entry_points(group=GROUP), key=lambda point: point.name):
        if point.name in found:
            warnings.warn(f"the method '{point.name}' ({point.value}) is left out: a built-in method has that name",
                          PluginWarning, stacklevel=2)
            continue
        try:
            loaded = point.load()
        except Exception as error:  # noqa: BLE001 - a plugin's import may fail in any way
            warnings.warn(f"the method '{point.name}' ({point.value}) is left out: it failed to import "
                          f"({type(error).__name__}: {first_line(error)})", PluginWarning, stacklevel=2)
            continue
        if not (isinstance(loaded, type) and issubclass(loaded, Method)):
            warnings.warn(f"the method '{point.name}' ({point.value}) is left out: it is not a subclass of "
                          "apecli.methods.Method", PluginWarning, stacklevel=2)
            continue
        found[point.name] = type(loaded.__name__, (loaded,), {"name": point.name, "label": loaded.label or point.name,
                                                             "__module__": loaded.__module__,
                                                             "__qualname__": loaded.__qualname__})
    return found


def get(name: str) -> type[Method]:
    """The method called ``name``, or one clear error listing the others (other packages' methods are
    imported only for a name that is not built in)."""
    for method in BUILT_IN:
        if method.name == name:
            return method
    known = methods()
    if name not in known:
        raise ChoiceError("mode", name, f"unknown mode '{name}'; choose one of {', '.join(known)}", tuple(known))
    return known[name]


def default_for(kind: str) -> type[Method]:
    """The method ``apecli eval`` uses on an artifact of ``kind`` when no mode is given."""
    return DEFAULT if kind in DEFAULT.reads else next(method for method in BUILT_IN if kind in method.reads)


Auto.known, Auto.lookup = staticmethod(methods), staticmethod(get)  # what auto chooses among: this list


def label(name: str) -> str:
    """What tables and plots call a method: its label, or its name where it is not (or no longer) known."""
    known = methods()
    return known[name].label or name if name in known else name
