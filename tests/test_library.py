"""The library without the command line, as the README shows it."""

from __future__ import annotations

import sys

import numpy as np

import apecli
from apecli import evaluate_training_free, load_features, save_features, select_channels
from apecli.methods.grid import SearchGrid
from apecli.synthetic import synthetic_features


def test_the_readme_example(tmp_path):
    save_features(synthetic_features(num_classes=5, dim=32, shots=(4, 16)), tmp_path / "features.h5")
    features = load_features(tmp_path / "features.h5")
    refinement = select_channels(features, k=16)
    result = evaluate_training_free(features, refinement, SearchGrid((7.0, 7.0, 1.0), (10, 10, 5)))
    assert refinement.shots == 16 and refinement.k == 16
    assert result.val_accuracy >= result.zero_shot_val and 0 <= result.test_accuracy <= 100
    assert None not in (result.alpha, result.beta, result.gamma)
    given = evaluate_training_free(features, refinement, apecli.default_grid(features).fixing(alpha=1.2))
    assert given.alpha == 1.2 and given.search.correct.shape == (200, 1, 20)  # the dataset-less grid, α given
    assert given.summary()["given"] == {"alpha": 1.2} and "given" not in result.summary()


def test_the_core_library_leaves_typer_and_rich_alone():
    """Every core module imports in a fresh interpreter without loading the command line's packages."""
    import subprocess

    modules = ["apecli", "apecli.refine", "apecli.evaluate", "apecli.methods.registry", "apecli.kinds",
               "apecli.extract", "apecli.datasets", "apecli.encoder", "apecli.fitting", "apecli.bench",
               "apecli.predict", "apecli.importers", "apecli.distributed"]
    code = f"import sys; import {', '.join(modules)}; print(sorted({{m.split('.')[0] for m in sys.modules}} & {{'typer', 'rich', 'click'}}))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
    assert set(apecli.__all__) >= {"load_features", "select_channels", "evaluate_training_free", "ApecliError"}


def test_the_public_api_imports_light_and_fits_ape_t(tmp_path):
    """``import apecli`` loads neither torch, open_clip nor h5py; APE-T runs from the names it exports."""
    import subprocess

    code = "import sys, apecli; print(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'open_clip', 'h5py'}))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0 and done.stdout.strip() == "[]", done.stderr
    assert all(hasattr(apecli, name) for name in apecli.__all__)

    from apecli import FitSettings, evaluate_training_required, fit, load_classifier, save_evaluation, save_fit

    features = save_features(synthetic_features(num_classes=4, dim=24, shots=(4,), views=2), tmp_path / "f.h5")
    fitted = save_fit(fit(features, FitSettings(shots=4, epochs=2, k=12)), features, tmp_path / "fit.h5")
    result = evaluate_training_required(features, fitted, SearchGrid((7.0, 7.0, 1.0), (6, 5, 1)))
    evaluation = save_evaluation(result, [fitted.artifact], tmp_path / "eval.h5")  # the parent predict follows
    classifier = load_classifier(evaluation)
    probabilities = classifier.probabilities(features.split("test").features)
    assert probabilities.shape == (len(features.split("test").labels), 4)
    assert np.allclose(probabilities.sum(axis=1), 1.0)
