"""The ``transfer`` kind: an evaluated model tested, unchanged, on other feature sets' test splits
(docs/cache-format.md, ``transfer``). Its parents are the evaluation, then the target feature sets."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from apecli import store
from apecli.errors import InputError, Setting
from apecli.kinds.evaluation import EvaluationRecord
from apecli.kinds.features import FeatureSet, load_features
from apecli.kinds.fields import LIST, NUMBER, OBJECT, TEXT, WHOLE, checked, each

KIND = "transfer"


@dataclass(frozen=True)
class Transfer:
    """How an evaluated model did on one target's test split."""

    dataset: str | None
    artifact: str
    classes: int  # the target's, a subset of the model's
    correct: int
    total: int
    predictions: np.ndarray  # the predicted label of each test image, in the target's class indices

    @property
    def accuracy(self) -> float:
        return 100.0 * self.correct / self.total

    def summary(self) -> dict[str, Any]:
        return {"dataset": self.dataset, "artifact": self.artifact, "classes": self.classes,
                "correct": self.correct, "total": self.total, "test_accuracy": self.accuracy}


@dataclass(frozen=True)
class Target:
    """One target of a transfer, as its artifact records it."""

    dataset: str | None
    artifact: str  # the target's features artifact, as a path when it was written
    classes: int
    correct: int
    total: int
    test_accuracy: float

    @property
    def name(self) -> str:
        """Its dataset, or its features artifact's file name where it has none."""
        return self.dataset or Path(self.artifact).name


@dataclass(frozen=True)
class TransferRecord:
    """A transfer artifact's header."""

    artifact: store.Artifact
    mode: str | None
    dataset: str | None  # the model's
    shots: int | None
    source_test_accuracy: float | None
    targets: tuple[Target, ...]

    @classmethod
    def read(cls, artifact: store.Artifact) -> "TransferRecord":
        """A transfer artifact's header, each field checked against the format."""
        meta = artifact.metadata
        targets = tuple(Target(checked(artifact, entry, "dataset", TEXT, None, optional=True),
                               checked(artifact, entry, "artifact", TEXT, ""), checked(artifact, entry, "classes", WHOLE, 0),
                               checked(artifact, entry, "correct", WHOLE, 0), checked(artifact, entry, "total", WHOLE, 0),
                               checked(artifact, entry, "test_accuracy", NUMBER, 0.0))
                        for entry in each(artifact, checked(artifact, meta, "targets", LIST, []), "targets", OBJECT))
        return cls(artifact, checked(artifact, meta, "mode", TEXT, None, optional=True),
                   checked(artifact, meta, "dataset", TEXT, None, optional=True),
                   checked(artifact, meta, "shots", WHOLE, None, optional=True),
                   checked(artifact, meta, "source_test_accuracy", NUMBER, None, optional=True), targets)

    def summary(self) -> dict:
        """The JSON-ready record, as ``apecli transfer --json`` prints it (less the artifact's path)."""
        return dict(self.artifact.metadata)

    def describe(self) -> str:
        return f"{self.mode} on " + ", ".join(f"{t.dataset} {t.test_accuracy:.2f}%" for t in self.targets)

    def target_index(self, target: str | None) -> int:
        """Which target ``target`` names: its dataset, or its features artifact's path or file name (None
        where there is one target)."""
        names = [entry.name for entry in self.targets]
        if target is None:
            if len(self.targets) == 1:
                return 0
            raise InputError(self.artifact.path, f"holds {len(self.targets)} targets ({', '.join(names)}); name one "
                                                 f"({Setting('target')})")
        given = str(Path(target).resolve())
        matches = [index for index, entry in enumerate(self.targets)
                   if target in (entry.dataset, Path(entry.artifact).name) or given == entry.artifact]
        if not matches:
            raise InputError(self.artifact.path, f"has no target '{target}' (it has {', '.join(names)})")
        if len(matches) > 1:
            raise InputError(self.artifact.path, f"{len(matches)} targets are '{target}'; name one by its features path")
        return matches[0]

    def target_features(self, index: int) -> FeatureSet:
        """The feature set of target ``index`` (checked unchanged)."""
        return load_features(self.artifact.parent("features", index), with_views=False)

    def predictions(self, index: int) -> np.ndarray:
        return self.artifact.read(f"predictions/{index}")


def save_transfer(evaluation: store.Artifact, targets: Sequence[store.Artifact], results: Sequence[Transfer],
                  destination: Path | Callable[[str], Path]) -> store.Artifact:
    """Write the results, with each target's predictions; the evaluation and the targets are its parents."""
    record = EvaluationRecord.read(evaluation)
    metadata = {"mode": record.summary.get("mode"), "dataset": record.dataset, "shots": record.shots,
                "source_test_accuracy": record.summary.get("test_accuracy"), "targets": [r.summary() for r in results]}
    arrays = {f"predictions/{i}": r.predictions for i, r in enumerate(results)}
    return store.write_artifact(destination, KIND, arrays, metadata, [evaluation, *targets])
