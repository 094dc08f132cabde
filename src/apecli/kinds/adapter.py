"""The ``adapter`` kind: a fitted APE-T model with its settings and training history
(docs/cache-format.md, ``adapter``). Its parent is the feature set it was fitted on."""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any, Callable, Mapping

from apecli import store
from apecli.errors import ApecliError, InputError
from apecli.kinds.features import FeatureSet, load_features
from apecli.kinds.fields import NUMBER, OBJECT, TEXT, WHOLE, checked
from apecli.kinds.refinement import read_channels
from apecli.methods.ape_t import Adapter, FitResult, FitSettings

KIND = "adapter"
HISTORY = ("history/loss", "history/val_accuracy")


@dataclass(frozen=True)
class AdapterHeader:
    """An adapter artifact's header, read without its arrays."""

    dataset: str | None
    shots: int
    settings: FitSettings
    best_epoch: int
    best_val_accuracy: float
    trained_on_views: bool
    device: str  # the type of device it trained on; the CPU for adapters written before it was recorded

    @classmethod
    def of(cls, artifact: store.Artifact) -> "AdapterHeader":
        """The header of an adapter artifact, each field checked against the format."""
        meta = artifact.metadata
        recorded = checked(artifact, meta, "settings", OBJECT)
        try:
            settings = settings_of(recorded)
        except (ApecliError, KeyError, TypeError, ValueError) as error:
            raise InputError(artifact.path, f"its header is damaged (metadata 'settings': {error})") from None
        return cls(checked(artifact, meta, "dataset", TEXT, None, optional=True), checked(artifact, meta, "shots", WHOLE),
                   settings, checked(artifact, meta, "best_epoch", WHOLE), checked(artifact, meta, "best_val_accuracy", NUMBER),
                   checked(artifact, meta, "trained_on_views", (bool,)), checked(artifact, meta, "device", TEXT, "cpu"))

    def describe(self) -> str:
        on = f" ({self.settings.val_shots} a class)" if self.settings.val_shots else ""
        return f"APE-T, {self.shots}-shot, best epoch {self.best_epoch}, val {self.best_val_accuracy:.2f}%{on}"


def settings_of(recorded: Mapping[str, Any]) -> FitSettings:
    """The settings an adapter records (``val_shots`` absent in adapters written before it: the whole split)."""
    known = {entry.name for entry in fields(FitSettings)}
    settings = {key: value for key, value in recorded.items() if key in known}
    settings["weights"] = tuple(settings["weights"])
    if len(settings["weights"]) != 2 or not all(isinstance(weight, (int, float)) for weight in settings["weights"]):
        raise ValueError("weights are not two numbers")
    for name in ("shots", "k", "epochs", "batch_size", "seed", "val_shots"):
        if settings.get(name) is not None and (not isinstance(settings[name], int) or isinstance(settings[name], bool)):
            raise ValueError(f"{name} is not a whole number")
    for name in ("lr", "eps", "weight_decay", "init_alpha", "init_beta"):
        if settings.get(name) is not None and not isinstance(settings[name], (int, float)):
            raise ValueError(f"{name} is not a number")
    return FitSettings(**settings)


def save_fit(result: FitResult, features: FeatureSet, destination: Path | Callable[[str], Path]) -> FitResult:
    """Write the fitted adapter with its settings and training history; its parent is the feature set."""
    if features.artifact is None:
        raise ApecliError("save the feature set before fitting on it")
    arrays = {
        "channels": result.adapter.channels,
        "residual": result.adapter.residual,
        "value_weights": result.adapter.value_weights,
        HISTORY[0]: result.loss,
        HISTORY[1]: result.val_accuracy,
    }
    metadata = {"dataset": features.dataset, "shots": result.adapter.shots, **result.summary()}
    metadata.pop("history")
    artifact = store.write_artifact(destination, KIND, arrays, metadata, parents=[features.artifact])
    return replace(result, artifact=artifact)


def load_fit(source: str | Path | store.Artifact) -> tuple[FitResult, FeatureSet]:
    """Read a fitted adapter and the feature set it was fitted on (checked unchanged)."""
    artifact = store.opened(source, KIND)
    features = load_features(artifact.parent("features"))
    header = AdapterHeader.of(artifact)
    adapter = Adapter(read_channels(artifact, features.dim), artifact.read("residual"), artifact.read("value_weights"),
                      header.shots)
    if adapter.residual.shape != (features.num_classes, adapter.channels.shape[0]):
        raise InputError(artifact.path, f"residual of shape {adapter.residual.shape} does not fit {features.name}")
    _, cache = features.cache(adapter.shots)
    if adapter.value_weights.shape != cache.labels.shape:
        raise InputError(artifact.path, f"value weights of shape {adapter.value_weights.shape}, for "
                                        f"{cache.labels.shape[0]} cache keys")
    result = FitResult(adapter, header.settings, header.best_epoch, header.best_val_accuracy, artifact.read(HISTORY[0]),
                       artifact.read(HISTORY[1]), header.trained_on_views, artifact, header.device)
    return result, features
