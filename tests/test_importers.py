"""Importing APE / Tip-Adapter caches and .npz files, exporting them back, and refusing bad ones."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from apecli.errors import ApecliError
from apecli.importers import export_npz, import_npz, import_tip_adapter
from apecli.kinds.features import load_features
from apecli.synthetic import synthetic_features

from conftest import assert_one_line_error, raises_said, real_dataset, write_npz


def write_tip_adapter(folder: Path, features, *, text_name: str = "text.pt") -> Path:
    """A feature set in the APE / Tip-Adapter layout, float16 as the authors save it."""
    folder.mkdir(parents=True, exist_ok=True)
    half = lambda a: torch.from_numpy(np.asarray(a, dtype=np.float16))  # noqa: E731
    for shots, cache in features.caches.items():
        torch.save(half(cache.keys.T), folder / f"keys_{shots}shots.pt")
        torch.save(half(np.eye(features.num_classes)[cache.labels]), folder / f"values_{shots}shots.pt")
    for split in ("val", "test"):
        part = features.split(split)
        torch.save(half(part.features), folder / f"{split}_f.pt")
        torch.save(torch.from_numpy(part.labels), folder / f"{split}_l.pt")
    torch.save(half(features.classifier.T), folder / text_name)
    return folder


def test_tip_adapter_folder_imports_every_shot_count(small_features, tmp_path):
    folder = write_tip_adapter(tmp_path / "cache", small_features)
    imported = import_tip_adapter(folder, folder / "text.pt", "Caltech-101")
    assert imported.shots == (1, 4) and imported.dataset == "caltech101"
    assert imported.class_names[:2] == ("class_0", "class_1") and imported.provenance["class_names"] == "placeholders"
    np.testing.assert_array_equal(imported.caches[4].labels, small_features.caches[4].labels)
    np.testing.assert_array_equal(imported.caches[4].keys, small_features.caches[4].keys.astype(np.float16))
    assert imported.classifier.shape == (6, 32) and imported.classifier.dtype == np.float16
    assert set(imported.provenance["files"]) >= {"keys_4shots.pt", "val_f.pt", "text_weights"}


def test_cupl_text_weights_are_found_in_the_folder(small_features, tmp_path):
    folder = write_tip_adapter(tmp_path / "cache", small_features, text_name="text_weights_cupl_t.pt")
    assert import_tip_adapter(folder).num_classes == 6
    (folder / "text_weights_cupl_t.pt").unlink()
    with raises_said("pass --text-weights"):
        import_tip_adapter(folder)


@pytest.mark.parametrize("alone", ["val", "test"])  # ImageNet's folder as APE (val) or Tip-Adapter (test) writes it
def test_a_folder_with_one_evaluation_split_uses_it_for_both(small_features, tmp_path, alone):
    from typer.testing import CliRunner

    from apecli.cli import app

    folder = write_tip_adapter(tmp_path / "cache", small_features)
    other = "test" if alone == "val" else "val"
    for suffix in ("f", "l"):
        (folder / f"{other}_{suffix}.pt").unlink()
    imported = import_tip_adapter(folder, folder / "text.pt", "imagenet")
    expected = small_features.split(alone)
    for split in ("val", "test"):
        np.testing.assert_array_equal(imported.split(split).labels, expected.labels)
        np.testing.assert_array_equal(imported.split(split).features, expected.features.astype(np.float16))
    assert imported.provenance["notes"] == [f"{alone}_f.pt alone: its images serve as both validation and test, "
                                            "as the protocol has it for ImageNet"]
    result = CliRunner().invoke(app, ["import", "tip-adapter", str(folder), "--text-weights", str(folder / "text.pt"),
                                      "--store", str(tmp_path / "store")])
    assert result.exit_code == 0 and f"note: {alone}_f.pt alone" in result.stderr
    for suffix in ("f", "l"):
        (folder / f"{alone}_{suffix}.pt").unlink()
    with pytest.raises(ApecliError, match="no val_f.pt or test_f.pt"):
        import_tip_adapter(folder, folder / "text.pt")


def test_unnormalised_keys_are_refused_or_normalised_on_the_command_line(small_features, tmp_path):
    from typer.testing import CliRunner

    from apecli.cli import app

    folder = write_tip_adapter(tmp_path / "cache", small_features)
    torch.save(torch.load(folder / "keys_4shots.pt") * 5, folder / "keys_4shots.pt")  # as encoded, before normalising
    command = ["import", "tip-adapter", str(folder), "--text-weights", str(folder / "text.pt"), "--store", str(tmp_path / "store")]
    assert_one_line_error(CliRunner().invoke(app, command), "4-shot cache keys are not L2-normalised", "--normalise")
    assert not (tmp_path / "store").exists()
    result = CliRunner().invoke(app, [*command, "--normalise"])
    assert result.exit_code == 0, result.stderr
    assert "note: rows L2-normalised at import (4-shot cache keys: norms were" in result.stderr
    keys = load_features(result.stdout.strip()).cache(4)[1].keys.astype(np.float64)
    np.testing.assert_allclose(np.linalg.norm(keys, axis=1), 1.0, atol=1e-3)  # float16, as imported


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda f: (f / "val_l.pt").unlink(), "val_l.pt: no such file"),
        (lambda f: (f / "keys_4shots.pt").write_bytes((f / "keys_4shots.pt").read_bytes()[:100]), "keys_4shots.pt: not a readable tensor file"),
        (lambda f: torch.save(torch.zeros(24, 6), f / "values_4shots.pt"), "values_4shots.pt: rows are not one-hot"),
        (lambda f: torch.save(torch.zeros(64, 24), f / "keys_4shots.pt"), "64-channel keys, but val_f.pt has 32"),
        (lambda f: torch.save(torch.tensor([0, 1, 99] * 16), f / "val_l.pt"), "labels out of range"),
        (lambda f: torch.save({"a": torch.zeros(2)}, f / "test_f.pt"), "holds a dict"),
        (lambda f: torch.save(torch.load(f / "text.pt").T.contiguous(), f / "text.pt"),
         "text.pt: shape \\(6, 32\\), expected \\(D=32 channels, C classes\\); it holds C × D: transpose it"),
    ],
)
def test_damaged_tip_adapter_folders_are_refused(small_features, tmp_path, damage, message):
    folder = write_tip_adapter(tmp_path / "cache", small_features)
    damage(folder)
    with raises_said(message):
        import_tip_adapter(folder, folder / "text.pt")


def test_pickled_code_is_never_loaded(small_features, tmp_path):
    folder = write_tip_adapter(tmp_path / "cache", small_features)
    torch.save({"model": object.__new__(_Unsafe)}, folder / "text.pt")
    with pytest.raises(ApecliError, match="text.pt: not a readable tensor file"):
        import_tip_adapter(folder, folder / "text.pt")


class _Unsafe:
    pass


def test_not_a_cache_folder(tmp_path):
    with pytest.raises(ApecliError, match="not an APE / Tip-Adapter cache folder"):
        import_tip_adapter(tmp_path)
    with pytest.raises(ApecliError, match="no such folder"):
        import_tip_adapter(tmp_path / "absent")


def test_npz_import_export_round_trips_exactly(small_features, tmp_path):
    first = write_npz(tmp_path / "in.npz", small_features, shots=4)
    imported = import_npz(first, "dtd")
    assert "class_names" not in imported.provenance  # the file names them
    second = export_npz(imported, tmp_path / "out.npz")
    with np.load(first) as a, np.load(second) as b:
        assert sorted(a.files) == sorted(b.files)
        assert "cache_views" in a.files
        for name in a.files:
            assert a[name].dtype == b[name].dtype, name
            np.testing.assert_array_equal(a[name], b[name])


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda a: a.pop("val_labels"), "lacks val_labels"),
        (lambda a: a.update(cache_labels=a["cache_labels"] + 100), "cache_labels out of range"),
        (lambda a: a.update(val_features=np.hstack([a["val_features"]] * 2)), "mixed feature widths"),
        (lambda a: a.update(test_features=a["test_features"] * np.nan), "NaN"),
        (lambda a: a.update(cache_labels=np.r_[a["cache_labels"][:-1], 0]), "between 3 and 5 keys"),
        (lambda a: a.update(val_labels=a["val_labels"][:-1]), "labels for"),
        (lambda a: a.update(text_weights=a["text_weights"].T), "text_weights of shape \\(6, 32\\), expected \\(D=32 "
         "channels, C classes\\); it holds C × D: transpose it"),
        (lambda a: a.update(class_names=a["class_names"][:2]), "class_names of shape \\(2,\\), expected one name for each "
         "of the 6 classes"),
        (lambda a: a.update(text_weights=a["text_weights"][:0]), "text classifier has shape \\(6, 0\\)"),
        (lambda a: a.update(val_features=np.float32(3.0)), "val_features: of shape \\(\\), expected 2 dimensions"),
        (lambda a: a.update(cache_keys=a["cache_keys"].ravel()), "cache_keys: of shape \\(768,\\), expected 2 dimensions"),
        (lambda a: a.update(cache_views=a["cache_views"][0]), "cache_views: of shape \\(24, 32\\), expected 3 dimensions"),
        (lambda a: a.update(val_features=a["val_features"][:0], val_labels=a["val_labels"][:0]),
         "the val split holds no images"),
        (lambda a: a["cache_keys"].__setitem__((slice(2, 4),), 0.0), "cache keys: 2 row\\(s\\) of zeros \\(the first: row 2\\)"),
        (lambda a: a.update(test_features=a["test_features"] * 2.0),
         "test features are not L2-normalised \\(row norms from 2 to 2\\); import them with --normalise"),
    ],
)
def test_bad_npz_files_are_refused(small_features, tmp_path, change, message):
    with np.load(write_npz(tmp_path / "good.npz", small_features, shots=4)) as archive:
        arrays = {name: archive[name] for name in archive.files}
    change(arrays)
    np.savez(tmp_path / "bad.npz", **arrays)
    with raises_said(message):
        import_npz(tmp_path / "bad.npz")


def test_normalise_divides_every_row_by_its_norm_and_says_so(small_features, tmp_path):
    with np.load(write_npz(tmp_path / "good.npz", small_features, shots=4)) as archive:
        arrays = {name: archive[name] for name in archive.files}
    rng = np.random.default_rng(0)
    scaled = dict(arrays, cache_keys=arrays["cache_keys"] * rng.uniform(0.2, 30.0, (arrays["cache_keys"].shape[0], 1)),
                  val_features=arrays["val_features"] * 7.0)
    np.savez(tmp_path / "raw.npz", **scaled)
    features = import_npz(tmp_path / "raw.npz", normalise=True)
    for before, after in [(scaled["cache_keys"], features.cache(4)[1].keys), (scaled["val_features"], features.split("val").features),
                          (arrays["test_features"], features.split("test").features), (arrays["text_weights"].T, features.classifier)]:
        expected = before / np.linalg.norm(before.astype(np.float64), axis=1, keepdims=True)
        assert after.dtype == before.dtype
        np.testing.assert_allclose(after, expected, rtol=1e-6)
    notes = features.provenance["notes"]
    assert [note.split(" (")[1].split(":")[0] for note in notes] == ["4-shot cache keys", "val features"]
    assert import_npz(tmp_path / "good.npz", normalise=True).provenance.get("notes") is None  # nothing to do: unchanged


def test_a_feature_set_checks_that_its_features_are_tables_of_rows(small_features):
    from dataclasses import replace

    from apecli.kinds.features import LabelledFeatures

    test = small_features.split("test")
    flat = replace(small_features, splits={**small_features.splits, "test": LabelledFeatures(test.features.ravel(), test.labels)})
    with pytest.raises(ApecliError, match="test features have shape \\(1920,\\), expected \\(rows, 32 channels\\)"):
        flat.validate()


def test_truncated_npz_is_refused(small_features, tmp_path):
    data = write_npz(tmp_path / "good.npz", small_features).read_bytes()
    (tmp_path / "cut.npz").write_bytes(data[: len(data) // 3])
    with pytest.raises(ApecliError, match="cut.npz: not a readable .npz file"):
        import_npz(tmp_path / "cut.npz")


def test_a_file_that_is_no_npz_is_refused(tmp_path):
    (tmp_path / "notes.npz").write_text("not an archive")
    with pytest.raises(ApecliError, match="notes.npz: not a readable .npz file \\(not a zip archive\\)"):
        import_npz(tmp_path / "notes.npz")


def test_real_caltech_imports_with_its_published_figures():
    folder = real_dataset("caltech101")
    features = import_tip_adapter(folder, folder / "proxy_text_weights.pt", "caltech101")
    assert (features.num_classes, features.dim, features.shots) == (100, 512, (1, 2, 4, 8, 16))
    assert features.split("val").labels.shape == (1649,) and features.split("test").labels.shape == (2465,)
    from apecli.evaluate import evaluate_zero_shot

    assert evaluate_zero_shot(features).test_accuracy == pytest.approx(87.9, abs=0.1)  # the README's figure


def test_real_dtd_with_mixed_widths_is_refused():
    folder = real_dataset("dtd")
    with raises_said("keys_2shots.pt: 1024-channel keys, but val_f.pt has 512 channels: the "
                                          "folder mixes features of different models; re-extract it, or import the "
                                          "shot counts that match with --shots 1$"):
        import_tip_adapter(folder, folder / "proxy_text_weights.pt", "dtd")
    consistent = import_tip_adapter(folder, folder / "proxy_text_weights.pt", "dtd", shots=[1])
    assert consistent.shots == (1,) and consistent.dim == 512 and consistent.num_classes == 47


def test_chosen_shot_counts_are_imported_alone(tmp_path):
    features = synthetic_features(num_classes=4, dim=16, shots=(1, 2, 4), val_per_class=3, test_per_class=3, seed=1)
    for shots, cache in features.caches.items():
        torch.save(torch.from_numpy(cache.keys.T.copy()), tmp_path / f"keys_{shots}shots.pt")
        torch.save(torch.from_numpy(np.eye(4, dtype=np.float32)[cache.labels]), tmp_path / f"values_{shots}shots.pt")
    for split in ("val", "test"):
        part = features.split(split)
        torch.save(torch.from_numpy(part.features), tmp_path / f"{split}_f.pt")
        torch.save(torch.from_numpy(part.labels), tmp_path / f"{split}_l.pt")
    torch.save(torch.from_numpy(features.classifier.T.copy()), tmp_path / "text.pt")
    assert import_tip_adapter(tmp_path, tmp_path / "text.pt").shots == (1, 2, 4)
    chosen = import_tip_adapter(tmp_path, tmp_path / "text.pt", shots=[4, 1])
    assert chosen.shots == (1, 4)
    np.testing.assert_array_equal(chosen.caches[4].keys, features.caches[4].keys)
    with pytest.raises(ApecliError, match="no keys_8shots.pt \\(it holds 1, 2, 4 shots\\)"):
        import_tip_adapter(tmp_path, tmp_path / "text.pt", shots=[8])


def _rotated(x: np.ndarray, seed: int) -> np.ndarray:
    """The same features through another "encoder": a random rotation of the space."""
    rotation, _ = np.linalg.qr(np.random.default_rng(seed).normal(size=(x.shape[1], x.shape[1])))
    return (x @ rotation).astype(x.dtype)


def test_parts_from_different_encoders_are_warned_of():
    from dataclasses import replace

    from apecli.kinds.features import LabelledFeatures, mismatch_warnings

    features = synthetic_features(num_classes=10, dim=64, shots=(1, 4), val_per_class=20, seed=4)
    assert mismatch_warnings(features) == []
    val = features.split("val")
    stale = replace(features, splits={**features.splits, "val": LabelledFeatures(_rotated(val.features, 1), val.labels)})
    warnings = mismatch_warnings(stale)
    assert len(warnings) == 2 and warnings[0].startswith("by the text classifier, the validation images are classified "
                                                         "at chance (")
    assert warnings[1].startswith("by the 4-shot keys' class means, the validation images are classified at chance")
    other_text = replace(features, classifier=_rotated(features.classifier, 2))
    assert [w.split(",")[0] for w in mismatch_warnings(other_text)] == ["by the text classifier"]


@pytest.mark.parametrize("name", ["caltech101", "fgvc", "oxford_flowers", "oxford_pets", "ucf101"])
def test_the_real_features_raise_no_mismatch_warning(name):
    from apecli.kinds.features import mismatch_warnings

    folder = real_dataset(name)
    assert mismatch_warnings(import_tip_adapter(folder, folder / "proxy_text_weights.pt", name)) == []


def test_a_cache_without_text_gets_it_from_the_model_that_made_it(tiny, caltech, small_features, tmp_path):
    from typer.testing import CliRunner

    from apecli.cli import app
    from apecli.datasets import read_coop
    from apecli.extract import ExtractSettings, extract
    from apecli.kinds.features import load_features
    from apecli.predict import predict
    from apecli.store import open_artifact

    from conftest import assert_one_line_error

    dataset = read_coop("caltech101", caltech)
    made = extract(dataset, tiny, tmp_path / "made", ExtractSettings(shots=(2,), views=2, batch_size=8))
    folder = write_tip_adapter(tmp_path / "tip", made)
    (folder / "text.pt").unlink()  # Tip-Adapter saves no text classifier
    runner = CliRunner()
    base = ["import", "tip-adapter", str(folder), "--text-model", tiny.model, "--pretrained", tiny.pretrained,
            "--store", str(tmp_path / "store")]

    result = runner.invoke(app, [*base, "--dataset", "caltech101", "--root", str(caltech)])
    assert result.exit_code == 0, result.stderr
    assert "text classifier: 3 classes encoded by" in result.stderr
    imported = load_features(result.stdout.strip())
    assert imported.class_names == made.class_names
    np.testing.assert_array_equal(imported.classifier, made.classifier)  # as extract computed it
    assert imported.model["checkpoint_sha256"] == made.model["checkpoint_sha256"]
    assert "device" not in imported.model and "precision" not in imported.model
    assert imported.provenance["text"] == {"computed_by": "apecli-tiny", "templates": ["a photo of a {}."],
                                           "prompted_classes": 0}

    names = tmp_path / "names.txt"
    names.write_text("\n".join(made.class_names) + "\n")
    by_file = runner.invoke(app, [*base, "--class-names", str(names)])
    assert by_file.exit_code == 0, by_file.stderr
    np.testing.assert_array_equal(load_features(by_file.stdout.strip()).classifier, made.classifier)

    # the recorded encoder is enough to classify new images with a model chosen on the imported features
    refined = runner.invoke(app, ["refine", result.stdout.strip(), "--k", "16", "--store", str(tmp_path / "store")])
    evaluated = runner.invoke(app, ["eval", refined.stdout.strip(), "--search-step", "4", "3", "2",
                                    "--store", str(tmp_path / "store")])
    assert evaluated.exit_code == 0, evaluated.stderr
    test = made.split("test")
    predictions, _ = predict([Path(p) for p in test.paths], open_artifact(evaluated.stdout.strip()), top=1, device="cpu")
    assert len(predictions) == len(test.paths) and all(p.labels[0] in made.class_names for p in predictions)

    assert_one_line_error(runner.invoke(app, base), "needs the class names: give --class-names FILE")
    assert_one_line_error(runner.invoke(app, [*base, "--text-weights", str(names)]), "--text-weights or --text-model, not both")
    names.write_text("\n".join(made.class_names[:2]) + "\n")
    assert_one_line_error(runner.invoke(app, [*base, "--class-names", str(names)]),
                          "labels of 3 classes, but the text classifier has 2 (of the class names given)")
    with np.load(export_npz(made, tmp_path / "made.npz")) as archive:  # features from elsewhere, text lacking
        arrays = {name: archive[name] for name in archive.files if name != "text_weights"}
    np.savez(tmp_path / "textless.npz", **arrays)
    npz = ["import", "npz", str(tmp_path / "textless.npz"), *base[3:], "--dataset", "caltech101", "--root", str(caltech)]
    from_npz = runner.invoke(app, npz)
    assert from_npz.exit_code == 0, from_npz.stderr
    imported = load_features(from_npz.stdout.strip())
    np.testing.assert_array_equal(imported.classifier, made.classifier)
    assert imported.provenance["text"]["computed_by"] == "apecli-tiny" and "checkpoint_sha256" in imported.model
    assert_one_line_error(runner.invoke(app, ["import", "npz", str(tmp_path / "made.npz"), *base[3:], "--class-names",
                                              str(names)]), "holds text_weights already")
    np.savez(tmp_path / "renamed.npz", **{**arrays, "class_names": np.array(["x", "y", "z"])})
    assert_one_line_error(runner.invoke(app, ["import", "npz", str(tmp_path / "renamed.npz"), *npz[3:]]),
                          "its class_names differ from those the text was computed from")

    narrow = write_tip_adapter(tmp_path / "narrow", small_features)  # 32 channels: not this 64-channel model's
    (narrow / "text.pt").unlink()
    names.write_text("\n".join(small_features.class_names) + "\n")
    assert_one_line_error(runner.invoke(app, [*base[:2], str(narrow), *base[3:], "--class-names", str(names)]),
                          "the text of apecli-tiny has 64 channels, the cache's features 32")


def test_a_dataset_name_apecli_does_not_know_is_said_with_the_nearest_one(small_features, tmp_path):
    from typer.testing import CliRunner

    from apecli.cli import app
    from apecli.presets import nearest_dataset, unknown_dataset

    assert [nearest_dataset(name) for name in ("pets", "Flowers", "aircraft", "caltec101", "my_birds")] == [
        "oxford_pets", "oxford_flowers", "fgvc", "caltech101", None]
    assert unknown_dataset("oxford_pets") is None and unknown_dataset("OxfordPets") is None
    assert unknown_dataset("imagenet-v2") is None and unknown_dataset(None) is None
    folder = write_tip_adapter(tmp_path / "cache", small_features)
    command = ["import", "tip-adapter", str(folder), "--text-weights", str(folder / "text.pt"), "--store", str(tmp_path / "s")]
    result = CliRunner().invoke(app, [*command, "--dataset", "pets"])
    assert result.exit_code == 0, result.stderr
    assert result.stderr.splitlines()[0] == (
        "note: 'pets' is not a dataset apecli knows, so its settings are the generic ones; did you mean oxford_pets? "
        "(known: caltech101, dtd, eurosat, fgvc, food101, imagenet, oxford_flowers, oxford_pets, stanford_cars, sun397, "
        "ucf101, imagenet_a, imagenet_r, imagenet_sketch, imagenetv2)")
    known = CliRunner().invoke(app, [*command, "--dataset", "Oxford_Pets"])
    assert known.exit_code == 0 and "note: " not in known.stderr
    unnamed = CliRunner().invoke(app, command)
    assert unnamed.exit_code == 0
    assert "note: no --dataset named, so the settings are the generic ones" in unnamed.stderr
