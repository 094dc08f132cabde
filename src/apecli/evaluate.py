"""The eval stage: a method of the registry fitted on a feature set's few-shot task, its hyperparameters
chosen on validation only, then scored once on test.

:func:`evaluate_method` evaluates any :class:`~apecli.methods.Method`; :func:`evaluate_artifact` takes
a stored features, refinement or adapter artifact and a mode's name, as ``apecli eval`` does. The record
it returns and writes is :mod:`apecli.kinds.evaluation`'s.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Sequence

import numpy as np

from apecli import store
from apecli.devices import resolve
from apecli.errors import InputError, Setting, SettingError, Step
from apecli.kinds.evaluation import CHANNELS, NAMED, RESERVED, SYMBOLS, Evaluation, class_accuracy, save_evaluation
from apecli.kinds.features import FeatureSet, load_features
from apecli.kinds.refinement import RefinementHeader
from apecli.methods import registry
from apecli.methods.ape import APE
from apecli.methods.ape_t import APET, FitResult
from apecli.methods.auto import Auto
from apecli.methods.base import Method, Options, Progress, Task, at_least_float32
from apecli.methods.grid import SearchGrid, dataset_grid
from apecli.methods.scores import count_correct, percent, predicted, zero_shot_logits
from apecli.methods.zero_shot import ZeroShot

__all__ = ["Evaluation", "class_accuracy", "default_grid", "evaluate_artifact", "evaluate_method",
           "evaluate_training_free", "evaluate_training_free_over_k", "evaluate_training_required",
           "evaluate_zero_shot", "save_evaluation", "validation_images", "zero_shot_predictions"]


def default_grid(features: FeatureSet) -> SearchGrid:
    """The search grid the authors configured for the feature set's dataset."""
    return dataset_grid(features.dataset)


def zero_shot_predictions(features: FeatureSet, split: str) -> np.ndarray:
    """Zero-shot CLIP's prediction for each image of a split."""
    return predicted(zero_shot_logits(features.split(split).features, features.classifier))


def evaluate_method(features: FeatureSet, method: Method, shots: int | None = None, val_shots: int | None = None,
                    device: str | None = None) -> Evaluation:
    """Fit ``method`` on the ``shots``-shot task (default: the largest cache), choosing on the whole
    validation split or on ``val_shots`` images a class (recorded), on ``device`` (the CPU by default),
    then score it once on the test split."""
    return scored(method, features, shots, val_shots, resolve(device, type(method).float64))


def scored(method: Method, features: FeatureSet, shots: int | None, val_shots: int | None, on: str) -> Evaluation:
    """:func:`evaluate_method` on a device resolved already."""
    uses_cache = type(method).uses_cache
    task = features.task(shots, val_shots, on) if uses_cache else _cacheless_task(features, val_shots, on)
    hyperparameters = {str(name): float(value) for name, value in dict(method.fit(task)).items()}
    clashing = sorted(set(hyperparameters) & (RESERVED | set(method.details)))
    if clashing:
        raise SettingError("mode", method.name, f"method {method.name} returned a hyperparameter named "
                                                f"'{clashing[0]}', a name its evaluation reports otherwise")
    test = features.split("test")
    test_predictions = np.asarray(predicted(np.asarray(method.logits(at_least_float32(test.features)))), dtype=np.int64)
    val_accuracy = method.val_accuracy
    if val_accuracy is None:
        val_accuracy = percent(count_correct(np.asarray(method.logits(task.val_features)), task.val_labels),
                               task.val_labels.shape[0])
    extra = {**{name: value for name, value in hyperparameters.items() if name not in NAMED}, **dict(method.details)}
    if val_shots is not None:
        extra["val_shots"] = val_shots
    zero_shot = (percent(count_correct(zero_shot_logits(x, features.classifier), labels), labels.shape[0])
                 for x, labels in ((task.val_features, task.val_labels), (test.features, test.labels)))
    learned = {name: np.asarray(value) for name, value in method.state().items()}
    channels = method.channels if method.channels is not None else learned.get(CHANNELS)
    if channels is not None and CHANNELS in learned and not np.array_equal(channels, learned[CHANNELS]):
        raise SettingError("mode", method.name, f"method {method.name} reports other channels than its state holds")
    return Evaluation(method.name, features.dataset, *zero_shot, float(val_accuracy),
                      percent(int((test_predictions == test.labels).sum()), test.labels.shape[0]),
                      task.shots if uses_cache else None, *(hyperparameters.get(name) for name in NAMED),
                      channels=channels, search=method.search, extra=extra, learned=learned,
                      test_predictions=test_predictions, test_class_accuracy=class_accuracy(test_predictions, test.labels),
                      hyperparameters=hyperparameters, notes=notes_of(method))


def notes_of(method: Method) -> tuple[str, ...]:
    """What a fitted method says a careful user should know, and the searched values it chose at the top
    of their grid, one line each."""
    notes = method.notes
    if isinstance(notes, str) or not all(isinstance(note, str) for note in notes):
        raise SettingError("mode", method.name, f"method {method.name} gave notes that are not a sequence of strings")
    edges = method.search.edges() if method.search is not None else []
    return tuple(dict.fromkeys(" ".join(note.split()) for note in (*notes, *edges)))


def _cacheless_task(features: FeatureSet, val_shots: int | None, on: str) -> Task:
    """The task of a feature set without a few-shot cache, for a method that needs none (zero-shot CLIP)."""
    val = features.with_validation_shots(val_shots).split("val")
    empty = np.zeros((0, features.dim), dtype=np.float32)
    return Task(features.classifier, empty, np.zeros(0, np.int64), val.features, val.labels, features.class_names, 0,
                features.seed, on, None, features.dataset, features.name)


def evaluate_zero_shot(features: FeatureSet) -> Evaluation:
    """CLIP's zero-shot accuracy: the argmax of 100 · f Wᵀ."""
    return scored(ZeroShot(), features, None, None, "cpu")


def evaluate_training_free(features: FeatureSet, refinement, grid: SearchGrid | None = None,
                           progress: Progress | None = None, device: str | None = None) -> Evaluation:
    """Training-free APE on a refinement's channels: (α, β, γ) searched on validation (on ``device``, the
    CPU by default), then test accuracy with them."""
    return evaluate_method(features, APE(grid, channels=refinement.channels, progress=progress), refinement.shots,
                           device=device)


def evaluate_training_free_over_k(features: FeatureSet, ks: Sequence[int], shots: int | None = None,
                                  grid: SearchGrid | None = None, progress: Progress | None = None,
                                  device: str | None = None) -> Evaluation:
    """Training-free APE with k chosen on validation too: for each k of ``ks`` in turn, the top k channels
    of one criterion (the dataset's weights) and the search over ``grid``; the k of greatest validation
    accuracy wins, the first of equal ones. The evaluation records every k tried (``k_tried``) with its
    best validation accuracy (``k_val_accuracy``)."""
    return evaluate_method(features, APE(grid, ks=tuple(ks), progress=progress), shots, device=device)


def evaluate_training_required(features: FeatureSet, fitted: FitResult, grid: SearchGrid | None = None,
                               progress: Progress | None = None, device: str | None = None) -> Evaluation:
    """APE-T: (α, β) searched on validation for a fitted adapter (no γ; on ``device``, the CPU by default),
    then test accuracy."""
    return evaluate_method(features, APET(grid, fitted, progress=progress), fitted.adapter.shots, device=device)


def evaluate_artifact(
    artifact: store.Artifact,
    mode: str,
    shots: int | None = None,
    grid: SearchGrid | None = None,
    progress: Progress | None = None,
    device: str | None = None,
    val_shots: int | None = None,
    ks: Sequence[int] | None = None,
    candidates: Sequence[str] | None = None,
) -> Evaluation:
    """Evaluate a features, refinement or adapter artifact with the method ``mode`` names.

    A method evaluates the kinds it reads (a fitted adapter: APE-T's); on a refinement every method uses
    the cache it was made from, and APE its channels. APE on a features artifact takes the dataset's k, or
    the best on validation of ``ks``. Values fixed in ``grid`` (:meth:`SearchGrid.fixing`) replace the
    search of their axis, and a method refuses one it does not take. ``device`` (the CPU by default)
    runs the searches and training of the methods that have them. ``val_shots`` chooses on that many
    validation images per class (:meth:`FeatureSet.with_validation_shots`) instead of the whole split,
    and is recorded; an adapter is evaluated on the validation images it was fitted with. ``candidates``
    are the modes ``auto`` chooses among (default: every one that evaluates a features artifact).
    """
    method = registry.get(mode)
    on = resolve(device, method.float64)  # a mistyped device is refused by every mode
    if ks and not method.chooses_k:
        choosers = [chooser.label for chooser in registry.methods().values() if chooser.chooses_k]
        raise SettingError("ks", tuple(ks), f"mode {mode} has no k to choose; k is the channel count of "
                                            f"{' and '.join(choosers)}" + (
            f" (an adapter's is set when fitting it: {Step('fit')} with {Setting('k')})" if "adapter" in method.reads
            else ""))
    if ks and artifact.kind == "refinement":
        raise InputError(artifact.path, f"a refinement has chosen its k ({RefinementHeader.of(artifact).k}); evaluate "
                                        "its features artifact to choose k on validation")
    if candidates is not None and method is not Auto:
        raise SettingError("candidates", ",".join(candidates), f"{Setting('candidates')} are the modes that "
                                                               f"{Setting('mode', Auto.name)} chooses among; mode "
                                                               f"{mode} chooses none")
    given = grid.given if grid is not None else {}
    unknown = [name for name in given if name not in method.given]
    if unknown:
        takes = ", ".join(SYMBOLS[name] for name in method.given)
        raise SettingError(unknown[0], given[unknown[0]], f"mode {mode} has no {SYMBOLS[unknown[0]]} to give"
                           + (f"; it takes {takes}" if takes else "; it takes none of α, β, γ"))
    if artifact.kind not in method.reads:
        raise _unread(artifact, method)
    options = Options(grid, tuple(ks) if ks else None, progress=progress,
                      candidates=tuple(candidates) if candidates is not None else None)
    if artifact.kind == "adapter":
        from apecli.kinds.adapter import load_fit

        fitted, features = load_fit(artifact)
        _check_shots(artifact, fitted.adapter.shots, shots)
        if val_shots is not None and val_shots != fitted.settings.val_shots:
            raise SettingError("val_shots", val_shots, f"{artifact.path}: was fitted on "
                               f"{validation_images(fitted.settings.val_shots)}, where it chose its epoch; evaluate it "
                               f"on the same, or fit again with {Setting('val_shots', val_shots)}")
        options, shots, val_shots = replace(options, fitted=fitted), fitted.adapter.shots, fitted.settings.val_shots
    elif artifact.kind == "refinement":
        from apecli.kinds.refinement import load_refinement

        refinement, features = load_refinement(artifact)
        _check_shots(artifact, refinement.shots, shots)
        options, shots = replace(options, channels=refinement.channels), refinement.shots
    else:
        features = load_features(artifact)
    return scored(method.create(options), features, shots, val_shots, on)


def _unread(artifact: store.Artifact, method: type[Method]) -> InputError:
    """Why ``method`` does not evaluate ``artifact``, in one error."""
    readers = [other.name for other in registry.methods().values() if artifact.kind in other.reads]
    if method.reads == ("adapter",):
        return InputError(artifact.path, f"mode {method.name} evaluates a fitted adapter (from {Step('fit')}), and only it")
    if artifact.kind == "adapter" and readers:
        return InputError(artifact.path, f"is a fitted adapter; evaluate it with {Setting('mode', readers[0])}")
    return InputError(artifact.path, f"is an artifact of kind '{artifact.kind}'; eval reads "
                                     f"{', '.join(method.reads)}")


def validation_images(val_shots: int | None) -> str:
    """Which validation images a choice was made on, in words."""
    return "the whole validation split" if val_shots is None else f"{val_shots} validation images a class"


def _check_shots(artifact: store.Artifact, used: int, asked: int | None) -> None:
    if asked is not None and asked != used:
        raise SettingError("shots", asked, f"{artifact.path}: was made from the {used}-shot cache, not {asked}; "
                                           f"re-run it with {Setting('shots', asked)}")
