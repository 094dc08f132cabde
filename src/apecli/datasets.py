"""Image datasets: the CoOp few-shot benchmarks' layouts, ImageNet's shifted test sets, a folder per
class, CSV lists, and WebDataset tar shards.

Every reader returns an :class:`ImageDataset`: class names in label order, and (path, label) lists for
the train, val and test splits, with the prompt templates of the dataset. The shifted test sets
(ImageNet-V2, -Sketch, -A, -R) have a test split only. Reading a dataset lists files; it decodes no image.
"""

from __future__ import annotations

import csv
import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

from apecli.errors import ApecliError, ChoiceError, InputError, Setting, Step
from apecli.files import ShardMember, file_sha256
from apecli.presets import canonical_name, nearest_dataset

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
GENERIC_TEMPLATES = ("a photo of a {}.",)
IMAGENET_TEMPLATES = (
    "itap of a {}.",
    "a bad photo of the {}.",
    "a origami {}.",
    "a photo of the large {}.",
    "a {} in a video game.",
    "art of the {}.",
    "a photo of the small {}.",
)
EUROSAT_NAMES = {
    "AnnualCrop": "Annual Crop Land",
    "Forest": "Forest",
    "HerbaceousVegetation": "Herbaceous Vegetation Land",
    "Highway": "Highway or Road",
    "Industrial": "Industrial Buildings",
    "Pasture": "Pasture Land",
    "PermanentCrop": "Permanent Crop Land",
    "Residential": "Residential Buildings",
    "River": "River",
    "SeaLake": "Sea or Lake",
}


@dataclass(frozen=True)
class ImageDataset:
    """Class names and labelled image paths of the train, val and test splits."""

    name: str
    root: Path
    class_names: tuple[str, ...]
    splits: Mapping[str, tuple[tuple[Path, int], ...]]
    templates: tuple[str, ...] = GENERIC_TEMPLATES
    split_file: Path | None = None
    notes: tuple[str, ...] = field(default_factory=tuple)
    test_only: bool = False  # a shifted test set: no few-shot cache and no validation split to extract

    @property
    def split_file_sha256(self) -> str | None:
        return file_sha256(self.split_file) if self.split_file else None

    def by_class(self, split: str = "train") -> list[list[Path]]:
        """The images of a split grouped by label, in listing order."""
        groups: list[list[Path]] = [[] for _ in self.class_names]
        for path, label in self.splits[split]:
            groups[label].append(path)
        return groups


@dataclass(frozen=True)
class Layout:
    """Where a CoOp benchmark keeps its images and split, and how its prompts read."""

    folders: tuple[str, ...]
    image_dir: str
    split_file: str | None
    templates: tuple[str, ...] = GENERIC_TEMPLATES


LAYOUTS: dict[str, Layout] = {
    "caltech101": Layout(("caltech-101", "caltech101"), "101_ObjectCategories", "split_zhou_Caltech101.json"),
    "dtd": Layout(("dtd",), "images", "split_zhou_DescribableTextures.json", ("{} texture.",)),
    "eurosat": Layout(("eurosat",), "2750", "split_zhou_EuroSAT.json", ("a centered satellite photo of {}.",)),
    "fgvc": Layout(("fgvc_aircraft", "fgvcaircraft"), "images", None, ("a photo of a {}, a type of aircraft.",)),
    "food101": Layout(("food-101", "food101"), "images", "split_zhou_Food101.json", ("a photo of {}, a type of food.",)),
    "imagenet": Layout(("imagenet",), "images", None, IMAGENET_TEMPLATES),
    "oxford_flowers": Layout(("oxford_flowers", "flowers102"), "jpg", "split_zhou_OxfordFlowers.json",
                             ("a photo of a {}, a type of flower.",)),
    "oxford_pets": Layout(("oxford_pets", "oxfordpets"), "images", "split_zhou_OxfordPets.json",
                          ("a photo of a {}, a type of pet.",)),
    "stanford_cars": Layout(("stanford_cars", "stanfordcars"), "", "split_zhou_StanfordCars.json"),
    "sun397": Layout(("sun397",), "SUN397", "split_zhou_SUN397.json"),
    "ucf101": Layout(("ucf101",), "UCF-101-midframes", "split_zhou_UCF101.json", ("a photo of a person doing {}.",)),
}


@dataclass(frozen=True)
class ShiftLayout:
    """Where one of ImageNet's shifted test sets keeps its images, as the CoOp protocol lays it out: a
    folder per class under ``image_dir`` (named by its label for ImageNet-V2, by its WordNet id for the
    others), and ImageNet's ``classnames.txt`` beside it."""

    folders: tuple[str, ...]
    image_dir: str
    by_label: bool = False


SHIFT_LAYOUTS: dict[str, ShiftLayout] = {
    "imagenetv2": ShiftLayout(("imagenetv2", "imagenet-v2"), "imagenetv2-matched-frequency-format-val", by_label=True),
    "imagenet_sketch": ShiftLayout(("imagenet-sketch", "imagenet_sketch"), "images"),
    "imagenet_a": ShiftLayout(("imagenet-adversarial", "imagenet-a", "imagenet_a"), "imagenet-a"),
    "imagenet_r": ShiftLayout(("imagenet-rendition", "imagenet-r", "imagenet_r"), "imagenet-r"),
}


def _dataset_folder(root: Path, name: str, layout: Layout | ShiftLayout) -> Path:
    """The dataset's folder under ``root`` (either spelling), or ``root`` itself if it is one."""
    root = Path(root).expanduser().resolve()  # absolute paths: the same images from any working folder
    if not root.is_dir():
        raise ApecliError(f"{root}: no such folder")
    for folder in layout.folders:
        if (root / folder).is_dir():
            return root / folder
    if root.name in layout.folders or (isinstance(layout, Layout) and (root / (layout.split_file or "")).is_file()):
        return root
    raise ApecliError(f"{root}: no {name} dataset here (expected a folder named {' or '.join(layout.folders)})")


def read_coop(name: str, root: str | Path) -> ImageDataset:
    """One of the eleven CoOp benchmarks under ``root``, with its split (METHOD §7 layouts)."""
    canonical = canonical_name(name) or ""
    if canonical in SHIFT_LAYOUTS:
        return read_shifted_imagenet(canonical, root)
    if canonical not in LAYOUTS:
        known = tuple(sorted([*LAYOUTS, *SHIFT_LAYOUTS]))
        nearest = nearest_dataset(canonical)
        raise ChoiceError("dataset", name, f"unknown dataset '{name}'" + (f"; did you mean {nearest}?" if nearest else "")
                          + f" (known: {', '.join(known)}; or use {Step('read_image_folder')})", known)
    layout = LAYOUTS[canonical]
    folder = _dataset_folder(Path(root), canonical, layout)
    if canonical == "fgvc":
        return _read_fgvc(folder, layout)
    if canonical == "imagenet":
        return _read_imagenet(folder, layout)
    split_file = folder / layout.split_file
    if not split_file.is_file():
        raise ApecliError(f"{folder}: missing split file {layout.split_file}")
    try:
        split = json.loads(split_file.read_text())
        names: dict[int, str] = {}
        splits = {}
        for part in ("train", "val", "test"):
            entries = []
            for relative, label, classname in split[part]:
                label = int(label)
                names.setdefault(label, EUROSAT_NAMES.get(classname, classname) if canonical == "eurosat" else classname)
                entries.append((folder / layout.image_dir / relative, label))
            splits[part] = tuple(entries)
    except (ValueError, KeyError, TypeError) as error:
        raise ApecliError(f"{split_file}: not a split_zhou file ({type(error).__name__}: {error})") from None
    if sorted(names) != list(range(len(names))):
        raise ApecliError(f"{split_file}: labels are not 0 … C−1")
    return ImageDataset(canonical, folder, tuple(names[i] for i in range(len(names))), splits, layout.templates, split_file)


def _read_lines(path: Path) -> list[str]:
    if not path.is_file():
        raise ApecliError(f"{path.parent}: missing {path.name}")
    return [line.strip() for line in path.read_text().splitlines() if line.strip()]


def _read_fgvc(folder: Path, layout: Layout) -> ImageDataset:
    names = _read_lines(folder / "variants.txt")
    index = {name: i for i, name in enumerate(names)}
    splits = {}
    for part in ("train", "val", "test"):
        entries = []
        for line in _read_lines(folder / f"images_variant_{part}.txt"):
            image, _, variant = line.partition(" ")
            if variant not in index:
                raise ApecliError(f"{folder}/images_variant_{part}.txt: unknown variant '{variant}'")
            entries.append((folder / layout.image_dir / f"{image}.jpg", index[variant]))
        splits[part] = tuple(entries)
    return ImageDataset("fgvc", folder, tuple(names), splits, layout.templates, folder / "variants.txt")


def _read_classnames(folder: Path) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """ImageNet's ``classnames.txt`` in ``folder``: the WordNet ids and the class names, in label order."""
    lines = _read_lines(folder / "classnames.txt")
    if not all(len(line.split(" ", 1)) == 2 for line in lines):
        raise ApecliError(f"{folder}/classnames.txt: expected lines of 'wnid class name'")
    wnids, names = zip(*(line.split(" ", 1) for line in lines))
    return wnids, names


def _read_imagenet(folder: Path, layout: Layout) -> ImageDataset:
    wnids, names = _read_classnames(folder)
    splits = {}
    for part in ("train", "val"):
        entries = []
        for label, wnid in enumerate(wnids):
            directory = folder / layout.image_dir / part / wnid
            if not directory.is_dir():
                raise ApecliError(f"{folder}: missing {layout.image_dir}/{part}/{wnid}")
            entries += [(path, label) for path in _images_in(directory)]
        splits[part] = tuple(entries)
    splits["test"] = splits["val"]  # the protocol's ImageNet has no separate test split
    return ImageDataset("imagenet", folder, tuple(names), splits, layout.templates, folder / "classnames.txt",
                        ("ImageNet's val images serve as both val and test",))


def read_shifted_imagenet(name: str, root: str | Path) -> ImageDataset:
    """ImageNet-V2, -Sketch, -A or -R under ``root``: a test split of ImageNet's classes (all 1,000, or the
    200 whose folders -A and -R hold), named and ordered as in ImageNet's ``classnames.txt``."""
    layout = SHIFT_LAYOUTS[name]
    folder = _dataset_folder(Path(root), name, layout)
    wnids, names = _read_classnames(folder)
    images = folder / layout.image_dir
    if not images.is_dir():
        raise ApecliError(f"{folder}: missing {layout.image_dir}/")
    present = {p.name for p in images.iterdir() if p.is_dir()}
    keys = [str(label) for label in range(len(wnids))] if layout.by_label else list(wnids)
    unknown = sorted(present - set(keys))
    if unknown:
        raise ApecliError(f"{images}: folder '{unknown[0]}' is no class of classnames.txt")
    kept = [i for i, key in enumerate(keys) if key in present]
    if not kept:
        raise ApecliError(f"{images}: no class folders")
    test = tuple((path, label) for label, i in enumerate(kept) for path in _images_in(images / keys[i]))
    return ImageDataset(name, folder, tuple(names[i] for i in kept), {"train": (), "val": (), "test": test},
                        IMAGENET_TEMPLATES, folder / "classnames.txt",
                        (f"a test set only, {len(kept)} of ImageNet's classes",), test_only=True)


def _images_in(directory: Path) -> list[Path]:
    return sorted(p for p in directory.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


RATIOS = (0.5, 0.2, 0.3)  # train, val, test: how a folder or list without splits is divided per class
RATIOS_TEXT = " / ".join(f"{ratio:.0%}" for ratio in RATIOS)


def _split_by_ratio(groups: list[list[Path]], seed: int, source: Path) -> dict[str, tuple[tuple[Path, int], ...]]:
    """Each class's images shuffled (seeded) and divided by RATIOS; refused where a split would be empty."""
    splits: dict[str, list[tuple[Path, int]]] = {"train": [], "val": [], "test": []}
    for label, paths in enumerate(groups):
        shuffled = sorted(paths)
        random.Random(f"{seed}:{label}").shuffle(shuffled)
        n_train = round(RATIOS[0] * len(shuffled))
        n_val = round(RATIOS[1] * len(shuffled))
        parts = (shuffled[:n_train], shuffled[n_train : n_train + n_val], shuffled[n_train + n_val :])
        for name, part in zip(splits, parts):
            splits[name] += [(p, label) for p in part]
    empty = [name for name, entries in splits.items() if not entries]
    if empty:
        raise ApecliError(f"{source}: too few images to split {RATIOS_TEXT} per class (the "
                          f"{empty[0]} split would be empty; the smallest class has {min(map(len, groups))}): lay them "
                          "out as train/, val/ and test/ folders, or list them in a CSV with a split column")
    return {name: tuple(entries) for name, entries in splits.items()}


def read_image_folder(directory: str | Path, seed: int = 1) -> ImageDataset:
    """A folder per class: ``DIR/{train,val,test}/CLASS/*`` or ``DIR/CLASS/*`` (split 50/20/30, seeded);
    or WebDataset shards, ``DIR/{train,val,test}/*.tar`` with ``DIR/classes.txt`` (:func:`read_webdataset`)."""
    directory = Path(directory).expanduser().resolve()
    if not directory.is_dir():
        raise ApecliError(f"{directory}: no such folder")
    if (directory / "train").is_dir() and any(path.suffix == ".tar" for path in (directory / "train").iterdir()):
        return read_webdataset(directory)
    if (directory / "train").is_dir():
        names = sorted(p.name for p in (directory / "train").iterdir() if p.is_dir())
        splits = {}
        for part in ("train", "val", "test"):
            if not (directory / part).is_dir():
                raise ApecliError(f"{directory}: has train/ but no {part}/ folder (" + (
                    "hyperparameters are chosen on val/" if part == "val" else "accuracy is measured on test/")
                    + f"); or put the class folders directly in it, to be split {RATIOS_TEXT}")
            unknown = sorted({p.name for p in (directory / part).iterdir() if p.is_dir()} - set(names))
            if unknown:
                raise ApecliError(f"{directory}/{part}: classes not in train/: {', '.join(unknown)}")
            splits[part] = tuple(
                (path, label) for label, name in enumerate(names)
                if (directory / part / name).is_dir() for path in _images_in(directory / part / name)
            )
        return ImageDataset(directory.name, directory, tuple(names), splits)
    names = sorted(p.name for p in directory.iterdir() if p.is_dir() and not p.name.startswith("."))
    if len(names) < 2:
        raise ApecliError(f"{directory}: expected a folder per class (found {len(names)})")
    groups = [_images_in(directory / name) for name in names]
    return ImageDataset(directory.name, directory, tuple(names), _split_by_ratio(groups, seed, directory),
                        notes=(f"split per class by seeded ratios {RATIOS} (seed {seed})",))


CLASS_INDEX_BYTES = 32  # a sample's .cls holds a class index as text: anything longer is no class index


def read_webdataset(directory: Path) -> ImageDataset:
    """WebDataset shards: ``DIR/{train,val,test}/*.tar`` (uncompressed, in name order), each sample an image
    under its usual extension and its class index as text in ``.cls`` (the sample's key is its member's
    path up to the first dot of its name, as WebDataset groups them), the class names one a line in
    ``DIR/classes.txt``. Only the members' headers and the ``.cls`` texts are read here; an image's bytes
    are read where they lie when it is encoded (:class:`ShardMember`), never unpacked to disk."""
    names_file = directory / "classes.txt"
    if not names_file.is_file():
        raise ApecliError(f"{directory}: WebDataset shards need classes.txt beside train/ (the class names, one a line, "
                          "in class-index order)")
    names = tuple(_read_lines(names_file))
    if len(names) < 2 or len(set(names)) != len(names):
        raise InputError(names_file, f"{len(names)} class names{' (some repeated)' if len(set(names)) != len(names) else ''}"
                                     "; give two or more distinct names, one a line")
    splits = {}
    for part in ("train", "val", "test"):
        folder = directory / part
        shards = sorted(path for path in folder.iterdir() if path.suffix == ".tar") if folder.is_dir() else []
        if not shards:
            raise ApecliError(f"{directory}: no .tar shards in {part}/ (WebDataset shards need train/, val/ and test/)")
        splits[part] = tuple(entry for shard in shards for entry in _shard_samples(shard, len(names)))
    return ImageDataset(directory.name, directory, names, splits,
                        notes=(f"WebDataset shards: {', '.join(f'{len(v)} {k}' for k, v in splits.items())} images",))


def _shard_samples(shard: Path, num_classes: int) -> list[tuple[ShardMember, int]]:
    """The (image, class) samples of one shard, in its order."""
    import tarfile

    samples: dict[str, dict[str, object]] = {}
    try:
        with tarfile.open(shard, mode="r:") as tar:
            for member in tar:
                if member.isdir():
                    continue
                if not member.isfile():
                    raise InputError(shard, f"member '{member.name}' is a link or a device, not a file")
                folder, _, base = member.name.rpartition("/")
                stem, dot, extension = base.partition(".")
                if not dot:
                    continue  # no extension: no part of a sample
                sample = samples.setdefault(f"{folder}/{stem}" if folder else stem, {})
                extension = extension.lower()
                if extension == "cls":
                    if member.size > CLASS_INDEX_BYTES:
                        raise InputError(shard, f"sample '{member.name}': a .cls of {member.size} bytes is no class index")
                    sample["cls"] = tar.extractfile(member).read()
                elif f".{extension}" in IMAGE_SUFFIXES:
                    sample["image"] = ShardMember(shard, member.name, member.offset_data, member.size)
    except tarfile.TarError as error:
        raise InputError(shard, f"not a readable uncompressed tar shard ({error})") from None
    entries = []
    for key, sample in samples.items():
        if "image" not in sample:
            if "cls" in sample:
                raise InputError(shard, f"sample '{key}' has a class but no image (.jpg, .png, …)")
            continue
        if "cls" not in sample:
            raise InputError(shard, f"sample '{key}' has no .cls (its class index)")
        text = bytes(sample["cls"]).decode("ascii", errors="replace").strip()
        if not text.isdigit() or int(text) >= num_classes:
            raise InputError(shard, f"sample '{key}': class index '{text[:12]}' out of range for the {num_classes} "
                                    "classes of classes.txt")
        entries.append((sample["image"], int(text)))
    return entries


def read_image_list(csv_file: str | Path, seed: int = 1) -> ImageDataset:
    """A CSV with ``path,label`` (and optionally ``split``) columns; paths relative to the file's folder."""
    csv_file = Path(csv_file).expanduser().resolve()
    if not csv_file.is_file():
        raise ApecliError(f"{csv_file}: no such file")
    try:
        with open(csv_file, newline="", encoding="utf-8-sig") as handle:  # -sig: a spreadsheet's byte-order mark
            reader = csv.DictReader(handle)
            columns = set(reader.fieldnames or ())
            rows = list(reader)
    except (UnicodeDecodeError, csv.Error) as error:
        raise ApecliError(f"{csv_file}: not a readable UTF-8 CSV ({error})") from None
    if not {"path", "label"} <= columns:
        raise ApecliError(f"{csv_file}: needs a header with 'path' and 'label' columns (and optionally 'split')")
    needed = ("path", "label", "split") if "split" in columns else ("path", "label")
    for line, row in enumerate(rows, start=2):
        if not all(row.get(column) for column in needed):
            raise ApecliError(f"{csv_file}, line {line}: needs a value in each of the columns {', '.join(needed)}")
    if not rows:
        raise ApecliError(f"{csv_file}: lists no images")
    names = sorted({row["label"] for row in rows})
    index = {name: i for i, name in enumerate(names)}
    resolve = lambda p: (csv_file.parent / p) if not Path(p).is_absolute() else Path(p)  # noqa: E731
    if "split" in columns:
        bad = sorted({row["split"] for row in rows} - {"train", "val", "test"})
        if bad:
            raise ApecliError(f"{csv_file}: unknown split values {', '.join(map(repr, bad))} (use train, val, test)")
        splits = {part: tuple((resolve(r["path"]), index[r["label"]]) for r in rows if r["split"] == part)
                  for part in ("train", "val", "test")}
        return ImageDataset(csv_file.stem, csv_file.parent, tuple(names), splits, split_file=csv_file)
    groups: list[list[Path]] = [[] for _ in names]
    for row in rows:
        groups[index[row["label"]]].append(resolve(row["path"]))
    return ImageDataset(csv_file.stem, csv_file.parent, tuple(names), _split_by_ratio(groups, seed, csv_file), split_file=csv_file,
                        notes=(f"split per class by seeded ratios {RATIOS} (seed {seed})",))


def read_prompts(path: str | Path, class_names: tuple[str, ...], allow_missing: bool = False) -> dict[str, list[str]]:
    """CuPL-style sentences per class from a JSON object ``{class name: [sentence, …]}``."""
    path = Path(path).expanduser()
    try:
        data = json.loads(path.read_text())
    except OSError as error:
        raise ApecliError(f"{path}: cannot read prompts ({error.strerror})") from None
    except ValueError as error:
        raise ApecliError(f"{path}: not valid JSON ({error})") from None
    if not isinstance(data, dict):
        raise ApecliError(f"{path}: expected a JSON object of class name → list of sentences")
    normalised = {_key(name): sentences for name, sentences in data.items()}
    prompts: dict[str, list[str]] = {}
    for name in class_names:
        sentences = data.get(name, normalised.get(_key(name)))
        if sentences is None:
            if not allow_missing:
                raise ApecliError(f"{path}: no prompts for class '{name}' (pass {Setting('allow_missing', True)} to use "
                                  "templates alone)", Setting("allow_missing", True), path=path)
            continue
        if not isinstance(sentences, list) or not all(isinstance(s, str) for s in sentences):
            raise ApecliError(f"{path}: prompts of '{name}' are not a list of strings")
        prompts[name] = sentences
    return prompts


def _key(name: str) -> str:
    return name.replace("_", " ").strip().lower()
