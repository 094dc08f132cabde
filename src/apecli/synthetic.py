"""Structured synthetic features: a feature set with the shape of real CLIP caches, made offline.

Classes differ on a subset of "informative" channels; the other channels carry a large offset shared
by every class plus noise, the kind of channel APE's prior refinement is meant to drop. Text vectors
are noisy copies of the class centres, so zero-shot accuracy is well below what the cache adds.
Cache keys are the L2-normalised mean of ``views`` augmented views of each training image, as the
APE protocol builds them; the views are kept, L2-normalised.
"""

from __future__ import annotations

import numpy as np

from apecli.features import FeatureSet, FewShotCache, LabelledFeatures


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
