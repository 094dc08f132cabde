"""The fit stage: APE-T's adapter trained on a feature set's cache (the training itself is
:mod:`apecli.methods.ape_t`; the adapter artifact is :mod:`apecli.kinds.adapter`)."""

from __future__ import annotations

from apecli.devices import resolve
from apecli.kinds.features import FeatureSet
from apecli.methods.ape_t import FitResult, FitSettings, train
from apecli.methods.base import EpochProgress


def fit(features: FeatureSet, settings: FitSettings = FitSettings(), progress: EpochProgress | None = None,
        val_cache_bytes: int | None = None, device: str | None = None) -> FitResult:
    """Train APE-T on a feature set's cache (its stored views when it has them, else its keys), on
    ``device`` (``cpu`` by default; ``cuda`` trains with deterministic kernels), choosing its epoch on
    the validation images ``settings.val_shots`` says. The validation images' products with the fixed
    keys are kept across epochs within ``val_cache_bytes`` (default: a quarter of the memory available,
    see :func:`apecli.methods.ape_t.val_cache_budget`); 0 recomputes them every epoch."""
    on = resolve(device)
    settings = settings.resolve(features)
    return train(features.task(settings.shots, settings.val_shots, on), settings, progress, val_cache_bytes)
