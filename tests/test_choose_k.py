"""Training-free APE with its channel count k chosen on validation, beside α, β and γ."""

from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from apecli import store
from apecli.cli import app
from apecli.errors import ApecliError
from apecli.evaluate import evaluate_artifact, evaluate_training_free, evaluate_training_free_over_k
from apecli.kinds.features import save_features
from apecli.kinds.refinement import save_refinement
from apecli.methods.grid import SearchGrid
from apecli.predict import load_classifier
from apecli.refine import select_channels
from apecli.synthetic import synthetic_features

from conftest import assert_one_line_error

runner = CliRunner()
GRID = SearchGrid((7.0, 7.0, 1.0), (6, 5, 3))


@pytest.fixture(scope="module")
def features():
    # Half the channels carry the classes: a few channels are too few, all of them let the others in.
    return synthetic_features(num_classes=8, dim=32, shots=(4,), val_per_class=10, test_per_class=12, seed=13,
                              text_noise=1.5)


def test_the_chosen_k_is_the_one_of_best_validation_accuracy_and_each_k_is_its_own_search(features):
    ks = (2, 8, 16, 32)
    alone = [evaluate_training_free(features, select_channels(features, k=k), GRID) for k in ks]
    assert len({a.val_accuracy for a in alone}) > 1  # the choice is not decided by a tie
    chosen = evaluate_training_free_over_k(features, ks, grid=GRID)
    best = max(range(len(ks)), key=lambda i: (alone[i].val_accuracy, -i))
    assert chosen.extra["k_tried"] == list(ks)
    assert chosen.extra["k_val_accuracy"] == [a.val_accuracy for a in alone]
    assert chosen.channels.shape[0] == ks[best]
    np.testing.assert_array_equal(chosen.channels, alone[best].channels)
    assert (chosen.alpha, chosen.beta, chosen.gamma) == (alone[best].alpha, alone[best].beta, alone[best].gamma)
    assert (chosen.val_accuracy, chosen.test_accuracy) == (alone[best].val_accuracy, alone[best].test_accuracy)
    np.testing.assert_array_equal(chosen.test_predictions, alone[best].test_predictions)


def test_the_first_of_equally_good_k_wins(features, monkeypatch):
    from apecli.methods import ape
    from apecli.methods.grid import SearchResult
    from apecli.methods.tri_edge import TriEdge

    accuracy = {4: 70.0, 8: 75.0, 16: 75.0, 24: 60.0}

    def searched(task, channels, grid, progress, device):  # every setting as good as the k's accuracy says
        tri = TriEdge.build(task.text, task.keys, task.key_labels, channels)
        return ape.Searched(tri, SearchResult(np.full(GRID.shape, int(accuracy[len(channels)])), 100, GRID))

    monkeypatch.setattr(ape, "search_channels", searched)
    chosen = evaluate_training_free_over_k(features, (4, 8, 16, 24))
    assert chosen.channels.shape[0] == 8 and chosen.extra["k_val_accuracy"] == [70.0, 75.0, 75.0, 60.0]


def test_progress_runs_once_through_every_k(features):
    seen = []
    evaluate_training_free_over_k(features, (4, 8, 12), grid=GRID, progress=lambda done, total: seen.append((done, total)))
    totals = {total for _, total in seen}
    assert len(totals) == 1
    dones = [done for done, _ in seen]
    assert dones == sorted(dones) and dones[-1] == totals.pop()


def test_a_k_beyond_the_width_is_refused_before_any_search(features):
    seen = []
    with pytest.raises(ApecliError, match="k must be between 1 and the feature width 32, got 33"):
        evaluate_training_free_over_k(features, (8, 33), grid=GRID, progress=lambda *a: seen.append(a))
    assert seen == []


@pytest.fixture
def saved(features, tmp_path):
    return save_features(features, store.in_store(tmp_path / "s", "synthetic", "features"))


def test_k_is_refused_where_nothing_chooses_it(saved, tmp_path):
    with pytest.raises(ApecliError, match="mode tip-adapter has no k to choose"):
        evaluate_artifact(saved.artifact, "tip-adapter", ks=(4, 8))
    refinement = save_refinement(select_channels(saved, k=8), saved, tmp_path / "refine.h5")
    with pytest.raises(ApecliError, match=r"a refinement has chosen its k \(8\); evaluate its features artifact"):
        evaluate_artifact(refinement.artifact, "training-free", ks=(4, 8))


def test_one_k_on_features_evaluates_as_refine_then_eval(saved, tmp_path):
    direct = evaluate_artifact(saved.artifact, "training-free", None, GRID, ks=(12,))
    refinement = save_refinement(select_channels(saved, k=12), saved, tmp_path / "refine.h5")
    piped = evaluate_artifact(refinement.artifact, "training-free", None, GRID)
    np.testing.assert_array_equal(direct.channels, piped.channels)
    assert direct.summary() == piped.summary() and "k_tried" not in direct.extra


def test_the_command_chooses_k_in_increasing_order_and_the_model_predicts_with_it(saved, tmp_path):
    result = runner.invoke(app, ["eval", str(saved.artifact.path), "--k", "16,4,8,16", "--search-step", "6", "5", "3",
                                 "--store", str(tmp_path / "s"), "--json"])
    assert result.exit_code == 0, result.stderr
    out = json.loads(result.stdout)
    assert out["k_tried"] == [4, 8, 16] and out["k"] in (4, 8, 16)
    assert f"k={out['k']} α=" in result.stderr
    listed = runner.invoke(app, ["ls", str(tmp_path / "s"), "--kind", "evaluation"]).stdout
    assert f"k={out['k']} of 3 tried" in listed
    evaluation = store.open_artifact(out["artifact"])
    classifier = load_classifier(evaluation)
    test = saved.split("test")
    np.testing.assert_array_equal(np.argmax(classifier.scores(test.features.astype(np.float64)), axis=1),
                                  evaluation.read("test/predictions"))


@pytest.mark.parametrize("k, fragment", [("4,x", "--k takes comma-separated integers"), ("0,4", "--k takes positive"),
                                         ("8,64", "feature width 32, got 64")])
def test_the_command_refuses_a_bad_k_in_one_line(saved, tmp_path, k, fragment):
    result = runner.invoke(app, ["eval", str(saved.artifact.path), "--k", k, "--store", str(tmp_path / "s")])
    assert_one_line_error(result, fragment)
