"""APE-T, training-required APE (Zhu et al., ICCV 2023): a category residual and per-key value weights,
learned from the cache.

On the k channels chosen by the criterion (with the training weights w_training), a residual R (C × k,
zeros at start) is added to each class's text vector and to each cache key of that class, and each
key gets a value weight v (ones at start):

    W̃[c, sel] = W[c, sel] + R[c]          F̃_j[sel] = F_j[sel] + R[y_j]      (no renormalisation)
    logits    = 100 · f W̃ᵀ + α · exp(−β (1 − f F̃ᵀ)) · (L ⊙ v)                 (all D channels)

Training (:mod:`apecli.methods.trainer`) minimises cross-entropy on the training images' augmented views,
at fixed α = init α and β = init β, and keeps the parameters of the best validation epoch. The β × α search happens at
evaluation, on validation, as for training-free APE but without γ.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import TYPE_CHECKING, Any

import numpy as np

from apecli.checks import check_k
from apecli.errors import ApecliError
from apecli.methods.ape import checked_channels
from apecli.methods.base import EpochProgress, Method, Options, Progress, Task
from apecli.methods.cache_model import CacheModel
from apecli.methods.criterion import channel_criterion, top_channels
from apecli.methods.grid import SearchGrid, dataset_grid
from apecli.methods.scores import class_sums
from apecli.methods.trainer import check_training, last_epoch_note, no_views_note, reproducible, training_samples
from apecli.methods.trainer import train as train_loop
from apecli.presets import preset_for

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class FitSettings:
    """APE-T's hyperparameters; ``None`` means the dataset's default."""

    shots: int | None = None
    k: int | None = None
    weights: tuple[float, float] | None = None
    epochs: int | None = None
    lr: float | None = None
    eps: float | None = None
    weight_decay: float = 0.1
    batch_size: int = 256
    init_alpha: float | None = None
    init_beta: float | None = None
    seed: int = 1
    val_shots: int | None = None  # validation images per class the best epoch is chosen on (None: all)

    def resolve(self, features: Any) -> "FitSettings":
        """These settings with every default filled in for a feature set (its largest cache by default) or a
        task (its cache), and checked."""
        preset = preset_for(features.dataset)
        shots = features.shots if isinstance(features, Task) else features.cache(self.shots)[0]
        resolved = replace(
            self,
            shots=shots,
            k=self.k if self.k is not None else preset.scaled_k(preset.k_training, features.dim),
            weights=tuple(self.weights) if self.weights is not None else preset.w_training,
            epochs=self.epochs if self.epochs is not None else preset.epochs,
            lr=self.lr if self.lr is not None else preset.lr,
            eps=self.eps if self.eps is not None else preset.eps_for(shots),
            init_alpha=self.init_alpha if self.init_alpha is not None else preset.init_alpha,
            init_beta=self.init_beta if self.init_beta is not None else preset.init_beta,
        )
        check_k(resolved.k, features.dim)
        check_training(epochs=resolved.epochs, batch_size=resolved.batch_size, lr=resolved.lr, eps=resolved.eps,
                       weight_decay=resolved.weight_decay, alpha=resolved.init_alpha, beta=resolved.init_beta,
                       seed=resolved.seed)
        return resolved


@dataclass(frozen=True)
class Adapter:
    """A fitted APE-T model: channels, residual and value weights (keys in the store's order)."""

    channels: np.ndarray  # (k,)
    residual: np.ndarray  # C × k
    value_weights: np.ndarray  # (C·K,)
    shots: int

    def cache_model(self, task: Any) -> CacheModel:
        """The adapted classifier of a task's cache (or a feature set's cache of the adapter's shots): W̃ and F̃
        (the residual added on the channels), and the key weights."""
        task = task if isinstance(task, Task) else task.task(self.shots)
        return adapted_cache(task.text, task.keys, task.key_labels, self.channels, self.residual, self.value_weights)

    def logits(self, task: Any, x: np.ndarray, alpha: float, beta: float) -> np.ndarray:
        return self.cache_model(task).logits(x, alpha, beta)


@dataclass(frozen=True)
class FitResult:
    """What ``fit`` learned and how training went."""

    adapter: Adapter
    settings: FitSettings
    best_epoch: int  # counted from 1
    best_val_accuracy: float
    loss: np.ndarray  # mean training loss per epoch
    val_accuracy: np.ndarray  # per epoch, percent
    trained_on_views: bool
    artifact: Any = None  # the adapter artifact it was saved as (apecli.kinds.adapter), if it was
    device: str = "cpu"  # the type of device it trained on: a GPU's float32 rounds otherwise than the CPU's

    def summary(self) -> dict[str, Any]:
        settings = asdict(self.settings)
        settings["weights"] = list(settings["weights"])
        return {
            "settings": settings,
            "best_epoch": self.best_epoch,
            "best_val_accuracy": self.best_val_accuracy,
            "trained_on_views": self.trained_on_views,
            "device": self.device,
            "history": {"loss": self.loss.tolist(), "val_accuracy": self.val_accuracy.tolist()},
        }


def fit_notes(fitted: FitResult) -> tuple[str, ...]:
    """What a careful user should know of a training run: no views to train on, validation still rising."""
    last = last_epoch_note(fitted.best_epoch, fitted.settings.epochs)
    return tuple(note for note in ((None if fitted.trained_on_views else no_views_note("APE-T", fitted.settings.shots)),
                                   last) if note)


def train(task: Task, settings: FitSettings, progress: EpochProgress | None = None,
          val_cache_bytes: int | None = None) -> FitResult:
    """Train APE-T on a task's cache (its stored views when it has them, else its keys) with resolved
    ``settings``, on the task's device (``cuda`` trains with deterministic kernels, see
    :func:`apecli.methods.trainer.reproducible`).

    The validation images' products with the fixed keys are kept across epochs within
    ``val_cache_bytes`` (default: :func:`val_cache_budget`, of the device's memory); 0 recomputes them
    every epoch."""
    import torch

    on = torch.device(task.device)
    channels = top_channels(channel_criterion(task.text, task.keys, task.key_labels, settings.weights), settings.k)
    samples, trained_on_views = training_samples(task)
    torch.manual_seed(settings.seed)
    text = torch.from_numpy(task.text.astype(np.float32)).to(on)
    keys = torch.from_numpy(task.keys.astype(np.float32)).to(on)
    labels = torch.from_numpy(task.key_labels.astype(np.int64)).to(on)
    selected = torch.from_numpy(channels).to(on)
    residual = torch.zeros((task.num_classes, settings.k), device=on, requires_grad=True)
    value_weights = torch.ones(labels.shape[0], device=on, requires_grad=True)
    alpha, beta = settings.init_alpha, settings.init_beta

    def model_logits(x, fixed=None):
        return adapted_logits(x, text, keys, labels, selected, residual, value_weights, alpha, beta, fixed)

    val_x = torch.from_numpy(np.ascontiguousarray(task.val_features, dtype=np.float32))
    products = KeyProducts(val_x.to(on), keys, val_cache_bytes)

    with reproducible(on):
        run = train_loop([residual, value_weights], model_logits, samples, task.key_labels, val_x.numpy(),
                         task.val_labels, epochs=settings.epochs, lr=settings.lr, eps=settings.eps,
                         weight_decay=settings.weight_decay, batch_size=settings.batch_size, seed=settings.seed,
                         progress=progress, val_logits=lambda rows: model_logits(products.x[rows], products(rows)),
                         device=on)
    adapter = Adapter(channels, run.parameters[0], run.parameters[1], task.shots)
    return FitResult(adapter, settings, run.best_epoch, run.best_val_accuracy, run.loss, run.val_accuracy,
                     trained_on_views, device=on.type)


def val_cache_budget(device: "torch.device | None" = None) -> int:
    """How many bytes of validation products APE-T's training keeps across epochs: a quarter of the
    memory available now (Linux; a GPU's own free memory there), at most 4 GiB (ImageNet's
    50,000 × 16,000 products take 3.2 GB)."""
    if device is not None and device.type == "cuda":
        import torch

        return min(4 * 2**30, torch.cuda.mem_get_info(device)[0] // 4)
    try:
        with open("/proc/meminfo") as info:
            available = next(int(line.split()[1]) * 1024 for line in info if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError):
        return 512 * 2**20
    return min(4 * 2**30, available // 4)


class KeyProducts:
    """``x · keysᵀ`` for slices of the validation images, which no epoch changes: computed once and kept
    while they fit in ``budget`` bytes, recomputed each time beyond it (the same products either way)."""

    def __init__(self, x, keys, budget: int | None = None) -> None:
        self.x, self.keys = x, keys
        self.budget = val_cache_budget(x.device) if budget is None else budget
        self.kept: dict[tuple[int, int], object] = {}
        self.held = 0

    def __call__(self, rows: slice):
        import torch

        key = (rows.start, rows.stop)
        if key in self.kept:
            return self.kept[key]
        with torch.no_grad():
            products = self.x[rows] @ self.keys.T
        size = products.numel() * products.element_size()
        if self.held + size <= self.budget:
            self.kept[key], self.held = products, self.held + size
        return products


def adapted_logits(x, text, keys, key_labels, channels, residual, value_weights, alpha: float, beta: float,
                   fixed=None):
    """APE-T's logits as torch tensors, differentiable in ``residual`` and ``value_weights``.

    The residual's share of a product with class c is x′ · R[c] over the refined channels, so
    ``f F̃_jᵀ = f F_jᵀ + f′ R[y_j]ᵀ`` and ``f W̃_cᵀ = f W_cᵀ + f′ R[c]ᵀ``: the image × key product with
    the fixed keys needs no gradient (``fixed``, when the caller has it already), and the residual enters
    through one images × classes product."""
    import torch

    share = x.index_select(1, channels) @ residual.T  # f′ R[c]ᵀ, images × classes
    if fixed is None:
        with torch.no_grad():
            fixed = x @ keys.T
    kernel = torch.exp(-(beta - beta * (fixed + share.index_select(1, key_labels))))
    return 100.0 * (x @ text.T + share) + alpha * class_sums(kernel * value_weights, key_labels, text.shape[0])


def adapted_cache(text: np.ndarray, keys: np.ndarray, key_labels: np.ndarray, channels: np.ndarray,
                  residual: np.ndarray, value_weights: np.ndarray) -> CacheModel:
    """The adapted classifier of a cache: W̃ and F̃ (the residual added on the channels), and the key weights."""
    delta = np.zeros(text.shape)
    delta[:, channels] = residual
    return CacheModel(text.astype(np.float64) + delta, keys.astype(np.float64) + delta[key_labels], key_labels,
                      value_weights)


class APET(Method):
    name = "training-required"
    label = "APE-T"
    given = ("alpha", "beta")
    reads = ("adapter",)
    float64 = True
    task_state = ("text", "keys", "key_labels")

    def __init__(self, grid: SearchGrid | None = None, fitted: FitResult | None = None,
                 settings: FitSettings | None = None, progress: Progress | None = None,
                 epoch_progress: EpochProgress | None = None) -> None:
        """Evaluate the ``fitted`` adapter, or one trained here with ``settings`` (the dataset's by default)."""
        self.grid, self.fitted, self.settings, self.progress, self.epoch_progress = (grid, fitted, settings, progress,
                                                                                      epoch_progress)

    @classmethod
    def create(cls, options: Options) -> "APET":
        return cls(options.grid, options.fitted, None, options.progress, options.epoch_progress)

    @classmethod
    def settings_tried(cls, grid: SearchGrid) -> int:
        return grid.beta_alpha_size

    def fit(self, task: Task) -> dict[str, float]:
        """Train the adapter where none was given, then search β × α on validation (no γ)."""
        import torch

        on = torch.device(task.device)
        fitted = self.fitted
        if fitted is None:
            settings = replace(self.settings or FitSettings(), shots=task.shots).resolve(task)
            fitted = train(task, settings, self.epoch_progress)
        self.adapter = fitted.adapter
        self.model = self.adapter.cache_model(task)
        result = self.model.search(task.val_features, task.val_labels, self.grid or dataset_grid(task.dataset),
                                   self.progress, device=on)
        self.alpha, self.beta = result.alpha, result.beta
        self.channels, self.val_accuracy, self.search = self.adapter.channels, result.accuracy, result
        self.details = {"best_epoch": fitted.best_epoch, "epochs": fitted.settings.epochs,
                        "trained_on_views": fitted.trained_on_views, "device": on.type}
        self.notes = fit_notes(fitted)
        return {"alpha": result.alpha, "beta": result.beta}

    def logits(self, features: np.ndarray) -> np.ndarray:
        return self.model.logits(features, self.alpha, self.beta)

    def state(self) -> dict[str, np.ndarray]:
        return {"channels": self.adapter.channels, "residual": self.adapter.residual,
                "value_weights": self.adapter.value_weights}

    @classmethod
    def restore(cls, hyperparameters: dict[str, float], state: dict[str, np.ndarray]) -> "APET":
        text, key_labels = state["text"], state["key_labels"]
        channels = checked_channels(state["channels"], text.shape[1])
        residual, value_weights = state["residual"], state["value_weights"]
        if residual.shape != (text.shape[0], channels.shape[0]):
            raise ApecliError(f"residual of shape {residual.shape}, for {text.shape[0]} classes and "
                              f"{channels.shape[0]} channels")
        if value_weights.shape != key_labels.shape:
            raise ApecliError(f"value weights of shape {value_weights.shape}, for {key_labels.shape[0]} cache keys")
        method = cls()
        method.adapter = Adapter(channels, residual, value_weights, key_labels.shape[0] // text.shape[0])
        method.channels = channels
        method.model = adapted_cache(text, state["keys"], key_labels, channels, residual, value_weights)
        method.alpha, method.beta = hyperparameters["alpha"], hyperparameters["beta"]
        return method

