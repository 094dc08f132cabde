"""ProKeR (Bendou et al., CVPR 2025, "ProKeR: A Kernel Perspective on Few-Shot Adaptation of Large
Vision-Language Models"): kernel ridge regression, on the cache, of the residual between the labels and
CLIP's zero-shot logits, ``f(x) = f₀(x) + k(x, S)(K/λ + I)⁻¹(Y − f₀(S))`` with ``f₀(x) = x Wᵀ`` (cosines)
and ``k(x, s) = exp(−β(1 − x·s))``, as the authors' released code computes it; β × λ searched on
validation. Its probabilities are the softmax of 100 times f, as CLIP scales its own logits.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

import numpy as np

from apecli.devices import as_device
from apecli.errors import Step
from apecli.methods.base import Method, Options, Progress, Task
from apecli.methods.grid import SearchGrid, dataset_grid
from apecli.methods.scores import CLIP_SCALE, by_blocks, device_block_bytes, percent, row_blocks

if TYPE_CHECKING:
    import torch

PROKER_LAMBDAS = tuple(10.0 ** (i / 2) for i in range(-10, 5))  # 1e-5 … 1e2, half a decade apart
PROKER_BETAS = 20
# What a ProKeR evaluation's β and λ mean, recorded in it: a classifier is rebuilt only from an evaluation
# that records this (the regression once took softmax(100 · x Wᵀ) as f₀ and had no 1/λ on K).
PROKER_FORMULA = "f(x) = x·Wᵀ + k(x, S)(K/λ + I)⁻¹(Y − S·Wᵀ), k(x, s) = exp(−β(1 − x·s))"


@dataclass(frozen=True)
class ProkerSupport:
    """What ProKeR regresses on: the cache keys S, and the residual Y − f₀(S) of CLIP's zero-shot logits
    there (cosines, before CLIP's scale of 100)."""

    text: np.ndarray  # C × D
    support: np.ndarray  # M × D
    residual: np.ndarray  # M × C

    @classmethod
    def on(cls, text: np.ndarray, keys: np.ndarray, labels: np.ndarray) -> "ProkerSupport":
        """The regression on cache ``keys`` of ``labels``, with the text classifier ``text`` (C × D)."""
        text, support = text.astype(np.float64), keys.astype(np.float64)
        return cls(text, support, np.eye(text.shape[0])[labels] - support @ text.T)

    def base(self, x: np.ndarray) -> np.ndarray:
        """f₀: CLIP's zero-shot logits, the cosines x Wᵀ."""
        return x @ self.text.T

    def kernel(self, x: np.ndarray, beta: float) -> np.ndarray:
        """k(x, S) = exp(−β(1 − x·s)) for every row of ``x`` and every key s."""
        return np.exp(-beta * (1.0 - x @ self.support.T))

    def predictor(self, beta: float, lam: float) -> Callable[[np.ndarray], np.ndarray]:
        """f for one (β, λ): ``f₀(x) + k(x, S)(K/λ + I)⁻¹(Y − f₀(S))``, solved directly (as
        ``λ(K + λI)⁻¹``, which stays well scaled for small λ), images in blocks."""
        gram = self.kernel(self.support, beta)
        coefficients = np.linalg.solve(gram + lam * np.eye(self.support.shape[0]), lam * self.residual)

        def predict(rows: np.ndarray) -> np.ndarray:
            return self.base(rows) + self.kernel(rows, beta) @ coefficients

        return lambda x: by_blocks(x, self.support.shape[0], predict)


def proker_counts(regression: ProkerSupport, x: np.ndarray, labels: np.ndarray, betas: Sequence[float],
                  lambdas: Sequence[float], progress: Progress | None = None,
                  device: "torch.device | str | None" = None) -> np.ndarray:
    """The correct predictions of ``x`` (β × λ) with every (β, λ), in float64 on ``device`` (the CPU by
    default).

    One eigendecomposition K = Q diag(Λ) Qᵀ per β serves every λ: the coefficients (K/λ + I)⁻¹ R are
    Q diag(λ / (Λ + λ)) Qᵀ R, kept for all λ together (M × λ·C), so that each block of images takes one
    kernel and one product.
    """
    import torch

    on = as_device(device, float64=True)

    def tensor(array: np.ndarray) -> "torch.Tensor":
        return torch.from_numpy(np.ascontiguousarray(array, dtype=np.float64)).to(on)

    support, residual = tensor(regression.support), tensor(regression.residual)
    x, target = tensor(x), torch.from_numpy(np.asarray(labels, dtype=np.int64)).to(on)
    prior = x @ tensor(regression.text).T
    shrinkage = tensor(np.asarray(lambdas))[:, None]  # λ × 1
    keys, classes = residual.shape
    width = len(lambdas) * classes
    blocks = row_blocks(x.shape[0], max(keys, width), None if on.type == "cpu" else device_block_bytes(on))
    correct = torch.zeros((len(betas), len(lambdas)), dtype=torch.int64, device=on)
    coefficients = torch.empty((keys, len(lambdas), classes), dtype=torch.float64, device=on)
    flat = coefficients.view(keys, width)  # column l·C + c: λ_l, class c
    for b, beta in enumerate(betas):
        kernel = support @ support.T  # K = exp(−β(1 − S Sᵀ)), in place: at M = 16,000 each M × M array is 2 GB
        eigenvalues, vectors = _symmetric_eigh(kernel.sub_(1.0).mul_(beta).exp_())
        del kernel
        factors = shrinkage / (eigenvalues.clamp(min=0.0) + shrinkage)  # K is positive semi-definite; rounding is not
        projected = vectors.T @ residual  # M × C, in K's eigenbasis
        for l in range(len(lambdas)):
            coefficients[:, l] = vectors @ (factors[l, :, None] * projected)
        del vectors
        for block in blocks:
            scores = torch.exp(-beta * (1.0 - x[block] @ support.T)) @ flat
            scores = scores.view(-1, len(lambdas), classes) + prior[block, None, :]
            correct[b] += (scores.argmax(dim=2) == target[block, None]).sum(dim=0)  # first of equal scores
        if progress is not None:
            progress(b + 1, len(betas))
    return correct.cpu().numpy()


def _symmetric_eigh(matrix: "torch.Tensor") -> tuple["torch.Tensor", "torch.Tensor"]:
    """Eigenvalues and eigenvectors of a symmetric matrix: through numpy's LAPACK on the CPU, where it ran
    faster than torch's, and through torch (cuSOLVER) on a GPU."""
    import torch

    if matrix.device.type != "cpu":
        return torch.linalg.eigh(matrix)
    eigenvalues, vectors = np.linalg.eigh(matrix.numpy())
    return torch.from_numpy(eigenvalues), torch.from_numpy(vectors)


class ProKeR(Method):
    name = "proker"
    label = "ProKeR"
    given = ("beta",)
    float64 = True
    logit_scale = CLIP_SCALE
    task_state = ("text", "keys", "key_labels")

    def __init__(self, grid: SearchGrid | None = None, progress: Progress | None = None) -> None:
        self.grid, self.progress = grid, progress

    @classmethod
    def create(cls, options: Options) -> "ProKeR":
        return cls(options.grid, options.progress)

    @classmethod
    def settings_tried(cls, grid: SearchGrid) -> int:
        return (grid.shape[0] if "beta" in grid.given else PROKER_BETAS) * len(PROKER_LAMBDAS)

    @classmethod
    def outdated(cls, summary: Mapping[str, Any]) -> str | None:
        if summary.get("formula") != PROKER_FORMULA:
            return ("a ProKeR evaluation by an earlier apecli, whose regression differed (f₀ was CLIP's softmax); its "
                    f"β and λ do not fit this one: run {Step('evaluate_artifact', mode=cls.name)} again")
        return None

    def fit(self, task: Task) -> dict[str, float]:
        """β × λ searched on validation on the task's device (the regression at the chosen setting on the CPU)."""
        import torch

        on = torch.device(task.device)
        grid = self.grid or dataset_grid(task.dataset)
        betas = SearchGrid(grid.scale, (PROKER_BETAS, 1, 1), (grid.fixed[0], None, None)).betas
        lambdas = np.array(PROKER_LAMBDAS)
        regression = ProkerSupport.on(task.text, task.keys, task.key_labels)
        val_correct = proker_counts(regression, task.val_features, task.val_labels, betas, lambdas, self.progress, on)
        b, l = np.unravel_index(int(np.argmax(val_correct)), val_correct.shape)
        self.regression, self.beta, self.lam = regression, float(betas[b]), float(lambdas[l])
        self.predict = regression.predictor(self.beta, self.lam)
        self.val_accuracy = percent(int(val_correct[b, l]), task.val_labels.shape[0])
        self.details = {"formula": PROKER_FORMULA, "device": on.type,
                        **({"given": {"beta": grid.given["beta"]}} if "beta" in grid.given else {})}
        return {"beta": self.beta, "lambda": self.lam}

    def logits(self, features: np.ndarray) -> np.ndarray:
        """f(x), on the scale of CLIP's cosines (see :attr:`logit_scale`)."""
        return self.predict(np.asarray(features, dtype=np.float64))

    @classmethod
    def restore(cls, hyperparameters: dict[str, float], state: dict[str, np.ndarray]) -> "ProKeR":
        method = cls()
        method.beta, method.lam = hyperparameters["beta"], hyperparameters["lambda"]
        method.predict = ProkerSupport.on(state["text"], state["keys"], state["key_labels"]).predictor(method.beta,
                                                                                                       method.lam)
        return method
