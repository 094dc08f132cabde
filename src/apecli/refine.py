"""Prior refinement: choose the feature channels that separate classes (APE, section 3.2).

Each class c has a pool of vectors: its text vector W[:, c] and its cache keys. For channel d,

    S_d = mean over pairs (f, g) of vectors from *different* classes of f_d · g_d
        = (T_d² − Σ_c s_{c,d}²) / P,   T = sum of all pool vectors, s_c = sum of class c's pool,
                                        P = (Σ_c n_c)² − Σ_c n_c² pairs (n_c = pool size)
    V_d = unbiased variance of W[d, :] over the classes
    criterion_d = −w0 · S_d + w1 · V_d

and the k channels of largest criterion are kept. Pools are grouped by label, so the class blocks of a
cache may come in any order. Everything is float64: neighbouring criterion values on real CLIP features
differ by as little as 1e-7, which float32 summation can reorder.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from apecli import store
from apecli.errors import ApecliError, check_value
from apecli.features import FeatureSet, load_features
from apecli.presets import preset_for

KIND = "refinement"


@dataclass(frozen=True)
class Refinement:
    """The channels chosen for one feature set and shot count, with the criterion that chose them."""

    channels: np.ndarray  # (k,) indices in criterion order, best first
    criterion: np.ndarray  # (D,) float64
    shots: int
    weights: tuple[float, float]
    artifact: store.Artifact | None = None

    @property
    def k(self) -> int:
        return int(self.channels.shape[0])

    @property
    def sorted_channels(self) -> list[int]:
        return sorted(int(c) for c in self.channels)


def channel_criterion(
    classifier: np.ndarray,
    keys: np.ndarray | None,
    key_labels: np.ndarray | None,
    weights: tuple[float, float],
) -> np.ndarray:
    """APE's criterion per channel: ``−w0 · S + w1 · V`` (see the module docstring).

    ``classifier`` is C × D (one text row per class); ``keys`` (M × D) with ``key_labels`` (M,) join
    each class's pool; with ``keys=None`` the pools hold the text vectors alone.
    """
    if len(weights) != 2:
        raise ApecliError(f"the criterion takes two weights, w0 and w1, got {len(weights)}")
    for name, weight in zip(("w0", "w1"), weights):
        check_value(f"the criterion weight {name}", weight)
    if not any(weights):  # a zero criterion would keep the first k channels, whatever they hold
        raise ApecliError("the criterion weights w0 and w1 must not both be zero")
    text = np.asarray(classifier, dtype=np.float64)
    num_classes = text.shape[0]
    if num_classes < 2:
        raise ApecliError("prior refinement needs at least two classes")
    sums = text.copy()
    sizes = np.ones(num_classes, dtype=np.float64)
    if keys is not None:
        labels = np.asarray(key_labels)
        order = np.argsort(labels, kind="stable")
        counts = np.bincount(labels, minlength=num_classes)
        present = np.flatnonzero(counts)
        starts = np.concatenate([[0], np.cumsum(counts)[:-1]])[present]
        sums[present] += np.add.reduceat(np.asarray(keys, dtype=np.float64)[order], starts, axis=0)
        sizes += counts
    total = sums.sum(axis=0)
    pairs = sizes.sum() ** 2 - (sizes**2).sum()
    similarity = (total**2 - (sums**2).sum(axis=0)) / pairs
    variance = text.var(axis=0, ddof=1)
    return -weights[0] * similarity + weights[1] * variance


def top_channels(criterion: np.ndarray, k: int) -> np.ndarray:
    """The ``k`` channels of largest criterion, best first (equal values: lower index first)."""
    dim = criterion.shape[0]
    if not 1 <= k <= dim:
        raise ApecliError(f"k must be between 1 and the feature width {dim}, got {k}")
    return np.argsort(-criterion, kind="stable")[:k].astype(np.int64)


def select_channels(
    features: FeatureSet,
    k: int | None = None,
    weights: tuple[float, float] | None = None,
    shots: int | None = None,
) -> Refinement:
    """Refine a feature set: APE's criterion on its text classifier and ``shots``-shot cache.

    Defaults come from the dataset's preset (k scaled to the feature width).
    """
    preset = preset_for(features.dataset)
    if k is None:
        k = preset.scaled_k(preset.k_training_free, features.dim)
    weights = tuple(weights) if weights is not None else preset.w_training_free
    shots, cache = features.cache(shots)
    criterion = channel_criterion(features.classifier, cache.keys, cache.labels, weights)
    return Refinement(top_channels(criterion, k), criterion, shots, weights)


def save_refinement(
    refinement: Refinement, features: FeatureSet, destination: Path | Callable[[str], Path]
) -> Refinement:
    """Write a refinement artifact whose parent is the feature set."""
    if features.artifact is None:
        raise ApecliError("save the feature set before its refinement")
    metadata = {
        "dataset": features.dataset,
        "k": refinement.k,
        "shots": refinement.shots,
        "weights": list(refinement.weights),
    }
    arrays = {"channels": refinement.channels, "criterion": refinement.criterion}
    artifact = store.write_artifact(destination, KIND, arrays, metadata, parents=[features.artifact])
    return Refinement(refinement.channels, refinement.criterion, refinement.shots, refinement.weights, artifact)


def read_channels(artifact: store.Artifact, dim: int) -> np.ndarray:
    """An artifact's ``channels``, checked to be indices of ``dim``-channel features (one or more)."""
    channels = artifact.read("channels")
    if (channels.ndim != 1 or channels.size == 0 or not np.issubdtype(channels.dtype, np.integer)
            or channels.min() < 0 or channels.max() >= dim):
        raise ApecliError(f"{artifact.path}: its channels ({channels.dtype}, shape {channels.shape}) are not indices "
                          f"of {dim}-channel features")
    return channels.astype(np.int64)


def load_refinement(source: str | Path | store.Artifact) -> tuple[Refinement, FeatureSet]:
    """Read a refinement artifact and the feature set it was computed from (checked unchanged)."""
    artifact = source if isinstance(source, store.Artifact) else store.open_artifact(source, [KIND])
    features = load_features(artifact.parent("features"))
    metadata = artifact.metadata
    channels = read_channels(artifact, features.dim)
    refinement = Refinement(
        channels, artifact.read("criterion"), int(metadata["shots"]), tuple(metadata["weights"]), artifact
    )
    return refinement, features
