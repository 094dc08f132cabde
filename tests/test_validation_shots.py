"""Choosing on a few validation images per class (--val-shots): the draw, every mode, fit, and bench."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
from typer.testing import CliRunner

from apecli import bench, store
from apecli.cli import app
from apecli.errors import ApecliError
from apecli.evaluate import evaluate_artifact, evaluate_training_free, evaluate_training_required
from apecli.fitting import fit
from apecli.kinds.adapter import load_fit, save_fit
from apecli.kinds.features import save_features
from apecli.methods.ape_t import FitSettings
from apecli.methods.grid import SearchGrid
from apecli.methods.registry import BUILT_IN
from apecli.refine import select_channels
from apecli.synthetic import synthetic_features

from conftest import raises_said

runner = CliRunner()
GRID = SearchGrid((7.0, 7.0, 1.0), (8, 6, 3))


@pytest.fixture(scope="module")
def features():
    return synthetic_features(num_classes=6, dim=32, shots=(4,), val_per_class=12, test_per_class=10, seed=5,
                              text_noise=1.5, view_noise=1.0, views=2)


@pytest.fixture
def saved(features, tmp_path):
    return save_features(features, store.in_store(tmp_path / "s", "x", "features"))


def test_the_draw_keeps_that_many_images_of_each_class_in_split_order(features):
    val = features.split("val")
    uneven = replace(features, splits={**features.splits, "val": replace(val, features=val.features[3:],
                                                                        labels=val.labels[3:])})
    cut = uneven.with_validation_shots(10).split("val")
    counts = np.bincount(uneven.split("val").labels, minlength=6)
    assert counts.min() < 10 < counts.max()  # one class has fewer than asked: all of it is kept
    np.testing.assert_array_equal(np.bincount(cut.labels, minlength=6), np.minimum(counts, 10))
    rows = [np.flatnonzero((uneven.split("val").features == row).all(axis=1))[0] for row in cut.features]
    assert rows == sorted(rows)  # a subset of the split's rows, in its order
    np.testing.assert_array_equal(uneven.split("val").labels[rows], cut.labels)
    assert features.with_validation_shots(None) is features
    assert features.with_validation_shots(3).split("test") is features.split("test")


def test_the_draw_is_the_feature_sets_seed_and_nested(features):
    again = features.with_validation_shots(3).split("val").features
    np.testing.assert_array_equal(features.with_validation_shots(3).split("val").features, again)
    other_seed = replace(features, provenance={**features.provenance, "seed": 2}).with_validation_shots(3)
    assert not np.array_equal(other_seed.split("val").features, again)
    more = features.with_validation_shots(5).split("val").features
    assert all((more == row).all(axis=1).any() for row in again)  # the 3 a class are among the 5 a class


def test_the_draw_is_pythons_random_sequence(features):
    """Python guarantees random.Random(seed).random() across versions: the draw is the smallest numbers."""
    import random

    val = features.split("val")
    rng = random.Random(features.provenance["seed"])
    numbers = [rng.random() for _ in range(val.labels.shape[0])]
    expected = sorted(i for label in range(6) for i in sorted(np.flatnonzero(val.labels == label),
                                                             key=lambda i: numbers[i])[:2])
    np.testing.assert_array_equal(features.with_validation_shots(2).split("val").features, val.features[expected])


def test_a_count_below_one_is_refused(features):
    with raises_said("--val-shots must be at least 1, got 0"):
        features.with_validation_shots(0)


@pytest.mark.parametrize("mode", [method.name for method in BUILT_IN if "adapter" not in method.reads])
def test_every_mode_chooses_on_the_drawn_images_and_records_how_many(saved, mode):
    evaluation = evaluate_artifact(saved.artifact, mode, None, None if mode == "zero-shot" else GRID, val_shots=3)
    assert evaluation.summary()["val_shots"] == 3
    val = saved.with_validation_shots(3).split("val")
    zero_shot = np.argmax(val.features.astype(np.float64) @ saved.classifier.astype(np.float64).T, axis=1)
    assert evaluation.zero_shot_val == pytest.approx(100 * np.mean(zero_shot == val.labels))  # on the same 18 images
    whole = evaluate_artifact(saved.artifact, mode, None, None if mode == "zero-shot" else GRID)
    assert "val_shots" not in whole.summary()


def test_training_free_on_the_drawn_images_is_the_search_on_them(saved):
    evaluation = evaluate_artifact(saved.artifact, "training-free", None, GRID, val_shots=3)
    cut = saved.with_validation_shots(3)
    direct = evaluate_training_free(cut, select_channels(cut), GRID)
    assert (evaluation.alpha, evaluation.beta, evaluation.gamma) == (direct.alpha, direct.beta, direct.gamma)
    assert evaluation.val_accuracy == direct.val_accuracy and evaluation.test_accuracy == direct.test_accuracy
    assert evaluation.search.correct.max() <= 3 * 6  # counted over 3 images a class


def test_a_fit_chooses_its_epoch_on_the_drawn_images_and_its_evaluation_keeps_them(saved, tmp_path):
    settings = FitSettings(epochs=3, val_shots=3)
    fitted = save_fit(fit(saved, settings), saved, tmp_path / "fit.h5")
    cut = saved.with_validation_shots(3)
    np.testing.assert_array_equal(fitted.val_accuracy, fit(cut, replace(settings, val_shots=None)).val_accuracy)
    loaded, _ = load_fit(fitted.artifact.path)
    assert loaded.settings.val_shots == 3
    evaluation = evaluate_artifact(fitted.artifact, "training-required", None, GRID)
    assert evaluation.summary()["val_shots"] == 3
    assert evaluation.val_accuracy == evaluate_training_required(cut, loaded, GRID).val_accuracy
    with raises_said("was fitted on 3 validation images a class, where it chose its epoch; .*"
                                          "--val-shots 5"):
        evaluate_artifact(fitted.artifact, "training-required", None, GRID, val_shots=5)
    whole = save_fit(fit(saved, FitSettings(epochs=3)), saved, tmp_path / "whole.h5")
    with pytest.raises(ApecliError, match="was fitted on the whole validation split"):
        evaluate_artifact(whole.artifact, "training-required", None, GRID, val_shots=3)


def test_bench_keeps_cells_of_each_validation_apart(saved, tmp_path):
    artifacts = [saved.artifact]
    whole = bench.run_bench(artifacts, [4], ["zero-shot", "training-free"], tmp_path / "out")
    few = bench.run_bench(artifacts, [4], ["zero-shot", "training-free", "training-required"], tmp_path / "out",
                          val_shots=3)
    assert len(few) == 5 and [row["val_shots"] for row in few] == [None, None, 3, 3, 3]
    assert few[:2] == whole
    ran = []
    again = bench.run_bench(artifacts, [4], ["zero-shot"], tmp_path / "out", lambda row, skipped: ran.append(skipped),
                            val_shots=3)
    assert ran == [True] and again == few
    header = (tmp_path / "out" / "results.csv").read_text().splitlines()[0].split(",")
    assert "val_shots" in header


def test_on_the_command_line(saved, tmp_path):
    def run(*arguments: str) -> dict:
        result = runner.invoke(app, [*arguments, "--store", str(tmp_path / "s"), "--json"])
        assert result.exit_code == 0, result.stderr
        return json.loads(result.stdout)

    path = str(saved.artifact.path)
    assert run("eval", path, "--val-shots", "3", "--search-step", "6", "4", "3")["val_shots"] == 3
    assert run("fit", path, "--epochs", "2", "--val-shots", "3")["settings"]["val_shots"] == 3
    adapter = str(next((tmp_path / "s").rglob("fit-*.h5")))
    assert run("eval", adapter)["val_shots"] == 3
    listed = runner.invoke(app, ["ls", str(tmp_path / "s")]).stdout.splitlines()
    assert sum(line.split()[1] in ("evaluation", "adapter") and "(3 a class)" in line for line in listed) == 3
    rows = run("bench", path, "--shots", "4", "--modes", "zero-shot", "--val-shots", "3", "--out",
               str(tmp_path / "r"))["rows"]
    assert [row["val_shots"] for row in rows] == [3]
    table = runner.invoke(app, ["bench", path, "--shots", "4", "--modes", "zero-shot", "--val-shots", "3", "--out",
                                str(tmp_path / "r"), "--store", str(tmp_path / "s")]).stdout
    assert "test accuracy (%), 4 shots, chosen on 3 validation images a class" in " ".join(table.split())
    assert runner.invoke(app, ["eval", path, "--val-shots", "0", "--store", str(tmp_path / "s")]).exit_code == 2
