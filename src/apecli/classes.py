"""Per-class results of an evaluation: how well the chosen model does on each class's test images, how
well zero-shot CLIP did there, and which classes it takes each one for; likewise on a target of a
transfer (a shifted test set, over its own classes).

Everything comes from what the store already holds: the evaluation's (or transfer's) test predictions
and, through its parents, the feature set's test labels, class names, text classifier and (for
extracted stores) image paths. Nothing is encoded or searched again.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

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
    """The per-class test results of an evaluation artifact (from ``apecli eval``), or of one target of
    a transfer artifact (from ``apecli transfer``): ``target`` names it by dataset or features path, and
    may be left out where there is one target."""
    from apecli.evaluate import zero_shot_predictions
    from apecli.features import load_features
    from apecli.predict import features_of

    meta = artifact.metadata
    if artifact.kind == "transfer":
        index = _target_index(artifact, target)
        features = load_features(artifact.parent("features", index), with_views=False)
        predictions = artifact.read(f"predictions/{index}")
    elif artifact.kind == "evaluation":
        if target is not None:
            raise ApecliError(f"{artifact.path}: is an evaluation, of its own test split; a target is chosen "
                              "among a transfer artifact's")
        if "test/predictions" not in artifact:
            raise ApecliError(f"{artifact.path}: holds no test predictions (an evaluation by an earlier apecli); evaluate again")
        features = features_of(artifact)
        predictions = artifact.read("test/predictions")
    else:
        raise ApecliError(f"{artifact.path}: is an artifact of kind '{artifact.kind}'; expected an evaluation "
                          "(from apecli eval) or a transfer (from apecli transfer)")
    test = features.split("test")
    if predictions.shape != test.labels.shape:
        raise ApecliError(f"{artifact.path}: holds {predictions.shape[0]} test predictions, but its features "
                          f"hold {test.labels.shape[0]} test images")
    results = per_class(test.labels, predictions, zero_shot_predictions(features, "test"), features.class_names)
    wrong = np.flatnonzero(predictions != test.labels)
    misclassified = () if test.paths is None else tuple(
        (str(test.paths[i]), int(test.labels[i]), int(predictions[i])) for i in wrong)
    transferred = artifact.kind == "transfer"  # reported under the target's name, chosen on the source
    return ClassReport(meta.get("mode"), features.dataset if transferred else meta.get("dataset"), meta.get("shots"),
                       tuple(features.class_names), tuple(results), misclassified,
                       chosen_on=(meta.get("dataset") or "its source") if transferred else None)


def _target_index(transfer: store.Artifact, target: str | None) -> int:
    """Which of a transfer's targets ``target`` names: its dataset, or its features artifact's path or
    file name."""
    targets = transfer.metadata.get("targets", [])
    names = [entry.get("dataset") or Path(entry.get("artifact", "")).name for entry in targets]
    if target is None:
        if len(targets) == 1:
            return 0
        raise ApecliError(f"{transfer.path}: holds {len(targets)} targets ({', '.join(names)}); name one (--target)")
    given = str(Path(target).resolve())
    matches = [index for index, entry in enumerate(targets)
               if target in (entry.get("dataset"), Path(entry.get("artifact", "")).name) or given == entry.get("artifact")]
    if not matches:
        raise ApecliError(f"{transfer.path}: has no target '{target}' (it has {', '.join(names)})")
    if len(matches) > 1:
        raise ApecliError(f"{transfer.path}: {len(matches)} targets are '{target}'; name one by its features path")
    return matches[0]
