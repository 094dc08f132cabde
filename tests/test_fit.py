"""APE-T: the adapted classifier, deterministic training on stored views, and its evaluation."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from apecli import store
from apecli.cli import app
from apecli.errors import ApecliError
from apecli.evaluate import evaluate_training_free, evaluate_training_required
from apecli.fitting import fit
from apecli.kinds.adapter import load_fit, save_fit
from apecli.kinds.features import save_features, to_arrays
from apecli.methods.ape_t import Adapter, FitSettings
from apecli.methods.grid import SearchGrid
from apecli.methods.scores import count_correct
from apecli.refine import select_channels
from apecli.synthetic import synthetic_features

from conftest import assert_one_line_error

runner = CliRunner()
GRID = SearchGrid((7.0, 7.0, 1.0), (50, 20, 10))


def weak_text(seed: int = 0, **kwargs):
    """Classes the text barely names, and augmented views as varied as the images themselves."""
    settings = dict(num_classes=20, dim=64, shots=(16,), val_per_class=30, test_per_class=30, informative=1.0,
                    text_noise=2.0, image_noise=1.5, view_noise=3.0, seed=seed)
    return synthetic_features(**{**settings, **kwargs})


@pytest.mark.parametrize("seed", [0, 1])
def test_apet_beats_training_free_ape_when_text_is_weak(seed):
    features = weak_text(seed)
    training_free = evaluate_training_free(features, select_channels(features, k=40), GRID)
    fitted = fit(features, FitSettings(epochs=30, lr=1e-2))
    assert fitted.trained_on_views
    training_required = evaluate_training_required(features, fitted, GRID)
    assert training_required.val_accuracy > training_free.val_accuracy
    assert training_required.val_accuracy > training_required.zero_shot_val + 30


def test_training_is_deterministic_for_a_seed():
    features = weak_text(0, num_classes=6, shots=(4,))
    first = fit(features, FitSettings(epochs=4, lr=1e-2, seed=3))
    again = fit(features, FitSettings(epochs=4, lr=1e-2, seed=3))
    other = fit(features, FitSettings(epochs=4, lr=1e-2, seed=4))
    np.testing.assert_array_equal(first.adapter.residual, again.adapter.residual)
    np.testing.assert_array_equal(first.adapter.value_weights, again.adapter.value_weights)
    np.testing.assert_array_equal(first.loss, again.loss)
    assert not np.array_equal(first.adapter.residual, other.adapter.residual)


def test_history_and_best_epoch():
    features = weak_text(0, num_classes=6, shots=(4,))
    result = fit(features, FitSettings(epochs=6, lr=1e-2))
    assert result.loss.shape == result.val_accuracy.shape == (6,)
    assert result.loss[-1] < result.loss[0]
    assert result.best_epoch == int(np.argmax(result.val_accuracy)) + 1  # first of the best
    assert result.best_val_accuracy == result.val_accuracy.max()


def test_defaults_follow_the_dataset():
    features = replace(weak_text(0, num_classes=4, shots=(1, 2)), dataset="food101")
    settings = FitSettings().resolve(features)
    assert (settings.shots, settings.k, settings.weights) == (2, round(900 * 64 / 1024), (0.2, 0.8))
    assert (settings.lr, settings.eps, settings.epochs, settings.init_alpha) == (1e-4, 1e-2, 30, 0.8)  # 1e-2 at 2 shots
    assert FitSettings(shots=1).resolve(replace(features, dataset="dtd")).eps == 1e-3


def test_adapted_logits_follow_the_formula():
    rng = np.random.default_rng(0)
    features = weak_text(0, num_classes=3, dim=6, shots=(2,))
    adapter = Adapter(np.array([4, 1]), rng.normal(size=(3, 2)), rng.uniform(0.5, 1.5, size=6), 2)
    _, cache = features.cache(2)
    x = features.split("val").features[:4].astype(np.float64)
    expected = np.zeros((4, 3))
    for n in range(4):
        for c in range(3):
            w = features.classifier[c].astype(np.float64).copy()
            w[[4, 1]] += adapter.residual[c]
            expected[n, c] = 100 * x[n] @ w
            for j in range(6):
                key = cache.keys[j].astype(np.float64).copy()
                key[[4, 1]] += adapter.residual[cache.labels[j]]
                if cache.labels[j] == c:
                    expected[n, c] += 1.7 * np.exp(-0.8 * (1 - x[n] @ key)) * adapter.value_weights[j]
    np.testing.assert_allclose(adapter.logits(features, x, alpha=1.7, beta=0.8), expected, rtol=1e-12)


def test_training_logits_are_the_adapted_logits():
    """Training adds the residual's share to each product instead of forming W̃ and F̃: the same logits."""
    import torch

    from apecli.methods.ape_t import adapted_logits

    rng = np.random.default_rng(1)
    features = weak_text(0, num_classes=4, dim=8, shots=(3,))
    channels = np.array([6, 0, 3])
    adapter = Adapter(channels, rng.normal(size=(4, 3)), rng.uniform(0.5, 1.5, size=12), 3)
    _, cache = features.cache(3)
    x = features.split("val").features.astype(np.float64)
    as_tensor = lambda a: torch.from_numpy(np.asarray(a, dtype=np.float64))
    logits = adapted_logits(as_tensor(x), as_tensor(features.classifier), as_tensor(cache.keys),
                            torch.from_numpy(cache.labels.astype(np.int64)), torch.from_numpy(channels),
                            as_tensor(adapter.residual), as_tensor(adapter.value_weights), alpha=1.7, beta=0.8)
    np.testing.assert_allclose(logits.numpy(), adapter.logits(features, x, alpha=1.7, beta=0.8), rtol=1e-12)


def test_alpha_beta_search_equals_a_loop_over_settings():
    features = weak_text(2, num_classes=8, shots=(4,))
    fitted = fit(features, FitSettings(epochs=5, lr=1e-2))
    grid = SearchGrid((7.0, 7.0, 1.0), (12, 9, 1))
    evaluation = evaluate_training_required(features, fitted, grid)
    val = features.split("val")
    counts = np.array([[count_correct(fitted.adapter.logits(features, val.features, a, b), val.labels)
                        for a in grid.alphas] for b in grid.betas])
    np.testing.assert_array_equal(evaluation.search.correct[:, :, 0], counts)
    b, a = np.unravel_index(np.argmax(counts), counts.shape)
    assert (evaluation.beta, evaluation.alpha, evaluation.gamma) == (grid.betas[b], grid.alphas[a], None)
    test = features.split("test")
    logits = fitted.adapter.logits(features, test.features, evaluation.alpha, evaluation.beta)
    assert evaluation.test_accuracy == 100 * count_correct(logits, test.labels) / test.labels.shape[0]


def test_fit_round_trips_through_the_store(tmp_path):
    features = save_features(weak_text(0, num_classes=5, shots=(4,)), tmp_path / "f.h5")
    result = save_fit(fit(features, FitSettings(epochs=3, lr=1e-2)), features, tmp_path / "fit.h5")
    loaded, parent = load_fit(tmp_path / "fit.h5")
    assert parent.artifact.content_id == features.artifact.content_id
    np.testing.assert_array_equal(loaded.adapter.residual, result.adapter.residual)
    np.testing.assert_array_equal(loaded.val_accuracy, result.val_accuracy)
    assert loaded.settings == result.settings and loaded.best_epoch == result.best_epoch


def _cli(*args):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture
def stored(tmp_path) -> Path:
    return save_features(weak_text(0, num_classes=6, shots=(4,)), store.in_store(tmp_path / "s", "x", "features")).artifact.path


def test_fit_then_eval_on_the_command_line(stored, tmp_path):
    fitted = _cli("fit", stored, "--epochs", "4", "--lr", "0.01", "--seed", "5", "--store", tmp_path / "s", "--json")
    assert fitted.exit_code == 0, fitted.stderr
    payload = json.loads(fitted.stdout)
    assert payload["settings"]["seed"] == 5 and len(payload["history"]["val_accuracy"]) == 4
    assert payload["trained_on_views"] is True
    evaluated = runner.invoke(app, ["eval", "--mode", "training-required", "--search-step", "10", "10", "1",
                                    "--store", str(tmp_path / "s"), "--json"], input=fitted.stdout)
    assert evaluated.exit_code == 0, evaluated.stderr
    result = json.loads(evaluated.stdout)
    assert result["mode"] == "training-required" and result["gamma"] is None
    assert result["best_epoch"] == payload["best_epoch"] and "APE-T" in evaluated.stderr
    piped = runner.invoke(app, ["eval", "--search-step", "10", "10", "1", "--store", str(tmp_path / "s"), "--json"],
                          input=fitted.stdout)  # no --mode: a fitted adapter is evaluated as APE-T
    assert piped.exit_code == 0, piped.stderr
    assert {key: json.loads(piped.stdout)[key] for key in ("mode", "test_accuracy")} == \
        {"mode": "training-required", "test_accuracy": result["test_accuracy"]}
    features_eval = runner.invoke(app, ["eval", str(stored), "--search-step", "4", "4", "2", "--store", str(tmp_path / "s"),
                                        "--json"])
    assert json.loads(features_eval.stdout)["mode"] == "training-free"


def test_a_store_without_views_trains_on_the_keys_and_says_so(tmp_path):
    features = weak_text(0, num_classes=5, shots=(4,))
    bare = replace(features, caches={4: replace(features.caches[4], views=None)})
    path = save_features(bare, tmp_path / "f.h5").artifact.path
    result = _cli("fit", path, "--epochs", "2", "--store", tmp_path / "s", "--json")
    assert result.exit_code == 0, result.stderr
    assert "training on the cache keys themselves" in result.stderr
    assert json.loads(result.stdout)["trained_on_views"] is False


def test_fit_refuses_a_store_without_validation(tmp_path):
    features = weak_text(0, num_classes=5, shots=(4,))
    path = save_features(replace(features, splits={"test": features.split("test")}), tmp_path / "f.h5").artifact.path
    assert_one_line_error(_cli("fit", path, "--store", tmp_path / "s"), "has no val split")


def test_fit_refuses_k_beyond_the_width(stored, tmp_path):
    assert_one_line_error(_cli("fit", stored, "--k", "65", "--store", tmp_path / "s"), "k must be between 1 and the feature width 64")


def test_fit_refuses_nan_features(tmp_path):
    features = weak_text(0, num_classes=5, shots=(4,))
    arrays = to_arrays(features)
    arrays["val/features"] = arrays["val/features"].copy()
    arrays["val/features"][3, 7] = np.nan
    metadata = {"dataset": None, "model": {}, "provenance": {}, "num_classes": 5, "dim": 64, "shots": [4],
                "splits": {"val": 150, "test": 150}}
    store.write_artifact(tmp_path / "nan.h5", "features", arrays, metadata)  # written around the checks
    assert_one_line_error(_cli("fit", tmp_path / "nan.h5", "--store", tmp_path / "s"), "val features contain NaN")


def test_a_fitted_adapter_refuses_another_store(stored, tmp_path):
    fitted = Path(_cli("fit", stored, "--epochs", "2", "--store", tmp_path / "s").stdout.strip())
    save_features(weak_text(9, num_classes=6, shots=(4,)), stored)  # the store now holds other features there
    assert_one_line_error(_cli("eval", fitted, "--mode", "training-required"), "changed since it was written")


def test_modes_and_artifacts_must_match(stored, tmp_path):
    fitted = _cli("fit", stored, "--epochs", "2", "--store", tmp_path / "s").stdout.strip()
    assert_one_line_error(_cli("eval", stored, "--mode", "training-required"), "of kind 'features', expected 'adapter'")
    assert_one_line_error(_cli("eval", fitted, "--mode", "training-free"), "of kind 'adapter', expected")


def test_fit_settings_are_checked():
    features = weak_text(0, num_classes=4, shots=(2,))
    with pytest.raises(ApecliError, match="epochs must be at least 1"):
        FitSettings(epochs=0).resolve(features)
    refusals = [
        (dict(lr=-1.0), "lr must be finite and positive, got -1.0"),
        (dict(eps=float("inf")), "eps must be finite and positive, got inf"),
        (dict(weight_decay=float("nan")), "weight decay must be finite and not negative, got nan"),
        (dict(init_alpha=0.0), "α during training must be finite and positive, got 0.0"),
        (dict(init_beta=-1.0), "β during training must be finite and not negative, got -1.0"),
        (dict(seed=2**32), "a seed must be between 0 and 4294967295, got 4294967296"),
        (dict(weights=(float("nan"), 1.0)), "the criterion weight w0 must be finite and not negative, got nan"),
    ]
    for given, message in refusals:  # each setting alone, so that no other check speaks first
        with pytest.raises(ApecliError, match=f"^{message}$"):
            settings = FitSettings(**given).resolve(features)
            fit(features, replace(settings, epochs=1))
    FitSettings(weight_decay=0.0, init_beta=0.0, seed=2**32 - 1).resolve(features)  # the edges are allowed


def test_validation_in_blocks_gives_the_same_history(monkeypatch):
    from apecli.methods import trainer as training

    features = weak_text(3)
    settings = FitSettings(shots=16, epochs=4, k=16)
    whole = fit(features, settings)
    monkeypatch.setattr(training, "VAL_BLOCK", 7)  # validation split scored seven images at a time
    blocked = fit(features, settings)
    np.testing.assert_array_equal(blocked.val_accuracy, whole.val_accuracy)
    assert blocked.best_epoch == whole.best_epoch
    np.testing.assert_array_equal(blocked.adapter.residual, whole.adapter.residual)


def test_validation_products_kept_across_epochs_change_nothing(monkeypatch):
    from apecli.methods import ape_t as training_required
    from apecli.methods import trainer as training

    features = weak_text(3)
    settings = FitSettings(shots=16, epochs=4, k=16)
    monkeypatch.setattr(training, "VAL_BLOCK", 100)  # 600 validation images: six blocks
    computed = []
    original = training_required.KeyProducts.__call__

    def counted(self, rows):
        if (rows.start, rows.stop) not in self.kept:
            computed.append(rows.start)
        return original(self, rows)

    monkeypatch.setattr(training_required.KeyProducts, "__call__", counted)
    recomputed = fit(features, settings, val_cache_bytes=0)
    assert len(computed) == 4 * 6  # every block, every epoch
    computed.clear()
    kept = fit(features, settings)
    assert len(computed) == 6  # every block once
    computed.clear()
    some = fit(features, settings, val_cache_bytes=2 * 100 * 320 * 4)  # room for two blocks of 100 × 320 keys
    assert len(computed) == 6 + 3 * 4
    for run in (kept, some):
        np.testing.assert_array_equal(run.val_accuracy, recomputed.val_accuracy)
        np.testing.assert_array_equal(run.loss, recomputed.loss)
        np.testing.assert_array_equal(run.adapter.residual, recomputed.adapter.residual)
        np.testing.assert_array_equal(run.adapter.value_weights, recomputed.adapter.value_weights)


@pytest.mark.parametrize("weight_decay", [0.1, 0.0])
def test_the_optimiser_is_torch_adamw_with_its_cosine_schedule_bit_for_bit(weight_decay):
    import torch

    from apecli.methods.trainer import CosineAdamW

    torch.manual_seed(0)
    start = [torch.randn(7, 5), torch.ones(11)]
    ours = [p.clone().requires_grad_() for p in start]
    theirs = [p.clone().requires_grad_() for p in start]
    steps = 23
    optimiser = CosineAdamW(ours, lr=1e-2, eps=1e-3, weight_decay=weight_decay, total_steps=steps)
    reference = torch.optim.AdamW(theirs, lr=1e-2, eps=1e-3, weight_decay=weight_decay)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(reference, steps)
    for index in range(steps):
        grads = [torch.randn_like(p) for p in start]
        for params, step in ((ours, optimiser.step), (theirs, reference.step)):
            for position, (p, g) in enumerate(zip(params, grads)):
                p.grad = None if position == 1 and index % 3 == 1 else g.clone()  # a step without its gradient
            step()
        schedule.step()
        assert optimiser.lr == reference.param_groups[0]["lr"]
        assert all(torch.equal(a, b) for a, b in zip(ours, theirs))
    assert optimiser.lr == 0.0 and not torch.equal(ours[0], start[0])


@pytest.mark.parametrize("name, damage, message", [
    ("channels", lambda a: a.astype(np.float64), r"its channels \(float64, shape \(16,\)\) are not indices of 64-channel"),
    ("channels", lambda a: a + 64, r"its channels \(int64, shape \(16,\)\) are not indices of 64-channel features"),
    ("value_weights", lambda a: a[:-1], r"value weights of shape \(23,\), for 24 cache keys"),
])
def test_a_damaged_adapter_is_refused_in_one_line(tmp_path, name, damage, message):
    import h5py

    features = save_features(weak_text(1, num_classes=6, shots=(4,)), tmp_path / "f.h5")
    path = save_fit(fit(features, FitSettings(epochs=1, k=16)), features, tmp_path / "fit.h5").artifact.path
    with h5py.File(path, "a") as handle:
        array, attrs = handle[name][()], dict(handle[name].attrs)
        del handle[name]
        handle.create_dataset(name, data=damage(array)).attrs.update(attrs)
    with pytest.raises(ApecliError, match=message):
        load_fit(path)


def test_a_fit_without_validation_images_is_refused():
    from apecli.evaluate import evaluate_method
    from apecli.kinds.features import LabelledFeatures
    from apecli.methods.tip_adapter_f import TipAdapterF, TipAdapterFSettings

    features = synthetic_features(num_classes=4, dim=16, shots=(2,), val_per_class=2, test_per_class=2, views=2)
    empty = replace(features, splits={**features.splits, "val": LabelledFeatures(np.zeros((0, 16), np.float32),
                                                                                 np.zeros(0, np.int64))})
    for training in (lambda: fit(empty, FitSettings(epochs=1)),
                     lambda: evaluate_method(empty, TipAdapterF(settings=TipAdapterFSettings(epochs=1)))):
        with pytest.raises(ApecliError, match="the validation split is empty; training chooses its epoch on it"):
            training()
