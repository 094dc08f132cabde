"""The refine stage: APE's prior refinement of a feature set's cache (APE, section 3.2), the channels
kept for training-free APE. The criterion itself is :mod:`apecli.methods.criterion`; the record and its
artifact are :mod:`apecli.kinds.refinement`."""

from __future__ import annotations

from apecli.kinds.features import FeatureSet
from apecli.kinds.refinement import Refinement
from apecli.methods.criterion import channel_criterion, top_channels
from apecli.presets import preset_for


def select_channels(
    features: FeatureSet,
    k: int | None = None,
    weights: tuple[float, float] | None = None,
    shots: int | None = None,
) -> Refinement:
    """Refine a feature set: APE's criterion on its text classifier and ``shots``-shot cache.

    Defaults come from the dataset's preset (k scaled to the feature width).
    """
    preset = preset_for(features.dataset)
    if k is None:
        k = preset.scaled_k(preset.k_training_free, features.dim)
    weights = tuple(weights) if weights is not None else preset.w_training_free
    shots, cache = features.cache(shots)
    criterion = channel_criterion(features.classifier, cache.keys, cache.labels, weights)
    return Refinement(top_channels(criterion, k), criterion, shots, weights)
