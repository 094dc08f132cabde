"""apecli predict: new images through the artifact's own encoder and classifier."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from apecli.cli import app
from apecli.datasets import read_coop
from apecli.errors import ApecliError
from apecli.evaluate import evaluate_artifact
from apecli.extract import ExtractSettings, extract
from apecli.kinds.evaluation import save_evaluation
from apecli.kinds.features import save_features
from apecli.kinds.refinement import save_refinement
from apecli.methods.grid import SearchGrid
from apecli.methods.tri_edge import TriEdge
from apecli.predict import predict
from apecli.refine import select_channels
from apecli.synthetic import synthetic_features

from conftest import assert_one_line_error

runner = CliRunner()
GRID = SearchGrid((7.0, 7.0, 1.0), (6, 5, 3))


@pytest.fixture
def extracted(tiny, caltech, tmp_path):
    return extract(read_coop("caltech101", caltech), tiny, tmp_path / "s",
                   ExtractSettings(shots=(2, 4), views=2, workers=0))


def _evaluation(features, mode, tmp_path, **kwargs):
    source = features.artifact
    if mode == "training-free":
        source = save_refinement(select_channels(features, k=32), features, tmp_path / "r.h5").artifact
    evaluation = evaluate_artifact(source, mode, grid=GRID, **kwargs)
    return save_evaluation(evaluation, [source], tmp_path / f"eval-{mode}.h5")


def test_training_free_predictions_equal_the_stored_features_classified(extracted, tmp_path):
    evaluation = _evaluation(extracted, "training-free", tmp_path)
    val = extracted.split("val")
    predictions, skipped = predict([Path(p) for p in val.paths], evaluation, top=3, device="cpu")
    assert skipped == [] and len(predictions) == len(val.paths)
    meta = evaluation.metadata
    _, cache = extracted.cache(4)
    tri = TriEdge.build(extracted.classifier, cache.keys, cache.labels, evaluation.read("channels"))
    logits = tri.logits(val.features, meta["alpha"], meta["beta"], meta["gamma"])
    expected = np.exp(logits - logits.max(1, keepdims=True))
    expected /= expected.sum(1, keepdims=True)
    for row, prediction in enumerate(predictions):
        assert prediction.labels[0] == extracted.class_names[int(np.argmax(logits[row]))]
        assert prediction.probabilities[0] == pytest.approx(expected[row].max(), abs=1e-4)
        assert list(prediction.probabilities) == sorted(prediction.probabilities, reverse=True)


@pytest.mark.parametrize("mode", ["zero-shot", "tip-adapter", "tip-adapter-f", "gda", "proker"])
def test_every_mode_predicts_probabilities(extracted, tmp_path, mode):
    evaluation = _evaluation(extracted, mode, tmp_path)
    images = [Path(p) for p in extracted.split("test").paths[:3]]
    predictions, _ = predict(images, evaluation, top=3, device="cpu")
    for prediction in predictions:  # top 3 of 3 classes: the whole distribution
        assert sorted(prediction.labels) == sorted(extracted.class_names)
        assert 0 <= prediction.probabilities[-1] <= prediction.probabilities[0] <= 1
        assert sum(prediction.probabilities) == pytest.approx(1.0)


def test_a_fitted_model_predicts(extracted, tmp_path):
    from apecli.fitting import fit
    from apecli.kinds.adapter import save_fit
    from apecli.methods.ape_t import FitSettings

    fitted = save_fit(fit(extracted, FitSettings(epochs=2, lr=1e-2)), extracted, tmp_path / "fit.h5")
    evaluation = evaluate_artifact(fitted.artifact, "training-required", grid=GRID)
    saved = save_evaluation(evaluation, [fitted.artifact], tmp_path / "eval.h5")
    predictions, _ = predict([Path(extracted.split("test").paths[0])], saved, top=1, device="cpu")
    assert predictions[0].labels[0] in extracted.class_names


def test_bad_files_are_named_or_skipped(extracted, tmp_path):
    evaluation = _evaluation(extracted, "zero-shot", tmp_path)
    good = Path(extracted.split("test").paths[0])
    bad = tmp_path / "notes.jpg"
    bad.write_text("not an image")
    with pytest.raises(ApecliError, match="notes.jpg: unreadable image"):
        predict([good, bad], evaluation, device="cpu")
    predictions, skipped = predict([good, bad], evaluation, device="cpu", skip_bad=True)
    assert [p.path for p in predictions] == [str(good)] and skipped[0]["path"] == str(bad)
    with pytest.raises(ApecliError, match="absent.jpg: no such file or folder"):
        predict([tmp_path / "absent.jpg"], evaluation, device="cpu")
    (tmp_path / "empty" / "below").mkdir(parents=True)
    (tmp_path / "empty" / "notes.txt").write_text("no image")
    with pytest.raises(ApecliError, match="empty: a folder with no image files"):
        predict([tmp_path / "empty"], evaluation, device="cpu")


def test_a_folder_stands_for_its_image_files(extracted, tmp_path):
    evaluation = _evaluation(extracted, "zero-shot", tmp_path)
    images = [Path(p) for p in extracted.split("test").paths[:3]]
    folder = tmp_path / "photos"
    (folder / "b").mkdir(parents=True)
    (folder / ".hidden").mkdir()
    copies = [folder / "b" / "one.JPG", folder / "two.png", folder / ".hidden" / "three.jpg"]
    for image, copy in zip(images, copies):
        copy.write_bytes(image.read_bytes())  # the suffix names no format: the decoder reads the bytes
    (folder / "readme.txt").write_text("not an image")
    predictions, _ = predict([folder, images[2]], evaluation, device="cpu")
    assert [p.path for p in predictions] == [str(copies[0]), str(copies[1]), str(images[2])]
    alone, _ = predict(images[:2], evaluation, device="cpu")
    assert [p.probabilities for p in predictions[:2]] == [p.probabilities for p in alone]


def test_imported_features_cannot_predict(tmp_path):
    features = save_features(synthetic_features(num_classes=3, dim=16, shots=(2,)), tmp_path / "f.h5")
    evaluation = save_evaluation(evaluate_artifact(features.artifact, "zero-shot"), [features.artifact], tmp_path / "e.h5")
    result = runner.invoke(app, ["predict", str(tmp_path / "f.h5"), "--model-artifact", str(evaluation.path)])
    assert_one_line_error(result, "records no encoder")


def test_a_changed_checkpoint_is_refused(extracted, tiny, tmp_path):
    evaluation = _evaluation(extracted, "zero-shot", tmp_path)
    checkpoint = Path(tiny.pretrained)
    original = checkpoint.read_bytes()
    try:
        checkpoint.write_bytes(original + b"\0")
        with pytest.raises(ApecliError, match="changed since the features were extracted"):
            predict([Path(extracted.split("test").paths[0])], evaluation, device="cpu")
    finally:
        checkpoint.write_bytes(original)


def test_predict_on_the_command_line(extracted, tmp_path):
    evaluation = _evaluation(extracted, "training-free", tmp_path)
    images = list(extracted.split("test").paths[:2])
    result = runner.invoke(app, ["predict", *images, "--model-artifact", str(evaluation.path), "--top", "2", "--device", "cpu"])
    assert result.exit_code == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert lines[0] == "path,rank,label,probability" and len(lines) == 5
    assert lines[1].startswith(f"{images[0]},1,thing_")
    as_json = runner.invoke(app, ["predict", *images, "--model-artifact", str(evaluation.path), "--json", "--device", "cpu"])
    payload = json.loads(as_json.stdout)
    assert len(payload["predictions"]) == 2 and len(payload["predictions"][0]["top"]) == 3  # only 3 classes


def test_workers_left_out_are_extracts_and_give_what_the_main_process_gives(extracted, tmp_path, monkeypatch):
    """Without workers, predict decodes in as many processes as extract would on its device."""
    import apecli.extract

    evaluation = _evaluation(extracted, "zero-shot", tmp_path)
    images = [Path(p) for p in extracted.split("test").paths[:6]]
    used = []
    encode_images = apecli.extract.encode_images

    def recording(encoder, paths, settings, progress=None):
        used.append(settings.workers)
        return encode_images(encoder, paths, settings, progress)

    monkeypatch.setattr(apecli.extract, "encode_images", recording)
    monkeypatch.setattr(apecli.extract, "cores", lambda: 2)
    in_workers, _ = predict(images, evaluation, top=3, device="cpu")
    in_main, _ = predict(images, evaluation, top=3, device="cpu", workers=0)
    assert used == [2, 0]
    assert [(p.labels, p.probabilities) for p in in_workers] == [(p.labels, p.probabilities) for p in in_main]
