"""apecli bench: every cell once, results as CSV and JSON, the papers' table, and plots."""

from __future__ import annotations

import csv
import json
import re
from dataclasses import replace

import pytest
from typer.testing import CliRunner

from apecli import bench, store
from apecli.cli import app
from apecli.errors import ApecliError
from apecli.kinds.features import save_features
from apecli.synthetic import synthetic_features

from conftest import assert_one_line_error

runner = CliRunner()
MODES = ["zero-shot", "tip-adapter", "training-free", "gda"]


@pytest.fixture
def two_stores(tmp_path):
    for seed, name in ((1, "alpha"), (2, "beta")):
        features = synthetic_features(num_classes=5, dim=24, shots=(1, 4), val_per_class=6, test_per_class=6,
                                      seed=seed, dataset=name, views=2)
        save_features(features, store.in_store(tmp_path / "caches", name, "features"))
    test_only = replace(features, caches={}, splits={"test": features.splits["test"]}, dataset="shifted")
    save_features(test_only, store.in_store(tmp_path / "caches", "shifted", "features"))  # found, and left out
    return tmp_path / "caches"


def test_every_cell_once_then_skipped(two_stores, tmp_path, monkeypatch):
    artifacts = bench.find_features([two_stores])
    assert [a.metadata["dataset"] for a in artifacts] == ["alpha", "beta"]
    rows = bench.run_bench(artifacts, [1, 4], MODES, tmp_path / "out")
    assert len(rows) == 2 * 2 * 4
    with open(tmp_path / "out" / "results.csv") as handle:
        table = list(csv.DictReader(handle))
    assert len(table) == 16 and set(table[0]) >= {"dataset", "model", "shots", "mode", "val_accuracy", "test_accuracy",
                                                  "test_class_accuracy", "alpha", "beta", "gamma", "seconds"}
    assert all(0 <= float(row["test_class_accuracy"]) <= 100 for row in table)
    assert json.loads((tmp_path / "out" / "results.json").read_text()) == rows

    monkeypatch.setattr(bench, "scored", lambda *a: pytest.fail("a finished cell ran again"))
    seen = []
    again = bench.run_bench(artifacts, [1, 4], MODES, tmp_path / "out", lambda row, skipped: seen.append(skipped))
    assert again == rows and seen == [True] * 16


def test_the_average_row_and_the_plot(two_stores, tmp_path):
    rows = bench.run_bench(bench.find_features([two_stores]), [1, 4], ["zero-shot", "gda"], tmp_path / "out")
    table = bench.summary_table(rows, 4, ["zero-shot", "gda"])
    assert [line[0] for line in table] == ["alpha (synthetic)", "beta (synthetic)", "Average"]
    assert table[-1][2] == pytest.approx((table[0][2] + table[1][2]) / 2)
    picture, replaced = bench.plot(rows, ["zero-shot", "gda"], tmp_path / "out" / "plot.png")
    assert replaced is None  # no chart there before
    assert picture.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and picture.stat().st_size > 10_000


def test_feature_sets_of_one_dataset_are_averaged_not_overwritten(tmp_path):
    for seed in (1, 2, 3):  # the few-shot draws of three seeds: one dataset, one model
        features = synthetic_features(num_classes=5, dim=24, shots=(4,), val_per_class=6, test_per_class=6, seed=seed,
                                      dataset="alpha", views=2)
        save_features(features, store.in_store(tmp_path / "caches", "alpha", "features"))
    features = synthetic_features(num_classes=5, dim=24, shots=(4,), seed=9, dataset="beta", views=2)
    save_features(features, store.in_store(tmp_path / "caches", "beta", "features"))
    rows = bench.run_bench(bench.find_features([tmp_path / "caches"]), [4], ["zero-shot"], tmp_path / "out")
    alpha = [row["test_accuracy"] for row in rows if row["dataset"] == "alpha"]
    assert len(set(alpha)) > 1  # the seeds differ, so a mean differs from any one of them
    table = bench.summary_table(rows, 4, ["zero-shot"])
    assert table[0] == ["alpha (synthetic), mean of 3", pytest.approx(sum(alpha) / 3)]
    assert table[1][0] == "beta (synthetic)"
    assert table[2][1] == pytest.approx((sum(alpha) / 3 + table[1][1]) / 2)
    assert bench.means(rows, ["zero-shot"])["alpha (synthetic)", 4, "zero-shot"][1] == 3
    import statistics

    spread = bench.summary_table(rows, 4, ["zero-shot"], deviations=True)
    assert spread[0][1] == (pytest.approx(sum(alpha) / 3), pytest.approx(statistics.stdev(alpha)))
    assert spread[1][1] == (table[1][1], None) and spread[2][1] == (table[2][1], None)  # one set; the average

    from typer.testing import CliRunner

    from apecli.cli import app

    shown = CliRunner().invoke(app, ["bench", str(tmp_path / "caches"), "--shots", "4", "--modes", "zero-shot",
                                     "--out", str(tmp_path / "out")])
    assert shown.exit_code == 0, shown.stderr
    assert f"{sum(alpha) / 3:.2f} ± {statistics.stdev(alpha):.2f}" in shown.stdout

    import matplotlib.axes

    drawn = []
    original = matplotlib.axes.Axes.errorbar
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(matplotlib.axes.Axes, "errorbar",
                      lambda axis, x, y, **kw: drawn.append((list(x), kw["yerr"])) or original(axis, x, y, **kw))
        bench.plot(rows, ["zero-shot"], tmp_path / "plot.png")
    assert drawn == [([4], [pytest.approx(statistics.stdev(alpha))])]  # alpha's seeds: beta and the average have none


def test_refusals(two_stores, tmp_path):
    artifacts = bench.find_features([two_stores])
    with pytest.raises(ApecliError, match="unknown mode 'magic'"):
        bench.run_bench(artifacts, [1], ["magic"], tmp_path / "out")
    with pytest.raises(ApecliError, match=r"has no 16-shot cache \(it holds 1, 4 shots\)"):
        bench.run_bench(artifacts, [16], ["zero-shot"], tmp_path / "out")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ApecliError, match="no features artifact"):
        bench.find_features([tmp_path / "empty"])
    with pytest.raises(ApecliError, match="absent: no such file or folder"):
        bench.find_features([tmp_path / "absent"])
    test_set = bench.find_features(sorted((two_stores / "shifted").glob("*.h5")))  # named, it is not left out
    with pytest.raises(ApecliError, match="holds no few-shot cache \\(a test set only: score an evaluated model on it with"):
        bench.run_bench(test_set, [1], ["zero-shot"], tmp_path / "out")
    assert not (tmp_path / "out").exists()
    (tmp_path / "out").write_text("notes")
    with pytest.raises(ApecliError, match="out: is a file; the results go to a folder"):
        bench.run_bench(artifacts, [1], ["zero-shot"], tmp_path / "out")
    assert (tmp_path / "out").read_text() == "notes"


def test_bench_on_the_command_line(two_stores, tmp_path):
    result = runner.invoke(app, ["bench", "--store", str(two_stores), "--shots", "1,4", "--modes",
                                 "zero-shot,training-free,training-required", "--out", str(tmp_path / "out"), "--json"])
    assert result.exit_code == 0, result.stderr
    payload = json.loads(result.stdout)
    assert len(payload["rows"]) == 12 and payload["artifact"].endswith("results.json")
    assert "Average" in result.stderr and "APE-T" in result.stderr
    assert re.search(r"test accuracy \(%\), 1 shot(?!s)", result.stderr) and "test accuracy (%), 4 shots" in result.stderr
    assert (tmp_path / "out" / "accuracy-vs-shots.png").is_file()
    only_beta = runner.invoke(app, ["bench", str(two_stores / "beta"), "--shots", "4", "--modes", "zero-shot",
                                    "--out", str(tmp_path / "out")])
    assert only_beta.exit_code == 0, only_beta.stderr
    assert "beta (synthetic)" in only_beta.stdout and "alpha" not in only_beta.stdout  # this run's cells, not all
    assert_one_line_error(runner.invoke(app, ["bench", "--store", str(two_stores), "--modes", "magic",
                                              "--out", str(tmp_path / "o2")]), "unknown mode 'magic'")


def test_a_proker_cell_of_its_earlier_regression_is_computed_again_and_replaced(two_stores, tmp_path):
    from apecli.methods.proker import PROKER_FORMULA

    artifacts = bench.find_features([two_stores])[:1]
    rows = bench.run_bench(artifacts, [4], ["zero-shot", "proker"], tmp_path / "out")
    assert [row.get("formula") for row in rows] == [None, PROKER_FORMULA]
    earlier = [dict(rows[0]), {key: value for key, value in rows[1].items() if key != "formula"}]
    earlier[1]["test_accuracy"] = -1.0  # what the earlier regression reported, in a results file it wrote
    bench.write_results(tmp_path / "out", earlier)
    ran = []
    again = bench.run_bench(artifacts, [4], ["zero-shot", "proker"], tmp_path / "out", lambda row, skipped: ran.append(skipped))
    assert ran == [True, False]  # zero-shot kept, ProKeR computed again
    assert [(row["mode"], row["test_accuracy"]) for row in again] == [("zero-shot", rows[0]["test_accuracy"]),
                                                                      ("proker", rows[1]["test_accuracy"])]
    assert json.loads((tmp_path / "out" / "results.json").read_text()) == again


def test_without_shots_bench_takes_those_every_feature_set_holds(two_stores, tmp_path):
    extra = synthetic_features(num_classes=5, dim=24, shots=(2, 4), seed=7, dataset="gamma")
    save_features(extra, store.in_store(two_stores, "gamma", "features"))
    artifacts = bench.find_features([two_stores])
    assert bench.common_shots(artifacts) == (4,)  # alpha and beta hold 1 and 4, gamma 2 and 4
    result = runner.invoke(app, ["bench", "--store", str(two_stores), "--modes", "zero-shot", "--out", str(tmp_path / "out"),
                                 "--json"])
    assert result.exit_code == 0, result.stderr
    assert {row["shots"] for row in json.loads(result.stdout)["rows"]} == {4}
    said = result.stderr.split("\n")[0]  # said before the first cell runs
    assert said.startswith("bench: ") and "shots 4 (those every feature set holds" in said
    only_two = synthetic_features(num_classes=5, dim=24, shots=(2,), seed=8, dataset="delta")
    save_features(only_two, store.in_store(two_stores, "delta", "features"))
    assert_one_line_error(runner.invoke(app, ["bench", "--store", str(two_stores), "--out", str(tmp_path / "other")]),
                          "the feature sets hold no shot count in common: bench them in separate runs")


def test_ape_cells_that_choose_k_are_cells_of_their_own(two_stores, tmp_path):
    from apecli.evaluate import evaluate_artifact

    artifacts = bench.find_features([two_stores])[:1]
    plain = bench.run_bench(artifacts, [4], ["zero-shot", "training-free"], tmp_path / "out")
    assert plain[1]["k_tried"] is None and plain[1]["k"] >= 1
    ran = []
    rows = bench.run_bench(artifacts, [4], ["zero-shot", "training-free"], tmp_path / "out",
                           lambda row, skipped: ran.append((row["mode"], skipped)), ks=(16, 4, 8, 4))
    assert ran == [("zero-shot", True), ("training-free", False)]  # zero-shot has no k: its cell is shared
    assert len(rows) == 3 and rows[:2] == plain  # the dataset's k is kept beside the choice
    chosen = rows[2]
    expected = evaluate_artifact(artifacts[0], "training-free", 4, ks=(4, 8, 16))
    assert (chosen["k_tried"], chosen["k"]) == ("4,8,16", expected.channels.shape[0])
    assert chosen["test_accuracy"] == expected.test_accuracy
    again = bench.run_bench(artifacts, [4], ["training-free"], tmp_path / "out",
                            lambda row, skipped: ran.append(skipped), ks=(8, 16, 4))
    assert again == rows and ran[-1] is True
    with pytest.raises(ApecliError, match="has 24 channels, fewer than k = 32"):
        bench.run_bench(artifacts, [4], ["training-free"], tmp_path / "other", ks=(8, 32))
    assert not (tmp_path / "other").exists()

    result = runner.invoke(app, ["bench", str(artifacts[0].path), "--shots", "4", "--modes", "zero-shot,training-free",
                                 "--k", "8,4,16", "--out", str(tmp_path / "out")])
    assert result.exit_code == 0, result.stderr
    assert "test accuracy (%), 4 shots, APE's k chosen among 4,8,16" in result.stdout
    line = next(line for line in result.stdout.splitlines() if line.startswith("│ alpha"))
    assert plain[1]["test_accuracy"] != chosen["test_accuracy"]  # the table shows the choice, not the dataset's k
    assert f"{chosen['test_accuracy']:.2f}" in line and f"{plain[1]['test_accuracy']:.2f}" not in line
    with open(tmp_path / "out" / "results.csv") as handle:
        assert [row["k_tried"] for row in csv.DictReader(handle)] == ["", "", "4,8,16"]


def test_bench_says_what_it_will_run_before_it_starts_and_names_a_replaced_chart(two_stores, tmp_path):
    out = tmp_path / "out"
    first = runner.invoke(app, ["bench", "--store", str(two_stores), "--shots", "1,4", "--modes", "zero-shot,gda",
                                "--out", str(out)])
    assert first.exit_code == 0, first.stderr
    lines = first.stderr.splitlines()
    assert lines[0] == "bench: 2 feature sets (alpha (synthetic), beta (synthetic)) × shots 1,4 × modes zero-shot,gda"
    assert "note:" not in first.stderr  # no chart was there
    assert first.stdout.count("test accuracy (%)") == 2 and "results:" not in first.stdout
    shows = bench.chart_shows(out / "accuracy-vs-shots.png")
    assert shows == "apecli bench: alpha (synthetic); beta (synthetic) | shots 1,4 | modes zero-shot,gda"

    same = runner.invoke(app, ["bench", "--store", str(two_stores), "--shots", "1,4", "--modes", "zero-shot,gda",
                               "--out", str(out)])
    assert same.exit_code == 0 and "note:" not in same.stderr  # the same cells drawn again: nothing to say
    narrower = runner.invoke(app, ["bench", str(two_stores / "beta"), "--shots", "1", "--modes", "zero-shot,gda",
                                   "--out", str(out)])
    assert narrower.exit_code == 0, narrower.stderr
    assert (f"note: {out / 'accuracy-vs-shots.png'} showed other cells ({shows}); it now shows this run's"
            in narrower.stderr)
    assert bench.chart_shows(out / "accuracy-vs-shots.png") == "apecli bench: beta (synthetic) | shots 1 | modes zero-shot,gda"


def test_a_chart_that_says_nothing_or_is_no_png_is_handled(tmp_path):
    rows = [{"dataset": "d", "model": None, "shots": 1, "mode": "zero-shot", "test_accuracy": 50.0}]
    (tmp_path / "plot.png").write_bytes(b"not a png at all")
    assert bench.chart_shows(tmp_path / "plot.png") is None
    assert bench.plot(rows, ["zero-shot"], tmp_path / "plot.png")[1] is None  # a stray file: nothing it showed
    from PIL import Image

    Image.new("RGB", (4, 4)).save(tmp_path / "plain.png")  # a chart of an earlier release: no description
    assert bench.chart_shows(tmp_path / "plain.png") == ""
    assert bench.plot(rows, ["zero-shot"], tmp_path / "plain.png")[1] == ""


def test_coincident_points_of_two_modes_stay_visible(tmp_path):
    rows = [{"dataset": "d", "model": None, "shots": 1, "mode": mode, "test_accuracy": 60.0, "content_id": "c"}
            for mode in ("zero-shot", "gda")]  # GDA at one shot without views: zero-shot's accuracy
    import matplotlib.axes

    drawn = []
    original = matplotlib.axes.Axes.plot
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(matplotlib.axes.Axes, "plot",
                      lambda axis, x, y, **kw: drawn.append((tuple(x), tuple(y), kw["marker"])) or original(axis, x, y, **kw))
        bench.plot(rows, ["zero-shot", "gda"], tmp_path / "plot.png")
    (x1, y1, m1), (x2, y2, m2) = drawn[:2]  # the average panel's two lines
    assert y1 == y2 and x1 != x2 and m1 != m2  # side by side, each with its own marker
    assert x1[0] < 1 < x2[0] and x2[0] / 1 == pytest.approx(1 / x1[0])  # centred on one shot
    assert abs(x2[0] - x1[0]) < 0.1  # still read as one shot


def test_sets_of_an_unknown_model_are_named_by_their_dataset_alone():
    assert bench._panel({"dataset": "caltech101", "model": None}) == "caltech101"
    assert bench._panel({"dataset": "caltech101", "model": "unknown"}) == "caltech101"  # rows of earlier releases
    assert bench._panel({"dataset": "caltech101", "model": "ViT-B-32"}) == "caltech101 (ViT-B-32)"
