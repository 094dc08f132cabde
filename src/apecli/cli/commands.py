"""The ``apecli`` command line: each command parses, calls the library, and reports."""

from __future__ import annotations

import json
import sys
import warnings
from dataclasses import replace
from pathlib import Path
from typing import Annotated, Optional

import typer
import typer.core
from rich.table import Table

from apecli import kinds, store
from apecli.cli import progress
from apecli.cli.errors import in_flags
from apecli.cli.io import console, emit, outline, piped_input, reports_errors, resolve_input, say
from apecli.cli.io import report as report_lines
from apecli.cli.options import (
    DEFAULT_STORE,
    ClassNames,
    ComputeDevice,
    Dataset,
    DrawnShots,
    DrawSeed,
    Input,
    Json,
    JsonReport,
    Model,
    Normalise,
    Shots,
    Store,
    StoreFolder,
    TextModel,
    TextPretrained,
    TextPrompts,
    TextRoot,
    TrustTorchScript,
    ValShots,
)
from apecli.errors import ApecliError, ChoiceError
from apecli.kinds.evaluation import SYMBOLS
from apecli.methods import registry
from apecli.methods.zero_shot import ZeroShot
from apecli.version import __version__


def _flag_type(option: "typer.core.TyperOption", ctx: "typer.Context") -> str | None:
    """What the help shows after an option's name: nothing for a flag (``--json``, not ``--json <bool>``,
    which reads as if it took a value), the value's type otherwise."""
    return None if option.is_flag else _value_type(option, ctx)


_value_type = typer.core.TyperOption.display_type_rich
typer.core.TyperOption.display_type_rich = _flag_type

app = typer.Typer(
    name="apecli",
    help="Few-shot CLIP classification with APE, from HDF5 feature caches.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
import_app = typer.Typer(help="Bring features computed elsewhere into the store.", no_args_is_help=True)
app.add_typer(import_app, name="import")


def _version(value: bool) -> None:
    if value:
        typer.echo(f"apecli {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    """Few-shot CLIP classification with APE, from HDF5 feature caches."""
    warnings.showwarning = _one_line_warning


def _one_line_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """A warning (a plugin method left out, say) as one line on stderr, in the command line's words."""
    typer.echo(f"apecli: warning: {in_flags(str(message))}", err=True)


def _dataset_note(dataset: str | None) -> None:
    """One line where the settings a dataset's name selects are the generic ones."""
    from apecli.presets import unknown_dataset

    if dataset is None:
        say("note: no --dataset named, so the settings are the generic ones (--dataset NAME selects a known "
            "dataset's)")
    elif (note := unknown_dataset(dataset)) is not None:
        say(f"note: {note}")


def _save_imported(features, store_dir: Path, as_json: bool, texts=None) -> None:
    from apecli.kinds.features import mismatch_warnings, save_features

    if texts is not None:
        console.print(f"text classifier: {len(texts.class_names)} classes encoded by {texts.model_name}")
    saved = save_features(features, store.in_store(store_dir, features.dataset, "features"))
    _dataset_note(saved.dataset)  # once it is stored: a name the store refuses is that one error alone
    for note in saved.notes:
        say(f"note: {note}")
    for warning in mismatch_warnings(saved):
        console.print(f"[bold yellow]warning: {warning}[/bold yellow]")
    console.print(
        f"imported {saved.num_classes} classes × {saved.dim} channels, shots {list(saved.shots)}, "
        + ", ".join(f"{name} {part.labels.shape[0]}" for name, part in saved.splits.items())
    )
    emit(saved.artifact, {"dataset": saved.dataset, "num_classes": saved.num_classes, "dim": saved.dim,
                          "shots": list(saved.shots)}, as_json)


@import_app.command("tip-adapter")
@reports_errors
def import_tip_adapter(
    directory: Annotated[Path, typer.Argument(help="Folder with keys_{K}shots.pt, values_{K}shots.pt, val_f.pt, ...")],
    text_weights: Annotated[
        Optional[Path], typer.Option("--text-weights", help="D × C text classifier (default: text_weights_cupl_t.pt in the folder).")
    ] = None,
    class_names: ClassNames = None,
    dataset: Dataset = None,
    model: Model = None,
    shots: Annotated[
        Optional[str], typer.Option("--shots", help="Shot counts to import, comma-separated (default: every keys_{K}shots.pt).")
    ] = None,
    text_model: TextModel = None,
    pretrained: TextPretrained = "openai",
    root: TextRoot = None,
    prompts: TextPrompts = None,
    prompt_embeddings: Annotated[
        Optional[Path], typer.Option("--prompt-embeddings", help="C × P × D .pt: each class's prompt embeddings, "
                                                                  "kept for the methods that weigh prompts (timo, timo-s).")
    ] = None,
    normalise: Normalise = False,
    trust_torchscript: TrustTorchScript = False,
    store_dir: Store = Path(DEFAULT_STORE),
    as_json: Json = False,
) -> None:
    """Import an APE / Tip-Adapter cache folder (every shot count in it, or those of --shots)."""
    from apecli.importers import import_tip_adapter as read

    counts = _integers(shots, "--shots") if shots is not None else None
    _one_text_source(text_weights, text_model)
    texts = _class_texts(text_model, pretrained, dataset, root, class_names, prompts, trust_torchscript)
    features = read(directory, text_weights, dataset, class_names, model, counts, texts, normalise, prompt_embeddings)
    _save_imported(features, store_dir, as_json, texts)


@import_app.command("npz")
@reports_errors
def import_npz(
    file: Annotated[Path, typer.Argument(help="An .npz with text_weights (or --text-model), cache_keys, cache_labels, val_*, test_*.")],
    dataset: Dataset = None,
    model: Model = None,
    text_model: TextModel = None,
    pretrained: TextPretrained = "openai",
    root: TextRoot = None,
    class_names: ClassNames = None,
    prompts: TextPrompts = None,
    normalise: Normalise = False,
    trust_torchscript: TrustTorchScript = False,
    store_dir: Store = Path(DEFAULT_STORE),
    as_json: Json = False,
) -> None:
    """Import features from a plain .npz file."""
    from apecli.importers import import_npz as read

    texts = _class_texts(text_model, pretrained, dataset, root, class_names, prompts, trust_torchscript)
    _save_imported(read(file, dataset, model, texts, normalise), store_dir, as_json, texts)


@import_app.command("clip-benchmark")
@reports_errors
def import_clip_benchmark(
    directory: Annotated[Path, typer.Argument(help="A CLIP_benchmark linear-probe feature folder: features_{train,val,"
                                                   "test}.pt and targets_{train,val,test}.pt (val optional).")],
    text_weights: Annotated[
        Optional[Path], typer.Option("--text-weights", help="The D × C zero-shot head clip_benchmark's --save_clf wrote.")
    ] = None,
    shots: DrawnShots = "1,2,4,8,16",
    seed: DrawSeed = 1,
    dataset: Dataset = None,
    text_model: TextModel = None,
    pretrained: TextPretrained = "openai",
    root: TextRoot = None,
    class_names: ClassNames = None,
    prompts: TextPrompts = None,
    trust_torchscript: TrustTorchScript = False,
    store_dir: Store = Path(DEFAULT_STORE),
    as_json: Json = False,
) -> None:
    """Import a CLIP_benchmark feature folder: few-shot caches drawn from its train split, its val and test as they are."""
    from apecli.interop import import_clip_benchmark as read

    _one_text_source(text_weights, text_model)
    texts = _class_texts(text_model, pretrained, dataset, root, class_names, prompts, trust_torchscript)
    features = read(directory, text_weights, texts, _integers(shots, "--shots"), seed, dataset, class_names)
    _save_imported(features, store_dir, as_json, texts)


@import_app.command("clip-retrieval")
@reports_errors
def import_clip_retrieval(
    directory: Annotated[Path, typer.Argument(help="A clip-retrieval output folder: img_emb/img_emb_{i}.npy and "
                                                   "metadata/metadata_{i}.parquet.")],
    labels: Annotated[str, typer.Option("--labels", help="folder: each image's parent folder; else the metadata "
                                                         "column that holds the labels.")] = "folder",
    splits: Annotated[str, typer.Option("--splits", help="train/val/test fractions, drawn per class by --seed; or the "
                                                         "metadata column holding train, val or test.")] = "0.6/0.2/0.2",
    text_weights: Annotated[
        Optional[Path], typer.Option("--text-weights", help="D × C text classifier, the classes (labels) sorted.")
    ] = None,
    shots: DrawnShots = "1,2,4,8,16",
    seed: DrawSeed = 1,
    dataset: Dataset = None,
    text_model: TextModel = None,
    pretrained: TextPretrained = "openai",
    prompts: TextPrompts = None,
    trust_torchscript: TrustTorchScript = False,
    store_dir: Store = Path(DEFAULT_STORE),
    as_json: Json = False,
) -> None:
    """Import a clip-retrieval embedding folder, labelled by folder or column (parquet needs apecli[interop])."""
    from apecli.interop import import_clip_retrieval as read

    _one_text_source(text_weights, text_model)
    texts = None
    if text_model is not None:
        from apecli.encoder import EncoderSpec
        from apecli.importers import class_texts

        spec = EncoderSpec(text_model, pretrained, "cpu", trust_torchscript=trust_torchscript)
        texts = lambda names: class_texts(spec, dataset, prompts=prompts, names=names)  # noqa: E731
    features = read(directory, labels, splits, text_weights, texts, _integers(shots, "--shots"), seed, dataset)
    _save_imported(features, store_dir, as_json)


def _one_text_source(text_weights: Path | None, text_model: str | None) -> None:
    if text_model is not None and text_weights is not None:
        raise ApecliError("give --text-weights or --text-model, not both")


def _class_texts(text_model: str | None, pretrained: str, dataset: str | None, root: Path | None,
                 class_names: Path | None, prompts: Path | None, trust_torchscript: bool = False):
    """The text classifier that --text-model computes, or None without it."""
    if text_model is None:
        return None
    from apecli.encoder import EncoderSpec
    from apecli.importers import class_texts

    return class_texts(EncoderSpec(text_model, pretrained, "cpu", trust_torchscript=trust_torchscript), dataset, root,
                       class_names, prompts)


@app.command()
@reports_errors
def extract(
    dataset: Dataset = None,
    root: Annotated[Path, typer.Option("--root", envvar="APECLI_DATA", help="Folder holding the CoOp datasets.")] = Path("."),
    images: Annotated[Optional[Path], typer.Option("--images", help="Your own images: a folder per class, WebDataset shards (train/, val/, test/ *.tar and classes.txt), or a CSV of path,label[,split].")] = None,
    model: Annotated[str, typer.Option("--model", help="open_clip model name, the path of a model-config JSON, hf-hub:ORG/REPO or local-dir:PATH.")] = "RN50",
    pretrained: Annotated[str, typer.Option("--pretrained", help="open_clip pretrained tag, a local checkpoint path, or none (ignored for hf-hub: and local-dir: models).")] = "openai",
    shots: Annotated[Optional[str], typer.Option("--shots", help="Shot counts, comma-separated (default: 1,2,4,8,16; with "
                                                 "--images, those the smallest class can fill, and its count if under 16).",
                                                 show_default=False)] = None,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the few-shot sampling and augmentation.")] = 1,
    views: Annotated[int, typer.Option("--views", help="Augmented views per training image.")] = 10,
    prompts: Annotated[Optional[Path], typer.Option("--prompts", help="CuPL-style JSON: class name → sentences.")] = None,
    allow_missing_prompts: Annotated[bool, typer.Option("--allow-missing-prompts", help="Classes missing from --prompts use the templates alone.")] = False,
    skip_bad: Annotated[bool, typer.Option("--skip-bad", help="Record unreadable images in the store and go on.")] = False,
    device: Annotated[str, typer.Option("--device", help="auto, cpu, cuda, cuda:1, …")] = "auto",
    precision: Annotated[str, typer.Option("--precision", help="auto (fp16 on CUDA), fp32, fp16, bf16.")] = "auto",
    batch_size: Annotated[int, typer.Option("--batch-size", help="Images per encoder batch.")] = 64,
    workers: Annotated[Optional[int], typer.Option("--workers", help="PIL image decoding processes; also the threads that check the few-shot images decode (default: up to 16 for a GPU, else up to 4, never more than the cores).", show_default=False)] = None,
    decode: Annotated[str, typer.Option("--decode", help="pil (faithful) or gpu (JPEGs of val/test decoded on the GPU).")] = "pil",
    read_threads: Annotated[Optional[int], typer.Option("--read-threads", help="Threads reading the files with --decode gpu (default: up to 4, never more than the cores).", show_default=False)] = None,
    chunk_images: Annotated[int, typer.Option("--chunk-images", help="Images per saved chunk (the unit of resuming and of sharding across ranks).")] = 512,
    exif_orientation: Annotated[Optional[bool], typer.Option(
        "--exif-orientation/--no-exif-orientation", help="Turn photos upright by their EXIF orientation tag, as photo "
        "viewers show them (default: on with --images; off with --dataset, as APE's protocol reads the files).",
        show_default=False)] = None,
    trust_torchscript: TrustTorchScript = False,
    store_dir: Store = Path(DEFAULT_STORE),
    as_json: Json = False,
) -> None:
    """Encode images into a features artifact (APE's protocol): few-shot caches, val and test, text."""
    from apecli import datasets
    from apecli.distributed import join, leave
    from apecli.encoder import EncoderSpec
    from apecli.extract import PROTOCOL_SHOTS, ExtractSettings, default_read_threads, default_workers, fitting_shots
    from apecli.extract import extract as run_extract

    if dataset is None and images is None:
        raise ApecliError("give --dataset NAME (a CoOp benchmark under --root) or --images DIR|CSV")
    counts = _integers(shots, "--shots") if shots is not None else PROTOCOL_SHOTS
    upright = images is not None if exif_orientation is None else exif_orientation
    spec = EncoderSpec(model, pretrained, device, precision, trust_torchscript)
    on = spec.resolved_device()
    workers = default_workers(on) if workers is None else workers
    read_threads = default_read_threads() if read_threads is None else read_threads
    settings = ExtractSettings(counts, seed, views, batch_size, workers, chunk_images, skip_bad, decode, upright,
                               read_threads)
    if decode == "gpu" and not on.startswith("cuda"):
        raise ApecliError("--decode gpu needs a CUDA device (this run's device is cpu); use --decode pil")
    if images is not None:
        read = datasets.read_image_list if images.suffix.lower() == ".csv" else datasets.read_image_folder
        source = read(images, seed)
        source = replace(source, name=dataset) if dataset else source
        fitting = fitting_shots(source)
        if shots is None and fitting != counts:  # a handful of images per class
            settings = replace(settings, shots=fitting)
            console.print(f"shots {','.join(map(str, fitting))}: the smallest class has {max(fitting)} training "
                          f"image{'s' if max(fitting) > 1 else ''} (--shots sets others)")
    else:
        source = datasets.read_coop(dataset, root)
    sentences = datasets.read_prompts(prompts, source.class_names, allow_missing_prompts) if prompts else None
    ranks = join(on)
    if spec.random_weights and ranks.leader:
        console.print(f"[bold yellow]warning: {model} with RANDOM weights (--pretrained {pretrained}): "
                      "the features mean nothing[/bold yellow]")
    try:
        with progress.splits(enabled=ranks.leader) as report:
            features = run_extract(source, spec, store_dir, settings,
                                   sentences, report, say if ranks.leader else lambda message: None, ranks)
    finally:
        leave(ranks)
    if features is None:  # another rank: rank 0 reports
        return
    if images is not None and dataset:  # one's own images need no name; a name given may be a known one misspelt
        _dataset_note(dataset)
    skipped = list(features.skipped)
    console.print(f"{features.num_classes} classes × {features.dim} channels, shots {list(features.shots)}, "
                  + ", ".join(f"{n} {p.labels.shape[0]}" for n, p in features.splits.items())
                  + (f"; skipped {len(skipped)} unreadable images (listed in the artifact)" if skipped else ""))
    emit(features.artifact, {"dataset": features.dataset, "num_classes": features.num_classes, "dim": features.dim,
                             "shots": list(features.shots), "skipped": skipped}, as_json)


@app.command()
@reports_errors
def export(
    source: Input = None,
    out: Annotated[Path, typer.Option("--out", help="The .npz file to write.")] = Path("features.npz"),
    shots: Shots = None,
    store_dir: Store = Path(DEFAULT_STORE),
    as_json: Json = False,
) -> None:
    """Write a features artifact's arrays (one shot count) to a plain .npz."""
    from apecli.importers import export_npz
    from apecli.kinds.features import load_features

    features = load_features(resolve_input(source, store_dir, ["features"]))
    path = export_npz(features, out, shots)
    console.print(f"wrote {path}")
    emit(path, {"shots": shots or max(features.shots)}, as_json)


@app.command()
@reports_errors
def refine(
    source: Input = None,
    k: Annotated[Optional[int], typer.Option("--k", help="Channels to keep (default: the dataset's, scaled to D).")] = None,
    w: Annotated[
        Optional[tuple[float, float]], typer.Option("--w", help="Weights w0 (inter-class similarity) and w1 (text variance).")
    ] = None,
    shots: Shots = None,
    store_dir: Store = Path(DEFAULT_STORE),
    as_json: Json = False,
) -> None:
    """Select the channels that separate classes (APE's prior refinement)."""
    from apecli.kinds.features import load_features
    from apecli.kinds.refinement import save_refinement
    from apecli.refine import select_channels

    features = load_features(resolve_input(source, store_dir, ["features"]))
    refinement = select_channels(features, k, w, shots)
    stem = f"refine-{refinement.shots}shot-k{refinement.k}"
    refinement = save_refinement(refinement, features, store.in_store(store_dir, features.dataset, stem))
    console.print(
        f"kept {refinement.k} of {features.dim} channels from the {refinement.shots}-shot cache "
        f"(w = {refinement.weights[0]:g}, {refinement.weights[1]:g})"
    )
    emit(refinement.artifact, {"channels": refinement.sorted_channels, "k": refinement.k, "shots": refinement.shots,
                               "weights": list(refinement.weights)}, as_json)


def _taking(name: str) -> str:
    """The built-in methods that take a value of ``name`` given instead of searched, for help texts."""
    return ", ".join(method.label for method in registry.BUILT_IN if name in method.given)


def _choosing_k() -> str:
    return " and ".join(method.label for method in registry.BUILT_IN if method.chooses_k)


@app.command("eval")
@reports_errors
def evaluate(
    source: Input = None,
    mode: Annotated[
        Optional[str], typer.Option("--mode", help=f"{', '.join(registry.built_in_names())}, or a plugin's mode "
                                                   "(apecli methods lists them). Default: "
                                                   f"{registry.default_for('adapter').name} for a fitted adapter, else "
                                                   f"{registry.DEFAULT.name}.", show_default=False)
    ] = None,
    shots: Shots = None,
    search_scale: Annotated[
        Optional[tuple[float, float, float]], typer.Option("--search-scale", help="Upper ends of the β, α, γ grids.")
    ] = None,
    search_step: Annotated[
        Optional[tuple[int, int, int]], typer.Option("--search-step", help="Steps of the β, α, γ grids.")
    ] = None,
    alpha: Annotated[Optional[float], typer.Option("--alpha", help=f"Use this α instead of searching it "
                                                   f"({_taking('alpha')}).", show_default=False)] = None,
    beta: Annotated[Optional[float], typer.Option("--beta", help=f"Use this β instead of searching it "
                                                  f"({_taking('beta')}).", show_default=False)] = None,
    gamma: Annotated[Optional[float], typer.Option("--gamma", help=f"Use this γ instead of searching it "
                                                   f"({_taking('gamma')}).", show_default=False)] = None,
    val_shots: ValShots = None,
    k: Annotated[Optional[str], typer.Option("--k", help=f"{_choosing_k()} on a features artifact: the channels to "
                                             "keep, or several, comma-separated, to choose among on validation "
                                             "(default: the dataset's k, scaled to D).", show_default=False)] = None,
    candidates: Annotated[Optional[str], typer.Option(
        "--candidates", help="With --mode auto: the modes to choose among, comma-separated (default: every mode that "
                             "evaluates a features artifact).", show_default=False)] = None,
    device: ComputeDevice = "cpu",
    store_dir: Store = Path(DEFAULT_STORE),
    as_json: Json = False,
    result_format: Annotated[Optional[str], typer.Option(
        "--format", help="clip-benchmark: print the result as CLIP_benchmark's result JSON (dataset, model, "
                         "pretrained, task, metrics) instead of the artifact's path.", show_default=False)] = None,
) -> None:
    """Evaluate on test with hyperparameters searched on validation (or given); print the accuracies."""
    from apecli.evaluate import evaluate_artifact, save_evaluation
    from apecli.methods.grid import SearchGrid, dataset_grid

    if result_format not in (None, "clip-benchmark"):
        raise ChoiceError("format", result_format, f"unknown format '{result_format}'; use clip-benchmark (or --json "
                                                   "for apecli's own)", ("clip-benchmark",))
    if result_format is not None and as_json:
        raise ApecliError("give --json or --format clip-benchmark, not both")
    method = registry.get(mode) if mode is not None else None
    readable = method.reads if method is not None else tuple(dict.fromkeys(
        kind for candidate in registry.BUILT_IN for kind in candidate.reads))
    artifact = resolve_input(source, store_dir, readable)
    method = method or registry.default_for(artifact.kind)
    default = dataset_grid(kinds.dataset_of(artifact))
    grid = SearchGrid(tuple(search_scale or default.scale), tuple(search_step or default.steps)).fixing(
        beta=beta, alpha=alpha, gamma=gamma)
    ks = _integers(k, "--k") if k is not None else None
    tried = method.settings_tried(grid) * (len(ks) if ks else 1)
    with progress.steps(f"searching {tried:,} setting{'s' if tried != 1 else ''}" if tried else "evaluating") as advance:
        evaluation = evaluate_artifact(artifact, method.name, shots, grid, advance, device, val_shots, ks,
                                       _names(candidates) if candidates is not None else None)
    stem = f"eval-{method.name}" + (f"-{evaluation.shots}shot" if evaluation.shots else "")
    saved = save_evaluation(evaluation, [artifact], store.in_store(store_dir, evaluation.dataset, stem))
    _print_evaluation(evaluation)
    for note in evaluation.notes:
        say(f"note: {note}")
    if result_format == "clip-benchmark":
        from apecli.interop import clip_benchmark_result
        from apecli.kinds.features import FeaturesHeader, root_features

        header = FeaturesHeader.of(root_features(artifact))  # its encoder and provenance: no arrays read again
        typer.echo(json.dumps(clip_benchmark_result(evaluation.summary(), header)))
        return
    emit(saved, evaluation.summary(), as_json)



@app.command()
@reports_errors
def transfer(
    source: Input = None,
    to: Annotated[
        Optional[list[str]], typer.Option("--to", help="A features artifact whose test split to score; repeat for several.")
    ] = None,
    store_dir: Store = Path(DEFAULT_STORE),
    as_json: Json = False,
) -> None:
    """Test an evaluated model, unchanged, on other feature sets' test splits (distribution shift)."""
    from apecli.kinds.evaluation import EvaluationRecord
    from apecli.kinds.transfer import TransferRecord
    from apecli.transfer import save_transfer
    from apecli.transfer import transfer as run_transfer

    evaluation = resolve_input(source, store_dir, ["evaluation"])
    targets = [store.open_artifact(target, ["features"]) for target in to or []]
    results = run_transfer(evaluation, targets, say)
    record = EvaluationRecord.read(evaluation)
    saved = save_transfer(evaluation, targets, results,
                          store.in_store(store_dir, record.dataset, f"transfer-{record.mode}"))
    table = Table(title=f"{record.dataset} · {record.mode} · tested elsewhere", title_justify="left")
    for column in ("test set", "classes", "images", "test %"):
        table.add_column(column, justify="left" if column == "test set" else "right")
    table.add_row(f"{record.dataset} (its own)", "", "", f"{record.test_accuracy:.2f}")
    for result in results:
        table.add_row(result.dataset or Path(result.artifact).name, str(result.classes), f"{result.total:,}",
                      f"{result.accuracy:.2f}")
    console.print(table)
    emit(saved, TransferRecord.read(saved).summary(), as_json)


@app.command()
@reports_errors
def classes(
    source: Input = None,
    worst: Annotated[int, typer.Option("--worst", min=0, help="Classes to list, lowest accuracy first (0: every "
                                       "class; --json always holds every class).")] = 20,
    target: Annotated[Optional[str], typer.Option("--target", help="Of a transfer artifact: the test set to "
                                                  "report, by dataset or features path (needed where it has several).",
                                                  show_default=False)] = None,
    store_dir: Store = Path(DEFAULT_STORE),
    as_json: JsonReport = False,
) -> None:
    """Test accuracy class by class, lowest first, beside zero-shot CLIP's, and what each is mistaken for.

    Of an evaluation's test split, or of a transfer's test set."""
    from apecli.classes import class_report

    artifact = resolve_input(source, store_dir, ["evaluation", "transfer"])
    report = class_report(artifact, target)
    shown = report.classes[:worst] if worst else report.classes
    scope = f"the {len(shown)} lowest of {len(report.classes)}" if len(shown) < len(report.classes) else f"all {len(shown)}"
    mode = f"{report.mode} chosen on {report.chosen_on}" if report.chosen_on else report.mode
    table = Table(title=f"{_heading(report.dataset, mode, report.shots)} · test accuracy per class ({scope})",
                  title_justify="left")
    for column in ("class", "images", f"{registry.label(report.mode)} %", "zero-shot %", "mistaken for"):
        table.add_column(column, justify="right" if column.endswith("%") or column == "images" else "left")
    for result in shown:
        mistaken = ", ".join(f"{report.class_names[label]} ({count})" for label, count in result.mistaken_for[:2])
        more = len(result.mistaken_for) - 2
        table.add_row(result.name, f"{result.images:,}", f"{result.accuracy:.1f}", f"{result.zero_shot_accuracy:.1f}",
                      mistaken + (f" +{more}" if more > 0 else ""))
    perfect = sum(result.correct == result.images for result in report.classes)
    below = sum(result.correct < result.zero_shot_correct for result in report.classes)
    report_lines(artifact, report.summary(), as_json, [
        table, f"mean over {len(report.classes)} classes {report.mean_accuracy:.2f} %; {perfect} without a mistake"
        + (f"; {below} below zero-shot CLIP" if report.mode != ZeroShot.name else "")
        + (f"; no test image: {', '.join(report.absent)}" if report.absent else "")])


@app.command()
@reports_errors
def fit(
    source: Input = None,
    shots: Shots = None,
    k: Annotated[Optional[int], typer.Option("--k", help="Channels the residual lives on (default: the dataset's, scaled to D).")] = None,
    w: Annotated[Optional[tuple[float, float]], typer.Option("--w", help="Criterion weights w0, w1 (default: the dataset's).")] = None,
    epochs: Annotated[Optional[int], typer.Option("--epochs", help="Training epochs (default: the dataset's).")] = None,
    lr: Annotated[Optional[float], typer.Option("--lr", help="AdamW learning rate (default: the dataset's).")] = None,
    eps: Annotated[Optional[float], typer.Option("--eps", help="AdamW epsilon (default: the dataset's).")] = None,
    weight_decay: Annotated[float, typer.Option("--weight-decay", help="AdamW weight decay.")] = 0.1,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Training batch size.")] = 256,
    alpha: Annotated[Optional[float], typer.Option("--alpha", help="α during training (default: the dataset's init α).")] = None,
    beta: Annotated[Optional[float], typer.Option("--beta", help="β during training (default: 1).")] = None,
    seed: Annotated[int, typer.Option("--seed", help="Seed of view choice, shuffling and initialisation.")] = 1,
    val_shots: ValShots = None,
    device: ComputeDevice = "cpu",
    store_dir: Store = Path(DEFAULT_STORE),
    as_json: Json = False,
) -> None:
    """Train APE-T (category residual and key weights) on the stored cache and its augmented views."""
    from apecli.fitting import fit as train
    from apecli.kinds.adapter import save_fit
    from apecli.kinds.features import load_features
    from apecli.methods.ape_t import FitSettings
    from apecli.methods.trainer import last_epoch_note

    features = load_features(resolve_input(source, store_dir, ["features"]))
    settings = FitSettings(shots, k, w, epochs, lr, eps, weight_decay, batch_size, alpha, beta, seed,
                           val_shots).resolve(features)
    if features.views(settings.shots) is None:
        console.print(f"no augmented views stored for {settings.shots} shots: training on the cache keys themselves")
    with progress.epochs(settings.epochs) as report:
        result = train(features, settings, report, device=device)
    result = save_fit(result, features, store.in_store(
        store_dir, features.dataset, f"fit-{settings.shots}shot-k{settings.k}-seed{settings.seed}"))
    console.print(f"best validation accuracy {result.best_val_accuracy:.2f}% at epoch {result.best_epoch} "
                  f"of {settings.epochs} (α = {settings.init_alpha:g}, β = {settings.init_beta:g})"
                  + (f", on {settings.val_shots} validation images a class" if settings.val_shots else ""))
    if (note := last_epoch_note(result.best_epoch, settings.epochs)) is not None:
        say(f"note: {note}")
    emit(result.artifact, result.summary(), as_json)


@app.command()
@reports_errors
def bench(
    sources: Annotated[Optional[list[Path]], typer.Argument(help="Features artifacts or folders (default: the store).", show_default=False)] = None,
    shots: Annotated[Optional[str], typer.Option("--shots", help="Shot counts, comma-separated (default: those every "
                                                 "feature set holds; the protocol's 1,2,4,8,16 for extracted benchmarks).",
                                                 show_default=False)] = None,
    modes: Annotated[str, typer.Option("--modes", help="Modes, comma-separated (apecli methods lists them).")
                     ] = ",".join(method.name for method in registry.BENCH),
    out: Annotated[Path, typer.Option("--out", help="Folder for results.json, results.csv and the plot.")] = Path("results"),
    val_shots: ValShots = None,
    k: Annotated[Optional[str], typer.Option("--k", help=f"{_choosing_k()} chooses its k on validation among these, "
                                             "comma-separated (default: the dataset's k, scaled to D).",
                                             show_default=False)] = None,
    device: ComputeDevice = "cpu",
    store_dir: Store = Path(DEFAULT_STORE),
    as_json: JsonReport = False,
) -> None:
    """Run modes × shot counts × feature sets; write CSV, JSON and plots; print the papers' table."""
    from apecli import bench as runner

    chosen = _names(modes)
    choosing_k = {mode for mode in chosen if registry.get(mode).chooses_k}
    artifacts = runner.find_features(sources or [store_dir])
    counts = _integers(shots, "--shots") if shots is not None else runner.common_shots(artifacts)

    def report(row: dict, skipped: bool) -> None:
        took = "done before" if skipped else f"{row['seconds']:7.1f} s"
        console.print(f"{took}  {row['dataset']} {row['shots']}-shot {row['mode']}: test {row['test_accuracy']:.2f}%",
                      markup=False)
        for note in [] if skipped else row.get("notes", []):  # this run's cells: an earlier file's said then
            say(f"           note: {note}")

    ks = _integers(k, "--k") if k is not None else None
    names = ", ".join(runner.set_name(artifact) for artifact in artifacts)
    plan = (f"bench: {len(artifacts)} feature set{'s' * (len(artifacts) > 1)} ({names}) × shots "
            f"{','.join(map(str, counts))}" + (" (those every feature set holds; --shots sets others)"
                                               if shots is None else "") + f" × modes {','.join(chosen)}")
    rows = runner.run_bench(artifacts, counts, chosen, out, report, device, val_shots, ks,
                            starting=lambda: console.print(plan, markup=False))
    asked = {artifact.content_id for artifact in artifacts}  # the table and plot: this run's cells only
    current = [row for row in rows if row["content_id"] in asked and row["shots"] in counts
               and row.get("val_shots") == val_shots
               and row.get("k_tried") == (runner.k_choice(ks) if row["mode"] in choosing_k else None)]
    picture, replaced = runner.plot(current, chosen, out / "accuracy-vs-shots.png")
    if replaced:
        say(f"note: {picture} showed other cells ({replaced or 'an earlier run'}); it now shows this run's")
    tables = []
    for count in counts:
        table = Table(title=f"test accuracy (%), {count} shot{'s' if count > 1 else ''}"
                      + (f", chosen on {val_shots} validation images a class" if val_shots else "")
                      + (f", {_choosing_k()}'s k chosen among {runner.k_choice(ks)}" if ks and choosing_k else ""))
        table.add_column("dataset")
        for mode in chosen:
            table.add_column(registry.label(mode), justify="right")
        for line in runner.summary_table(current, count, chosen, deviations=True):
            table.add_row(line[0], *("" if cell is None else f"{cell[0]:.2f}" + ("" if cell[1] is None else f" ± {cell[1]:.2f}")
                                     for cell in line[1:]), style="bold" if line[0] == "Average" else None)
        tables.append(table)
    if as_json:  # stdout holds the JSON: the tables go beside the progress
        for table in tables:
            console.print(table)
    else:
        console.print(f"results: {out / 'results.json'}, {out / 'results.csv'} and {picture}")
    report_lines(out / "results.json", {"csv": str(out / "results.csv"), "plot": str(picture), "rows": rows}, as_json,
                 tables)


def _integers(text: str, option: str) -> tuple[int, ...]:
    try:
        values = tuple(sorted({int(part) for part in text.split(",") if part.strip()}))
    except ValueError:
        raise ApecliError(f"{option} takes comma-separated integers, got '{text}'") from None
    if not values or min(values) < 1:
        raise ApecliError(f"{option} takes positive integers, got '{text}'")
    return values


@app.command()
@reports_errors
def predict(
    images: Annotated[list[Path], typer.Argument(help="Image files to classify, or folders of them.", show_default=False)],
    model_artifact: Annotated[
        Optional[Path], typer.Option("--model-artifact", help="An evaluation artifact (default: the newest in the store).")
    ] = None,
    top: Annotated[int, typer.Option("--top", help="Labels to report per image.")] = 5,
    skip_bad: Annotated[bool, typer.Option("--skip-bad", help="Report unreadable files and classify the others.")] = False,
    device: Annotated[str, typer.Option("--device", help="auto, cpu, cuda, …")] = "auto",
    batch_size: Annotated[int, typer.Option("--batch-size", help="Images per encoder batch.")] = 64,
    workers: Annotated[Optional[int], typer.Option("--workers", help="Image decoding processes (0: in the main process; default: as extract's).", show_default=False)] = None,
    store_dir: Store = Path(DEFAULT_STORE),
    as_json: JsonReport = False,
) -> None:
    """Classify image files with an evaluated model (re-encoded with the model its features came from)."""
    from apecli.predict import predict as classify

    artifact = store.open_artifact(model_artifact, ["evaluation"]) if model_artifact else \
        resolve_input(None, store_dir, ["evaluation"])
    with progress.splits() as report:
        predictions, skipped = classify(images, artifact, top, device, batch_size, workers, skip_bad, report)
    for item in skipped:
        console.print(f"skipped {item['path']}: {item['error']}")
    if as_json:
        emit(artifact, {"predictions": [{"path": p.path, "top": [{"label": label, "probability": prob}
                                                                 for label, prob in zip(p.labels, p.probabilities)]}
                                        for p in predictions], "skipped": skipped}, True)
        return
    typer.echo("path,rank,label,probability")
    for p in predictions:
        for rank, (label, probability) in enumerate(zip(p.labels, p.probabilities), start=1):
            typer.echo(f"{_csv_field(p.path)},{rank},{_csv_field(label)},{probability:.6f}")


def _csv_field(text: str) -> str:
    return '"' + text.replace('"', '""') + '"' if any(c in text for c in ',"\n') else text


@app.command("ls")
@reports_errors
def list_store(
    store_dir: StoreFolder = None,
    kind: Annotated[Optional[str], typer.Option("--kind", help="Only artifacts of this kind: features, refinement, adapter, evaluation or transfer.")] = None,
    store_option: Store = Path(DEFAULT_STORE),
    as_json: JsonReport = False,
) -> None:
    """List the artifacts of a store, oldest first: path, kind, dataset, what each holds."""
    folder = store_dir or store_option
    if not folder.is_dir():
        raise ApecliError(f"{folder}: no such folder")
    if kind is not None and kind not in kinds.KINDS:
        raise ChoiceError("kind", kind, f"unknown kind '{kind}'; choose one of {', '.join(kinds.KINDS)}", kinds.KINDS)
    artifacts = store.list_artifacts(folder, [kind] if kind else None)
    known: dict = {}
    reasons = [store.stale_reason(artifact, known) for artifact in artifacts]
    stale = [why if why is not None and not why.damaged else None for why in reasons]
    damaged = [why if why is not None and why.damaged else None for why in reasons]
    headers = [_header_line(artifact) for artifact in artifacts]
    if as_json:
        typer.echo(json.dumps([{"artifact": str(a.path), "kind": a.kind, "content_id": a.content_id,
                                "dataset": dataset, "summary": summary, "stale": why, "unreadable_ancestor": broken,
                                "damaged_header": problem}
                               for a, (dataset, summary, problem), why, broken in zip(artifacts, headers, stale, damaged)]))
        return
    if not artifacts:
        console.print(f"no artifacts in {folder}")
    for artifact, (dataset, summary, problem), why, broken in zip(artifacts, headers, stale, damaged):
        mark = (f" [stale: {why}]" if why else "") + (f" [unreadable ancestor: {broken}]" if broken else "") + (
            f" [damaged header: {problem}]" if problem else "")
        typer.echo(f"{artifact.path}\t{artifact.kind}\t{dataset or '-'}\t{summary}{mark}")
    if any(stale):
        unreachable = sum(1 for why in stale if why is not None and store.out_of_reach(why, folder))
        console.print(f"{sum(map(bool, stale))} stale (no command reads them); 'apecli gc' removes them" + (
            f", except {unreachable} whose missing ancestor's folder lies outside {folder} (a drive not mounted?)"
            if unreachable else ""))
    if any(damaged) or any(problem for _, _, problem in headers):
        console.print("some artifacts cannot be read whole (their own header, or an ancestor): 'apecli verify' "
                      "says more; 'apecli gc' keeps them")


def _header_checked(item: store.Verified) -> store.Verified:
    """A verified artifact whose kind's header is read too: a field the format does not allow fails it."""
    if item.problem:
        return item
    try:
        kinds.header(store.open_artifact(item.path))
    except ApecliError as error:
        return replace(item, problem=str(error).removeprefix(f"{item.path}: "))
    return item


def _header_line(artifact: store.Artifact) -> tuple[str | None, str, str | None]:
    """An artifact's dataset and one line on what it holds, or what is wrong with its header."""
    try:
        return kinds.dataset_of(artifact), kinds.describe(artifact), None
    except ApecliError as error:
        problem = str(error).removeprefix(f"{artifact.path}: ")
        return None, "?", problem


@app.command()
@reports_errors
def gc(
    store_dir: StoreFolder = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Only list what would be removed.")] = False,
    work: Annotated[bool, typer.Option("--work", help="Also remove interrupted extractions (their resume state).")] = False,
    store_option: Store = Path(DEFAULT_STORE),
    as_json: JsonReport = False,
) -> None:
    """Remove stale artifacts (a parent missing or changed) and files of writes that were killed."""
    folder = store_dir or store_option
    removed, kept = store.collect_garbage(folder, dry_run=dry_run, work=work)
    removed, kept = [(p, in_flags(why)) for p, why in removed], [(p, in_flags(why)) for p, why in kept]
    if as_json:
        typer.echo(json.dumps({"dry_run": dry_run, "removed": [{"path": str(p), "why": why} for p, why in removed],
                               "kept": [{"path": str(p), "why": why} for p, why in kept]}))
        return
    verb = "would remove" if dry_run else "removed"
    for path, why in removed:
        typer.echo(f"{verb}\t{path}\t{why}")
    for path, why in kept:
        console.print(f"kept {path}: {why}", markup=False)
    console.print(f"{verb} {len(removed)} file(s) or folder(s) from {folder}" if removed else f"nothing to remove in {folder}")


@app.command()
@reports_errors
def verify(
    sources: Annotated[Optional[list[Path]], typer.Argument(
        help="Artifacts or folders of them (default: a path on stdin when piped, else the whole store).",
        show_default=False)] = None,
    store_option: Store = Path(DEFAULT_STORE),
    as_json: JsonReport = False,
) -> None:
    """Hash each artifact and its ancestors again against their content ids: files edited or damaged."""
    piped = None if sources else piped_input(kinds.KINDS)
    artifacts, unreadable = [piped] if piped else [], []
    for source in sources or ([] if piped else [store_option]):
        if Path(source).is_dir():
            found, damaged = store.list_artifacts(Path(source)), store.unreadable_in(Path(source))
            if not found and not damaged:
                raise ApecliError(f"{source}: holds no artifacts")
            artifacts, unreadable = artifacts + found, unreadable + damaged
        else:
            artifacts.append(store.open_artifact(source))
    results = [_header_checked(item) for item in store.verify(artifacts)] + unreadable
    failed = sum(1 for item in results if item.problem)
    if as_json:
        typer.echo(json.dumps({"checked": len(results), "failed": failed, "artifacts": [
            {"artifact": str(item.path), "kind": item.kind, "content_id": item.content_id,
             "recomputed": item.recomputed, "problem": item.problem} for item in results]}))
    else:
        for item in results:
            typer.echo(f"{item.path}\t{item.kind}\t{item.problem or 'ok'}")
    if failed:
        raise ApecliError(f"{failed} of {len(results)} artifacts fail verification")
    console.print(f"{len(results)} artifact{'s' if len(results) > 1 else ''}: contents match their content ids")


@app.command()
@reports_errors
def models(
    pattern: Annotated[str, typer.Argument(help="Only names containing this (any case), e.g. vit-b.", show_default=False)] = "",
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object: name → pretrained tags.")] = False,
) -> None:
    """List the open_clip models extract takes, with their pretrained tags (also: hf-hub:, local-dir:)."""
    from apecli.encoder import known_models

    found = known_models(pattern)
    if not found:
        raise ApecliError(f"no open_clip model name contains '{pattern}'")
    if as_json:
        typer.echo(json.dumps(found))
        return
    for name, tags in found.items():
        typer.echo(f"{name}\t{', '.join(tags) or '-'}")


@app.command("methods")
@reports_errors
def list_methods(
    as_json: Annotated[bool, typer.Option("--json", help="One JSON list: each method's name, label and where it "
                                                         "comes from.")] = False,
) -> None:
    """List the methods eval, bench and predict take: the built-in ones and those of installed plugins."""
    rows = [{"mode": name, "label": method.label, "module": method.__module__,
             "plugin": method not in registry.BUILT_IN, "reads": list(method.reads), "given": list(method.given)}
            for name, method in registry.methods().items()]
    if as_json:
        typer.echo(json.dumps(rows))
        return
    for row in rows:
        given = ", ".join(SYMBOLS.get(name, name) for name in row["given"]) or "-"
        typer.echo(f"{row['mode']}\t{row['label']}\t{'plugin ' if row['plugin'] else ''}{row['module']}\t"
                   f"reads {', '.join(row['reads'])}\tgiven {given}")


@app.command()
@reports_errors
def info(source: Input = None, store_dir: Store = Path(DEFAULT_STORE), as_json: JsonReport = False) -> None:
    """Describe an artifact: kind, content id, parents, settings and arrays."""
    artifact = resolve_input(source, store_dir, kinds.KINDS)
    kinds.header(artifact)  # its kind's fields checked: one line for a header the format does not allow
    details = {
        "kind": artifact.kind,
        "content_id": artifact.content_id,
        "format_version": artifact.format_version,
        "created": artifact.created,
        "writer": artifact.writer,
        "stale": store.stale_reason(artifact),
        "parents": [ref.to_json() for ref in artifact.parents],
        "metadata": dict(artifact.metadata),
        "arrays": list(artifact.names),
        "shapes": {name: {"shape": list(shape), "dtype": dtype} for name, (shape, dtype) in artifact.shapes.items()},
    }
    if not as_json:
        readable = {
            "path": str(artifact.path),
            "kind": artifact.kind,
            "content id": f"{artifact.content_id} (format {artifact.format_version})",
            "written": f"{artifact.created or '?'} by {artifact.writer or '?'}",
            "state": (f"{'an ancestor cannot be read' if details['stale'].damaged else 'stale'}: {details['stale']}"
                      if details["stale"] else "usable"),
            "parents": {ref.path: f"{ref.kind} ({ref.content_id})" for ref in artifact.parents} or "none",
            **dict(artifact.metadata),
            "arrays": {name: f"{' × '.join(map(str, shape)) or 'scalar'} {dtype}" for name, (shape, dtype) in artifact.shapes.items()},
        }
    report_lines(artifact, details, as_json, outline(readable) if not as_json else [])


@app.command()
@reports_errors
def demo(
    store_dir: Annotated[Path, typer.Option("--store", help="Folder for the demo's images and artifacts.")] = Path("caches-demo"),
    as_json: Json = False,
) -> None:
    """Run the whole chain offline on a generated set: images → extract (tiny model) → refine → eval."""
    from apecli.datasets import read_image_folder
    from apecli.encoder import EncoderSpec
    from apecli.evaluate import evaluate_training_free, save_evaluation
    from apecli.extract import ExtractSettings
    from apecli.extract import extract as run_extract
    from apecli.kinds.refinement import save_refinement
    from apecli.refine import select_channels
    from apecli.synthetic import DEMO_NAME, demo_images, tiny_model_config

    images = store_dir / "images"
    if not (images / DEMO_NAME / "test").is_dir():
        demo_images(images)
    console.print(f"{DEMO_NAME}: a generated set, not a benchmark: 8 classes of striped patches told apart by hue and "
                  f"stripe width through noise ({images / DEMO_NAME})")
    model = tiny_model_config(store_dir)
    console.print(f"model: {model} (a tiny open_clip config with seeded random weights: its zero-shot CLIP is chance)")
    with progress.splits() as report:
        features = run_extract(read_image_folder(images / DEMO_NAME), EncoderSpec(str(model), "none"), store_dir,
                               ExtractSettings(shots=(1, 2, 4, 8, 16), workers=0), progress=report, say=say)
    console.print(f"features: {features.artifact.path}")
    refinement = save_refinement(select_channels(features, k=32), features,
                                 store.in_store(store_dir, features.dataset, "refine-16shot-k32"))
    console.print(f"refined: {refinement.artifact.path}")
    with progress.steps("searching") as advance:
        evaluation = evaluate_training_free(features, refinement, progress=advance)
    saved = save_evaluation(evaluation, [refinement.artifact],
                            store.in_store(store_dir, features.dataset, f"eval-{evaluation.mode}-16shot"))
    _print_evaluation(evaluation)
    for note in evaluation.notes:
        say(f"note: {note}")
    emit(saved, evaluation.summary(), as_json)


def _heading(dataset: str | None, mode: str | None, shots: int | None) -> str:
    """What a result table is about: ``caltech101 · training-free · 16 shots``."""
    return f"{dataset or 'features'} · {mode}" + (f" · {shots} shot{'s' if shots > 1 else ''}" if shots else "")


def _print_evaluation(evaluation) -> None:
    """The accuracies of an evaluation beside zero-shot CLIP's, and what it chose on validation."""
    table = Table(title=_heading(evaluation.dataset, evaluation.mode, evaluation.shots)
                  + (f" · validation: {evaluation.val_shots} a class" if evaluation.val_shots else ""))
    for column in ("method", "val %", "test %", "chosen on validation"):
        table.add_column(column, justify="left" if column in ("method", "chosen on validation") else "right")
    table.add_row(ZeroShot.label, f"{evaluation.zero_shot_val:.2f}", f"{evaluation.zero_shot_test:.2f}", "")
    if evaluation.mode != ZeroShot.name:
        named = {**{name: evaluation.hyperparameters[name] for name in SYMBOLS if name in evaluation.hyperparameters},
                 **evaluation.hyperparameters}
        settings = [(name, f"{SYMBOLS.get(name, name)}={value:.4g}") for name, value in named.items()]
        chosen = [text for name, text in settings if name not in evaluation.given]
        if evaluation.k_tried is not None:  # k was chosen on validation too
            chosen.insert(0, f"k={evaluation.channels.shape[0]}")
        if evaluation.epochs is not None:
            chosen.append(f"epoch {evaluation.epochs[0]}/{evaluation.epochs[1]}")
        given = [text for name, text in settings if name in evaluation.given]
        label = registry.label(evaluation.mode) + (f" ({registry.label(evaluation.extra['chosen'])})"
                                                   if "chosen" in evaluation.extra else "")  # auto: what it chose
        table.add_row(label, f"{evaluation.val_accuracy:.2f}", f"{evaluation.test_accuracy:.2f}",
                      "; ".join(part for part in (" ".join(chosen), "given " * bool(given) + " ".join(given)) if part))
    console.print(table)
    if "candidates" in evaluation.extra:  # auto: what each candidate reached on validation, and its time
        chosen = Table(title="candidates, chosen on validation", title_justify="left")
        for column in ("method", "val %", "seconds", ""):
            chosen.add_column(column, justify="left" if column in ("method", "") else "right")
        for row in sorted(evaluation.extra["candidates"], key=lambda row: (-row["val_accuracy"], row["seconds"])):
            chosen.add_row(registry.label(row["mode"]), f"{row['val_accuracy']:.2f}", f"{row['seconds']:.2f}",
                           "chosen" if row["mode"] == evaluation.extra["chosen"] else "")
        console.print(chosen)


def _names(text: str) -> list[str]:
    """Comma-separated names, blanks dropped."""
    return [name.strip() for name in text.split(",") if name.strip()]


def main() -> None:
    """The console script: a mistyped command line is one line on stderr and exit status 2, as any user error."""
    # typer carries its own copy of click in recent versions; its exception classes are found through one it exports
    usage_error = next(kind for kind in typer.BadParameter.__mro__ if kind.__name__ == "UsageError")
    click_exception = next(kind for kind in typer.BadParameter.__mro__ if kind.__name__ == "ClickException")
    try:
        status = app(standalone_mode=False)
    except typer.Abort:
        typer.echo("apecli: interrupted", err=True)
        sys.exit(130)
    except usage_error as error:
        if type(error).__name__ != "NoArgsIsHelpError":  # a bare ``apecli`` has had its help printed
            where = f"; see '{error.ctx.command_path} --help'" if error.ctx is not None else ""
            typer.echo(f"apecli: error: {error.format_message().rstrip('.')}{where}", err=True)
        sys.exit(2)
    except click_exception as error:
        typer.echo(f"apecli: error: {error.format_message()}", err=True)
        sys.exit(error.exit_code)
    sys.exit(status if isinstance(status, int) else 0)
