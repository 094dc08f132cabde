"""What a careful user is told: degenerate fits, missing views, choices at the edge of a grid, training
still improving at its last epoch, and hyperparameters written as the grid defines them."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
from typer.testing import CliRunner

from apecli import store
from apecli.cli import app
from apecli.evaluate import evaluate_method
from apecli.kinds.features import save_features
from apecli.methods import Method
from apecli.methods.ape import APE
from apecli.methods.gda import GDA
from apecli.methods.grid import SearchGrid
from apecli.methods.tip_adapter import TipAdapter
from apecli.methods.tip_adapter_f import TipAdapterF
from apecli.synthetic import synthetic_features

runner = CliRunner()


def without_views(features):
    return replace(features, caches={shots: replace(cache, views=None) for shots, cache in features.caches.items()})


@pytest.fixture(scope="module")
def features():
    return synthetic_features(num_classes=5, dim=24, shots=(1, 4), val_per_class=6, test_per_class=6, seed=1,
                              dataset="x", views=2)


def test_gda_at_one_shot_without_views_says_it_is_zero_shot(features):
    bare = evaluate_method(without_views(features), GDA(), 1)
    assert bare.test_accuracy == bare.zero_shot_test  # what the note explains
    assert bare.notes == (
        "no augmented views stored for 1 shot: GDA learned from the cache keys themselves (extract's `views` stores "
        "augmented views of each training image)",
        "one sample a class leaves GDA no spread to estimate its covariance from: its head is zero, so it classifies "
        "as zero-shot CLIP whatever its α")
    assert evaluate_method(features, GDA(), 1).notes == ()  # its views give it a spread
    four = evaluate_method(without_views(features), GDA(), 4).notes
    assert len(four) == 1 and four[0].startswith("no augmented views stored for 4 shots: GDA")


def test_methods_that_train_on_views_say_when_there_are_none(features):
    assert evaluate_method(without_views(features), TipAdapterF(), 4).notes == (
        "no augmented views stored for 4 shots: Tip-Adapter-F learned from the cache keys themselves (extract's "
        "`views` stores augmented views of each training image)",)
    assert evaluate_method(features, TipAdapterF(), 4).notes == ()
    assert evaluate_method(without_views(features), TipAdapter(), 4).notes == ()  # it trains on nothing


def test_a_choice_at_the_top_of_its_grid_names_the_option_that_widens_it(features):
    narrow = SearchGrid((7.0, 7.0, 1.0), (200, 20, 20))  # the authors' grid of most datasets
    chosen = evaluate_method(features, APE(narrow), 1)
    assert chosen.alpha == 6.655 and chosen.search.best_index[1] == 19  # at the top of α's values
    assert chosen.notes == ("α = 6.655 is the largest value its grid tried (0.1 … 6.655): a better one may lie beyond "
                            "it; `scale` widens the grid (the upper ends of β, α and γ; now β 7, α 7, γ 1)",)
    from apecli.methods.grid import SearchResult

    correct = np.zeros((3, 4, 1))
    correct[0, 3, 0] = 5  # the best at the top of α's values, in a search without γ (the Tip-Adapter family's)
    assert SearchResult(correct, 10, SearchGrid((7.0, 7.0, 0.0), (3, 4, 1))).edges() == [
        "α = 5.275 is the largest value its grid tried (0.1 … 5.275): a better one may lie beyond it; `scale` widens "
        "the grid (the upper ends of β, α and γ; now β 7, α 7)"]
    inside = evaluate_method(features, APE(narrow), 4)
    assert inside.alpha < 6.655 and not any(note.startswith("α") for note in inside.notes)
    given = evaluate_method(features, APE(narrow.fixing(alpha=6.655)), 1)  # a value given is no choice
    assert not any(note.startswith("α") for note in given.notes)


def test_grid_values_are_the_decimals_the_grid_defines():
    grid = SearchGrid((7.0, 7.0, 1.0), (200, 20, 20))
    assert grid.alphas[-1] == 6.655 and grid.betas[4] == 0.238 and grid.gammas[3] == 0.15
    assert json.dumps([float(grid.alphas[-1]), float(grid.betas[4])]) == "[6.655, 0.238]"
    exact = [i * 6.9 / 200 + 0.1 for i in range(200)]
    assert np.abs(grid.betas - exact).max() < 1e-14  # the same values, less their rounding noise


def test_a_plugin_notes_are_said_and_checked(features):
    class Noted(Method):
        name = "noted"

        def fit(self, task):
            self.text, self.notes = task.text, ("one thing   to\nknow", "one thing to know")
            return {}

        def logits(self, x):
            return x @ self.text.T

    assert evaluate_method(features, Noted(), 4).notes == ("one thing to know",)  # one line each, once

    class Odd(Noted):
        def fit(self, task):
            self.text, self.notes = task.text, "a string is no sequence of notes"
            return {}

    with pytest.raises(Exception, match="gave notes that are not a sequence of strings"):
        evaluate_method(features, Odd(), 4)


def test_the_command_line_says_the_notes_on_stderr_and_keeps_them_out_of_the_record(features, tmp_path):
    saved = save_features(without_views(features), store.in_store(tmp_path, "x", "features"))
    result = runner.invoke(app, ["eval", str(saved.artifact.path), "--mode", "gda", "--shots", "1", "--store",
                                 str(tmp_path), "--json"])
    assert result.exit_code == 0, result.stderr
    notes = [line for line in result.stderr.splitlines() if line.startswith("note: ")]
    assert notes == ["note: no augmented views stored for 1 shot: GDA learned from the cache keys themselves "
                     "(extract's --views stores augmented views of each training image)",
                     "note: one sample a class leaves GDA no spread to estimate its covariance from: its head is "
                     "zero, so it classifies as zero-shot CLIP whatever its α"]
    assert "notes" not in json.loads(result.stdout)
    edge = runner.invoke(app, ["eval", str(saved.artifact.path), "--mode", "training-free", "--shots", "1", "--store",
                               str(tmp_path)])
    assert edge.exit_code == 0, edge.stderr
    assert ("note: α = 6.655 is the largest value its grid tried (0.1 … 6.655): a better one may lie beyond it; "
            "--search-scale widens the grid (the upper ends of β, α and γ; now β 7, α 7, γ 1)") in edge.stderr.splitlines()
    bench = runner.invoke(app, ["bench", str(saved.artifact.path), "--shots", "1", "--modes", "zero-shot,gda",
                                "--out", str(tmp_path / "out")])
    assert bench.exit_code == 0, bench.stderr
    assert "           note: one sample a class leaves GDA no spread" in bench.stderr


def test_training_still_rising_at_its_last_epoch_is_said(tmp_path):
    from apecli.methods import ape_t, trainer

    assert trainer.last_epoch_note(3, 3) == ("the best validation accuracy came at the last epoch (3 of 3): it was "
                                             "still rising, and more `epochs` may do better")
    assert trainer.last_epoch_note(2, 3) is None and trainer.last_epoch_note(1, 1) is None
    rising = synthetic_features(num_classes=5, dim=24, shots=(4,), val_per_class=40, test_per_class=6, seed=2,
                                dataset="x", views=2, image_noise=1.4)  # validation: 63.0, 63.5, 63.5 % over 3 epochs
    saved = save_features(rising, store.in_store(tmp_path, "x", "features"))
    for epochs, best in ((2, 2), (3, 2)):
        said = (f"note: the best validation accuracy came at the last epoch ({epochs} of {epochs}): it was still rising, "
                "and more --epochs may do better")
        fitted = runner.invoke(app, ["fit", str(saved.artifact.path), "--epochs", str(epochs), "--store", str(tmp_path),
                                     "--json"])
        assert fitted.exit_code == 0, fitted.stderr
        payload = json.loads(fitted.stdout)
        assert payload["best_epoch"] == best
        assert (said in fitted.stderr.splitlines()) == (best == epochs)
        evaluated = runner.invoke(app, ["eval", payload["artifact"], "--store", str(tmp_path)])
        assert evaluated.exit_code == 0, evaluated.stderr
        assert (said in evaluated.stderr.splitlines()) == (best == epochs)
    result = ape_t.FitResult(None, ape_t.FitSettings(shots=4, epochs=5), 5, 80.0, np.zeros(5), np.zeros(5), False)
    assert [note.split(":")[0] for note in ape_t.fit_notes(result)] == [
        "no augmented views stored for 4 shots", "the best validation accuracy came at the last epoch (5 of 5)"]
