"""The nearest class mean: each image goes to the class whose mean cache key it is closest to (by cosine),
``argmax 100 · f Mᵀ`` with M the L2-normalised class means of the keys. No text, nothing chosen on
validation: the plainest use of the few-shot images, and a reference every method should beat."""

from __future__ import annotations

import numpy as np

from apecli.errors import ApecliError
from apecli.methods.base import Method, Task
from apecli.methods.scores import CLIP_SCALE


def class_means(keys: np.ndarray, labels: np.ndarray, num_classes: int) -> np.ndarray:
    """The L2-normalised mean of each class's keys (C × D, float64)."""
    means = np.zeros((num_classes, keys.shape[1]))
    np.add.at(means, labels, np.asarray(keys, dtype=np.float64))
    return means / np.linalg.norm(means, axis=1, keepdims=True)


class ClassMean(Method):
    name = "class-mean"
    label = "class means"
    task_state = ("keys", "key_labels", "text")

    def fit(self, task: Task) -> dict[str, float]:
        self.means = class_means(task.keys, task.key_labels, task.num_classes)
        return {}

    def logits(self, features: np.ndarray) -> np.ndarray:
        return CLIP_SCALE * np.asarray(features, dtype=np.float64) @ self.means.T

    @classmethod
    def restore(cls, hyperparameters: dict[str, float], state: dict[str, np.ndarray]) -> "ClassMean":
        method = cls()
        labels, text = np.asarray(state["key_labels"]), state["text"]
        if labels.size == 0 or labels.max() >= len(text):
            raise ApecliError("a class-mean evaluation whose cache has no keys for its classes")
        method.means = class_means(state["keys"], labels, len(text))
        return method
