"""OpenAI's CLIP files, read as weights without TorchScript.

The files ``clip.load`` caches (``~/.cache/clip/RN50.pt``, …) are TorchScript archives: a zip whose
``data.pkl`` pickles the module tree, each tensor's bytes in a file of its own under ``data/``, and each
module type's source under ``code/``, where ``__parameters__`` and ``__buffers__`` name what its state
dict holds. open_clip reads state dicts only, and torch has deprecated ``torch.jit.load``; this module
reads the weights with an unpickler that builds nothing but tensors and placeholders for the modules
(any other object in the pickle is refused), so it runs nothing the file contains.
"""

from __future__ import annotations

import ast
import pickle
import re
import zipfile
from collections import OrderedDict
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

# torch's legacy storage classes, as the pickle names them, and the element type each holds
STORAGE_TYPES = {
    "DoubleStorage": "float64", "FloatStorage": "float32", "HalfStorage": "float16",
    "BFloat16Storage": "bfloat16", "LongStorage": "int64", "IntStorage": "int32", "ShortStorage": "int16",
    "CharStorage": "int8", "ByteStorage": "uint8", "BoolStorage": "bool",
}

# how TorchScript tags its containers' static types in the pickle; the values themselves are plain
TYPED_CONTAINERS = {
    "build_intlist": lambda values: values, "build_doublelist": lambda values: values,
    "build_boollist": lambda values: values, "build_tensorlist": lambda values: values,
    "restore_type_tag": lambda value, type_name: value,
}


class UnreadableArchive(Exception):
    """The archive holds something this reader does not build (its message says what)."""


def is_openai_archive(path: Path) -> bool:
    """Whether a checkpoint is a TorchScript archive, the form of OpenAI's CLIP files (``clip.load``'s cache)."""
    try:
        with zipfile.ZipFile(path) as archive:
            return any(name.endswith("constants.pkl") for name in archive.namelist())
    except (OSError, zipfile.BadZipFile):
        return False


class _ScriptModule:
    """A module of the archive: its TorchScript type's qualified name and its attributes."""

    type_name = ""

    def __setstate__(self, state: Any) -> None:
        if not isinstance(state, dict):
            raise UnreadableArchive(f"module {self.type_name} pickles its state as {type(state).__name__}, not by name")
        self.attributes = state


class _WeightsUnpickler(pickle.Unpickler):
    """Tensors by their storages' files, modules as placeholders; every other global is refused."""

    def __init__(self, archive: zipfile.ZipFile, folder: str, data: bytes) -> None:
        import io

        super().__init__(io.BytesIO(data))
        self.archive, self.folder = archive, folder
        self.storages: dict[str, Any] = {}
        self.module_types: dict[str, type] = {}

    def find_class(self, module: str, name: str) -> Any:
        if module == "__torch__" or module.startswith("__torch__."):
            qualified = f"{module}.{name}"
            if qualified not in self.module_types:
                self.module_types[qualified] = type(name, (_ScriptModule,), {"type_name": qualified})
            return self.module_types[qualified]
        if module == "torch" and name in STORAGE_TYPES:
            return STORAGE_TYPES[name]
        if module == "collections" and name == "OrderedDict":
            return OrderedDict
        if module == "torch._utils" and name == "_rebuild_tensor_v2":
            return _rebuild_tensor
        if module == "torch.jit._pickle" and name in TYPED_CONTAINERS:  # a list or dict's static type, for TorchScript
            return TYPED_CONTAINERS[name]
        if module == "torch._utils" and name == "_rebuild_parameter":
            return lambda data, requires_grad, backward_hooks: data
        raise UnreadableArchive(f"it pickles {module}.{name}, which a CLIP archive's weights do not need")

    def persistent_load(self, record: Any) -> Any:
        """A storage: ``('storage', element type, key, device, element count)``, its bytes in ``data/key``."""
        import torch

        if not (isinstance(record, tuple) and len(record) == 5 and record[0] == "storage" and record[1] in STORAGE_TYPES.values()):
            raise UnreadableArchive(f"a tensor stored as {str(record)[:80]}")
        _, dtype_name, key, _device, count = record
        if key not in self.storages:
            member = f"{self.folder}/{key}" if "/" in str(key) else f"{self.folder}/data/{key}"
            try:
                raw = bytearray(self.archive.read(member))
            except KeyError:
                raise UnreadableArchive(f"its tensor data {member} is missing") from None
            dtype = getattr(torch, dtype_name)
            flat = torch.frombuffer(raw, dtype=dtype) if raw else torch.empty(0, dtype=dtype)
            if flat.numel() != count:
                raise UnreadableArchive(f"{member} holds {flat.numel()} values, not {count}")
            self.storages[key] = flat
        return self.storages[key]


def _rebuild_tensor(storage: "torch.Tensor", offset: int, size: tuple, stride: tuple, *_ignored: Any) -> "torch.Tensor":
    return storage.as_strided(tuple(size), tuple(stride), offset)


def _declared_state(archive: zipfile.ZipFile, folder: str, type_name: str, cache: dict) -> set[str]:
    """The parameter and buffer names a module type declares in its TorchScript source."""
    if type_name not in cache:
        module, _, name = type_name.rpartition(".")
        source_path = f"{folder}/code/{module.replace('.', '/')}.py"
        try:
            source = archive.read(source_path).decode("utf-8")
        except KeyError:
            raise UnreadableArchive(f"no source for module type {type_name}") from None
        found = re.search(rf"^class {re.escape(name)}\(Module\):\n((?:  .*\n?)*)", source, re.MULTILINE)
        if found is None:
            raise UnreadableArchive(f"no class {name} in {source_path}")
        names: set[str] = set()
        for kind in ("__parameters__", "__buffers__"):
            declared = re.search(rf"^  {kind} = (\[.*?\])$", found.group(1), re.MULTILINE)
            if declared is None:
                raise UnreadableArchive(f"{type_name} does not list its {kind}")
            names.update(ast.literal_eval(declared.group(1)))
        cache[type_name] = names
    return cache[type_name]


def read_weights(path: Path) -> "dict[str, torch.Tensor]":
    """The state dict of a TorchScript archive, as ``torch.jit.load(path).state_dict()`` would give it
    (on the CPU). Raises :class:`UnreadableArchive` for what this reader does not build."""
    try:
        with zipfile.ZipFile(path) as archive:
            return _read(archive)
    except (zipfile.BadZipFile, OSError, EOFError) as error:  # a damaged or truncated zip
        raise UnreadableArchive(f"a damaged zip ({str(error)[:120]})") from None


def _read(archive: zipfile.ZipFile) -> "dict[str, torch.Tensor]":
    import sys

    import torch

    names = archive.namelist()
    pickles = [name for name in names if name.endswith("/data.pkl") and name.count("/") == 1]
    if len(pickles) != 1:
        raise UnreadableArchive("no top-level data.pkl" if not pickles else "more than one data.pkl")
    folder = pickles[0].split("/")[0]
    order = archive.read(f"{folder}/byteorder").decode().strip() if f"{folder}/byteorder" in names else "little"
    if order != sys.byteorder:
        raise UnreadableArchive(f"its tensors are {order}-endian")
    try:
        root = _WeightsUnpickler(archive, folder, archive.read(pickles[0])).load()
    except UnreadableArchive:
        raise
    except Exception as error:  # noqa: BLE001 - a damaged pickle raises many types
        raise UnreadableArchive(f"its data.pkl does not unpickle ({str(error)[:120]})") from None
    if not isinstance(root, _ScriptModule):
        raise UnreadableArchive("its data.pkl holds no module")
    state: dict = {}
    declared: dict[str, set[str]] = {}
    pending = [("", root)]
    while pending:
        prefix, node = pending.pop()
        kept = _declared_state(archive, folder, node.type_name, declared)
        for name, value in node.attributes.items():
            if isinstance(value, _ScriptModule):
                pending.append((f"{prefix}{name}.", value))
            elif name in kept and value is not None:
                if not isinstance(value, torch.Tensor):
                    raise UnreadableArchive(f"{prefix}{name} is declared a parameter or buffer but holds {type(value).__name__}")
                state[f"{prefix}{name}"] = value
    return state
