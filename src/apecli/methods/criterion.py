"""APE's prior refinement: the criterion that chooses the feature channels that separate classes (APE,
section 3.2).

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

import numpy as np

from apecli.checks import check_k, check_value
from apecli.errors import ApecliError, SettingError


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
        raise SettingError("weights", weights, f"the criterion takes two weights, w0 and w1, got {len(weights)}")
    for name, weight in zip(("w0", "w1"), weights):
        check_value(f"the criterion weight {name}", weight)
    if not any(weights):  # a zero criterion would keep the first k channels, whatever they hold
        raise SettingError("weights", weights, "the criterion weights w0 and w1 must not both be zero")
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
    check_k(k, criterion.shape[0])
    return np.argsort(-criterion, kind="stable")[:k].astype(np.int64)
