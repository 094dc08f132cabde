"""The extract stage: images → CLIP features in the store, as the APE protocol prescribes.

1. **Plan.** Per class, a seeded permutation of its training images; the K-shot cache takes the
   first K readable ones (so the 8-shot images are among the 16-shot ones, and a training image is
   encoded once for every shot count).
2. **Encode** in chunks: training images through APE's augmentation, ``views`` times each (every view
   seeded by its image and view number, so the result does not depend on batching or workers);
   validation and test images through the model's evaluation transform. Each finished chunk is saved
   at once (temporary file, then rename) in a folder named by the request, so a run that is
   interrupted resumes where it stopped, and a changed model or split, being another request, never
   meets the old chunks. Under torchrun each process encodes the chunks it owns (see
   :mod:`apecli.distributed`) and rank 0 assembles them.
3. **Assemble.** A key is the L2-normalised mean of its views' features; views, validation and test
   features are L2-normalised. The text classifier and the provenance join them in one artifact.

Running the same request again finds the artifact it made and returns it without encoding anything.
A request that differs from a stored one only in its few-shot draw (shot counts, seed, views: the
protocol's seeds) takes that one's validation and test features as they are, and encodes its training
images alone.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from apecli import store
from apecli.checks import check_seed
from apecli.datasets import ImageDataset
from apecli.distributed import Ranks, agree, barrier, owns
from apecli.encoder import Encoder, EncoderSpec, load_encoder
from apecli.errors import ApecliError, ChoiceError, InputError, Setting, SettingError, Step
from apecli.files import ShardMember, replacing
from apecli.images.gpu import decoded_batches, device_decoder
from apecli.images.loading import Batch, pil_batches, readable, split_transform
from apecli.kinds.features import (
    KIND,
    FeatureSet,
    FeaturesHeader,
    FewShotCache,
    LabelledFeatures,
    load_features,
    save_features,
)

SplitProgress = Callable[[str, int, int], None]  # split, images done, images in the split


PROTOCOL_SHOTS = (1, 2, 4, 8, 16)
SKIP_BAD = Setting("skip_bad", True)


def cores() -> int:
    """The CPU cores this process may run on (a container or ``taskset`` may allow fewer than the machine
    has), shared among the processes torchrun started on this machine."""
    allowed = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, allowed // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))


def default_workers(device: str) -> int:
    """The PIL decoding processes extraction uses when none are asked for, never more than :func:`cores`:
    up to 16 for a CUDA encoder, where decoding bounds extraction (on an H200 with 16 cores, 16 reached
    94-107 % of what they decode alone; docs/performance.md), and up to 4 for a CPU encoder, which
    needs the other cores."""
    return min(16 if device.startswith("cuda") else 4, cores())


def default_read_threads() -> int:
    """The threads that read the files for ``--decode gpu`` when none are asked for: up to 4. On an H200
    with 16 cores, 2 and 4 fed it faster than 8, and 8 faster than 16 (docs/performance.md)."""
    return min(4, cores())


def fitting_shots(dataset: ImageDataset, wanted: tuple[int, ...] = PROTOCOL_SHOTS) -> tuple[int, ...]:
    """The shot counts of ``wanted`` that every class's training images can fill, and the smallest class's
    count where that is fewer than the largest wanted (a handful of images per class: 10, split 5 / 2 / 3,
    gives 1, 2, 4 and 5). Unchanged where every class has enough."""
    fewest = min((len(paths) for paths in dataset.by_class("train")), default=0)
    if fewest == 0 or fewest >= max(wanted):  # a class without training images is refused by the plan
        return tuple(wanted)
    return tuple(sorted({count for count in wanted if count <= fewest} | {fewest}))


@dataclass(frozen=True)
class ExtractSettings:
    """How to extract: shot counts, seed, views, and the loader's shape."""

    shots: tuple[int, ...] = PROTOCOL_SHOTS
    seed: int = 1
    views: int = 10
    batch_size: int = 64
    workers: int = 0
    chunk_images: int = 512
    skip_bad: bool = False
    decode: str = "pil"  # or "gpu": JPEGs of validation and test decoded on the encoder's device
    exif_orientation: bool = False  # photos turned upright by their EXIF orientation tag (not APE's protocol)
    read_threads: int = field(default_factory=default_read_threads)  # for decode="gpu"; training views use the workers

    def __post_init__(self) -> None:
        if self.decode not in ("pil", "gpu"):
            raise ChoiceError("decode", self.decode, f"decode must be pil or gpu, got '{self.decode}'", ("pil", "gpu"))
        if not self.shots or min(self.shots) < 1:
            raise ApecliError(f"shots must be positive, got {list(self.shots)}")
        for name in ("views", "batch_size", "chunk_images", "read_threads"):
            if getattr(self, name) < 1:
                raise ApecliError(f"{name.replace('_', ' ')} must be at least 1")
        if self.workers < 0:
            raise ApecliError("workers must not be negative")
        check_seed(self.seed)


@dataclass(frozen=True)
class Plan:
    """The images to encode: the few-shot training images (class by class) and the val/test images."""

    train: tuple[Path, ...]
    train_labels: np.ndarray
    first: dict[int, list[int]]  # shot count → indices into ``train``, class by class
    evaluation: dict[str, tuple[tuple[Path, int], ...]]
    skipped: list[dict[str, str]] = field(default_factory=list)


def request_id(dataset: ImageDataset, encoder: dict[str, Any], settings: ExtractSettings,
               templates: Sequence[str], prompts: dict[str, list[str]] | None) -> str:
    """A hash of everything that decides the features: model, weights, images, split, protocol."""
    # the few-shot draw: nothing of it in a test set's features
    return _request_hash(dataset, encoder, settings, templates, prompts, few_shot=not dataset.test_only)


def evaluation_request_id(dataset: ImageDataset, encoder: dict[str, Any], settings: ExtractSettings,
                          templates: Sequence[str], prompts: dict[str, list[str]] | None) -> str:
    """A hash of what decides the validation and test features and the text: the request without its
    few-shot draw, so feature sets that differ only in their seed, shots or views share it."""
    return _request_hash(dataset, encoder, settings, templates, prompts, few_shot=False)


def _request_hash(dataset: ImageDataset, encoder: dict[str, Any], settings: ExtractSettings,
                  templates: Sequence[str], prompts: dict[str, list[str]] | None, few_shot: bool) -> str:
    digest = hashlib.sha256()
    listing = {split: [[str(path), label] for path, label in entries] for split, entries in dataset.splits.items()}
    request = {
        "encoder": encoder, "dataset": dataset.name, "classes": list(dataset.class_names), "listing": listing,
        "split_file": dataset.split_file_sha256, "skip_bad": settings.skip_bad, "templates": list(templates),
        "prompts": prompts or {}, "decode": settings.decode,
    }
    if settings.exif_orientation:  # absent otherwise: the requests of stores made before it stay the same
        request["exif_orientation"] = True
    if few_shot:
        request.update(shots=sorted(settings.shots), seed=settings.seed, views=settings.views)
    digest.update(json.dumps(request, sort_keys=True).encode())
    return digest.hexdigest()[:16]


def plan(dataset: ImageDataset, settings: ExtractSettings) -> Plan:
    """Choose the few-shot images (seeded, readable) and list the evaluation images."""
    if dataset.test_only:  # a shifted test set: the classifier's text and the test images, nothing to draw
        if not dataset.splits["test"]:
            raise ApecliError(f"{dataset.root}: the test split is empty")
        return Plan((), np.zeros(0, dtype=np.int64), {}, {"test": dataset.splits["test"]})
    most = max(settings.shots)
    rng = random.Random(settings.seed)
    train: list[Path] = []
    labels: list[int] = []
    skipped: list[dict[str, str]] = []
    groups = dataset.by_class("train")
    empty = [dataset.class_names[label] for label, paths in enumerate(groups) if not paths]
    if empty:
        raise ApecliError(f"class '{empty[0]}' has no training images" + (f" (and {len(empty) - 1} more classes)" if len(empty) > 1 else ""))
    orders = [rng.sample(paths, len(paths)) for paths in groups]
    reasons = _check_readable(orders, most, max(1, settings.workers))
    for label, order in enumerate(orders):
        name = dataset.class_names[label]
        chosen = []
        for path in order:
            if len(chosen) == most:
                break
            reason = reasons[path]
            if reason is None:
                chosen.append(path)
            elif settings.skip_bad:
                skipped.append({"split": "train", "path": str(path), "error": reason})
            else:
                raise InputError(path, f"unreadable image ({reason}); pass {SKIP_BAD} to record and skip it", SKIP_BAD)
        if len(chosen) < most:
            raise SettingError("shots", settings.shots, f"class '{name}' has {len(chosen)} usable training images, fewer "
                               f"than {most} shots: give {Setting('shots')} with counts up to {len(chosen)}" if chosen else
                               f"class '{name}' has no usable training images")
        train += chosen
        labels += [label] * most
    first = {k: [c * most + i for c in range(len(dataset.class_names)) for i in range(k)] for k in settings.shots}
    evaluation = {split: dataset.splits[split] for split in ("val", "test")}
    for split, entries in evaluation.items():
        if not entries:
            raise ApecliError(f"{dataset.root}: the {split} split is empty")
    return Plan(tuple(train), np.array(labels, dtype=np.int64), first, evaluation, skipped)


def _check_readable(orders: list[list[Path]], most: int, threads: int) -> dict[Path, str | None]:
    """Whether each image decodes (None) or why not, for the shortest start of each class's order that
    holds ``most`` readable images (all of it when none does): the images :func:`plan` looks at,
    decoded in ``threads`` threads (PIL releases the GIL while it decodes)."""
    reasons: dict[Path, str | None] = {}
    checked, good = [0] * len(orders), [0] * len(orders)
    with ThreadPoolExecutor(threads) as pool:
        while True:
            wanted = [order[checked[label]:checked[label] + most - good[label]] for label, order in enumerate(orders)]
            batch = [path for paths in wanted for path in paths]
            if not batch:
                return reasons
            reasons.update(zip(batch, pool.map(readable, batch)))
            for label, paths in enumerate(wanted):
                checked[label] += len(paths)
                good[label] += sum(reasons[path] is None for path in paths)


def _chunks(count: int, settings: ExtractSettings) -> list[range]:
    return [range(start, min(start + settings.chunk_images, count)) for start in range(0, count, settings.chunk_images)]


def _chunk_files(work: Path, name: str, count: int, settings: ExtractSettings) -> list[Path]:
    return [work / f"{name}-{number:05d}.npz" for number in range(len(_chunks(count, settings)))]


def _sharding_units(paths: Sequence[Path], chunks: Sequence[range]) -> list[int]:
    """What the ranks of a torchrun extraction share out, one number per chunk: the chunk itself, or, for
    images in WebDataset shards, the shard its first image lies in, so that each rank reads whole shards
    of its own."""
    if not paths or not isinstance(paths[0], ShardMember):
        return list(range(len(chunks)))
    order: dict[Path, int] = {}
    for path in paths:
        order.setdefault(path.shard, len(order))
    return [order[paths[chunk.start].shard] if chunk else 0 for chunk in chunks]


def encode_batches(encoder: Encoder, paths: Sequence[Path], batches: Sequence[Sequence[int]], views: int,
                   settings: ExtractSettings, finish: Callable[[Batch, dict[int, np.ndarray]], None]) -> None:
    """Decode and encode the images of ``batches`` (lists of indices into ``paths``), handing each batch
    with its features by image index to ``finish``: one batch encodes on the device while the next is read
    and decoded. ``views`` > 0 encodes that many augmented views of each image, 0 the evaluation transform
    alone. An unreadable image is refused unless ``settings.skip_bad`` (then its features are missing).
    A batch being encoded when the loop ends, also by an error or an interruption, is finished too."""
    pixels = split_transform(encoder.train_transform if views else encoder.eval_transform)
    if settings.decode == "gpu" and views == 0:  # files are read by threads: decoding is the GPU's
        loader = decoded_batches(paths, batches, settings.read_threads, encoder, pixels, upright=settings.exif_orientation)
    else:
        loader = pil_batches(paths, batches, pixels.on_image, views, settings.seed, settings.workers, encoder.device,
                             upright=settings.exif_orientation)

    def start(batch: Batch) -> Callable[[], dict[int, np.ndarray]]:
        """Queue a batch on the encoder; the returned function gives its features by image index."""
        for index, error in zip(batch.indices, batch.errors):
            if error is not None and not settings.skip_bad:
                raise InputError(paths[index], f"unreadable image ({error}); pass {SKIP_BAD} to record and skip it",
                                 SKIP_BAD)
        indices = batch.readable
        if not indices:
            return lambda: {}
        images = pixels.model_input(batch.images.reshape(-1, *batch.images.shape[-3:]), encoder.device)
        result = encoder.start_encoding(images)
        return lambda: dict(zip(indices, result().reshape(len(indices), *((views,) if views else ()), -1)))

    in_flight = None
    try:
        for batch in loader:
            started = (batch, start(batch))
            previous, in_flight = in_flight, started
            if previous is not None:
                finish(previous[0], previous[1]())
    finally:  # also when interrupted: what was encoded is kept
        loader.close()  # its loader processes or reading threads end here, also on an error
        if in_flight is not None:
            finish(in_flight[0], in_flight[1]())


def _batches(indices: Sequence[Sequence[int]], views: int, settings: ExtractSettings) -> list[list[int]]:
    """Groups of indices cut into the encoder's batches (a batch holds ``batch_size`` tensors)."""
    per_batch = max(1, settings.batch_size // max(views, 1))
    return [list(group[i : i + per_batch]) for group in indices for i in range(0, len(group), per_batch)]


def encode_chunks(encoder: Encoder, name: str, paths: Sequence[Path], views: int, work: Path,
                  settings: ExtractSettings, progress: SplitProgress | None, ranks: Ranks = Ranks()) -> None:
    """Encode the chunks of one split that are not saved yet and that this process owns, saving each.

    ``views`` > 0 encodes that many augmented views of each image, 0 the evaluation transform alone.
    Progress counts the saved chunks of every process, so rank 0 shows the aggregate.
    """
    Path(work).mkdir(parents=True, exist_ok=True)
    chunks = _chunks(len(paths), settings)
    files = _chunk_files(work, name, len(paths), settings)
    units = _sharding_units(paths, chunks)
    pending = [n for n, file in enumerate(files) if not file.is_file() and owns(units[n], ranks.rank, ranks.world)]

    def report(in_memory: int) -> None:
        if progress is not None:
            saved = sum(len(chunk) for chunk, file in zip(chunks, files) if file.is_file())
            progress(name, min(len(paths), saved + in_memory), len(paths))

    report(0)
    buffers: dict[int, dict[int, tuple[np.ndarray | None, str]]] = {}

    def finish(batch: Batch, features: dict[int, np.ndarray]) -> None:
        for index, error in zip(batch.indices, batch.errors):
            number = index // settings.chunk_images
            buffers.setdefault(number, {})[index] = (features.get(index), error or "")
            if len(buffers[number]) == len(chunks[number]):
                _save_chunk(files[number], chunks[number], buffers.pop(number))
        report(sum(len(buffer) for buffer in buffers.values()))

    encode_batches(encoder, paths, _batches([chunks[n] for n in pending], views, settings), views, settings, finish)


def encode_images(encoder: Encoder, paths: Sequence[Path], settings: ExtractSettings,
                  progress: SplitProgress | None = None,
                  name: str = "images") -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Encode images in memory with the evaluation transform (a handful, say, to classify): features
    (N × D, not normalised; NaN rows for unreadable images), a readable mask, and each image's error."""
    features: dict[int, np.ndarray] = {}
    errors = [""] * len(paths)

    def finish(batch: Batch, encoded: dict[int, np.ndarray]) -> None:
        features.update(encoded)
        for index, error in zip(batch.indices, batch.errors):
            errors[index] = error or ""
        if progress is not None:
            progress(name, len(features) + sum(map(bool, errors)), len(paths))

    if progress is not None:
        progress(name, 0, len(paths))
    encode_batches(encoder, paths, _batches([range(len(paths))], 0, settings), 0, settings, finish)
    width = next((len(row) for row in features.values()), 0)
    stacked = np.stack([features.get(i, np.full(width, np.nan, np.float32)) for i in range(len(paths))]) \
        if paths else np.zeros((0, width), np.float32)
    return stacked, np.array([not error for error in errors], dtype=bool), errors


def encode_split(encoder: Encoder, name: str, paths: Sequence[Path], views: int, work: Path,
                 settings: ExtractSettings, progress: SplitProgress | None) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Encode one split in this process through saved chunks in ``work``: features (N × [V ×] D, not
    normalised), a readable mask, errors."""
    encode_chunks(encoder, name, paths, views, work, settings, progress)
    return _load_chunks(_chunk_files(work, name, len(paths), settings))


def _save_chunk(file: Path, indices: range, results: dict[int, tuple[np.ndarray | None, str]]) -> None:
    shape = next((f.shape for f, _ in results.values() if f is not None), None)
    features = np.stack([results[i][0] if results[i][0] is not None else np.full(shape, np.nan, np.float32)
                         for i in indices]) if shape is not None else np.zeros((len(indices), 0), np.float32)
    errors = np.array([results[i][1] for i in indices], dtype=str)
    with replacing(file) as temporary, open(temporary, "wb") as handle:
        np.savez(handle, features=features, errors=errors)


def _load_chunks(files: list[Path]) -> tuple[np.ndarray, np.ndarray, list[str]]:
    parts, errors = [], []
    for file in files:
        with np.load(file) as chunk:
            parts.append(chunk["features"])
            errors += chunk["errors"].tolist()
    width = max(p.shape[-1] for p in parts)
    shape = next(p.shape[1:] for p in parts if p.shape[-1] == width)
    features = np.concatenate([p if p.shape[-1] == width else np.full((len(p), *shape), np.nan, np.float32)
                               for p in parts])
    return features, np.array([e == "" for e in errors]), errors


def _encode_all(encoder: Encoder, chosen: Plan, work: Path, settings: ExtractSettings,
                progress: SplitProgress | None, ranks: Ranks, evaluation: bool = True) -> None:
    """Encode every split's chunks this process owns (the training images alone unless ``evaluation``)."""
    if chosen.train:
        encode_chunks(encoder, "train", chosen.train, settings.views, work, settings, progress, ranks)
    for split, entries in chosen.evaluation.items() if evaluation else ():
        if split == "test" and entries is chosen.evaluation.get("val"):
            continue  # ImageNet: one split serves both
        encode_chunks(encoder, split, [path for path, _ in entries], 0, work, settings, progress, ranks)


def _assemble(chosen: Plan, work: Path, settings: ExtractSettings, shared: FeatureSet | None = None
              ) -> tuple[np.ndarray | None, dict[str, LabelledFeatures]]:
    """Every split's features from the saved chunks; validation and test from ``shared`` when given
    (a feature set of the same evaluation request), with the images it skipped there."""
    train = _load_chunks(_chunk_files(work, "train", len(chosen.train), settings))[0] if chosen.train else None
    if shared is not None:
        chosen.skipped.extend(entry for entry in shared.skipped if entry["split"] in chosen.evaluation)
        return train, {split: shared.split(split) for split in chosen.evaluation}
    evaluated: dict[str, LabelledFeatures] = {}
    for split, entries in chosen.evaluation.items():
        if split == "test" and entries is chosen.evaluation.get("val"):
            evaluated[split] = evaluated["val"]
            continue
        paths = [path for path, _ in entries]
        features, ok, errors = _load_chunks(_chunk_files(work, split, len(paths), settings))
        chosen.skipped.extend({"split": split, "path": str(paths[i]), "error": errors[i]} for i in np.flatnonzero(~ok))
        labels = np.array([label for _, label in entries], dtype=np.int64)
        evaluated[split] = LabelledFeatures(_normalise(features[ok]), labels[ok], np.array(paths, dtype=str)[ok])
    return train, evaluated


def _normalise(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def software_versions() -> dict[str, str]:
    """The versions of what computes features (decoding, transforms, the model), for the provenance:
    two machines' features of one request differ in the last digits when these do."""
    from importlib.metadata import PackageNotFoundError, version

    import torch

    found = {"torch": torch.__version__, "cuda": torch.version.cuda or "none"}  # the build, e.g. 2.14.1+cu130
    for package in ("apecli", "torchvision", "open_clip_torch", "pillow", "torchcodec", "numpy"):
        try:
            found[package] = version(package)
        except PackageNotFoundError:
            continue
    return found


def find_extracted(store_dir: Path, dataset: str, request: str, key: str = "request_id") -> store.Artifact | None:
    """The features artifact an identical request already wrote, if any (``key``: which of its request
    hashes to compare, ``request_id`` or ``evaluation_request_id``: see :class:`FeaturesHeader`)."""
    for path, opened in store.scan(Path(store_dir) / dataset):
        if isinstance(opened, store.Artifact) and opened.kind == KIND and path.name.startswith("features-") \
                and getattr(FeaturesHeader.of(opened), key) == request:
            return opened
    return None


def extract(
    dataset: ImageDataset,
    spec: EncoderSpec,
    store_dir: Path,
    settings: ExtractSettings = ExtractSettings(),
    prompts: dict[str, list[str]] | None = None,
    progress: SplitProgress | None = None,
    say: Callable[[str], None] = lambda message: None,
    ranks: Ranks = Ranks(),
) -> FeatureSet | None:
    """Extract a dataset into the store (or return what an identical earlier run extracted).

    Under torchrun, pass this process's :class:`Ranks`: every process encodes its own chunks, and
    rank 0 assembles and returns the artifact (the others return None).
    """
    identity = spec.identity()
    request = request_id(dataset, identity, settings, dataset.templates, prompts)
    existing = find_extracted(store_dir, dataset.name, request)
    if existing is not None:
        say(f"already extracted: {existing.path}")
        return load_features(existing) if ranks.leader else None
    evaluation_request = evaluation_request_id(dataset, identity, settings, dataset.templates, prompts)
    shared = None if dataset.test_only else find_extracted(store_dir, dataset.name, evaluation_request,
                                                           "evaluation_request_id")
    shared_path = agree(ranks, None if shared is None else str(shared.path))  # every rank skips, or none
    shared = None if shared_path is None else store.open_artifact(shared_path, ["features"])
    work = Path(store_dir) / dataset.name / f".extract-{request}"
    chosen = plan(dataset, settings)
    encoder = load_encoder(spec)
    if shared is not None:  # its validation and test images were decoded by its decoder
        decoder = FeaturesHeader.of(shared).jpeg_decoder
    else:  # refused here, before any work, where the device path cannot serve this encoder
        decoder = device_decoder(encoder).name if settings.decode == "gpu" else None
    work.mkdir(parents=True, exist_ok=True)
    # two runs of one request would encode the same chunks, and the first to end would remove the folder
    with store.exclusive(work / f".lock-{ranks.rank}", f"another {Step('extract')} is running this request in "
                         f"{work}; when it ends, run this again to reuse its features"):
        say(f"extracting into {work} (an interrupted run resumes from there)")
        if shared is not None:
            say(f"validation and test features: those of {shared.path} (the same images, model and transform)")
        try:
            _encode_all(encoder, chosen, work, settings, progress, ranks, evaluation=shared is None)
        except ApecliError:
            shutil.rmtree(work, ignore_errors=True)  # bad input: leave nothing behind
            raise
        barrier(ranks)  # every chunk is saved
        if not ranks.leader:
            return None
        return _save_extracted(dataset, encoder, chosen, work, settings, (request, evaluation_request), decoder, prompts,
                               store_dir, None if shared is None else load_features(shared))


def _save_extracted(dataset: ImageDataset, encoder: Encoder, chosen: Plan, work: Path, settings: ExtractSettings,
                    requests: tuple[str, str], decoder: str | None, prompts: dict[str, list[str]] | None,
                    store_dir: Path, shared: FeatureSet | None = None) -> FeatureSet:
    """Rank 0: the saved chunks (and ``shared``'s validation and test features), the text classifier and
    the provenance as one features artifact."""
    train, evaluated = _assemble(chosen, work, settings, shared)
    caches = {}
    if train is not None:
        keys, views = _normalise(train.mean(axis=1)), _normalise(train).transpose(1, 0, 2)  # V × N × D
        train_paths = np.array([str(p) for p in chosen.train], dtype=str)
        caches = {k: FewShotCache(keys[index], chosen.train_labels[index], np.ascontiguousarray(views[:, index]),
                                  train_paths[index]) for k, index in ((k, np.array(i)) for k, i in chosen.first.items())}
    provenance = {
        "source": "extract", "request_id": requests[0], "evaluation_request_id": requests[1], "dataset": dataset.name,
        "root": str(dataset.root.resolve()),
        "split_file": str(dataset.split_file) if dataset.split_file else None,
        "split_file_sha256": dataset.split_file_sha256, "seed": settings.seed, "shots": sorted(caches),
        "views": settings.views, "decode": settings.decode, "jpeg_decoder": decoder,
        "exif_orientation": settings.exif_orientation, "templates": list(dataset.templates),
        "prompted_classes": len(prompts or {}),
        "skipped": chosen.skipped, "notes": list(dataset.notes), "software": software_versions(),
    }
    if shared is not None:  # which feature set, and what computed them: the software may have changed since
        provenance["evaluation_features_from"] = {"content_id": shared.artifact.content_id,
                                                  "software": dict(shared.software)}
    classifier, embeddings, embedding_labels = encoder.text_embeddings(dataset.class_names, dataset.templates, prompts)
    features = FeatureSet(dataset.class_names, classifier, caches, evaluated, dataset.name, encoder.describe(), provenance,
                          prompts=embeddings, prompt_labels=embedding_labels)
    saved = save_features(features, store.in_store(store_dir, dataset.name, "features"))
    shutil.rmtree(work, ignore_errors=True)
    return saved
