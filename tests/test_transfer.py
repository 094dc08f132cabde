"""transfer: an evaluated model tested, unchanged, on other feature sets; ImageNet's shifted test sets."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from apecli import store
from apecli.cli import app
from apecli.datasets import read_coop
from apecli.errors import ApecliError
from apecli.evaluate import evaluate_artifact
from apecli.extract import ExtractSettings, extract
from apecli.fitting import fit
from apecli.kinds.adapter import save_fit
from apecli.kinds.evaluation import save_evaluation
from apecli.kinds.features import LabelledFeatures, load_features, save_features
from apecli.methods.ape_t import FitSettings
from apecli.methods.grid import SearchGrid
from apecli.methods.tri_edge import TriEdge
from apecli.predict import load_classifier
from apecli.synthetic import make_image, synthetic_features
from apecli.transfer import transfer

from conftest import assert_one_line_error, raises_said

runner = CliRunner()
GRID = SearchGrid((7.0, 7.0, 1.0), (8, 6, 4))
MODEL = {"model": "ViT-B-32", "pretrained": "openai", "precision": "fp32"}


@pytest.fixture
def source(tmp_path):
    features = synthetic_features(num_classes=6, dim=32, shots=(4,), val_per_class=8, test_per_class=10, seed=5)
    return save_features(replace(features, model=MODEL), store.in_store(tmp_path / "s", "synthetic", "features"))


def evaluated(source, mode: str, tmp_path: Path) -> store.Artifact:
    artifact = source.artifact
    if mode == "training-required":
        artifact = save_fit(fit(source, FitSettings(epochs=3, lr=1e-2)), source, tmp_path / "fit.h5").artifact
    evaluation = evaluate_artifact(artifact, mode, None, GRID)
    return save_evaluation(evaluation, [artifact], tmp_path / f"eval-{mode}.h5")


def shifted(source, tmp_path: Path, keep=(4, 1, 3), noise: float = 0.3, model=MODEL, name="shifted.h5"):
    """A test set of some of the source's classes, listed in another order, with its images moved."""
    rng = np.random.default_rng(11)
    test = source.split("test")
    rows = np.flatnonzero(np.isin(test.labels, keep))
    x = test.features[rows] + noise * rng.normal(size=(rows.size, source.dim)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    relabel = {old: new for new, old in enumerate(keep)}
    target = replace(source, class_names=tuple(source.class_names[c] for c in keep),
                     classifier=source.classifier[list(keep)], caches={}, model=model, dataset="shifted",
                     splits={"test": LabelledFeatures(x, np.array([relabel[c] for c in test.labels[rows]]))})
    return save_features(target, tmp_path / name)


@pytest.mark.parametrize("mode", ["zero-shot", "training-free", "training-required", "tip-adapter",
                                  "tip-adapter-f", "gda", "proker"])
def test_a_model_tested_on_its_own_features_scores_its_own_test_accuracy(source, tmp_path, mode):
    evaluation = evaluated(source, mode, tmp_path)
    [result] = transfer(evaluation, [source.artifact])
    assert result.total == source.split("test").labels.shape[0]
    assert result.accuracy == pytest.approx(evaluation.metadata["test_accuracy"], abs=1e-12)
    np.testing.assert_array_equal(result.predictions, evaluation.read("test/predictions"))  # image by image
    labels = source.split("test").labels
    per_class = [np.mean(evaluation.read("test/predictions")[labels == c] == c) for c in range(source.num_classes)]
    assert evaluation.metadata["test_class_accuracy"] == pytest.approx(100 * np.mean(per_class), abs=1e-12)
    model, x = load_classifier(evaluation), source.split("test").features.astype(np.float64)
    np.testing.assert_allclose(model.probabilities(x).sum(axis=1), 1.0, rtol=1e-9)
    if mode == "proker":  # its regression is on the cosines' scale: probabilities as CLIP scales its logits
        scores = 100.0 * model.scores(x)
        expected = np.exp(scores - scores.max(axis=1, keepdims=True))
        np.testing.assert_allclose(model.probabilities(x), expected / expected.sum(axis=1, keepdims=True), rtol=1e-9)


def test_a_subset_of_classes_is_scored_over_those_classes_only(source, tmp_path):
    evaluation = evaluated(source, "training-free", tmp_path)
    target = shifted(source, tmp_path)
    [result] = transfer(evaluation, [target.artifact])
    meta = evaluation.metadata
    _, cache = source.cache(4)
    tri = TriEdge.build(source.classifier, cache.keys, cache.labels, evaluation.read("channels"))
    x = target.split("test").features.astype(np.float64)
    logits = tri.logits(x, meta["alpha"], meta["beta"], meta["gamma"])[:, [4, 1, 3]]
    np.testing.assert_array_equal(result.predictions, logits.argmax(axis=1))
    assert result.correct == int((logits.argmax(axis=1) == target.split("test").labels).sum())
    assert result.classes == 3 and 0 < result.accuracy < 100  # the noise costs some images, not all


def test_targets_that_cannot_meet_the_model_are_refused(source, tmp_path):
    evaluation = evaluated(source, "zero-shot", tmp_path)
    other = shifted(source, tmp_path, model={**MODEL, "pretrained": "laion2b_s34b_b79k"}, name="other.h5")
    with pytest.raises(ApecliError, match="extracted with ViT-B-32 \\(laion2b_s34b_b79k\\), the model's features"):
        transfer(evaluation, [other.artifact])
    renamed = shifted(source, tmp_path, name="renamed.h5")
    renamed = save_features(replace(load_features(renamed.artifact), class_names=("a", "b", "c")), tmp_path / "names.h5")
    with pytest.raises(ApecliError, match="3 of its 3 classes are not the model's \\(first: 'a'\\)"):
        transfer(evaluation, [renamed.artifact])
    wide = synthetic_features(num_classes=6, dim=16, shots=(4,), seed=5)
    wide = save_features(replace(wide, model=MODEL), tmp_path / "wide.h5")
    with pytest.raises(ApecliError, match="features of 16 channels, the model's have 32"):
        transfer(evaluation, [wide.artifact])
    with pytest.raises(ApecliError, match="at least one target"):
        transfer(evaluation, [])


def test_unnamed_classes_are_matched_by_position_and_only_between_equal_counts(source, tmp_path):
    from apecli.kinds.features import PLACEHOLDERS

    evaluation = evaluated(source, "zero-shot", tmp_path)
    unnamed = lambda features, name: save_features(  # noqa: E731  as an import without class names records them
        replace(features, class_names=tuple(f"class_{i}" for i in range(features.num_classes)),
                provenance={**features.provenance, "class_names": PLACEHOLDERS}), tmp_path / name)
    subset = unnamed(load_features(shifted(source, tmp_path).artifact), "subset.h5")
    with raises_said("subset.h5: its classes are unnamed .* so the 3 classes of the target cannot "
                                          "be matched to the model's 6: import it with --class-names"):
        transfer(evaluation, [subset.artifact])
    whole = unnamed(replace(source, caches={}, dataset="shifted", splits={"test": source.split("test")}), "whole.h5")
    said = []
    [result] = transfer(evaluation, [whole.artifact], said.append)
    assert said == [f"warning: {whole.artifact.path}: its classes are unnamed (imported without class names): "
                    "matched by position"]
    assert result.accuracy == evaluation.metadata["test_accuracy"]  # the same images, class for class


def test_unrecorded_encoders_are_said_not_checked(source, tmp_path):
    evaluation = evaluated(source, "zero-shot", tmp_path)
    bare = shifted(source, tmp_path, model={}, name="bare.h5")
    said = []
    [result] = transfer(evaluation, [bare.artifact], said.append)
    assert said == [f"warning: {bare.artifact.path} records no encoder: cannot check that both feature sets share one"]
    assert result.total == 30
    named = shifted(source, tmp_path, model={"name": "ViT-B-32"}, name="named.h5")  # imported with --model alone
    said.clear()
    transfer(evaluation, [named.artifact], said.append)
    assert said == [f"warning: {named.artifact.path} records no weights for ViT-B-32: cannot check that both feature "
                    "sets share them"]
    other = shifted(source, tmp_path, model={"name": "RN50"}, name="rn50.h5")
    with pytest.raises(ApecliError, match=r"extracted with RN50 \(weights unrecorded\), the model's features with ViT-B-32"):
        transfer(evaluation, [other.artifact])


def test_transfer_on_the_command_line(source, tmp_path):
    evaluation = evaluated(source, "training-free", tmp_path)
    target = shifted(source, tmp_path)
    store_dir = tmp_path / "s"
    done = runner.invoke(app, ["transfer", "--to", str(target.artifact.path), "--to", str(source.artifact.path),
                               "--store", str(store_dir), "--json"], input=str(evaluation.path))
    assert done.exit_code == 0, done.stderr
    payload = json.loads(done.stdout)
    assert [t["classes"] for t in payload["targets"]] == [3, 6]
    assert payload["targets"][1]["test_accuracy"] == pytest.approx(payload["source_test_accuracy"])
    saved = store.open_artifact(payload["artifact"], ["transfer"])
    assert [p.kind for p in saved.parents] == ["evaluation", "features", "features"]
    assert saved.read("predictions/0").shape == (30,)
    assert "shifted" in done.stderr and "tested elsewhere" in done.stderr
    listed = runner.invoke(app, ["ls", str(store_dir), "--kind", "transfer"])
    assert "training-free on shifted" in listed.stdout
    assert_one_line_error(runner.invoke(app, ["transfer", str(evaluation.path), "--store", str(store_dir)]),
                          "give at least one target features artifact (--to)")
    assert_one_line_error(runner.invoke(app, ["transfer", str(evaluation.path), "--to", str(evaluation.path)]),
                          "expected 'features'")


def _shifted_layouts(root: Path) -> None:
    """ImageNet (2 classes of 3 in train and val), ImageNet-V2 (all 3, by label) and ImageNet-R (2 of 3)."""
    lines = "n01440764 tench\nn01443537 goldfish\nn01484850 great white shark\n"
    wnids = ("n01440764", "n01443537", "n01484850")
    for folder in ("imagenet", "imagenetv2", "imagenet-rendition", "imagenet-sketch", "imagenet-adversarial"):
        (root / folder).mkdir(parents=True)
        (root / folder / "classnames.txt").write_text(lines)
    for label, wnid in enumerate(wnids):
        for i in range(4):
            make_image(root / "imagenet" / "images" / "train" / wnid / f"{i}.JPEG", label, i)
            make_image(root / "imagenet" / "images" / "val" / wnid / f"{i}.JPEG", label, 10 + i)
            make_image(root / "imagenetv2" / "imagenetv2-matched-frequency-format-val" / str(label) / f"{i}.jpeg",
                       label, 20 + i)
    for label in (2, 0):
        for i in range(3):
            make_image(root / "imagenet-rendition" / "imagenet-r" / wnids[label] / f"{i}.jpg", label, 30 + i)
    (root / "imagenet-rendition" / "imagenet-r" / "README.txt").write_text("not a class")


def test_the_shifted_imagenet_layouts(tmp_path):
    _shifted_layouts(tmp_path)
    v2 = read_coop("imagenet-v2", tmp_path)
    assert v2.test_only and v2.class_names == ("tench", "goldfish", "great white shark")
    assert v2.splits["train"] == () and v2.splits["val"] == () and len(v2.splits["test"]) == 12
    assert v2.splits["test"][4][0].parent.name == "1" and v2.splits["test"][4][1] == 1
    rendition = read_coop("imagenet_r", tmp_path)
    assert rendition.class_names == ("tench", "great white shark")  # classnames.txt order, present folders only
    assert [label for _, label in rendition.splits["test"]] == [0, 0, 0, 1, 1, 1]
    assert len(rendition.templates) == 7
    with pytest.raises(ApecliError, match="imagenet-sketch: missing images/"):
        read_coop("imagenet_sketch", tmp_path)
    (tmp_path / "imagenet-adversarial" / "imagenet-a" / "n99999999").mkdir(parents=True)
    with pytest.raises(ApecliError, match="folder 'n99999999' is no class of classnames.txt"):
        read_coop("imagenet_a", tmp_path)
    (tmp_path / "imagenet" / "classnames.txt").write_text("n01440764 tench\nn01443537\n")
    with pytest.raises(ApecliError, match="imagenet/classnames.txt: expected lines of 'wnid class name'"):
        read_coop("imagenet", tmp_path)


def test_imagenet_to_its_shifted_test_sets_end_to_end(tiny, tmp_path):
    _shifted_layouts(tmp_path / "data")
    settings = ExtractSettings(shots=(1, 2), views=2, batch_size=8, workers=0)
    imagenet = extract(read_coop("imagenet", tmp_path / "data"), tiny, tmp_path / "s", settings)
    rendition = extract(read_coop("imagenet_r", tmp_path / "data"), tiny, tmp_path / "s", settings)
    assert rendition.shots == () and set(rendition.splits) == {"test"}
    assert rendition.artifact.metadata["provenance"]["shots"] == []
    again = extract(read_coop("imagenet_r", tmp_path / "data"), tiny, tmp_path / "s", replace(settings, shots=(8,), seed=3))
    assert again.artifact.path == rendition.artifact.path  # no few-shot draw: shots and seed change nothing
    np.testing.assert_allclose(rendition.classifier, imagenet.classifier[[0, 2]], rtol=1e-5, atol=1e-6)
    evaluation = save_evaluation(evaluate_artifact(imagenet.artifact, "training-free", 2, GRID),
                                 [imagenet.artifact], tmp_path / "eval.h5")
    [result] = transfer(evaluation, [rendition.artifact])
    assert result.total == 6 and result.classes == 2
    refused = runner.invoke(app, ["refine", str(rendition.artifact.path), "--store", str(tmp_path / "s")])
    assert_one_line_error(refused, "holds no few-shot cache (a test set only: score an evaluated model on it with "
                                   "apecli transfer)")
    zero_shot = runner.invoke(app, ["eval", str(rendition.artifact.path), "--mode", "zero-shot"])
    assert_one_line_error(zero_shot, "has no val split (a test set only")
    listed = runner.invoke(app, ["ls", str(tmp_path / "s"), "--kind", "features"]).stdout.splitlines()
    assert ["shots [1, 2]" in listed[0], "a test set only" in listed[1]] == [True, True]


def test_a_damaged_evaluation_is_refused_in_one_line(source, tmp_path):
    import h5py

    for mode, name, message in [("tip-adapter-f", "learned/keys", r"trained keys of shape \(23, 32\), for a cache of \(24, 32\)"),
                                ("training-free", "channels", "its channels .* are not indices of 32-channel features")]:
        evaluation = evaluated(source, mode, tmp_path)
        with h5py.File(evaluation.path, "a") as handle:
            array, attrs = handle[name][()], dict(handle[name].attrs)
            del handle[name]
            handle.create_dataset(name, data=array[:-1] if mode == "tip-adapter-f" else array + 32).attrs.update(attrs)
        with pytest.raises(ApecliError, match=message):
            transfer(store.open_artifact(evaluation.path), [source.artifact])


def test_a_proker_evaluation_of_its_earlier_regression_is_refused(source, tmp_path):
    evaluation = evaluate_artifact(source.artifact, "proker", None, GRID)
    del evaluation.extra["formula"]  # as an earlier apecli wrote it: β and λ of another regression
    earlier = save_evaluation(evaluation, [source.artifact], tmp_path / "earlier.h5")
    with raises_said("earlier apecli, whose regression differed .*eval --mode proker again"):
        transfer(earlier, [source.artifact])
