"""The classifier of the Tip-Adapter family, and its β × α search: zero-shot logits plus a cache of
keys whose kernel values vote for their labels.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from apecli.devices import as_device
from apecli.methods.grid import Progress, SearchGrid, SearchResult, count_grid, product_keys
from apecli.methods.scores import by_blocks, cache_logits, product_tensor, products, zero_shot_logits

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class CacheModel:
    """The classifier of the Tip-Adapter family without γ: ``100 · f textᵀ + α · exp(−β(1 − f keysᵀ)) · (L ⊙ v)``.

    Tip-Adapter uses CLIP's text classifier and cache keys with v = 1; Tip-Adapter-F trained keys;
    APE-T the text and keys with its residual added, and its learned v.
    """

    text: np.ndarray  # C × D
    keys: np.ndarray  # M × D
    key_labels: np.ndarray  # (M,)
    value_weights: np.ndarray  # (M,)

    def logits(self, x: np.ndarray, alpha: float, beta: float) -> np.ndarray:
        text, keys = np.asarray(self.text, dtype=np.float64), np.asarray(self.keys, dtype=np.float64)

        def compute(rows: np.ndarray) -> np.ndarray:
            return zero_shot_logits(rows, text, "cpu") + alpha * cache_logits(products(rows, keys), self.key_labels,
                                                                       self.value_weights, text.shape[0], beta)

        return by_blocks(x, keys.shape[0], compute)

    def search(self, x: np.ndarray, labels: np.ndarray, grid: SearchGrid, progress: Progress | None = None,
               device: "torch.device | str | None" = None) -> SearchResult:
        """Correct predictions for every β and α of ``grid`` (its γ is ignored), as SearchResult[β, α, 0],
        on ``device`` (the CPU by default)."""
        device = as_device(device, float64=True)
        grid = SearchGrid((grid.scale[0], grid.scale[1], 0.0), (grid.steps[0], grid.steps[1], 1), (*grid.fixed[:2], None))
        num_classes = self.text.shape[0]
        order = np.argsort(self.key_labels, kind="stable")
        shots = order.shape[0] // num_classes
        x = np.asarray(x, dtype=np.float64)
        keys = np.asarray(self.keys, dtype=np.float64)[order]
        weights = np.asarray(self.value_weights, dtype=np.float64)[order].reshape(num_classes, shots, 1)
        zero_shot = zero_shot_logits(x, self.text, device)
        on_device = product_keys(keys, device)

        def affinity(rows: slice):
            return product_tensor(x[rows], on_device, device).view(-1, num_classes, shots)

        correct = count_grid(zero_shot, affinity, weights, labels, grid.betas, grid.alphas, progress, device=device)
        return SearchResult(correct, x.shape[0], grid)
