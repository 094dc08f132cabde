"""Which torch device a step runs on: a name checked once, with one clear error when it cannot be used.

The encoder, the search and the training take the same names: ``auto`` (CUDA when present), ``cpu``,
``cuda`` or ``cuda:N``, and ``mps`` on Apple's GPUs where torch has it (not for the searches, which
count in float64, which ``mps`` lacks). A command resolves its device once (:func:`resolve`) and hands
the resolved name on.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from apecli.errors import ChoiceError, Setting, SettingError

if TYPE_CHECKING:
    import torch

NAMES = "auto, cpu, cuda, cuda:N or mps"
CHOICES = ("auto", "cpu", "cuda", "cuda:N", "mps")
ON_CPU = Setting("device", "cpu")


def torch_device(name: str, float64: bool = False) -> "torch.device":
    """The torch device called ``name``, refused in one line when it is unknown or absent here, or lacks
    float64 where ``float64`` asks for it."""
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise ChoiceError("device", name, f"unknown device '{name}'; use {NAMES}", CHOICES) from None
    if device.type == "cpu":
        return device
    if device.type == "mps":
        if float64:
            raise SettingError("device", name, f"device '{name}' has no float64, in which this step computes; use "
                                               f"{ON_CPU} or cuda", ON_CPU)
        if not torch.backends.mps.is_available():
            raise SettingError("device", name, f"device '{name}': torch has no usable Apple GPU here; use {ON_CPU}",
                               ON_CPU)
        return device
    if device.type != "cuda":
        raise ChoiceError("device", name, f"device '{name}' is not supported; use {NAMES}", CHOICES)
    if not torch.cuda.is_available():
        built = f"CUDA {torch.version.cuda}" if torch.version.cuda else "no CUDA"
        raise SettingError("device", name, f"device '{name}': no CUDA GPU is usable here (torch {torch.__version__}, "
                                           f"built with {built}); use {ON_CPU}", ON_CPU)
    count = torch.cuda.device_count()
    if device.index is not None and device.index >= count:
        raise SettingError("device", name, f"device '{name}': this machine has {count} CUDA GPU"
                                           f"{'s' if count != 1 else ''} (cuda:0 to cuda:{count - 1})")
    return device


def resolve(name: str | None, float64: bool = False) -> str:
    """The device a step runs on, as torch names it (``cpu``, ``cuda``, ``cuda:1``), checked once: the CPU
    for None, without importing torch."""
    if name in (None, "cpu"):
        return "cpu"
    return str(torch_device(name, float64))


def as_device(device: "torch.device | str | None", float64: bool = False) -> "torch.device":
    """``device`` when it is a ``torch.device`` already (resolved once, by the caller); the CPU for None; a
    name checked by :func:`torch_device`."""
    import torch

    if isinstance(device, torch.device):
        return device
    return torch_device("cpu" if device is None else str(device), float64)
