"""The command line's words for what the library names in Python: the one table that turns a setting
(```val_shots=5```) into a flag (``--val-shots 5``) and a library call (```evaluate_artifact()```) into a
command (``apecli eval``), in error messages, warnings and reports alike.

The library marks each name it uses in a message between backticks (:class:`apecli.errors.Setting`,
:class:`apecli.errors.Step`); a name not in these tables is left as the library wrote it.
"""

from __future__ import annotations

import re

FLAGS = {  # a setting's Python name → the flag that sets it
    "allow_missing": "--allow-missing-prompts",
    "candidates": "--candidates",
    "format": "--format",
    "class_names": "--class-names",
    "dataset": "--dataset",
    "decode": "--decode",
    "device": "--device",
    "epochs": "--epochs",
    "k": "--k",
    "ks": "--k",
    "mode": "--mode",
    "model": "--model",
    "normalise": "--normalise",
    "precision": "--precision",
    "pretrained": "--pretrained",
    "root": "--root",
    "scale": "--search-scale",
    "seed": "--seed",
    "shots": "--shots",
    "skip_bad": "--skip-bad",
    "splits": "--splits",
    "steps": "--search-step",
    "store": "--store",
    "target": "--target",
    "targets": "--to",
    "text_weights": "--text-weights",
    "texts": "--text-model",
    "top": "--top",
    "trust_torchscript": "--trust-torchscript",
    "val_shots": "--val-shots",
    "views": "--views",
    "work": "--work",
}
COMMANDS = {  # a library call → what does it on the command line
    "class_texts": "--text-model NAME --pretrained TAG",
    "evaluate_artifact": "apecli eval",
    "extract": "apecli extract",
    "fit": "apecli fit",
    "known_models": "apecli models",
    "read_image_folder": "--images DIR",
    "transfer": "apecli transfer",
}
_NAMED = re.compile(r"`([A-Za-z_][\w.]*)(?:\((?P<call>[^`]*)\)|=(?P<value>[^`]*))?`")
_ARGUMENT = re.compile(r"(\w+)=('[^']*'|[^,]*)(?:,\s*|$)")


def in_flags(text: str) -> str:
    """``text`` with every setting and call it names in Python said as the command line says it."""
    return _NAMED.sub(_said, text)


def _said(match: re.Match) -> str:
    name, call, value = match.group(1), match.group("call"), match.group("value")
    if call is not None:
        if name not in COMMANDS:
            return match.group(0)
        flags = [_flag(argument, given) for argument, given in _ARGUMENT.findall(call)]
        return " ".join([COMMANDS[name], *flags])
    if name not in FLAGS:
        return match.group(0)
    return FLAGS[name] if value is None else _flag(name, value)


def _flag(name: str, value: str) -> str:
    """``--flag value`` for a setting given a value (as Python's repr wrote it); ``--flag`` alone for True."""
    flag = FLAGS.get(name, f"--{name.replace('_', '-')}")
    value = value.strip()
    if value == "True":
        return flag
    if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
        value = value[1:-1]
    return f"{flag} {value}"
