"""apecli: few-shot CLIP classification with APE (ICCV 2023) from HDF5 feature caches.

The library is usable without the command line::

    from apecli import load_features, select_channels, evaluate_training_free
    features = load_features("caches/caltech101/features-3f2a9c1d0b7e.h5")
    refinement = select_channels(features, k=500)
    result = evaluate_training_free(features, refinement)
"""

__version__ = "0.1.0"

from apecli.errors import ApecliError  # noqa: E402
from apecli.features import FeatureSet, load_features, save_features  # noqa: E402
from apecli.refine import Refinement, channel_criterion, select_channels  # noqa: E402
from apecli.evaluate import evaluate_training_free, evaluate_zero_shot  # noqa: E402

__all__ = [
    "ApecliError",
    "FeatureSet",
    "Refinement",
    "channel_criterion",
    "evaluate_training_free",
    "evaluate_zero_shot",
    "load_features",
    "save_features",
    "select_channels",
]
