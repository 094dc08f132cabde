"""The ``evaluation`` kind: what one method found on a feature set, and what a prediction needs to rebuild
it (docs/cache-format.md, ``evaluation``). Its parent is the artifact that was evaluated.

An evaluation records its summary (accuracies, the chosen hyperparameters, what else the method
reported) as metadata, the method's hyperparameters by name, and its state, the arrays a prediction
needs: its ``channels`` at the root (the channels it uses), the rest under ``learned/``; the Task arrays a
method's ``restore`` takes from the features are not stored again. Evaluations written before apecli
recorded hyperparameters by name (no ``hyperparameters`` in their metadata) kept a state only where it
could not be computed again: :meth:`EvaluationRecord.read` upgrades them as they are read.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from apecli import store
from apecli.errors import ApecliError, InputError, Step
from apecli.kinds.features import FeatureSet, features_of
from apecli.kinds.fields import LIST, NUMBER, OBJECT, TEXT, WHOLE, checked, each
from apecli.methods.base import TASK_ARRAYS, at_least_float32
from apecli.methods.grid import SearchResult

KIND = "evaluation"
SYMBOLS = {"alpha": "α", "beta": "β", "gamma": "γ", "lambda": "λ"}  # the hyperparameters, as tables print them
NAMED = ("alpha", "beta", "gamma")  # hyperparameters every evaluation reports (None where a method has none)
LEARNED = "learned/"
CHANNELS = "channels"  # the channels a method uses: at the root, and its state of that name
PREDICTIONS = "test/predictions"
SEARCH = ("search/val_correct", "search/betas", "search/alphas", "search/gammas")
RESERVED = frozenset({"mode", "dataset", "shots", "val_accuracy", "test_accuracy", "test_class_accuracy",
                      "zero_shot_accuracy", "zero_shot_val_accuracy", "grid_settings", "settings_sharing_best",
                      "search_scale", "search_step", "given", "k", "val_shots", "hyperparameters", "device", "artifact"})


@dataclass(frozen=True)
class Evaluation:
    """What one evaluation found: accuracies in percent and the chosen hyperparameters."""

    mode: str
    dataset: str | None
    zero_shot_val: float
    zero_shot_test: float
    val_accuracy: float
    test_accuracy: float
    shots: int | None = None
    alpha: float | None = None
    beta: float | None = None
    gamma: float | None = None
    channels: np.ndarray | None = None
    search: SearchResult | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    learned: dict[str, np.ndarray] = field(default_factory=dict)  # the method's state: what a prediction needs
    test_predictions: np.ndarray | None = None  # the predicted class of each test image (stored)
    test_class_accuracy: float | None = None  # the mean over the test split's classes of their accuracy, percent
    hyperparameters: dict[str, float] = field(default_factory=dict)  # as the method's fit returned them
    notes: tuple[str, ...] = ()  # what a careful user should know of this fit, one line each (not stored)

    @property
    def val_shots(self) -> int | None:
        """The validation images per class it chose on (None: the whole split)."""
        return self.extra.get("val_shots")

    @property
    def given(self) -> dict[str, float]:
        """The hyperparameters given instead of searched, by name."""
        return dict(self.search.grid.given) if self.search is not None else given_values(self.extra)

    @property
    def k_tried(self) -> list[int] | None:
        """The channel counts it chose among on validation, where it chose one."""
        return self.extra.get("k_tried")

    @property
    def epochs(self) -> tuple[int, int] | None:
        """Its best epoch and its epochs, where it trained."""
        return (self.extra["best_epoch"], self.extra["epochs"]) if "best_epoch" in self.extra else None

    def summary(self) -> dict[str, Any]:
        """The JSON-ready results (accuracies in percent)."""
        result: dict[str, Any] = {
            "mode": self.mode,
            "dataset": self.dataset,
            "shots": self.shots,
            "alpha": self.alpha,
            "beta": self.beta,
            "gamma": self.gamma,
            "val_accuracy": self.val_accuracy,
            "test_accuracy": self.test_accuracy,
            "zero_shot_accuracy": self.zero_shot_test,
            "zero_shot_val_accuracy": self.zero_shot_val,
        }
        if self.test_class_accuracy is not None:
            result["test_class_accuracy"] = self.test_class_accuracy
        if self.search is not None:
            result["grid_settings"] = self.search.grid.size
            result["settings_sharing_best"] = self.search.ties
            result["search_scale"] = list(self.search.grid.scale)
            result["search_step"] = list(self.search.grid.steps)
            if self.search.grid.given:
                result["given"] = self.search.grid.given
        if self.channels is not None:
            result["k"] = int(self.channels.shape[0])
        result.update(self.extra)
        result["hyperparameters"] = dict(self.hyperparameters)
        return result


def class_accuracy(predictions: np.ndarray, labels: np.ndarray) -> float:
    """The mean over the classes present in ``labels`` of each one's accuracy, in percent."""
    present, index = np.unique(labels, return_inverse=True)
    hits = np.bincount(index, weights=(predictions == labels).astype(np.float64), minlength=present.size)
    return float(100.0 * np.mean(hits / np.bincount(index, minlength=present.size)))


def save_evaluation(evaluation: Evaluation, parents: list[store.Artifact],
                    destination: Path | Callable[[str], Path]) -> store.Artifact:
    """Write an evaluation artifact: the results, the method's state, the channels used, the grid of
    validation hits and the test predictions."""
    arrays: dict[str, np.ndarray] = {}
    if evaluation.channels is not None:
        arrays[CHANNELS] = evaluation.channels
    if evaluation.search is not None:
        grid = evaluation.search.grid
        for name, values in zip(SEARCH, (evaluation.search.correct, grid.betas, grid.alphas, grid.gammas)):
            arrays[name] = values
    for name, value in evaluation.learned.items():
        if name == CHANNELS:  # a method's channels are the evaluation's, at the root
            continue
        arrays[f"{LEARNED}{name}"] = np.asarray(value)
    if evaluation.test_predictions is not None:
        arrays[PREDICTIONS] = evaluation.test_predictions
    return store.write_artifact(destination, KIND, arrays, evaluation.summary(), parents)


def given_values(summary: Mapping[str, Any]) -> dict[str, float]:
    """The hyperparameters an evaluation was given instead of searching them, by name."""
    given = summary.get("given")
    return dict(given) if isinstance(given, Mapping) else {}


@dataclass(frozen=True)
class EvaluationRecord:
    """An evaluation artifact as read: its summary, its method's hyperparameters, and its state (read on
    demand), whatever format version wrote it."""

    artifact: store.Artifact
    summary: Mapping[str, Any]  # the JSON of ``apecli eval --json``, less the artifact's path
    hyperparameters: dict[str, float]
    stored: Mapping[str, Callable[[], np.ndarray]]  # state name → reader

    @classmethod
    def read(cls, artifact: store.Artifact) -> "EvaluationRecord":
        if artifact.kind != KIND:
            raise InputError(artifact.path, f"is an artifact of kind '{artifact.kind}'; expected an evaluation "
                                            f"(from {Step('evaluate_artifact')})")
        meta = artifact.metadata
        _check_summary(artifact, meta)
        stored = {name[len(LEARNED):]: _reader(artifact, name) for name in artifact.names if name.startswith(LEARNED)}
        if CHANNELS in artifact:
            stored[CHANNELS] = _reader(artifact, CHANNELS)
        if "hyperparameters" in meta:
            try:
                hyperparameters = {str(name): float(value) for name, value in meta["hyperparameters"].items()}
            except (AttributeError, TypeError, ValueError):
                raise InputError(artifact.path, "its header is damaged (hyperparameters that are not a map of "
                                                "names to numbers)") from None
            return cls(artifact, meta, hyperparameters, stored)
        # Written before hyperparameters were recorded by name: they are the summary's α, β, γ and λ, and an
        # evaluated adapter's arrays are in the adapter.
        hyperparameters = {name: float(meta[name]) for name in (*NAMED, "lambda") if meta.get(name) is not None}
        adapters = [ref for ref in artifact.parents if ref.kind == "adapter"]
        if adapters:
            adapter = artifact.parent("adapter")
            for name in ("channels", "residual", "value_weights"):
                stored.setdefault(name, _reader(adapter, name))
        return cls(artifact, meta, hyperparameters, stored)

    @property
    def mode(self) -> str:
        return str(self.summary.get("mode"))

    @property
    def dataset(self) -> str | None:
        return self.summary.get("dataset")

    @property
    def shots(self) -> int | None:
        return self.summary.get("shots")

    @property
    def val_shots(self) -> int | None:
        return self.summary.get("val_shots")

    @property
    def test_accuracy(self) -> float:
        return float(self.summary.get("test_accuracy", 0.0))

    @property
    def given(self) -> dict[str, float]:
        return given_values(self.summary)

    def features(self) -> FeatureSet:
        """The feature set at the root of its parents (each checked unchanged)."""
        return features_of(self.artifact)

    def test_predictions(self) -> np.ndarray:
        """The predicted class of each test image; refused for an evaluation that stored none."""
        if PREDICTIONS not in self.artifact:
            raise InputError(self.artifact.path, "holds no test predictions (an evaluation by an earlier apecli); "
                                                 "evaluate again")
        return self.artifact.read(PREDICTIONS)

    def state(self, features: FeatureSet, task_state: tuple[str, ...]) -> "State":
        """The arrays a prediction needs: the stored state, and the Task arrays ``task_state`` names, taken
        from ``features`` (the evaluated cache), each read when first used."""
        return State(self.stored, features, self.shots, task_state)

    def describe(self) -> str:
        """One line on what it found (``apecli ls``)."""
        meta = self.summary
        given = " ".join(f"{symbol}={self.given[name]:.4g}" for name, symbol in SYMBOLS.items() if name in self.given)
        on = f" ({self.val_shots} a class)" if self.val_shots else ""
        chose = f" (chose {meta['chosen']})" if "chosen" in meta else ""  # auto
        return (f"{self.mode}{chose}, val {meta.get('val_accuracy', 0):.2f}%{on}, test {self.test_accuracy:.2f}%"
                + (f", given {given}" if given else "")
                + (f", k={meta.get('k')} of {len(meta['k_tried'])} tried" if "k_tried" in meta else ""))


class State(Mapping):
    """A restored method's state: stored arrays and Task arrays of the evaluated features, read on demand."""

    def __init__(self, stored: Mapping[str, Callable[[], np.ndarray]], features: FeatureSet, shots: int | None,
                 task_state: tuple[str, ...]) -> None:
        self.readers = dict(stored)
        unknown = [name for name in task_state if name not in TASK_ARRAYS]
        if unknown:
            raise ApecliError(f"a method's task_state names '{unknown[0]}'; it may name {', '.join(TASK_ARRAYS)}")
        for name in task_state:
            self.readers.setdefault(name, lambda name=name: _task_array(features, shots, name))
        self.read: dict[str, np.ndarray | None] = {}

    def __getitem__(self, name: str) -> np.ndarray:
        if name not in self.read:
            self.read[name] = self.readers[name]()
        return self.read[name]

    def __contains__(self, name: object) -> bool:
        return name in self.readers

    def __iter__(self) -> Iterator[str]:
        return iter(self.readers)

    def __len__(self) -> int:
        return len(self.readers)


def _check_summary(artifact: store.Artifact, meta: Mapping[str, Any]) -> None:
    """The fields of an evaluation's summary that apecli reads, each checked against the format."""
    checked(artifact, meta, "mode", TEXT)
    checked(artifact, meta, "dataset", TEXT, None, optional=True)
    checked(artifact, meta, "chosen", TEXT, None, optional=True)
    for name in ("shots", "val_shots", "k"):
        checked(artifact, meta, name, WHOLE, None, optional=True)
    for name in ("val_accuracy", "test_accuracy"):
        checked(artifact, meta, name, NUMBER)
    for name in (*NAMED, "lambda", "zero_shot_accuracy", "zero_shot_val_accuracy", "test_class_accuracy"):
        checked(artifact, meta, name, NUMBER, None, optional=True)
    each(artifact, list(checked(artifact, meta, "given", OBJECT, {}).values()), "given", NUMBER)
    each(artifact, checked(artifact, meta, "k_tried", LIST, []), "k_tried", WHOLE)


def _reader(artifact: store.Artifact, name: str) -> Callable[[], np.ndarray]:
    return lambda: artifact.read(name)


def _task_array(features: FeatureSet, shots: int | None, name: str) -> np.ndarray | None:
    if name == "text":
        return at_least_float32(features.classifier)
    shots, cache = features.cache(shots)
    if name == "keys":
        return at_least_float32(cache.keys)
    if name == "key_labels":
        return np.asarray(cache.labels, dtype=np.int64)
    views = features.views(shots)
    return None if views is None else np.asarray(views, dtype=np.float32)
