"""APE's tri-edge classifier and its search (APE, section 3.3).

With ′ meaning "restricted to the refined channels, then L2-normalised again":

    R_fW   = 100 · f Wᵀ                                   zero-shot logits, full width
    R_fF′  = f′ F′ᵀ                                        affinity of an image to each cache key
    d_j    = log2((1 + 1e-6) / (softmax(F′ W′ᵀ)_{j, y_j} + 1e-6))   divergence of key j from its label
    logits = R_fW + α · exp(−β (1 − R_fF′)) · (L ⊙ exp(γ d))   L = one-hot labels of the keys

α, β, γ come from a grid searched on the validation split (:mod:`apecli.methods.grid`), γ being the
grid's value-weight axis: each γ weighs the keys by exp(γ d).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from apecli.devices import as_device
from apecli.methods.grid import Progress, SearchGrid, SearchResult, count_grid, product_keys
from apecli.methods.scores import by_blocks, cache_logits, product_tensor, products, renormalised, zero_shot_logits

if TYPE_CHECKING:
    import torch

DIVERGENCE_EPSILON = 1e-6


@dataclass(frozen=True)
class TriEdge:
    """The cache side of the tri-edge classifier, computed once for a cache and a set of channels.

    Keys are kept sorted by label, so that they form C blocks of K keys.
    """

    classifier: np.ndarray  # C × D, full width
    channels: np.ndarray
    refined_keys: np.ndarray  # (C·K) × k, sorted by label
    key_labels: np.ndarray  # (C·K,), sorted
    divergence: np.ndarray  # (C·K,)

    @classmethod
    def build(cls, classifier: np.ndarray, keys: np.ndarray, key_labels: np.ndarray, channels: np.ndarray) -> "TriEdge":
        order = np.argsort(key_labels, kind="stable")
        labels = np.asarray(key_labels)[order]
        refined_keys = renormalised(np.asarray(keys)[order], channels)
        refined_text = renormalised(classifier, channels)
        key_logits = refined_keys @ refined_text.T
        key_logits -= key_logits.max(axis=1, keepdims=True)
        probabilities = np.exp(key_logits)
        probabilities /= probabilities.sum(axis=1, keepdims=True)
        own = probabilities[np.arange(labels.shape[0]), labels]
        divergence = np.log2((1.0 + DIVERGENCE_EPSILON) / (own + DIVERGENCE_EPSILON))
        return cls(np.asarray(classifier, dtype=np.float64), np.asarray(channels), refined_keys, labels, divergence)

    @property
    def num_classes(self) -> int:
        return int(self.classifier.shape[0])

    @property
    def shots(self) -> int:
        return int(self.key_labels.shape[0] // self.num_classes)

    def zero_shot_logits(self, x: np.ndarray) -> np.ndarray:
        return zero_shot_logits(x, self.classifier, "cpu")

    def affinity(self, x: np.ndarray) -> np.ndarray:
        return products(renormalised(x, self.channels), self.refined_keys)

    def logits(self, x: np.ndarray, alpha: float, beta: float, gamma: float) -> np.ndarray:
        """APE's logits for one setting."""
        weights = np.exp(self.divergence * gamma)
        return by_blocks(x, self.key_labels.shape[0], lambda rows: self.zero_shot_logits(rows) + alpha * cache_logits(
            self.affinity(rows), self.key_labels, weights, self.num_classes, beta))


def search(
    tri: TriEdge,
    x: np.ndarray,
    labels: np.ndarray,
    grid: SearchGrid,
    progress: Progress | None = None,
    chunk_bytes: int | None = None,
    device: "torch.device | str | None" = None,
) -> SearchResult:
    """Correct predictions of every (β, α, γ) of the grid on ``x``, computed as the module docstring says,
    on ``device`` (the CPU by default; a CUDA GPU computes the same float64 arithmetic)."""
    device = as_device(device, float64=True)
    value_weights = np.exp(tri.divergence.reshape(tri.num_classes, tri.shots, 1) * grid.gammas)  # C × K × G
    keys = product_keys(tri.refined_keys, device)

    def affinity(rows: slice):  # tri.affinity, computed where the search runs
        return product_tensor(renormalised(x[rows], tri.channels), keys, device).view(-1, tri.num_classes, tri.shots)

    correct = count_grid(zero_shot_logits(x, tri.classifier, device), affinity, value_weights, labels, grid.betas,
                         grid.alphas, progress, chunk_bytes, device)
    return SearchResult(correct, x.shape[0], grid)


def search_loop(tri: TriEdge, x: np.ndarray, labels: np.ndarray, grid: SearchGrid) -> SearchResult:
    """The same search the authors' way: full logits for every setting, one by one (the reference)."""
    import torch

    target = torch.from_numpy(np.asarray(labels, dtype=np.int64))
    zero_shot = torch.from_numpy(tri.zero_shot_logits(x))
    affinity = torch.from_numpy(tri.affinity(x))
    one_hot = torch.eye(tri.num_classes, dtype=torch.float64)[torch.from_numpy(tri.key_labels)]
    divergence = torch.from_numpy(tri.divergence)[:, None]
    correct = np.zeros(grid.shape, dtype=np.int64)
    for b, beta in enumerate(grid.betas):
        for a, alpha in enumerate(grid.alphas):
            for g, gamma in enumerate(grid.gammas):
                values = one_hot * torch.exp(divergence * gamma)
                cache_logits = torch.exp(-(beta - beta * affinity)) @ values
                logits = zero_shot + cache_logits * alpha
                correct[b, a, g] = int((logits.argmax(dim=1) == target).sum())
    return SearchResult(correct, x.shape[0], grid)
