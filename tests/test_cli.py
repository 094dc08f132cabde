"""The command line: pipelines through stdin, JSON output, and one-line errors with no partial files."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from apecli.cli import app

from conftest import assert_one_line_error, no_partial_files, real_dataset, write_npz

runner = CliRunner()
SMALL_GRID = ["--search-scale", "7", "7", "1", "--search-step", "6", "5", "4"]


def run(*args: str, input: str | None = None):
    return runner.invoke(app, [str(a) for a in args], input=input)


@pytest.fixture
def imported(small_features, tmp_path, store_dir) -> Path:
    """A features artifact in the store, imported from a generated .npz."""
    npz = write_npz(tmp_path / "small.npz", small_features, shots=4)
    result = run("import", "npz", npz, "--dataset", "caltech101", "--store", store_dir)
    assert result.exit_code == 0, result.stderr
    return Path(result.stdout.strip())


def test_import_prints_the_artifact_path_and_says_what_it_did(imported, store_dir):
    assert imported.is_file() and imported.parent == store_dir / "caltech101"
    assert imported.name.startswith("features-")


def test_an_import_whose_text_does_not_match_its_images_warns(small_features, tmp_path, store_dir):
    from dataclasses import replace

    rotation, _ = np.linalg.qr(np.random.default_rng(0).normal(size=(small_features.dim,) * 2))
    stale = replace(small_features, classifier=(small_features.classifier @ rotation).astype(np.float32))
    result = run("import", "npz", write_npz(tmp_path / "stale.npz", stale, shots=4), "--store", store_dir)
    assert result.exit_code == 0 and Path(result.stdout.strip()).is_file()
    assert "warning: by the text classifier, the validation images are classified at chance" in result.stderr
    assert "warning" not in run("import", "npz", write_npz(tmp_path / "fine.npz", small_features, shots=4),
                                "--store", store_dir).stderr


def test_refine_then_eval_through_stdin(imported, store_dir):
    refined = run("refine", "--k", "10", "--w", "0.3", "0.7", "--store", store_dir, input=f"{imported}\n")
    assert refined.exit_code == 0, refined.stderr
    assert "kept 10 of 32 channels" in refined.stderr
    evaluated = run("eval", "--mode", "training-free", *SMALL_GRID, "--store", store_dir, "--json", input=refined.stdout)
    assert evaluated.exit_code == 0, evaluated.stderr
    result = json.loads(evaluated.stdout)
    assert {"artifact", "alpha", "beta", "gamma", "val_accuracy", "test_accuracy", "zero_shot_accuracy"} <= set(result)
    assert result["k"] == 10 and result["shots"] == 4 and result["grid_settings"] == 120
    assert Path(result["artifact"]).is_file()
    assert "APE" in evaluated.stderr  # the table goes to stderr


def test_eval_with_given_values_scores_that_setting_alone(imported, store_dir):
    refined = run("refine", imported, "--k", "10", "--store", store_dir).stdout.strip()
    searched = json.loads(run("eval", refined, *SMALL_GRID, "--store", store_dir, "--json").stdout)
    chosen = {name: searched[name] for name in ("alpha", "beta", "gamma")}
    result = run("eval", refined, *SMALL_GRID, *[part for name, value in chosen.items() for part in (f"--{name}", repr(value))],
                 "--store", store_dir, "--json")
    assert result.exit_code == 0, result.stderr
    given = json.loads(result.stdout)
    assert given["grid_settings"] == 1 and given["given"] == chosen and given["settings_sharing_best"] == 1
    assert (given["val_accuracy"], given["test_accuracy"]) == (searched["val_accuracy"], searched["test_accuracy"])
    assert "given α=" in result.stderr  # the table says these were not chosen on validation
    listed = dict(line.split("\t", 1) for line in run("ls", store_dir).stdout.splitlines())  # path → the rest
    assert listed[given["artifact"]].endswith(f", given α={chosen['alpha']:.4g} β={chosen['beta']:.4g} γ={chosen['gamma']:.4g}")
    assert "given" not in listed[searched["artifact"]]
    info = json.loads(run("info", given["artifact"], "--json").stdout)
    assert info["metadata"]["given"] == chosen and info["shapes"]["search/val_correct"]["shape"] == [1, 1, 1]
    # One value given, the others searched: β and γ chosen over their whole ranges, α as given.
    half = json.loads(run("eval", refined, *SMALL_GRID, "--alpha", "2.5", "--store", store_dir, "--json").stdout)
    assert half["alpha"] == 2.5 and half["given"] == {"alpha": 2.5} and half["grid_settings"] == 6 * 4


def test_refine_json_lists_sorted_channels(imported, store_dir):
    result = run("refine", imported, "--k", "5", "--store", store_dir, "--json")
    assert result.exit_code == 0, result.stderr
    payload = json.loads(result.stdout)
    assert payload["channels"] == sorted(payload["channels"]) and len(payload["channels"]) == 5
    assert payload["weights"] == [0.5, 0.5]  # caltech101's


def test_a_json_line_on_stdin_is_followed(imported, store_dir):
    refined = run("refine", imported, "--k", "6", "--store", store_dir, "--json")
    evaluated = run("eval", "-", "--mode", "zero-shot", "--store", store_dir, input=refined.stdout)
    assert evaluated.exit_code == 0, evaluated.stderr
    assert evaluated.stdout.strip().endswith(".h5")


def test_without_input_the_newest_artifact_is_used(imported, store_dir, monkeypatch):
    import apecli.cli.io as io

    monkeypatch.setattr(io, "_stdin_is_piped", lambda: False)
    result = run("refine", "--k", "4", "--store", store_dir)
    assert result.exit_code == 0, result.stderr
    assert f"using the newest features artifact: {imported}" in result.stderr


def test_store_comes_from_the_environment(imported, store_dir, monkeypatch):
    monkeypatch.setenv("APECLI_STORE", str(store_dir))
    result = run("refine", imported, "--k", "4")
    assert result.exit_code == 0, result.stderr
    assert Path(result.stdout.strip()).parent == store_dir / "caltech101"


def test_training_free_on_features_refines_with_defaults(imported, store_dir):
    result = run("eval", imported, "--mode", "training-free", *SMALL_GRID, "--store", store_dir, "--json")
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["k"] == round(800 * 32 / 1024)


def test_export_round_trips_the_import(small_features, tmp_path, store_dir):
    original = write_npz(tmp_path / "a.npz", small_features, shots=4)
    artifact = run("import", "npz", original, "--store", store_dir).stdout.strip()
    result = run("export", artifact, "--out", tmp_path / "b.npz", "--store", store_dir)
    assert result.exit_code == 0, result.stderr
    with np.load(original) as a, np.load(tmp_path / "b.npz") as b:
        assert sorted(a.files) == sorted(b.files)
        for name in a.files:
            np.testing.assert_array_equal(a[name], b[name])
    (tmp_path / "folder").mkdir()
    result = run("export", artifact, "--out", tmp_path / "folder", "--store", store_dir)
    assert_one_line_error(result, "folder: is a folder; give the path of a file to write")
    assert list((tmp_path / "folder").iterdir()) == [] and no_partial_files(tmp_path)


@pytest.mark.parametrize(
    "args, message",
    [
        (["refine", "{features}", "--k", "0"], "k must be between 1 and the feature width 32, got 0"),
        (["refine", "{features}", "--k", "33"], "k must be between 1 and the feature width 32, got 33"),
        (["refine", "{features}", "--shots", "2"], "has no 2-shot cache (it holds 4 shots)"),
        (["eval", "{features}", "--mode", "magic"], "unknown mode 'magic'"),
        (["refine", "{store}/absent.h5"], "absent.h5: no such file"),
        (["eval", "{features}", "--search-step", "0", "1", "1"], "search steps must be at least 1"),
        (["eval", "{features}", "--search-step", "100000", "100000", "100000"],
         "a search of 1,000,000,000,000,000 settings is more than apecli runs (at most 100,000,000): fewer --search-step"),
        (["eval", "{features}", "--alpha", "0"], "a given α must be finite and positive, got 0.0"),
        (["refine", "{features}", "--w", "nan", "1"], "the criterion weight w0 must be finite and not negative, got nan"),
        (["refine", "{features}", "--w", "0", "0"], "the criterion weights w0 and w1 must not both be zero"),
        (["fit", "{features}", "--w", "1", "inf"], "the criterion weight w1 must be finite and not negative, got inf"),
        (["fit", "{features}", "--weight-decay", "nan"], "weight decay must be finite and not negative, got nan"),
        (["fit", "{features}", "--alpha", "-1"], "α during training must be finite and positive, got -1.0"),
        (["fit", "{features}", "--seed", "-1"], "a seed must be between 0 and 4294967295, got -1"),
        (["eval", "{features}", "--mode", "tip-adapter", "--gamma", "1"], "mode tip-adapter has no γ to give; it takes α, β"),
    ],
)
def test_bad_input_is_one_line_and_writes_nothing(imported, store_dir, args, message):
    before = sorted(store_dir.rglob("*"))
    args = [a.format(features=imported, store=store_dir) for a in args]
    result = run(*args, "--store", store_dir)
    assert_one_line_error(result, message)
    assert result.exit_code == (2 if "unknown mode" in message else 1)  # a mode outside the choices: mistyped
    assert sorted(store_dir.rglob("*")) == before and no_partial_files(store_dir)


def test_a_dataset_name_that_is_no_folder_name_is_refused(small_features, tmp_path, store_dir):
    file = write_npz(tmp_path / "a.npz", small_features, shots=4)
    for name in ("../outside", "two/parts", ".hidden"):
        assert_one_line_error(run("import", "npz", file, "--dataset", name, "--store", store_dir),
                              f"dataset name '{name}' is not a folder name the store can use")
    assert not (tmp_path / "outside").exists() and not store_dir.exists()


def test_empty_stdin_is_an_error(store_dir):
    assert_one_line_error(run("refine", "--store", store_dir, input=""), "no artifact path on stdin")


def test_a_changed_parent_is_refused(small_features, imported, store_dir, tmp_path):
    refined = run("refine", imported, "--k", "6", "--store", store_dir).stdout.strip()
    from dataclasses import replace

    from apecli.kinds.features import save_features

    save_features(replace(small_features, classifier=-small_features.classifier), imported)
    assert_one_line_error(run("eval", refined, "--store", store_dir), "changed since it was written")


def test_truncated_store_file_is_refused(imported, store_dir):
    data = imported.read_bytes()
    imported.write_bytes(data[: len(data) // 2])
    assert_one_line_error(run("refine", imported, "--store", store_dir), str(imported))


def test_shots_that_disagree_with_the_refinement(imported, store_dir):
    refined = run("refine", imported, "--k", "6", "--shots", "4", "--store", store_dir).stdout.strip()
    assert_one_line_error(run("eval", refined, "--shots", "1", "--store", store_dir), "made from the 4-shot cache, not 1")


def test_usage_errors_exit_2():
    assert runner.invoke(app, ["refine", "--k", "many"]).exit_code == 2


def test_info_describes_an_artifact(imported, store_dir):
    result = run("info", imported, "--json", "--store", store_dir)
    payload = json.loads(result.stdout)
    assert payload["kind"] == "features" and payload["metadata"]["shots"] == [4]
    assert "cache/4/keys" in payload["arrays"] and payload["stale"] is None
    assert payload["shapes"]["cache/4/keys"] == {"shape": [24, 32], "dtype": "float32"}
    assert payload["shapes"]["class_names"] == {"shape": [6], "dtype": "str"}
    assert payload["writer"].startswith("apecli ") and payload["created"].startswith("20")


def test_info_for_people_says_whether_an_artifact_is_usable(imported, store_dir):
    refined = run("refine", imported, "--k", "10", "--w", "0.3", "0.7", "--store", store_dir)
    usable = run("info", refined.stdout.strip())
    assert usable.exit_code == 0 and usable.stderr == ""  # the report is the result: on stdout

    def fields(stdout: str) -> dict[str, str]:  # "key   value" lines, nested ones by their indent
        return dict(re.fullmatch(r"(\s*\S+(?: \S+)*)(?:\s{2,}(.*))?", line).groups("") for line in stdout.splitlines())

    described = fields(usable.stdout)
    assert described["path"] == refined.stdout.strip()
    assert described["kind"] == "refinement" and described["state"] == "usable"
    assert described[f"  {imported.name}"].startswith("features (")  # the parent, by its path beside the child
    assert described["  channels"] == "10 int64" and described["weights"] == "[0.3, 0.7]"
    imported.unlink()
    stale = fields(run("info", refined.stdout.strip()).stdout)
    assert stale["state"] == f"stale: its parent features artifact {imported.name} is missing"


def test_the_outline_for_people_rounds_floats_and_cuts_long_lists():
    from apecli.cli.io import outline

    assert outline({"alpha": 1.1350000000000002, "shots": list(range(20)), "nested": {"a": [0.1 + 0.2], "b": {}, "c": []}}) == [
        "alpha   1.135", "shots   [0, 1, 2, 3, 4, 5, 6, 7, … (20 in all)]", "nested", "  a  [0.3]", "  b  none", "  c  none"]


def test_demo_runs_offline_and_beats_zero_shot(tmp_path):
    result = run("demo", "--store", tmp_path / "demo", "--json")
    assert result.exit_code == 0, result.stderr
    payload = json.loads(result.stdout)
    assert payload["val_accuracy"] > payload["zero_shot_val_accuracy"]
    assert payload["test_accuracy"] > payload["zero_shot_accuracy"]
    assert payload["dataset"] == "demo-stripes" and "/demo-stripes/" in payload["artifact"]  # named for what it is
    assert 30 < payload["test_accuracy"] < 90  # a few-shot problem the cache helps with and does not solve
    assert "a generated set, not a benchmark" in result.stderr


def _apecli(*args: str, cwd: Path, stdin: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "apecli", *args], cwd=cwd, input=stdin, capture_output=True,
                          text=True, env=env, timeout=300)


def test_a_shell_pipeline_on_real_features(tmp_path):
    folder = real_dataset("caltech101")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "APECLI_STORE": str(tmp_path / "caches")}
    apecli = f"{sys.executable} -m apecli"
    pipeline = (
        f"set -o pipefail; {apecli} import tip-adapter {folder} --text-weights {folder}/proxy_text_weights.pt "
        f"--dataset caltech101 | {apecli} refine --k 300 | {apecli} eval --mode training-free "
        f"--search-step 20 20 5 --json"
    )
    done = subprocess.run(["bash", "-c", pipeline], capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["zero_shot_accuracy"] == pytest.approx(87.95, abs=0.01)
    assert result["val_accuracy"] > result["zero_shot_val_accuracy"] + 3
    assert result["k"] == 300 and result["shots"] == 16


def test_the_command_line_starts_without_torch(tmp_path):
    code = "import sys; from apecli.cli import app; print('torch' in sys.modules, 'open_clip' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.stdout.strip() == "False False", done.stderr
    assert _apecli("--help", cwd=tmp_path).returncode == 0


def test_errors_from_a_real_process_have_no_traceback(tmp_path):
    done = _apecli("refine", str(tmp_path / "nothing.h5"), cwd=tmp_path)
    assert done.returncode == 1 and done.stdout == ""
    assert done.stderr.strip() == f"apecli: error: {tmp_path / 'nothing.h5'}: no such file"


@pytest.mark.parametrize("args, message", [
    (("refine", "--k", "many"), "apecli: error: Invalid value for '--k'"),
    (("eval", "--shots", "0"), "apecli: error: Invalid value for '--shots'"),
    (("eval", "--val-shots", "0"), "apecli: error: Invalid value for '--val-shots'"),
    (("frob",), "apecli: error: No such command 'frob'"),
])
def test_a_mistyped_command_line_is_one_line_too(tmp_path, args, message):
    done = _apecli(*args, cwd=tmp_path)
    assert done.returncode == 2 and done.stdout == ""
    assert len(done.stderr.splitlines()) == 1 and done.stderr.startswith(message), done.stderr


def test_a_store_that_cannot_be_written_is_one_line(imported, tmp_path):
    (tmp_path / "plain-file").write_text("not a folder")
    result = run("refine", imported, "--k", "4", "--store", tmp_path / "plain-file" / "store")
    assert_one_line_error(result, "plain-file")


def test_making_an_artifact_again_makes_it_the_newest(imported, store_dir, monkeypatch):
    import apecli.cli.io as io

    first = Path(run("refine", imported, "--k", "4", "--store", store_dir).stdout.strip())
    run("refine", imported, "--k", "5", "--store", store_dir)
    again = Path(run("refine", imported, "--k", "4", "--store", store_dir).stdout.strip())
    assert again == first
    monkeypatch.setattr(io, "_stdin_is_piped", lambda: False)
    result = run("eval", "--mode", "zero-shot", "--store", store_dir)
    assert f"using the newest refinement artifact: {first}" in result.stderr


def test_ls_lists_what_a_store_holds(imported, store_dir):
    refined = Path(run("refine", imported, "--k", "6", "--store", store_dir).stdout.strip())
    listed = run("ls", store_dir)
    assert listed.exit_code == 0, listed.stderr
    lines = [line.split("\t") for line in listed.stdout.strip().splitlines()]
    assert [(Path(line[0]), line[1], line[2]) for line in lines] == [(imported, "features", "caltech101"),
                                                                    (refined, "refinement", "caltech101")]
    assert lines[1][3].startswith("k=6 of the 4-shot cache")
    only = json.loads(run("ls", "--store", store_dir, "--kind", "refinement", "--json").stdout)
    assert [item["artifact"] for item in only] == [str(refined)]
    assert_one_line_error(run("ls", store_dir, "--kind", "feature"), "unknown kind 'feature'")
    assert_one_line_error(run("ls", store_dir / "elsewhere"), "elsewhere: no such folder")


def test_every_mode_keeps_the_shots_of_a_refinement(small_features, store_dir):
    from apecli import store
    from apecli.kinds.features import save_features

    assert small_features.shots == (1, 4)
    features = save_features(small_features, store.in_store(store_dir, "x", "features")).artifact.path
    refined = run("refine", features, "--k", "8", "--shots", "1", "--store", store_dir).stdout.strip()
    result = run("eval", refined, "--mode", "tip-adapter", "--search-step", "4", "4", "1", "--store", store_dir, "--json")
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["shots"] == 1  # not the store's largest, 4


def test_the_consistent_part_of_a_stale_cache_imports_with_shots(tmp_path):
    folder = real_dataset("dtd")
    args = ["import", "tip-adapter", folder, "--text-weights", folder / "proxy_text_weights.pt", "--dataset", "dtd",
            "--store", tmp_path / "s"]
    assert_one_line_error(run(*args), "mixes features of different models", "--shots 1")
    imported = run(*args, "--shots", "1", "--json")
    assert imported.exit_code == 0, imported.stderr
    assert json.loads(imported.stdout)["shots"] == [1]


def test_models_lists_open_clip_names_with_their_tags():
    listed = run("models", "rn50")
    assert listed.exit_code == 0, listed.stderr
    lines = dict(line.split("\t") for line in listed.stdout.splitlines())
    assert "openai" in lines["RN50"].split(", ") and "RN50-quickgelu" in lines and "ViT-B-16" not in lines
    found = json.loads(run("models", "ViT-B-16", "--json").stdout)
    assert "openai" in found["ViT-B-16"] and all("vit-b-16" in name.lower() for name in found)
    assert_one_line_error(run("models", "no-such-model-anywhere"), "no open_clip model name contains")


def test_verify_checks_a_store_or_a_piped_artifact_with_its_ancestors(imported, store_dir, tmp_path, monkeypatch):
    import h5py

    import apecli.cli.io as io

    refined = run("refine", imported, "--k", "6", "--store", store_dir).stdout.strip()
    evaluated = run("eval", refined, "--mode", "zero-shot", "--store", store_dir).stdout.strip()
    piped = run("verify", input=f"{evaluated}\n")
    assert piped.exit_code == 0, piped.stderr
    assert [line.split("\t") for line in piped.stdout.splitlines()] == [
        [evaluated, "evaluation", "ok"], [refined, "refinement", "ok"], [str(imported), "features", "ok"]]
    assert "3 artifacts: contents match their content ids" in piped.stderr
    monkeypatch.setattr(io, "_stdin_is_piped", lambda: False)
    whole = json.loads(run("verify", "--store", store_dir, "--json").stdout)
    assert (whole["checked"], whole["failed"]) == (3, 0)

    with h5py.File(imported, "r+") as handle:  # a channel of the text classifier overwritten in place
        handle["text/classifier"][:, 0] = 0.0
    failed = run("verify", store_dir)
    assert failed.exit_code == 1
    problems = {Path(line.split("\t")[0]).name: line.split("\t")[2] for line in failed.stdout.splitlines()}
    assert problems[imported.name].startswith("modified since it was written")
    assert problems[Path(refined).name] == f"its ancestor {imported} fails verification"
    assert failed.stderr.strip().splitlines() == ["apecli: error: 3 of 3 artifacts fail verification"]
    assert json.loads(run("verify", evaluated, "--json").stdout)["failed"] == 3
    Path(refined).write_bytes(Path(refined).read_bytes()[:300])  # its header gone too: ls passes over it
    listed = {Path(line.split("\t")[0]).name: line.split("\t")[1:] for line in run("verify", store_dir).stdout.splitlines()}
    assert listed[Path(refined).name][0] == "?" and "not a readable HDF5 artifact" in listed[Path(refined).name][1]
    assert len(listed) == 3

    (tmp_path / "empty").mkdir()
    (tmp_path / "other.h5").write_bytes(b"not hdf5")
    assert_one_line_error(run("verify", tmp_path / "empty"), "holds no artifacts")
    assert_one_line_error(run("verify", tmp_path / "other.h5"), "not a readable HDF5 artifact")
    assert_one_line_error(run("verify", tmp_path / "absent.h5"), "absent.h5: no such file")
