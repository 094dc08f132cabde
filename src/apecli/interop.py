"""Features and results in the forms other CLIP tools use.

- **CLIP_benchmark's feature folders.** ``clip_benchmark eval --task linear_probe`` keeps
  ``features_{train,val,test}.pt`` and ``targets_{train,val,test}.pt`` in a folder named
  ``{model}-{pretrained}-{dataset}``, and ``--save_clf`` writes its zero-shot head (D × C).
  :func:`import_clip_benchmark` draws the few-shot caches from the train split by seed, as ``extract``
  draws them (per class, one seeded permutation; the K-shot cache is its first K, so the caches nest),
  and takes validation and test as they are (a folder without validation gives a seeded part of train,
  apart from the shots, and says so).
- **clip-retrieval's embedding folders.** ``clip-retrieval inference`` writes ``img_emb/img_emb_{i}.npy``
  (float16, L2-normalised) and ``metadata/metadata_{i}.parquet`` (``image_path``, …), row for row.
  :func:`import_clip_retrieval` labels each image by its parent folder or a metadata column, splits
  them by a column or by seeded fractions of each class, and draws the few-shot caches from the train
  part as above. Reading parquet takes pyarrow (``pip install 'apecli[interop]'``).
- **CLIP_benchmark's result JSON.** :func:`clip_benchmark_result` writes an evaluation as that tool's
  users aggregate it: ``dataset``, ``model``, ``pretrained``, ``task``, ``metrics`` (``acc1`` and
  ``mean_per_class_recall`` as fractions).
"""

from __future__ import annotations

import os
import random
import re
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from apecli.errors import ApecliError, InputError, Placeholder, Setting, first_line
from apecli.files import file_sha256
from apecli.importers import (
    ClassTexts,
    as_features,
    as_labels,
    load_tensor,
    names_from_file,
    transposed_hint,
    unit_rows,
)
from apecli.kinds.features import PLACEHOLDERS, Described, FeatureSet, FewShotCache, LabelledFeatures
from apecli.presets import canonical_name

CLIP_BENCHMARK_SHOTS = (1, 2, 4, 8, 16)
VALIDATION_PART = 0.2  # of each class's training images, after its shots, where a folder has no validation split
TASK = "fewshot_classification"  # the task apecli's results name in CLIP_benchmark's form


def folder_name_parts(folder: Path) -> tuple[str, str, str] | None:
    """(model, pretrained, dataset) of a folder named ``{model}-{pretrained}-{dataset}``, else None.
    Model names hold dashes (``ViT-B-32``); the pretrained tag and the dataset are the last two parts."""
    parts = folder.resolve().name.rsplit("-", 2)
    return (parts[0], parts[1], parts[2]) if len(parts) == 3 and all(parts) else None


def _folder_with_text(directory: str | os.PathLike[str], text_weights: Any, texts: Any, placeholder: str,
                      what: str) -> Path:
    """The folder to import, checked to exist, with exactly one source of text named."""
    folder = Path(directory)
    if not folder.is_dir():
        raise ApecliError(f"{folder}: no such folder")
    if (text_weights is None) == (texts is None):
        named = (Setting("text_weights", Placeholder(placeholder)), Setting("texts", Placeholder("MODEL")))
        raise InputError(folder, f"the text classifier comes from {named[0]} ({what}) or {named[1]}, one of them",
                         *named)
    return folder


def _split(folder: Path, split: str, sources: dict[str, Path]) -> tuple[np.ndarray, np.ndarray] | None:
    """The features and targets of one split, checked to agree; None where the folder has neither."""
    features_path, targets_path = folder / f"features_{split}.pt", folder / f"targets_{split}.pt"
    if not features_path.exists() and not targets_path.exists():
        return None
    for path in (features_path, targets_path):
        if not path.is_file():
            raise InputError(path, f"no such file, beside {(targets_path if path == features_path else features_path).name}")
    features = as_features(load_tensor(features_path), str(features_path))
    targets = as_labels(load_tensor(targets_path), str(targets_path))
    if features.shape[0] != targets.shape[0]:
        raise InputError(features_path, f"{features.shape[0]} features, but {targets_path.name} has "
                                        f"{targets.shape[0]} targets")
    sources[features_path.name], sources[targets_path.name] = features_path, targets_path
    return features, targets


def draw(targets: np.ndarray, num_classes: int, most: int, seed: int) -> list[list[int]]:
    """Each class's training rows in a seeded order (``random.Random(seed)``, one ``sample`` a class in
    label order, as ``extract`` draws images): its first K rows are the K-shot cache."""
    rng = random.Random(seed)
    orders = []
    for label in range(num_classes):
        rows = np.flatnonzero(targets == label).tolist()
        if len(rows) < most:
            raise ApecliError(f"class {label} has {len(rows)} training images, fewer than {most} shots: give "
                              f"{Setting('shots')} with counts up to {len(rows)}" if rows else
                              f"class {label} has no training images", Setting("shots"))
        orders.append(rng.sample(rows, len(rows)))
    return orders


def import_clip_benchmark(
    directory: str | os.PathLike[str],
    text_weights: str | os.PathLike[str] | None = None,
    texts: ClassTexts | None = None,
    shots: Sequence[int] = CLIP_BENCHMARK_SHOTS,
    seed: int = 1,
    dataset: str | None = None,
    class_names: str | os.PathLike[str] | None = None,
) -> FeatureSet:
    """Read a CLIP_benchmark linear-probe feature folder (see the module docstring); the text classifier is
    ``text_weights`` (the D × C zero-shot head CLIP_benchmark saves) or ``texts`` (computed from the class names).
    Rows that are not of unit norm are divided by their norm, and the provenance says so."""
    folder = _folder_with_text(directory, text_weights, texts, "HEAD.pt", "the zero-shot head CLIP_benchmark saves")
    sources: dict[str, Path] = {}
    train = _split(folder, "train", sources)
    if train is None:
        raise InputError(folder, "no features_train.pt and targets_train.pt: not a CLIP_benchmark linear-probe "
                                 "feature folder")
    test = _split(folder, "test", sources)
    if test is None:
        raise InputError(folder, "no features_test.pt and targets_test.pt (the test split)")
    val = _split(folder, "val", sources)
    dim = train[0].shape[1]
    for name, part in (("test", test), ("val", val)):
        if part is not None and part[0].shape[1] != dim:
            raise InputError(folder / f"features_{name}.pt", f"features of {part[0].shape[1]} channels, "
                                                               f"features_train.pt's have {dim}")
    if texts is not None:
        texts.check_width(dim, "the folder's features")
        text = np.ascontiguousarray(texts.classifier.T)
    else:
        head = Path(text_weights)
        text = as_features(load_tensor(head), str(head))
        if text.shape[0] != dim:
            raise InputError(head, f"a head of shape {tuple(text.shape)}: {text.shape[0]} channels, the features have "
                                   f"{dim}" + transposed_hint(text.shape, dim))
        sources["head"] = head
    num_classes = text.shape[1]
    for name, part in (("train", train), ("val", val), ("test", test)):
        if part is not None and part[1].size and (part[1].min() < 0 or part[1].max() >= num_classes):
            bad = int(part[1].max() if part[1].max() >= num_classes else part[1].min())
            raise InputError(folder / f"targets_{name}.pt", f"class index {bad} out of range for the head's "
                                                            f"{num_classes} classes")
    parts = folder_name_parts(folder)
    provenance: dict[str, Any] = {
        "source": "clip-benchmark", "path": str(folder.resolve()), "seed": seed,
        "files": {name: file_sha256(path) for name, path in sorted(sources.items())}, "notes": [],
    }
    if parts is not None:
        provenance["clip_benchmark"] = dict(zip(("model", "pretrained", "dataset"), parts))
    names = names_from_file(num_classes, Path(class_names) if class_names else None)
    if texts is None and class_names is None:
        provenance["class_names"] = PLACEHOLDERS
    return few_shot_set(train[0], train[1], val, test, text, shots, seed, names, provenance,
                        canonical_name(dataset or (parts[2] if parts else None)),
                        {"name": f"{parts[0]} ({parts[1]})"} if parts else {}, texts, folder)


def few_shot_set(train_x: np.ndarray, train_y: np.ndarray, val: tuple[np.ndarray, np.ndarray] | None,
                 test: tuple[np.ndarray, np.ndarray], text: np.ndarray, shots: Sequence[int], seed: int,
                 names: tuple[str, ...], provenance: dict[str, Any], dataset: str | None, model: dict[str, Any],
                 texts: ClassTexts | None, source: Path) -> FeatureSet:
    """A feature set whose few-shot caches are drawn from a train split (:func:`draw`), its validation
    given or else a seeded part of train apart from the shots, its rows normalised where they are not
    (said in the provenance), its text ``text`` (D × C) or ``texts``'."""
    shots = tuple(sorted(set(int(k) for k in shots)))
    if not shots or shots[0] < 1:
        raise ApecliError(f"shot counts must be at least 1, got {list(shots)}")
    orders = draw(train_y, text.shape[1], max(shots), seed)
    caches = {}
    for k in shots:
        rows = np.array([row for order in orders for row in order[:k]], dtype=np.int64)
        caches[k] = FewShotCache(np.ascontiguousarray(train_x[rows]), train_y[rows])
    notes = list(provenance.get("notes", []))
    if val is None:
        rows = []
        for label, order in enumerate(orders):
            rest = order[max(shots):]
            if not rest:
                raise InputError(source, f"no validation split, and class {label} has no training image beyond its "
                                         f"{max(shots)} shots to validate on: fewer {Setting('shots')}", Setting("shots"))
            rows += rest[:max(1, round(VALIDATION_PART * len(order)))]
        rows = sorted(rows)
        val = (train_x[rows], train_y[rows])
        notes.append(f"no validation split: validation is {len(rows)} training images ({VALIDATION_PART:.0%} of each "
                     f"class's, drawn with seed {seed} after its shots and apart from them)")
    provenance = {**provenance, "shots": list(shots), "notes": notes}
    prompts = prompt_labels = None
    if texts is not None:
        provenance["text"] = texts.provenance()
        names, model = texts.class_names, texts.model_record(model.get("name"))
        prompts, prompt_labels = texts.prompts, texts.prompt_labels
    features = FeatureSet(
        class_names=names, classifier=np.ascontiguousarray(text.T), caches=caches,
        splits={"val": LabelledFeatures(val[0], val[1]), "test": LabelledFeatures(test[0], test[1])},
        dataset=dataset, model=model, provenance=provenance, prompts=prompts, prompt_labels=prompt_labels)
    try:
        return unit_rows(features.validate(), normalise=True)
    except ApecliError as error:
        raise error.within(f"{source}: ") from None


def clip_benchmark_result(summary: dict[str, Any], features: Described) -> dict[str, Any]:
    """An evaluation's summary (``apecli eval --json``) in CLIP_benchmark's result form: ``dataset``,
    ``model``, ``pretrained``, ``task``, ``metrics`` with ``acc1`` and ``mean_per_class_recall`` as
    fractions (and ``fewshot_k``, the shots), and the ``method`` that made it."""
    record = features.encoder
    origin = features.provenance.get("clip_benchmark", {})
    model = record.model or origin.get("model") or record.name
    pretrained = record.pretrained if record.model else origin.get("pretrained")

    def fraction(name: str) -> float | None:
        value = summary.get(name)
        return None if value is None else float(value) / 100.0

    return {
        "dataset": summary.get("dataset") or features.dataset,
        "model": model,
        "pretrained": pretrained,
        "task": TASK,
        "method": summary.get("mode"),
        "metrics": {"acc1": fraction("test_accuracy"), "mean_per_class_recall": fraction("test_class_accuracy"),
                    "fewshot_k": summary.get("shots"), "seed": features.seed},
        "language": "en",
    }


SPLITS = ("train", "val", "test")
DEFAULT_FRACTIONS = (0.6, 0.2, 0.2)


def _numbered(folder: Path, pattern: str, what: str) -> list[Path]:
    """``folder``'s files ``pattern`` (one ``(\\d+)`` in it) in the order of their numbers."""
    if not folder.is_dir():
        raise InputError(folder, f"no such folder (clip-retrieval writes {what} there)")
    found = [(int(match.group(1)), path) for path in folder.iterdir()
             if path.is_file() and (match := re.fullmatch(pattern, path.name))]
    if not found:
        raise InputError(folder, f"holds no {what}")
    return [path for _, path in sorted(found)]


def _parquet_table(path: Path) -> dict[str, list]:
    """A parquet file's columns, as lists (pyarrow, the optional extra ``interop``)."""
    try:
        import pyarrow.parquet as parquet
    except ImportError:
        raise ApecliError("reading clip-retrieval's parquet metadata needs pyarrow: pip install 'apecli[interop]'") \
            from None
    try:
        return parquet.read_table(path).to_pydict()
    except Exception as error:  # noqa: BLE001 - pyarrow raises many types for a damaged file
        raise InputError(path, f"not a readable parquet file ({first_line(error, 160)})") from None


def _split_of(value: Any, path: Path, column: str) -> int:
    text = str(value).strip().lower()
    if text not in SPLITS:
        raise InputError(path, f"column '{column}' holds '{value}', not train, val or test")
    return SPLITS.index(text)


def parse_fractions(text: str) -> tuple[float, float, float]:
    """``"0.6/0.2/0.2"`` → the train, val and test fractions (positive, summing to 1)."""
    try:
        parts = tuple(float(part) for part in text.split("/"))
    except ValueError:
        parts = ()
    if len(parts) != 3 or min(parts) <= 0 or abs(sum(parts) - 1) > 1e-6:
        raise ApecliError(f"splits '{text}': give train/val/test fractions that sum to 1 (such as 0.6/0.2/0.2), or "
                          "the name of a metadata column holding train, val or test")
    return parts  # type: ignore[return-value]


def import_clip_retrieval(
    directory: str | os.PathLike[str],
    labels: str = "folder",
    splits: str = "/".join(map(str, DEFAULT_FRACTIONS)),
    text_weights: str | os.PathLike[str] | None = None,
    texts: Callable[[tuple[str, ...]], ClassTexts] | None = None,
    shots: Sequence[int] = CLIP_BENCHMARK_SHOTS,
    seed: int = 1,
    dataset: str | None = None,
) -> FeatureSet:
    """Read a clip-retrieval output folder (see the module docstring). ``labels`` is ``folder`` (each
    image's parent folder) or a metadata column; ``splits`` is ``train/val/test`` fractions, drawn per
    class with ``seed``, or a column holding train, val or test. The classes are the labels, sorted; the
    text classifier is ``text_weights`` (D × C, classes in that order) or ``texts(class names)``."""
    folder = _folder_with_text(directory, text_weights, texts, "FILE", "D × C, the classes sorted")
    embeddings = _numbered(folder / "img_emb", r"img_emb_(\d+)\.npy", "img_emb_{i}.npy files")
    tables = _numbered(folder / "metadata", r"metadata_(\d+)\.parquet", "metadata_{i}.parquet files")
    if len(embeddings) != len(tables):
        raise InputError(folder, f"{len(embeddings)} img_emb files but {len(tables)} metadata files")
    rows, label_values, split_values, sources = [], [], [], {}
    fractions = parse_fractions(splits.strip()) if "/" in splits else None  # else a column's name
    for emb_path, table_path in zip(embeddings, tables):
        try:
            x = np.load(emb_path, allow_pickle=False)
        except (OSError, ValueError) as error:
            raise InputError(emb_path, f"not a readable .npy file ({first_line(error, 160)})") from None
        x = as_features(x, str(emb_path))
        table = _parquet_table(table_path)
        count = len(next(iter(table.values()))) if table else 0
        if count != x.shape[0]:
            raise InputError(table_path, f"{count} rows of metadata, but {emb_path.name} holds {x.shape[0]} embeddings")
        if labels == "folder":
            if "image_path" not in table:
                raise InputError(table_path, "has no column 'image_path', which labels by folder read")
            label_values += [Path(str(value)).parent.name for value in table["image_path"]]
        elif labels not in table:
            raise InputError(table_path, f"has no column '{labels}' (it has {', '.join(table) or 'none'})")
        else:
            label_values += [str(value) for value in table[labels]]
        if fractions is None:
            if splits not in table:
                raise InputError(table_path, f"has no column '{splits}' (it has {', '.join(table) or 'none'})")
            split_values += [_split_of(value, table_path, splits) for value in table[splits]]
        rows.append(x)
        sources[emb_path.name], sources[table_path.name] = emb_path, table_path
    x = np.concatenate(rows) if len(rows) > 1 else rows[0]
    if any(not value for value in label_values):
        raise InputError(folder, "an image without a label (an image_path with no folder, or an empty value)")
    names = tuple(sorted(set(label_values), key=lambda name: (not name.isdigit(), int(name) if name.isdigit() else 0,
                                                              name)))
    index = {name: position for position, name in enumerate(names)}
    y = np.array([index[value] for value in label_values], dtype=np.int64)
    if fractions is not None:
        rng = random.Random(seed)
        part = np.zeros(y.shape[0], dtype=np.int64)
        for label in range(len(names)):
            members = rng.sample(np.flatnonzero(y == label).tolist(), int((y == label).sum()))
            train_end = round(fractions[0] * len(members))
            val_end = train_end + round(fractions[1] * len(members))
            part[members[train_end:val_end]], part[members[val_end:]] = 1, 2
    else:
        part = np.array(split_values, dtype=np.int64)
    for number, split in enumerate(SPLITS):
        if not (part == number).any():
            raise InputError(folder, f"no image falls in the {split} split; give other {Setting('splits')}",
                             Setting("splits"))
    if texts is not None:
        computed = texts(names)
        computed.check_width(x.shape[1], "the folder's embeddings")
        text = np.ascontiguousarray(computed.classifier.T)
    else:
        computed, head = None, Path(text_weights)
        text = as_features(load_tensor(head), str(head))
        if text.shape != (x.shape[1], len(names)):
            raise InputError(head, f"a text classifier of shape {tuple(text.shape)}, expected (D={x.shape[1]} channels, "
                                   f"C={len(names)} classes: the labels found, sorted)")
        sources["text_weights"] = head
    provenance: dict[str, Any] = {
        "source": "clip-retrieval", "path": str(folder.resolve()), "seed": seed, "labels": labels, "splits": splits,
        "files": {name: file_sha256(path) for name, path in sorted(sources.items())}, "notes": [],
    }
    return few_shot_set(x[part == 0], y[part == 0], (x[part == 1], y[part == 1]), (x[part == 2], y[part == 2]), text,
                        shots, seed, names, provenance, canonical_name(dataset), {}, computed, folder)
