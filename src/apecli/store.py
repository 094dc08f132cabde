"""The artifact store: HDF5 files that say what they are, where they came from, and what they hold.

This is the only module that touches h5py. Every artifact is one HDF5 file whose root attributes give
the format name and version, its kind, a content id and its parents; every dataset in it carries an
``encoding-type`` and ``encoding-version`` attribute. The format is specified in docs/cache-format.md.
Writes go to a temporary file in the destination folder, then ``os.replace``: a reader never sees a
half-written artifact.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import re
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping

import numpy as np

from apecli.errors import ApecliError, InputError, Setting, SettingError, first_line
from apecli.files import replacing
from apecli.version import __version__

FORMAT_NAME = "apecli"
FORMAT_VERSION = (1, 0)
ENCODING_VERSION = "1.0"
_IMAGES = itertools.count()  # the in-memory files write_artifact makes, each by a name of its own


@dataclass(frozen=True)
class ParentRef:
    """A link from an artifact to one it was computed from."""

    kind: str
    path: str  # relative to the child's folder when possible, else absolute
    content_id: str

    def to_json(self) -> dict[str, str]:
        return {"kind": self.kind, "path": self.path, "content_id": self.content_id}


@dataclass(frozen=True)
class Artifact:
    """An opened artifact: its header is read, its arrays are read on demand with :meth:`read`."""

    path: Path
    kind: str
    content_id: str
    format_version: str
    metadata: Mapping[str, Any]
    parents: tuple[ParentRef, ...]
    names: tuple[str, ...]
    shapes: Mapping[str, tuple[tuple[int, ...], str]] = field(default_factory=dict)  # name → (shape, dtype)
    created: str = ""  # when and by what it was written, as its root attributes say
    writer: str = ""

    def __contains__(self, name: str) -> bool:
        return name in self.names

    def read(self, name: str) -> np.ndarray:
        """Read one array (strings come back as a numpy array of ``str``)."""
        if name not in self.names:
            raise InputError(self.path, f"has no '{name}' (holds: {', '.join(self.names)})")
        import h5py

        try:
            with h5py.File(self.path, "r") as handle:
                dataset = handle[name]
                if dataset.attrs.get("encoding-type") == "string-array":
                    return np.array(dataset.asstr()[()], dtype=str)
                return dataset[()]
        except (OSError, KeyError, UnicodeDecodeError, ValueError) as error:
            raise InputError(self.path, f"cannot read '{name}' ({first_line(error)}); the file may be truncated") from None

    def parent(self, kind: str, index: int = 0) -> "Artifact":
        """Open this artifact's parent of ``kind`` (the ``index``-th of them, in recorded order), refusing it
        if it changed since this one was written."""
        refs = [ref for ref in self.parents if ref.kind == kind]
        if index >= len(refs):
            raise InputError(self.path, f"records {'no' if not refs else f'only {len(refs)}'} parent"
                              f"{'s' if len(refs) > 1 else ''} of kind '{kind}'")
        return _open_parent(self, refs[index])


def content_id(kind: str, arrays: Mapping[str, np.ndarray], metadata: Mapping[str, Any], parents: Iterable[ParentRef]) -> str:
    """A hash of everything an artifact says, so equal inputs and settings give the same id (the recipe is
    in docs/cache-format.md; :func:`recomputed_id` follows it over a written file)."""
    digest = _header_digest(kind, _dumps(metadata), parents)
    for name in sorted(arrays):
        array = np.asarray(arrays[name])
        _digest_array(digest, name, array.dtype, array.shape, [array])
    return digest.hexdigest()[:16]


def _header_digest(kind: str, metadata: str, parents: Iterable[ParentRef]):
    digest = hashlib.sha256()
    digest.update(kind.encode())
    digest.update(metadata.encode())
    for ref in parents:
        digest.update(ref.kind.encode() + ref.content_id.encode())
    return digest


def _digest_array(digest, name: str, dtype: np.dtype, shape: tuple[int, ...], blocks: Iterable[np.ndarray]) -> None:
    """Add one array to the hash: its name, then its strings as a JSON list, or its dtype, shape and bytes
    in C order (``blocks``: the array whole, or its consecutive slices along the first axis)."""
    digest.update(name.encode())
    if dtype.kind in "US":
        digest.update(_dumps([str(x) for block in blocks for x in np.asarray(block).ravel()]).encode())
    else:
        digest.update(f"{dtype.str}{tuple(shape)}".encode())
        for block in blocks:
            digest.update(np.ascontiguousarray(block).tobytes())


def in_store(store: str | os.PathLike[str], dataset: str | None, stem: str) -> Callable[[str], Path]:
    """A destination in the store folder: ``STORE/DATASET/STEM-ID.h5``, named by the content id. A dataset
    name or a stem that is not one visible file name (a path, '..', a hidden name, a control character:
    names may come from files) is refused, and so is a store path with a control character, which would
    break the next command in a pipe."""
    folder = dataset or "unnamed"
    if not isinstance(folder, str) or not plain_name(folder):
        raise SettingError("dataset", dataset, f"dataset name '{shown(dataset)}' is not a folder name the store can "
                                               "use: give one without '/', '\\', control characters or a leading '.'")
    if not plain_name(stem):
        raise ApecliError(f"'{shown(stem)}' is not a file name the store can use (a name read from a file?)")
    if _CONTROL.search(str(store)):
        raise SettingError("store", str(store), f"the store folder '{shown(store)}' has a control character in its "
                                                "path, which would break the path printed for the next command")
    return lambda cid: Path(store) / folder / f"{stem}-{cid[:12]}.h5"


_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def shown(name: Any) -> str:
    """A name for a one-line message: control characters escaped (a newline as ``\\n``)."""
    return _CONTROL.sub(lambda match: match.group(0).encode("unicode_escape").decode(), str(name))


def plain_name(name: str) -> bool:
    """Whether ``name`` is one visible file name: no folder separator, no control character, no leading
    '.', at most 200 characters."""
    return bool(name) and len(name) <= 200 and not name.startswith(".") and "/" not in name and "\\" not in name \
        and not _CONTROL.search(name)


def write_artifact(
    destination: str | os.PathLike[str] | Callable[[str], Path],
    kind: str,
    arrays: Mapping[str, np.ndarray],
    metadata: Mapping[str, Any],
    parents: Iterable[Artifact] = (),
) -> Artifact:
    """Write an artifact atomically and return it opened. Array names may contain '/' (HDF5 groups).

    ``destination`` is a file path, or a function of the content id that returns one (see
    :func:`in_store`). An identical artifact already at that path is kept as it is.
    """

    parents = tuple(parents)
    cid = content_id(kind, arrays, metadata, [ParentRef(p.kind, "", p.content_id) for p in parents])
    path = Path(destination(cid) if callable(destination) else destination)
    path.parent.mkdir(parents=True, exist_ok=True)
    refs = tuple(ParentRef(p.kind, _relative(p.path, path.parent), p.content_id) for p in parents)
    existing = _identical(path, kind, cid)
    if existing is not None:
        return existing
    if not os.access(path.parent, os.W_OK):
        raise OSError(13, "Permission denied", str(path.parent))
    with replacing(path) as temporary:
        image = _image(kind, cid, arrays, metadata, refs)
        free = _free_bytes(path.parent)
        if free is not None and len(image) > free:
            raise ApecliError(f"no space left on {path.parent} (needs about {_size(len(image))}, {_size(free)} free)",
                              path=path)
        with open(temporary, "wb") as handle:
            handle.write(image)
    return open_artifact(path)


def _identical(path: Path, kind: str, cid: str) -> Artifact | None:
    """The artifact already at ``path`` when its header and its contents are those to write (made again:
    it is the newest of its kind now), else None (it is replaced: another one, or one edited in place)."""
    try:
        existing = open_artifact(path, [kind])
        if existing.content_id != cid or recomputed_id(existing) != cid:
            return None
    except ApecliError:
        return None
    try:
        os.utime(path)
    except OSError:  # a read-only store: the artifact is there all the same
        pass
    return existing


def _image(kind: str, cid: str, arrays: Mapping[str, np.ndarray], metadata: Mapping[str, Any],
           refs: tuple[ParentRef, ...]) -> bytes:
    """The artifact's file, made in memory (HDF5's core driver, nothing on disk): a full disk then fails a
    plain write of it, never HDF5's own writes halfway, which left the library in a state that crashed
    the process."""
    import h5py

    handle = h5py.File(f"apecli-image-{os.getpid()}-{next(_IMAGES)}.h5", "w", driver="core", backing_store=False)
    try:
        handle.attrs["format"] = FORMAT_NAME
        handle.attrs["format_version"] = "%d.%d" % FORMAT_VERSION
        handle.attrs["kind"] = kind
        handle.attrs["content_id"] = cid
        handle.attrs["created"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
        handle.attrs["writer"] = f"apecli {__version__}"
        handle.attrs["metadata"] = _dumps(metadata)
        handle.attrs["parents"] = _dumps([ref.to_json() for ref in refs])
        for name, value in arrays.items():
            array = np.asarray(value)
            if array.dtype.kind in "US":
                dataset = handle.create_dataset(name, data=array.astype(object), dtype=h5py.string_dtype())
                dataset.attrs["encoding-type"] = "string-array"
            else:
                dataset = handle.create_dataset(name, data=array)
                dataset.attrs["encoding-type"] = "array"
            dataset.attrs["encoding-version"] = ENCODING_VERSION
        handle.flush()
        return handle.id.get_file_image()
    finally:
        handle.close()


def _free_bytes(folder: Path) -> int | None:
    import shutil

    try:
        return shutil.disk_usage(folder).free
    except OSError:
        return None


def _size(count: int) -> str:
    """A byte count in words: ``3.3 MB``, ``20 kB``."""
    return f"{count / 1e6:,.1f} MB" if count >= 1e6 else f"{count / 1e3:.0f} kB"


def open_artifact(path: str | os.PathLike[str], kinds: Iterable[str] | None = None) -> Artifact:
    """Open an artifact's header, checked against the format (docs/cache-format.md, "What a reader
    checks"): a missing, foreign, newer, damaged or unexpected-kind file is refused in one line that names
    the file and the field. Only a regular file is opened (a FIFO would hang the reader)."""
    import h5py

    path = Path(path)
    _check_regular(path)
    try:
        with h5py.File(path, "r") as handle:
            attrs = _root_attributes(path, handle)
            version = _format_version(path, attrs)
            shapes = _datasets(path, handle)
    except OSError as error:
        raise InputError(path, f"not a readable HDF5 artifact ({first_line(error)})") from None
    missing = [name for name in ("kind", "content_id") if not attrs[name]]
    if missing:
        raise InputError(path, f"its header is damaged (no {' or '.join(missing)})")
    kind = attrs["kind"]
    if not re.fullmatch(r"[a-z][a-z-]{0,39}", kind):
        raise InputError(path, f"its header is damaged (kind '{shown(kind)}' is not a kind's name)")
    if not re.fullmatch(r"[0-9a-f]{16}", attrs["content_id"]):
        raise InputError(path, f"its header is damaged (content_id '{shown(attrs['content_id'])}' is not 16 hex digits)")
    wanted = tuple(kinds) if kinds is not None else None
    if wanted is not None and kind not in wanted:
        raise InputError(path, f"is an artifact of kind '{kind}', expected {' or '.join(repr(k) for k in wanted)}")
    metadata, parents = _json_field(path, attrs, "metadata", dict), _json_field(path, attrs, "parents", list)
    return Artifact(path, kind, attrs["content_id"], version, metadata, _parent_refs(path, parents),
                    tuple(sorted(shapes)), dict(sorted(shapes.items())), attrs["created"], attrs["writer"])


def _format_version(path: Path, attrs: Mapping[str, str]) -> str:
    """The format version of an apecli artifact this apecli reads, or one clear refusal."""
    if attrs["format"] != FORMAT_NAME:
        raise InputError(path, f"not an apecli artifact (no 'format = {FORMAT_NAME}' attribute)")
    version = attrs["format_version"]
    if not re.fullmatch(r"\d+\.\d+", version):
        raise InputError(path, f"unreadable format version '{shown(version)}'")
    if int(version.split(".")[0]) > FORMAT_VERSION[0]:
        raise InputError(path, f"written in format {version} by a newer apecli; this apecli {__version__} reads "
                               f"format {FORMAT_VERSION[0]}.x: upgrade apecli")
    return version


def _check_regular(path: Path) -> None:
    """Refuse, in one line, what is not a regular file that can be read."""
    import stat

    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise InputError(path, "no such file") from None
    except OSError as error:  # a symbolic link in a loop, a folder that may not be entered
        raise InputError(path, f"cannot be read ({error.strerror or first_line(error)})") from None
    if stat.S_ISDIR(mode):
        raise InputError(path, "is a folder, not an artifact")
    if not stat.S_ISREG(mode):
        raise InputError(path, "is not a regular file (a FIFO, a device or a socket), not an artifact")
    try:
        with open(path, "rb"):
            pass
    except OSError as error:
        raise InputError(path, f"cannot be read ({error.strerror or first_line(error)})") from None


ROOT_TEXT = ("format", "format_version", "kind", "content_id", "created", "writer", "metadata", "parents")


def _root_attributes(path: Path, handle) -> dict[str, str]:
    """The root attributes the format defines, each as text ("" where absent), checked to be UTF-8 text."""
    found = {}
    for name in ROOT_TEXT:
        try:
            value = handle.attrs.get(name)
        except (UnicodeDecodeError, OSError, TypeError, ValueError):
            raise InputError(path, f"its header is damaged ('{name}' is not UTF-8 text)") from None
        if isinstance(value, bytes):
            try:
                value = value.decode("utf-8")
            except UnicodeDecodeError:
                raise InputError(path, f"its header is damaged ('{name}' is not UTF-8 text)") from None
        if value is not None and not isinstance(value, str):
            raise InputError(path, f"its header is damaged ('{name}' is {type(value).__name__}, where the format "
                                   "says text)")
        found[name] = value or ""
    return found


def _json_field(path: Path, attrs: Mapping[str, str], name: str, kind: type) -> Any:
    """A root attribute that holds JSON of ``kind`` (an object, a list); the format's default where absent."""
    try:
        value = json.loads(attrs[name] or ("{}" if kind is dict else "[]"))
    except ValueError:
        raise InputError(path, f"its header is damaged ('{name}' is not valid JSON)") from None
    if not isinstance(value, kind):
        raise InputError(path, f"its header is damaged ('{name}' is JSON but not "
                               f"{'an object' if kind is dict else 'a list'})")
    return value


def _parent_refs(path: Path, parents: list) -> tuple[ParentRef, ...]:
    refs = []
    for number, entry in enumerate(parents):
        if not (isinstance(entry, dict) and set(entry) == {"kind", "path", "content_id"}
                and all(isinstance(value, str) and value and not _CONTROL.search(value) for value in entry.values())):
            raise InputError(path, f"its header is damaged (parent {number} is not a kind, a path and a content id, "
                                   "each text)")
        refs.append(ParentRef(entry["kind"], entry["path"], entry["content_id"]))
    return tuple(refs)


def _datasets(path: Path, handle) -> dict[str, tuple[tuple[int, ...], str]]:
    """Every dataset's shape and element type, each checked: held in the file whole (no external file, no
    link to elsewhere, none declared larger than what the file stores), of the encoding it says."""
    import h5py

    links: list[tuple[str, object]] = []
    handle.visititems_links(lambda name, link: links.append((name, link)))  # nothing raised inside h5py's walk
    shapes: dict[str, tuple[tuple[int, ...], str]] = {}
    for name, link in links:
        if not isinstance(link, h5py.HardLink):
            raise InputError(path, f"its '{shown(name)}' is a link to elsewhere ({type(link).__name__}), which the "
                                   "format does not allow")
        item = handle[name]
        if isinstance(item, h5py.Dataset):
            shapes[name] = _checked_dataset(path, name, item)
    return shapes


def _checked_dataset(path: Path, name: str, dataset) -> tuple[tuple[int, ...], str]:
    encoding = dataset.attrs.get("encoding-type")
    encoding = encoding.decode("utf-8", "replace") if isinstance(encoding, bytes) else encoding
    where = f"its dataset '{shown(name)}'"
    if encoding not in ("array", "string-array"):
        raise InputError(path, f"{where} has no encoding-type of the format (array or string-array)")
    if dataset.shape is None:
        raise InputError(path, f"{where} is empty (no shape)")
    if dataset.external:
        raise InputError(path, f"{where} keeps its values in another file, which the format does not allow")
    size = int(np.prod(dataset.shape, dtype=np.int64)) if dataset.shape else 1
    stored = dataset.id.get_storage_size()
    if encoding == "string-array":
        if dataset.dtype.kind != "O" or (size and not stored):
            raise InputError(path, f"{where} is not the strings it says it holds")
        return tuple(dataset.shape), "str"
    if dataset.dtype.kind not in "biuf":
        raise InputError(path, f"{where} holds {dataset.dtype}, not numbers")
    if stored < size * dataset.dtype.itemsize:
        raise InputError(path, f"{where} declares {size * dataset.dtype.itemsize:,} bytes but the file holds "
                               f"{stored:,} of them (a sparse, compressed or damaged array)")
    return tuple(dataset.shape), str(dataset.dtype)


def opened(source: "str | os.PathLike[str] | Artifact", kind: str) -> Artifact:
    """The artifact ``source`` is, or the one its path opens as, refused in one line unless of ``kind``."""
    artifact = source if isinstance(source, Artifact) else open_artifact(source, [kind])
    if artifact.kind != kind:
        raise InputError(artifact.path, f"is an artifact of kind '{artifact.kind}', expected '{kind}'")
    return artifact


def scan(folder: str | os.PathLike[str]) -> Iterator[tuple[Path, "Artifact | ApecliError"]]:
    """Every file under ``folder`` that looks like an artifact (``*.h5``, not hidden), in path order, with
    the artifact its header opens as, or the error that says why it does not open."""
    root = Path(folder)
    for candidate in sorted(root.rglob("*.h5")) if root.is_dir() else []:
        if candidate.name.startswith(".") or candidate.is_dir():
            continue
        try:  # a FIFO, a symbolic link in a loop: named in their errors, never opened
            yield candidate, open_artifact(candidate)
        except ApecliError as error:
            yield candidate, error


def list_artifacts(store: Path, kinds: Iterable[str] | None = None) -> list[Artifact]:
    """Every apecli artifact under the store folder (of ``kinds``, if given), oldest first."""
    wanted = tuple(kinds) if kinds is not None else None
    found = [(path.stat().st_mtime, opened) for path, opened in scan(store)
             if isinstance(opened, Artifact) and (wanted is None or opened.kind in wanted)]
    return [artifact for _, artifact in sorted(found, key=lambda item: (item[0], str(item[1].path)))]


class Staleness(str):
    """Why an artifact cannot be used now. ``absent_folder``: the folder of a missing ancestor, where that
    folder itself is not there (it may be on a drive that is not mounted). ``damaged``: an ancestor is
    there but cannot be read (its permissions, a truncated or replaced file): it is not stale, since its
    parent may hold its content still; ``verify`` says more, and ``gc`` keeps it."""

    absent_folder: Path | None = None
    damaged: bool = False

    @classmethod
    def of(cls, reason: str, absent_folder: Path | None = None, damaged: bool = False) -> "Staleness":
        staleness = cls(reason)
        staleness.absent_folder, staleness.damaged = absent_folder, damaged
        return staleness


def stale_reason(artifact: Artifact, known: dict[Path, Staleness | None] | None = None) -> Staleness | None:
    """Why an artifact can no longer be used, or None: a parent is missing or changed since it was written
    (stale), cannot be read (``damaged``), or is itself either. ``known`` caches answers by resolved path
    across calls. The ancestry is walked without recursion, so a chain of any length is fine."""
    known = {} if known is None else known
    found: dict[Path, list[tuple[Artifact | None, Staleness]]] = {}
    finished: list[tuple[Path, Artifact]] = []  # parents before their children
    stack: list[tuple[Artifact, bool]] = [(artifact, False)]
    while stack:
        node, expanded = stack.pop()
        key = node.path.resolve()
        if expanded:
            finished.append((key, node))
            continue
        if key in known or key in found:  # known, or reached already (a hand-made cycle stops here)
            continue
        found[key] = [_find_parent(node, ref) for ref in node.parents]
        stack.append((node, True))
        stack += [(parent, False) for parent, _ in reversed(found[key]) if parent is not None]
    for key, node in finished:
        known[key] = None
        for parent, problem in found[key]:
            inherited = problem if parent is None else known.get(parent.path.resolve())
            if parent is None:
                known[key] = problem
            elif inherited is not None:
                what = "depends on a file that cannot be read" if inherited.damaged else "is stale"
                known[key] = Staleness.of(f"its parent {parent.path} {what}", inherited.absent_folder,
                                          inherited.damaged)
            if known[key] is not None:
                break
    return known[artifact.path.resolve()]


def out_of_reach(reason: Staleness, store: Path) -> bool:
    """Whether a stale artifact may only be out of reach, not gone: its missing ancestor's whole folder is
    absent and lies outside the store folder (a drive not mounted, say). gc keeps such artifacts."""
    return reason.absent_folder is not None and Path(store).resolve() not in reason.absent_folder.resolve().parents


@contextmanager
def exclusive(lock: Path, busy: str) -> Iterator[None]:
    """Hold an advisory lock on the file ``lock`` (made if missing) while the block runs, or refuse with
    the message ``busy`` when another process holds it. The lock goes with the process however it ends
    (``flock``); where the OS has no ``fcntl`` nothing is locked."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    with open(lock, "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise ApecliError(busy) from None
        yield


def in_use(folder: Path) -> bool:
    """Whether a process holds one of the locks (``.lock-*``) in ``folder`` now."""
    for lock in Path(folder).glob(".lock-*"):
        try:
            with exclusive(lock, ""):
                pass
        except ApecliError:
            return True
    return False


TEMPORARY_AGE_S = 3600  # a temporary file this old belongs to a write that was killed
_TEMPORARY = re.compile(r"\.[\w.-]+-[0-9a-f]{12}\.h5\.\d+\.tmp")  # .STEM-ID.h5.PID.tmp, as write_artifact names them
_EXTRACTION = re.compile(r"\.extract-[0-9a-f]{16}")  # an extraction's work folder, named by its request


def collect_garbage(store: Path, dry_run: bool = False, work: bool = False,
                    now: float | None = None) -> tuple[list[tuple[Path, str]], list[tuple[Path, str]]]:
    """Remove what nothing can use from a store folder: stale artifacts (see :func:`stale_reason`) and
    temporary files of writes killed over an hour ago; with ``work``, also the folders of interrupted
    extractions (their resume state), never one that a running extraction holds. A stale artifact whose
    missing ancestor's folder is absent outside the store is kept: that may be a drive not mounted.
    Returns (removed, kept), each path with why; ``dry_run`` removes nothing. Any other file is left alone."""
    import shutil
    import time

    folder = Path(store)
    if not folder.is_dir():
        raise InputError(folder, "no such folder")
    known: dict[Path, Staleness | None] = {}
    stale = [(a.path, reason) for a in list_artifacts(folder) if (reason := stale_reason(a, known)) is not None]
    removed: list[tuple[Path, str]] = []
    kept: list[tuple[Path, str]] = []
    for path, reason in stale:
        if reason.damaged:
            kept.append((path, f"{reason}: kept, since its ancestor may hold its content still (see verify)"))
        elif out_of_reach(reason, folder):
            kept.append((path, f"{reason}; {reason.absent_folder} lies outside {folder} (a drive not mounted?): "
                               "remove it by hand if that folder is gone for good"))
        else:
            removed.append((path, reason))
    cutoff = (time.time() if now is None else now) - TEMPORARY_AGE_S
    extractions = sorted(p for p in folder.rglob(".extract-*") if p.is_dir() and _EXTRACTION.fullmatch(p.name))
    removed += [(p, "a temporary file of a write that did not finish") for p in sorted(folder.rglob(".*.tmp"))
                if _TEMPORARY.fullmatch(p.name) and p.is_file() and p.stat().st_mtime < cutoff
                and not any(e in p.parents for e in extractions)]
    running = [e for e in extractions if in_use(e)]
    kept += [(e, "an extraction running now") for e in running]
    interrupted = [(e, f"an interrupted extraction (chunks saved: {sum(1 for _ in e.glob('*.npz'))})")
                   for e in extractions if e not in running]
    if work:
        removed += interrupted
    else:
        kept += [(path, f"{reason}: re-run its extraction to resume, or pass {Setting('work', True)} to remove it")
                 for path, reason in interrupted]
    if not dry_run:
        for path, _ in removed:
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
    return removed, kept


VERIFY_BLOCK_BYTES = 1 << 26  # how much of an array recomputed_id reads at a time


def recomputed_id(artifact: Artifact) -> str:
    """The content id of what the file holds now: its metadata and parents as its header records them, and
    every array read back from disk (in blocks, so a large one is never held whole)."""
    import h5py

    try:
        with h5py.File(artifact.path, "r") as handle:
            digest = _header_digest(artifact.kind, _text(handle.attrs.get("metadata", "{}")), artifact.parents)
            for name in artifact.names:
                dataset = handle[name]
                if dataset.attrs.get("encoding-type") == "string-array":
                    _digest_array(digest, name, np.dtype(str), dataset.shape, [np.array(dataset.asstr()[()], dtype=str)])
                    continue
                rows = max(1, VERIFY_BLOCK_BYTES // max(1, dataset.dtype.itemsize * int(np.prod(dataset.shape[1:]))))
                blocks = ((dataset[start:start + rows] for start in range(0, dataset.shape[0], rows))
                          if dataset.ndim else [dataset[()]])
                _digest_array(digest, name, dataset.dtype, dataset.shape, blocks)
    except (OSError, KeyError) as error:
        raise InputError(artifact.path, f"cannot be read whole ({first_line(error)}); the file may be truncated") from None
    return digest.hexdigest()[:16]


@dataclass(frozen=True)
class Verified:
    """One artifact checked by :func:`verify`: ``problem`` is None when its contents hash to its content id
    and its ancestry is intact; else it says what is wrong."""

    path: Path
    kind: str
    content_id: str
    recomputed: str | None  # None where the file could not be read whole
    problem: str | None


def verify(artifacts: Iterable[Artifact]) -> list[Verified]:
    """Hash each artifact's contents again, and those of every ancestor it records, and compare each with
    the content id in its header: an array or setting edited in place, or a damaged file, keeps its id
    and so passes the parent check that commands make; this finds it. An artifact whose parent is missing
    or changed, or itself fails, fails too."""
    from collections import deque

    queue, checked = deque(artifacts), {}
    while queue:
        artifact = queue.popleft()
        key = artifact.path.resolve()
        if key in checked:
            continue
        try:
            recomputed, problem = recomputed_id(artifact), None
        except ApecliError as error:
            recomputed, problem = None, str(error).removeprefix(f"{artifact.path}: ")
        if recomputed is not None and recomputed != artifact.content_id:
            problem = (f"modified since it was written: its contents hash to {recomputed}, its header says "
                       f"{artifact.content_id}; re-run the command that made it")
        parents = []
        for ref in artifact.parents:
            parent, missing = _find_parent(artifact, ref)
            if parent is None:
                problem = problem or missing
            else:
                parents.append(parent.path.resolve())
                queue.append(parent)
        checked[key] = (Verified(artifact.path, artifact.kind, artifact.content_id, recomputed, problem), parents)
    failing = _failing_ancestors(checked)
    return [replace(item, problem=f"its ancestor {failing[key]} fails verification") if failing.get(key) else item
            for key, (item, _) in checked.items()]


def _failing_ancestors(checked: Mapping[Path, tuple[Verified, list[Path]]]) -> dict[Path, Path | None]:
    """For each checked artifact, the first ancestor with a problem of its own, or None (see :func:`_first_failing`)."""
    return {start: _first_failing(checked, start) for start in checked}


def _first_failing(checked: Mapping[Path, tuple[Verified, list[Path]]], start: Path) -> Path | None:
    """The first ancestor of ``start`` with a problem of its own, depth first and parents in the order each
    artifact records them; without recursion (a chain of any length), and a hand-made cycle not followed."""
    stack, seen = [iter(checked[start][1])], {start}
    while stack:
        parent = next(stack[-1], None)
        if parent is None:
            stack.pop()
            continue
        if parent in seen:
            continue
        seen.add(parent)
        if checked[parent][0].problem:
            return checked[parent][0].path
        stack.append(iter(checked[parent][1]))
    return None


def unreadable_in(folder: Path) -> list[Verified]:
    """The files under a folder that look like artifacts (``*.h5``, not hidden) but do not open as one,
    each as a failed verification: a store's damaged files, which listing the store passes over."""
    return [Verified(path, "?", "", None, str(opened).removeprefix(f"{path}: "))
            for path, opened in scan(folder) if isinstance(opened, ApecliError)]


def newest_artifact(store: Path, kinds: Iterable[str]) -> Artifact:
    """The most recently written artifact of one of ``kinds`` anywhere under the store folder."""
    wanted = tuple(kinds)
    found = list_artifacts(store, wanted)
    if not found:
        raise ApecliError(f"no {' or '.join(wanted)} artifact in {store}; give an input path or {Setting('store')}",
                          Setting("store"), path=store)
    return found[-1]


def _find_parent(child: Artifact, ref: ParentRef) -> tuple[Artifact | None, Staleness]:
    """A parent as recorded, or None and why not: missing, or another content (stale), or there but not
    readable as an artifact (damaged)."""
    candidates = [child.path.parent / ref.path, Path(ref.path)]  # where it was written; the path as given
    location = next((p for p in candidates if p.exists()), None)
    if location is None:
        recorded_folder = Path(os.path.normpath(candidates[0].parent))
        if recorded_folder.is_dir():
            return None, Staleness.of(f"its parent {ref.kind} artifact {ref.path} is missing")
        return None, Staleness.of(f"its parent {ref.kind} artifact {ref.path} is missing, and so is its folder "
                                  f"{recorded_folder}", recorded_folder)
    try:
        parent = open_artifact(location)
    except ApecliError as error:
        return None, Staleness.of(f"its parent {error}", damaged=True)
    if parent.kind != ref.kind:
        return None, Staleness.of(f"its parent {location}: is an artifact of kind '{parent.kind}', expected "
                                  f"'{ref.kind}'")
    if parent.content_id != ref.content_id:
        return None, Staleness.of(f"its parent {location} changed since it was written (content id {parent.content_id}, "
                                  f"expected {ref.content_id}); re-run the command that made {child.path.name}")
    return parent, Staleness.of("")


def _open_parent(child: Artifact, ref: ParentRef) -> Artifact:
    parent, problem = _find_parent(child, ref)
    if parent is None:
        raise InputError(child.path, str(problem))
    return parent


def _relative(target: Path, folder: Path) -> str:
    try:
        return os.path.relpath(Path(target).resolve(), Path(folder).resolve())
    except ValueError:  # another drive
        return str(Path(target).resolve())


def _dumps(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value) if value is not None else ""


