"""Training-required APE (APE-T): a category residual and per-key value weights, learned from the cache.

On the k channels chosen by the criterion (with the training weights w_training), a residual R (C × k,
zeros at start) is added to each class's text vector and to each cache key of that class, and each
key gets a value weight v (ones at start):

    W̃[c, sel] = W[c, sel] + R[c]          F̃_j[sel] = F_j[sel] + R[y_j]      (no renormalisation)
    logits    = 100 · f W̃ᵀ + α · exp(−β (1 − f F̃ᵀ)) · (L ⊙ v)                 (all D channels)

Training (:mod:`apecli.training`) minimises cross-entropy on the training images' augmented views,
at fixed α = init α and β = init β, and keeps the parameters of the best validation epoch. The β × α search happens at
evaluation, on validation, as for training-free APE but without γ.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import numpy as np

from apecli import store
from apecli.errors import ApecliError
from apecli.features import FeatureSet, load_features
from apecli.presets import preset_for
from apecli.refine import channel_criterion, read_channels, top_channels
from apecli.training import EpochProgress, check_training, reproducible, train, training_samples
from apecli.training_free import CacheModel, class_sums

if TYPE_CHECKING:
    import torch

KIND = "adapter"


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

    def resolve(self, features: FeatureSet) -> "FitSettings":
        """These settings with every default filled in for ``features``, and checked."""
        preset = preset_for(features.dataset)
        shots, _ = features.cache(self.shots)
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
        if not 1 <= resolved.k <= features.dim:
            raise ApecliError(f"k must be between 1 and the feature width {features.dim}, got {resolved.k}")
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

    def cache_model(self, features: FeatureSet) -> CacheModel:
        """The adapted classifier: W̃ and F̃ (the residual added on the channels), and the key weights."""
        _, cache = features.cache(self.shots)
        delta = np.zeros((features.num_classes, features.dim))
        delta[:, self.channels] = self.residual
        text = features.classifier.astype(np.float64) + delta
        keys = cache.keys.astype(np.float64) + delta[cache.labels]
        return CacheModel(text, keys, cache.labels, self.value_weights)

    def logits(self, features: FeatureSet, x: np.ndarray, alpha: float, beta: float) -> np.ndarray:
        return self.cache_model(features).logits(x, alpha, beta)


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
    artifact: store.Artifact | None = None
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


def fit(features: FeatureSet, settings: FitSettings = FitSettings(), progress: EpochProgress | None = None,
        val_cache_bytes: int | None = None, device: "str | None" = None) -> FitResult:
    """Train APE-T on a feature set's cache (its stored views when it has them, else its keys), on
    ``device`` (``cpu`` by default; ``cuda`` trains with deterministic kernels, see
    :func:`apecli.training.reproducible`).

    The validation images' products with the fixed keys are kept across epochs within
    ``val_cache_bytes`` (default: :func:`val_cache_budget`, of the device's memory); 0 recomputes them
    every epoch."""
    import torch

    from apecli.devices import torch_device

    on = torch_device(device or "cpu")
    settings = settings.resolve(features)
    features = features.with_validation_shots(settings.val_shots)
    shots, cache = features.cache(settings.shots)
    val = features.split("val")
    channels = top_channels(channel_criterion(features.classifier, cache.keys, cache.labels, settings.weights), settings.k)
    samples, trained_on_views = training_samples(features, shots)
    torch.manual_seed(settings.seed)
    text = torch.from_numpy(features.classifier.astype(np.float32)).to(on)
    keys = torch.from_numpy(cache.keys.astype(np.float32)).to(on)
    labels = torch.from_numpy(cache.labels.astype(np.int64)).to(on)
    selected = torch.from_numpy(channels).to(on)
    residual = torch.zeros((features.num_classes, settings.k), device=on, requires_grad=True)
    value_weights = torch.ones(labels.shape[0], device=on, requires_grad=True)
    alpha, beta = settings.init_alpha, settings.init_beta

    def model_logits(x, fixed=None):
        return adapted_logits(x, text, keys, labels, selected, residual, value_weights, alpha, beta, fixed)

    val_x = torch.from_numpy(np.ascontiguousarray(val.features, dtype=np.float32))
    products = KeyProducts(val_x.to(on), keys, val_cache_bytes)

    with reproducible(on):
        run = train([residual, value_weights], model_logits, samples, cache.labels, val_x.numpy(), val.labels,
                    epochs=settings.epochs, lr=settings.lr, eps=settings.eps, weight_decay=settings.weight_decay,
                    batch_size=settings.batch_size, seed=settings.seed, progress=progress,
                    val_logits=lambda rows: model_logits(products.x[rows], products(rows)), device=on)
    adapter = Adapter(channels, run.parameters[0], run.parameters[1], shots)
    return FitResult(adapter, settings, run.best_epoch, run.best_val_accuracy, run.loss, run.val_accuracy, trained_on_views,
                     device=on.type)


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


def save_fit(result: FitResult, features: FeatureSet, destination: Path | Callable[[str], Path]) -> FitResult:
    """Write the fitted adapter with its settings and training history; its parent is the feature set."""
    if features.artifact is None:
        raise ApecliError("save the feature set before fitting on it")
    arrays = {
        "channels": result.adapter.channels,
        "residual": result.adapter.residual,
        "value_weights": result.adapter.value_weights,
        "history/loss": result.loss,
        "history/val_accuracy": result.val_accuracy,
    }
    metadata = {"dataset": features.dataset, "shots": result.adapter.shots, **result.summary()}
    metadata.pop("history")
    artifact = store.write_artifact(destination, KIND, arrays, metadata, parents=[features.artifact])
    return replace(result, artifact=artifact)


def load_fit(source: str | Path | store.Artifact) -> tuple[FitResult, FeatureSet]:
    """Read a fitted adapter and the feature set it was fitted on (checked unchanged)."""
    artifact = source if isinstance(source, store.Artifact) else store.open_artifact(source, [KIND])
    features = load_features(artifact.parent("features"))
    meta = artifact.metadata
    settings = dict(meta["settings"])
    settings["weights"] = tuple(settings["weights"])
    adapter = Adapter(read_channels(artifact, features.dim), artifact.read("residual"), artifact.read("value_weights"),
                      int(meta["shots"]))
    if adapter.residual.shape != (features.num_classes, adapter.channels.shape[0]):
        raise ApecliError(f"{artifact.path}: residual of shape {adapter.residual.shape} does not fit {features.name}")
    _, cache = features.cache(adapter.shots)
    if adapter.value_weights.shape != cache.labels.shape:
        raise ApecliError(f"{artifact.path}: value weights of shape {adapter.value_weights.shape}, for "
                          f"{cache.labels.shape[0]} cache keys")
    result = FitResult(adapter, FitSettings(**settings), int(meta["best_epoch"]), float(meta["best_val_accuracy"]),
                       artifact.read("history/loss"), artifact.read("history/val_accuracy"),
                       bool(meta["trained_on_views"]), artifact, str(meta.get("device", "cpu")))
    return result, features
