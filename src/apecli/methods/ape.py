"""Training-free APE (Zhu et al., ICCV 2023, "Not All Features Matter"): the tri-edge classifier on the
channels that prior refinement keeps, with α, β and γ searched on validation (APE, sections 3.2-3.3).

The channels are the top k of APE's criterion (:mod:`apecli.methods.criterion`) with the dataset's
weights, or those a refinement chose; k is the dataset's (scaled to the feature width), or the best on
validation among several (each k its own search; of equally good k, the first given).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from apecli.checks import check_k
from apecli.errors import ApecliError, SettingError
from apecli.methods.base import Method, Options, Progress, Task
from apecli.methods.criterion import channel_criterion, top_channels
from apecli.methods.grid import SearchGrid, SearchResult, dataset_grid
from apecli.methods.tri_edge import TriEdge, search
from apecli.presets import preset_for


@dataclass(frozen=True)
class Searched:
    """The tri-edge classifier of one set of channels and its search on validation."""

    tri: TriEdge
    result: SearchResult


def search_channels(task: Task, channels: np.ndarray, grid: SearchGrid, progress: Progress | None,
                    device) -> Searched:
    """The tri-edge classifier on ``channels`` and its grid search on the task's validation split."""
    tri = TriEdge.build(task.text, task.keys, task.key_labels, channels)
    return Searched(tri, search(tri, task.val_features, task.val_labels, grid, progress, device=device))


class APE(Method):
    name = "training-free"
    label = "APE"
    given = ("alpha", "beta", "gamma")
    chooses_k = True
    float64 = True
    task_state = ("text", "keys", "key_labels")

    def __init__(self, grid: SearchGrid | None = None, k: int | None = None, ks: Sequence[int] | None = None,
                 channels: np.ndarray | None = None, progress: Progress | None = None) -> None:
        """``channels`` chosen already (a refinement's), else the top ``k`` of the criterion (default: the
        dataset's k), or the best on validation among ``ks``, which the evaluation then records."""
        if ks is not None and not ks:
            raise SettingError("ks", ks, "give at least one k to choose among")
        self.grid, self.k, self.ks, self.chosen, self.progress = grid, k, ks, channels, progress

    @classmethod
    def create(cls, options: Options) -> "APE":
        several = options.ks is not None and len(options.ks) > 1
        return cls(options.grid, None if several or not options.ks else options.ks[0],
                   options.ks if several else None, options.channels, options.progress)

    @classmethod
    def settings_tried(cls, grid: SearchGrid) -> int:
        return grid.size

    def candidates(self, task: Task) -> list[np.ndarray]:
        """The channel sets to search: the given ones, or the top k of the criterion for each k."""
        if self.chosen is not None:
            if self.chosen.max() >= task.dim:
                raise ApecliError(f"the refinement's channels exceed the {task.dim}-channel features")
            return [np.asarray(self.chosen)]
        preset = preset_for(task.dataset)
        ks = self.ks or (self.k if self.k is not None else preset.scaled_k(preset.k_training_free, task.dim),)
        for k in ks:  # refused before any search runs
            check_k(k, task.dim)
        criterion = channel_criterion(task.text, task.keys, task.key_labels, preset.w_training_free)
        return [top_channels(criterion, k) for k in ks]

    def fit(self, task: Task) -> dict[str, float]:
        import torch

        on = torch.device(task.device)
        grid = self.grid or dataset_grid(task.dataset)
        candidates = self.candidates(task)
        best, accuracies = None, []
        for turn, channels in enumerate(candidates):
            report = self.progress if self.progress is None or len(candidates) == 1 else (
                lambda done, total, turn=turn: self.progress(turn * total + done, len(candidates) * total))
            found = search_channels(task, channels, grid, report, on)
            accuracies.append(found.result.accuracy)
            if best is None or found.result.accuracy > best.result.accuracy:
                best = found
        self.tri, result = best.tri, best.result
        self.alpha, self.beta, self.gamma = result.alpha, result.beta, result.gamma
        self.channels, self.val_accuracy, self.search = self.tri.channels, result.accuracy, result
        self.details = {"device": on.type}
        if self.ks is not None:
            self.details.update(k_tried=list(self.ks), k_val_accuracy=accuracies)
        return {"alpha": result.alpha, "beta": result.beta, "gamma": result.gamma}

    def logits(self, features: np.ndarray) -> np.ndarray:
        return self.tri.logits(features, self.alpha, self.beta, self.gamma)

    def state(self) -> dict[str, np.ndarray]:
        return {"channels": np.asarray(self.channels, dtype=np.int64)}

    @classmethod
    def restore(cls, hyperparameters: dict[str, float], state: dict[str, np.ndarray]) -> "APE":
        method = cls()
        text = state["text"]
        channels = checked_channels(state["channels"], text.shape[1])
        method.tri = TriEdge.build(text, state["keys"], state["key_labels"], channels)
        method.channels = channels
        method.alpha, method.beta, method.gamma = (hyperparameters[name] for name in ("alpha", "beta", "gamma"))
        return method


def checked_channels(channels: np.ndarray, dim: int) -> np.ndarray:
    """``channels`` when they are indices of ``dim``-channel features (one or more), as int64."""
    channels = np.asarray(channels)
    if (channels.ndim != 1 or channels.size == 0 or not np.issubdtype(channels.dtype, np.integer)
            or channels.min() < 0 or channels.max() >= dim):
        raise ApecliError(f"its channels ({channels.dtype}, shape {channels.shape}) are not indices of "
                          f"{dim}-channel features")
    return channels.astype(np.int64)
