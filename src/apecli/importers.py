"""Bring features made elsewhere into the store, and take them back out.

- The APE / Tip-Adapter cache folder: ``keys_{K}shots.pt`` (D × C·K), ``values_{K}shots.pt`` (C·K × C,
  one-hot), ``val_f.pt``/``val_l.pt``, ``test_f.pt``/``test_l.pt``, and a D × C text classifier
  (a file given by the caller, ``text_weights_cupl_t.pt`` in the folder, or one computed from the class
  names with the model that made the cache: :func:`class_texts`; Tip-Adapter saves none).
- A plain ``.npz`` with ``text_weights`` (D × C; or computed as above), ``cache_keys`` (N × D), ``cache_labels``,
  ``val_features``, ``val_labels``, ``test_features``, ``test_labels``, and optionally ``cache_views``
  (V × N × D), ``class_names`` and ``prompt_embeddings`` (C × P × D; or M × D with ``prompt_labels`` (M,)
  where classes have different numbers of prompts). :func:`export_npz` writes the same arrays back.
- Either may bring each class's prompt embeddings (C × P × D), whose mean made the text classifier; the
  cache folder's come from a file given by the caller (:func:`prompt_table`).
"""

from __future__ import annotations

import os
import pickle
import re
import zipfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from apecli.errors import ApecliError, InputError, Placeholder, Setting, Step, first_line
from apecli.files import file_sha256, replacing
from apecli.kinds.features import PLACEHOLDERS, FeatureSet, FewShotCache, LabelledFeatures
from apecli.presets import canonical_name

if TYPE_CHECKING:
    from apecli.encoder import EncoderSpec

CUPL_TEXT_WEIGHTS = "text_weights_cupl_t.pt"
NPZ_REQUIRED = ("text_weights", "cache_keys", "cache_labels", "val_features", "val_labels", "test_features", "test_labels")
UNIT_TOLERANCE = 0.01  # how far from 1 an imported row's L2 norm may be: float16 storage moves it by about 5e-4


def load_tensor(path: Path) -> np.ndarray:
    """A tensor saved with torch.save, read safely (``weights_only=True``) as a numpy array."""
    import torch

    if not path.is_file():
        raise ApecliError(f"{path}: no such file")
    if zipfile.is_zipfile(path):
        _check_declared_sizes(path, _zip_sizes(path))
    try:
        value = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:  # weights_only's refusal: the file pickles more than tensors
        found = re.search(r"GLOBAL ([\w.]+)", str(error))
        what = f" ({found.group(1)})" if found else ""
        raise ApecliError(f"{path}: not a readable tensor file: it holds Python objects other than tensors{what}, "
                          "which apecli does not unpickle (a file of features holds tensors only)") from None
    except Exception as error:  # torch raises many types for a damaged or foreign file
        reason = first_line(error, 160)
        raise ApecliError(f"{path}: not a readable tensor file ({reason})") from None
    if not isinstance(value, torch.Tensor):
        raise ApecliError(f"{path}: holds a {type(value).__name__}, expected one tensor")
    if value.dtype == torch.bfloat16:
        value = value.float()
    return value.detach().cpu().numpy()


def _zip_sizes(path: Path) -> dict[str, int]:
    """What each member of a zip file says it holds once decompressed."""
    try:
        with zipfile.ZipFile(path) as archive:
            return {entry.filename: entry.file_size for entry in archive.infolist()}
    except (OSError, zipfile.BadZipFile, EOFError):
        return {}  # what reads it says what is wrong


def _npy_sizes(archive) -> dict[str, int]:
    """The bytes each array of an open ``.npz`` declares in its header, without reading its values."""
    sizes = {}
    for name in archive.files:
        with archive.zip.open(f"{name}.npy") as member:
            version = np.lib.format.read_magic(member)
            read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            shape, _, dtype = read(member)
        if dtype.hasobject:
            raise ValueError(f"'{name}' holds Python objects, which apecli does not unpickle")
        sizes[name] = int(np.prod(shape, dtype=np.float64)) * dtype.itemsize
    return sizes


def _check_declared_sizes(path: Path, sizes: dict[str, int]) -> None:
    """Refuse a file that declares more than this machine could hold (a zip bomb, a forged header) before
    anything is read: it is said so, not taken for running out of memory."""
    total, available = sum(sizes.values()), _available_memory()
    if available is not None and total > available:
        largest = max(sizes, key=sizes.get)
        raise InputError(path, f"declares {total / 1e9:,.1f} GB of arrays ('{largest}' alone {sizes[largest] / 1e9:,.1f} "
                               f"GB), more than the {available / 1e9:,.1f} GB this machine has available: an impossible "
                               "size for a file of features, or a damaged one")


def _available_memory() -> int | None:
    try:
        with open("/proc/meminfo") as info:
            return next(int(line.split()[1]) * 1024 for line in info if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError):
        return None


def as_features(array: np.ndarray, what: str, ndim: int = 2) -> np.ndarray:
    """``array`` when it holds floating-point features in ``ndim`` dimensions (rows × channels by default)."""
    if not np.issubdtype(array.dtype, np.floating):
        raise ApecliError(f"{what}: of type {array.dtype}, expected floating-point features")
    if array.ndim != ndim:
        raise ApecliError(f"{what}: of shape {array.shape}, expected {ndim} dimensions")
    return array


def as_labels(array: np.ndarray, what: str) -> np.ndarray:
    if array.ndim != 1:
        raise ApecliError(f"{what}: labels of shape {array.shape}, expected one dimension")
    if not np.issubdtype(array.dtype, np.integer):
        if np.issubdtype(array.dtype, np.floating) and np.array_equal(array, np.round(array)):
            return array.astype(np.int64)
        raise ApecliError(f"{what}: labels of type {array.dtype}, expected integers")
    return array.astype(np.int64)


def _labels_from_one_hot(values: np.ndarray, what: str) -> np.ndarray:
    if values.ndim != 2:
        raise ApecliError(f"{what}: shape {values.shape}, expected (C·K keys, C classes)")
    ones = values == 1
    if not (ones.sum(axis=1) == 1).all() or not ((values == 0) | ones).all():
        raise ApecliError(f"{what}: rows are not one-hot labels")
    return np.argmax(values, axis=1).astype(np.int64)


def names_from_file(count: int | None, names_file: Path | None) -> tuple[str, ...]:
    """Names from a file, one per line (``count`` of them, when given), or placeholders."""
    if names_file is None:
        return tuple(f"class_{i}" for i in range(count or 0))
    try:
        names = [line.strip() for line in Path(names_file).read_text().splitlines() if line.strip()]
    except OSError as error:
        raise ApecliError(f"{names_file}: cannot read class names ({error.strerror})") from None
    if count is not None and len(names) != count:
        raise ApecliError(f"{names_file}: {len(names)} class names for {count} classes")
    return tuple(names)


@dataclass(frozen=True)
class ClassTexts:
    """A text classifier computed from class names: C × D rows, the names, and what made it."""

    classifier: np.ndarray
    class_names: tuple[str, ...]
    encoder: dict[str, Any]
    templates: tuple[str, ...]
    prompted_classes: int
    prompts: np.ndarray | None = None  # M × D, every prompt's embedding
    prompt_labels: np.ndarray | None = None  # (M,), the class of each

    @property
    def model_name(self) -> str | None:
        """The model that computed the text classifier."""
        return self.encoder.get("model")

    def model_record(self, name: str | None) -> dict[str, Any]:
        """The imported features' model: this encoder, less the device and precision, which were the
        text's; the images' own are unknown."""
        record = {key: value for key, value in self.encoder.items() if key not in ("device", "precision")}
        return {**record, "name": name} if name else record

    def provenance(self) -> dict[str, Any]:
        return {"computed_by": self.model_name, "templates": list(self.templates),
                "prompted_classes": self.prompted_classes}

    def check_width(self, dim: int, what: str) -> None:
        if self.classifier.shape[1] != dim:
            model = self.model_name
            raise ApecliError(f"the text of {model} has {self.classifier.shape[1]} channels, {what} {dim}: "
                              f"{model} is not the model that made them")


def class_texts(spec: "EncoderSpec", dataset: str | None, root: str | os.PathLike[str] | None = None,
                class_names: str | os.PathLike[str] | None = None,
                prompts: str | os.PathLike[str] | None = None, names: Sequence[str] | None = None) -> ClassTexts:
    """CLIP's text classifier for a cache whose folder has none, as :mod:`apecli.extract` would make it:
    the class names ``names``, or from ``class_names`` (a file, one per line in label order), or else from
    the CoOp layout of ``dataset`` under ``root``; the dataset's templates (the generic one for another dataset),
    and CuPL sentences from ``prompts``."""
    from apecli.datasets import GENERIC_TEMPLATES, LAYOUTS, read_coop, read_prompts
    from apecli.encoder import load_encoder

    canonical = canonical_name(dataset)
    if names is not None:  # found in the features' own files
        names = tuple(names)
    elif class_names is not None:
        names = names_from_file(None, Path(class_names))
    elif canonical in LAYOUTS and root is not None:
        names = read_coop(canonical, Path(root)).class_names
    else:
        named = (Setting("class_names", Placeholder("FILE")), Setting("dataset", Placeholder("NAME")),
                 Setting("root", Placeholder("DIR")))
        raise ApecliError("computing the text classifier needs the class names: give {} (one per line, in label "
                          "order), or {} and {} of a CoOp dataset".format(*named), *named)
    templates = LAYOUTS[canonical].templates if canonical in LAYOUTS else GENERIC_TEMPLATES
    sentences = read_prompts(prompts, names) if prompts is not None else None
    encoder = load_encoder(spec)
    classifier, prompts, prompt_labels = encoder.text_embeddings(names, templates, sentences)
    return ClassTexts(classifier, names, encoder.describe(), templates, len(sentences or {}), prompts, prompt_labels)


def prompt_table(array: np.ndarray, what: str, num_classes: int, dim: int,
                 labels: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Prompt embeddings as a feature set keeps them (M × D rows and their classes), from C × P × D, or
    from M × D rows with their ``labels`` (classes with different numbers of prompts)."""
    if labels is None:
        array = as_features(array, what, 3)
        if array.shape[0] != num_classes or array.shape[2] != dim or array.shape[1] == 0:
            raise ApecliError(f"{what}: prompt embeddings of shape {tuple(array.shape)}, expected (C={num_classes} "
                              f"classes, P ≥ 1 prompts, D={dim} channels)")
        return (np.ascontiguousarray(array.reshape(-1, dim)),
                np.repeat(np.arange(num_classes, dtype=np.int64), array.shape[1]))
    array, labels = as_features(array, what), as_labels(labels, f"{what}: prompt_labels")
    if array.shape[1] != dim or labels.shape[0] != array.shape[0]:
        raise ApecliError(f"{what}: {array.shape[0]} prompt embeddings of {array.shape[1]} channels with "
                          f"{labels.shape[0]} labels, expected one label each and {dim} channels")
    return array, labels


def import_tip_adapter(
    directory: str | os.PathLike[str],
    text_weights: str | os.PathLike[str] | None = None,
    dataset: str | None = None,
    class_names: str | os.PathLike[str] | None = None,
    model: str | None = None,
    shots: Sequence[int] | None = None,
    texts: ClassTexts | None = None,
    normalise: bool = False,
    prompt_embeddings: str | os.PathLike[str] | None = None,
) -> FeatureSet:
    """Read an APE / Tip-Adapter cache folder: every shot count in it, or those of ``shots``.

    The text classifier is ``text_weights``, else ``texts`` (computed by :func:`class_texts`, whose
    encoder is then recorded as the features' model), else the folder's ``text_weights_cupl_t.pt``.
    ``prompt_embeddings`` is a C × P × D ``.pt`` of each class's prompt embeddings (with ``texts``, those
    the text was computed from are kept). Rows must be L2-normalised; ``normalise`` divides each row by
    its norm instead (see :func:`unit_rows`)."""
    folder = Path(directory)
    if not folder.is_dir():
        raise ApecliError(f"{folder}: no such folder")
    shot_counts = sorted(
        int(match.group(1))
        for path in folder.glob("keys_*shots.pt")
        if (match := re.fullmatch(r"keys_(\d+)shots\.pt", path.name))
    )
    if not shot_counts:
        raise ApecliError(f"{folder}: no keys_{{K}}shots.pt files: not an APE / Tip-Adapter cache folder")
    if shots is not None:
        absent = sorted(set(shots) - set(shot_counts))
        if absent:
            raise ApecliError(f"{folder}: no keys_{absent[0]}shots.pt (it holds {', '.join(map(str, shot_counts))} shots)")
        shot_counts = sorted(set(shots))
    sources: dict[str, Path] = {}
    if text_weights is None and texts is None:
        if not (folder / CUPL_TEXT_WEIGHTS).is_file():
            named = (Setting("text_weights", Placeholder("FILE")), Step("class_texts"))
            raise InputError(folder, f"no text classifier: pass {named[0]} (D × C), add {CUPL_TEXT_WEIGHTS}, or "
                                     f"compute it with {named[1]}", *named)
        text_weights = folder / CUPL_TEXT_WEIGHTS
    computed = texts if text_weights is None else None  # the text classifier, when it comes from the class names
    if computed is None:
        text_path = Path(text_weights)
        sources["text_weights"] = text_path
        text = as_features(load_tensor(text_path), str(text_path))
    else:  # C × D rows
        text = np.ascontiguousarray(computed.classifier.T)
    present = [split for split in ("val", "test") if (folder / f"{split}_f.pt").is_file()]
    if not present:
        raise ApecliError(f"{folder}: no val_f.pt or test_f.pt (the validation and test features)")
    splits, notes = {}, []
    for split in present:
        features_path, labels_path = folder / f"{split}_f.pt", folder / f"{split}_l.pt"
        sources[features_path.name], sources[labels_path.name] = features_path, labels_path
        splits[split] = LabelledFeatures(
            as_features(load_tensor(features_path), str(features_path)),
            as_labels(load_tensor(labels_path), str(labels_path)),
        )
    if len(present) == 1:  # ImageNet's folders: APE writes val_f.pt alone, Tip-Adapter test_f.pt
        other = "test" if present == ["val"] else "val"
        splits[other] = splits[present[0]]
        notes.append(f"{present[0]}_f.pt alone: its images serve as both validation and test, "
                     "as the protocol has it for ImageNet")
    dim = splits[present[0]].features.shape[-1]
    if computed is not None:
        computed.check_width(dim, "the cache's features")
    if text.ndim != 2 or text.shape[0] != dim:
        raise ApecliError(f"{text_path}: shape {tuple(text.shape)}, expected (D={dim} channels, C classes)"
                          + transposed_hint(text.shape, dim))
    num_classes = text.shape[1]
    keys_of = {count: as_features(load_tensor(folder / f"keys_{count}shots.pt"), f"{folder}/keys_{count}shots.pt")
               for count in shot_counts}
    matching = [count for count, keys in keys_of.items() if keys.ndim == 2 and keys.shape[0] == dim]
    if len(matching) < len(shot_counts):
        count = next(count for count in shot_counts if count not in matching)
        keys = keys_of[count]
        hint = f", or import the shot counts that match with {Setting('shots', Placeholder(','.join(map(str, matching))))}" \
            if matching else ""
        raise ApecliError(
            f"{folder / f'keys_{count}shots.pt'}: {keys.shape[0] if keys.ndim == 2 else keys.shape}-channel keys, but "
            f"{present[0]}_f.pt has {dim} channels: the folder mixes features of different models; re-extract it{hint}"
        )
    caches = {}
    for shots, keys in keys_of.items():
        keys_path, values_path = folder / f"keys_{shots}shots.pt", folder / f"values_{shots}shots.pt"
        sources[keys_path.name], sources[values_path.name] = keys_path, values_path
        values = load_tensor(values_path)
        labels = _labels_from_one_hot(values, str(values_path))
        if values.shape[0] == keys.shape[1] and values.shape[1] != num_classes:
            raise ApecliError(f"{values_path}: labels of {values.shape[1]} classes, but the text classifier has "
                              f"{num_classes}{' (of the class names given)' if computed is not None else ''}")
        if values.shape != (keys.shape[1], num_classes):
            raise ApecliError(
                f"{values_path}: labels for {values.shape[0]} keys and {values.shape[1]} classes, "
                f"expected {keys.shape[1]} keys and {num_classes} classes"
            )
        caches[shots] = FewShotCache(np.ascontiguousarray(keys.T), labels)
    for split in present:
        if splits[split].features.ndim != 2 or splits[split].features.shape[1] != dim:
            raise ApecliError(f"{folder}/{split}_f.pt: shape {splits[split].features.shape}, expected (N, {dim})")
    provenance: dict[str, Any] = {
        "source": "tip-adapter",
        "path": str(folder.resolve()),
        "files": {name: file_sha256(path) for name, path in sorted(sources.items())},
        "notes": notes,
    }
    names = names_from_file(num_classes, Path(class_names) if class_names else None)
    recorded = {"name": model} if model else {}
    prompts = prompt_labels = None
    if computed is not None:
        provenance["text"] = computed.provenance()
        names, recorded = computed.class_names, computed.model_record(model)
        prompts, prompt_labels = computed.prompts, computed.prompt_labels
    elif class_names is None:
        provenance["class_names"] = PLACEHOLDERS
    if prompt_embeddings is not None:
        prompt_path = Path(prompt_embeddings)
        prompts, prompt_labels = prompt_table(load_tensor(prompt_path), str(prompt_path), num_classes, dim)
        provenance["files"]["prompt_embeddings"] = file_sha256(prompt_path)
    return unit_rows(FeatureSet(
        class_names=names,
        classifier=np.ascontiguousarray(text.T),
        caches=caches,
        splits=splits,
        dataset=canonical_name(dataset),
        model=recorded,
        provenance=provenance,
        prompts=prompts,
        prompt_labels=prompt_labels,
    ).validate(), normalise)


def transposed_hint(shape: tuple[int, ...], width: int) -> str:
    return "; it holds C × D: transpose it" if len(shape) == 2 and shape[1] == width != shape[0] else ""


def import_npz(
    file: str | os.PathLike[str], dataset: str | None = None, model: str | None = None,
    texts: ClassTexts | None = None, normalise: bool = False,
) -> FeatureSet:
    """Read a plain ``.npz`` of features (see the module docstring for its arrays); ``texts`` (from
    :func:`class_texts`) stands in for a ``text_weights`` it lacks. Rows must be L2-normalised;
    ``normalise`` divides each row by its norm instead (see :func:`unit_rows`)."""
    path = Path(file)
    if not path.is_file():
        raise ApecliError(f"{path}: no such file")
    if not zipfile.is_zipfile(path):
        raise ApecliError(f"{path}: not a readable .npz file (not a zip archive)")
    try:
        with np.load(path, allow_pickle=False) as archive:
            _check_declared_sizes(path, _npy_sizes(archive))
            arrays = {name: archive[name] for name in archive.files}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as error:
        raise InputError(path, f"not a readable .npz file ({first_line(error, 160)})") from None
    if texts is not None and "text_weights" in arrays:
        raise InputError(path, f"holds text_weights already; import it without {Setting('texts')}", Setting("texts"))
    missing = [name for name in NPZ_REQUIRED if name not in arrays and not (name == "text_weights" and texts)]
    if missing:
        raise ApecliError(f"{path}: lacks {', '.join(missing)}")
    if texts is not None:
        texts.check_width(np.shape(arrays["val_features"])[-1], "the file's features")
        if "class_names" in arrays and tuple(map(str, arrays["class_names"])) != texts.class_names:
            raise ApecliError(f"{path}: its class_names differ from those the text was computed from")
    text = np.ascontiguousarray(texts.classifier.T) if texts is not None else as_features(arrays["text_weights"], "text_weights")
    width = np.shape(arrays["val_features"])[-1] if np.ndim(arrays["val_features"]) else 0
    transposed = transposed_hint(text.shape, width)  # any other disagreement of widths, validate names
    if text.ndim != 2 or transposed:
        raise ApecliError(f"{path}: text_weights of shape {text.shape}, expected (D={width} channels, C classes)"
                          + transposed)
    num_classes = text.shape[1]
    labels = as_labels(arrays["cache_labels"], "cache_labels")
    counts = np.bincount(labels[labels >= 0], minlength=num_classes) if labels.size else np.zeros(1, int)
    if labels.size == 0 or labels.min() < 0 or labels.max() >= num_classes:
        raise ApecliError(f"{path}: cache_labels out of range for {num_classes} classes")
    if counts.min() != counts.max():
        raise ApecliError(
            f"{path}: cache_labels give classes between {counts.min()} and {counts.max()} keys; "
            "every class needs the same number of shots"
        )
    shots = int(counts.max())
    views = arrays.get("cache_views")
    names = texts.class_names if texts is not None else arrays.get("class_names")
    if names is not None and (np.ndim(names) != 1 or len(names) != num_classes):
        raise ApecliError(f"{path}: class_names of shape {np.shape(names)}, expected one name for each of the "
                          f"{num_classes} classes")
    prompts = prompt_labels = None
    if "prompt_embeddings" in arrays:
        prompts, prompt_labels = prompt_table(arrays["prompt_embeddings"], "prompt_embeddings", num_classes, width,
                                              arrays.get("prompt_labels"))
    elif texts is not None:
        prompts, prompt_labels = texts.prompts, texts.prompt_labels
    provenance: dict[str, Any] = {"source": "npz", "path": str(path.resolve()), "files": {path.name: file_sha256(path)}}
    if texts is not None:
        provenance["text"] = texts.provenance()
    if names is None:
        provenance["class_names"] = PLACEHOLDERS
    features = FeatureSet(
        class_names=tuple(str(n) for n in names) if names is not None else names_from_file(num_classes, None),
        classifier=np.ascontiguousarray(text.T),
        caches={shots: FewShotCache(as_features(arrays["cache_keys"], "cache_keys"), labels,
                                    None if views is None else as_features(views, "cache_views", 3))},
        splits={
            split: LabelledFeatures(
                as_features(arrays[f"{split}_features"], f"{split}_features"),
                as_labels(arrays[f"{split}_labels"], f"{split}_labels"),
            )
            for split in ("val", "test")
        },
        dataset=canonical_name(dataset),
        model=texts.model_record(model) if texts is not None else {"name": model} if model else {},
        provenance=provenance,
        prompts=prompts,
        prompt_labels=prompt_labels,
    )
    try:
        return unit_rows(features.validate(), normalise)
    except ApecliError as error:
        raise error.within(f"{path}: ") from None


def unit_rows(features: FeatureSet, normalise: bool = False) -> FeatureSet:
    """``features`` once every row (text classifier, keys, views, split features) is of unit L2 norm,
    as every method assumes. Where a row is more than ``UNIT_TOLERANCE`` away from it, ``normalise``
    divides every row by its norm (in float64, kept in its own dtype) and the provenance says so;
    without it, that is refused. Features already of unit norm are returned as they are."""
    def scaled(array: np.ndarray | None) -> np.ndarray | None:
        if array is None:
            return None
        rows = array.astype(np.float64)
        return (rows / np.linalg.norm(rows, axis=-1, keepdims=True)).astype(array.dtype)

    parts = [("text classifier", features.classifier)]
    for shots, cache in sorted(features.caches.items()):
        parts.append((f"{shots}-shot cache keys", cache.keys))
        if cache.views is not None:
            parts.append((f"{shots}-shot views", cache.views))
    parts += [(f"{split} features", part.features) for split, part in sorted(features.splits.items())]
    if features.prompts is not None:
        parts.append(("prompt embeddings", features.prompts))
    ranges = {}
    for what, array in parts:  # in float32 at least: float16 squares would lose the tolerance's digits
        norms = np.sqrt(np.einsum("...d,...d->...", array, array, dtype=np.promote_types(array.dtype, np.float32)))
        if norms.size:
            ranges[what] = (float(norms.min()), float(norms.max()))
    off = [(what, low, high) for what, (low, high) in ranges.items() if max(1 - low, high - 1) > UNIT_TOLERANCE]
    if not off:
        return features
    if not normalise:
        what, low, high = off[0]
        raise ApecliError(f"{what} are not L2-normalised (row norms from {low:.3g} to {high:.3g}); import them with "
                          f"{Setting('normalise', True)} to divide each row by its norm", Setting("normalise", True))
    notes = [f"rows L2-normalised at import ({what}: norms were {low:.3g} to {high:.3g})" for what, low, high in off]
    return replace(
        features,
        classifier=scaled(features.classifier),
        caches={shots: replace(cache, keys=scaled(cache.keys), views=scaled(cache.views))
                for shots, cache in features.caches.items()},
        splits={split: replace(part, features=scaled(part.features)) for split, part in features.splits.items()},
        prompts=scaled(features.prompts),
        provenance={**features.provenance, "notes": [*features.provenance.get("notes", []), *notes]},
    )


def export_npz(features: FeatureSet, out: str | os.PathLike[str], shots: int | None = None) -> Path:
    """Write a feature set's arrays (one shot count) as the ``.npz`` that :func:`import_npz` reads."""
    shots, cache = features.cache(shots)
    arrays = {
        "text_weights": np.ascontiguousarray(features.classifier.T),
        "cache_keys": cache.keys,
        "cache_labels": cache.labels,
        "class_names": np.array(features.class_names, dtype=str),
    }
    views = features.views(shots)
    if views is not None:
        arrays["cache_views"] = views
    for split, part in features.splits.items():
        arrays[f"{split}_features"], arrays[f"{split}_labels"] = part.features, part.labels
    if features.prompts is not None:
        counts = features.prompt_counts
        if counts.min() == counts.max():  # C × P × D, as the importers read it
            arrays["prompt_embeddings"] = features.prompts.reshape(features.num_classes, -1, features.dim)
        else:
            arrays["prompt_embeddings"], arrays["prompt_labels"] = features.prompts, features.prompt_labels
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with replacing(out) as temporary, open(temporary, "wb") as handle:
        np.savez(handle, **arrays)
    return out
