"""Per-class results of an evaluation: how well the chosen model does on each class's test images, how
well zero-shot CLIP did there, and which classes it takes each one for; likewise on a target of a
transfer (a shifted test set, over its own classes).

Everything comes from what the store already holds: the evaluation's (or transfer's) test predictions
and, through its parents, the feature set's test labels, class names, text classifier and (for
extracted stores) image paths. Nothing is encoded or searched again.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from apecli import store
from apecli.errors import ApecliError, InputError, Step
from apecli.kinds.evaluation import KIND as EVALUATION
from apecli.kinds.evaluation import EvaluationRecord
from apecli.kinds.transfer import KIND as TRANSFER
from apecli.kinds.transfer import TransferRecord


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
    chosen_on: str | None = None  # of a transfer's target: the dataset the model was chosen on

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
            **({"chosen_on": self.chosen_on} if self.chosen_on else {}),
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


def class_report(artifact: store.Artifact, target: str | None = None) -> ClassReport:
    """The per-class test results of an evaluation artifact (from :func:`~apecli.evaluate.evaluate_artifact`),
    or of one target of a transfer artifact (from :func:`~apecli.transfer.transfer`): ``target`` names it by
    dataset or features path, and may be left out where there is one target."""
    from apecli.evaluate import zero_shot_predictions

    if artifact.kind == TRANSFER:
        record = TransferRecord.read(artifact)
        index = record.target_index(target)
        features, predictions = record.target_features(index), record.predictions(index)
        mode, shots, dataset, chosen_on = record.mode, record.shots, features.dataset, record.dataset or "its source"
    elif artifact.kind == EVALUATION:
        if target is not None:
            raise InputError(artifact.path, "is an evaluation, of its own test split; a target is chosen among a "
                                            "transfer artifact's")
        evaluation = EvaluationRecord.read(artifact)
        predictions = evaluation.test_predictions()
        features = evaluation.features()
        mode, shots, dataset, chosen_on = evaluation.mode, evaluation.shots, evaluation.dataset, None
    else:
        raise InputError(artifact.path, f"is an artifact of kind '{artifact.kind}'; expected an evaluation (from "
                                        f"{Step('evaluate_artifact')}) or a transfer (from {Step('transfer')})")
    test = features.split("test")
    if predictions.shape != test.labels.shape:
        raise InputError(artifact.path, f"holds {predictions.shape[0]} test predictions, but its features hold "
                                        f"{test.labels.shape[0]} test images")
    results = per_class(test.labels, predictions, zero_shot_predictions(features, "test"), features.class_names)
    wrong = np.flatnonzero(predictions != test.labels)
    misclassified = () if test.paths is None else tuple(
        (str(test.paths[i]), int(test.labels[i]), int(predictions[i])) for i in wrong)
    return ClassReport(mode, dataset, shots, tuple(features.class_names), tuple(results), misclassified,
                       chosen_on=chosen_on)
