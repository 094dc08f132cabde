"""classes: an evaluation's test accuracy class by class, beside zero-shot CLIP's, and its confusions."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
from test_transfer import GRID, MODEL, evaluated, shifted
from typer.testing import CliRunner

from apecli import class_report, store
from apecli.classes import per_class
from apecli.cli import app
from apecli.errors import ApecliError
from apecli.evaluate import evaluate_artifact
from apecli.importers import import_tip_adapter
from apecli.kinds.evaluation import Evaluation, save_evaluation
from apecli.kinds.features import LabelledFeatures, save_features
from apecli.kinds.transfer import save_transfer
from apecli.synthetic import synthetic_features
from apecli.transfer import transfer

from conftest import assert_one_line_error, real_dataset

runner = CliRunner()
NAMES = ("cat", "dog", "owl", "yak")


def test_each_class_counts_its_own_images_and_what_they_were_taken_for():
    labels = np.array([0, 0, 0, 0, 1, 1, 1, 2, 2, 2, 2, 2])
    predictions = np.array([0, 0, 1, 2, 1, 1, 1, 0, 1, 0, 2, 1])
    zero_shot = np.array([0, 1, 1, 1, 1, 0, 0, 2, 2, 2, 2, 2])
    results = per_class(labels, predictions, zero_shot, NAMES)
    by_name = {result.name: result for result in results}
    assert [result.name for result in results] == ["owl", "cat", "dog"]  # lowest accuracy first; yak has no image
    assert (by_name["cat"].images, by_name["cat"].correct, by_name["cat"].zero_shot_correct) == (4, 2, 1)
    assert by_name["cat"].mistaken_for == ((1, 1), (2, 1))  # equal counts: lower label first
    assert by_name["dog"].accuracy == 100.0 and by_name["dog"].mistaken_for == ()
    assert by_name["dog"].zero_shot_accuracy == pytest.approx(100 / 3)
    assert by_name["owl"].mistaken_for == ((0, 2), (1, 2))
    assert (by_name["owl"].correct, by_name["owl"].zero_shot_correct) == (1, 5)


def test_the_commonest_mistake_comes_first_and_equal_accuracies_go_by_label():
    labels = np.array([0, 0, 0, 0, 1, 1, 2, 2])
    predictions = np.array([3, 2, 3, 0, 1, 0, 2, 1])
    results = per_class(labels, predictions, labels, NAMES)
    assert [result.label for result in results] == [0, 1, 2]  # 25 %, then 50 % and 50 % by label
    assert results[0].mistaken_for == ((3, 2), (2, 1))


@pytest.mark.parametrize("predictions, message", [(np.array([0, 1]), "2 predictions for 3 test images"),
                                                  (np.array([0, 1, 4]), "outside the 4 classes")])
def test_predictions_that_do_not_fit_the_labels_are_refused(predictions, message):
    labels = np.array([0, 1, 2])
    with pytest.raises(ApecliError, match=message):
        per_class(labels, predictions, labels, NAMES)


@pytest.fixture
def features(tmp_path):
    made = synthetic_features(num_classes=6, dim=32, shots=(4,), val_per_class=8, test_per_class=10, seed=5)
    test = made.split("test")
    paths = np.array([f"test/{made.class_names[label]}/{i}.jpg" for i, label in enumerate(test.labels)])
    made = replace(made, splits={**made.splits, "test": LabelledFeatures(test.features, test.labels, paths)})
    return save_features(made, store.in_store(tmp_path / "s", "synthetic", "features"))


@pytest.mark.parametrize("mode", ["zero-shot", "training-free", "training-required", "gda"])
def test_the_classes_add_up_to_the_evaluations_accuracies(features, tmp_path, mode):
    evaluation = evaluated(features, mode, tmp_path)
    report = class_report(evaluation)
    meta = evaluation.metadata
    assert len(report.classes) == features.num_classes and report.absent == ()
    assert report.mean_accuracy == pytest.approx(meta["test_class_accuracy"], abs=1e-9)
    images = sum(result.images for result in report.classes)
    assert 100 * sum(result.correct for result in report.classes) / images == pytest.approx(meta["test_accuracy"], abs=1e-9)
    assert 100 * sum(r.zero_shot_correct for r in report.classes) / images == pytest.approx(meta["zero_shot_accuracy"], abs=1e-9)
    wrong = sum(result.images - result.correct for result in report.classes)
    assert wrong == sum(count for result in report.classes for _, count in result.mistaken_for)
    assert len(report.misclassified) == wrong
    test = features.split("test")
    for path, label, predicted in report.misclassified:
        row = list(test.paths).index(path)
        assert test.labels[row] == label != predicted


def test_the_misclassified_images_are_listed_only_where_their_paths_are_known(features, tmp_path):
    test = features.split("test")
    bare = replace(features, splits={**features.splits, "test": LabelledFeatures(test.features, test.labels)}, artifact=None)
    saved = save_features(bare, tmp_path / "bare.h5")
    evaluation = save_evaluation(evaluate_artifact(saved.artifact, "zero-shot"), [saved.artifact], tmp_path / "eval.h5")
    report = class_report(evaluation)
    assert report.misclassified == () and report.summary()["misclassified"] == []
    assert sum(r.images - r.correct for r in report.classes) > 0


def test_a_class_without_test_images_is_named_absent(features, tmp_path):
    test = features.split("test")
    kept = test.labels != 2
    fewer = replace(features, artifact=None, splits={**features.splits, "test": LabelledFeatures(
        test.features[kept], test.labels[kept], test.paths[kept])})
    saved = save_features(fewer, tmp_path / "fewer.h5")
    report = class_report(save_evaluation(evaluate_artifact(saved.artifact, "zero-shot"), [saved.artifact], tmp_path / "e.h5"))
    assert report.absent == (features.class_names[2],)
    assert 2 not in [result.label for result in report.classes]


def test_an_evaluation_without_test_predictions_is_refused(features, tmp_path):
    old = Evaluation("zero-shot", "synthetic", 50.0, 50.0, 50.0, 50.0)
    artifact = save_evaluation(old, [features.artifact], tmp_path / "old.h5")
    with pytest.raises(ApecliError, match="holds no test predictions"):
        class_report(artifact)


def test_the_command_lists_the_lowest_classes_on_stdout(features, tmp_path):
    evaluation = evaluated(features, "training-free", tmp_path)
    result = runner.invoke(app, ["classes", str(evaluation.path), "--worst", "2"])
    assert result.exit_code == 0, result.stderr
    assert result.stderr == ""  # the report is the command's result
    report = class_report(evaluation)
    lowest = [r.name for r in report.classes]
    assert "the 2 lowest of 6" in result.stdout
    rows = [line.split("│")[1].strip() for line in result.stdout.splitlines() if line.startswith("│")]
    shown = [row for row in rows if row]  # a row the last column wraps onto has an empty first column
    assert sorted(shown) == sorted(lowest[:2])
    below = sum(r.correct < r.zero_shot_correct for r in report.classes)
    perfect = sum(r.correct == r.images for r in report.classes)
    assert f"mean over 6 classes {report.mean_accuracy:.2f} %; {perfect} without a mistake; {below} below zero-shot CLIP" \
        in result.stdout


def test_the_command_reads_the_evaluation_from_a_pipe_and_gives_every_class_as_json(features, tmp_path):
    evaluation = evaluated(features, "training-free", tmp_path)
    result = runner.invoke(app, ["classes", "--json", "--worst", "1"], input=f"{evaluation.path}\n")
    assert result.exit_code == 0, result.stderr
    out = json.loads(result.stdout)
    assert out["artifact"] == str(evaluation.path) and out["mode"] == "training-free"
    assert len(out["classes"]) == 6  # --worst shortens the table only
    assert [c["accuracy"] for c in out["classes"]] == sorted(c["accuracy"] for c in out["classes"])
    assert out["mean_class_accuracy"] == pytest.approx(evaluation.metadata["test_class_accuracy"], abs=1e-9)
    names = dict(enumerate(features.class_names))
    for entry in out["misclassified"]:
        assert entry["name"] == names[entry["label"]] and entry["predicted_name"] == names[entry["predicted"]]


def test_the_command_refuses_another_kind_in_one_line(features, tmp_path):
    result = runner.invoke(app, ["classes", str(features.artifact.path)])
    assert_one_line_error(result, "features")


def test_real_flowers_classes_match_the_predictions_by_label(tmp_path):
    """Flowers' cache blocks are not in label order: each class's figures still follow its label."""
    folder = real_dataset("oxford_flowers")
    imported = import_tip_adapter(folder, folder / "proxy_text_weights.pt", dataset="oxford_flowers", shots=[16])
    saved = save_features(imported, tmp_path / "flowers.h5")
    evaluation = save_evaluation(evaluate_artifact(saved.artifact, "training-free", None, GRID), [saved.artifact],
                                 tmp_path / "eval.h5")
    report = class_report(evaluation)
    labels, predictions = saved.split("test").labels, evaluation.read("test/predictions")
    for result in report.classes:
        mine = labels == result.label
        assert result.images == mine.sum() and result.correct == (predictions[mine] == result.label).sum()
    assert report.mean_accuracy == pytest.approx(evaluation.metadata["test_class_accuracy"], abs=1e-9)


def test_a_transfer_target_is_reported_over_its_own_classes(tmp_path):
    made = synthetic_features(num_classes=6, dim=32, shots=(4,), val_per_class=8, test_per_class=10, seed=5)
    source = save_features(replace(made, model=MODEL), tmp_path / "source.h5")
    evaluation = save_evaluation(evaluate_artifact(source.artifact, "training-free", None, GRID), [source.artifact],
                                 tmp_path / "eval.h5")
    one, two = shifted(source, tmp_path, (4, 1, 3), name="one.h5"), shifted(source, tmp_path, (0, 5), name="two.h5")
    results = transfer(evaluation, [one.artifact, two.artifact])
    saved = save_transfer(evaluation, [one.artifact, two.artifact], results, tmp_path / "transfer.h5")
    for target, result, kept in (("two.h5", results[1], (0, 5)), (str(tmp_path / "one.h5"), results[0], (4, 1, 3))):
        report = class_report(saved, target)
        assert report.class_names == tuple(source.class_names[c] for c in kept)
        assert (report.dataset, report.chosen_on, report.mode) == ("shifted", "synthetic", "training-free")
        assert sum(r.correct for r in report.classes) == result.correct
        assert sum(r.images for r in report.classes) == result.total
    with pytest.raises(ApecliError, match=r"holds 2 targets \(shifted, shifted\); name one"):
        class_report(saved)
    with pytest.raises(ApecliError, match="2 targets are 'shifted'; name one by its features path"):
        class_report(saved, "shifted")
    with pytest.raises(ApecliError, match="has no target 'three.h5'"):
        class_report(saved, "three.h5")
    with pytest.raises(ApecliError, match="is an evaluation, of its own test split"):
        class_report(evaluation, "two.h5")
    result = runner.invoke(app, ["classes", str(saved.path), "--target", "two.h5"])
    assert result.exit_code == 0, result.stderr
    assert "shifted · training-free chosen on synthetic · 4 shots · test accuracy per class (all 2)" in result.stdout
    assert_one_line_error(runner.invoke(app, ["classes", str(saved.path)]), "holds 2 targets")
