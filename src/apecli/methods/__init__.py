"""Few-shot methods over stored CLIP features: each in a module of its own, all in one registry.

Write one as in docs/plugins.md::

    from apecli.methods import Method, Task

and register it under the entry-point group ``apecli.methods`` of your package; its entry point's name
is its ``--mode``. Importing this package loads neither torch nor the methods of other packages.
"""

from apecli.methods.base import Method, Options, Task
from apecli.methods.registry import PluginWarning, get, label, methods

__all__ = ["Method", "Options", "PluginWarning", "Task", "get", "label", "methods"]
