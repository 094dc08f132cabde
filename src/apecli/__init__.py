"""apecli: few-shot CLIP classification with APE (ICCV 2023) from HDF5 feature caches.

The library is usable without the command line::

    from apecli import load_features, select_channels, evaluate_training_free
    features = load_features("caches/caltech101/features-3f2a9c1d0b7e.h5")
    refinement = select_channels(features, k=500)
    result = evaluate_training_free(features, refinement)
    given = evaluate_training_free(features, refinement, default_grid(features).fixing(alpha=1.2))  # β, γ searched

APE-T, and a classifier for new images' features, go the same way::

    from apecli import FitSettings, fit, save_fit, evaluate_training_required, save_evaluation, load_classifier
    fitted = save_fit(fit(features, FitSettings(shots=16)), features, "caches/caltech101/fit.h5")
    result = evaluate_training_required(features, fitted)
    classifier = load_classifier(save_evaluation(result, [fitted.artifact], "caches/caltech101/eval.h5"))
    probabilities = classifier.probabilities(new_features)  # L2-normalised features of the same encoder

Any method of the registry, a plugin's included, by name or as an object::

    from apecli import evaluate_artifact, evaluate_method, Method, Task

Each name below is imported from its module the first time it is used, so importing apecli loads none
of its modules, nor torch, open_clip or h5py.
"""

from __future__ import annotations

import importlib
from typing import Any

from apecli.version import __version__ as __version__

_PUBLIC = {  # name → the module that defines it
    "ApecliError": "apecli.errors",
    "EncoderSpec": "apecli.encoder",
    "ExtractSettings": "apecli.extract",
    "FeatureSet": "apecli.kinds.features",
    "FitSettings": "apecli.methods.ape_t",
    "Method": "apecli.methods.base",
    "Refinement": "apecli.kinds.refinement",
    "SearchGrid": "apecli.methods.grid",
    "Task": "apecli.methods.base",
    "channel_criterion": "apecli.methods.criterion",
    "class_report": "apecli.classes",
    "default_grid": "apecli.evaluate",
    "evaluate_artifact": "apecli.evaluate",
    "evaluate_method": "apecli.evaluate",
    "evaluate_training_free": "apecli.evaluate",
    "evaluate_training_required": "apecli.evaluate",
    "evaluate_zero_shot": "apecli.evaluate",
    "export_npz": "apecli.importers",
    "fit": "apecli.fitting",
    "import_npz": "apecli.importers",
    "import_tip_adapter": "apecli.importers",
    "load_classifier": "apecli.predict",
    "load_features": "apecli.kinds.features",
    "load_fit": "apecli.kinds.adapter",
    "save_evaluation": "apecli.kinds.evaluation",
    "save_features": "apecli.kinds.features",
    "save_fit": "apecli.kinds.adapter",
    "select_channels": "apecli.refine",
}

__all__ = sorted(_PUBLIC)


def __getattr__(name: str) -> Any:
    if name not in _PUBLIC:
        raise AttributeError(f"module 'apecli' has no attribute '{name}'")
    value = getattr(importlib.import_module(_PUBLIC[name]), name)
    globals()[name] = value  # found once
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_PUBLIC])
