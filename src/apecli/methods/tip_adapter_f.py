"""Tip-Adapter-F (Zhang et al., ECCV 2022): Tip-Adapter with its cache keys trained on the stored views
of the few-shot images, then β × α searched on validation."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from apecli.methods.base import EpochProgress, Options, Task
from apecli.methods.cache_model import CacheModel
from apecli.methods.grid import SearchGrid, dataset_grid
from apecli.methods.scores import class_sums
from apecli.methods.tip_adapter import TipAdapter, plain_cache
from apecli.methods.trainer import check_training, no_views_note, reproducible, train, training_samples

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


class TipAdapterF(TipAdapter):
    name = "tip-adapter-f"
    label = "Tip-Adapter-F"
    task_state = ("text", "key_labels")  # the trained keys are its state

    def __init__(self, grid: SearchGrid | None = None, settings: TipAdapterFSettings | None = None,
                 progress: EpochProgress | None = None) -> None:
        self.grid, self.settings, self.progress = grid, settings, progress

    @classmethod
    def create(cls, options: Options) -> "TipAdapterF":
        return cls(options.grid, None, options.epoch_progress)

    def fit(self, task: Task) -> dict[str, float]:
        """Train the cache keys on the stored views (on the task's device), then search β × α."""
        import torch

        settings = self.settings or TipAdapterFSettings.for_dataset(task.dataset)
        on = torch.device(task.device)
        plain = plain_cache(task.text, task.keys, task.key_labels)
        samples, on_views = training_samples(task)
        text = torch.from_numpy(task.text.astype(np.float32)).to(on)
        key_labels = torch.from_numpy(plain.key_labels.astype(np.int64)).to(on)
        keys = torch.tensor(plain.keys, dtype=torch.float32, device=on, requires_grad=True)
        alpha, beta = settings.alpha, settings.beta

        def logits(x):
            return 100.0 * x @ text.T + alpha * class_sums(torch.exp(-(beta - beta * (x @ keys.T))), key_labels,
                                                            task.num_classes)

        with reproducible(on):
            run = train([keys], logits, samples, plain.key_labels, task.val_features, task.val_labels,
                        epochs=settings.epochs, lr=settings.lr, eps=settings.eps, weight_decay=settings.weight_decay,
                        batch_size=settings.batch_size, seed=settings.seed, progress=self.progress, device=on)
        self.model = CacheModel(task.text, run.parameters[0], plain.key_labels, plain.value_weights)
        result = self.model.search(task.val_features, task.val_labels, self.grid or dataset_grid(task.dataset),
                                   device=on)
        self.alpha, self.beta = result.alpha, result.beta
        self.val_accuracy, self.search = result.accuracy, result
        self.details = {"best_epoch": run.best_epoch, "epochs": settings.epochs, "init_alpha": settings.alpha,
                        "trained_on_views": on_views, "device": on.type}
        self.notes = () if on_views else (no_views_note(self.label, task.shots),)
        return {"alpha": result.alpha, "beta": result.beta}

    def state(self) -> dict[str, np.ndarray]:
        return {"keys": self.model.keys}

    @classmethod
    def restore(cls, hyperparameters: dict[str, float], state: dict[str, np.ndarray]) -> "TipAdapterF":
        from apecli.errors import ApecliError

        keys, labels, text = state["keys"], state["key_labels"], state["text"]
        if keys.ndim != 2 or keys.shape != (labels.shape[0], text.shape[1]):
            raise ApecliError(f"trained keys of shape {keys.shape}, for a cache of {(labels.shape[0], text.shape[1])}")
        method = cls()
        method.model = plain_cache(text, keys, labels)
        method.alpha, method.beta = hyperparameters["alpha"], hyperparameters["beta"]
        return method
