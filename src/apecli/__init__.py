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

Importing apecli loads neither torch nor open_clip: each is imported where it is first needed.
"""

__version__ = "0.1.0"

from apecli.errors import ApecliError  # noqa: E402
from apecli.features import FeatureSet, load_features, save_features  # noqa: E402
from apecli.refine import Refinement, channel_criterion, select_channels  # noqa: E402
from apecli.training_free import SearchGrid  # noqa: E402
from apecli.evaluate import (  # noqa: E402
    default_grid,
    evaluate_artifact,
    evaluate_training_free,
    evaluate_training_required,
    evaluate_zero_shot,
    save_evaluation,
)
from apecli.training_required import FitSettings, fit, load_fit, save_fit  # noqa: E402
from apecli.importers import export_npz, import_npz, import_tip_adapter  # noqa: E402
from apecli.encoder import EncoderSpec  # noqa: E402
from apecli.extract import ExtractSettings  # noqa: E402
from apecli.predict import load_classifier  # noqa: E402
from apecli.classes import class_report  # noqa: E402

__all__ = [
    "ApecliError",
    "EncoderSpec",
    "ExtractSettings",
    "FeatureSet",
    "FitSettings",
    "Refinement",
    "SearchGrid",
    "channel_criterion",
    "class_report",
    "default_grid",
    "evaluate_artifact",
    "evaluate_training_free",
    "evaluate_training_required",
    "evaluate_zero_shot",
    "export_npz",
    "fit",
    "import_npz",
    "import_tip_adapter",
    "load_classifier",
    "load_features",
    "load_fit",
    "save_evaluation",
    "save_features",
    "save_fit",
    "select_channels",
]
