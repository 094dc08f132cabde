"""Options shared by several commands, defined once."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

DEFAULT_STORE = "caches"

Input = Annotated[
    Optional[str],
    typer.Argument(
        help="Artifact to read: a path, or - for a path on stdin. Default: stdin when piped, "
        "else the newest matching artifact in the store.",
        show_default=False,
    ),
]
Store = Annotated[
    Path,
    typer.Option(
        "--store",
        envvar="APECLI_STORE",
        help="Folder where artifacts are written (and looked up).",
        file_okay=False,
    ),
]
StoreFolder = Annotated[
    Optional[Path], typer.Argument(help="Store folder (default: --store, ./caches or $APECLI_STORE).", show_default=False)
]
ComputeDevice = Annotated[
    str,
    typer.Option("--device", help="Where searches and training run: cpu, cuda or cuda:N (float64 searches; a GPU's "
                 "float32 training rounds otherwise than the CPU's)."),
]
Json = Annotated[bool, typer.Option("--json", help="Print one JSON object on stdout instead of the artifact "
                                                              "path.")]
JsonReport = Annotated[bool, typer.Option("--json", help="Print the report as one JSON object on stdout.")]
Shots = Annotated[Optional[int], typer.Option("--shots", help="Shot count of the cache to use (default: the largest stored).", min=1)]
ValShots = Annotated[
    Optional[int],
    typer.Option("--val-shots", min=1, show_default=False,
                 help="Choose on this many validation images per class, drawn with the features' seed, instead of "
                 "the whole split (the protocol's default)."),
]
Dataset = Annotated[
    Optional[str], typer.Option("--dataset", help="Dataset name (selects per-dataset defaults, e.g. caltech101).")
]
Model = Annotated[Optional[str], typer.Option("--model", help="Name of the model the features came from, recorded as provenance.")]
ClassNames = Annotated[Optional[Path], typer.Option("--class-names", help="Text file, one class name per line, in label order.")]
TextModel = Annotated[
    Optional[str],
    typer.Option("--text-model", help="Compute the text classifier from the class names with this open_clip model "
                 "(the one that made the features), as extract does."),
]
TextPretrained = Annotated[str, typer.Option("--pretrained", help="With --text-model: open_clip pretrained tag or local checkpoint.")]
TextRoot = Annotated[
    Optional[Path],
    typer.Option("--root", envvar="APECLI_DATA", help="With --text-model: the CoOp datasets folder, for --dataset's class names."),
]
TextPrompts = Annotated[Optional[Path], typer.Option("--prompts", help="With --text-model: CuPL-style JSON, class name → sentences.")]
Normalise = Annotated[bool, typer.Option("--normalise", help="Divide each row by its L2 norm where rows are not of unit length (refused without it).")]

TrustTorchScript = Annotated[
    bool,
    typer.Option("--trust-torchscript", help="Read a --pretrained archive that apecli's weights reader refuses as "
                 "TorchScript, which runs the code the file holds: only for a file you trust."),
]
DrawnShots = Annotated[str, typer.Option("--shots", help="Shot counts to draw from the train split, comma-separated.")]
DrawSeed = Annotated[int, typer.Option("--seed", help="The few-shot draw's seed (each class's images in a seeded order; "
                                                      "the caches nest), and the splits' where drawn by fractions.")]
