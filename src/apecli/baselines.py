"""Competing few-shot methods, run on the same stored features with the same protocol as APE.

Every method tunes its hyperparameters on the validation split only, then reports test accuracy once
with the chosen ones. The formulas, in the papers' terms, are in docs/methods.md.

- Tip-Adapter (Zhang et al., ECCV 2022): ``100 · f Wᵀ + α · exp(−β(1 − f Fᵀ)) · L``, β × α grid.
- Tip-Adapter-F: the same, with the cache keys trained from the stored views.
- GDA (Wang et al., ICLR 2024): Gaussian discriminant analysis on the views, a linear head fused with
  the zero-shot logits by an α chosen from a small grid.
- ProKeR (Bendou et al., CVPR 2025): kernel ridge regression of the labels' residual from CLIP's
  zero-shot logits on the cache, ``f₀(x) + k(x, S)(K/λ + I)⁻¹(Y − f₀(S))`` with ``f₀(x) = x Wᵀ``, β × λ grid.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Sequence

import numpy as np

from apecli.evaluate import Evaluation, default_grid, percent, scored
from apecli.features import FeatureSet
from apecli.training import EpochProgress, check_training, reproducible, train, training_samples
from apecli.training_free import (CacheModel, Progress, SearchGrid, by_blocks, class_sums, device_block_bytes,
                                  predicted, row_blocks, search_device)

if TYPE_CHECKING:
    import torch

GDA_ALPHAS = tuple(10.0**i for i in range(-4, 5))
PROKER_LAMBDAS = tuple(10.0 ** (i / 2) for i in range(-10, 5))  # 1e-5 … 1e2, half a decade apart
PROKER_BETAS = 20
# What a ProKeR evaluation's β and λ mean, recorded in it: a classifier is rebuilt only from an evaluation
# that records this (earlier ones took softmax(100 · x Wᵀ) as f₀ and had no 1/λ on K).
PROKER_FORMULA = "f(x) = x·Wᵀ + k(x, S)(K/λ + I)⁻¹(Y − S·Wᵀ), k(x, s) = exp(−β(1 − x·s))"


def _plain_cache(features: FeatureSet, shots: int | None) -> tuple[int, CacheModel]:
    shots, cache = features.cache(shots)
    return shots, CacheModel(features.classifier, cache.keys, cache.labels, np.ones(cache.labels.shape[0]))


def evaluate_tip_adapter(features: FeatureSet, shots: int | None = None, grid: SearchGrid | None = None,
                         progress: Progress | None = None, device: str | None = None) -> Evaluation:
    """Tip-Adapter: the cache as it is, β × α searched on validation (on ``device``, the CPU by default)."""
    on = search_device(device)
    shots, model = _plain_cache(features, shots)
    val, test = features.split("val"), features.split("test")
    result = model.search(val.features, val.labels, grid or default_grid(features), progress, device=on)
    chosen = predicted(model.logits(test.features, result.alpha, result.beta))
    return scored("tip-adapter", features, shots, result.accuracy, chosen, result, alpha=result.alpha, beta=result.beta,
                  device=on.type)


# Tip-Adapter-F's training α and epochs where the authors' configurations give them (dataset → α, epochs);
# other datasets train with α = 1 for 20 epochs. β is 1 in all of them.
TIP_ADAPTER_F_CONFIGS = {"dtd": (2.0, 20), "eurosat": (2.0, 100), "fgvc": (5.0, 20), "imagenet": (1.17, 20),
                         "oxford_pets": (1.17, 20)}


@dataclass(frozen=True)
class TipAdapterFSettings:
    """Tip-Adapter-F's training settings (the authors' defaults; :meth:`for_dataset` takes their
    per-dataset α and epochs)."""

    epochs: int = 20
    lr: float = 1e-3
    eps: float = 1e-4
    weight_decay: float = 0.01
    batch_size: int = 256
    alpha: float = 1.0
    beta: float = 1.0
    seed: int = 1

    def __post_init__(self) -> None:
        check_training(epochs=self.epochs, batch_size=self.batch_size, lr=self.lr, eps=self.eps,
                       weight_decay=self.weight_decay, alpha=self.alpha, beta=self.beta, seed=self.seed)

    @classmethod
    def for_dataset(cls, dataset: str | None) -> "TipAdapterFSettings":
        """The authors' settings for a dataset (its training α and epochs, where their configurations give them)."""
        if dataset not in TIP_ADAPTER_F_CONFIGS:
            return cls()
        alpha, epochs = TIP_ADAPTER_F_CONFIGS[dataset]
        return cls(alpha=alpha, epochs=epochs)


def evaluate_tip_adapter_f(features: FeatureSet, shots: int | None = None, grid: SearchGrid | None = None,
                           settings: TipAdapterFSettings | None = None,
                           progress: EpochProgress | None = None, device: str | None = None) -> Evaluation:
    """Tip-Adapter-F: train the cache keys on the stored views, then search β × α on validation (both on
    ``device``, the CPU by default). ``settings`` default to the dataset's (:meth:`TipAdapterFSettings.for_dataset`)."""
    import torch

    settings = settings or TipAdapterFSettings.for_dataset(features.dataset)
    on = search_device(device)
    shots, plain = _plain_cache(features, shots)
    val, test = features.split("val"), features.split("test")
    samples, on_views = training_samples(features, shots)
    text = torch.from_numpy(features.classifier.astype(np.float32)).to(on)
    key_labels = torch.from_numpy(plain.key_labels.astype(np.int64)).to(on)
    keys = torch.tensor(plain.keys, dtype=torch.float32, device=on, requires_grad=True)
    alpha, beta = settings.alpha, settings.beta

    def logits(x):
        return 100.0 * x @ text.T + alpha * class_sums(torch.exp(-(beta - beta * (x @ keys.T))), key_labels,
                                                        features.num_classes)

    with reproducible(on):
        run = train([keys], logits, samples, plain.key_labels, val.features, val.labels, epochs=settings.epochs,
                    lr=settings.lr, eps=settings.eps, weight_decay=settings.weight_decay, batch_size=settings.batch_size,
                    seed=settings.seed, progress=progress, device=on)
    model = CacheModel(features.classifier, run.parameters[0], plain.key_labels, plain.value_weights)
    result = model.search(val.features, val.labels, grid or default_grid(features), device=on)
    chosen = predicted(model.logits(test.features, result.alpha, result.beta))
    return scored("tip-adapter-f", features, shots, result.accuracy, chosen, result, learned={"keys": run.parameters[0]},
                  alpha=result.alpha, beta=result.beta, best_epoch=run.best_epoch, epochs=settings.epochs,
                  init_alpha=settings.alpha,
                  trained_on_views=on_views, device=on.type)


def gda_head(samples: np.ndarray, labels: np.ndarray, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """GDA's linear head (C × D weights, C biases) from samples (N × D) with a shared covariance."""
    x = np.asarray(samples, dtype=np.float64)
    means = np.stack([x[labels == c].mean(axis=0) for c in range(num_classes)])
    centred = x - means[labels]
    count, dim = centred.shape
    covariance = centred.T @ centred / (count - 1)
    precision = dim * np.linalg.pinv((count - 1) * covariance + np.trace(covariance) * np.eye(dim))
    weights = means @ precision
    bias = np.log(1.0 / num_classes) - 0.5 * np.einsum("cd,cd->c", weights, means)
    return weights, bias


def gda_for(features: FeatureSet, shots: int) -> tuple[np.ndarray, np.ndarray, bool]:
    """GDA's head for a feature set's ``shots``-shot cache, from its stored views (or keys), and whether views were used."""
    _, cache = features.cache(shots)
    samples, on_views = training_samples(features, shots)
    weights, bias = gda_head(samples.reshape(-1, features.dim), np.tile(cache.labels, samples.shape[0]),
                             features.num_classes)
    return weights, bias, on_views


def evaluate_gda(features: FeatureSet, shots: int | None = None, grid: SearchGrid | None = None) -> Evaluation:
    """GDA: class means and a shared covariance from all stored views; α from a small grid, or the α
    ``grid`` fixes (GDA has no other value to search)."""
    shots, _ = features.cache(shots)
    weights, bias, on_views = gda_for(features, shots)
    given = {"alpha": grid.given["alpha"]} if grid is not None and "alpha" in grid.given else {}
    alphas = np.array((given["alpha"],) if given else GDA_ALPHAS)

    def predictions(split: str, chosen: np.ndarray) -> np.ndarray:  # one row per α
        x = features.split(split).features.astype(np.float64)
        zero_shot = 100.0 * x @ features.classifier.astype(np.float64).T
        head = x @ weights.T + bias
        return np.argmax(zero_shot[None] + chosen[:, None, None] * head[None], axis=2)

    val = features.split("val")
    val_correct = (predictions("val", alphas) == val.labels[None]).sum(axis=1)
    best = int(np.argmax(val_correct))  # first of the best
    return scored("gda", features, shots, percent(int(val_correct[best]), val.labels.shape[0]),
                  predictions("test", alphas[best : best + 1])[0],
                  alpha=float(alphas[best]), trained_on_views=on_views, **({"given": given} if given else {}))


@dataclass(frozen=True)
class ProkerSupport:
    """What ProKeR regresses on: the cache keys S, and the residual Y − f₀(S) of CLIP's zero-shot logits
    there (cosines, before CLIP's scale of 100)."""

    text: np.ndarray  # C × D
    support: np.ndarray  # M × D
    residual: np.ndarray  # M × C

    @classmethod
    def of(cls, features: FeatureSet, shots: int) -> "ProkerSupport":
        _, cache = features.cache(shots)
        return cls.on(features.classifier, cache.keys, cache.labels)

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

    on = search_device(device)

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


def evaluate_proker(features: FeatureSet, shots: int | None = None, grid: SearchGrid | None = None,
                    progress: Progress | None = None, device: str | None = None) -> Evaluation:
    """ProKeR: kernel ridge regression of the residual Y − f₀(S) on the cache; β × λ searched on
    validation (on ``device``, the CPU by default; the test predictions at the chosen setting on the CPU).

    f₀ is CLIP's zero-shot logits x Wᵀ (cosines), the kernel exp(−β(1 − x·s)), and the regression's
    coefficients (K/λ + I)⁻¹(Y − f₀(S)), as the authors' released code computes them.
    """
    on = search_device(device)
    shots, _ = features.cache(shots)
    grid = grid or default_grid(features)
    betas = SearchGrid(grid.scale, (PROKER_BETAS, 1, 1), (grid.fixed[0], None, None)).betas
    lambdas = np.array(PROKER_LAMBDAS)
    regression = ProkerSupport.of(features, shots)
    val, test = features.split("val"), features.split("test")
    val_correct = proker_counts(regression, val.features, val.labels, betas, lambdas, progress, on)
    b, l = np.unravel_index(int(np.argmax(val_correct)), val_correct.shape)
    predict = regression.predictor(betas[b], lambdas[l])
    chosen = predicted(predict(test.features.astype(np.float64)))
    return scored("proker", features, shots, percent(int(val_correct[b, l]), val.labels.shape[0]), chosen,
                  beta=float(betas[b]), **{"lambda": float(lambdas[l]), "formula": PROKER_FORMULA}, device=on.type,
                  **({"given": {"beta": grid.given["beta"]}} if "beta" in grid.given else {}))
