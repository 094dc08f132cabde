"""Zero-shot CLIP: each image goes to the class whose text it is closest to, ``argmax 100 · f Wᵀ``
(Radford et al., ICML 2021). Nothing is learned and nothing is chosen on validation."""

from __future__ import annotations

import numpy as np

from apecli.methods.base import Method, Task
from apecli.methods.scores import zero_shot_logits


class ZeroShot(Method):
    name = "zero-shot"
    label = "zero-shot CLIP"
    task_state = ("text",)
    uses_cache = False

    def fit(self, task: Task) -> dict[str, float]:
        self.text = task.text
        return {}

    def logits(self, features: np.ndarray) -> np.ndarray:
        return zero_shot_logits(features, self.text)

    @classmethod
    def restore(cls, hyperparameters: dict[str, float], state: dict[str, np.ndarray]) -> "ZeroShot":
        method = cls()
        method.text = state["text"]
        return method
