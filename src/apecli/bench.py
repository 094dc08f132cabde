"""The benchmark runner: every mode × shot count × feature set, into one table of results.

Each finished cell is written at once to ``results.json`` and ``results.csv`` in the output folder;
running again skips the cells already there (a cell is a feature set's content id, a shot count, a
mode, the validation images it chose on and, for APE, the k it chose among), so an interrupted
benchmark resumes. ``accuracy-vs-shots.png`` draws test accuracy against
shots, one line per mode, one panel per dataset and one for their average.
"""

from __future__ import annotations

import csv
import io
import json
import re
import statistics
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

from apecli import store
from apecli.devices import resolve
from apecli.errors import ApecliError, InputError, Setting
from apecli.evaluate import scored
from apecli.files import replacing
from apecli.interop import clip_benchmark_result
from apecli.kinds.evaluation import Evaluation
from apecli.kinds.features import KIND as FEATURES
from apecli.kinds.features import TEST_SET_HINT, FeaturesHeader, load_features
from apecli.methods import registry
from apecli.methods.base import Options

COLUMNS = ("dataset", "model", "shots", "mode", "val_shots", "val_accuracy", "test_accuracy", "test_class_accuracy",
           "zero_shot_accuracy", "alpha", "beta", "gamma", "lambda", "k", "k_tried", "best_epoch", "seconds", "device",
           "chosen", "features", "content_id")
CellProgress = Callable[[dict[str, Any], bool], None]  # the row, and whether it was already done


def find_features(paths: Iterable[Path]) -> list[store.Artifact]:
    """The features artifacts among ``paths`` (files, or folders searched recursively, where feature sets
    without a few-shot cache, test sets only, are left out)."""
    found: dict[str, store.Artifact] = {}
    for path in paths:
        path = Path(path)
        if not path.exists():
            raise InputError(path, "no such file or folder")
        if path.is_dir():
            for _, opened in store.scan(path):
                if isinstance(opened, store.Artifact) and opened.kind == FEATURES and FeaturesHeader.of(opened).shots:
                    found.setdefault(opened.content_id, opened)  # (a test set only, ImageNet-V2, …: nothing to adapt on)
        else:
            artifact = store.open_artifact(path, [FEATURES])
            found.setdefault(artifact.content_id, artifact)
    if not found:
        raise ApecliError(f"no features artifact in {', '.join(str(p) for p in paths)}")
    return sorted(found.values(), key=lambda a: (FeaturesHeader.of(a).dataset or "", str(a.path)))


def common_shots(artifacts: Sequence[store.Artifact]) -> tuple[int, ...]:
    """The shot counts that every one of the feature sets holds."""
    held = [set(FeaturesHeader.of(artifact).shots) for artifact in artifacts]
    common = set.intersection(*held) if held else set()
    if not common:
        raise ApecliError(f"the feature sets hold no shot count in common: bench them in separate runs, or give "
                          f"{Setting('shots')}", Setting("shots"))
    return tuple(sorted(common))


CELL = {"content_id": str, "shots": int, "mode": str, "test_accuracy": (int, float)}  # what every row holds


def read_results(out: Path) -> list[dict[str, Any]]:
    """The rows an earlier run wrote to ``out``, checked to be what bench writes."""
    path = Path(out) / "results.json"
    if not path.is_file():
        return []
    try:
        rows = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError):
        raise InputError(path, "not valid JSON; move it away to start the benchmark afresh") from None
    if not isinstance(rows, list) or not all(isinstance(row, dict) and all(isinstance(row.get(key), kinds)
                                                                           for key, kinds in CELL.items())
                                             for row in rows):
        raise InputError(path, "not the results bench writes (a list of rows, each with its content_id, shots, mode "
                               "and test_accuracy); move it away to start the benchmark afresh")
    return rows


def _write_atomic(path: Path, text: str) -> None:
    with replacing(path) as temporary:
        temporary.write_text(text)


def write_results(out: Path, rows: Sequence[dict[str, Any]], computed: dict[str, Any] | None = None) -> None:
    """The rows as results.json and results.csv, and each cell in CLIP_benchmark's form: ``computed``'s file
    (a cell just computed, perhaps replacing an outdated one) and any other that is missing."""
    Path(out).mkdir(parents=True, exist_ok=True)
    _write_atomic(Path(out) / "results.json", json.dumps(list(rows), indent=1))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=COLUMNS, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    _write_atomic(Path(out) / "results.csv", buffer.getvalue())
    for row in rows:  # each cell in CLIP_benchmark's form too, for that tool's users to aggregate
        if isinstance(row.get("clip_benchmark"), dict):
            path = Path(out) / CLIP_BENCHMARK_FOLDER / cell_file(row)
            if row is computed or not path.is_file():
                path.parent.mkdir(exist_ok=True)
                _write_atomic(path, json.dumps(row["clip_benchmark"], indent=1))


CLIP_BENCHMARK_FOLDER = "clip-benchmark"


def cell_file(row: dict[str, Any]) -> str:
    """The name of a cell's CLIP_benchmark result: its dataset, mode, shots and validation images, and its
    feature set's content id, in letters a file name may hold (the names come from files, never paths)."""
    def plain(text: Any) -> str:
        return re.sub(r"[^A-Za-z0-9.+=-]", "_", str(text)).strip(".") or "_"

    parts = [plain(row.get("dataset")), plain(row["mode"]), f"{int(row['shots'])}shot"]
    if row.get("val_shots"):
        parts.append(f"val{int(row['val_shots'])}")
    if row.get("k_tried"):
        parts.append("k" + plain(row["k_tried"]))
    return "_".join(parts + [plain(row["content_id"])[:16]]) + ".json"


def _row(artifact: store.Artifact, shots: int, mode: str, evaluation: Evaluation, seconds: float) -> dict[str, Any]:
    summary = evaluation.summary()
    header = FeaturesHeader.of(artifact)
    return {
        "dataset": header.dataset or artifact.path.parent.name,
        "model": header.encoder.name or header.encoder.model,  # None where the set does not say (an import)
        "shots": shots,
        "mode": mode,
        "val_shots": summary.get("val_shots"),  # validation images per class it chose on (None: the whole split)
        **{key: summary.get(key) for key in ("val_accuracy", "test_accuracy", "test_class_accuracy", "zero_shot_accuracy",
                                             "alpha", "beta", "gamma", "lambda", "k", "best_epoch")},
        "k_tried": k_choice(summary.get("k_tried")),  # the k APE chose among on validation (None: the dataset's k)
        **({"formula": summary["formula"]} if "formula" in summary else {}),
        **({"chosen": summary["chosen"], "candidates": summary["candidates"]} if "chosen" in summary else {}),  # auto
        **({"notes": list(evaluation.notes)} if evaluation.notes else {}),
        "seconds": round(seconds, 3),
        "device": summary.get("device", "cpu"),  # where the cell's search (and training) ran
        "features": str(artifact.path),
        "content_id": artifact.content_id,
    }


def run_bench(
    artifacts: Sequence[store.Artifact],
    shots: Sequence[int],
    modes: Sequence[str],
    out: Path,
    progress: CellProgress | None = None,
    device: str | None = None,
    val_shots: int | None = None,
    ks: Sequence[int] | None = None,
    starting: Callable[[], None] | None = None,
) -> list[dict[str, Any]]:
    """Evaluate every cell not yet in ``out``'s results, searching and training on ``device`` (the CPU by
    default), choosing on ``val_shots`` validation images per class (None: the whole split), and the k of
    the methods that choose one among ``ks`` (None: the dataset's k); return all results. ``starting`` is
    called once everything asked has been checked, before the first cell."""
    methods = [registry.get(mode) for mode in modes]
    on = resolve(device, any(method.float64 for method in methods))
    ks = tuple(sorted(set(ks))) if ks else None  # in increasing order: of equally good k, the smaller wins
    for artifact in artifacts:
        header = FeaturesHeader.of(artifact)
        if not header.shots:
            raise InputError(artifact.path, f"holds no few-shot cache{TEST_SET_HINT}")
        missing = sorted(set(shots) - set(header.shots))
        if missing:
            raise InputError(artifact.path, f"has no {missing[0]}-shot cache (it holds "
                                            f"{', '.join(map(str, header.shots))} shots)")
        if ks and any(method.chooses_k for method in methods) and header.dim and max(ks) > header.dim:
            raise InputError(artifact.path, f"has {header.dim} channels, fewer than k = {max(ks)}")
    if Path(out).exists() and not Path(out).is_dir():
        raise InputError(out, "is a file; the results go to a folder")
    rows = read_results(out)
    done = {_cell(row): row for row in rows if _current(row)}
    if starting is not None:
        starting()
    for artifact in artifacts:
        features = None
        for count in shots:
            for method in methods:
                chosen_k = ks if method.chooses_k else None
                cell = (artifact.content_id, count, method.name, val_shots, k_choice(chosen_k))
                if cell in done:
                    if progress is not None:
                        progress(done[cell], True)
                    continue
                start = time.perf_counter()
                if features is None:
                    features = load_features(artifact)
                evaluation = scored(method.create(Options(ks=chosen_k)), features, count, val_shots, on)
                row = _row(artifact, count, method.name, evaluation, time.perf_counter() - start)
                row["clip_benchmark"] = clip_benchmark_result(evaluation.summary(), features)
                rows = [kept for kept in rows if _cell(kept) != _cell(row)] + [row]  # replaces an outdated cell
                write_results(out, rows, row)
                if progress is not None:
                    progress(row, False)
    table, results = Path(out) / "results.csv", Path(out) / "results.json"
    if results.is_file() and (not table.is_file() or table.stat().st_mtime < results.stat().st_mtime):
        write_results(out, rows)  # the table lost since, or left behind by a full disk: written again
    return rows


def _cell(row: dict[str, Any]) -> tuple[str, int, str, int | None, str | None]:
    return row["content_id"], row["shots"], row["mode"], row.get("val_shots"), row.get("k_tried")


def k_choice(ks: Sequence[int] | None) -> str | None:
    """The k values APE chose among, as a cell records them ("128,256,384"; None: the dataset's k)."""
    return ",".join(str(k) for k in sorted(set(ks))) if ks else None


def _current(row: dict[str, Any]) -> bool:
    """Whether a stored cell was computed as this apecli computes its mode (a method says which of its
    results are outdated; a cell of a method not installed now is kept as it is)."""
    method = registry.methods().get(row["mode"])
    return method is None or method.outdated(row) is None


def _panel(row: dict[str, Any]) -> str:
    """A dataset under one model, as tables and plots name it: "caltech101 (ViT-B-32)", or the dataset
    alone where the model is not known (rows of earlier releases say "unknown")."""
    model = row.get("model")
    return f"{row['dataset']} ({model})" if model and model != "unknown" else str(row["dataset"])


def set_name(artifact: store.Artifact) -> str:
    """A feature set's name as bench's tables will show it."""
    header = FeaturesHeader.of(artifact)
    return _panel({"dataset": header.dataset or artifact.path.parent.name,
                   "model": header.encoder.name or header.encoder.model})


def means(rows: Sequence[dict[str, Any]], modes: Sequence[str]) -> dict[tuple[str, int, str], tuple[float, int, float | None]]:
    """The mean test accuracy of each (dataset and model, shots, mode) over its feature sets, their
    number, and the sample standard deviation (n − 1; None for one set): several feature sets of one
    dataset and model are the few-shot draws of several seeds, which the protocol averages."""
    groups: dict[tuple[str, int, str], list[float]] = {}
    for row in rows:
        if row["mode"] in modes:
            groups.setdefault((_panel(row), row["shots"], row["mode"]), []).append(row["test_accuracy"])
    return {key: (sum(values) / len(values), len(values), statistics.stdev(values) if len(values) > 1 else None)
            for key, values in groups.items()}


def _average(values: Sequence[float | None]) -> float | None:
    """The mean over datasets, or None unless every dataset has a value."""
    return sum(values) / len(values) if values and None not in values else None  # type: ignore[arg-type]


def summary_table(rows: Sequence[dict[str, Any]], shots: int, modes: Sequence[str],
                  deviations: bool = False) -> list[list[Any]]:
    """Rows of [dataset, test accuracy per mode …] for one shot count (a dataset's feature sets
    averaged, and counted in its name), then the average over datasets. With ``deviations`` each
    accuracy is a pair (mean, standard deviation over the feature sets, or None), and the average's
    deviation is None."""
    cells = means(rows, modes)
    lines = []
    for panel in sorted({panel for panel, count, _ in cells if count == shots}):
        sets = max(cells[panel, shots, mode][1] for mode in modes if (panel, shots, mode) in cells)
        lines.append((panel if sets == 1 else f"{panel}, mean of {sets}", [cells.get((panel, shots, mode)) for mode in modes]))
    averages = [_average([found[index][0] if found[index] else None for _, found in lines]) for index in range(len(modes))]

    def shown(cell: tuple[float, int, float | None] | None) -> Any:
        return None if cell is None else (cell[0], cell[2]) if deviations else cell[0]

    table = [[name, *map(shown, found)] for name, found in lines]
    return table + [["Average", *((value, None) if deviations and value is not None else value for value in averages)]]


MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")
DODGE = 0.035  # log2 units between the lines at one shot count: coincident points stay side by side
DESCRIPTION = "Description"  # the PNG text key that says which cells a chart shows


def dodged(shots: Sequence[int], line: int, lines: int) -> list[float]:
    """Where the ``line``-th of ``lines`` lines draws its points at ``shots``: shifted sideways by a few
    per cent of a doubling each, centred on the true count, so that equal accuracies of two modes
    (zero-shot and GDA at one shot) show as two markers side by side, not one over the other."""
    return [count * 2 ** (DODGE * (line - (lines - 1) / 2)) for count in shots]


def chart_description(cells: dict[tuple[str, int, str], Any], modes: Sequence[str]) -> str:
    """What a chart of the :func:`means` ``cells`` shows, as its PNG metadata records it: sets, shot
    counts and modes."""
    panels = sorted({panel for panel, _, _ in cells})
    counts = sorted({count for _, count, _ in cells})
    shown = [mode for mode in modes if any(mode == cell_mode for _, _, cell_mode in cells)]
    return (f"apecli bench: {'; '.join(panels)} | shots {','.join(map(str, counts))} | "
            f"modes {','.join(shown)}")


def chart_shows(path: Path) -> str | None:
    """What an existing chart says it shows (its PNG description, at most 300 characters), "" for a PNG
    that does not say, or None where there is no chart (or a file that is not a PNG)."""
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    if not path.is_file():
        return None
    try:
        with Image.open(path) as image:  # the header and text chunks only: no pixels decoded
            if image.format != "PNG":
                return None
            said = image.info.get(DESCRIPTION, "")
    except (OSError, UnidentifiedImageError, ValueError):
        return None
    return " ".join(str(said).split())[:300]


def plot(rows: Sequence[dict[str, Any]], modes: Sequence[str], path: Path) -> tuple[Path, str | None]:
    """Test accuracy against shots: a panel per dataset and one for the average, a line per mode, each
    with its own marker and dodged sideways so that coincident points stay visible. Returns the chart's
    path and, where it replaced a chart of other cells, what that one showed ("" when it did not say)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells = means(rows, modes)
    datasets = sorted({panel for panel, _, _ in cells})
    panels = ["Average"] + datasets
    shot_counts = sorted({count for _, count, _ in cells})
    columns = min(4, len(panels))
    lines = (len(panels) + columns - 1) // columns
    figure, axes = plt.subplots(lines, columns, figsize=(4 * columns, 3.2 * lines), squeeze=False)
    for axis, panel in zip(axes.flat, panels):
        for index, mode in enumerate(modes):
            if panel == "Average":
                points = {count: _average([cells[p, count, mode][0] if (p, count, mode) in cells else None
                                           for p in datasets]) for count in shot_counts}
            else:
                points = {count: cells[panel, count, mode][0] for count in shot_counts if (panel, count, mode) in cells}
            xs = [count for count in shot_counts if points.get(count) is not None]
            if xs:
                at = dict(zip(xs, dodged(xs, index, len(modes))))
                line, = axis.plot([at[x] for x in xs], [points[x] for x in xs], marker=MARKERS[index % len(MARKERS)],
                                  markersize=6, markerfacecolor="none", label=registry.label(mode))
                spread = [(x, cells[panel, x, mode][2]) for x in xs if panel != "Average" and cells[panel, x, mode][2]]
                if spread:  # the seeds' standard deviation, where a dataset has several feature sets
                    axis.errorbar([at[x] for x, _ in spread], [points[x] for x, _ in spread],
                                  yerr=[d for _, d in spread], fmt="none", ecolor=line.get_color(), capsize=3)
        axis.set_title(panel, fontsize=10)
        axis.set_xscale("log", base=2)
        axis.set_xticks(shot_counts, [str(count) for count in shot_counts])
        axis.set_xlabel("shots per class")
        axis.set_ylabel("test accuracy (%)")
        axis.grid(alpha=0.3)
    for axis in list(axes.flat)[len(panels):]:
        axis.set_visible(False)
    axes.flat[0].legend(fontsize=8)
    figure.tight_layout()
    path = Path(path)
    description = chart_description(cells, modes)
    before = chart_shows(path)
    try:
        with replacing(path) as temporary:
            figure.savefig(temporary, dpi=110, format="png", metadata={DESCRIPTION: description})
    finally:
        plt.close(figure)
    return path, (before if before is not None and before != description else None)
