"""The HDF5 store: round trips, self-description, atomic writes, and refusals in one clear line."""

from __future__ import annotations

import errno
import os

import h5py
import numpy as np
import pytest

from apecli import store
from apecli.errors import ApecliError
from apecli.files import replacing
from apecli.kinds.features import load_features, save_features
from apecli.kinds.refinement import load_refinement, save_refinement
from apecli.refine import select_channels

from conftest import no_partial_files


def test_features_round_trip_exactly(small_features, tmp_path):
    saved = save_features(small_features, tmp_path / "f.h5")
    loaded = load_features(tmp_path / "f.h5", with_views=True)
    assert loaded.class_names == small_features.class_names
    np.testing.assert_array_equal(loaded.classifier, small_features.classifier)
    for shots, cache in small_features.caches.items():
        np.testing.assert_array_equal(loaded.caches[shots].keys, cache.keys)
        np.testing.assert_array_equal(loaded.caches[shots].labels, cache.labels)
        np.testing.assert_array_equal(loaded.caches[shots].views, cache.views)
    for split in ("val", "test"):
        np.testing.assert_array_equal(loaded.split(split).features, small_features.split(split).features)
    assert loaded.artifact.content_id == saved.artifact.content_id


def test_every_element_says_what_it_is(small_features, tmp_path):
    save_features(small_features, tmp_path / "f.h5")
    with h5py.File(tmp_path / "f.h5", "r") as handle:
        assert handle.attrs["format"] == "apecli" and handle.attrs["format_version"] == "1.0"
        assert handle.attrs["kind"] == "features" and len(handle.attrs["content_id"]) == 16
        names = []
        handle.visititems(lambda name, item: names.append(name) if isinstance(item, h5py.Dataset) else None)
        assert "cache/4/views" in names and "text/classifier" in names
        for name in names:
            assert handle[name].attrs["encoding-type"] in ("array", "string-array")
            assert handle[name].attrs["encoding-version"] == "1.0"


def test_content_id_names_the_file_and_is_stable(small_features, store_dir):
    first = save_features(small_features, store.in_store(store_dir, "synthetic", "features"))
    second = save_features(small_features, store.in_store(store_dir, "synthetic", "features"))
    assert first.artifact.path == second.artifact.path
    assert first.artifact.path.name == f"features-{first.artifact.content_id[:12]}.h5"
    assert first.artifact.path.parent.name == "synthetic"


def test_a_failed_write_leaves_nothing_behind(small_features, tmp_path, monkeypatch):
    def explode(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(h5py.Group, "create_dataset", explode)
    with pytest.raises(OSError, match="disk full") as failure:
        save_features(small_features, tmp_path / "f.h5")
    assert failure.value.filename == str(tmp_path / "f.h5")  # not the temporary file's name
    assert list(tmp_path.iterdir()) == []


def test_a_newer_major_version_is_refused(small_features, tmp_path):
    save_features(small_features, tmp_path / "f.h5")
    with h5py.File(tmp_path / "f.h5", "a") as handle:
        handle.attrs["format_version"] = "2.0"
    with pytest.raises(ApecliError, match="newer apecli"):
        load_features(tmp_path / "f.h5")


def test_a_header_without_its_kind_or_content_id_is_refused(small_features, tmp_path):
    for name in ("kind", "content_id"):
        save_features(small_features, tmp_path / f"{name}.h5")
        with h5py.File(tmp_path / f"{name}.h5", "a") as handle:
            del handle.attrs[name]
        with pytest.raises(ApecliError, match=f"{name}.h5: its header is damaged \\(no {name}\\)"):
            store.open_artifact(tmp_path / f"{name}.h5")


def test_a_newer_minor_version_is_read(small_features, tmp_path):
    save_features(small_features, tmp_path / "f.h5")
    with h5py.File(tmp_path / "f.h5", "a") as handle:
        handle.attrs["format_version"] = "1.7"
    assert load_features(tmp_path / "f.h5").num_classes == 6


def test_foreign_truncated_and_missing_files_are_refused(small_features, tmp_path):
    with h5py.File(tmp_path / "foreign.h5", "w") as handle:
        handle["x"] = np.zeros(3)
    with pytest.raises(ApecliError, match="not an apecli artifact"):
        store.open_artifact(tmp_path / "foreign.h5")
    save_features(small_features, tmp_path / "f.h5")
    data = (tmp_path / "f.h5").read_bytes()
    (tmp_path / "cut.h5").write_bytes(data[: len(data) // 2])
    with pytest.raises(ApecliError, match="cut.h5"):
        load_features(tmp_path / "cut.h5")
    with pytest.raises(ApecliError, match="no such file"):
        store.open_artifact(tmp_path / "absent.h5")
    (tmp_path / "text.h5").write_text("hello")
    with pytest.raises(ApecliError, match="not a readable HDF5 artifact"):
        store.open_artifact(tmp_path / "text.h5")


def test_a_refinement_refuses_a_changed_parent(small_features, tmp_path):
    features = save_features(small_features, tmp_path / "f.h5")
    refinement = save_refinement(select_channels(features, k=8), features, tmp_path / "r.h5")
    load_refinement(refinement.artifact.path)  # unchanged: fine
    from dataclasses import replace

    changed = replace(small_features, classifier=small_features.classifier[:, ::-1].copy())
    save_features(changed, tmp_path / "f.h5")
    with pytest.raises(ApecliError, match="changed since it was written"):
        load_refinement(tmp_path / "r.h5")
    (tmp_path / "f.h5").unlink()
    with pytest.raises(ApecliError, match="parent features artifact f.h5 is missing"):
        load_refinement(tmp_path / "r.h5")


def test_parents_of_one_kind_are_opened_by_their_place_among_them(small_features, tmp_path):
    from dataclasses import replace

    features = save_features(small_features, tmp_path / "first.h5")
    first = features.artifact
    second = save_features(replace(small_features, dataset="other"), tmp_path / "second.h5").artifact
    refinement = save_refinement(select_channels(features, k=8), features, tmp_path / "r.h5").artifact
    child = store.write_artifact(tmp_path / "child.h5", "transfer", {}, {}, [refinement, first, second])
    assert child.parent("features").path == first.path == child.parent("features", 0).path
    assert child.parent("features", 1).metadata["dataset"] == "other"
    with pytest.raises(ApecliError, match="records only 2 parents of kind 'features'"):
        child.parent("features", 2)
    with pytest.raises(ApecliError, match="records no parent of kind 'adapter'"):
        child.parent("adapter")


def test_a_moved_store_keeps_its_links(small_features, tmp_path):
    features = save_features(small_features, tmp_path / "a" / "f.h5")
    save_refinement(select_channels(features, k=8), features, tmp_path / "a" / "r.h5")
    (tmp_path / "a").rename(tmp_path / "b")
    refinement, parent = load_refinement(tmp_path / "b" / "r.h5")
    assert parent.artifact.path == tmp_path / "b" / "f.h5" and refinement.k == 8


def test_the_wrong_kind_is_refused(small_features, tmp_path):
    features = save_features(small_features, tmp_path / "f.h5")
    with pytest.raises(ApecliError, match="of kind 'features', expected 'refinement'"):
        load_refinement(features.artifact.path)


def test_features_of_different_widths_are_refused(small_features, tmp_path):
    from dataclasses import replace

    from apecli.kinds.features import LabelledFeatures

    test = small_features.split("test")
    wide = LabelledFeatures(np.hstack([test.features, test.features]), test.labels)
    with pytest.raises(ApecliError, match="mixed feature widths: test features have 64 channels"):
        save_features(replace(small_features, splits={**small_features.splits, "test": wide}), tmp_path / "f.h5")
    assert no_partial_files(tmp_path) and not (tmp_path / "f.h5").exists()


def test_newest_artifact_of_a_kind(small_features, store_dir):
    import os

    features = save_features(small_features, store.in_store(store_dir, "a", "features"))
    refinement = save_refinement(select_channels(features, k=8), features, store.in_store(store_dir, "a", "refine"))
    os.utime(features.artifact.path, (1, 1))
    assert store.newest_artifact(store_dir, ["features"]).path == features.artifact.path
    assert store.newest_artifact(store_dir, ["features", "refinement"]).path == refinement.artifact.path
    with pytest.raises(ApecliError, match="no evaluation artifact"):
        store.newest_artifact(store_dir, ["evaluation"])


def _chain(small_features, folder):
    """features → refinement → evaluation, in a store folder."""
    from apecli.evaluate import evaluate_training_free
    from apecli.kinds.evaluation import save_evaluation
    from apecli.methods.grid import SearchGrid

    features = save_features(small_features, store.in_store(folder, "a", "features"))
    refinement = select_channels(features, k=8)
    saved = save_refinement(refinement, features, store.in_store(folder, "a", "refine"))
    result = evaluate_training_free(features, refinement, SearchGrid((2.0, 2.0, 1.0), (3, 3, 3)))
    evaluation = save_evaluation(result, [features.artifact, saved.artifact], store.in_store(folder, "a", "eval"))
    return features.artifact.path, saved.artifact.path, evaluation.path


def test_staleness_is_a_parent_missing_or_changed_and_passes_down(small_features, tmp_path):
    from dataclasses import replace

    features, refinement, evaluation = _chain(small_features, tmp_path)
    assert [store.stale_reason(store.open_artifact(p)) for p in (features, refinement, evaluation)] == [None] * 3
    changed = replace(small_features, classifier=small_features.classifier[:, ::-1].copy())
    save_features(changed, features)  # another content at the same path
    known: dict = {}
    for path in (refinement, evaluation):
        assert "features-" in store.stale_reason(store.open_artifact(path), known)
        assert "changed since it was written" in known[path.resolve()]
    features.unlink()
    assert store.stale_reason(store.open_artifact(refinement)) == f"its parent features artifact {features.name} is missing"

    def write(name: str, value: float, *parents):
        return store.write_artifact(tmp_path / name, "note", {"x": np.array([value])}, {}, parents)

    first = write("1.h5", 1.0)
    second = write("2.h5", 2.0, first)
    third = write("3.h5", 3.0, second)
    write("1.h5", 1.5)  # only the grandparent changed: the grandchild is stale through its parent
    assert store.stale_reason(third) == f"its parent {second.path} is stale"


def test_gc_removes_what_nothing_can_use_and_nothing_else(small_features, tmp_path):
    import os
    import time

    from typer.testing import CliRunner

    from apecli.cli import app

    from conftest import assert_one_line_error

    runner = CliRunner()
    root = tmp_path / "store"
    features, refinement, evaluation = _chain(small_features, root)
    kept_features = save_features(small_features, store.in_store(root, "b", "features")).artifact.path
    old, young = root / "a" / ".features-0123456789ab.h5.999.tmp", root / "a" / ".refine-0123456789ab.h5.998.tmp"
    foreign = root / "a" / ".editor-swap.tmp"  # not a name apecli writes: left alone however old
    work = root / "a" / ".extract-0123456789abcdef"
    work.mkdir()
    (work / "val-00000.npz").write_bytes(b"")
    (work / ".val-00001.npz.7.tmp").write_bytes(b"")
    for path in (old, young, foreign):
        path.write_bytes(b"partial")
    for path in (old, foreign):
        os.utime(path, (time.time() - 2 * store.TEMPORARY_AGE_S,) * 2)
    os.utime(work / ".val-00001.npz.7.tmp", (1, 1))  # an extraction's own: goes with its folder only
    features.unlink()

    listing = runner.invoke(app, ["ls", str(root)])
    assert listing.exit_code == 0
    marked = [line for line in listing.stdout.splitlines() if "[stale: " in line]
    assert [line.split("\t")[0] for line in marked] == [str(refinement), str(evaluation)]
    assert "2 stale" in listing.stderr and "apecli gc" in listing.stderr

    everything = sorted(root.rglob("*"))
    dry = runner.invoke(app, ["gc", str(root), "--dry-run"])
    assert dry.exit_code == 0 and sorted(root.rglob("*")) == everything
    assert [line.split("\t")[:2] for line in dry.stdout.splitlines()] == [
        ["would remove", str(refinement)], ["would remove", str(evaluation)], ["would remove", str(old)]]
    assert f"kept {work}" in dry.stderr.replace("\n", "") and "chunks saved: 1" in dry.stderr

    done = runner.invoke(app, ["gc", "--store", str(root), "--json"])
    report = __import__("json").loads(done.stdout)
    assert [entry["path"] for entry in report["removed"]] == [str(refinement), str(evaluation), str(old)]
    assert not refinement.exists() and not evaluation.exists() and not old.exists()
    assert kept_features.exists() and young.exists() and foreign.exists() and (work / "val-00000.npz").exists()
    assert "stale" not in runner.invoke(app, ["ls", str(root)]).stdout

    runner.invoke(app, ["gc", str(root), "--work"])
    assert not work.exists() and kept_features.exists()
    assert_one_line_error(runner.invoke(app, ["gc", str(tmp_path / "nowhere")]), "no such folder")


def test_gc_keeps_what_may_only_be_out_of_reach(small_features, tmp_path):
    """A parent whose whole folder is absent, outside the store, may be on a drive not mounted: gc keeps
    its descendants (ls still marks them, since no command can read them now). A folder absent inside the
    store was removed, so what hangs on it goes."""
    import shutil

    root, drive = tmp_path / "store", tmp_path / "drive"

    def refined(parent_folder, child_folder):
        features = save_features(small_features, store.in_store(parent_folder, "a", "features"))
        return save_refinement(select_channels(features, k=8), features, store.in_store(child_folder, "a", "refine")).artifact

    outside, inside = refined(drive, root), refined(root / "x", root / "y")
    grandchild = store.write_artifact(root / "a" / "note.h5", "note", {"x": np.array([1.0])}, {}, [outside])
    (drive / "a").rename(tmp_path / "elsewhere")  # the drive unmounted
    shutil.rmtree(root / "x")  # a folder of the store, removed

    reason = store.stale_reason(outside)
    assert reason == f"its parent features artifact {outside.parents[0].path} is missing, and so is its folder {drive / 'a'}"
    assert reason.absent_folder == drive / "a" and store.stale_reason(grandchild).absent_folder == drive / "a"
    assert store.stale_reason(inside).absent_folder == root / "x" / "a"
    removed, kept = store.collect_garbage(root, dry_run=True)
    assert [path for path, _ in removed] == [inside.path]
    assert sorted(path for path, _ in kept) == sorted([outside.path, grandchild.path])
    assert all(f"lies outside {root} (a drive not mounted?)" in why for _, why in kept)
    from typer.testing import CliRunner

    from apecli.cli import app

    listing = CliRunner().invoke(app, ["ls", str(root)])
    assert listing.exit_code == 0 and sum("[stale: " in line for line in listing.stdout.splitlines()) == 3
    assert "3 stale" in listing.stderr and "except 2 whose missing ancestor's folder lies outside" in " ".join(listing.stderr.split())

    (tmp_path / "elsewhere").rename(drive / "a")  # mounted again
    assert store.stale_reason(outside) is None and store.stale_reason(grandchild) is None


def test_a_whole_file_write_replaces_or_leaves_the_file_as_it_was(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("old")
    with pytest.raises(RuntimeError), replacing(path) as temporary:
        temporary.write_text("half")
        raise RuntimeError("killed")
    assert path.read_text() == "old" and sorted(tmp_path.iterdir()) == [path]
    with replacing(path) as temporary:
        temporary.write_text("new")
        assert path.read_text() == "old"  # nothing shows until the block ends
    assert path.read_text() == "new" and sorted(tmp_path.iterdir()) == [path]
    with pytest.raises(ApecliError, match="is a folder; give the path of a file to write"), replacing(tmp_path):
        pass
    with pytest.raises(OSError) as failure, replacing(path) as temporary:
        temporary.write_text("partly")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(temporary))  # the file system names the temporary
    assert (failure.value.errno, failure.value.strerror, failure.value.filename) == \
        (errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
    assert path.read_text() == "new" and sorted(tmp_path.iterdir()) == [path]


@pytest.mark.parametrize("damage, message", [
    (lambda views: views[:, :-1], r"4-shot views have shape \(10, 23, 32\), expected \(V ≥ 1, 24, 32\)"),
    (lambda views: views * np.nan, "4-shot views contain NaN or infinite values"),
])
def test_views_read_from_disk_are_checked_as_the_rest(small_features, tmp_path, damage, message):
    save_features(small_features, tmp_path / "f.h5")
    with h5py.File(tmp_path / "f.h5", "a") as handle:
        views = handle["cache/4/views"][()]
        attrs = dict(handle["cache/4/views"].attrs)
        del handle["cache/4/views"]
        handle.create_dataset("cache/4/views", data=damage(views)).attrs.update(attrs)
    features = load_features(tmp_path / "f.h5")  # the views stay on disk until asked for
    with pytest.raises(ApecliError, match=f"f.h5: {message}"):
        features.views(4)


def _every_kind(small_features, folder):
    """One artifact of every kind: the chain above, then an adapter, its evaluation, and a transfer of the
    first evaluation onto the features' own test split."""
    from apecli.evaluate import evaluate_artifact
    from apecli.fitting import fit
    from apecli.kinds.adapter import save_fit
    from apecli.kinds.evaluation import save_evaluation
    from apecli.kinds.transfer import save_transfer
    from apecli.methods.ape_t import FitSettings
    from apecli.methods.grid import SearchGrid
    from apecli.transfer import transfer

    features, refined, evaluation = (store.open_artifact(path) for path in _chain(small_features, folder))
    loaded = load_features(features)
    adapter = save_fit(fit(loaded, FitSettings(epochs=2, lr=1e-2)), loaded, folder / "fit.h5").artifact
    grid = SearchGrid((7.0, 7.0, 1.0), (4, 3, 2))
    fitted = save_evaluation(evaluate_artifact(adapter, "training-required", None, grid), [adapter], folder / "eval-t.h5")
    moved = save_transfer(evaluation, [features], transfer(evaluation, [features]), folder / "transfer.h5")
    return [features, refined, evaluation, adapter, fitted, moved]


def _documented_content_id(path) -> str:
    """The content id as docs/cache-format.md spells it, computed from the file with h5py and hashlib alone."""
    import hashlib
    import json

    digest = hashlib.sha256()
    with h5py.File(path, "r") as handle:
        digest.update(handle.attrs["kind"].encode() + handle.attrs["metadata"].encode())
        for parent in json.loads(handle.attrs["parents"]):
            digest.update((parent["kind"] + parent["content_id"]).encode())
        names = []
        handle.visititems(lambda name, item: names.append(name) if isinstance(item, h5py.Dataset) else None)
        for name in sorted(names):
            dataset = handle[name]
            digest.update(name.encode())
            if dataset.attrs["encoding-type"] == "string-array":
                strings = [str(s) for s in np.asarray(dataset.asstr()[()]).ravel()]
                digest.update(json.dumps(strings, separators=(",", ":")).encode())
            else:
                digest.update(f"{dataset.dtype.str}{dataset.shape}".encode() + np.ascontiguousarray(dataset[()]).tobytes())
    return digest.hexdigest()[:16]


def test_every_kind_of_artifact_verifies_and_its_id_follows_the_documented_recipe(small_features, tmp_path, monkeypatch):
    from dataclasses import replace

    named = replace(small_features, class_names=("café", "straße", "c", "d", "e", "f"))  # strings, not ASCII
    chain = _every_kind(named, tmp_path)
    assert [a.kind for a in chain] == ["features", "refinement", "evaluation", "adapter", "evaluation", "transfer"]
    for artifact in chain:
        assert _documented_content_id(artifact.path) == artifact.content_id, artifact.kind
    results = store.verify([chain[-1], chain[4]])  # both leaves: their ancestors are the rest
    assert sorted(str(item.path) for item in results) == sorted(str(a.path) for a in chain)
    assert all(item.problem is None and item.recomputed == item.content_id for item in results)
    monkeypatch.setattr(store, "VERIFY_BLOCK_BYTES", 100)  # a few rows at a time: the same hash
    assert all(item.problem is None for item in store.verify(chain))


@pytest.mark.parametrize("where", ["array", "metadata", "parents"])
def test_an_artifact_edited_in_place_fails_verification_and_so_does_what_hangs_on_it(small_features, tmp_path, where):
    features = save_features(small_features, tmp_path / "f.h5")
    refined = save_refinement(select_channels(features, k=8), features, tmp_path / "r.h5").artifact
    features = features.artifact
    edited = features if where != "parents" else refined
    with h5py.File(edited.path, "r+") as handle:
        if where == "array":
            values = handle["val/features"][()]
            handle["val/features"][0] = -values[0]
        elif where == "metadata":
            handle.attrs["metadata"] = handle.attrs["metadata"].replace('"dim":32', '"dim":33')
        else:
            handle.attrs["parents"] = handle.attrs["parents"].replace(features.content_id, "0" * 16)
    if where != "parents":
        assert load_refinement(refined.path)[0].k == 8  # an edit in place passes the parent check that commands make
    results = {item.path.name: item for item in store.verify([store.open_artifact(refined.path)])}
    if where == "parents":  # its own hash changed (and the parent it now names is not there)
        assert list(results) == ["r.h5"] and "modified since it was written" in results["r.h5"].problem
    else:
        assert results["f.h5"].problem.startswith("modified since it was written: its contents hash to ")
        assert results["f.h5"].recomputed != features.content_id
        assert results["r.h5"].problem == f"its ancestor {features.path} fails verification"


def test_a_truncated_or_orphaned_artifact_fails_verification(small_features, tmp_path):
    features = save_features(small_features, tmp_path / "f.h5")
    refined = save_refinement(select_channels(features, k=8), features, tmp_path / "r.h5").artifact
    features = features.artifact
    copy = tmp_path / "copy.h5"
    copy.write_bytes(features.path.read_bytes())
    header = store.open_artifact(copy)
    with open(copy, "r+b") as handle:
        handle.truncate(copy.stat().st_size - 2000)  # the header still opens; the last arrays do not
    [truncated] = store.verify([header])
    assert truncated.recomputed is None and "cannot be read whole" in truncated.problem
    features.path.unlink()
    [orphan] = store.verify([refined])
    assert orphan.recomputed == orphan.content_id and "parent features artifact f.h5 is missing" in orphan.problem
