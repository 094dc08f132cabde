"""extract: the APE protocol on generated images with a tiny open_clip model, offline."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from apecli.cli import app
from apecli.datasets import LAYOUTS, read_coop, read_image_folder, read_image_list, read_prompts
from apecli.encoder import EncoderSpec
from apecli.errors import ApecliError
from apecli.extract import ExtractSettings, extract
from apecli.synthetic import image_folder, make_image

from conftest import assert_one_line_error, raises_said

runner = CliRunner()
SETTINGS = ExtractSettings(shots=(1, 2, 4), views=3, batch_size=8, workers=0, chunk_images=5)


def test_features_agree_with_open_clip_directly(tiny, caltech, tmp_path):
    import open_clip
    import torch
    from PIL import Image

    features = extract(read_coop("caltech101", caltech), tiny, tmp_path / "s", SETTINGS)
    model, _, preprocess = open_clip.create_model_and_transforms("apecli-tiny", pretrained=tiny.pretrained)
    model.eval()
    val = features.split("val")
    for row in (0, 4):
        with torch.no_grad():
            direct = model.encode_image(preprocess(Image.open(val.paths[row]).convert("RGB"))[None])[0].numpy()
        np.testing.assert_allclose(val.features[row], direct / np.linalg.norm(direct), rtol=1e-5, atol=1e-6)
    tokens = open_clip.get_tokenizer("apecli-tiny")(["a photo of a thing 1."])
    with torch.no_grad():
        text = model.encode_text(tokens)[0].numpy()
    np.testing.assert_allclose(features.classifier[1], text / np.linalg.norm(text), rtol=1e-5, atol=1e-6)


def test_the_protocol_shapes_and_provenance(tiny, caltech, tmp_path):
    features = extract(read_coop("caltech101", caltech), tiny, tmp_path / "s", SETTINGS)
    assert features.shots == (1, 2, 4) and features.num_classes == 3 and features.dim == 64
    for shots in (1, 2, 4):
        cache = features.caches[shots]
        assert cache.keys.shape == (3 * shots, 64) and cache.views.shape == (3, 3 * shots, 64)
        np.testing.assert_allclose(np.linalg.norm(cache.keys, axis=1), 1, rtol=1e-5)
        np.testing.assert_allclose(np.linalg.norm(cache.views, axis=2), 1, rtol=1e-5)
        assert cache.labels.tolist() == np.repeat(np.arange(3), shots).tolist()
    assert set(features.caches[1].paths) < set(features.caches[2].paths) < set(features.caches[4].paths)
    views = features.views(4)  # the key is the direction of its views' mean (views here normalised)
    assert np.all(np.einsum("nd,vnd->vn", features.caches[4].keys, views) > 0.5)
    meta = features.artifact.metadata
    assert meta["model"]["name"] == "apecli-tiny" and len(meta["model"]["checkpoint_sha256"]) == 64
    assert meta["model"]["preprocessing"]["size"] == [32, 32]
    provenance = meta["provenance"]
    assert provenance["seed"] == 1 and provenance["shots"] == [1, 2, 4] and provenance["views"] == 3
    assert len(provenance["split_file_sha256"]) == 64 and provenance["root"].endswith("caltech-101")
    assert features.split("test").paths[0].endswith(".jpg")
    from importlib.metadata import version

    import torch

    software = provenance["software"]
    assert software["torch"] == torch.__version__ and software["open_clip_torch"] == version("open_clip_torch")
    assert {"apecli", "torchvision", "pillow", "numpy", "cuda"} <= set(software)


def test_the_seed_decides_the_few_shot_images(tiny, caltech, tmp_path):
    from dataclasses import replace

    first = extract(read_coop("caltech101", caltech), tiny, tmp_path / "a", SETTINGS)
    again = extract(read_coop("caltech101", caltech), tiny, tmp_path / "b", SETTINGS)
    other = extract(read_coop("caltech101", caltech), tiny, tmp_path / "c", replace(SETTINGS, seed=7))
    np.testing.assert_array_equal(first.caches[4].views, again.caches[4].views)
    assert first.caches[2].paths.tolist() != other.caches[2].paths.tolist()


def test_a_second_run_reuses_without_the_encoder(tiny, caltech, tmp_path, monkeypatch):
    first = extract(read_coop("caltech101", caltech), tiny, tmp_path / "s", SETTINGS)
    import apecli.extract as module

    monkeypatch.setattr(module, "load_encoder", lambda spec: pytest.fail("the encoder was loaded again"))
    messages = []
    again = extract(read_coop("caltech101", caltech), tiny, tmp_path / "s", SETTINGS, say=messages.append)
    assert again.artifact.path == first.artifact.path and messages == [f"already extracted: {first.artifact.path}"]


def _count_encoded(monkeypatch) -> dict[str, int]:
    """How many images (views counted one by one) the encoder is given from now on."""
    from apecli.encoder import Encoder

    original, seen = Encoder.start_encoding, {"images": 0}

    def start_encoding(self, batch):
        seen["images"] += batch.shape[0]
        return original(self, batch)

    monkeypatch.setattr(Encoder, "start_encoding", start_encoding)
    return seen


def test_another_seed_takes_the_validation_and_test_features_of_the_first(tiny, caltech, tmp_path, monkeypatch):
    from dataclasses import replace

    dataset = read_coop("caltech101", caltech)
    first = extract(dataset, tiny, tmp_path / "s", SETTINGS)
    encoded, messages = _count_encoded(monkeypatch), []
    second = extract(dataset, tiny, tmp_path / "s", replace(SETTINGS, seed=2), say=messages.append)
    assert encoded["images"] == 3 * 4 * 3  # classes × shots × views: the training images alone
    assert f"validation and test features: those of {first.artifact.path} (the same images, model and transform)" in messages
    assert second.caches[4].paths.tolist() != first.caches[4].paths.tolist()
    for split in ("val", "test"):
        np.testing.assert_array_equal(second.split(split).features, first.split(split).features)
        assert second.split(split).paths.tolist() == first.split(split).paths.tolist()
    provenance = second.provenance
    assert provenance["evaluation_features_from"]["content_id"] == first.artifact.content_id
    assert provenance["evaluation_features_from"]["software"] == first.provenance["software"]
    assert provenance["evaluation_request_id"] == first.provenance["evaluation_request_id"]
    assert provenance["request_id"] != first.provenance["request_id"] and provenance["seed"] == 2
    monkeypatch.undo()
    alone = extract(dataset, tiny, tmp_path / "alone", replace(SETTINGS, seed=2))  # what encoding everything gives
    assert "evaluation_features_from" not in alone.provenance
    for shots in (1, 2, 4):
        np.testing.assert_array_equal(second.caches[shots].keys, alone.caches[shots].keys)
        np.testing.assert_array_equal(second.caches[shots].views, alone.caches[shots].views)
    for split in ("val", "test"):
        np.testing.assert_array_equal(second.split(split).features, alone.split(split).features)
    np.testing.assert_array_equal(second.classifier, alone.classifier)


def test_ls_tells_the_seeds_apart(tiny, caltech, tmp_path):
    from dataclasses import replace

    dataset = read_coop("caltech101", caltech)
    first = extract(dataset, tiny, tmp_path / "s", SETTINGS)
    second = extract(dataset, tiny, tmp_path / "s", replace(SETTINGS, seed=3))
    listed = runner.invoke(app, ["ls", str(tmp_path / "s")])
    assert listed.exit_code == 0, listed.stderr
    lines = {line.split("\t")[0]: line for line in listed.stdout.splitlines()}
    assert "shots [1, 2, 4] (seed 1)" in lines[str(first.artifact.path)]
    assert "shots [1, 2, 4] (seed 3)" in lines[str(second.artifact.path)]


def test_features_of_another_model_decoder_or_skipping_rule_are_not_taken(tiny, caltech, tmp_path, monkeypatch):
    from dataclasses import replace

    dataset = read_coop("caltech101", caltech)
    extract(dataset, tiny, tmp_path / "s", SETTINGS)
    encoded = _count_encoded(monkeypatch)
    training, evaluation = 3 * 4 * 3, 3 * 3 + 3 * 3
    other = extract(dataset, EncoderSpec(tiny.model, "none", device="cpu"), tmp_path / "s", replace(SETTINGS, seed=2))
    assert encoded["images"] == training + evaluation and "evaluation_features_from" not in other.provenance
    skipping = extract(dataset, tiny, tmp_path / "s", replace(SETTINGS, seed=2, skip_bad=True))
    assert encoded["images"] == 2 * (training + evaluation) and "evaluation_features_from" not in skipping.provenance


def test_images_skipped_in_the_shared_splits_stay_listed(tiny, caltech, tmp_path):
    from dataclasses import replace

    dataset = read_coop("caltech101", caltech)
    bad = dataset.splits["test"][2][0]
    _corrupt(bad)
    skipping = replace(SETTINGS, skip_bad=True)
    first = extract(dataset, tiny, tmp_path / "s", skipping)
    second = extract(dataset, tiny, tmp_path / "s", replace(skipping, seed=2))
    assert second.provenance["evaluation_features_from"]["content_id"] == first.artifact.content_id
    assert second.split("test").labels.shape == (8,)
    assert [entry for entry in second.provenance["skipped"] if entry["split"] == "test"] == first.provenance["skipped"]


def test_another_model_is_never_mixed_with_old_features(tiny, caltech, tmp_path):
    first = extract(read_coop("caltech101", caltech), tiny, tmp_path / "s", SETTINGS)
    random_weights = EncoderSpec(tiny.model, "none", device="cpu")
    second = extract(read_coop("caltech101", caltech), random_weights, tmp_path / "s", SETTINGS)
    assert second.artifact.path != first.artifact.path
    assert second.artifact.metadata["model"]["pretrained"] == "none"
    assert not np.allclose(second.caches[1].keys, first.caches[1].keys)


def test_an_interrupted_run_resumes_to_the_same_result(tiny, caltech, tmp_path, monkeypatch, interrupt_encoder):
    whole = extract(read_coop("caltech101", caltech), tiny, tmp_path / "whole", SETTINGS)
    interrupt_encoder(4)
    with pytest.raises(KeyboardInterrupt):
        extract(read_coop("caltech101", caltech), tiny, tmp_path / "cut", SETTINGS)
    work = next((tmp_path / "cut" / "caltech101").glob(".extract-*"))
    saved = sorted(p.name for p in work.iterdir())
    assert saved and not list((tmp_path / "cut" / "caltech101").glob("*.h5"))  # no artifact yet
    monkeypatch.undo()
    resumed = extract(read_coop("caltech101", caltech), tiny, tmp_path / "cut", SETTINGS)
    assert resumed.artifact.content_id == whole.artifact.content_id
    assert not work.exists()


def test_a_full_disk_is_one_line_and_keeps_the_saved_chunks_for_resuming(tiny, caltech, tmp_path, monkeypatch):
    import errno

    import apecli.extract

    saved, original = [], apecli.extract.np.savez

    def savez(handle, **arrays):  # the third chunk finds the disk full
        if len(saved) == 2:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), handle.name)
        saved.append(handle.name)
        original(handle, **arrays)

    monkeypatch.setattr(apecli.extract.np, "savez", savez)
    args = ["extract", "--dataset", "caltech101", "--root", str(caltech), "--model", tiny.model, "--pretrained",
            tiny.pretrained, "--shots", "1,2,4", "--views", "3", "--batch-size", "8", "--workers", "0", "--chunk-images", "5",
            "--store", str(tmp_path / "s")]
    failed = runner.invoke(app, args)
    assert failed.exit_code == 1 and "Traceback" not in failed.stderr
    last = failed.stderr.strip().splitlines()[-1]  # after the line that names the work folder
    assert last.startswith("apecli: error: No space left on device: ") and last.endswith(".npz")
    work = next((tmp_path / "s" / "caltech101").glob(".extract-*"))
    assert len(list(work.rglob("*.npz"))) == 2 and not list(work.rglob("*.tmp"))  # kept to resume from; no half file
    monkeypatch.undo()
    resumed = runner.invoke(app, args)
    assert resumed.exit_code == 0, resumed.stderr
    assert not work.exists()


def test_prompts_join_the_templates(tiny, caltech, tmp_path):
    dataset = read_coop("caltech101", caltech)
    prompts_file = tmp_path / "cupl.json"
    prompts_file.write_text(json.dumps({"thing_0": ["a red thing."], "thing 1": ["a green thing."]}))
    with pytest.raises(ApecliError, match="no prompts for class 'thing_2'"):
        read_prompts(prompts_file, dataset.class_names)
    prompts = read_prompts(prompts_file, dataset.class_names, allow_missing=True)
    assert prompts == {"thing_0": ["a red thing."], "thing_1": ["a green thing."]}
    plain = extract(dataset, tiny, tmp_path / "a", SETTINGS)
    prompted = extract(dataset, tiny, tmp_path / "b", SETTINGS, prompts)
    assert not np.allclose(plain.classifier[0], prompted.classifier[0])
    np.testing.assert_allclose(plain.classifier[2], prompted.classifier[2], rtol=1e-6)


def _corrupt(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:60])


def test_an_unreadable_test_image_is_named_or_skipped(tiny, caltech, tmp_path):
    dataset = read_coop("caltech101", caltech)
    bad = dataset.splits["test"][2][0]
    _corrupt(bad)
    with raises_said(f"{bad.name}: unreadable image .*--skip-bad"):
        extract(dataset, tiny, tmp_path / "s", SETTINGS)
    assert not list((tmp_path / "s").rglob("*.h5")) and not list((tmp_path / "s").rglob(".extract-*"))
    from dataclasses import replace

    features = extract(dataset, tiny, tmp_path / "s", replace(SETTINGS, skip_bad=True))
    assert features.split("test").labels.shape == (8,)
    assert features.provenance["skipped"][0]["path"] == str(bad) and features.provenance["skipped"][0]["split"] == "test"


def test_an_unreadable_training_image_is_replaced_when_skipping(tiny, caltech, tmp_path):
    from dataclasses import replace

    dataset = read_coop("caltech101", caltech)
    bad = dataset.splits["train"][0][0]
    _corrupt(bad)
    with pytest.raises(ApecliError, match="unreadable image"):
        extract(dataset, tiny, tmp_path / "s", ExtractSettings(shots=(5,), views=1, workers=0))
    features = extract(dataset, tiny, tmp_path / "s", replace(SETTINGS, skip_bad=True))
    assert str(bad) not in features.caches[4].paths.tolist()
    assert features.caches[4].keys.shape == (12, 64)


@pytest.mark.parametrize(
    "shots, message",
    [((6,), "class 'thing_0' has 5 usable training images, fewer than 6 shots"), ((0,), "shots must be positive")],
)
def test_shots_beyond_a_class(tiny, caltech, tmp_path, shots, message):
    with pytest.raises(ApecliError, match=message):
        extract(read_coop("caltech101", caltech), tiny, tmp_path / "s", ExtractSettings(shots=shots, workers=0))
    assert not (tmp_path / "s").exists()


def test_an_empty_class(tiny, tmp_path):
    image_folder(tmp_path / "mine", classes=2, per_class=10)
    (tmp_path / "mine" / "class_2").mkdir()
    with pytest.raises(ApecliError, match="class 'class_2' has no training images"):
        extract(read_image_folder(tmp_path / "mine"), tiny, tmp_path / "s", SETTINGS)


def test_dataset_layout_errors(caltech, tmp_path):
    with pytest.raises(ApecliError, match="unknown dataset 'cifar10' \\(known: caltech101, dtd, "):
        read_coop("cifar10", caltech)
    with pytest.raises(ApecliError, match="unknown dataset 'pets'; did you mean oxford_pets\\? \\(known: caltech101"):
        read_coop("pets", caltech)
    with pytest.raises(ApecliError, match="no oxford_pets dataset here"):
        read_coop("oxford_pets", caltech)
    (caltech / "caltech-101" / "split_zhou_Caltech101.json").unlink()
    with pytest.raises(ApecliError, match="missing split file split_zhou_Caltech101.json"):
        read_coop("caltech101", caltech)
    with pytest.raises(ApecliError, match="no such folder"):
        read_coop("caltech101", tmp_path / "absent")


def test_both_spellings_and_renamed_eurosat(tmp_path):
    for folder in ("oxford_pets", "oxfordpets"):
        root = tmp_path / folder
        make_image(root / folder / "images" / "a.jpg", 0, 0)
        split = {"train": [["a.jpg", 0, "abyssinian"]], "val": [["a.jpg", 0, "abyssinian"]], "test": []}
        (root / folder / "split_zhou_OxfordPets.json").write_text(json.dumps(split))
        dataset = read_coop("oxford_pets", root)
        assert dataset.class_names == ("abyssinian",) and dataset.templates == ("a photo of a {}, a type of pet.",)
        assert dataset.splits["train"][0][0] == root / folder / "images" / "a.jpg"
    split = {"train": [["SeaLake/1.jpg", 0, "SeaLake"], ["Forest/2.jpg", 1, "Forest"]], "val": [], "test": []}
    (tmp_path / "eurosat").mkdir()
    (tmp_path / "eurosat" / "split_zhou_EuroSAT.json").write_text(json.dumps(split))
    assert read_coop("eurosat", tmp_path).class_names == ("Sea or Lake", "Forest")


def test_fgvc_and_imagenet_layouts(tmp_path):
    fgvc = tmp_path / "fgvc_aircraft"
    (fgvc / "variants.txt").parent.mkdir(parents=True)
    (fgvc / "variants.txt").write_text("707-320\nA300B4\n")
    for part in ("train", "val", "test"):
        (fgvc / f"images_variant_{part}.txt").write_text("0034309 707-320\n1234567 A300B4\n")
    dataset = read_coop("fgvc_aircraft", tmp_path)
    assert dataset.class_names == ("707-320", "A300B4")
    assert dataset.splits["val"][1] == (fgvc / "images" / "1234567.jpg", 1)
    imagenet = tmp_path / "imagenet"
    (imagenet).mkdir()
    (imagenet / "classnames.txt").write_text("n01440764 tench\nn01443537 goldfish\n")
    for part in ("train", "val"):
        for wnid in ("n01440764", "n01443537"):
            make_image(imagenet / "images" / part / wnid / f"{wnid}_1.JPEG", 0, 0)
    dataset = read_coop("imagenet", tmp_path)
    assert dataset.class_names == ("tench", "goldfish") and len(dataset.templates) == 7
    assert dataset.splits["test"] is dataset.splits["val"]


def test_own_folders_and_csv_lists(tmp_path):
    image_folder(tmp_path / "flat", classes=2, per_class=10)
    flat = read_image_folder(tmp_path / "flat", seed=3)
    assert [len(flat.splits[p]) for p in ("train", "val", "test")] == [10, 4, 6]
    assert read_image_folder(tmp_path / "flat", seed=3).splits == flat.splits
    for part in ("train", "val", "test"):
        image_folder(tmp_path / "split" / part, classes=2, per_class=2)
    assert len(read_image_folder(tmp_path / "split").splits["test"]) == 4
    image_folder(tmp_path / "partial" / "train", classes=2, per_class=2)
    image_folder(tmp_path / "partial" / "test", classes=2, per_class=2)
    with pytest.raises(ApecliError, match="partial: has train/ but no val/ folder \\(hyperparameters are chosen on val/\\); "
                                          "or put the class folders directly in it"):
        read_image_folder(tmp_path / "partial")
    image_folder(tmp_path / "few", classes=2, per_class=3)  # 2 / 1 / 0: no test image
    with pytest.raises(ApecliError, match="few: too few images to split 50% / 20% / 30% per class \\(the test split "
                                          "would be empty; the smallest class has 3\\): lay them out as train/"):
        read_image_folder(tmp_path / "few")
    rows = ["path,label,split"] + [f"flat/class_{c}/{i}.jpg,class_{c},{'train' if i < 6 else 'test' if i < 8 else 'val'}"
                                   for c in range(2) for i in range(10)]
    (tmp_path / "list.csv").write_text("\n".join(rows))
    listed = read_image_list(tmp_path / "list.csv")
    assert listed.class_names == ("class_0", "class_1") and len(listed.splits["train"]) == 12
    assert listed.splits["val"][0][0] == tmp_path / "flat" / "class_0" / "8.jpg"
    (tmp_path / "excel.csv").write_bytes(b"\xef\xbb\xbf" + "\n".join(rows).encode())  # a byte-order mark first
    assert read_image_list(tmp_path / "excel.csv").splits == listed.splits
    refusals = [
        (b"file,class\na.jpg,x\n", "needs a header with 'path' and 'label'"),
        (b"path,label\n", "lists no images"),
        (b"path,label\na.jpg,x\nb.jpg\n", "bad.csv, line 3: needs a value in each of the columns path, label"),
        (b"path,label,split\na.jpg,x,\n", "line 2: needs a value in each of the columns path, label, split"),
        (b"path,label,split\na.jpg,x,tr\n", "unknown split values 'tr' \\(use train, val, test\\)"),
        (b"path,label\n\xff.jpg,x\n", "bad.csv: not a readable UTF-8 CSV"),
    ]
    for content, message in refusals:
        (tmp_path / "bad.csv").write_bytes(content)
        with pytest.raises(ApecliError, match=message):
            read_image_list(tmp_path / "bad.csv")


def test_extract_refine_eval_on_the_command_line(tiny, caltech, tmp_path):
    store_dir = str(tmp_path / "s")
    args = ["extract", "--dataset", "caltech101", "--root", str(caltech), "--model", tiny.model, "--pretrained",
            tiny.pretrained, "--shots", "1,2,4", "--views", "2", "--workers", "0", "--store", store_dir, "--json"]
    extracted = runner.invoke(app, args)
    assert extracted.exit_code == 0, extracted.stderr
    payload = json.loads(extracted.stdout)
    assert payload["shots"] == [1, 2, 4] and payload["dim"] == 64
    refined = runner.invoke(app, ["refine", "--k", "16", "--store", store_dir], input=payload["artifact"])
    evaluated = runner.invoke(app, ["eval", "--search-step", "10", "5", "3", "--store", store_dir, "--json"],
                              input=refined.stdout)
    assert evaluated.exit_code == 0, evaluated.stderr
    assert json.loads(evaluated.stdout)["shots"] == 4


def test_own_images_with_workers_on_the_command_line(tiny, tmp_path):
    image_folder(tmp_path / "mine", classes=2, per_class=10)
    result = runner.invoke(app, ["extract", "--images", str(tmp_path / "mine"), "--dataset", "mine", "--model", tiny.model,
                                 "--pretrained", tiny.pretrained, "--shots", "1,4", "--views", "2", "--workers", "2",
                                 "--store", str(tmp_path / "s"), "--json"])
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["dataset"] == "mine"


def test_workers_and_reading_threads_left_out_follow_the_device_and_the_cores(tiny, tmp_path, monkeypatch):
    """--workers left out: up to 16 PIL processes for a GPU, up to 4 for the CPU; --read-threads up to 4;
    never more than the cores this process may use, shared among torchrun's processes on the machine."""
    import apecli.extract
    from apecli.extract import cores, default_read_threads, default_workers

    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    monkeypatch.setattr(apecli.extract.os, "sched_getaffinity", lambda pid: set(range(24)), raising=False)
    assert cores() == 24
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    assert cores() == 3
    for allowed, on_gpu, on_cpu, reading in [(32, 16, 4, 4), (16, 16, 4, 4), (6, 6, 4, 4), (2, 2, 2, 2), (1, 1, 1, 1)]:
        monkeypatch.setattr(apecli.extract, "cores", lambda: allowed)
        assert (default_workers("cuda:1"), default_workers("cpu"), default_read_threads()) == (on_gpu, on_cpu, reading)
    handed = []

    def stop(source, spec, store_dir, settings, *rest):
        handed.append((settings.workers, settings.read_threads))
        raise ApecliError("stopped before encoding")

    monkeypatch.setattr(apecli.extract, "extract", stop)
    monkeypatch.setattr(apecli.extract, "cores", lambda: 1)
    image_folder(tmp_path / "mine", classes=2, per_class=10)
    common = ["extract", "--images", str(tmp_path / "mine"), "--model", tiny.model, "--pretrained", tiny.pretrained,
              "--device", "cpu", "--shots", "1,4", "--store", str(tmp_path / "s")]
    for given, expected in [([], (1, 1)), (["--workers", "3", "--read-threads", "5"], (3, 5))]:
        assert_one_line_error(runner.invoke(app, [*common, *given]), "stopped before encoding")
        assert handed.pop() == expected
    assert_one_line_error(runner.invoke(app, [*common, "--read-threads", "0"]), "read threads must be at least 1")


def test_decoding_on_the_device_reads_the_files_in_the_threads_asked_for(tiny, caltech, tmp_path, monkeypatch):
    """--decode gpu's files are read by read_threads threads; the workers are PIL's, for training views."""
    from dataclasses import replace

    import apecli.extract
    from apecli.encoder import load_encoder
    from apecli.extract import encode_split
    from apecli.images.gpu import decoded_batches

    threads = []

    def decoded(paths, batches, count, *rest, **named):
        threads.append(count)
        return decoded_batches(paths, batches, count, *rest, **named)

    monkeypatch.setattr(apecli.extract, "decoded_batches", decoded)
    paths = [path for path, _ in read_coop("caltech101", caltech).splits["val"]][:6]
    settings = replace(SETTINGS, decode="gpu", workers=0, read_threads=3)
    _, ok, _ = encode_split(load_encoder(tiny), "val", paths, 0, tmp_path / "work", settings, None)
    assert ok.all() and threads == [3]


def test_a_handful_of_own_images_per_class_extracts_the_shots_they_can_fill(tiny, tmp_path):
    from dataclasses import replace

    from apecli.extract import fitting_shots

    image_folder(tmp_path / "mine", classes=3, per_class=10)  # split 5 / 2 / 3 per class
    dataset = read_image_folder(tmp_path / "mine", 1)
    assert fitting_shots(dataset) == (1, 2, 4, 5)
    assert fitting_shots(dataset, (1, 2)) == (1, 2)  # enough for every count asked
    assert fitting_shots(replace(dataset, splits={**dataset.splits, "train": []})) == (1, 2, 4, 8, 16)  # refused later
    common = ["extract", "--images", str(tmp_path / "mine"), "--model", tiny.model, "--pretrained", tiny.pretrained,
              "--views", "2", "--workers", "0", "--json"]
    result = runner.invoke(app, [*common, "--store", str(tmp_path / "s")])
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["shots"] == [1, 2, 4, 5]
    assert "shots 1,2,4,5: the smallest class has 5 training images" in result.stderr
    asked = runner.invoke(app, [*common, "--store", str(tmp_path / "t"), "--shots", "1,8"])  # given: kept, and refused
    assert_one_line_error(asked, "has 5 usable training images, fewer than 8 shots: give --shots with counts up to 5")

def test_workers_started_without_fork_give_the_same_features(tiny, tmp_path):
    """Python 3.14 starts processes by forkserver on Linux (macOS and Windows by spawn): the loader's
    dataset and transform then reach its workers pickled, and the features are the same as forked ones."""
    import multiprocessing

    image_folder(tmp_path / "mine", classes=2, per_class=6)
    dataset = read_image_folder(tmp_path / "mine", 1)
    settings = ExtractSettings(shots=(1, 2), views=2, batch_size=4, workers=1)
    forked = extract(dataset, tiny, tmp_path / "a", settings)
    before = multiprocessing.get_start_method(allow_none=True)
    multiprocessing.set_start_method("spawn", force=True)
    try:
        spawned = extract(dataset, tiny, tmp_path / "b", settings)
    finally:
        multiprocessing.set_start_method(before, force=True)
    assert spawned.artifact.content_id == forked.artifact.content_id


def test_command_line_refusals(tiny, caltech, tmp_path):
    base = ["extract", "--model", tiny.model, "--pretrained", tiny.pretrained, "--store", str(tmp_path / "s")]
    assert_one_line_error(runner.invoke(app, base), "give --dataset NAME")
    assert_one_line_error(runner.invoke(app, base + ["--dataset", "caltech101", "--root", str(caltech), "--shots", "1,x"]),
                          "--shots takes comma-separated integers")
    assert_one_line_error(runner.invoke(app, base + ["--dataset", "dtd", "--root", str(caltech)]), "no dtd dataset here")
    assert_one_line_error(runner.invoke(app, base + ["--dataset", "caltech101", "--root", str(caltech), "--seed", "-1"]),
                          "a seed must be between 0 and 4294967295, got -1")
    assert_one_line_error(runner.invoke(app, ["extract", "--dataset", "caltech101", "--root", str(caltech), "--model",
                                              tiny.model, "--pretrained", str(tmp_path / "gone.pt"), "--shots", "1"]),
                          "gone.pt: no such checkpoint file")
    assert_one_line_error(runner.invoke(app, base + ["--dataset", "caltech101", "--root", str(caltech), "--shots", "1"],
                                        env={"APECLI_CUDA_GRAPHS": "sometimes"}), "APECLI_CUDA_GRAPHS=sometimes: give 1")
    assert not (tmp_path / "s").exists()


def test_an_offline_download_fails_fast_in_one_line(caltech, tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "APECLI_STORE": str(tmp_path / "s")}
    start = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "apecli", "extract", "--dataset", "caltech101", "--root", str(caltech),
                           "--model", "RN50", "--pretrained", "openai", "--shots", "1"],
                          capture_output=True, text=True, env=env, timeout=120)
    assert time.monotonic() - start < 60
    assert done.returncode == 1 and done.stdout == ""
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "cannot get pretrained weights 'openai' for RN50" in lines[0]
    assert "--pretrained /path/to/checkpoint" in lines[0]


def test_device_decoding_stays_close_to_pil(tiny, caltech, tmp_path):
    """The tensor decoding path (run here on the CPU, as on a GPU) against the faithful PIL path."""
    from dataclasses import replace

    from apecli.encoder import load_encoder
    from apecli.extract import encode_split

    dataset = read_coop("caltech101", caltech)
    paths = [path for path, _ in dataset.splits["val"]]
    png = paths[0].with_suffix(".png")
    from PIL import Image

    Image.open(paths[0]).save(png)  # not a JPEG: decoded by PIL in either path
    paths[0] = png
    encoder = load_encoder(tiny)
    pil, ok, _ = encode_split(encoder, "pil", paths, 0, tmp_path / "a", SETTINGS, None)
    on_device = replace(SETTINGS, decode="gpu", read_threads=2)  # bytes read by 2 threads
    tensor, ok_tensor, _ = encode_split(encoder, "gpu", paths, 0, tmp_path / "b", on_device, None)
    assert ok.all() and ok_tensor.all()
    cosine = np.sum(pil * tensor, axis=1) / np.linalg.norm(pil, axis=1) / np.linalg.norm(tensor, axis=1)
    assert cosine.min() > 0.99
    assert cosine[0] == pytest.approx(1.0, abs=1e-6)  # the PNG went through PIL both times


def test_device_decoding_does_not_depend_on_the_batch(tiny, tmp_path):
    """Images of several sizes decoded, resized and normalised together equal each done alone, in order."""
    import torch

    from apecli.encoder import load_encoder
    from apecli.images.gpu import RawBytes, decode_on_device
    from apecli.images.loading import Batch, split_transform

    paths = [make_image(tmp_path / f"{i}.jpg", i % 2, i) for i in range(7)]  # three widths, interleaved
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8\xff" + b"not really a jpeg")
    paths.insert(3, tmp_path / "broken.jpg")
    encoder = load_encoder(tiny)
    pixels = split_transform(encoder.eval_transform)
    raw = RawBytes(paths)
    items = [raw[i] for i in range(len(paths))]
    together = decode_on_device(Batch.collate(items), paths, encoder, pixels)
    alone = [decode_on_device(Batch.collate([item]), paths, encoder, pixels) for item in items]
    assert together.indices == list(range(len(paths)))
    assert together.errors == [one.errors[0] for one in alone] and together.errors[3]
    assert together.readable == [i for i in range(len(paths)) if i != 3]
    assert together.images.shape == (len(paths) - 1, 3, *encoder.image_size) and together.images.dtype == torch.uint8
    torch.testing.assert_close(together.images, torch.cat([one.images for one in alone]), rtol=0, atol=0)


@pytest.mark.parametrize("count, bad, most_calls", [(256, set(), 1), (256, {77}, 17), (256, {0, 200, 201}, 31),
                                                     (8, set(range(8)), 15)])
def test_files_the_decoder_cannot_read_cost_a_few_calls_not_one_a_file(count, bad, most_calls):
    """A file the batched decoder cannot read fails its whole call: halving finds it (and any others)
    in about 2·log₂ n calls; every other image is decoded once, as itself, and the bad ones left out.
    What each call decodes is handed on (resized, in extraction) before the next call."""
    import torch

    from apecli.images.gpu import _decode_jpegs

    events = []

    def decode(data: list, device) -> list:
        failed = any(int(one[0]) in bad for one in data)
        events.append(("failed" if failed else "decoded", len(data)))
        if failed:
            raise RuntimeError("nvjpeg: bad file")
        return [one.to(torch.int64) * 10 for one in data]

    def then(images: dict) -> dict:
        events.append(("handed on", len(images)))
        return {index: image * -1 for index, image in images.items()}

    jpegs = [(100 + index, np.array([index, 1], dtype=np.uint8)) for index in range(count)]
    decoded = _decode_jpegs(decode, jpegs, "cpu", then)
    good = [index for index in range(count) if index not in bad]
    assert sorted(decoded) == [100 + index for index in good]
    assert all(decoded[100 + index].tolist() == [-10 * index, -10] for index in good)
    calls = [event for event in events if event[0] != "handed on"]
    assert len(calls) <= most_calls and (len(calls) == 1) == (not bad)
    for event, following in zip(events, events[1:] + [None]):  # each success handed on at once, whole
        assert event[0] != "decoded" or following == ("handed on", event[1])
    assert _decode_jpegs(decode, [], "cpu") == {}
    assert list(_decode_jpegs(decode, jpegs[:1], "cpu")) == ([] if 0 in bad else [100])  # then: as decoded


def _decoded_images(shapes: list[tuple[int, int]]) -> dict:
    """uint8 3×H×W images of the given (height, width), keyed by their position, as a decoder gives them."""
    import torch

    generator = torch.Generator().manual_seed(0)
    return {index: torch.randint(0, 256, (3, *shape), generator=generator, dtype=torch.uint8)
            for index, shape in enumerate(shapes)}


# portrait, landscape, square, already the model's size, odd margins to crop, and repeated sizes
SHAPES = [(41, 32), (32, 57), (45, 45), (32, 32), (70, 33), (41, 32), (33, 70), (32, 57), (41, 32)]


@pytest.mark.parametrize("resize_mode, interpolation", [("shortest", "bicubic"), ("squash", "bilinear")])
def test_resizing_a_batch_gives_torchvisions_resizing_of_each_image_on_a_gpu(resize_mode, interpolation):
    """Each image of a batch of many sizes comes out as torchvision resizes and crops it alone on a GPU
    (in float32, clamped and rounded back to uint8), bit for bit, here on the CPU too; and within
    rounding of torchvision's fixed-point uint8 resampling, which it uses on the CPU."""
    from types import SimpleNamespace

    import torch
    from torchvision.transforms.v2 import functional as F

    from apecli.images.gpu import resize_crop

    encoder = SimpleNamespace(image_size=(32, 32), preprocess_config={"resize_mode": resize_mode,
                                                                      "interpolation": interpolation})
    mode = F.InterpolationMode.BILINEAR if interpolation == "bilinear" else F.InterpolationMode.BICUBIC
    size = [32, 32] if resize_mode == "squash" else [32]
    images = _decoded_images(SHAPES)
    ready = resize_crop(images, encoder)
    assert sorted(ready) == sorted(images)
    for index, image in images.items():
        as_on_a_gpu = F.resize(image.float()[None], size, interpolation=mode, antialias=True)
        as_on_a_gpu = F.center_crop(as_on_a_gpu.clamp(0, 255).round().to(torch.uint8), [32, 32])[0]
        assert ready[index].dtype == torch.uint8 and ready[index].shape == (3, 32, 32)
        torch.testing.assert_close(ready[index], as_on_a_gpu, rtol=0, atol=0)
        in_fixed_point = F.center_crop(F.resize(image, size, interpolation=mode, antialias=True), [32, 32])
        # noise overshoots bicubic's range, which fixed point clips between its two passes
        assert (ready[index].float() - in_fixed_point.float()).abs().mean() < 0.5
    a_few_at_once = resize_crop(images, encoder, most=3 * 45 * 45)  # at most one 45 × 45 image at once
    assert all(torch.equal(a_few_at_once[index], ready[index]) for index in images)
    assert resize_crop({}, encoder) == {}


def test_images_are_cast_to_float_a_bounded_number_of_pixels_at_once():
    from apecli.images.gpu import _by_shape, _float_chunks

    images = {index: np.empty((3, *shape)) for index, shape in enumerate(SHAPES)}
    for most in (1, 3 * 32 * 32, 3 * 45 * 45, 3 * 45 * 90, 10**9):
        chunks = _float_chunks(_by_shape(images), most)
        assert [index for chunk in chunks for _, indices in chunk for index in indices] == \
            [index for indices in _by_shape(images).values() for index in indices]  # each image once, in order
        for chunk in chunks:
            values = sum(np.prod(shape) * len(indices) for shape, indices in chunk)
            assert values <= most or len(chunk) == 1 and len(chunk[0][1]) == 1  # or a single image, larger
            assert all(images[index].shape == shape for shape, indices in chunk for index in indices)
    assert len(_float_chunks(_by_shape(images), 10**9)) == 1
    assert len(_float_chunks(_by_shape(images), 1)) == len(SHAPES)


def test_resizing_a_batch_costs_one_operation_a_size_beyond_a_fixed_few():
    """The device operations a batch of many sizes costs: one interpolation per size, and the same few
    others (joining, casting, rounding) whether it holds four images or all nine."""
    from types import SimpleNamespace

    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    from apecli.images.gpu import resize_crop

    class Count(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.resizing, self.others = 0, []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if "upsample" in func.name():
                self.resizing += 1
            elif func.name().startswith("aten::") and not func.is_view:  # a view launches nothing
                self.others.append(func.name())
            return func(*args, **(kwargs or {}))

    encoder = SimpleNamespace(image_size=(32, 32), preprocess_config={"resize_mode": "squash"})
    counts = []
    for shapes in (SHAPES[:4], SHAPES):
        images = {index: torch.empty((3, *shape), dtype=torch.uint8, device="meta") for index, shape in enumerate(shapes)}
        with Count() as count:
            resize_crop(images, encoder)
        counts.append(count)
    few, many = counts
    assert few.resizing == 3  # four sizes, one already the model's
    assert many.resizing == 5  # six sizes
    assert few.others == many.others and len(many.others) <= 6, many.others


def _encoded_jpeg(size: tuple[int, int], mode: str, quality: int, seed: int) -> bytes:
    import io

    from PIL import Image

    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], len(mode)), dtype=np.uint8)
    encoded = io.BytesIO()
    Image.fromarray(pixels.squeeze(-1) if mode == "L" else pixels, mode).save(encoded, "JPEG", quality=quality)
    return encoded.getvalue()


def test_both_jpeg_decoders_decode_what_pil_decodes():
    """TorchCodec's and torchvision's decoders, batched, give PIL's pixels on the CPU (RGB, grey, CMYK)."""
    import io

    import torch
    from PIL import Image

    from apecli.images.gpu import DECODERS

    jpegs = [_encoded_jpeg(size, mode, quality, seed) for seed, (size, mode, quality) in enumerate(
        [((500, 375), "RGB", 75), ((33, 17), "RGB", 95), ((64, 48), "L", 90), ((20, 12), "CMYK", 80)])]
    expected = [np.asarray(Image.open(io.BytesIO(data)).convert("RGB")).transpose(2, 0, 1) for data in jpegs]
    names = []
    for library, make in DECODERS:
        decoder = make()
        names.append(library)
        assert decoder.name.startswith(f"{library} ")
        images = decoder.decode([torch.frombuffer(bytearray(data), dtype=torch.uint8) for data in jpegs], "cpu")
        for image, pixels in zip(images, expected):
            assert image.dtype == torch.uint8
            np.testing.assert_array_equal(image.numpy(), pixels, err_msg=decoder.name)
    assert names == ["torchcodec", "torchvision"]


def test_a_decoder_that_fails_on_the_device_gives_way_to_the_next(monkeypatch):
    from apecli.images import gpu as images

    def broken():
        raise OSError("libtorchcodec_core9.so: undefined symbol: _ZN3c10")

    def wrong_device():
        return images.JpegDecoder("meta-only 1.0", lambda data, device: [__import__("torch").empty(3, 8, 8, device="meta")])

    images.jpeg_decoder.cache_clear()
    monkeypatch.setattr(images, "DECODERS", (("torchcodec", broken), ("meta", wrong_device), images.DECODERS[1]))
    try:
        assert images.jpeg_decoder("cpu").name.startswith("torchvision ")
        monkeypatch.setattr(images, "DECODERS", (("torchcodec", broken), ("meta", wrong_device)))
        images.jpeg_decoder.cache_clear()
        with pytest.raises(ApecliError) as refused:
            images.jpeg_decoder("cpu")
        from apecli.cli.errors import in_flags

        message = in_flags(str(refused.value))  # as the command line says it
        assert "undefined symbol" in message and "meta-only 1.0: a (3, 8, 8) image on meta" in message
        assert message.endswith("use --decode pil") and "\n" not in message
    finally:
        images.jpeg_decoder.cache_clear()


def test_extract_names_its_jpeg_decoder_or_stops_before_encoding(tiny, caltech, tmp_path, monkeypatch):
    from dataclasses import replace

    from apecli.images import gpu as images

    dataset = read_coop("caltech101", caltech)
    settings = replace(SETTINGS, decode="gpu", shots=(1,), views=1)
    images.jpeg_decoder.cache_clear()
    features = extract(dataset, tiny, tmp_path / "store", settings)
    assert features.provenance["jpeg_decoder"].startswith("torchcodec ")
    assert extract(dataset, tiny, tmp_path / "store", replace(settings, decode="pil")).provenance["jpeg_decoder"] is None

    def missing():
        raise ModuleNotFoundError("No module named 'torchcodec'")

    monkeypatch.setattr(images, "DECODERS", (("torchcodec", missing),))
    images.jpeg_decoder.cache_clear()
    try:
        with pytest.raises(ApecliError, match="no JPEG decoder works on cpu .torchcodec: No module named"):
            extract(dataset, tiny, tmp_path / "other", settings)
    finally:
        images.jpeg_decoder.cache_clear()
    assert not (tmp_path / "other" / "caltech101").exists() or not any((tmp_path / "other" / "caltech101").iterdir())


def test_another_seed_records_the_decoder_of_the_features_it_takes_and_needs_none(tiny, caltech, tmp_path, monkeypatch):
    from dataclasses import replace

    from apecli.images import gpu as images

    dataset = read_coop("caltech101", caltech)
    settings = replace(SETTINGS, decode="gpu", shots=(1,), views=1)
    images.jpeg_decoder.cache_clear()
    first = extract(dataset, tiny, tmp_path / "store", settings)

    def missing():
        raise ModuleNotFoundError("No module named 'torchcodec'")

    monkeypatch.setattr(images, "DECODERS", (("torchcodec", missing),))  # no JPEG decoder works now
    images.jpeg_decoder.cache_clear()
    try:
        second = extract(dataset, tiny, tmp_path / "store", replace(settings, seed=2))
    finally:
        images.jpeg_decoder.cache_clear()
    assert second.provenance["evaluation_features_from"]["content_id"] == first.artifact.content_id
    assert second.provenance["jpeg_decoder"] == first.provenance["jpeg_decoder"]
    assert second.provenance["jpeg_decoder"].startswith("torchcodec ")


def test_a_batch_crosses_from_a_loader_worker_as_one_tensor(tmp_path):
    """However many images a batch holds, a loader worker sends them stacked: one shared-memory segment."""
    import torch

    from apecli.images.loading import Batch, PilImages

    paths = [make_image(tmp_path / f"{i}.jpg", 0, i) for i in range(6)]
    (tmp_path / "bad.jpg").write_bytes(b"nothing")
    paths.insert(2, tmp_path / "bad.jpg")

    def transform(image):
        return torch.full((3, 4, 4), float(image.size[0]))

    loader = torch.utils.data.DataLoader(PilImages(paths, transform, 0, 1), batch_size=7, num_workers=1,
                                         collate_fn=Batch.collate)
    (batch,) = list(loader)
    assert batch.indices == list(range(7)) and batch.readable == [0, 1, 3, 4, 5, 6]
    assert batch.errors[2] and all(error is None for n, error in enumerate(batch.errors) if n != 2)
    assert isinstance(batch.images, torch.Tensor) and batch.images.shape == (6, 3, 4, 4)
    widths = [48 + 8 * (i % 3) for i in range(6)]  # make_image's widths, in order
    assert batch.images[:, 0, 0, 0].tolist() == widths


def test_device_decoding_needs_cuda_on_the_command_line(tiny, caltech, tmp_path):
    result = runner.invoke(app, ["extract", "--dataset", "caltech101", "--root", str(caltech), "--model", tiny.model,
                                 "--pretrained", tiny.pretrained, "--device", "cpu", "--decode", "gpu",
                                 "--store", str(tmp_path / "s")])
    assert_one_line_error(result, "--decode gpu needs a CUDA device")


SPLIT_LAYOUTS = [(name, folder, layout) for name, layout in LAYOUTS.items() if layout.split_file for folder in layout.folders]


@pytest.mark.parametrize("name, folder, layout", SPLIT_LAYOUTS, ids=[f"{n}-{f}" for n, f, _ in SPLIT_LAYOUTS])
def test_every_split_file_layout_reads(tmp_path, name, folder, layout):
    """The nine benchmarks with a split_zhou file, in every folder spelling, with their own templates."""
    base = tmp_path / folder
    split = {"train": [], "val": [], "test": []}
    for label, classname in enumerate(["first_class", "second_class"]):
        for part in split:
            relative = f"{classname}/{part}.jpg"
            make_image(base / layout.image_dir / relative, label, 0, size=16)
            split[part].append([relative, label, classname])
    (base / layout.split_file).write_text(json.dumps(split))
    dataset = read_coop(name, tmp_path)
    assert dataset.name == name and dataset.class_names == ("first_class", "second_class")
    assert dataset.templates == layout.templates and dataset.split_file == base / layout.split_file
    assert all(path.is_file() for entries in dataset.splits.values() for path, _ in entries)
    assert dataset.splits["test"][1] == (base / layout.image_dir / "second_class" / "test.jpg", 1)


@pytest.mark.parametrize("workers", [0, 3])
def test_the_plan_takes_the_first_readable_images_of_each_seeded_order(caltech, workers):
    """Few-shot images: per class, a seeded permutation, and its first readable images; checked in threads."""
    import random
    from dataclasses import replace

    from apecli.extract import plan
    from apecli.images.loading import readable

    dataset = read_coop("caltech101", caltech)
    for index in (0, 2, 6):  # two of class thing_0, one of thing_1
        _corrupt(dataset.splits["train"][index][0])
    settings = replace(SETTINGS, shots=(1, 3), skip_bad=True, workers=workers)
    chosen = plan(dataset, settings)
    rng, expected, skipped = random.Random(settings.seed), [], []
    for paths in dataset.by_class("train"):
        order = rng.sample(paths, len(paths))
        good = [path for path in order if readable(path) is None][:3]
        expected += good
        skipped += [str(path) for path in order[: order.index(good[-1])] if readable(path) is not None]
    assert list(chosen.train) == expected
    assert [entry["path"] for entry in chosen.skipped] == skipped and len(skipped) >= 1


def test_a_request_already_running_is_refused_and_its_work_left_alone(tiny, caltech, tmp_path):
    from apecli import store
    from apecli.extract import request_id

    dataset = read_coop("caltech101", caltech)
    settings = ExtractSettings(shots=(1,), views=1, batch_size=8, chunk_images=5)
    work = tmp_path / "store" / "caltech101" / f".extract-{request_id(dataset, tiny.identity(), settings, dataset.templates, None)}"
    work.mkdir(parents=True)
    (work / "saved-by-the-other-run").write_bytes(b"")
    with store.exclusive(work / ".lock-0", "held by this test"):  # as the other process would hold it
        with raises_said(f"another apecli extract is running this request in {work}"):
            extract(dataset, tiny, tmp_path / "store", settings)
        assert (work / "saved-by-the-other-run").exists()
        removed, kept = store.collect_garbage(tmp_path / "store", work=True)
        assert removed == [] and kept == [(work, "an extraction running now")]
    features = extract(dataset, tiny, tmp_path / "store", settings)  # the lock is free: it runs
    assert features.shots == (1,) and not work.exists()


def _repository(folder: Path, tiny: EncoderSpec, weights_name: str = "open_clip_model.safetensors") -> Path:
    """The tiny model's files as a Hugging Face open_clip repository holds them."""
    import torch

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": json.loads(Path(tiny.model).read_text()),
                                                              "preprocess_cfg": {}}))
    state = torch.load(tiny.pretrained, weights_only=True)
    if weights_name.endswith(".safetensors"):
        from safetensors.torch import save_file

        save_file(state, folder / weights_name)
    else:
        torch.save(state, folder / weights_name)
    return folder


def test_models_that_carry_their_weights_hf_hub_and_local_dir(tiny, tmp_path, monkeypatch):
    import huggingface_hub.constants

    from apecli.encoder import model_files
    from apecli.evaluate import evaluate_artifact
    from apecli.predict import predict

    image_folder(tmp_path / "mine", classes=2, per_class=8)
    dataset = read_image_folder(tmp_path / "mine", 1)
    settings = ExtractSettings(shots=(2,), views=2, batch_size=8)
    reference = extract(dataset, tiny, tmp_path / "reference", settings)  # the same weights, as config + checkpoint

    local = _repository(tmp_path / "local", tiny, "open_clip_pytorch_model.bin")
    commit = "0123456789abcdef0123456789abcdef01234567"  # the hub's cache: refs name the snapshot
    _repository(tmp_path / "hub" / "models--someone--tiny" / "snapshots" / commit, tiny)
    (tmp_path / "hub" / "models--someone--tiny" / "refs").mkdir()
    (tmp_path / "hub" / "models--someone--tiny" / "refs" / "main").write_text(commit)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)

    for model in (f"local-dir:{local}", "hf-hub:someone/tiny"):
        spec = EncoderSpec(model, "openai", device="cpu")  # the tag is ignored: the weights come with the model
        assert not spec.random_weights
        features = extract(dataset, spec, tmp_path / model.split(":")[0], settings)
        for split in ("val", "test"):
            np.testing.assert_array_equal(features.split(split).features, reference.split(split).features)
        np.testing.assert_array_equal(features.classifier, reference.classifier)
        np.testing.assert_array_equal(features.caches[2].keys, reference.caches[2].keys)
        assert features.model["model"] == (f"local-dir:{local.resolve()}" if model.startswith("local") else model)
        assert features.model["pretrained"] == "with the model"
    assert features.model["checkpoint_sha256"] != reference.model["checkpoint_sha256"]  # safetensors, not a pickle

    evaluation = evaluate_artifact(features.artifact, "zero-shot", 2)
    from apecli.kinds.evaluation import save_evaluation

    saved = save_evaluation(evaluation, [features.artifact], tmp_path / "eval.h5")
    predictions, _ = predict([Path(p) for p in reference.split("test").paths], saved, top=1, device="cpu")
    assert len(predictions) == len(reference.split("test").paths)

    (local / "extra.safetensors").write_bytes(b"")
    with pytest.raises(ApecliError, match="2 weights files \\(extra.safetensors, open_clip_pytorch_model.bin\\)"):
        model_files(f"local-dir:{local}")
    (local / "extra.safetensors").unlink()
    (local / "open_clip_pytorch_model.bin").unlink()
    with pytest.raises(ApecliError, match="no weights file; a local-dir: model holds one"):
        model_files(f"local-dir:{local}")  # open_clip itself would go on with random weights
    with pytest.raises(ApecliError, match="no open_clip_config.json"):
        model_files(f"local-dir:{tmp_path / 'mine'}")
    with raises_said("cannot get hf-hub:someone/absent \\(offline\\?\\).*--model local-dir:DIR"):
        model_files("hf-hub:someone/absent")



def _openai_archive(path: Path, state: dict) -> Path:
    """A TorchScript archive of ``state``, the form of OpenAI's CLIP files (``clip.load``'s cache)."""
    import torch

    class Node(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x

    root = Node()
    for key, value in {**state, "input_resolution": torch.tensor(32)}.items():
        *parents, leaf = key.split(".")
        node = root
        for part in parents:
            if not hasattr(node, part):
                node.add_module(part, Node())
            node = getattr(node, part)
        node.register_buffer(leaf, value.clone())
    import warnings

    with warnings.catch_warnings():  # torch.jit is deprecated; OpenAI's files are TorchScript all the same
        warnings.simplefilter("ignore", FutureWarning)
        torch.jit.script(root).save(str(path))
    return path


def test_weights_trained_with_quick_gelu_are_run_with_it(tiny, tmp_path, monkeypatch):
    import torch

    from apecli.encoder import is_openai_archive, load_encoder

    assert EncoderSpec("RN50", "openai").forces_quick_gelu() and EncoderSpec("ViT-B-16", "openai").forces_quick_gelu()
    assert not EncoderSpec("RN50-quickgelu", "openai").forces_quick_gelu()  # its config says so already
    assert not EncoderSpec("ViT-B-32", "laion2b_s34b_b79k").forces_quick_gelu()  # trained with GELU
    assert not EncoderSpec(tiny.model, tiny.pretrained).forces_quick_gelu()  # a state dict: as its config says
    assert "activation" not in tiny.identity() and "activation" in EncoderSpec("RN50", "openai").identity()

    state = torch.load(tiny.pretrained, weights_only=True)
    archive = _openai_archive(tmp_path / "RN50.pt", state)
    assert is_openai_archive(archive) and not is_openai_archive(Path(tiny.pretrained))
    monkeypatch.delattr(torch.jit, "load")  # read without TorchScript, which torch has deprecated
    quick_config = tmp_path / "apecli-tiny-quick.json"
    quick_config.write_text(json.dumps({**json.loads(Path(tiny.model).read_text()), "quick_gelu": True}))

    image_folder(tmp_path / "mine", classes=2, per_class=8)
    dataset = read_image_folder(tmp_path / "mine", 1)
    settings = ExtractSettings(shots=(2,), views=2, batch_size=8)
    from_archive = extract(dataset, EncoderSpec(tiny.model, str(archive), "cpu"), tmp_path / "a", settings)
    as_configured = extract(dataset, EncoderSpec(str(quick_config), tiny.pretrained, "cpu"), tmp_path / "b", settings)
    with_gelu = extract(dataset, tiny, tmp_path / "c", settings)
    for split in ("val", "test"):
        np.testing.assert_array_equal(from_archive.split(split).features, as_configured.split(split).features)
        assert not np.allclose(from_archive.split(split).features, with_gelu.split(split).features, atol=1e-4)
    np.testing.assert_array_equal(from_archive.classifier, as_configured.classifier)
    assert from_archive.model["quick_gelu"] is True and "quick_gelu" not in with_gelu.model

    from dataclasses import replace as changed

    from apecli.kinds.features import save_features
    from apecli.predict import encoder_spec

    assert encoder_spec(from_archive, "cpu", tmp_path).forces_quick_gelu()
    earlier = save_features(changed(from_archive, model={k: v for k, v in from_archive.model.items() if k != "quick_gelu"}),
                            tmp_path / "earlier.h5")  # as an apecli that ran these weights with GELU recorded them
    with pytest.raises(ApecliError, match="extracted with GELU .by an earlier apecli., but its weights were trained"):
        encoder_spec(earlier, "cpu", tmp_path)

    smaller = {key: value for key, value in state.items() if key != "text_projection"}
    with pytest.raises(ApecliError, match="an OpenAI CLIP archive whose weights do not fit apecli-tiny"):
        load_encoder(EncoderSpec(tiny.model, str(_openai_archive(tmp_path / "other.pt", smaller)), "cpu"))


@pytest.mark.parametrize("resize_mode, interpolation", [("squash", "bilinear"), ("longest", "bicubic")])
def test_device_decoding_follows_the_models_own_resizing(tiny, tmp_path, resize_mode, interpolation):
    """A model whose config squashes (SigLIP's way) or pads: the device path resizes as its evaluation
    transform does, or is refused before any work."""
    import torch
    from PIL import Image

    from apecli.encoder import load_encoder
    from apecli.images.gpu import RawBytes, decode_on_device
    from apecli.images.loading import Batch, split_transform

    folder = _repository(tmp_path / "model", tiny)
    config = json.loads((folder / "open_clip_config.json").read_text())
    config["preprocess_cfg"] = {"resize_mode": resize_mode, "interpolation": interpolation,
                                "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]}
    (folder / "open_clip_config.json").write_text(json.dumps(config))
    spec = EncoderSpec(f"local-dir:{folder}", None, "cpu")
    paths = [make_image(tmp_path / "images" / f"{i}.jpg", i % 2, i, size=40 + 9 * i) for i in range(4)]  # not square
    if resize_mode == "longest":
        image_folder(tmp_path / "mine", classes=2, per_class=6)
        with raises_said("--decode gpu does not do .*'longest' resizing to \\[32, 32\\]; use --decode pil"):
            extract(read_image_folder(tmp_path / "mine", 1), spec, tmp_path / "s",
                    ExtractSettings(shots=(1,), views=1, decode="gpu"))
        assert not (tmp_path / "s" / "mine").exists() or not any((tmp_path / "s" / "mine").iterdir())
        return
    encoder = load_encoder(spec)
    raw = RawBytes(paths)
    pixels = split_transform(encoder.eval_transform)
    decoded = decode_on_device(Batch.collate([raw[i] for i in range(len(paths))]), paths, encoder, pixels)
    on_device = pixels.model_input(decoded.images, encoder.device)
    with_pil = torch.stack([encoder.eval_transform(Image.open(path).convert("RGB")) for path in paths])
    difference = (on_device - with_pil).abs()
    assert difference.mean() < 0.01 and difference.max() < 0.15  # rounding of the two resamplers, not geometry


def test_read_batches_gives_each_batch_in_order_with_unreadable_files_named(tmp_path):
    import threading

    from apecli.images.gpu import read_batches

    paths = []
    for index in range(11):
        path = tmp_path / f"{index}.jpg"
        path.write_bytes(bytes([255, 216, 255, index]))
        paths.append(path)
    paths[4] = tmp_path / "missing.jpg"
    batches = [[0, 1, 2], [3, 4, 5], [6, 7], [8, 9, 10]]
    read = list(read_batches(paths, batches, threads=3, ahead=1))
    assert [batch.indices for batch in read] == batches
    assert read[1].errors[1] is not None and read[1].readable == [3, 5]
    assert [bytes(image)[-1] for batch in read for image in batch.images] == [0, 1, 2, 3, 5, 6, 7, 8, 9, 10]
    reading = read_batches(paths, batches, threads=2)
    assert next(reading).indices == [0, 1, 2]
    reading.close()  # a consumer that stops early (an error, ^C) leaves no reading thread behind
    assert not [thread for thread in threading.enumerate() if thread.name.startswith("apecli-read")]


def test_the_split_transform_gives_the_whole_transforms_values_bit_for_bit(tiny, tmp_path):
    """Workers' uint8 pixels, scaled and normalised by table lookup, equal the model's own transform
    applied whole: evaluation, and seeded augmented views; a transform of another shape runs whole."""
    import torch
    from PIL import Image
    from torchvision import transforms

    from apecli.encoder import load_encoder
    from apecli.images.loading import PilImages, split_transform

    encoder = load_encoder(tiny)
    paths = [make_image(tmp_path / f"{i}.jpg", i % 3, i, size=40 + 7 * i) for i in range(5)]
    for transform, views in ((encoder.eval_transform, 0), (encoder.train_transform, 3)):
        pixels = split_transform(transform)
        assert pixels.table is not None and pixels.table.shape == (3, 256)
        split, whole = PilImages(paths, pixels.on_image, views, 7), PilImages(paths, transform, views, 7)
        for index in range(len(paths)):
            uint8, expected = split[index][1], whole[index][1]
            assert uint8.dtype == torch.uint8 and expected.dtype == torch.float32
            assert torch.equal(pixels.model_input(uint8, "cpu"), expected)
    assert torch.unique(pixels.table[0]).numel() == 256  # every value its own entry
    odd = transforms.Compose([transforms.ToTensor(), transforms.Lambda(lambda x: x * 2)])
    kept = split_transform(odd)
    assert kept.table is None and kept.on_image is odd
    image = Image.open(paths[0]).convert("RGB")
    assert torch.equal(kept.model_input(odd(image), "cpu"), odd(image))


def test_loader_workers_hand_over_small_pieces_joined_into_the_batches(tmp_path, monkeypatch):
    """Batches come back whole and in order however the loader cuts them, unreadable files named."""
    import torch

    from apecli.images import loading as images

    paths = [make_image(tmp_path / f"{i}.jpg", 0, i) for i in range(9)]
    (tmp_path / "bad.jpg").write_bytes(b"nothing")
    paths[5] = tmp_path / "bad.jpg"
    cuts, collate = [], images.Batch.collate
    monkeypatch.setattr(images, "LOADER_TENSORS", 4)
    monkeypatch.setattr(images.Batch, "collate", lambda items: cuts.append(len(items)) or collate(items))

    def transform(image):
        return torch.full((3, 2, 2), float(image.size[0]))

    batches = [[0, 1, 2, 3, 4, 5, 6], [7, 8]]
    for views, pieces in ((0, [4, 3, 2]), (2, [2, 2, 2, 1, 2])):
        cuts.clear()
        read = list(images.pil_batches(paths, batches, transform, views, 1, 0, "cpu"))
        assert cuts == pieces  # LOADER_TENSORS // views images a piece, within each batch
        assert [batch.indices for batch in read] == batches
        assert read[0].errors[5] and read[0].readable == [0, 1, 2, 3, 4, 6]
        widths = [48 + 8 * (i % 3) for i in read[0].readable + read[1].readable]
        assert torch.cat([batch.images for batch in read]).reshape(-1)[:: 12 * max(views, 1)].tolist() == widths


def test_no_more_loader_processes_start_than_there_are_pieces_to_decode(tmp_path, monkeypatch):
    """Three images are one piece: one process decodes them, however many workers were asked for; two
    images of 20 views each are two pieces, for two processes."""
    import torch

    from apecli.images import loading as images

    paths = [make_image(tmp_path / f"{i}.jpg", 0, i) for i in range(3)]
    started, loader = [], torch.utils.data.DataLoader

    def recording(*args, **named):
        started.append(named["num_workers"])
        return loader(*args, **named)

    monkeypatch.setattr(torch.utils.data, "DataLoader", recording)
    for batch, workers, views, expected in (([0, 1, 2], 16, 0, 1), ([0, 1], 16, 20, 2), ([0, 1, 2], 1, 20, 1),
                                            ([0, 1, 2], 0, 0, 0)):  # 20 views: an image a piece
        read = list(images.pil_batches(paths, [batch], lambda image: torch.zeros(3, 2, 2), views, 1, workers, "cpu"))
        assert [item.indices for item in read] == [batch] and started.pop() == expected

def test_extraction_gives_the_features_of_the_whole_transform_batch_by_batch(tiny, tmp_path, monkeypatch):
    """Pieces decoded by two loader processes, joined and normalised on the encoder's device: the same
    features, bit for bit, as the model's transform applied whole and the same batches encoded."""
    import torch
    from PIL import Image

    from apecli.encoder import load_encoder
    from apecli.extract import encode_split
    from apecli.images import loading as images

    monkeypatch.setattr(images, "LOADER_TENSORS", 3)  # batches of 5 in pieces of 3 and 2
    paths = [make_image(tmp_path / "images" / f"{i}.jpg", i % 3, i, size=36 + 5 * i) for i in range(12)]
    encoder = load_encoder(tiny)
    settings = ExtractSettings(batch_size=5, workers=2, chunk_images=10)  # batches: 0-4, 5-9, 10-11
    features, ok, _ = encode_split(encoder, "test", paths, 0, tmp_path / "work", settings, None)
    whole = [encoder.eval_transform(Image.open(path).convert("RGB")) for path in paths]
    expected = np.concatenate([encoder.encode_images(torch.stack(whole[start:end])) for start, end in ((0, 5), (5, 10), (10, 12))])
    assert ok.all()
    np.testing.assert_array_equal(features, expected)


def test_decoding_ahead_in_a_thread_keeps_order_and_stops_with_its_consumer(tiny, tmp_path, monkeypatch):
    """--decode gpu's decoding thread: batches in order as decoded one by one; a failure there is raised
    in the consumer; a consumer that stops early leaves no decoding or reading thread behind."""
    import threading

    import torch

    from apecli.encoder import load_encoder
    from apecli.images import gpu as images

    paths = [make_image(tmp_path / f"{i}.jpg", i % 2, i) for i in range(10)]
    encoder = load_encoder(tiny)
    pixels = images.split_transform(encoder.eval_transform)
    batches = [[0, 1, 2], [3, 4, 5], [6, 7], [8, 9]]
    raw = images.RawBytes(paths)
    read = list(images.decoded_batches(paths, batches, 2, encoder, pixels, ahead=1))
    assert [batch.indices for batch in read] == batches
    for batch in read:
        alone = images.decode_on_device(images.Batch.collate([raw[i] for i in batch.indices]), paths, encoder, pixels)
        assert torch.equal(batch.images, alone.images)

    def leftover() -> list[str]:
        return [thread.name for thread in threading.enumerate() if thread.name.startswith(("apecli-decode", "apecli-read"))]

    decoding = images.decoded_batches(paths, batches, 2, encoder, pixels, ahead=1)
    assert next(decoding).indices == [0, 1, 2]
    decoding.close()
    assert not leftover()
    decode, calls = images.decode_on_device, []

    def failing(batch, *rest):
        calls.append(batch.indices)
        if len(calls) == 2:
            raise RuntimeError("CUDA out of memory")
        return decode(batch, *rest)

    monkeypatch.setattr(images, "decode_on_device", failing)
    decoding = images.decoded_batches(paths, batches, 2, encoder, pixels)
    assert next(decoding).indices == [0, 1, 2]
    with pytest.raises(RuntimeError, match="CUDA out of memory"):
        next(decoding)
    assert not leftover()


def test_recurring_batch_shapes_are_replayed_and_a_failed_capture_stays_eager(tiny, monkeypatch, caplog):
    """The encoder's graph policy, with a stand-in capture: a shape's first batch runs eagerly, its second
    is captured, later ones replay; at most ``most`` shapes; a capture that fails is said once and leaves
    every later batch eager. Encoders capture only with APECLI_CUDA_GRAPHS=1."""
    from apecli.encoder import Graphs, load_encoder

    calls: list[tuple] = []

    def capture(shape):
        calls.append(("capture", shape))
        return lambda batch: calls.append(("replay", tuple(batch.shape))) or "replayed"

    def run(batch):
        calls.append(("eager", tuple(batch.shape)))
        return "eager"

    graphs = Graphs(run, capture, most=1)
    outputs = [graphs(np.zeros(shape)) for shape in ((4, 3), (4, 3), (2, 3), (4, 3), (2, 3), (2, 3))]
    assert outputs == ["eager", "replayed", "eager", "replayed", "eager", "eager"]
    assert calls == [("eager", (4, 3)), ("capture", (4, 3)), ("replay", (4, 3)), ("eager", (2, 3)),
                     ("replay", (4, 3)), ("eager", (2, 3)), ("eager", (2, 3))]  # (2, 3): beyond most=1

    def failing(shape):
        raise RuntimeError("operation not permitted when stream is capturing\nmore")

    graphs = Graphs(run, failing)
    with caplog.at_level("WARNING", logger="apecli"):
        assert [graphs(np.zeros((4, 3))) for _ in range(4)] == ["eager"] * 4
    assert graphs.failure == "operation not permitted when stream is capturing" and not graphs.replays
    assert [record.getMessage() for record in caplog.records] == \
        ["encoding without CUDA graphs: capture failed (operation not permitted when stream is capturing)"]

    monkeypatch.delenv("APECLI_CUDA_GRAPHS", raising=False)
    assert load_encoder(tiny).graphs.capture is None
    monkeypatch.setenv("APECLI_CUDA_GRAPHS", "1")
    encoder = load_encoder(tiny)
    assert encoder.graphs.capture == encoder.capture_graph
    monkeypatch.setenv("APECLI_CUDA_GRAPHS", "sometimes")
    with pytest.raises(ApecliError, match="APECLI_CUDA_GRAPHS=sometimes: give 1"):
        load_encoder(tiny)
