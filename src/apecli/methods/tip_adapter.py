"""Tip-Adapter (Zhang et al., ECCV 2022): CLIP's zero-shot logits plus a cache of the few-shot keys,
``100 · f Wᵀ + α · exp(−β(1 − f Fᵀ)) · L``, with β × α searched on validation."""

from __future__ import annotations

import numpy as np

from apecli.methods.base import Method, Options, Task
from apecli.methods.cache_model import CacheModel
from apecli.methods.grid import SearchGrid, dataset_grid


class TipAdapter(Method):
    name = "tip-adapter"
    label = "Tip-Adapter"
    given = ("alpha", "beta")
    float64 = True
    task_state = ("text", "keys", "key_labels")

    def __init__(self, grid: SearchGrid | None = None, progress=None) -> None:
        self.grid, self.progress = grid, progress

    @classmethod
    def create(cls, options: Options) -> "TipAdapter":
        return cls(options.grid, options.progress)

    @classmethod
    def settings_tried(cls, grid: SearchGrid) -> int:
        return grid.beta_alpha_size

    def fit(self, task: Task) -> dict[str, float]:
        import torch

        on = torch.device(task.device)
        self.model = plain_cache(task.text, task.keys, task.key_labels)
        result = self.model.search(task.val_features, task.val_labels, self.grid or dataset_grid(task.dataset),
                                   self.progress, device=on)
        self.alpha, self.beta = result.alpha, result.beta
        self.val_accuracy, self.search, self.details = result.accuracy, result, {"device": on.type}
        return {"alpha": result.alpha, "beta": result.beta}

    def logits(self, features: np.ndarray) -> np.ndarray:
        return self.model.logits(features, self.alpha, self.beta)

    @classmethod
    def restore(cls, hyperparameters: dict[str, float], state: dict[str, np.ndarray]) -> "TipAdapter":
        method = cls()
        method.model = plain_cache(state["text"], state["keys"], state["key_labels"])
        method.alpha, method.beta = hyperparameters["alpha"], hyperparameters["beta"]
        return method


def plain_cache(text: np.ndarray, keys: np.ndarray, key_labels: np.ndarray) -> CacheModel:
    """The cache as it is: every key of weight 1."""
    return CacheModel(text, keys, key_labels, np.ones(key_labels.shape[0]))
