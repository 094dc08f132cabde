"""Baselines on the same store: each search equals a loop over its settings, each head its formula."""

from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from apecli import methods
from apecli.cli import app
from apecli.errors import ApecliError
from apecli.evaluate import evaluate_method
from apecli.kinds.features import save_features
from apecli.methods import proker
from apecli.methods.cache_model import CacheModel
from apecli.methods.gda import GDA, GDA_ALPHAS, gda_head
from apecli.methods.grid import SearchGrid
from apecli.methods.proker import PROKER_BETAS, PROKER_FORMULA, PROKER_LAMBDAS, ProKeR, ProkerSupport, proker_counts
from apecli.methods.scores import count_correct
from apecli.methods.tip_adapter import TipAdapter
from apecli.methods.tip_adapter_f import TipAdapterF, TipAdapterFSettings
from apecli.synthetic import synthetic_features

runner = CliRunner()
GRID = SearchGrid((7.0, 7.0, 1.0), (9, 7, 1))


@pytest.fixture(scope="module")
def features():
    return synthetic_features(num_classes=6, dim=32, shots=(4,), val_per_class=12, test_per_class=12, seed=11,
                              text_noise=1.5, view_noise=1.0, views=4)


def test_an_empty_validation_split_is_refused_by_the_searches(features):
    from dataclasses import replace

    from apecli.evaluate import evaluate_training_free
    from apecli.kinds.features import LabelledFeatures
    from apecli.refine import select_channels

    val = features.split("val")
    unchecked = replace(features, splits={**features.splits, "val": LabelledFeatures(val.features[:0], val.labels[:0])})
    message = "the validation split is empty"
    with pytest.raises(ApecliError, match=message):
        evaluate_method(unchecked, TipAdapter(GRID))
    with pytest.raises(ApecliError, match=message):
        evaluate_training_free(unchecked, select_channels(unchecked, k=16), GRID)


def test_tip_adapter_search_equals_a_loop(features):
    result = evaluate_method(features, TipAdapter(GRID))
    _, cache = features.cache(4)
    model = CacheModel(features.classifier, cache.keys, cache.labels, np.ones(24))
    val = features.split("val")
    loop = np.array([[count_correct(model.logits(val.features, a, b), val.labels) for a in GRID.alphas] for b in GRID.betas])
    np.testing.assert_array_equal(result.search.correct[:, :, 0], loop)
    b, a = np.unravel_index(np.argmax(loop), loop.shape)
    assert (result.beta, result.alpha) == (GRID.betas[b], GRID.alphas[a])
    test = features.split("test")
    expected = 100 * count_correct(model.logits(test.features, result.alpha, result.beta), test.labels) / test.labels.shape[0]
    assert result.test_accuracy == expected


def test_tip_adapter_f_trains_the_keys(features):
    result = evaluate_method(features, TipAdapterF(GRID, TipAdapterFSettings(epochs=5, lr=1e-2)))
    assert result.extra["trained_on_views"] and 1 <= result.extra["best_epoch"] <= 5
    again = evaluate_method(features, TipAdapterF(GRID, TipAdapterFSettings(epochs=5, lr=1e-2)))
    assert (again.alpha, again.beta, again.test_accuracy) == (result.alpha, result.beta, result.test_accuracy)


@pytest.mark.parametrize("given, message", [
    (dict(lr=float("nan")), "lr must be finite and positive, got nan"),
    (dict(weight_decay=-0.1), "weight decay must be finite and not negative, got -0.1"),
    (dict(batch_size=0), "batch size must be at least 1, got 0"),
    (dict(seed=-3), "a seed must be between 0 and 4294967295, got -3"),
])
def test_tip_adapter_f_settings_are_checked(given, message):
    with pytest.raises(ApecliError, match=f"^{message}$"):
        TipAdapterFSettings(**given)


def test_gda_head_follows_its_formula():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(30, 5))
    labels = np.repeat(np.arange(3), 10)
    weights, bias = gda_head(x, labels, 3)
    means = np.array([x[labels == c].mean(0) for c in range(3)])
    covariance = np.cov((x - means[labels]).T)  # n − 1 normalisation
    precision = 5 * np.linalg.pinv(29 * covariance + np.trace(covariance) * np.eye(5))
    np.testing.assert_allclose(weights, means @ precision, rtol=1e-10)
    np.testing.assert_allclose(bias, np.log(1 / 3) - 0.5 * np.diag(means @ precision @ means.T), rtol=1e-10)


def test_gda_picks_the_first_best_alpha(features):
    result = evaluate_method(features, GDA())
    _, cache = features.cache(4)
    views = features.views(4)
    weights, bias = gda_head(views.reshape(-1, 32), np.tile(cache.labels, 4), 6)
    val = features.split("val")
    zero_shot = 100 * val.features @ features.classifier.T
    counts = [count_correct(zero_shot + a * (val.features @ weights.T + bias), val.labels) for a in GDA_ALPHAS]
    assert result.alpha == GDA_ALPHAS[int(np.argmax(counts))]
    assert result.val_accuracy == 100 * max(counts) / val.labels.shape[0]


@pytest.mark.parametrize("block_bytes", [None, 8 * 24 * 5])  # all images at once; 5 images a block
def test_proker_equals_its_closed_form_solved_directly(features, block_bytes, monkeypatch):
    if block_bytes is not None:
        monkeypatch.setattr("apecli.methods.scores.BLOCK_BYTES", block_bytes)
    result = evaluate_method(features, ProKeR())
    _, cache = features.cache(4)
    support = cache.keys.astype(np.float64)
    text = features.classifier.astype(np.float64)
    residual = np.eye(6)[cache.labels] - support @ text.T  # the labels less the zero-shot cosines
    val = features.split("val")

    def correct(x, labels, beta, lam):
        gram = np.exp(-beta * (1 - support @ support.T))
        coefficients = np.linalg.solve(gram / lam + np.eye(len(support)), residual)
        prediction = x @ text.T + np.exp(-beta * (1 - x @ support.T)) @ coefficients
        return count_correct(prediction, labels)

    betas = [i * (7.0 - 0.1) / PROKER_BETAS + 0.1 for i in range(PROKER_BETAS)]
    counts = np.array([[correct(val.features, val.labels, b, l) for l in PROKER_LAMBDAS] for b in betas])
    b, l = np.unravel_index(np.argmax(counts), counts.shape)
    assert (result.beta, result.extra["lambda"]) == (pytest.approx(betas[b]), PROKER_LAMBDAS[l])
    assert result.extra["formula"] == PROKER_FORMULA  # what its β and λ mean, for predict and transfer
    assert len(np.unique(counts)) > 3  # the settings differ, so the equal choice checks something
    assert result.val_accuracy == 100 * counts[b, l] / val.labels.shape[0]
    test = features.split("test")
    assert result.test_accuracy == 100 * correct(test.features, test.labels, betas[b], PROKER_LAMBDAS[l]) / 72


def test_proker_counts_the_same_through_the_eigendecomposition_a_gpu_takes(features, monkeypatch):
    """On a GPU the kernel is decomposed by torch, on the CPU by numpy: both give every setting's count."""
    import torch

    regression = ProkerSupport.on(features.classifier, features.cache(4)[1].keys, features.cache(4)[1].labels)
    val = features.split("val")
    betas = [0.1 + i * 6.9 / PROKER_BETAS for i in range(PROKER_BETAS)]
    by_numpy = proker_counts(regression, val.features, val.labels, betas, PROKER_LAMBDAS)
    monkeypatch.setattr(proker, "_symmetric_eigh", torch.linalg.eigh)
    by_torch = proker_counts(regression, val.features, val.labels, betas, PROKER_LAMBDAS)
    assert len(np.unique(by_numpy)) > 3  # the settings differ, so equal counts check something
    np.testing.assert_array_equal(by_torch, by_numpy)


@pytest.mark.parametrize("mode, given", [(mode, given) for mode in ("training-free", "tip-adapter", "tip-adapter-f", "proker")
                                         for given in ({}, {"alpha": 1.5}, {"beta": 2.0})
                                         if mode != "proker" or "alpha" not in given])  # ProKeR has no α
def test_the_settings_a_mode_is_said_to_try_are_those_it_counts(features, tmp_path, monkeypatch, mode, given):
    """What `apecli eval` announces ("searching N settings") is the size of the grid of counts each search makes."""
    from apecli.evaluate import evaluate_artifact

    counts = []
    real = proker_counts
    monkeypatch.setattr(proker, "proker_counts", lambda *a, **k: counts.append(real(*a, **k)) or counts[-1])
    grid = GRID.fixing(**given)
    evaluation = evaluate_artifact(save_features(features, tmp_path / "f.h5").artifact, mode, None, grid)
    searched = evaluation.search.correct if evaluation.search is not None else counts[0]  # ProKeR keeps no grid
    assert searched.size == methods.get(mode).settings_tried(grid) > 1


@pytest.mark.parametrize("mode, keys", [("tip-adapter", {"alpha", "beta"}), ("tip-adapter-f", {"alpha", "beta", "best_epoch"}),
                                        ("gda", {"alpha"}), ("proker", {"beta", "lambda"})])
def test_every_baseline_on_the_command_line(features, tmp_path, mode, keys):
    path = save_features(features, tmp_path / "f.h5").artifact.path
    result = runner.invoke(app, ["eval", str(path), "--mode", mode, "--search-step", "6", "5", "1",
                                 "--store", str(tmp_path / "s"), "--json"])
    assert result.exit_code == 0, result.stderr
    payload = json.loads(result.stdout)
    assert payload["mode"] == mode and keys <= {k for k, v in payload.items() if v is not None}
    assert 0 <= payload["test_accuracy"] <= 100


@pytest.mark.parametrize("mode", ["tip-adapter", "tip-adapter-f", "gda", "proker"])
def test_giving_the_chosen_values_reproduces_the_search(features, tmp_path, mode):
    """The first best setting stays first when its own values are given: same accuracies, recorded as given."""
    path = save_features(features, tmp_path / "f.h5").artifact.path
    common = [str(path), "--mode", mode, "--search-step", "6", "5", "1", "--store", str(tmp_path / "s"), "--json"]
    searched = json.loads(runner.invoke(app, ["eval", *common]).stdout)
    options = [part for name in methods.get(mode).given for part in (f"--{name}", repr(searched[name]))]
    result = runner.invoke(app, ["eval", *common, *options])
    assert result.exit_code == 0, result.stderr
    given = json.loads(result.stdout)
    assert given["given"] == {name: searched[name] for name in methods.get(mode).given}
    assert (given["val_accuracy"], given["test_accuracy"]) == (searched["val_accuracy"], searched["test_accuracy"])
    assert {name: given[name] for name in ("alpha", "beta", "lambda") if name in searched} == \
        {name: searched[name] for name in ("alpha", "beta", "lambda") if name in searched}
    assert "given" in result.stderr  # the table says which values were not chosen on validation


@pytest.mark.parametrize("mode, option", [("tip-adapter", "--gamma"), ("gda", "--beta"), ("proker", "--alpha"),
                                          ("zero-shot", "--alpha")])
def test_a_value_the_mode_does_not_have_is_refused(features, tmp_path, mode, option):
    from conftest import assert_one_line_error

    path = save_features(features, tmp_path / "f.h5").artifact.path
    result = runner.invoke(app, ["eval", str(path), "--mode", mode, option, "1", "--store", str(tmp_path / "s")])
    assert_one_line_error(result, f"mode {mode} has no {dict(alpha='α', beta='β', gamma='γ')[option[2:]]} to give")
    assert not (tmp_path / "s").exists()


def test_tip_adapter_f_trains_with_the_authors_alpha_and_epochs_for_the_dataset(features):
    from dataclasses import replace

    assert TipAdapterFSettings.for_dataset("fgvc") == TipAdapterFSettings(alpha=5.0)
    assert TipAdapterFSettings.for_dataset("eurosat") == TipAdapterFSettings(alpha=2.0, epochs=100)
    assert TipAdapterFSettings.for_dataset("caltech101") == TipAdapterFSettings()  # none published
    assert TipAdapterFSettings.for_dataset(None) == TipAdapterFSettings()
    pets = evaluate_method(replace(features, dataset="oxford_pets"), TipAdapterF(GRID))
    assert (pets.extra["init_alpha"], pets.extra["epochs"]) == (1.17, 20)
    given = evaluate_method(replace(features, dataset="oxford_pets"), TipAdapterF(GRID, TipAdapterFSettings(alpha=1.17)))
    assert (given.alpha, given.beta, given.extra["best_epoch"]) == (pets.alpha, pets.beta, pets.extra["best_epoch"])
