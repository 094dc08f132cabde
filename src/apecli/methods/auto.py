"""``auto``: the method chosen for the data at hand, on validation. Every candidate (each registered
method that evaluates a features artifact, or those named) runs its own fit on the same task, its own
validation search included; the one of the best validation accuracy is kept (of equal ones, the one
whose fit took least time), and only it is scored on test. The evaluation records each candidate's
validation accuracy and the seconds its fit took. Nothing is chosen on test.

A prediction rebuilds the chosen method from its own state, which the evaluation stores as that method
stores it, beside the chosen method's name.
"""

from __future__ import annotations

import time
from dataclasses import replace
from typing import Any, Callable, ClassVar, Mapping, Sequence

import numpy as np

from apecli.errors import ApecliError, SettingError, first_line
from apecli.methods.base import TASK_ARRAYS, Method, Options, Task
from apecli.methods.scores import count_correct, percent

CHOSEN = "auto_chosen"  # the state array naming the chosen method (its name, UTF-8 bytes)


def candidate_methods(names: Sequence[str] | None = None) -> list[type[Method]]:
    """The methods ``auto`` chooses among: those named (each checked), or every registered method that
    evaluates a features artifact."""
    known = Auto.known()
    if names is None:
        return [method for method in known.values() if method is not Auto and "features" in method.reads]
    chosen = []
    for name in dict.fromkeys(names):
        method = Auto.lookup(name)  # an unknown name: one error listing the modes
        if method is Auto or "features" not in method.reads:
            usable = [other for other, m in known.items() if m is not Auto and "features" in m.reads]
            raise SettingError("candidates", name, f"auto cannot choose {name}: it "
                               + ("is auto itself" if method is Auto else "does not evaluate a features artifact")
                               + f"; candidates are {', '.join(usable)}")
        chosen.append(method)
    if not chosen:
        raise SettingError("candidates", "", "give at least one candidate method")
    return chosen


class Auto(Method):
    name = "auto"
    label = "auto"
    reads = ("features",)
    float64 = True  # a candidate may compute in float64
    task_state = TASK_ARRAYS  # whichever the chosen method takes, each read when first used
    # The registry's own lookups, which it gives this class as it lists it (the registry imports every
    # method; a method importing the registry would close a cycle).
    known: ClassVar[Callable[[], Mapping[str, type[Method]]]]
    lookup: ClassVar[Callable[[str], type[Method]]]

    def __init__(self, candidates: Sequence[str] | None = None, options: Options | None = None) -> None:
        self.candidates = tuple(candidates) if candidates is not None else None
        self.options = replace(options or Options(), progress=None, epoch_progress=None)
        candidate_methods(self.candidates)  # a mistyped name is refused before anything runs

    @classmethod
    def create(cls, options: Options) -> "Auto":
        return cls(options.candidates, options)

    @classmethod
    def outdated(cls, summary: Mapping[str, Any]) -> str | None:
        chosen = cls.known().get(str(summary.get("chosen")))
        details = summary.get("chosen_details")
        return None if chosen is None else chosen.outdated(details if isinstance(details, Mapping) else {})

    def fit(self, task: Task) -> dict[str, float]:
        tried, left_out = [], []
        for method_type in candidate_methods(self.candidates):
            method = method_type.create(self.options)
            started = time.perf_counter()
            try:
                hyperparameters = {str(name): float(value) for name, value in dict(method.fit(task)).items()}
            except ApecliError as error:  # this candidate cannot fit this task (say, too few shots): the others can
                left_out.append(f"auto left out {method.name}: {first_line(error)}")
                continue
            seconds = time.perf_counter() - started
            accuracy = method.val_accuracy
            if accuracy is None:
                accuracy = percent(count_correct(np.asarray(method.logits(task.val_features)), task.val_labels),
                                   task.val_labels.shape[0])
            tried.append((float(accuracy), seconds, method, hyperparameters))
        if not tried:
            raise ApecliError("auto has no candidate that fits this task: " + "; ".join(left_out))
        best = max(tried, key=lambda entry: (entry[0], -entry[1]))  # the best, then the quickest of equals
        accuracy, _, self.chosen, hyperparameters = best
        self.val_accuracy, self.search, self.channels = accuracy, self.chosen.search, self.chosen.channels
        self.logit_scale = type(self.chosen).logit_scale
        self.details = {"chosen": self.chosen.name,
                        "candidates": [{"mode": method.name, "val_accuracy": acc, "seconds": round(seconds, 3)}
                                       for acc, seconds, method, _ in tried],
                        "chosen_details": dict(self.chosen.details)}
        self.notes = (f"auto chose {self.chosen.label or self.chosen.name} of {len(tried)} candidates, by its "
                      f"validation accuracy ({accuracy:.2f}%)", *left_out, *self.chosen.notes)
        return hyperparameters

    def logits(self, features: np.ndarray) -> np.ndarray:
        return self.chosen.logits(features)

    def state(self) -> dict[str, np.ndarray]:
        state = {str(name): np.asarray(value) for name, value in self.chosen.state().items()}
        if CHOSEN in state:
            raise ApecliError(f"method {self.chosen.name} keeps a state named '{CHOSEN}', which auto keeps itself")
        return {**state, CHOSEN: np.frombuffer(self.chosen.name.encode(), dtype=np.uint8)}

    @classmethod
    def restore(cls, hyperparameters: dict[str, float], state: Mapping[str, np.ndarray]) -> Method:
        """The chosen method, rebuilt from its own state."""
        if CHOSEN not in state:
            raise ApecliError("an auto evaluation that does not name the method it chose")
        name = bytes(np.asarray(state[CHOSEN], dtype=np.uint8)).decode("utf-8", errors="replace")
        method = cls.known().get(name)
        if method is None or method is Auto:
            said = name if name.isprintable() and len(name) <= 64 else "a name no mode has"
            raise ApecliError(f"auto chose '{said}', which is not a method installed here")
        return method.restore(hyperparameters, state)
