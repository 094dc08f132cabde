"""What a method is: the :class:`Task` it learns from, and the :class:`Method` interface every method
implements, the built-in ones and those of other packages alike.

A method learns from a task (``fit``), scores features (``logits``), says which arrays a prediction needs
(``state``) and is rebuilt from them (``restore``). Everything else about it is optional and has a
default: what it is called in tables (``label``), which hyperparameters a user may give instead of
having them searched (``given``), which Task arrays its ``restore`` needs from the evaluated features
(``task_state``, so that they are not stored twice), and what its fit reports besides its
hyperparameters (``val_accuracy``, ``search``, ``channels``, ``details``) and what a careful user should
know about it (``notes``).
"""

from __future__ import annotations

from dataclasses import dataclass
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Mapping, Sequence

import numpy as np

from apecli.errors import ApecliError

if TYPE_CHECKING:
    from apecli.methods.grid import SearchGrid, SearchResult

Progress = Callable[[int, int], None]  # steps done, steps in all
EpochProgress = Callable[[int, int, float, float], None]  # epoch, epochs, mean loss, val accuracy
TASK_ARRAYS = ("text", "keys", "key_labels", "views")  # the arrays ``task_state`` may name


class Task:
    """The few-shot problem a method learns from: one feature set's K-shot cache and its validation split.

    Arrays are numpy, one row per item, in float32 (float64 where the features were stored so):
    ``text`` C × D (rows L2-normalised), ``keys`` N × D with ``key_labels`` (N,), ``views`` V × N × D
    (float32; None where none are stored; read on first use), ``val_features`` and ``val_labels`` (already
    reduced to a few images a class where that was asked). ``prompts`` (M × D, rows L2-normalised) are the
    text embeddings of every prompt of every class whose mean made ``text``, ``prompt_labels`` (M,) their
    classes in order; a feature set that kept none gives one a class, the classifier's own row
    (``prompts_kept`` says which). ``device`` is where a method may compute (``cpu``, ``cuda``, ``cuda:1``),
    resolved and checked already; ``dataset`` selects per-dataset defaults.
    """

    def __init__(self, text: np.ndarray, keys: np.ndarray, key_labels: np.ndarray, val_features: np.ndarray,
                 val_labels: np.ndarray, class_names: Sequence[str], shots: int, seed: int = 1, device: str = "cpu",
                 views: "np.ndarray | Callable[[], np.ndarray | None] | None" = None, dataset: str | None = None,
                 source: str = "the task", prompts: np.ndarray | None = None,
                 prompt_labels: np.ndarray | None = None) -> None:
        self.text = at_least_float32(text)
        self.keys = at_least_float32(keys)
        self.key_labels = np.asarray(key_labels, dtype=np.int64)
        self.val_features = at_least_float32(val_features)
        self.val_labels = np.asarray(val_labels, dtype=np.int64)
        self.class_names = tuple(class_names)
        self.shots, self.seed, self.device, self.dataset, self.source = int(shots), int(seed), device, dataset, source
        self._views, self._views_read = views, False
        self.prompts_kept = prompts is not None
        self.prompts = self.text if prompts is None else at_least_float32(prompts)
        self.prompt_labels = (np.arange(self.text.shape[0]) if prompt_labels is None
                              else np.asarray(prompt_labels, dtype=np.int64))

    @property
    def views(self) -> np.ndarray | None:
        """The augmented views of the cache's images as float32 (V × N × D), or None."""
        if not self._views_read:
            views = self._views() if callable(self._views) else self._views
            if views is not None:
                views = np.asarray(views, dtype=np.float32)
                if not np.isfinite(views).all():
                    raise ApecliError(f"{self.source}: the {self.shots}-shot views contain NaN or infinite values")
            self._views, self._views_read = views, True
        return self._views

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def dim(self) -> int:
        return int(self.text.shape[1])


def at_least_float32(array: np.ndarray) -> np.ndarray:
    """Floating rows in float32, or float64 where they are so (float16 goes up to float32 exactly)."""
    array = np.asarray(array)
    return array if array.dtype == np.float64 else array.astype(np.float32, copy=False)


@dataclass(frozen=True)
class Options:
    """What an evaluation may set for a method besides its task; each built-in method takes what it uses
    (:meth:`Method.create`), and a method from another package none of it.

    ``grid``: the search grid, with values given instead of searched (None: the dataset's); ``ks``: channel
    counts to choose among (APE); ``channels``: channels chosen already (a refinement's); ``fitted``: a
    fitted APE-T adapter to evaluate; ``progress`` and ``epoch_progress``: callbacks of the search and the
    training."""

    grid: "SearchGrid | None" = None
    ks: tuple[int, ...] | None = None
    channels: np.ndarray | None = None
    fitted: Any = None
    progress: Progress | None = None
    epoch_progress: EpochProgress | None = None
    candidates: tuple[str, ...] | None = None


class Method:
    """A few-shot classification method over a task's features.

    Subclasses implement :meth:`fit`, :meth:`logits`, :meth:`state` and :meth:`restore`; see
    docs/plugins.md. A method is registered by the class attribute ``name`` (built-in methods) or by the
    name of its ``apecli.methods`` entry point (methods of other packages): that name is its ``--mode``.
    """

    name: ClassVar[str] = ""
    label: ClassVar[str] = ""  # in tables and plots (default: its name)
    given: ClassVar[tuple[str, ...]] = ()  # hyperparameters a user may give instead of searched (alpha, beta, gamma)
    reads: ClassVar[tuple[str, ...]] = ("features", "refinement")  # the artifact kinds it evaluates
    task_state: ClassVar[tuple[str, ...]] = ()  # Task arrays restore() takes from the features (TASK_ARRAYS)
    chooses_k: ClassVar[bool] = False  # whether it takes channel counts to choose among (Options.ks)
    uses_cache: ClassVar[bool] = True  # whether it learns from the few-shot cache (else its task's cache is empty)
    float64: ClassVar[bool] = False  # whether it computes in float64 on its device (no Apple GPU, then)
    logit_scale: ClassVar[float] = 1.0  # probabilities are softmax(logit_scale · logits)

    # What a fit reports besides its hyperparameters, for the evaluation's record; a method need not set them.
    val_accuracy: float | None = None  # its own count of the chosen setting's validation accuracy, percent
    search: "SearchResult | None" = None  # the grid it searched, every setting's validation hits
    channels: np.ndarray | None = None  # the feature channels it uses, where it chose some
    details: Mapping[str, Any] = MappingProxyType({})  # more to report (JSON values): best epoch, device, …
    notes: tuple[str, ...] = ()  # one line each that a careful user should read: a degenerate case, a choice at an edge

    @classmethod
    def create(cls, options: Options) -> "Method":
        """An unfitted method configured by an evaluation's ``options`` (a plugin: ``cls()``)."""
        return cls()

    @classmethod
    def settings_tried(cls, grid: "SearchGrid") -> int:
        """How many settings its fit tries on validation with ``grid`` (0: none, or not known)."""
        return 0

    @classmethod
    def outdated(cls, summary: Mapping[str, Any]) -> str | None:
        """Why an evaluation this method recorded (its JSON summary) cannot be used by this version of it,
        or None when it can."""
        return None

    def fit(self, task: Task) -> dict[str, float]:
        """Learn from the few-shot cache; choose any hyperparameters on ``task.val_*``; return them."""
        raise NotImplementedError

    def logits(self, features: np.ndarray) -> np.ndarray:
        """(n, D) L2-normalised features of the task's encoder → (n, C) scores."""
        raise NotImplementedError

    def state(self) -> dict[str, np.ndarray]:
        """The arrays a prediction needs; stored in the evaluation artifact."""
        return {}

    @classmethod
    def restore(cls, hyperparameters: dict[str, float], state: dict[str, np.ndarray]) -> "Method":
        """Rebuild the fitted method from an evaluation artifact (for predict, transfer)."""
        raise NotImplementedError

    def probabilities(self, features: np.ndarray) -> np.ndarray:
        """The softmax of ``logit_scale`` times the logits."""
        from apecli.methods.scores import softmax

        return softmax(self.logit_scale * np.asarray(self.logits(features), dtype=np.float64))
