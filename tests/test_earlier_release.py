"""Artifacts written by the release before the method registry (apecli 0.1.0, format 1.0) stay usable:
listed and verified as before, their evaluations read, re-evaluated, predicted with, transferred and
reported class by class with the results apecli 0.1.0 gave (tests/fixtures/release-0.1.0)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from apecli import store
from apecli.cli import app
from apecli.evaluate import evaluate_artifact
from apecli.kinds.evaluation import EvaluationRecord
from apecli.methods.grid import SearchGrid

FIXTURE = Path(__file__).parent / "fixtures" / "release-0.1.0"
EXPECTED = FIXTURE / "expected"
GRID = SearchGrid((7.0, 7.0, 1.0), (8, 5, 4))  # make.sh's --search-scale and --search-step
runner = CliRunner()


@pytest.fixture(scope="module")
def copied(tmp_path_factory) -> Path:
    """The fixture's store, copied where commands may write beside it."""
    folder = tmp_path_factory.mktemp("earlier") / "store"
    shutil.copytree(FIXTURE / "store", folder)
    return folder


def expected(name: str) -> dict:
    return json.loads((EXPECTED / name).read_text())


def by_name(folder: Path, name: str) -> store.Artifact:
    return store.open_artifact(next(folder.rglob(name)))


EVALUATIONS = sorted(path.name for path in EXPECTED.glob("*eval-*.json"))


def test_the_store_lists_and_verifies_as_it_did(copied):
    listed = json.loads(runner.invoke(app, ["ls", str(copied), "--json"]).stdout)
    before = {Path(row["artifact"]).name: row for row in expected("ls.json")}
    assert {Path(row["artifact"]).name for row in listed} == set(before) == {path.name for path in copied.rglob("*.h5")}
    for row in listed:
        old = before[Path(row["artifact"]).name]
        assert (row["kind"], row["dataset"], row["summary"], row["stale"]) == (old["kind"], old["dataset"],
                                                                              old["summary"], None)
    verified = runner.invoke(app, ["verify", str(copied), "--json"])
    assert verified.exit_code == 0, verified.stderr
    assert json.loads(verified.stdout)["failed"] == 0


@pytest.mark.parametrize("name", EVALUATIONS)
def test_each_evaluation_reads_as_it_was_written(copied, name):
    old = expected(name)
    record = EvaluationRecord.read(by_name(copied, old["artifact"]))
    assert dict(record.summary) == {key: value for key, value in old.items() if key != "artifact"}
    named = {key: old[key] for key in ("alpha", "beta", "gamma", "lambda") if old.get(key) is not None}
    assert record.hyperparameters == named  # upgraded: the hyperparameters by name


@pytest.mark.parametrize("name", EVALUATIONS)
def test_each_evaluation_is_evaluated_again_as_before(copied, name):
    """The artifact each evaluation was made from, evaluated again with the same settings: the same
    accuracies, choices and test predictions."""
    old = expected(name)
    evaluation = by_name(copied, old["artifact"])
    source = store.open_artifact(evaluation.path.parent / evaluation.parents[0].path)
    grid = None if old["mode"] in ("zero-shot", "gda") else GRID.fixing(**old.get("given", {}))
    again = evaluate_artifact(source, old["mode"], grid=grid, val_shots=old.get("val_shots"),
                              ks=tuple(old["k_tried"]) if "k_tried" in old else None).summary()
    assert grid_values(again.pop("hyperparameters")) == grid_values(EvaluationRecord.read(evaluation).hyperparameters)
    assert grid_values(again) == grid_values({key: value for key, value in old.items() if key != "artifact"})


def grid_values(summary: dict) -> dict:
    """Hyperparameters to 12 significant digits: 0.1.0 wrote the grid's float sums with their rounding
    noise (2.8600000000000003 for 2.86), this release the values the grid defines."""
    return {key: float(f"{value:.12g}") if key in ("alpha", "beta", "gamma", "lambda") and value is not None else value
            for key, value in summary.items()}


def test_the_imported_set_is_no_walkover():
    """Some of its evaluations miss: their predictions compared above say something."""
    accuracies = {expected(name)["test_accuracy"] for name in EVALUATIONS if name.startswith("npz-")}
    assert min(accuracies) < max(accuracies) < 100


@pytest.mark.parametrize("name", sorted(path.name for path in EXPECTED.glob("predict-*.json")))
def test_each_evaluation_predicts_as_before(copied, name):
    from apecli.predict import predict

    old = expected(name)
    predictions, skipped = predict(sorted((FIXTURE / "images").glob("*.jpg")), by_name(copied, old["artifact"]), top=3,
                                   device="cpu", workers=0)
    assert skipped == [] and len(predictions) == len(old["predictions"]) == 10
    for prediction, before in zip(predictions, old["predictions"]):
        assert Path(prediction.path).name == before["path"]
        assert list(prediction.labels) == [entry["label"] for entry in before["top"]]
        assert list(prediction.probabilities) == pytest.approx([entry["probability"] for entry in before["top"]],
                                                               rel=1e-9, abs=1e-12)


@pytest.mark.parametrize("name", sorted(path.name for path in EXPECTED.glob("*classes-*.json")))
def test_each_evaluation_reports_its_classes_as_before(copied, name):
    old = expected(name)
    result = runner.invoke(app, ["classes", str(by_name(copied, old["artifact"]).path), "--json"])
    assert result.exit_code == 0, result.stderr
    now = json.loads(result.stdout)
    for wrong in now["misclassified"]:  # the images' paths, as expected/ keeps them
        wrong["path"] = Path(wrong["path"]).name
    assert {key: value for key, value in now.items() if key != "artifact"} == \
        {key: value for key, value in old.items() if key != "artifact"}


def test_a_transfer_reads_and_is_made_again_as_before(copied):
    old = expected("transfer.json")
    features = next((copied / "caltech101").glob("features-*.h5"))
    evaluation = by_name(copied, expected("eval-training-free.json")["artifact"])
    result = runner.invoke(app, ["transfer", str(evaluation.path), "--to", str(features), "--store", str(copied),
                                 "--json"])
    assert result.exit_code == 0, result.stderr
    now = json.loads(result.stdout)
    for payload in (now, old):
        payload.pop("artifact")
        for target in payload["targets"]:
            target["artifact"] = Path(target["artifact"]).name
    assert now == old
    classes = runner.invoke(app, ["classes", old_transfer_path(copied), "--json"])
    assert classes.exit_code == 0, classes.stderr
    assert json.loads(classes.stdout)["chosen_on"] == "caltech101"


def old_transfer_path(folder: Path) -> str:
    return str(next(path for path in folder.rglob("transfer-*.h5")
                    if store.open_artifact(path).content_id.startswith("2a1fb1cb8fe2")))
