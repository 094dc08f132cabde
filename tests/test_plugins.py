"""Methods from other packages: the example plugins under tests/plugins are installed (pip, into a
temporary folder put on the path) and their method runs in eval, bench, predict, transfer and classes
with nothing else registered; plugins that fail are named in one warning line and left out."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from apecli import store
from apecli.cli import app
from apecli.datasets import read_coop
from apecli.extract import ExtractSettings, extract
from apecli.kinds.features import save_features
from apecli.methods import PluginWarning, registry
from apecli.synthetic import synthetic_features

from conftest import assert_one_line_error

PLUGINS = Path(__file__).parent / "plugins"
runner = CliRunner()


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """The example plugins installed by pip into a folder of their own, on the path while the tests run."""
    work = tmp_path_factory.mktemp("plugins")
    target = work / "site"
    sources = [shutil.copytree(PLUGINS / name, work / name) for name in ("nearest_mean", "broken")]  # builds there
    done = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                           "--no-index", "--target", str(target), *map(str, sources)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    sys.path.insert(0, str(target))
    registry.methods.cache_clear()
    yield target
    sys.path.remove(str(target))
    for name in ("apecli_nearest_mean", "apecli_broken_method"):
        sys.modules.pop(name, None)
    registry.methods.cache_clear()


@pytest.fixture(scope="module")
def methods(installed):
    with pytest.warns(PluginWarning) as caught:
        registry.methods.cache_clear()
        found = registry.methods()
    return found, [str(warning.message) for warning in caught]


def test_the_registry_takes_the_plugin_and_names_each_plugin_it_leaves_out(methods):
    found, warned = methods
    assert list(found)[:len(registry.BUILT_IN)] == [method.name for method in registry.BUILT_IN]  # the built-in methods first, all there
    assert found["nearest-mean"].label == "nearest class mean" and found["nearest-mean"].name == "nearest-mean"
    assert "broken" not in found and "not-a-method" not in found
    assert len(warned) == 2
    assert "'broken' (apecli_broken_method:Broken) is left out: it failed to import (ModuleNotFoundError" in warned[0]
    assert "'not-a-method' (json:dumps) is left out: it is not a subclass of apecli.methods.Method" in warned[1]


@pytest.fixture
def features(tmp_path):
    data = synthetic_features(num_classes=5, dim=24, shots=(2, 4), val_per_class=8, test_per_class=10, views=2,
                              image_noise=1.4, seed=9)
    return save_features(data, store.in_store(tmp_path / "s", data.dataset, "features"))


def nearest_mean(features, shots: int = 4):
    """The plugin's classifier and choice, computed here apart from it: the validation accuracy of every
    text weight, and the class rows of the first best."""
    _, cache = features.cache(shots)
    means = np.zeros((features.num_classes, features.dim))
    np.add.at(means, cache.labels, cache.keys.astype(np.float64))
    unit = lambda rows: rows / np.linalg.norm(rows, axis=1, keepdims=True)  # noqa: E731
    val = features.split("val")
    best = None
    for weight in (0.0, 0.25, 0.5, 0.75, 1.0):
        rows = unit((1 - weight) * unit(means) + weight * features.classifier)
        hits = int((np.argmax(val.features @ rows.T, axis=1) == val.labels).sum())
        if best is None or hits > best[1]:
            best = (weight, hits, rows)
    return best


def test_eval_runs_the_plugin_with_every_key_an_evaluation_has(installed, methods, features, tmp_path):
    result = runner.invoke(app, ["eval", str(features.artifact.path), "--mode", "nearest-mean", "--store",
                                 str(tmp_path / "s"), "--json"])
    assert result.exit_code == 0, result.stderr
    out = json.loads(result.stdout)
    weight, hits, rows = nearest_mean(features)
    test = features.split("test")
    predictions = np.argmax(test.features @ rows.T, axis=1)
    assert (out["mode"], out["text_weight"], out["hyperparameters"]) == ("nearest-mean", weight, {"text_weight": weight})
    assert out["val_accuracy"] == pytest.approx(100 * hits / 40)
    assert out["test_accuracy"] == pytest.approx(100 * (predictions == test.labels).mean())
    assert {"dataset", "shots", "alpha", "beta", "gamma", "zero_shot_accuracy", "zero_shot_val_accuracy",
            "test_class_accuracy", "artifact"} <= set(out) and out["shots"] == 4
    assert "nearest class mean" in result.stderr  # its label in the table
    evaluation = store.open_artifact(out["artifact"])
    np.testing.assert_array_equal(evaluation.read("test/predictions"), predictions)
    assert "learned/classes" in evaluation  # its state, for predict


def test_eval_refuses_for_the_plugin_what_it_does_not_take(installed, methods, features, tmp_path):
    given = runner.invoke(app, ["eval", str(features.artifact.path), "--mode", "nearest-mean", "--alpha", "2",
                                "--store", str(tmp_path / "s")])
    assert_one_line_error(given, "mode nearest-mean has no α to give; it takes none of α, β, γ")
    k = runner.invoke(app, ["eval", str(features.artifact.path), "--mode", "nearest-mean", "--k", "8,16",
                            "--store", str(tmp_path / "s")])
    assert_one_line_error(k, "mode nearest-mean has no k to choose")


def test_bench_runs_the_plugin_beside_the_built_in_methods(installed, methods, features, tmp_path):
    result = runner.invoke(app, ["bench", str(features.artifact.path), "--modes", "zero-shot,nearest-mean",
                                 "--out", str(tmp_path / "out"), "--json"])
    assert result.exit_code == 0, result.stderr
    rows = json.loads(result.stdout)["rows"]
    assert sorted((row["mode"], row["shots"]) for row in rows) == [("nearest-mean", 2), ("nearest-mean", 4),
                                                                   ("zero-shot", 2), ("zero-shot", 4)]
    for shots in (2, 4):
        _, hits, _ = nearest_mean(features, shots)
        row = next(row for row in rows if row["mode"] == "nearest-mean" and row["shots"] == shots)
        assert row["val_accuracy"] == pytest.approx(100 * hits / 40)
    assert "nearest class mean" in result.stderr  # the table's column
    assert (tmp_path / "out" / "accuracy-vs-shots.png").stat().st_size > 0


def test_predict_transfer_and_classes_take_the_plugins_evaluation(installed, methods, tiny, caltech, tmp_path):
    extracted = extract(read_coop("caltech101", caltech), tiny, tmp_path / "s", ExtractSettings(shots=(2, 4), views=2,
                                                                                                workers=0))
    evaluated = runner.invoke(app, ["eval", str(extracted.artifact.path), "--mode", "nearest-mean", "--store",
                                    str(tmp_path / "s"), "--json"])
    assert evaluated.exit_code == 0, evaluated.stderr
    evaluation = json.loads(evaluated.stdout)["artifact"]
    _, _, rows = nearest_mean(extracted)
    test = extracted.split("test")
    images = [str(path) for path in test.paths]
    predicted = runner.invoke(app, ["predict", *images, "--model-artifact", evaluation, "--device", "cpu", "--json"])
    assert predicted.exit_code == 0, predicted.stderr
    logits = 100.0 * test.features.astype(np.float64) @ rows.T
    probabilities = np.exp(logits - logits.max(axis=1, keepdims=True))
    probabilities /= probabilities.sum(axis=1, keepdims=True)
    for row, prediction in enumerate(json.loads(predicted.stdout)["predictions"]):
        assert prediction["top"][0]["label"] == extracted.class_names[int(np.argmax(logits[row]))]
        assert prediction["top"][0]["probability"] == pytest.approx(probabilities[row].max(), abs=1e-4)
    transferred = runner.invoke(app, ["transfer", evaluation, "--to", str(extracted.artifact.path), "--store",
                                      str(tmp_path / "s"), "--json"])
    assert transferred.exit_code == 0, transferred.stderr
    target = json.loads(transferred.stdout)["targets"][0]
    assert target["correct"] == int((np.argmax(logits, axis=1) == test.labels).sum())
    classes = runner.invoke(app, ["classes", evaluation, "--json"])
    assert classes.exit_code == 0, classes.stderr
    report = json.loads(classes.stdout)
    assert report["mode"] == "nearest-mean" and sum(entry["correct"] for entry in report["classes"]) == target["correct"]
    assert "nearest class mean %" in runner.invoke(app, ["classes", evaluation]).stdout  # the column, by its label


def test_a_broken_plugin_leaves_the_command_line_working_with_one_warning_line_each(installed, features, tmp_path):
    """A real process: the built-in modes work, each plugin left out is one warning line on stderr, and the
    broken one is an unknown mode."""
    environment = {**os.environ, "PYTHONPATH": os.pathsep.join([str(installed), os.environ.get("PYTHONPATH", "")])}
    command = [sys.executable, "-m", "apecli", "eval", str(features.artifact.path), "--store", str(tmp_path / "s")]
    working = subprocess.run([*command, "--mode", "zero-shot"], capture_output=True, text=True, env=environment)
    assert working.returncode == 0, working.stderr  # a built-in mode needs no plugin loaded
    listed = subprocess.run([sys.executable, "-m", "apecli", "methods"], capture_output=True, text=True,
                            env=environment)
    assert listed.returncode == 0 and "nearest-mean\tnearest class mean\tplugin apecli_nearest_mean" in listed.stdout
    warnings = [line for line in listed.stderr.splitlines() if line.strip()]
    assert len(warnings) == 2 and all(line.startswith("apecli: warning: the method '") for line in warnings)
    broken = subprocess.run([*command, "--mode", "broken"], capture_output=True, text=True, env=environment)
    lines = broken.stderr.strip().splitlines()
    assert broken.returncode == 2 and "Traceback" not in broken.stderr  # a mode outside the choices: mistyped
    assert lines[-1].startswith("apecli: error: unknown mode 'broken'; choose one of zero-shot") and \
        "nearest-mean" in lines[-1] and len(lines) == 3
