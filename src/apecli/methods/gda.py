"""GDA (Wang et al., ICLR 2024, "A Hard-to-Beat Baseline for Training-free CLIP-based Adaptation"):
Gaussian discriminant analysis on the cache's augmented views, class means and one shared covariance,
gives a linear head that is added to CLIP's zero-shot logits with a weight α chosen from a small grid:
``100 · f Wᵀ + α (f Aᵀ + b)``."""

from __future__ import annotations

import numpy as np

from apecli.errors import ApecliError
from apecli.methods.base import Method, Options, Task
from apecli.methods.grid import SearchGrid
from apecli.methods.scores import percent, zero_shot_logits
from apecli.methods.trainer import no_views_note, training_samples

GDA_ALPHAS = tuple(10.0**i for i in range(-4, 5))


def gda_head(samples: np.ndarray, labels: np.ndarray, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """GDA's linear head (C × D weights, C biases) from samples (N × D) with a shared covariance."""
    x = np.asarray(samples, dtype=np.float64)
    means = np.stack([x[labels == c].mean(axis=0) for c in range(num_classes)])
    centred = x - means[labels]
    count, dim = centred.shape
    covariance = centred.T @ centred / (count - 1)
    return linear_head(means, dim * np.linalg.pinv((count - 1) * covariance + np.trace(covariance) * np.eye(dim)))


def linear_head(means: np.ndarray, precision: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The linear head of class means (C × D) and a shared precision matrix: weights μ P, biases
    log(1/C) − ½ μ P μᵀ (equal priors)."""
    weights = means @ precision
    return weights, np.log(1.0 / len(means)) - 0.5 * np.einsum("cd,cd->c", weights, means)


class ScatterSums:
    """What GDA's head needs of its samples, as sums that further samples add to without a pass over those
    already counted: each class's count and sum, and the sum of every sample's outer product. The head
    equals :func:`gda_head`'s of the same samples, up to rounding: the within-class scatter is
    ``Σ x xᵀ − Σ_c n_c μ_c μ_cᵀ``."""

    def __init__(self, counts: np.ndarray, sums: np.ndarray, outer: np.ndarray) -> None:
        self.counts, self.sums, self.outer = counts, sums, outer

    @classmethod
    def of(cls, samples: np.ndarray, labels: np.ndarray, num_classes: int) -> "ScatterSums":
        x = np.asarray(samples, dtype=np.float64)
        sums = np.zeros((num_classes, x.shape[1]))
        np.add.at(sums, labels, x)
        return cls(np.bincount(labels, minlength=num_classes).astype(np.float64), sums, x.T @ x)

    def plus(self, samples: np.ndarray, labels: np.ndarray) -> "ScatterSums":
        """These sums with ``samples`` (labelled ``labels``) added."""
        more = ScatterSums.of(samples, labels, self.sums.shape[0])
        return ScatterSums(self.counts + more.counts, self.sums + more.sums, self.outer + more.outer)

    def head(self) -> tuple[np.ndarray, np.ndarray]:
        """GDA's linear head (C × D weights, C biases), as :func:`gda_head` computes it."""
        means = self.sums / self.counts[:, None]
        count, dim = self.counts.sum(), self.sums.shape[1]
        scatter = self.outer - (means * self.counts[:, None]).T @ means  # (count − 1) · covariance
        scatter = (scatter + scatter.T) / 2
        return linear_head(means, dim * np.linalg.pinv(scatter + np.trace(scatter) / (count - 1) * np.eye(dim),
                                                       hermitian=True))


def head_of(views: np.ndarray | None, keys: np.ndarray, key_labels: np.ndarray,
            num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """GDA's head from a cache's stored views (V × N × D; its keys as one view without them)."""
    samples = np.asarray(views if views is not None else keys[None], dtype=np.float32)
    return gda_head(samples.reshape(-1, samples.shape[-1]), np.tile(key_labels, samples.shape[0]), num_classes)


class GDA(Method):
    name = "gda"
    label = "GDA"
    given = ("alpha",)
    task_state = ("text", "keys", "key_labels", "views")  # the views only for evaluations that stored no head

    def __init__(self, grid: SearchGrid | None = None) -> None:
        self.grid = grid

    @classmethod
    def create(cls, options: Options) -> "GDA":
        return cls(options.grid)

    @classmethod
    def settings_tried(cls, grid: SearchGrid) -> int:
        return grid.shape[1] if "alpha" in grid.given else len(GDA_ALPHAS)

    def fit(self, task: Task) -> dict[str, float]:
        """The head from all stored views (or the keys); α from the grid, or the α the grid fixes."""
        samples, on_views = training_samples(task)
        self.text = task.text
        self.weights, self.bias = head_of(samples, task.keys, task.key_labels, task.num_classes)
        given = {"alpha": self.grid.given["alpha"]} if self.grid is not None and "alpha" in self.grid.given else {}
        alphas = np.array((given["alpha"],) if given else GDA_ALPHAS)
        x = task.val_features.astype(np.float64)
        zero_shot, head = zero_shot_logits(x, self.text), x @ self.weights.T + self.bias
        val_correct = np.array([int((np.argmax(zero_shot + alpha * head, axis=1) == task.val_labels).sum())
                                for alpha in alphas])  # one α at a time: at ImageNet's shape, all at once took 3.6 GB
        best = int(np.argmax(val_correct))  # first of the best
        self.alpha = float(alphas[best])
        self.val_accuracy = percent(int(val_correct[best]), task.val_labels.shape[0])
        self.details = {"trained_on_views": on_views, **({"given": given} if given else {})}
        notes = [] if on_views else [no_views_note(self.label, task.shots)]
        if not np.any(self.weights):
            notes.append("one sample a class leaves GDA no spread to estimate its covariance from: its head is zero, "
                         "so it classifies as zero-shot CLIP whatever its α")
        self.notes = tuple(notes)
        return {"alpha": self.alpha}

    def logits(self, features: np.ndarray) -> np.ndarray:
        x = np.asarray(features, dtype=np.float64)
        return zero_shot_logits(x, self.text) + self.alpha * (x @ self.weights.T + self.bias)

    def state(self) -> dict[str, np.ndarray]:
        return {"weights": self.weights, "bias": self.bias}

    @classmethod
    def restore(cls, hyperparameters: dict[str, float], state: dict[str, np.ndarray]) -> "GDA":
        method = cls()
        method.text, method.alpha = state["text"], hyperparameters["alpha"]
        if "weights" in state:
            method.weights, method.bias = state["weights"], state["bias"]
        else:  # an evaluation that stored no head: computed again from the cache, as it was then
            method.weights, method.bias = head_of(state["views"], state["keys"], state["key_labels"], len(method.text))
        if method.weights.shape != method.text.shape or method.bias.shape != (len(method.text),):
            raise ApecliError(f"a GDA head of shape {method.weights.shape} and {method.bias.shape}, for "
                              f"{method.text.shape[0]} classes of {method.text.shape[1]} channels")
        return method
