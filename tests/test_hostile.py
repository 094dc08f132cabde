"""Hostile files, full disks and odd paths: no code a file holds runs, nothing is written outside the store
or the output path, no artifact is lost, no command hangs, and each bad input is one line on stderr with
a non-zero exit (2 for a bad command line)."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import h5py
import numpy as np
import pytest
from typer.testing import CliRunner

from apecli import store
from apecli.cli import app
from apecli.kinds.features import save_features
from apecli.kinds.refinement import save_refinement
from apecli.refine import select_channels

from conftest import assert_one_line_error, write_npz

runner = CliRunner()
AS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0  # permissions do not stop root


def run(*args, input: str | None = None):
    return runner.invoke(app, [str(arg) for arg in args], input=input)


def process(*args, timeout: float = 60, **options):
    """apecli in a process of its own: a hang fails the test instead of stopping the suite."""
    return subprocess.run([sys.executable, "-m", "apecli", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "HF_HUB_OFFLINE": "1"}, **options)


def one_line(result, *fragments):
    """A process that failed in one line on stderr, naming what is wrong, with no traceback."""
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 1 and len(lines) == 1 and lines[0].startswith("apecli: error: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


@pytest.fixture
def chain(small_features, tmp_path):
    """A features artifact and its refinement in a store."""
    folder = tmp_path / "store" / "synthetic"
    features = save_features(small_features, folder / "features.h5")
    refinement = save_refinement(select_channels(features, k=8), features, folder / "refine.h5")
    return features.artifact.path, refinement.artifact.path


# 1. Code in files -------------------------------------------------------------------------------------

def test_a_torchscript_archive_is_read_as_torchscript_only_when_the_user_trusts_it(tmp_path, monkeypatch):
    import torch
    from test_archives import _odd_module  # a module whose state is pickled as a tuple: the weights reader refuses it

    from apecli.encoder import EncoderSpec, load_encoder
    from apecli.errors import ApecliError
    from apecli.synthetic import tiny_model_config

    archive = tmp_path / "odd.pt"
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.script(_odd_module()()).save(str(archive))
    called = []
    monkeypatch.setattr(torch.jit, "load", lambda *args, **kwargs: called.append(args) or pytest.fail("ran"))
    config = tiny_model_config(tmp_path)
    with pytest.raises(ApecliError, match="would run the code it holds: pass `trust_torchscript=True`"):
        load_encoder(EncoderSpec(str(config), str(archive), "cpu"))
    assert called == []  # TorchScript never touched the file
    from apecli.synthetic import image_folder

    images = image_folder(tmp_path / "images", classes=2, per_class=8)
    result = run("extract", "--images", images, "--model", config, "--pretrained", archive, "--device", "cpu",
                 "--shots", "1", "--store", tmp_path / "s")
    assert_one_line_error(result, "odd.pt: not an OpenAI CLIP archive apecli can read", "pass --trust-torchscript only "
                          "for a file you trust")
    assert called == []


def test_a_model_name_read_from_an_artifact_never_becomes_a_path_to_write(tiny, caltech, tmp_path):
    from apecli.datasets import read_coop
    from apecli.extract import ExtractSettings, extract

    extracted = extract(read_coop("caltech101", caltech), tiny, tmp_path / "s", ExtractSettings(shots=(2,), views=1,
                                                                                                workers=0))
    evaluated = run("eval", extracted.artifact.path, "--mode", "zero-shot", "--store", tmp_path / "s")
    assert evaluated.exit_code == 0, evaluated.stderr
    target = tmp_path / "outside"
    with h5py.File(extracted.artifact.path, "a") as handle:  # the recorded model name made a path
        metadata = json.loads(handle.attrs["metadata"])
        metadata["model"]["model"] = f"../../../../../../{target}"
        handle.attrs["metadata"] = json.dumps(metadata)
    image = next(iter(extracted.split("test").paths))
    result = run("predict", image, "--model-artifact", evaluated.stdout.strip(), "--device", "cpu")
    assert_one_line_error(result, "records the model name", "which is not a model config's name")
    assert not target.with_suffix(".json").exists() and not list(tmp_path.rglob("outside*"))


# 3. Damaged parents are reported, their children kept -----------------------------------------------

@pytest.mark.parametrize("damage", ["truncated", "zeroed", "a folder", "a link to /dev/zero", "unreadable"])
def test_a_damaged_parent_is_reported_and_its_children_kept(chain, damage):
    features, refinement = chain
    if damage == "unreadable" and AS_ROOT:
        pytest.skip("root reads a file whatever its permissions")
    data = features.read_bytes()
    if damage == "truncated":
        features.write_bytes(data[: len(data) // 3])
    elif damage == "zeroed":
        features.write_bytes(bytes(len(data)))
    elif damage == "a folder":
        features.unlink()
        features.mkdir()
    elif damage == "a link to /dev/zero":
        features.unlink()
        features.symlink_to("/dev/zero")
    else:
        features.chmod(0)
    folder = features.parent.parent
    try:
        collected = process("gc", folder, "--json", timeout=30)
        assert collected.returncode == 0, collected.stderr
        report = json.loads(collected.stdout)
        assert report["removed"] == [] and refinement.exists()
        assert any(entry["path"] == str(refinement) and "kept" in entry["why"] for entry in report["kept"])
        listed = process("ls", folder, timeout=30)
        assert listed.returncode == 0 and f"{refinement}\trefinement" in listed.stdout
        assert "[unreadable ancestor: its parent" in listed.stdout and "[stale" not in listed.stdout
        verified = process("verify", folder, timeout=30)
        assert verified.returncode == 1 and f"{refinement}\trefinement\tits parent" in verified.stdout
    finally:
        if damage == "unreadable":
            features.chmod(0o644)


# 4. Output paths that are not regular files ----------------------------------------------------------

@pytest.mark.parametrize("what", ["a FIFO", "a symbolic link", "a device"])
def test_export_never_replaces_what_is_not_a_regular_file(chain, tmp_path, what):
    features, _ = chain
    out = tmp_path / "out.npz"
    if what == "a FIFO":
        os.mkfifo(out)
    elif what == "a symbolic link":
        (tmp_path / "kept.npz").write_bytes(b"mine")
        out.symlink_to(tmp_path / "kept.npz")
    else:
        out = Path("/dev/null")
    mode = os.lstat(out).st_mode
    result = run("export", features, "--out", out)
    assert_one_line_error(result, str(out), "give the path of a file to write")
    assert os.lstat(out).st_mode == mode  # still what it was
    if what == "a symbolic link":
        assert (tmp_path / "kept.npz").read_bytes() == b"mine"


# 5. A full disk --------------------------------------------------------------------------------------

def test_a_full_disk_is_one_line_and_leaves_the_store_as_it_was(small_features, chain, tmp_path, monkeypatch):
    features, refinement = chain
    before = {path: path.read_bytes() for path in features.parent.iterdir()}
    monkeypatch.setattr(store, "_free_bytes", lambda folder: 4096)
    npz = write_npz(tmp_path / "more.npz", small_features, shots=4)
    result = run("import", "npz", npz, "--dataset", "synthetic", "--store", features.parent.parent)
    assert_one_line_error(result, f"no space left on {features.parent} (needs about ", "kB free)")
    refined = run("refine", features, "--k", "5", "--store", features.parent.parent)
    assert_one_line_error(refined, "no space left on")
    assert {path: path.read_bytes() for path in features.parent.iterdir()} == before  # nothing half-written


def test_a_disk_that_fills_during_a_write_is_one_line(small_features, tmp_path):
    """A real full file system (a 4 MB tmpfs, where this machine lets the tests mount one)."""
    mount = tmp_path / "tiny"
    mount.mkdir()
    if not AS_ROOT or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount)],
                                     capture_output=True).returncode != 0:
        pytest.skip("cannot mount a small tmpfs here")
    try:
        from apecli.synthetic import synthetic_features

        big = synthetic_features(num_classes=20, dim=256, shots=(16,), val_per_class=40, test_per_class=40, views=4)
        first = process("import", "npz", write_npz(tmp_path / "a.npz", big), "--store", mount / "s")
        assert first.returncode == 0, first.stderr
        kept = Path(first.stdout.strip()).read_bytes()
        second = process("import", "npz", write_npz(tmp_path / "b.npz", replace_seed(big)), "--store", mount / "s")
        one_line(second, "no space left on")
        assert Path(first.stdout.strip()).read_bytes() == kept
        assert [path.name for path in (mount / "s").rglob("*") if path.is_file()] == [Path(first.stdout.strip()).name]
    finally:
        subprocess.run(["umount", str(mount)], capture_output=True)


def replace_seed(features):
    from dataclasses import replace

    return replace(features, classifier=features.classifier[::-1].copy(), class_names=features.class_names[::-1])


# 6. Header fields that are not what the format says --------------------------------------------------

DAMAGES = {
    "metadata a JSON list": lambda handle: handle.attrs.__setitem__("metadata", "[1, 2]"),
    "a number where text belongs": lambda handle: handle.attrs.__setitem__(
        "metadata", json.dumps({**json.loads(handle.attrs["metadata"]), "dataset": 5})),
    "invalid UTF-8 in kind": lambda handle: handle.attrs.__setitem__("kind", np.bytes_(b"\xff\xfe")),
    "a number as format": lambda handle: handle.attrs.__setitem__("format", 7),
    "a parent path that is a number": lambda handle: handle.attrs.__setitem__(
        "parents", json.dumps([{"kind": "features", "path": 5, "content_id": "0" * 16}])),
    "an empty dataset": lambda handle: handle.create_dataset("empty", data=h5py.Empty("f")).attrs.__setitem__(
        "encoding-type", "array"),
    "a shot count as text": lambda handle: handle.attrs.__setitem__(
        "metadata", json.dumps({**json.loads(handle.attrs["metadata"]), "shots": ["4"]})),
}


@pytest.mark.parametrize("damage", DAMAGES)
def test_a_header_field_the_format_does_not_allow_is_one_line_everywhere(chain, damage, tmp_path):
    features, refinement = chain
    evaluated = run("eval", features, "--mode", "zero-shot", "--store", features.parent.parent)
    evaluation = evaluated.stdout.strip()
    image = tmp_path / "image.jpg"
    image.write_bytes(b"not read: the model is refused first")
    with h5py.File(features, "a") as handle:
        DAMAGES[damage](handle)
    for command in (["info", features], ["refine", features], ["eval", features, "--mode", "zero-shot"],
                    ["export", features, "--out", features.parent / "x.npz"], ["fit", features, "--epochs", "1"],
                    ["classes", evaluation], ["predict", image, "--model-artifact", evaluation],
                    ["transfer", evaluation, "--to", features]):
        assert_one_line_error(run(*command, "--store", features.parent.parent), str(features))
    assert_one_line_error(run("eval", refinement, "--store", features.parent.parent), str(features))
    folder = features.parent.parent
    listed = run("ls", folder)  # the rest of the store is listed
    assert listed.exit_code == 0 and "Traceback" not in listed.stderr
    verified = run("verify", folder, "--json")
    assert verified.exit_code == 1 and "Traceback" not in verified.stderr
    problems = {Path(entry["artifact"]).name: entry["problem"] for entry in json.loads(verified.stdout)["artifacts"]}
    assert problems["features.h5"] and problems["refine.h5"]
    collected = run("gc", folder, "--dry-run")
    assert collected.exit_code == 0 and "Traceback" not in collected.stderr


# 7. Hangs and depths ---------------------------------------------------------------------------------

def test_a_fifo_or_a_link_loop_named_like_an_artifact_hangs_nothing(chain):
    features, refinement = chain
    folder = features.parent.parent
    os.mkfifo(features.parent / "fifo.h5")
    (features.parent / "loop.h5").symlink_to(features.parent / "loop.h5")
    for command in (["ls", folder], ["gc", folder, "--dry-run"]):
        result = process(*command, timeout=30)
        assert result.returncode == 0 and str(refinement) in result.stdout + result.stderr or command[0] == "gc"
    verified = process("verify", folder, timeout=30)
    assert verified.returncode == 1 and "fifo.h5\t?\tis not a regular file" in verified.stdout
    assert "loop.h5\t?\tcannot be read" in verified.stdout
    one_line(process("info", features.parent / "fifo.h5", timeout=30), "fifo.h5: is not a regular file")
    with h5py.File(refinement, "a") as handle:  # a parent path that points at the FIFO
        handle.attrs["parents"] = json.dumps([{**json.loads(handle.attrs["parents"])[0], "path": "fifo.h5"}])
    one_line(process("eval", refinement, "--store", folder, timeout=30), "fifo.h5: is not a regular file")


def test_an_array_declared_far_larger_than_the_file_is_refused_on_open(chain):
    features, _ = chain
    with h5py.File(features, "a") as handle:
        sparse = handle.create_dataset("huge", shape=(10**9, 64), dtype="f4", chunks=(1, 64))  # nothing written
        sparse.attrs["encoding-type"] = "array"
    one_line(process("verify", features, timeout=30), "its dataset 'huge' declares 256,000,000,000 bytes but the file "
             "holds 0 of them")
    listed = process("verify", features.parent, timeout=30)  # the store: the file is one failure among others
    assert listed.returncode == 1 and f"{features}\t?\tits dataset 'huge' declares" in listed.stdout


def test_a_chain_of_a_thousand_artifacts_is_walked_without_recursion(chain):
    features, refinement = chain
    parent = store.open_artifact(refinement)
    metadata = dict(parent.metadata)
    arrays = {"channels": parent.read("channels"), "criterion": parent.read("criterion")}
    for number in range(1100):
        metadata["k"] = 8 + number  # another content each time
        parent = store.write_artifact(refinement.parent / f"r{number}.h5", "refinement", arrays, metadata, [parent])
    for command in (["verify", parent.path], ["info", parent.path]):
        result = process(*command, timeout=120)
        assert result.returncode == 0 and "Recursion" not in result.stderr, result.stderr


# 8. Decompression bombs -----------------------------------------------------------------------------

def png_declaring(width: int, height: int) -> bytes:
    """A PNG whose header says width × height pixels, in a few dozen bytes."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b""))


def test_a_decompression_bomb_is_an_unreadable_image_like_any_other(tiny, tmp_path):
    from apecli.synthetic import image_folder

    folder = tmp_path / "images"
    for split in ("train", "val", "test"):
        image_folder(folder / split, classes=2, per_class=3)
    bomb = folder / "test" / "class_0" / "bomb.png"
    bomb.write_bytes(png_declaring(30000, 30000))
    common = ["--model", tiny.model, "--pretrained", tiny.pretrained, "--device", "cpu", "--workers", "0",
              "--views", "1", "--shots", "1", "--store", tmp_path / "s"]
    refused = run("extract", "--images", folder, *common)  # after extract's own lines on what it does
    error = [line for line in refused.stderr.splitlines() if line.startswith("apecli: error: ")]
    assert refused.exit_code == 1 and "Traceback" not in refused.stderr and len(error) == 1
    assert "bomb.png: unreadable image" in error[0] and "decompression bomb" in error[0] and "--skip-bad" in error[0]
    skipped = run("extract", "--images", folder, *common, "--skip-bad", "--json")
    assert skipped.exit_code == 0, skipped.stderr
    assert [entry["path"] for entry in json.loads(skipped.stdout)["skipped"]] == [str(bomb)]
    evaluation = run("eval", json.loads(skipped.stdout)["artifact"], "--mode", "zero-shot", "--store", tmp_path / "s")
    good = folder / "test" / "class_1" / "0.jpg"
    predicted = run("predict", bomb, good, "--model-artifact", evaluation.stdout.strip(), "--skip-bad", "--device", "cpu")
    assert predicted.exit_code == 0 and f"skipped {bomb}: " in predicted.stderr and str(good) in predicted.stdout
    assert_one_line_error(run("predict", bomb, "--model-artifact", evaluation.stdout.strip(), "--device", "cpu"),
                          "bomb.png: unreadable image")


# 9. Pipes and streams -------------------------------------------------------------------------------

@pytest.mark.parametrize("text", ['{"artifact": 5}', "[1]", '{"artifact": null}'])
def test_json_on_stdin_without_a_path_is_one_line(chain, text):
    assert_one_line_error(run("refine", input=text + "\n"), "stdin holds JSON without an 'artifact' path")


def test_a_closed_stdin_or_stdout_is_said_not_ignored(chain):
    features, _ = chain
    folder = features.parent.parent
    closed_in = process("refine", "--store", folder, timeout=60, stdin=subprocess.DEVNULL)
    assert closed_in.returncode == 0 and closed_in.stdout.strip().endswith(".h5")  # no pipe: the newest features
    closing = subprocess.run(f"{sys.executable} -m apecli refine {features} --store {folder} >&-", shell=True,
                             capture_output=True, text=True, timeout=60)
    lines = [line for line in closing.stderr.splitlines() if line.startswith("apecli: error: ")]
    assert closing.returncode == 1 and lines and "stdout is closed" in lines[0], closing.stderr
    reading = subprocess.run(f"{sys.executable} -m apecli refine --store {folder} <&-", shell=True,
                             capture_output=True, text=True, timeout=60)
    assert reading.returncode == 0 and "Traceback" not in reading.stderr, reading.stderr


def test_bench_refuses_results_it_did_not_write_and_writes_its_table_again(chain, tmp_path):
    features, _ = chain
    out = tmp_path / "out"
    out.mkdir()
    (out / "results.json").write_text('{"not": "rows"}')
    assert_one_line_error(run("bench", features, "--modes", "zero-shot", "--out", out), "not the results bench writes")
    (out / "results.json").unlink()
    assert run("bench", features, "--modes", "zero-shot", "--out", out).exit_code == 0
    (out / "results.csv").unlink()
    again = run("bench", features, "--modes", "zero-shot", "--out", out)
    rows = json.loads((out / "results.json").read_text())
    assert again.exit_code == 0 and (out / "results.csv").read_text().count("\n") == 1 + len(rows) == 3


# 11. An artifact edited in place is written again, not kept ------------------------------------------

def test_running_a_command_again_replaces_an_artifact_edited_in_place(small_features, tmp_path):
    npz = write_npz(tmp_path / "f.npz", small_features, shots=4)
    made = run("import", "npz", npz, "--store", tmp_path / "s").stdout.strip()
    with h5py.File(made, "a") as handle:
        handle["val/features"][0, 0] += 1.0
    assert run("verify", made).exit_code == 1
    again = run("import", "npz", npz, "--store", tmp_path / "s")
    assert again.exit_code == 0 and again.stdout.strip() == made
    assert run("verify", made).exit_code == 0


# 12. The rest ---------------------------------------------------------------------------------------

def test_a_pickle_in_a_tensor_file_is_named_not_cut_short(tmp_path):
    import torch

    folder = tmp_path / "cache"
    folder.mkdir()
    torch.save({"payload": Path("/etc/passwd")}, folder / "keys_1shots.pt")  # an object, not a tensor
    result = run("import", "tip-adapter", folder, "--text-weights", folder / "keys_1shots.pt", "--store", tmp_path / "s")
    assert_one_line_error(result, "holds Python objects other than tensors", "which apecli does not unpickle")


def test_a_file_that_declares_an_impossible_size_says_so(tmp_path):
    import zipfile

    header = np.lib.format.header_data_from_array_1_0(np.zeros(3))
    header["shape"] = (10**6, 10**6)
    with zipfile.ZipFile(tmp_path / "bomb.npz", "w") as archive, archive.open("cache_keys.npy", "w") as member:
        np.lib.format.write_array_header_1_0(member, header)
        member.write(np.zeros(3).tobytes())
    result = run("import", "npz", tmp_path / "bomb.npz", "--store", tmp_path / "s")
    assert_one_line_error(result, "declares 8,000.0 GB of arrays", "an impossible size")


@pytest.mark.parametrize("name", ["bad\nname", "tab\tname", "..", ".hidden"])
def test_a_dataset_name_with_a_control_character_is_refused(small_features, tmp_path, name):
    npz = write_npz(tmp_path / "f.npz", small_features, shots=4)
    result = run("import", "npz", npz, "--dataset", name, "--store", tmp_path / "s")
    assert_one_line_error(result, "is not a folder name the store can use")
    assert not (tmp_path / "s").exists() or not any((tmp_path / "s").rglob("*.h5"))


def test_a_store_path_with_a_newline_is_refused(small_features, tmp_path):
    npz = write_npz(tmp_path / "f.npz", small_features, shots=4)
    assert_one_line_error(run("import", "npz", npz, "--store", tmp_path / "a\nstore"), "has a control character")


@pytest.mark.parametrize("how", ["external storage", "an external link", "a soft link"])
def test_data_kept_outside_the_file_is_refused(chain, tmp_path, how):
    features, _ = chain
    secret = tmp_path / "secret.bin"
    secret.write_bytes(b"private" * 8)
    with h5py.File(features, "a") as handle:
        if how == "external storage":
            dataset = handle.create_dataset("leak", shape=(56,), dtype="u1", external=[(str(secret), 0, 56)])
            dataset.attrs["encoding-type"] = "array"
        elif how == "an external link":
            handle["leak"] = h5py.ExternalLink(str(secret), "/x")
        else:
            handle["leak"] = h5py.SoftLink("/class_names")
    assert_one_line_error(run("info", features), str(features), "'leak'")


def test_a_search_scale_below_where_its_values_start_is_refused(chain):
    features, _ = chain
    assert_one_line_error(run("eval", features, "--search-scale", "0", "0", "0", "--store", features.parent.parent),
                          "the search scale of β must be at least 0.1, where its values start")


@pytest.mark.skipif(AS_ROOT, reason="root writes whatever a folder's permissions")
def test_a_read_only_store_runs_what_is_done_and_refuses_new_work_in_one_line(small_features, tmp_path):
    npz = write_npz(tmp_path / "f.npz", small_features, shots=4)
    made = Path(run("import", "npz", npz, "--store", tmp_path / "s").stdout.strip())
    made.parent.chmod(0o555)
    try:
        again = run("import", "npz", npz, "--store", tmp_path / "s")
        assert again.exit_code == 0 and again.stdout.strip() == str(made)  # nothing to write
        refused = run("refine", made, "--store", tmp_path / "s")
        assert_one_line_error(refused, "Permission denied", str(made.parent))
    finally:
        made.parent.chmod(0o755)
