"""The ``features`` kind: the feature set every stage reads, and how it is stored.

Conventions (all arrays are numpy, one row per item):
- ``classifier``: C × D, the text classifier W transposed (one L2-normalised row per class);
- ``caches[K]``: the K-shot cache, keys (C·K) × D with their labels, and optionally the augmented
  views V × (C·K) × D whose mean gave the keys;
- ``splits["val"]``, ``splits["test"]``: N × D features with their labels;
- ``prompts`` (optional): M × D, the L2-normalised text embedding of every prompt whose mean made a class's
  classifier row (templates, then sentences), ``prompt_labels`` (M,) their classes, in class order.
Floating arrays keep the dtype they were given (float16 caches stay float16); the math casts up.

This module owns the kind's array names and metadata keys (docs/cache-format.md, ``features``): other
modules read a feature set through :class:`FeatureSet` and a header through :class:`FeaturesHeader`.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np

from apecli import store
from apecli.checks import check_at_least
from apecli.errors import ApecliError, InputError, Step
from apecli.methods.base import Task

KIND = "features"
SPLITS = ("val", "test")
TEST_SET_HINT = f" (a test set only: score an evaluated model on it with {Step('transfer')})"
PLACEHOLDERS = "placeholders"  # provenance["class_names"] of an import that named no class: class_0, class_1, …


@dataclass(frozen=True)
class FewShotCache:
    """The few-shot cache of one shot count: keys, their labels, and the augmented views if stored."""

    keys: np.ndarray
    labels: np.ndarray
    views: np.ndarray | None = None
    paths: np.ndarray | None = None  # the image of each key, when extracted here


@dataclass(frozen=True)
class LabelledFeatures:
    """Image features of one split with their labels."""

    features: np.ndarray
    labels: np.ndarray
    paths: np.ndarray | None = None  # the image of each row, when extracted here


@dataclass(frozen=True)
class EncoderRecord:
    """What a feature set records of the encoder that made it (all of it optional: an import may name a
    model alone, or nothing)."""

    name: str | None = None  # as the encoder calls itself, or as an import named it
    model: str | None = None  # the open_clip model name, a config's name, hf-hub:…, local-dir:…
    pretrained: str | None = None  # an open_clip tag, a checkpoint's path, "none", "with the model"
    checkpoint_sha256: str | None = None
    model_config_sha256: str | None = None
    model_config: Mapping[str, Any] | None = None  # a model config given as a JSON file, kept whole
    quick_gelu: bool = False  # QuickGELU turned on because the weights were trained with it
    precision: str | None = None

    @classmethod
    def of(cls, model: Mapping[str, Any]) -> "EncoderRecord":
        config = model.get("model_config")
        return cls(*(_text_or_none(model.get(key)) for key in ("name", "model", "pretrained", "checkpoint_sha256",
                                                               "model_config_sha256")),
                   config if isinstance(config, Mapping) else None, bool(model.get("quick_gelu", False)),
                   _text_or_none(model.get("precision")))

    @property
    def recorded(self) -> bool:
        return any(value is not None for value in (self.name, self.model, self.pretrained))

    @property
    def display_name(self) -> str:
        """What tables call it: its name, else its model, else ``unknown``."""
        return self.name or self.model or "unknown"

    @property
    def extracted(self) -> bool:
        """Whether it can encode new images as it encoded these (extracted here: model and weights known)."""
        return self.model is not None and self.pretrained is not None


def _text_or_none(value: Any) -> str | None:
    return None if value is None else str(value)


class Described:
    """What a feature set's metadata says, read the same way from a loaded feature set or from a header."""

    dataset: str | None
    model: Mapping[str, Any]
    provenance: Mapping[str, Any]

    @property
    def encoder(self) -> EncoderRecord:
        return EncoderRecord.of(self.model)

    @property
    def seed(self) -> int:
        """The few-shot draw's seed (1 where none is recorded: imports)."""
        return int(self.provenance.get("seed", 1))

    @property
    def extracted(self) -> bool:
        """Whether ``apecli extract`` made it (from images, by the protocol's seeded draw)."""
        return self.provenance.get("source") == "extract"

    @property
    def exif_orientation(self) -> bool:
        """Whether its images were turned upright by their EXIF orientation tag when encoded."""
        return bool(self.provenance.get("exif_orientation", False))

    @property
    def unnamed_classes(self) -> bool:
        """Whether its class names are placeholders (class_0, class_1, …: an import that named none)."""
        return self.provenance.get("class_names") == PLACEHOLDERS

    @property
    def notes(self) -> tuple[str, ...]:
        return tuple(self.provenance.get("notes", ()))

    @property
    def skipped(self) -> tuple[dict[str, str], ...]:
        """The unreadable images an extraction left out: split, path and error of each."""
        return tuple(self.provenance.get("skipped", ()))

    @property
    def request_id(self) -> str | None:
        """The hash of the extraction request that made it (extracted sets)."""
        return self.provenance.get("request_id")

    @property
    def evaluation_request_id(self) -> str | None:
        """The hash of that request without its few-shot draw: sets that share it share validation and test."""
        return self.provenance.get("evaluation_request_id")

    @property
    def jpeg_decoder(self) -> str | None:
        return self.provenance.get("jpeg_decoder")

    @property
    def software(self) -> Mapping[str, str]:
        return self.provenance.get("software", {})


@dataclass(frozen=True)
class FeaturesHeader(Described):
    """A features artifact's header, read without its arrays."""

    dataset: str | None
    model: Mapping[str, Any]
    provenance: Mapping[str, Any]
    num_classes: int
    dim: int
    shots: tuple[int, ...]
    splits: Mapping[str, int]
    artifact: store.Artifact

    @classmethod
    def of(cls, artifact: store.Artifact) -> "FeaturesHeader":
        """The header of a features artifact, each field checked against the format."""
        from apecli.kinds.fields import LIST, OBJECT, TEXT, WHOLE, checked, each

        meta = artifact.metadata
        provenance = checked(artifact, meta, "provenance", OBJECT, {})
        checked(artifact, provenance, "seed", WHOLE, 1)  # the draw's, where recorded
        return cls(checked(artifact, meta, "dataset", TEXT, None, optional=True), checked(artifact, meta, "model", OBJECT, {}),
                   provenance, checked(artifact, meta, "num_classes", WHOLE, 0), checked(artifact, meta, "dim", WHOLE, 0),
                   tuple(each(artifact, checked(artifact, meta, "shots", LIST, []), "shots", WHOLE)),
                   checked(artifact, meta, "splits", OBJECT, {}), artifact)

    def describe(self) -> str:
        """One line on what it holds (``apecli ls``)."""
        held = f"shots {list(self.shots)}" if self.shots else "a test set only"
        if self.shots and self.extracted:  # which draw of the protocol's seeds
            held += f" (seed {self.seed})"
        return f"{self.num_classes} classes × {self.dim} ch, {held}, model {self.encoder.display_name}"


@dataclass(frozen=True)
class FeatureSet(Described):
    """Everything APE needs about one dataset under one model."""

    class_names: tuple[str, ...]
    classifier: np.ndarray
    caches: Mapping[int, FewShotCache]
    splits: Mapping[str, LabelledFeatures]
    dataset: str | None = None
    model: Mapping[str, Any] = field(default_factory=dict)
    provenance: Mapping[str, Any] = field(default_factory=dict)
    artifact: store.Artifact | None = None
    prompts: np.ndarray | None = None  # M × D, each prompt's embedding (None: not kept)
    prompt_labels: np.ndarray | None = None  # (M,), the class of each, in class order

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def prompt_counts(self) -> np.ndarray:
        """How many prompt embeddings each class keeps (one a class, the classifier, where none are kept)."""
        if self.prompt_labels is None:
            return np.ones(self.num_classes, dtype=np.int64)
        return np.bincount(self.prompt_labels, minlength=self.num_classes)

    @property
    def dim(self) -> int:
        return int(self.classifier.shape[1])

    @property
    def shots(self) -> tuple[int, ...]:
        return tuple(sorted(self.caches))

    @property
    def name(self) -> str:
        return str(self.artifact.path) if self.artifact else (self.dataset or "feature set")

    def cache(self, shots: int | None = None) -> tuple[int, FewShotCache]:
        """The cache of ``shots`` shots (default: the largest), or a clear error if there is none."""
        if not self.caches:
            raise ApecliError(f"{self.name}: holds no few-shot cache{self._test_set_hint()}")
        chosen = max(self.caches) if shots is None else shots
        if chosen not in self.caches:
            held = ", ".join(str(k) for k in self.shots)
            raise ApecliError(f"{self.name}: has no {chosen}-shot cache (it holds {held} shots)")
        return chosen, self.caches[chosen]

    def split(self, name: str) -> LabelledFeatures:
        if name not in self.splits:
            raise ApecliError(f"{self.name}: has no {name} split{self._test_set_hint()}")
        return self.splits[name]

    def with_validation_shots(self, shots: int | None) -> "FeatureSet":
        """This feature set with its validation split cut to ``shots`` images per class (every image of a
        class that has fewer), kept in split order: hyperparameters then are chosen on as few labelled
        images as a few-shot user has (None: the whole split, this feature set itself).

        Each image gets a number from Python's ``random.Random(seed).random()``, in split order, whose
        sequence Python guarantees across versions; each class keeps its images with the smallest. The
        seed is the feature set's few-shot seed (1 where it records none), so each few-shot draw of a
        benchmark has its own validation draw, and the images kept for N are among those kept for N + 1."""
        if shots is None:
            return self
        check_at_least("val_shots", shots)
        val = self.split("val")
        rng = random.Random(self.seed)
        draws = np.array([rng.random() for _ in range(val.labels.shape[0])])
        per_class = (np.flatnonzero(val.labels == label) for label in range(self.num_classes))
        kept = np.sort(np.concatenate([rows[np.argsort(draws[rows], kind="stable")[:shots]] for rows in per_class]))
        cut = LabelledFeatures(val.features[kept], val.labels[kept], None if val.paths is None else val.paths[kept])
        return replace(self, splits={**self.splits, "val": cut})

    def task(self, shots: int | None = None, val_shots: int | None = None, device: str = "cpu") -> Task:
        """The few-shot task of its ``shots``-shot cache (default: the largest) and its validation split,
        cut to ``val_shots`` images a class (:meth:`with_validation_shots`), for a method on ``device``
        (resolved already: see :func:`apecli.devices.resolve`)."""
        features = self.with_validation_shots(val_shots)
        shots, cache = features.cache(shots)
        val = features.split("val")
        views = cache.views if cache.views is not None else (lambda: self.views(shots))
        return Task(self.classifier, cache.keys, cache.labels, val.features, val.labels, self.class_names, shots,
                    self.seed, device, views, self.dataset, self.name, self.prompts, self.prompt_labels)

    def _test_set_hint(self) -> str:
        """What to do with a feature set that is a test split alone (ImageNet-R, …), said in a refusal."""
        return TEST_SET_HINT if set(self.splits) == {"test"} and not self.caches else ""

    def views(self, shots: int) -> np.ndarray | None:
        """The stored augmented views of the ``shots``-shot cache, read from disk when not in memory."""
        _, cache = self.cache(shots)
        if cache.views is not None:
            return cache.views
        name = f"cache/{shots}/views"
        if not (self.artifact and name in self.artifact):
            return None
        views = self.artifact.read(name)
        try:
            _check_views(f"{shots}-shot views", views, cache.keys.shape)
            _check_values(f"{shots}-shot views", views, self.dim)
        except ApecliError as error:
            raise error.within(f"{self.name}: ") from None
        return views

    def validate(self) -> "FeatureSet":
        """Check shapes, widths, labels and values; raise one clear error for the first problem."""
        names = len(self.class_names)
        if self.classifier.ndim != 2 or self.classifier.shape[0] != names or self.classifier.shape[1] == 0:
            raise ApecliError(
                f"text classifier has shape {self.classifier.shape}, expected ({names} classes, D channels)"
            )
        if len(set(self.class_names)) != names:
            raise ApecliError("class names are not unique")
        width = self.dim
        arrays: list[tuple[str, np.ndarray, np.ndarray | None]] = [("text classifier", self.classifier, None)]
        for shots, cache in sorted(self.caches.items()):
            _check_rows(f"{shots}-shot cache keys", cache.keys, width)
            arrays.append((f"{shots}-shot cache keys", cache.keys, cache.labels))
            if cache.views is not None:
                _check_views(f"{shots}-shot views", cache.views, cache.keys.shape)
                arrays.append((f"{shots}-shot views", cache.views, None))
        if (self.prompts is None) != (self.prompt_labels is None):
            raise ApecliError("prompt embeddings without their classes, or classes without embeddings")
        if self.prompts is not None:
            _check_rows("prompt embeddings", self.prompts, width)
            arrays.append(("prompt embeddings", self.prompts, self.prompt_labels))
            labels = np.asarray(self.prompt_labels)
            if labels.ndim == 1 and labels.size and np.issubdtype(labels.dtype, np.integer) and 0 <= labels.min() and \
                    labels.max() < names:
                if np.any(np.diff(labels) < 0):
                    raise ApecliError("prompt embeddings: not in class order")
                counts = np.bincount(labels, minlength=names)
                if counts.min() == 0:
                    bad = int(np.argmin(counts))
                    raise ApecliError(f"prompt embeddings: class {bad} ({self.class_names[bad]}) has none")
        for split, part in sorted(self.splits.items()):
            _check_rows(f"{split} features", part.features, width)
            if part.features.shape[0] == 0:
                raise ApecliError(f"the {split} split holds no images")
            arrays.append((f"{split} features", part.features, part.labels))
        for what, array, labels in arrays:
            _check_values(what, array, width)
            if labels is not None:
                _check_labels(what, labels, array.shape[-2], names)
        for shots, cache in self.caches.items():
            counts = np.bincount(cache.labels, minlength=names)
            if (counts != shots).any():
                bad = int(np.flatnonzero(counts != shots)[0])
                raise ApecliError(
                    f"{shots}-shot cache: class {bad} ({self.class_names[bad]}) has {counts[bad]} keys, expected {shots}"
                )
        return self


def mismatch_warnings(features: FeatureSet) -> list[str]:
    """Signs that the parts of a feature set come from different encoders (a stale cache): the text
    classifier, or the largest cache's class means, classifying the validation images no better than
    chance. Features of one width from two models pass every shape check, and then every method runs
    and reports near-chance accuracy without saying why."""
    if "val" not in features.splits or features.num_classes < 2:
        return []
    val = features.split("val")
    count = val.labels.shape[0]
    if count == 0:
        return []
    chance = 1.0 / features.num_classes
    # more than three standard deviations of a chance guesser's accuracy above chance, or it is chance
    floor = chance + 3.0 * float(np.sqrt(chance * (1.0 - chance) / count))
    x = val.features.astype(np.float64)
    checks = [("the text classifier", features.classifier.astype(np.float64))]
    if features.caches:
        shots, cache = features.cache()
        means = np.zeros((features.num_classes, features.dim))
        np.add.at(means, cache.labels, cache.keys.astype(np.float64))
        checks.append((f"the {shots}-shot keys' class means", means))
    warnings = []
    for what, centres in checks:
        accuracy = float((np.argmax(x @ centres.T, axis=1) == val.labels).mean())
        if accuracy <= floor:
            warnings.append(f"by {what}, the validation images are classified at chance ({100 * accuracy:.1f}%, "
                            f"chance {100 * chance:.1f}%): the two may come from different encoders (a stale cache?)")
    return warnings


def _check_views(what: str, views: np.ndarray, keys: tuple[int, ...]) -> None:
    if views.ndim != 3 or views.shape[1:] != keys or views.shape[0] == 0:
        raise ApecliError(f"{what} have shape {views.shape}, expected (V ≥ 1, {keys[0]}, {keys[1]})")


def _check_values(what: str, array: np.ndarray, width: int) -> None:
    """Floating-point rows of ``width`` channels, finite, none of them all zeros."""
    if not np.issubdtype(array.dtype, np.floating):
        raise ApecliError(f"{what} are of type {array.dtype}, expected floating point")
    if array.shape[-1] != width:
        raise ApecliError(f"mixed feature widths: {what} have {array.shape[-1]} channels, the text classifier {width}")
    if not np.isfinite(array).all():
        raise ApecliError(f"{what} contain NaN or infinite values")
    zero = np.flatnonzero(~np.any(array.reshape(-1, width) != 0, axis=1))
    if zero.size:  # no direction: the cosine similarities every method takes are undefined for it
        raise ApecliError(f"{what}: {zero.size} row(s) of zeros (the first: row {zero[0]}), which no encoder gives")


def _check_rows(what: str, array: np.ndarray, width: int) -> None:
    if array.ndim != 2:
        raise ApecliError(f"{what} have shape {array.shape}, expected (rows, {width} channels)")


def _check_labels(what: str, labels: np.ndarray, rows: int, num_classes: int) -> None:
    if labels.ndim != 1 or labels.shape[0] != rows:
        raise ApecliError(f"{what}: {labels.shape[0] if labels.ndim else 0} labels for {rows} rows")
    if not np.issubdtype(labels.dtype, np.integer):
        raise ApecliError(f"{what}: labels are of type {labels.dtype}, expected integers")
    if rows and (labels.min() < 0 or labels.max() >= num_classes):
        raise ApecliError(
            f"{what}: labels out of range [{labels.min()}, {labels.max()}] for {num_classes} classes"
        )


def to_arrays(features: FeatureSet) -> dict[str, np.ndarray]:
    arrays: dict[str, np.ndarray] = {
        "class_names": np.array(features.class_names, dtype=str),
        "text/classifier": features.classifier,
    }
    if features.prompts is not None:
        arrays["text/prompts"] = features.prompts
        arrays["text/prompt_labels"] = np.asarray(features.prompt_labels, dtype=np.int64)
    for shots, cache in features.caches.items():
        arrays[f"cache/{shots}/keys"] = cache.keys
        arrays[f"cache/{shots}/labels"] = cache.labels.astype(np.int64)
        if cache.views is not None:
            arrays[f"cache/{shots}/views"] = cache.views
        if cache.paths is not None:
            arrays[f"cache/{shots}/paths"] = np.asarray(cache.paths, dtype=str)
    for split, part in features.splits.items():
        arrays[f"{split}/features"] = part.features
        arrays[f"{split}/labels"] = part.labels.astype(np.int64)
        if part.paths is not None:
            arrays[f"{split}/paths"] = np.asarray(part.paths, dtype=str)
    return arrays


def save_features(features: FeatureSet, destination: Path | Callable[[str], Path]) -> FeatureSet:
    """Validate and write a feature set; ``destination`` is a file path or :func:`store.in_store` slot."""
    features.validate()
    metadata = {
        "dataset": features.dataset,
        "model": dict(features.model),
        "provenance": dict(features.provenance),
        "num_classes": features.num_classes,
        "dim": features.dim,
        "shots": list(features.shots),
        "splits": {name: int(part.labels.shape[0]) for name, part in features.splits.items()},
    }
    artifact = store.write_artifact(destination, KIND, to_arrays(features), metadata)
    return replace(features, artifact=artifact)


def _optional(artifact: store.Artifact, name: str) -> np.ndarray | None:
    return artifact.read(name) if name in artifact else None


def load_features(source: str | Path | store.Artifact, *, with_views: bool = False) -> FeatureSet:
    """Read a features artifact (views stay on disk unless ``with_views``) and validate it."""
    artifact = store.opened(source, KIND)
    header = FeaturesHeader.of(artifact)
    caches = {}
    for shots in header.shots:
        views = artifact.read(f"cache/{shots}/views") if with_views and f"cache/{shots}/views" in artifact else None
        caches[int(shots)] = FewShotCache(
            artifact.read(f"cache/{shots}/keys"), artifact.read(f"cache/{shots}/labels"), views,
            _optional(artifact, f"cache/{shots}/paths"),
        )
    splits = {
        split: LabelledFeatures(artifact.read(f"{split}/features"), artifact.read(f"{split}/labels"),
                                _optional(artifact, f"{split}/paths"))
        for split in SPLITS
        if f"{split}/features" in artifact
    }
    features = FeatureSet(
        class_names=tuple(artifact.read("class_names").tolist()),
        classifier=artifact.read("text/classifier"),
        caches=caches,
        splits=splits,
        dataset=header.dataset,
        model=header.model,
        provenance=header.provenance,
        artifact=artifact,
        prompts=_optional(artifact, "text/prompts"),
        prompt_labels=_optional(artifact, "text/prompt_labels"),
    )
    try:
        return features.validate()
    except ApecliError as error:
        raise error.within(f"{artifact.path}: ") from None


def root_features(artifact: store.Artifact) -> store.Artifact:
    """The features artifact at the root of an artifact's parents (each checked unchanged)."""
    while artifact.kind != KIND:
        if not artifact.parents:
            raise InputError(artifact.path, "leads to no features artifact")
        artifact = artifact.parent(artifact.parents[0].kind)
    return artifact


def features_of(artifact: store.Artifact) -> FeatureSet:
    """The feature set at the root of an artifact's parents (each checked unchanged), without its views."""
    return load_features(root_features(artifact), with_views=False)
