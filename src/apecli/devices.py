"""Which torch device a stage runs on: a name checked once, with one clear line when it cannot be used.

The encoder, the search and the training take the same names: ``auto`` (CUDA when present), ``cpu``,
``cuda`` or ``cuda:N``, and ``mps`` on Apple's GPUs where torch has it (not for the search, which counts
in float64, which ``mps`` lacks).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from apecli.errors import ApecliError

if TYPE_CHECKING:
    import torch

NAMES = "auto, cpu, cuda, cuda:N or mps"


def torch_device(name: str, float64: bool = False) -> "torch.device":
    """The torch device called ``name``, refused in one line when it is unknown or absent here, or lacks
    float64 where ``float64`` asks for it."""
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise ApecliError(f"unknown device '{name}'; use {NAMES}") from None
    if device.type == "cpu":
        return device
    if device.type == "mps":
        if float64:
            raise ApecliError(f"device '{name}' has no float64, in which this step computes; use --device cpu or cuda")
        if not torch.backends.mps.is_available():
            raise ApecliError(f"device '{name}': torch has no usable Apple GPU here; use --device cpu")
        return device
    if device.type != "cuda":
        raise ApecliError(f"device '{name}' is not supported; use {NAMES}")
    if not torch.cuda.is_available():
        built = f"CUDA {torch.version.cuda}" if torch.version.cuda else "no CUDA"
        raise ApecliError(f"device '{name}': no CUDA GPU is usable here (torch {torch.__version__}, built with "
                          f"{built}); use --device cpu")
    count = torch.cuda.device_count()
    if device.index is not None and device.index >= count:
        raise ApecliError(f"device '{name}': this machine has {count} CUDA GPU{'s' if count != 1 else ''} "
                          f"(cuda:0 to cuda:{count - 1})")
    return device
