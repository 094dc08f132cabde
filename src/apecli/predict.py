"""Classify new images with an evaluated model: the evaluation artifact names everything needed.

An evaluation artifact records its mode, its method's hyperparameters and the state a prediction
needs; through its parents it reaches the feature set, whose metadata names the encoder (model,
weights and their hash). The method is rebuilt by the registry (:meth:`Method.restore
<apecli.methods.Method.restore>`), the images are encoded in memory with that encoder's evaluation
transform, and each gets the method's top classes and probabilities (the softmax of its logits, scaled
as the method says).
"""
from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from apecli import store
from apecli.checks import check_at_least
from apecli.datasets import IMAGE_SUFFIXES
from apecli.errors import ApecliError, InputError, Step
from apecli.files import file_sha256
from apecli.kinds.evaluation import EvaluationRecord
from apecli.kinds.features import FeatureSet, features_of
from apecli.methods import registry
from apecli.store import plain_name, shown

__all__ = ["Classifier", "Prediction", "encoder_spec", "features_of", "image_files", "load_classifier", "predict"]

Scores = Callable[[np.ndarray], np.ndarray]  # L2-normalised features N × D → scores N × C


@dataclass(frozen=True)
class Prediction:
    path: str
    labels: tuple[str, ...]
    probabilities: tuple[float, ...]


@dataclass(frozen=True)
class Classifier:
    """An evaluated model: ``scores`` decide (their argmax is the prediction, as its evaluation counted
    it) and ``probabilities`` report, for L2-normalised features of the model's encoder."""

    features: FeatureSet  # what it was fitted on: class names, text, cache
    scores: Scores
    probabilities: Scores


def load_classifier(evaluation: store.Artifact) -> Classifier:
    """The classifier an evaluation artifact chose, rebuilt from it and its parents."""
    record = EvaluationRecord.read(evaluation)
    known = registry.methods()
    if record.mode not in known:
        raise InputError(evaluation.path, f"mode '{record.mode}' cannot be applied to new features (no method of "
                                          f"that name is installed; known: {', '.join(known)})")
    method = known[record.mode]
    outdated = method.outdated(record.summary)
    if outdated is not None:
        raise InputError(evaluation.path, outdated)
    features = record.features()
    try:
        fitted = method.restore(dict(record.hyperparameters), record.state(features, method.task_state))
    except ApecliError as error:
        raise error.within(f"{evaluation.path}: ") from None
    except (KeyError, ValueError, TypeError, IndexError) as error:  # a state that does not fit the method
        raise InputError(evaluation.path, f"its {record.mode} state cannot be restored "
                                          f"({type(error).__name__}: {error})") from None
    return Classifier(features, lambda x: np.asarray(fitted.logits(x)), fitted.probabilities)


def encoder_spec(features: FeatureSet, device: str, folder: Path):
    """The encoder the feature set was extracted with, checked to be the same weights."""
    from apecli.encoder import CARRIES_WEIGHTS, EncoderSpec

    recorded = features.encoder
    if not recorded.extracted:
        raise ApecliError(f"{features.name}: records no encoder (imported features?); predicting needs features "
                          f"made by {Step('extract')}")
    name = recorded.model
    if name.startswith(CARRIES_WEIGHTS):
        spec = EncoderSpec(name, None, device, "auto")
        if spec.identity()["checkpoint_sha256"] != recorded.checkpoint_sha256:
            raise ApecliError(f"{name}: its weights changed since the features were extracted (their SHA-256 differs)")
        return spec
    if recorded.model_config is not None:
        if not plain_name(name):  # a name read from a file is data: it never becomes a path to write to
            raise InputError(features.artifact.path if features.artifact else features.name,
                             f"records the model name '{shown(name)}', which is not a model config's name")
        config = folder / f"{name}.json"
        config.write_text(json.dumps(recorded.model_config))
        name = str(config)
    if recorded.checkpoint_sha256 is not None:
        checkpoint = Path(recorded.pretrained)
        if not checkpoint.is_file():
            raise ApecliError(f"{features.name}: its checkpoint {checkpoint} is missing")
        if file_sha256(checkpoint) != recorded.checkpoint_sha256:
            raise ApecliError(f"{checkpoint}: changed since the features were extracted (its SHA-256 differs)")
    spec = EncoderSpec(name, recorded.pretrained, device, "auto")
    if spec.forces_quick_gelu() and not recorded.quick_gelu:
        raise ApecliError(f"{features.name}: extracted with GELU (by an earlier apecli), but its weights were trained "
                          "with QuickGELU, which new images would now be encoded with: extract it again")
    return spec


def image_files(paths: Sequence[str | Path]) -> list[Path]:
    """The files to classify: each file as given, and for each folder the image files in it and in the
    folders below (by suffix, sorted by path; hidden ones left out)."""
    files: list[Path] = []
    for path in map(Path, paths):
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()
                           and not any(part.startswith(".") for part in p.relative_to(path).parts))
            if not found:
                raise InputError(path, f"a folder with no image files ({', '.join(sorted(IMAGE_SUFFIXES))})")
            files += found
        elif path.is_file():
            files.append(path)
        else:
            raise InputError(path, "no such file or folder")
    return files


def predict(
    paths: Sequence[Path],
    evaluation: store.Artifact,
    top: int = 5,
    device: str = "auto",
    batch_size: int = 64,
    workers: int | None = None,
    skip_bad: bool = False,
    progress: Callable[[str, int, int], None] | None = None,
) -> tuple[list[Prediction], list[dict[str, str]]]:
    """Top-``top`` labels and probabilities of each image (a folder stands for its image files, see
    :func:`image_files`), encoded in memory and decoded in ``workers`` processes (0: in this one; None: as
    many as extract uses on the device); unreadable images fail, or are listed with ``skip_bad``."""
    from apecli.encoder import load_encoder
    from apecli.extract import ExtractSettings, default_workers, encode_images

    check_at_least("top", top)
    if not paths:
        raise ApecliError("no images to classify")
    paths = image_files(paths)
    model = load_classifier(evaluation)
    features = model.features
    with tempfile.TemporaryDirectory() as folder:
        encoder = load_encoder(encoder_spec(features, device, Path(folder)))
    workers = default_workers(str(encoder.device)) if workers is None else workers
    settings = ExtractSettings(batch_size=batch_size, workers=workers, skip_bad=skip_bad,  # as the features were
                               exif_orientation=features.exif_orientation)
    encoded, ok, errors = encode_images(encoder, list(paths), settings, progress)
    x = encoded[ok].astype(np.float64)
    probabilities = (model.probabilities(x / np.linalg.norm(x, axis=1, keepdims=True)) if ok.any()
                     else np.zeros((0, features.num_classes)))
    best = np.argsort(-probabilities, axis=1, kind="stable")[:, : min(top, features.num_classes)]
    kept = [str(p) for p, good in zip(paths, ok) if good]
    predictions = [Prediction(path, tuple(features.class_names[c] for c in row), tuple(float(probabilities[i, c]) for c in row))
                   for i, (path, row) in enumerate(zip(kept, best))]
    skipped = [{"path": str(p), "error": e} for p, good, e in zip(paths, ok, errors) if not good]
    return predictions, skipped
