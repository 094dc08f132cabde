"""Classify new images with an evaluated model: the evaluation artifact names everything needed.

An evaluation artifact records its mode and chosen hyperparameters; through its parents it reaches the
feature set, whose metadata names the encoder (model, weights and their hash). The images are encoded
with that encoder's evaluation transform, and classified by the mode's classifier:

- zero-shot: ``100 · x Wᵀ``; training-free: APE's tri-edge logits (the stored channels, α, β, γ);
- training-required: the fitted adapter's logits (α, β); tip-adapter / tip-adapter-f: the cache
  classifier (the stored trained keys for -F); gda: the zero-shot logits plus α times GDA's head,
  recomputed from the stored views; probabilities are the softmax of these logits;
- proker: its regression ``f₀(x) + k(x, S)(K/λ + I)⁻¹(Y − f₀(S))``, on the scale of CLIP's cosines,
  whose probabilities are the softmax of 100 times it, as CLIP's own logits are scaled.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from apecli import store
from apecli.datasets import IMAGE_SUFFIXES
from apecli.errors import ApecliError
from apecli.features import FeatureSet, load_features
from apecli.refine import read_channels
from apecli.training_free import CacheModel, TriEdge, softmax

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


def features_of(artifact: store.Artifact) -> FeatureSet:
    """The feature set at the root of an artifact's parents (each checked unchanged)."""
    while artifact.kind != "features":
        if not artifact.parents:
            raise ApecliError(f"{artifact.path}: leads to no features artifact")
        artifact = artifact.parent(artifact.parents[0].kind)
    return load_features(artifact, with_views=False)


def load_classifier(evaluation: store.Artifact) -> Classifier:
    """The classifier an evaluation artifact chose, rebuilt from it and its parents."""
    if evaluation.kind != "evaluation":
        raise ApecliError(f"{evaluation.path}: is an artifact of kind '{evaluation.kind}'; expected an evaluation (from apecli eval)")
    meta = evaluation.metadata
    mode = meta.get("mode")
    features = features_of(evaluation)
    text = features.classifier.astype(np.float64)

    def made(scores: Scores, probabilities: Callable[[np.ndarray], np.ndarray] = softmax) -> Classifier:
        return Classifier(features, scores, lambda x: probabilities(scores(x)))

    if mode == "zero-shot":
        return made(lambda x: 100.0 * x @ text.T)
    shots, cache = features.cache(meta.get("shots"))
    alpha, beta, gamma = meta.get("alpha"), meta.get("beta"), meta.get("gamma")
    if mode == "training-free":
        tri = TriEdge.build(features.classifier, cache.keys, cache.labels, read_channels(evaluation, features.dim))
        return made(lambda x: tri.logits(x, alpha, beta, gamma))
    if mode == "training-required":
        from apecli.training_required import load_fit

        fitted, _ = load_fit(evaluation.parent("adapter"))
        model = fitted.adapter.cache_model(features)
        return made(lambda x: model.logits(x, alpha, beta))
    if mode in ("tip-adapter", "tip-adapter-f"):
        keys = evaluation.read("learned/keys") if mode == "tip-adapter-f" else cache.keys
        if keys.shape != cache.keys.shape:
            raise ApecliError(f"{evaluation.path}: trained keys of shape {keys.shape}, for a cache of {cache.keys.shape}")
        model = CacheModel(features.classifier, keys, cache.labels, np.ones(cache.labels.shape[0]))
        return made(lambda x: model.logits(x, alpha, beta))
    if mode == "gda":
        from apecli.baselines import gda_for

        weights, bias, _ = gda_for(features, shots)
        return made(lambda x: 100.0 * x @ text.T + alpha * (x @ weights.T + bias))
    if mode == "proker":
        from apecli.baselines import PROKER_FORMULA, ProkerSupport

        if meta.get("formula") != PROKER_FORMULA:
            raise ApecliError(f"{evaluation.path}: a ProKeR evaluation by an earlier apecli, whose regression differed "
                              "(f₀ was CLIP's softmax); its β and λ do not fit this one: run apecli eval --mode proker again")
        return made(ProkerSupport.of(features, shots).predictor(beta, meta["lambda"]),
                    lambda scores: softmax(100.0 * scores))
    raise ApecliError(f"{evaluation.path}: mode '{mode}' cannot be applied to new features")


def encoder_spec(features: FeatureSet, device: str, folder: Path):
    """The encoder the feature set was extracted with, checked to be the same weights."""
    from apecli.encoder import CARRIES_WEIGHTS, EncoderSpec

    model = dict(features.model)
    if "pretrained" not in model or "model" not in model:
        raise ApecliError(f"{features.name}: records no encoder (imported features?); predict needs features "
                          "made by apecli extract")
    name = model["model"]
    if name.startswith(CARRIES_WEIGHTS):
        spec = EncoderSpec(name, None, device, "auto")
        if spec.identity()["checkpoint_sha256"] != model.get("checkpoint_sha256"):
            raise ApecliError(f"{name}: its weights changed since the features were extracted (their SHA-256 differs)")
        return spec
    if "model_config" in model:
        config = folder / f"{name}.json"
        config.write_text(json.dumps(model["model_config"]))
        name = str(config)
    if "checkpoint_sha256" in model:
        checkpoint = Path(model["pretrained"])
        if not checkpoint.is_file():
            raise ApecliError(f"{features.name}: its checkpoint {checkpoint} is missing")
        if store.file_sha256(checkpoint) != model["checkpoint_sha256"]:
            raise ApecliError(f"{checkpoint}: changed since the features were extracted (its SHA-256 differs)")
    spec = EncoderSpec(name, model["pretrained"], device, "auto")
    if spec.forces_quick_gelu() and not model.get("quick_gelu"):
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
                raise ApecliError(f"{path}: a folder with no image files ({', '.join(sorted(IMAGE_SUFFIXES))})")
            files += found
        elif path.is_file():
            files.append(path)
        else:
            raise ApecliError(f"{path}: no such file or folder")
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
    :func:`image_files`), decoded in ``workers`` processes (0: in this one; None: as many as extract
    uses on the device); unreadable images fail, or are listed with ``skip_bad``."""
    from apecli.encoder import load_encoder
    from apecli.extract import ExtractSettings, default_workers, encode_split

    if top < 1:
        raise ApecliError(f"--top must be at least 1, got {top}")
    if not paths:
        raise ApecliError("no images to classify")
    paths = image_files(paths)
    model = load_classifier(evaluation)
    features = model.features
    with tempfile.TemporaryDirectory() as folder:
        encoder = load_encoder(encoder_spec(features, device, Path(folder)))
        workers = default_workers(str(encoder.device)) if workers is None else workers
        settings = ExtractSettings(batch_size=batch_size, workers=workers, skip_bad=skip_bad,  # as the features were
                                   exif_orientation=bool(features.provenance.get("exif_orientation", False)))
        encoded, ok, errors = encode_split(encoder, "images", list(paths), 0, Path(folder), settings, progress)
    x = encoded[ok].astype(np.float64)
    probabilities = (model.probabilities(x / np.linalg.norm(x, axis=1, keepdims=True)) if ok.any()
                     else np.zeros((0, features.num_classes)))
    best = np.argsort(-probabilities, axis=1, kind="stable")[:, : min(top, features.num_classes)]
    kept = [str(p) for p, good in zip(paths, ok) if good]
    predictions = [Prediction(path, tuple(features.class_names[c] for c in row), tuple(float(probabilities[i, c]) for c in row))
                   for i, (path, row) in enumerate(zip(kept, best))]
    skipped = [{"path": str(p), "error": e} for p, good, e in zip(paths, ok, errors) if not good]
    return predictions, skipped
