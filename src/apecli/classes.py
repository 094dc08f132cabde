"""Per-class results of an evaluation: how well the chosen model does on each class's test images, how
well zero-shot CLIP did there, and which classes it takes each one for.

Everything comes from what the store already holds: the evaluation's test predictions and, through its
parents, the feature set's test labels, class names, text classifier and (for extracted stores) image
paths. Nothing is encoded or searched again.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from apecli import store
from apecli.errors import ApecliError


@dataclass(frozen=True)
class ClassResult:
    """One class's test images: how many, how many the model and zero-shot CLIP got right, and the
    classes the model predicted instead, commonest first (label, count; equal counts: lower label)."""

    label: int
    name: str
    images: int
    correct: int
    zero_shot_correct: int
    mistaken_for: tuple[tuple[int, int], ...]

    @property
    def accuracy(self) -> float:
        return 100.0 * self.correct / self.images

    @property
    def zero_shot_accuracy(self) -> float:
        return 100.0 * self.zero_shot_correct / self.images


@dataclass(frozen=True)
class ClassReport:
    """The per-class results of one evaluation, worst accuracy first (equal accuracies: lower label)."""

    mode: str | None
    dataset: str | None
    shots: int | None
    class_names: tuple[str, ...]  # every class, by label
    classes: tuple[ClassResult, ...]  # the classes present in the test split
    misclassified: tuple[tuple[str, int, int], ...]  # (path, label, predicted) of each wrong test image, when paths are known

    @property
    def absent(self) -> tuple[str, ...]:
        """The classes with no test image."""
        present = {result.label for result in self.classes}
        return tuple(name for label, name in enumerate(self.class_names) if label not in present)

    @property
    def mean_accuracy(self) -> float:
        """The mean over the classes present of their accuracy, in percent (the evaluation's
        ``test_class_accuracy``)."""
        return float(np.mean([result.accuracy for result in self.classes]))

    def summary(self) -> dict:
        """The JSON-ready report; class labels come with their names."""
        named = self.class_names.__getitem__
        return {
            "mode": self.mode,
            "dataset": self.dataset,
            "shots": self.shots,
            "mean_class_accuracy": self.mean_accuracy,
            "classes": [{"label": r.label, "name": r.name, "images": r.images, "correct": r.correct,
                         "accuracy": r.accuracy, "zero_shot_accuracy": r.zero_shot_accuracy,
                         "mistaken_for": [{"label": label, "name": named(label), "images": count}
                                          for label, count in r.mistaken_for]}
                        for r in self.classes],
            "absent": list(self.absent),
            "misclassified": [{"path": path, "label": label, "name": named(label), "predicted": predicted,
                               "predicted_name": named(predicted)} for path, label, predicted in self.misclassified],
        }


def per_class(
    labels: np.ndarray,
    predictions: np.ndarray,
    zero_shot: np.ndarray,
    class_names: tuple[str, ...],
) -> list[ClassResult]:
    """The results of every class present in ``labels``, worst accuracy first."""
    labels, predictions, zero_shot = (np.asarray(a, dtype=np.int64) for a in (labels, predictions, zero_shot))
    if not labels.shape == predictions.shape == zero_shot.shape:
        raise ApecliError(f"{predictions.shape[0]} predictions for {labels.shape[0]} test images")
    count = len(class_names)
    if labels.size and (min(labels.min(), predictions.min()) < 0 or max(labels.max(), predictions.max()) >= count):
        raise ApecliError(f"labels or predictions outside the {count} classes")
    confusion = np.bincount(labels * count + predictions, minlength=count * count).reshape(count, count)
    images = confusion.sum(axis=1)
    zero_shot_correct = np.bincount(labels, weights=(zero_shot == labels), minlength=count).astype(np.int64)
    results = []
    for label in np.flatnonzero(images):
        row = confusion[label].copy()
        row[label] = 0
        wrong = np.flatnonzero(row)
        order = wrong[np.lexsort((wrong, -row[wrong]))]  # commonest first, then lower label
        results.append(ClassResult(int(label), class_names[label], int(images[label]), int(confusion[label, label]),
                                   int(zero_shot_correct[label]), tuple((int(c), int(row[c])) for c in order)))
    return sorted(results, key=lambda r: (r.correct / r.images, r.label))


def class_report(evaluation: store.Artifact) -> ClassReport:
    """The per-class test results of an evaluation artifact (from ``apecli eval``)."""
    from apecli.evaluate import zero_shot_predictions
    from apecli.predict import features_of

    if evaluation.kind != "evaluation":
        raise ApecliError(f"{evaluation.path}: is an artifact of kind '{evaluation.kind}'; expected an evaluation (from apecli eval)")
    if "test/predictions" not in evaluation:
        raise ApecliError(f"{evaluation.path}: holds no test predictions (an evaluation by an earlier apecli); evaluate again")
    features = features_of(evaluation)
    test = features.split("test")
    predictions = evaluation.read("test/predictions")
    if predictions.shape != test.labels.shape:
        raise ApecliError(f"{evaluation.path}: holds {predictions.shape[0]} test predictions, but its features "
                          f"hold {test.labels.shape[0]} test images")
    results = per_class(test.labels, predictions, zero_shot_predictions(features, "test"), features.class_names)
    wrong = np.flatnonzero(predictions != test.labels)
    misclassified = () if test.paths is None else tuple(
        (str(test.paths[i]), int(test.labels[i]), int(predictions[i])) for i in wrong)
    meta = evaluation.metadata
    return ClassReport(meta.get("mode"), meta.get("dataset"), meta.get("shots"), tuple(features.class_names),
                       tuple(results), misclassified)
