"""Synthetic data made offline, for the demo, the tests and the benchmarks.

Features (:func:`synthetic_features`), shaped like real CLIP caches: classes differ on a subset of "informative" channels; the other channels carry a large offset shared
by every class plus noise, the kind of channel APE's prior refinement is meant to drop. Text vectors
are noisy copies of the class centres, so zero-shot accuracy is well below what the cache adds.
Cache keys are the L2-normalised mean of ``views`` augmented views of each training image, as the
APE protocol builds them; the views are kept, L2-normalised.

Images (:func:`make_image`, :func:`coop_caltech`, :func:`image_folder`): JPEGs whose colour and
stripes depend on their class, in a CoOp layout or a folder per class, with a tiny open_clip model
config (:func:`tiny_model_config`) to encode them in seconds.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from apecli.kinds.features import FeatureSet, FewShotCache, LabelledFeatures


def _normalise(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def synthetic_features(
    num_classes: int = 10,
    dim: int = 64,
    shots: tuple[int, ...] = (1, 2, 4, 8, 16),
    val_per_class: int = 20,
    test_per_class: int = 30,
    views: int = 10,
    informative: float = 0.5,
    image_noise: float = 0.9,
    text_noise: float = 0.9,
    view_noise: float = 0.3,
    seed: int = 0,
    dataset: str = "synthetic",
) -> FeatureSet:
    """A seeded feature set (float32) with ``num_classes`` classes and ``dim`` channels."""
    rng = np.random.default_rng(seed)
    signal = max(1, int(round(informative * dim)))
    centres = np.zeros((num_classes, dim))
    centres[:, :signal] = rng.normal(size=(num_classes, signal))
    offset = np.zeros(dim)
    offset[signal:] = 1.5 * rng.normal(size=dim - signal)

    def images(labels: np.ndarray) -> np.ndarray:
        return centres[labels] + offset + image_noise * rng.normal(size=(labels.shape[0], dim))

    text = _normalise(centres + offset + text_noise * rng.normal(size=(num_classes, dim)))
    caches = {}
    for count in sorted(shots):
        labels = np.repeat(np.arange(num_classes), count)
        base = images(labels)
        augmented = base[None] + view_noise * rng.normal(size=(views, base.shape[0], dim))
        caches[count] = FewShotCache(
            _normalise(augmented.mean(axis=0)).astype(np.float32),
            labels,
            _normalise(augmented).astype(np.float32),
        )
    splits = {}
    for split, per_class in (("val", val_per_class), ("test", test_per_class)):
        labels = np.repeat(np.arange(num_classes), per_class)
        splits[split] = LabelledFeatures(_normalise(images(labels)).astype(np.float32), labels)
    return FeatureSet(
        class_names=tuple(f"class_{i}" for i in range(num_classes)),
        classifier=text.astype(np.float32),
        caches=caches,
        splits=splits,
        dataset=dataset,
        model={"name": "synthetic"},
        provenance={"source": "synthetic", "seed": seed},
    ).validate()


TINY_MODEL = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8, "head_width": 32},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}
COLOURS = [(220, 40, 40), (40, 180, 60), (50, 80, 220), (230, 200, 40), (150, 60, 180)]


def tiny_model_config(folder: Path) -> Path:
    """An open_clip model config (embed 64, 2 layers, 32 px): created in a tenth of a second."""
    path = Path(folder) / "apecli-tiny.json"
    path.write_text(json.dumps(TINY_MODEL))
    return path


def make_image(path: Path, label: int, index: int, size: int = 48) -> Path:
    """A JPEG whose colour and stripes depend on its class, with seeded noise."""
    from PIL import Image

    rng = np.random.default_rng(label * 1000 + index)
    pixels = np.zeros((size, size + 8 * (index % 3), 3), dtype=np.float64)
    pixels[...] = COLOURS[label % len(COLOURS)]
    pixels[:, :: 3 + label] *= 0.5
    pixels += rng.normal(scale=25, size=pixels.shape)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(path, quality=90)
    return path


DEMO_NAME = "demo-stripes"  # the demo's generated set: a name no benchmark has


def demo_images(root: Path, classes: int = 8, per_split: tuple[int, int, int] = (16, 24, 24), seed: int = 0) -> Path:
    """The demo's generated set: ``DIR/{train,val,test}/<class>/*.jpg``, a class a hue and a stripe width,
    with hues near each other, colour jitter and pixel noise enough to confuse neighbouring classes (a few-
    shot problem where the cache helps and does not solve it)."""
    from PIL import Image

    folder = Path(root) / DEMO_NAME
    rng = np.random.default_rng(seed)
    for part, count in zip(("train", "val", "test"), per_split):
        for label in range(classes):
            hue = label / classes
            for index in range(count):
                colour = 127 + 90 * np.cos(2 * np.pi * (hue + np.array([0.0, 1 / 3, 2 / 3])))
                colour = colour + rng.normal(scale=55, size=3)  # a neighbour's colour, often
                size, width = 48, 3 + label % 4
                pixels = np.broadcast_to(colour, (size, size, 3)).copy()
                phase = rng.integers(width)
                pixels[:, (np.arange(size) + phase) % (2 * width) < width] *= 0.6
                pixels += rng.normal(scale=45, size=pixels.shape)
                path = folder / part / f"shade_{label}" / f"{index:03d}.jpg"
                path.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(path, quality=90)
    return folder


def coop_caltech(root: Path, classes: int = 3, per_split: tuple[int, int, int] = (6, 3, 3)) -> Path:
    """A caltech101-style dataset: caltech-101/101_ObjectCategories/<class>/*.jpg + split_zhou json."""
    folder = Path(root) / "caltech-101"
    split: dict[str, list] = {"train": [], "val": [], "test": []}
    for label in range(classes):
        name = f"thing_{label}"
        number = 0
        for part, count in zip(split, per_split):
            for _ in range(count):
                relative = f"{name}/image_{number:04d}.jpg"
                make_image(folder / "101_ObjectCategories" / relative, label, number)
                split[part].append([relative, label, name])
                number += 1
    (folder / "split_zhou_Caltech101.json").write_text(json.dumps(split))
    return folder


def image_folder(root: Path, classes: int = 3, per_class: int = 10) -> Path:
    """A folder per class, no splits."""
    for label in range(classes):
        for index in range(per_class):
            make_image(Path(root) / f"class_{label}" / f"{index}.jpg", label, index)
    return Path(root)
