"""TIMO and TIMO-S (Li et al., AAAI 2025, "Text and Image Are Mutually Beneficial: Enhancing
Training-Free Few-Shot Classification with CLIP"; the authors' code: github lyymuwu/TIMO).

- **Image-guided text.** Each class's prompts are weighed by how well they match the class's images: with
  p_c the L2-normalised mean of the class's cache keys and s_cp = p_c · t_cp the match of each prompt,
  the weights are ``softmax_p(γ · s_c / ‖s_c‖)``, and the class's text is the normalised weighted sum of
  its prompts. TIMO fixes γ (1 for ImageNet, 100 for Oxford Flowers, 50 elsewhere, as the authors set
  it); TIMO-S chooses it among 5, 10, … 100 by the validation accuracy of the text alone.
- **Text-guided images.** The first n of each class's prompts, best matched first (the list taken twice,
  so n runs to 2P), each scaled by its match s_cp, join the class's samples (the augmented views, or the
  keys) before GDA's shared-covariance head is estimated. TIMO takes n = P; TIMO-S chooses n among ten
  values from 1 to 2P.
- **The blend.** ``α · f·T_cᵀ + (f W_cᵀ + b_c)``, with T the image-guided text and (W, b) the head; α is
  chosen among 10⁻⁴ … 10⁴ on validation, for each n (the first of equal accuracies wins, n before α).

With one prompt a class and no text samples this is GDA written the other way round: its logits are
those of ``--mode gda`` at α_gda = 100 / α divided by α_gda. A feature set that kept no prompt embeddings
gives one prompt a class, the text classifier itself.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from apecli.errors import ApecliError
from apecli.methods.base import Method, Options, Task
from apecli.methods.gda import GDA_ALPHAS, ScatterSums
from apecli.methods.scores import percent
from apecli.methods.trainer import no_views_note, training_samples

TIMO_GAMMAS = tuple(range(5, 101, 5))  # TIMO-S's search of the prompt weights' temperature
TEXT_SAMPLE_STEPS = 10  # TIMO-S tries this many counts of text samples, from 1 to 2P
DATASET_GAMMA = {"imagenet": 1.0, "oxford_flowers": 100.0}
DEFAULT_GAMMA = 50.0


def unit(rows: np.ndarray) -> np.ndarray:
    return rows / np.linalg.norm(rows, axis=-1, keepdims=True)


def prompt_grid(prompts: np.ndarray, labels: np.ndarray, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Prompt embeddings by class, C × P × D (P the most any class has; the rest zeros), and which are
    real (C × P)."""
    counts = np.bincount(labels, minlength=num_classes)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    position = np.arange(labels.shape[0]) - starts[labels]
    table = np.zeros((num_classes, int(counts.max()), prompts.shape[1]))
    mask = np.zeros(table.shape[:2], dtype=bool)
    table[labels, position], mask[labels, position] = prompts, True
    return table, mask


class PromptMatch:
    """How well each prompt of each class matches the class's images (their mean key)."""

    def __init__(self, task: Task) -> None:
        self.table, self.mask = prompt_grid(np.asarray(task.prompts, dtype=np.float64), task.prompt_labels,
                                            task.num_classes)
        means = np.zeros((task.num_classes, task.dim))
        np.add.at(means, task.key_labels, np.asarray(task.keys, dtype=np.float64))
        self.scores = np.where(self.mask, np.einsum("cpd,cd->cp", self.table, unit(means)), 0.0)  # C × P

    @property
    def prompts(self) -> int:
        """P: the most prompts a class has."""
        return self.table.shape[1]

    def text(self, gamma: float) -> np.ndarray:
        """The image-guided text (C × D) at temperature γ."""
        norms = np.linalg.norm(self.scores, axis=1, keepdims=True)
        tempered = np.where(self.mask, gamma * self.scores / np.where(norms > 0, norms, 1.0), -np.inf)
        weights = np.exp(tempered - tempered.max(axis=1, keepdims=True))
        weights /= weights.sum(axis=1, keepdims=True)
        return unit(np.einsum("cp,cpd->cd", weights, self.table))

    def samples(self, count: int) -> tuple[np.ndarray, np.ndarray]:
        """The text samples of ``count`` a class: the prompts best matched first, the list taken twice,
        each scaled by its match (fewer for a class with fewer than ``count`` / 2 prompts)."""
        order = np.argsort(np.where(self.mask, -self.scores, np.inf), axis=1, kind="stable")  # best first
        rows, labels = [], []
        for c, held in enumerate(self.mask.sum(axis=1)):
            chosen = order[c, np.arange(min(count, 2 * held)) % held]
            rows.append(self.table[c, chosen] * self.scores[c, chosen, None])
            labels.append(np.full(chosen.shape[0], c))
        return np.concatenate(rows), np.concatenate(labels)


def text_sample_counts(prompts: int) -> list[int]:
    """The counts of text samples TIMO-S tries: ten evenly spaced from 1 to 2P, rounded down as the authors'
    ``int(torch.linspace(1, 2P, 10))`` gives them (repeats dropped)."""
    import torch

    return list(dict.fromkeys(max(1, int(t)) for t in torch.linspace(1, 2 * prompts, TEXT_SAMPLE_STEPS)))


def blend_counts(x: np.ndarray, labels: np.ndarray, text_logits: np.ndarray, weights: np.ndarray, bias: np.ndarray,
                 alphas: Sequence[float]) -> np.ndarray:
    """Correct predictions of ``α · x Tᵀ + (x Wᵀ + b)`` for each α, with ``text_logits`` = x Tᵀ."""
    head = x @ weights.T + bias
    return np.array([int((np.argmax(alpha * text_logits + head, axis=1) == labels).sum()) for alpha in alphas])


class TIMO(Method):
    name = "timo"
    label = "TIMO"
    searches_gamma = False

    @classmethod
    def create(cls, options: Options) -> "TIMO":
        return cls()

    @classmethod
    def settings_tried(cls, grid) -> int:
        return len(GDA_ALPHAS) * (TEXT_SAMPLE_STEPS if cls.searches_gamma else 1) + (
            len(TIMO_GAMMAS) if cls.searches_gamma else 0)

    def fit(self, task: Task) -> dict[str, float]:
        match = PromptMatch(task)
        x = np.asarray(task.val_features, dtype=np.float64)
        if self.searches_gamma:  # the temperature of the best text alone on validation, the first of equals
            hits = [int((np.argmax(x @ match.text(g).T, axis=1) == task.val_labels).sum()) for g in TIMO_GAMMAS]
            gamma = float(TIMO_GAMMAS[int(np.argmax(hits))])
            counts = text_sample_counts(match.prompts)
        else:
            gamma = DATASET_GAMMA.get(task.dataset or "", DEFAULT_GAMMA)
            counts = [match.prompts]
        self.text = match.text(gamma)
        samples, on_views = training_samples(task)
        labels = np.tile(task.key_labels, samples.shape[0])
        images = ScatterSums.of(samples.reshape(-1, samples.shape[-1]), labels, task.num_classes)
        best, text_logits = (-1, 0, 0.0, None), x @ self.text.T
        for count in counts:
            head = images.plus(*match.samples(count)).head()
            hits = blend_counts(x, task.val_labels, text_logits, *head, GDA_ALPHAS)
            if hits.max() > best[0]:
                best = (int(hits.max()), count, float(GDA_ALPHAS[int(np.argmax(hits))]), head)
        correct, count, self.alpha, (self.weights, self.bias) = best
        self.val_accuracy = percent(correct, task.val_labels.shape[0])
        prompts = match.mask.sum(axis=1)
        self.details = {"trained_on_views": on_views, "prompts_kept": task.prompts_kept,
                        "prompts_per_class": int(prompts.max()) if prompts.min() == prompts.max()
                        else [int(prompts.min()), int(prompts.max())]}
        notes = [] if on_views else [no_views_note(self.label, task.shots)]
        if not task.prompts_kept:
            notes.append(f"the feature set keeps no prompt embeddings: {self.label} weighs one prompt a class, the "
                         "text classifier itself (extract keeps them; an import takes them from a file)")
        self.notes = tuple(notes)
        return {"alpha": self.alpha, "gamma": gamma, "text_samples": float(count)}

    def logits(self, features: np.ndarray) -> np.ndarray:
        x = np.asarray(features, dtype=np.float64)
        return self.alpha * (x @ self.text.T) + x @ self.weights.T + self.bias

    def state(self) -> dict[str, np.ndarray]:
        return {"guided_text": self.text, "weights": self.weights, "bias": self.bias}

    @classmethod
    def restore(cls, hyperparameters: dict[str, float], state: dict[str, np.ndarray]) -> "TIMO":
        method = cls()
        method.alpha = hyperparameters["alpha"]
        method.text, method.weights, method.bias = state["guided_text"], state["weights"], state["bias"]
        if method.weights.shape != method.text.shape or method.bias.shape != (len(method.text),):
            raise ApecliError(f"a {cls.label} head of shape {method.weights.shape} and {method.bias.shape}, for "
                              f"text of shape {method.text.shape}")
        return method


class TIMOS(TIMO):
    name = "timo-s"
    label = "TIMO-S"
    searches_gamma = True
