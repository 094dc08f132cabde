"""The eval stage: every mode's accuracies on a feature set, hyperparameters tuned on validation only.

Zero-shot CLIP and training-free APE live here; APE-T's search runs on a fitted adapter
(:mod:`apecli.training_required`), the baselines in :mod:`apecli.baselines`. :func:`evaluate_artifact`
dispatches a stored artifact to the right one.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

import numpy as np

from apecli import store
from apecli.errors import ApecliError
from apecli.features import FeatureSet
from apecli.presets import preset_for
from apecli.refine import Refinement
from apecli.training_free import Progress, SearchGrid, SearchResult, TriEdge, predicted, search, search_device

if TYPE_CHECKING:
    from apecli.training_required import FitResult

KIND = "evaluation"
MODES = ("zero-shot", "training-free", "training-required", "tip-adapter", "tip-adapter-f", "gda", "proker")
# The hyperparameters each mode chooses on validation that a user may give instead (SearchGrid.fixed).
GIVEN = {"zero-shot": (), "training-free": ("alpha", "beta", "gamma"), "training-required": ("alpha", "beta"),
         "tip-adapter": ("alpha", "beta"), "tip-adapter-f": ("alpha", "beta"), "gda": ("alpha",), "proker": ("beta",)}


@dataclass(frozen=True)
class Evaluation:
    """What one evaluation found: accuracies in percent and the chosen hyperparameters."""

    mode: str
    dataset: str | None
    zero_shot_val: float
    zero_shot_test: float
    val_accuracy: float
    test_accuracy: float
    shots: int | None = None
    alpha: float | None = None
    beta: float | None = None
    gamma: float | None = None
    channels: np.ndarray | None = None
    search: SearchResult | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    learned: dict[str, np.ndarray] = field(default_factory=dict)  # parameters a prediction needs (stored)
    test_predictions: np.ndarray | None = None  # the predicted class of each test image (stored)
    test_class_accuracy: float | None = None  # the mean over the test split's classes of their accuracy, percent

    def summary(self) -> dict[str, Any]:
        """The JSON-ready results (accuracies in percent)."""
        result: dict[str, Any] = {
            "mode": self.mode,
            "dataset": self.dataset,
            "shots": self.shots,
            "alpha": self.alpha,
            "beta": self.beta,
            "gamma": self.gamma,
            "val_accuracy": self.val_accuracy,
            "test_accuracy": self.test_accuracy,
            "zero_shot_accuracy": self.zero_shot_test,
            "zero_shot_val_accuracy": self.zero_shot_val,
        }
        if self.test_class_accuracy is not None:
            result["test_class_accuracy"] = self.test_class_accuracy
        if self.search is not None:
            result["grid_settings"] = self.search.grid.size
            result["settings_sharing_best"] = self.search.ties
            result["search_scale"] = list(self.search.grid.scale)
            result["search_step"] = list(self.search.grid.steps)
            if self.search.grid.given:
                result["given"] = self.search.grid.given
        if self.channels is not None:
            result["k"] = int(self.channels.shape[0])
        result.update(self.extra)
        return result


def percent(correct: int, total: int) -> float:
    return 100.0 * correct / total if total else float("nan")


def class_accuracy(predictions: np.ndarray, labels: np.ndarray) -> float:
    """The mean over the classes present in ``labels`` of each one's accuracy, in percent."""
    present, index = np.unique(labels, return_inverse=True)
    hits = np.bincount(index, weights=(predictions == labels).astype(np.float64), minlength=present.size)
    return float(100.0 * np.mean(hits / np.bincount(index, minlength=present.size)))


def _zero_shot(features: FeatureSet, split: str) -> float:
    part = features.split(split)
    return percent(int((zero_shot_predictions(features, split) == part.labels).sum()), part.labels.shape[0])


def zero_shot_predictions(features: FeatureSet, split: str) -> np.ndarray:
    x = features.split(split).features.astype(np.float64)
    return predicted(100.0 * x @ features.classifier.astype(np.float64).T)


def scored(
    mode: str,
    features: FeatureSet,
    shots: int | None,
    val_accuracy: float,
    test_predictions: np.ndarray,
    search: SearchResult | None = None,
    channels: np.ndarray | None = None,
    learned: dict[str, np.ndarray] | None = None,
    **chosen: Any,
) -> Evaluation:
    """The evaluation of a method that chose its settings on validation and predicted ``test_predictions``
    (one class per test image) on test.

    ``chosen`` holds the chosen α, β, γ and anything else worth reporting (λ, the best epoch, …).
    """
    labels = features.split("test").labels
    test_predictions = np.asarray(test_predictions, dtype=np.int64)
    known = {key: chosen.pop(key) for key in ("alpha", "beta", "gamma") if key in chosen}
    return Evaluation(mode=mode, dataset=features.dataset, zero_shot_val=_zero_shot(features, "val"),
                      zero_shot_test=_zero_shot(features, "test"), val_accuracy=val_accuracy,
                      test_accuracy=percent(int((test_predictions == labels).sum()), labels.shape[0]), shots=shots,
                      channels=channels, search=search, extra=chosen, learned=learned or {},
                      test_predictions=test_predictions, test_class_accuracy=class_accuracy(test_predictions, labels),
                      **known)


def default_grid(features: FeatureSet) -> SearchGrid:
    preset = preset_for(features.dataset)
    return SearchGrid(preset.search_scale, preset.search_step)


def evaluate_zero_shot(features: FeatureSet) -> Evaluation:
    """CLIP's zero-shot accuracy: the argmax of 100 · f Wᵀ."""
    return scored("zero-shot", features, None, _zero_shot(features, "val"), zero_shot_predictions(features, "test"))


def evaluate_training_free(
    features: FeatureSet,
    refinement: Refinement,
    grid: SearchGrid | None = None,
    progress: Progress | None = None,
    device: str | None = None,
) -> Evaluation:
    """Training-free APE: search (α, β, γ) on validation (on ``device``, the CPU by default), then report
    test accuracy with them."""
    grid = grid or default_grid(features)
    on = search_device(device)
    shots, cache = features.cache(refinement.shots)
    if refinement.channels.max() >= features.dim:
        raise ApecliError(f"the refinement's channels exceed the {features.dim}-channel features")
    tri = TriEdge.build(features.classifier, cache.keys, cache.labels, refinement.channels)
    val, test = features.split("val"), features.split("test")
    result = search(tri, val.features, val.labels, grid, progress, device=on)  # refuses an empty split
    logits = tri.logits(test.features, result.alpha, result.beta, result.gamma)
    return scored("training-free", features, shots, result.accuracy, predicted(logits), result,
                  channels=refinement.channels, alpha=result.alpha, beta=result.beta, gamma=result.gamma,
                  device=on.type)


def evaluate_training_free_over_k(
    features: FeatureSet,
    ks: Sequence[int],
    shots: int | None = None,
    grid: SearchGrid | None = None,
    progress: Progress | None = None,
    device: str | None = None,
) -> Evaluation:
    """Training-free APE with k chosen on validation too: for each k of ``ks`` in turn, the top k
    channels of one criterion (APE's prior refinement, the dataset's weights) and the search over
    ``grid``; the k of greatest validation accuracy wins, the first of equal ones (as in the grid).
    The evaluation records every k tried (``k_tried``) with its best validation accuracy
    (``k_val_accuracy``)."""
    from apecli.refine import select_channels, top_channels

    if not ks:
        raise ApecliError("give at least one k to choose among")
    outside = [k for k in ks if not 1 <= k <= features.dim]
    if outside:  # refused before any search runs
        raise ApecliError(f"k must be between 1 and the feature width {features.dim}, got {outside[0]}")
    refinement = select_channels(features, k=ks[0], shots=shots)
    best, accuracies = None, []
    for turn, k in enumerate(ks):
        report = None if progress is None else (
            lambda done, total, turn=turn: progress(turn * total + done, len(ks) * total))
        evaluation = evaluate_training_free(
            features, replace(refinement, channels=top_channels(refinement.criterion, k)), grid, report, device)
        accuracies.append(evaluation.val_accuracy)
        if best is None or evaluation.val_accuracy > best.val_accuracy:
            best = evaluation
    return replace(best, extra={**best.extra, "k_tried": list(ks), "k_val_accuracy": accuracies})


def evaluate_training_required(
    features: FeatureSet, fitted: "FitResult", grid: SearchGrid | None = None, progress: Progress | None = None,
    device: str | None = None,
) -> Evaluation:
    """APE-T: search (α, β) on validation for a fitted adapter (no γ; on ``device``, the CPU by default),
    then report test accuracy."""
    grid = grid or default_grid(features)
    on = search_device(device)
    adapter = fitted.adapter
    model = adapter.cache_model(features)
    val, test = features.split("val"), features.split("test")
    result = model.search(val.features, val.labels, grid, progress, device=on)
    logits = model.logits(test.features, result.alpha, result.beta)
    return scored("training-required", features, adapter.shots, result.accuracy, predicted(logits),
                  result, channels=adapter.channels, alpha=result.alpha, beta=result.beta, best_epoch=fitted.best_epoch,
                  epochs=fitted.settings.epochs, trained_on_views=fitted.trained_on_views, device=on.type)


def save_evaluation(
    evaluation: Evaluation, parents: list[store.Artifact], destination: Path | Callable[[str], Path]
) -> store.Artifact:
    """Write an evaluation artifact: the results, the channels used and the grid of validation hits."""
    arrays: dict[str, np.ndarray] = {}
    if evaluation.channels is not None:
        arrays["channels"] = evaluation.channels
    if evaluation.search is not None:
        arrays["search/val_correct"] = evaluation.search.correct
        arrays["search/betas"] = evaluation.search.grid.betas
        arrays["search/alphas"] = evaluation.search.grid.alphas
        arrays["search/gammas"] = evaluation.search.grid.gammas
    for name, value in evaluation.learned.items():
        arrays[f"learned/{name}"] = value
    if evaluation.test_predictions is not None:
        arrays["test/predictions"] = evaluation.test_predictions
    return store.write_artifact(destination, KIND, arrays, evaluation.summary(), parents)


def evaluate_artifact(
    artifact: store.Artifact,
    mode: str,
    shots: int | None = None,
    grid: SearchGrid | None = None,
    progress: Progress | None = None,
    device: str | None = None,
    val_shots: int | None = None,
    ks: Sequence[int] | None = None,
) -> Evaluation:
    """Evaluate a features, refinement or adapter artifact in ``mode``.

    Training-free on a features artifact refines first, with the dataset's weights and its default k,
    or the k of ``ks`` chosen on validation (:func:`evaluate_training_free_over_k`); every
    mode on a refinement uses the cache it was made from; training-required needs an adapter. Values
    fixed in ``grid`` (:meth:`SearchGrid.fixing`) replace the search of their axis; a mode refuses one it
    does not have (GIVEN). ``device`` (the CPU by default) runs the searches of the modes that have one,
    ProKeR's included, and Tip-Adapter-F's training; zero-shot and GDA compute on the CPU.
    ``val_shots`` chooses on that many validation images per class
    (:meth:`FeatureSet.with_validation_shots`) instead of the whole split, and is recorded; an adapter is
    evaluated on the validation images it was fitted with.
    """
    from apecli.features import load_features
    from apecli.refine import load_refinement, select_channels
    from apecli.training_required import load_fit

    if mode not in MODES:
        raise ApecliError(f"unknown mode '{mode}'; choose one of {', '.join(MODES)}")
    if device not in (None, "cpu"):
        from apecli.devices import torch_device

        torch_device(device)  # a mistyped device is refused by every mode, even one that computes on the CPU
    if ks and mode != "training-free":
        raise ApecliError(f"mode {mode} has no k to choose; k is the channel count of training-free APE"
                          + (" (an adapter's is set when fitting: apecli fit --k)" if mode == "training-required" else ""))
    if ks and artifact.kind == "refinement":
        raise ApecliError(f"{artifact.path}: a refinement has chosen its k ({artifact.metadata.get('k')}); "
                          "evaluate its features artifact to choose k on validation")
    given = grid.given if grid is not None else {}
    unknown = [name for name in given if name not in GIVEN[mode]]
    if unknown:
        symbols = {"alpha": "α", "beta": "β", "gamma": "γ"}
        takes = ", ".join(symbols[name] for name in GIVEN[mode])
        raise ApecliError(f"mode {mode} has no {symbols[unknown[0]]} to give"
                          + (f"; it takes {takes}" if takes else "; it chooses nothing on validation"))
    if (mode == "training-required") != (artifact.kind == "adapter"):
        raise ApecliError(
            f"{artifact.path}: mode training-required evaluates a fitted adapter (from apecli fit), and only it"
            if mode == "training-required"
            else f"{artifact.path}: is a fitted adapter; evaluate it with --mode training-required"
        )
    if artifact.kind == "adapter":
        fitted, features = load_fit(artifact)
        _check_shots(artifact, fitted.adapter.shots, shots)
        if val_shots is not None and val_shots != fitted.settings.val_shots:
            raise ApecliError(f"{artifact.path}: was fitted on {validation_images(fitted.settings.val_shots)}, "
                              f"where it chose its epoch; evaluate it on the same, or fit again with --val-shots {val_shots}")
        val_shots = fitted.settings.val_shots
        features = features.with_validation_shots(val_shots)
        return recorded(evaluate_training_required(features, fitted, grid, progress, device), val_shots)
    refinement = None
    if artifact.kind == "refinement":
        refinement, features = load_refinement(artifact)
        _check_shots(artifact, refinement.shots, shots)
        shots = refinement.shots  # every mode evaluates the cache the refinement was made from
    elif artifact.kind == "features":
        features = load_features(artifact)
    else:
        raise ApecliError(f"{artifact.path}: is an artifact of kind '{artifact.kind}'; eval reads features, a refinement or an adapter")
    features = features.with_validation_shots(val_shots)
    if mode == "zero-shot":
        return recorded(evaluate_zero_shot(features), val_shots)
    if mode != "training-free":
        from apecli import baselines

        if mode == "tip-adapter":
            evaluation = baselines.evaluate_tip_adapter(features, shots, grid, progress, device)
        elif mode == "tip-adapter-f":
            evaluation = baselines.evaluate_tip_adapter_f(features, shots, grid, device=device)
        elif mode == "gda":
            evaluation = baselines.evaluate_gda(features, shots, grid)
        else:
            evaluation = baselines.evaluate_proker(features, shots, grid, progress, device)
        return recorded(evaluation, val_shots)
    if ks and len(ks) > 1:
        return recorded(evaluate_training_free_over_k(features, ks, shots, grid, progress, device), val_shots)
    if refinement is None:
        refinement = select_channels(features, ks[0] if ks else None, shots=shots)
    return recorded(evaluate_training_free(features, refinement, grid, progress, device), val_shots)


def settings_tried(mode: str, grid: SearchGrid) -> int:
    """How many settings ``mode`` tries on validation with ``grid`` (a given value counts once): APE
    β × α × γ; APE-T and the Tip-Adapters β × α; GDA its α values; ProKeR its β values × λ values;
    zero-shot none."""
    from apecli import baselines

    betas, alphas, _ = grid.shape
    if mode == "zero-shot":
        return 0
    if mode == "training-free":
        return grid.size
    if mode == "gda":
        return alphas if "alpha" in grid.given else len(baselines.GDA_ALPHAS)
    if mode == "proker":
        return (betas if "beta" in grid.given else baselines.PROKER_BETAS) * len(baselines.PROKER_LAMBDAS)
    return betas * alphas


def validation_images(val_shots: int | None) -> str:
    """Which validation images a choice was made on, in words."""
    return "the whole validation split" if val_shots is None else f"{val_shots} validation images a class"


def recorded(evaluation: Evaluation, val_shots: int | None) -> Evaluation:
    """``evaluation``, recording how many validation images per class it chose on when it was not all."""
    return evaluation if val_shots is None else replace(evaluation, extra={**evaluation.extra, "val_shots": val_shots})


def _check_shots(artifact: store.Artifact, used: int, asked: int | None) -> None:
    if asked is not None and asked != used:
        raise ApecliError(f"{artifact.path}: was made from the {used}-shot cache, not {asked}; re-run it with --shots {asked}")
