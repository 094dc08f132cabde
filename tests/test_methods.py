"""The Method interface and the Task: what a method learns from, what an evaluation keeps of it, and how
each built-in method is rebuilt from its evaluation to predict what it predicted."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from apecli import store
from apecli.errors import ApecliError, SettingError
from apecli.evaluate import evaluate_artifact, evaluate_method
from apecli.fitting import fit
from apecli.kinds.adapter import save_fit
from apecli.kinds.evaluation import EvaluationRecord, save_evaluation
from apecli.kinds.features import FewShotCache, save_features
from apecli.methods import Method, Task
from apecli.methods.ape_t import FitSettings
from apecli.methods.grid import SearchGrid
from apecli.methods.registry import BUILT_IN
from apecli.predict import load_classifier
from apecli.synthetic import synthetic_features

GRID = SearchGrid((7.0, 7.0, 1.0), (6, 5, 3))


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    data = synthetic_features(num_classes=5, dim=24, shots=(2, 4), val_per_class=8, test_per_class=10, views=3,
                              image_noise=1.4, seed=21)
    return save_features(data, store.in_store(tmp_path_factory.mktemp("s"), data.dataset, "features"))


def test_a_task_holds_the_cache_and_the_validation_split_it_was_asked_for(saved):
    task = saved.task(2, val_shots=3)
    _, cache = saved.cache(2)
    np.testing.assert_array_equal(task.keys, cache.keys)
    np.testing.assert_array_equal(task.key_labels, cache.labels)
    assert (task.shots, task.num_classes, task.dim, task.device, task.seed) == (2, 5, 24, "cpu", 21)
    assert task.val_labels.shape == (15,) and np.bincount(task.val_labels).tolist() == [3] * 5
    np.testing.assert_array_equal(task.val_features, saved.with_validation_shots(3).split("val").features)
    assert task.views.shape == (3, 10, 24) and task.views.dtype == np.float32
    assert {array.dtype for array in (task.text, task.keys, task.val_features)} == {np.dtype(np.float32)}


def test_views_are_read_when_first_used_and_float32_whatever_they_are_stored_in(saved, monkeypatch):
    reads = []
    original = store.Artifact.read
    monkeypatch.setattr(store.Artifact, "read", lambda self, name: reads.append(name) or original(self, name))
    from apecli.kinds.features import load_features

    task = load_features(saved.artifact.path).task(4)
    assert "cache/4/views" not in reads  # a method that needs no views reads none
    assert task.views.shape == (3, 20, 24) and reads.count("cache/4/views") == 1
    assert task.views is task.views and reads.count("cache/4/views") == 1  # read once
    _, cache = saved.cache(4)
    wide = replace(saved, caches={4: FewShotCache(cache.keys.astype(np.float64), cache.labels,
                                                  cache.views.astype(np.float64))})
    task = wide.task(4)
    assert task.keys.dtype == np.float64 and task.views.dtype == np.float32  # views as the trainer takes them


class Centroids(Method):
    """A method defined where it is used, registered nowhere."""

    label = "class centroids"

    def fit(self, task: Task) -> dict[str, float]:
        means = np.zeros((task.num_classes, task.dim))
        np.add.at(means, task.key_labels, task.keys)
        self.means = means
        return {"scale": 10.0}

    def logits(self, features):
        return 10.0 * np.asarray(features, dtype=np.float64) @ self.means.T

    def state(self):
        return {"means": self.means}

    @classmethod
    def restore(cls, hyperparameters, state):
        method = cls()
        method.means = state["means"]
        return method


def test_any_method_object_is_evaluated_with_what_every_evaluation_reports(saved):
    evaluation = evaluate_method(saved, Centroids(), shots=2)
    _, cache = saved.cache(2)
    means = np.zeros((5, 24))
    np.add.at(means, cache.labels, cache.keys.astype(np.float64))
    val, test = saved.split("val"), saved.split("test")
    assert evaluation.val_accuracy == pytest.approx(100 * np.mean(np.argmax(val.features @ means.T, 1) == val.labels))
    np.testing.assert_array_equal(evaluation.test_predictions, np.argmax(test.features @ means.T, 1))
    summary = evaluation.summary()
    assert (summary["shots"], summary["scale"], summary["hyperparameters"]) == (2, 10.0, {"scale": 10.0})
    assert summary["alpha"] is None and "zero_shot_accuracy" in summary
    probabilities = Centroids.restore({}, {"means": means}).probabilities(test.features[:3])
    assert np.allclose(probabilities.sum(axis=1), 1.0)


def test_a_hyperparameter_may_not_take_a_name_the_evaluation_reports(saved):
    class Clashing(Centroids):
        def fit(self, task):
            super().fit(task)
            return {"test_accuracy": 1.0}

    with pytest.raises(SettingError, match="returned a hyperparameter named 'test_accuracy'"):
        evaluate_method(saved, Clashing())


@pytest.mark.parametrize("method", BUILT_IN, ids=lambda method: method.name)
def test_each_built_in_method_is_rebuilt_from_its_evaluation_to_predict_what_it_predicted(saved, method, tmp_path):
    """State and restore: the classifier predict rebuilds scores the test split as the evaluation did."""
    source = saved.artifact
    if "adapter" in method.reads:
        source = save_fit(fit(saved, FitSettings(shots=4, epochs=2, k=12)), saved, tmp_path / "fit.h5").artifact
    evaluation = evaluate_artifact(source, method.name, grid=None if not method.given else GRID)
    written = save_evaluation(evaluation, [source], tmp_path / "eval.h5")
    record = EvaluationRecord.read(written)
    assert record.hyperparameters == evaluation.hyperparameters and record.mode == method.name
    classifier = load_classifier(written)
    test = saved.split("test")
    np.testing.assert_array_equal(np.argmax(classifier.scores(test.features), axis=1), written.read("test/predictions"))
    probabilities = classifier.probabilities(test.features)
    assert np.allclose(probabilities.sum(axis=1), 1.0)


def test_hyperparameters_of_the_wrong_shape_are_refused_in_one_line(saved, tmp_path):
    evaluation = evaluate_method(saved, Centroids())
    summary = {**evaluation.summary(), "hyperparameters": ["not", "a", "map"]}
    written = store.write_artifact(tmp_path / "bad.h5", "evaluation", {"test/predictions": evaluation.test_predictions},
                                   summary, [saved.artifact])
    with pytest.raises(ApecliError, match="its header is damaged \\(hyperparameters that are not a map"):
        EvaluationRecord.read(written)


def test_a_method_says_nothing_it_need_not():
    assert Centroids.settings_tried(GRID) == 0 and Centroids.outdated({}) is None
    assert (Centroids.given, Centroids.reads, Centroids.task_state) == ((), ("features", "refinement"), ())
    with pytest.raises(NotImplementedError):
        Method().fit(None)
