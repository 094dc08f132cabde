"""CLIP_benchmark's feature folders imported, and results written in its form."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from apecli.cli import app
from apecli.evaluate import evaluate_method
from apecli.importers import import_npz
from apecli.interop import folder_name_parts, import_clip_benchmark, import_clip_retrieval
from apecli.kinds.features import load_features
from apecli.methods import Options, registry
from apecli.synthetic import synthetic_features

from conftest import assert_one_line_error

runner = CliRunner()
SEED = 3


@pytest.fixture(scope="module")
def source():
    """A feature set whose 20-shot cache stands for a train split of 20 images a class."""
    return synthetic_features(num_classes=5, dim=32, shots=(20,), val_per_class=6, test_per_class=8, seed=5)


def write_folder(folder: Path, features, *, val: bool = True, scale: float = 1.0) -> Path:
    """A CLIP_benchmark linear-probe folder and its zero-shot head (the features scaled by ``scale``)."""
    folder.mkdir(parents=True)
    _, cache = features.cache(20)
    splits = {"train": (cache.keys, cache.labels), "test": (features.split("test").features, features.split("test").labels)}
    if val:
        splits["val"] = (features.split("val").features, features.split("val").labels)
    for split, (x, y) in splits.items():
        torch.save(torch.from_numpy(np.asarray(x, dtype=np.float32) * scale), folder / f"features_{split}.pt")
        torch.save(torch.from_numpy(np.asarray(y, dtype=np.int64)), folder / f"targets_{split}.pt")
    torch.save(torch.from_numpy(np.ascontiguousarray(features.classifier.T)), folder.parent / "head.pt")
    return folder


def drawn(labels: np.ndarray, k: int, seed: int) -> np.ndarray:
    """The rows of the K-shot cache, drawn here as the protocol says: a seeded order a class, its first K."""
    rng = random.Random(seed)
    orders = [rng.sample(np.flatnonzero(labels == c).tolist(), int((labels == c).sum())) for c in range(5)]
    return np.array([row for order in orders for row in order[:k]])


def test_the_folder_name_gives_model_pretrained_and_dataset():
    assert folder_name_parts(Path("ViT-B-32-laion2b_s34b_b79k-cifar10")) == ("ViT-B-32", "laion2b_s34b_b79k", "cifar10")
    assert folder_name_parts(Path("features")) is None


def test_a_clip_benchmark_folder_imports_as_the_same_features_through_npz(source, tmp_path):
    folder = write_folder(tmp_path / "ViT-B-32-openai-caltech101", source)
    result = runner.invoke(app, ["import", "clip-benchmark", str(folder), "--text-weights", str(tmp_path / "head.pt"),
                                 "--shots", "1,4", "--seed", str(SEED), "--store", str(tmp_path / "s"), "--json"])
    assert result.exit_code == 0, result.stderr
    imported = load_features(json.loads(result.stdout)["artifact"])
    assert imported.dataset == "caltech101" and imported.shots == (1, 4) and imported.seed == SEED
    assert imported.provenance["clip_benchmark"] == {"model": "ViT-B-32", "pretrained": "openai", "dataset": "caltech101"}
    _, train = source.cache(20)
    for k in (1, 4):
        rows = drawn(train.labels, k, SEED)
        np.testing.assert_array_equal(imported.caches[k].keys, train.keys[rows])
        np.testing.assert_array_equal(imported.caches[k].labels, train.labels[rows])
    one, four = imported.caches[1].keys, imported.caches[4].keys.reshape(5, 4, -1)
    np.testing.assert_array_equal(one, four[:, 0])  # nested: each class's first shot is the 1-shot cache
    rows = drawn(train.labels, 4, SEED)
    arrays = {"text_weights": source.classifier.T, "cache_keys": train.keys[rows], "cache_labels": train.labels[rows],
              **{f"{split}_{what}": getattr(source.split(split), attr) for split in ("val", "test")
                 for what, attr in (("features", "features"), ("labels", "labels"))}}
    np.savez(tmp_path / "same.npz", **arrays)
    same = import_npz(tmp_path / "same.npz", "caltech101")
    for mode in ("gda", "tip-adapter", "timo"):
        ours, theirs = (evaluate_method(f, registry.get(mode).create(Options()), 4) for f in (imported, same))
        assert (ours.val_accuracy, ours.test_accuracy) == (theirs.val_accuracy, theirs.test_accuracy), mode


def test_rows_off_unit_norm_are_normalised_and_said(source, tmp_path):
    folder = write_folder(tmp_path / "RN50-openai-dtd", source, scale=3.0)
    imported = import_clip_benchmark(folder, tmp_path / "head.pt", shots=(4,))
    np.testing.assert_allclose(np.linalg.norm(imported.split("test").features, axis=1), 1.0, rtol=1e-5)
    assert any("L2-normalised at import" in note for note in imported.notes)


def test_a_folder_without_validation_takes_a_seeded_part_of_train_apart_from_the_shots(source, tmp_path):
    folder = write_folder(tmp_path / "RN50-openai-dtd", source, val=False)
    imported = import_clip_benchmark(folder, tmp_path / "head.pt", shots=(1, 4), seed=SEED)
    val = imported.split("val")
    assert val.labels.shape[0] == 5 * 4  # 20 % of each class's 20 images
    shot_rows = {tuple(row) for row in imported.caches[4].keys.tolist()}
    assert not shot_rows & {tuple(row) for row in val.features.tolist()}
    assert any("no validation split: validation is 20 training images" in note for note in imported.notes)


@pytest.mark.parametrize("damage, message", [
    (lambda f: torch.save(torch.zeros(7, dtype=torch.int64), f / "targets_train.pt"), "100 features, but targets_train.pt has 7"),
    (lambda f: torch.save(torch.full((40,), 9, dtype=torch.int64), f / "targets_test.pt"),
     "class index 9 out of range for the head's 5 classes"),
    (lambda f: torch.save(torch.zeros(16, 5), f.parent / "head.pt"), "16 channels, the features have 32"),
    (lambda f: (f / "targets_val.pt").unlink(), "targets_val.pt: no such file"),
    (lambda f: torch.save(torch.zeros(30, 32), f / "features_train.pt"), "30 features, but targets_train.pt has 100"),
])
def test_bad_folders_are_one_line_and_write_nothing(source, tmp_path, damage, message):
    folder = write_folder(tmp_path / "RN50-openai-dtd", source)
    damage(folder)
    result = runner.invoke(app, ["import", "clip-benchmark", str(folder), "--text-weights", str(tmp_path / "head.pt"),
                                 "--store", str(tmp_path / "s")])
    assert_one_line_error(result, message)
    assert not list((tmp_path / "s").rglob("*.h5")) if (tmp_path / "s").exists() else True


def test_too_few_training_images_for_the_shots_is_one_line(source, tmp_path):
    folder = write_folder(tmp_path / "RN50-openai-dtd", source)
    result = runner.invoke(app, ["import", "clip-benchmark", str(folder), "--text-weights", str(tmp_path / "head.pt"),
                                 "--shots", "32", "--store", str(tmp_path / "s")])
    assert_one_line_error(result, "class 0 has 20 training images, fewer than 32 shots", "--shots")


def test_results_in_clip_benchmarks_form(source, tmp_path):
    folder = write_folder(tmp_path / "ViT-B-32-openai-caltech101", source)
    store = tmp_path / "s"
    imported = runner.invoke(app, ["import", "clip-benchmark", str(folder), "--text-weights", str(tmp_path / "head.pt"),
                                   "--shots", "4", "--store", str(store)])
    assert imported.exit_code == 0, imported.stderr
    features = imported.stdout.strip()
    plain = runner.invoke(app, ["eval", features, "--mode", "gda", "--store", str(store), "--json"])
    result = runner.invoke(app, ["eval", features, "--mode", "gda", "--store", str(store), "--format", "clip-benchmark"])
    assert result.exit_code == 0, result.stderr
    summary, theirs = json.loads(plain.stdout), json.loads(result.stdout)
    assert {"dataset", "model", "pretrained", "task", "metrics"} <= set(theirs)
    assert (theirs["dataset"], theirs["model"], theirs["pretrained"]) == ("caltech101", "ViT-B-32", "openai")
    assert theirs["metrics"]["acc1"] == pytest.approx(summary["test_accuracy"] / 100)
    assert theirs["metrics"]["mean_per_class_recall"] == pytest.approx(summary["test_class_accuracy"] / 100)
    assert theirs["metrics"]["fewshot_k"] == 4 and theirs["method"] == "gda"
    assert "artifact" in summary and "val_accuracy" in summary  # --json keeps its keys
    both = runner.invoke(app, ["eval", features, "--mode", "gda", "--store", str(store), "--format", "clip-benchmark",
                               "--json"])
    assert_one_line_error(both, "--json or --format clip-benchmark")
    unknown = runner.invoke(app, ["eval", features, "--store", str(store), "--format", "csv"])
    assert_one_line_error(unknown, "unknown format 'csv'")
    assert unknown.exit_code == 2
    bench = runner.invoke(app, ["bench", features, "--modes", "zero-shot,gda", "--out", str(tmp_path / "b"),
                                "--store", str(store)])
    assert bench.exit_code == 0, bench.stderr
    cells = sorted((tmp_path / "b" / "clip-benchmark").glob("*.json"))
    assert len(cells) == 2 and (tmp_path / "b" / "results.csv").is_file()
    rows = {row["mode"]: row for row in json.loads((tmp_path / "b" / "results.json").read_text())}
    for cell in cells:
        written = json.loads(cell.read_text())
        assert written["metrics"]["acc1"] == pytest.approx(rows[written["method"]]["test_accuracy"] / 100)


# ---- clip-retrieval ----

def write_retrieval(folder: Path, features, parts: int = 2, column: str | None = None) -> Path:
    """clip-retrieval's output for ``features``' 20-shot cache, validation and test images, in ``parts`` files:
    float16 embeddings, and image paths whose folder is the class name (``class_c``)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    _, cache = features.cache(20)
    x = np.concatenate([cache.keys, features.split("val").features, features.split("test").features])
    y = np.concatenate([cache.labels, features.split("val").labels, features.split("test").labels])
    split = ["train"] * len(cache.labels) + ["val"] * len(features.split("val").labels) + ["test"] * len(
        features.split("test").labels)
    (folder / "img_emb").mkdir(parents=True)
    (folder / "metadata").mkdir()
    for part, rows in enumerate(np.array_split(np.arange(len(y)), parts)):
        np.save(folder / "img_emb" / f"img_emb_{part}.npy", x[rows].astype(np.float16))
        table = {"image_path": [f"/data/images/class_{y[r]}/img_{r}.jpg" for r in rows],
                 "caption": [f"image {r}" for r in rows], "split": [split[r] for r in rows],
                 "label": [f"class_{y[r]}" for r in rows]}
        pq.write_table(pa.table(table), folder / "metadata" / f"metadata_{part}.parquet")
    return folder


def test_clip_retrieval_folders_import_by_folder_or_column(source, tmp_path):
    folder = write_retrieval(tmp_path / "out", source)
    torch.save(torch.from_numpy(np.ascontiguousarray(source.classifier.T)), tmp_path / "text.pt")
    result = runner.invoke(app, ["import", "clip-retrieval", str(folder), "--splits", "split", "--text-weights",
                                 str(tmp_path / "text.pt"), "--shots", "4", "--seed", str(SEED),
                                 "--store", str(tmp_path / "s"), "--json"])
    assert result.exit_code == 0, result.stderr
    imported = load_features(json.loads(result.stdout)["artifact"])
    assert imported.class_names == tuple(f"class_{c}" for c in range(5))
    _, train = source.cache(20)
    rows = drawn(train.labels, 4, SEED)
    np.testing.assert_allclose(imported.caches[4].keys, train.keys[rows], atol=2e-3)  # float16 embeddings
    np.testing.assert_array_equal(imported.split("test").labels, source.split("test").labels)
    by_column = import_clip_retrieval(folder, "label", "split", tmp_path / "text.pt", shots=(4,), seed=SEED)
    np.testing.assert_array_equal(by_column.caches[4].keys, imported.caches[4].keys)
    arrays = {"text_weights": source.classifier.T, "cache_keys": imported.caches[4].keys,
              "cache_labels": imported.caches[4].labels,
              **{f"{split}_{what}": getattr(imported.split(split), attr) for split in ("val", "test")
                 for what, attr in (("features", "features"), ("labels", "labels"))}}
    np.savez(tmp_path / "same.npz", **arrays)
    same = import_npz(tmp_path / "same.npz")
    for mode in ("gda", "tip-adapter"):
        ours, theirs = (evaluate_method(f, registry.get(mode).create(Options()), 4) for f in (imported, same))
        assert (ours.val_accuracy, ours.test_accuracy) == (theirs.val_accuracy, theirs.test_accuracy), mode


def test_clip_retrieval_splits_by_fractions_of_each_class(source, tmp_path):
    folder = write_retrieval(tmp_path / "out", source, parts=1)
    torch.save(torch.from_numpy(np.ascontiguousarray(source.classifier.T)), tmp_path / "text.pt")
    imported = import_clip_retrieval(folder, "folder", "0.6/0.2/0.2", tmp_path / "text.pt", shots=(1, 4), seed=SEED)
    per_class = 20 + 6 + 8
    assert imported.split("val").labels.shape[0] == 5 * round(0.2 * per_class)
    assert imported.split("test").labels.shape[0] == 5 * (per_class - round(0.6 * per_class) - round(0.2 * per_class))


@pytest.mark.parametrize("args, message", [
    (["--labels", "species"], "has no column 'species'"),
    (["--splits", "fold"], "has no column 'fold'"),
    (["--splits", "0.5/0.5/0.5"], "fractions that sum to 1"),
    (["--splits", "caption"], "column 'caption' holds 'image 0', not train, val or test"),
])
def test_bad_clip_retrieval_input_is_one_line(source, tmp_path, args, message):
    folder = write_retrieval(tmp_path / "out", source)
    torch.save(torch.from_numpy(np.ascontiguousarray(source.classifier.T)), tmp_path / "text.pt")
    result = runner.invoke(app, ["import", "clip-retrieval", str(folder), "--text-weights", str(tmp_path / "text.pt"),
                                 *args, "--store", str(tmp_path / "s")])
    assert_one_line_error(result, message)
    assert not (tmp_path / "s").exists() or not list((tmp_path / "s").rglob("*.h5"))


def test_clip_retrieval_without_pyarrow_says_what_to_install(source, tmp_path, monkeypatch):
    import sys

    folder = write_retrieval(tmp_path / "out", source)
    torch.save(torch.from_numpy(np.ascontiguousarray(source.classifier.T)), tmp_path / "text.pt")
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    result = runner.invoke(app, ["import", "clip-retrieval", str(folder), "--text-weights", str(tmp_path / "text.pt"),
                                 "--store", str(tmp_path / "s")])
    assert_one_line_error(result, "needs pyarrow: pip install 'apecli[interop]'")


def test_clip_retrieval_embeddings_and_metadata_of_different_lengths_are_refused(source, tmp_path):
    folder = write_retrieval(tmp_path / "out", source)
    np.save(folder / "img_emb" / "img_emb_1.npy", np.zeros((3, 32), np.float16) + 0.1)
    torch.save(torch.from_numpy(np.ascontiguousarray(source.classifier.T)), tmp_path / "text.pt")
    result = runner.invoke(app, ["import", "clip-retrieval", str(folder), "--text-weights", str(tmp_path / "text.pt"),
                                 "--store", str(tmp_path / "s")])
    assert_one_line_error(result, "metadata_1.parquet", "rows of metadata, but img_emb_1.npy holds 3 embeddings")


# ---- WebDataset shards ----

def write_shards(images: Path, shards: Path, per_shard: int = 4) -> Path:
    """The images of ``images/{train,val,test}/<class>/*`` as WebDataset shards, samples in the order a folder
    is listed (classes sorted, files sorted), each an image and its class index in .cls."""
    import io
    import tarfile

    names = sorted(path.name for path in (images / "train").iterdir() if path.is_dir())
    shards.mkdir(parents=True)
    (shards / "classes.txt").write_text("\n".join(names) + "\n")
    for part in ("train", "val", "test"):
        samples = [(path, label) for label, name in enumerate(names) for path in sorted((images / part / name).iterdir())]
        (shards / part).mkdir()
        for number, start in enumerate(range(0, len(samples), per_shard)):
            with tarfile.open(shards / part / f"{part}-{number:04d}.tar", "w") as tar:
                for index, (path, label) in enumerate(samples[start:start + per_shard]):
                    key = f"sample{start + index:06d}"
                    for name, data in ((f"{key}{path.suffix}", path.read_bytes()), (f"{key}.cls", str(label).encode())):
                        info = tarfile.TarInfo(name)
                        info.size = len(data)
                        tar.addfile(info, io.BytesIO(data))
    return shards


def test_webdataset_shards_extract_as_the_same_images_in_folders(tiny, tmp_path):
    from apecli.datasets import read_image_folder
    from apecli.extract import ExtractSettings, extract
    from apecli.synthetic import demo_images

    images = demo_images(tmp_path / "images", classes=3, per_split=(5, 3, 3))
    shards = write_shards(images, tmp_path / "shards")
    settings = ExtractSettings(shots=(1, 2), views=2, workers=0, chunk_images=4)
    from_folders = extract(read_image_folder(images), tiny, tmp_path / "a", settings)
    dataset = read_image_folder(shards)
    assert dataset.class_names == from_folders.class_names and len(dataset.splits["train"]) == 15
    from_shards = extract(dataset, tiny, tmp_path / "b", settings)
    for k in (1, 2):
        np.testing.assert_array_equal(from_shards.caches[k].keys, from_folders.caches[k].keys)
        np.testing.assert_array_equal(from_shards.views(k), from_folders.views(k))
    for split in ("val", "test"):
        np.testing.assert_array_equal(from_shards.split(split).features, from_folders.split(split).features)
    assert str(from_shards.caches[2].paths[0]).startswith(str(shards / "train"))  # shard:member
    assert not any(path.suffix in (".jpg", ".png") for path in shards.rglob("*") if path.is_file())  # never unpacked


@pytest.mark.parametrize("damage, message", [
    ("no-cls", "sample 'sample000001' has no .cls (its class index)"),
    ("out-of-range", "sample 'sample000001': class index '7' out of range for the 3 classes of classes.txt"),
    ("no-classes", "need classes.txt"),
])
def test_bad_shards_are_one_line(tiny, tmp_path, damage, message):
    import io
    import tarfile

    from apecli.synthetic import demo_images

    images = demo_images(tmp_path / "images", classes=3, per_split=(2, 1, 1))
    shards = write_shards(images, tmp_path / "shards")
    shard = shards / "train" / "train-0000.tar"
    if damage == "no-classes":
        (shards / "classes.txt").unlink()
    else:
        with tarfile.open(shard) as tar:
            members = [(member, tar.extractfile(member).read()) for member in tar]
        with tarfile.open(shard, "w") as tar:
            for member, data in members:
                if member.name == "sample000001.cls":
                    if damage == "no-cls":
                        continue
                    data, member.size = b"7", 1
                tar.addfile(member, io.BytesIO(data))
    result = runner.invoke(app, ["extract", "--images", str(shards), "--model", tiny.model, "--pretrained",
                                 tiny.pretrained, "--shots", "1", "--workers", "0", "--store", str(tmp_path / "s")])
    assert_one_line_error(result, message)
    assert not (tmp_path / "s").exists() or not list((tmp_path / "s").rglob("*.h5"))


def test_torchrun_ranks_share_out_whole_shards(tmp_path):
    from apecli.distributed import owns
    from apecli.extract import _sharding_units
    from apecli.files import ShardMember

    paths = [ShardMember(tmp_path / f"train-{shard}.tar", f"s{i}.jpg", 512 * i, 10) for shard in range(3)
             for i in range(6)]  # three shards of six images
    chunks = [range(start, min(start + 3, 18)) for start in range(0, 18, 3)]
    units = _sharding_units(paths, chunks)
    assert units == [0, 0, 1, 1, 2, 2]
    for rank in range(2):  # two ranks: shards 0 and 2 to rank 0, shard 1 to rank 1
        read = {paths[chunk.start].shard.name for n, chunk in enumerate(chunks) if owns(units[n], rank, 2)}
        assert read == ({"train-0.tar", "train-2.tar"} if rank == 0 else {"train-1.tar"})
    assert _sharding_units([tmp_path / "a.jpg"] * 4, [range(0, 2), range(2, 4)]) == [0, 1]  # files: chunk by chunk


def test_an_interrupted_extraction_from_shards_resumes_to_the_same_result(tiny, tmp_path, monkeypatch, interrupt_encoder):
    from apecli.datasets import read_image_folder
    from apecli.extract import ExtractSettings, extract
    from apecli.synthetic import demo_images

    shards = write_shards(demo_images(tmp_path / "images", classes=3, per_split=(5, 3, 3)), tmp_path / "shards")
    settings = ExtractSettings(shots=(1, 2), views=2, workers=0, chunk_images=4, batch_size=4)
    whole = extract(read_image_folder(shards), tiny, tmp_path / "whole", settings)
    interrupt_encoder(3)
    with pytest.raises(KeyboardInterrupt):
        extract(read_image_folder(shards), tiny, tmp_path / "cut", settings)
    assert list((tmp_path / "cut").rglob(".extract-*/*.npz")) and not list((tmp_path / "cut").rglob("*.h5"))
    monkeypatch.undo()
    resumed = extract(read_image_folder(shards), tiny, tmp_path / "cut", settings)
    assert resumed.artifact.content_id == whole.artifact.content_id
