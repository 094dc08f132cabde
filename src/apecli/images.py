"""Reading images for the encoder: PIL decoding in loader workers, or batched JPEG decoding on the GPU.

The default, faithful path decodes with PIL and applies the model's own transforms (the protocol's
numbers depend on them). The transform is split where the image becomes a tensor (:class:`Pixels`):
loader workers resize and crop and hand over uint8 pixels, and the encoder's device scales and
normalises them, by lookup in a table the transform's own steps computed, so the values are the
transform's bit for bit. Workers hand over batches of a few dozen images, which the main process
joins into the encoder's batches, so encoding starts as soon as the first images are decoded.

``decode="gpu"`` reads raw bytes in threads and decodes the JPEGs of a batch together on the
encoder's device (nvJPEG on CUDA), then resizes and crops there as the model's evaluation transform
does, on a stream of its own so that decoding the next batch overlaps encoding this one; a file that
is not a JPEG, or that fails to decode that way, goes through PIL instead. It serves the evaluation
transform; augmented training views always use PIL. The JPEG decoder is TorchCodec's where it is
installed and works on the device, else torchvision's (deprecated since torchvision 0.29 in favour
of TorchCodec).

Either path can turn each photo upright by its EXIF orientation tag first (``upright``), as PIL's
``ImageOps.exif_transpose`` does; the device path reads the tag from the bytes and turns the decoded
tensor, or undoes the turn of a decoder that makes it unasked.
"""

from __future__ import annotations

import os
import warnings
from collections import deque
from dataclasses import dataclass, field, replace
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from apecli.errors import ApecliError

Item = tuple  # (index, the image as a tensor or its raw bytes, or None; why it could not be read, or None)


def readable(path: Path) -> str | None:
    """None when the image decodes, else why not."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            image.load()
        return None
    except (OSError, ValueError, SyntaxError) as error:  # PIL's ways of saying "not an image"
        return str(error).split("\n")[0] or type(error).__name__


def _open_rgb(path: Path, upright: bool = False):
    """The image as RGB; ``upright``: turned as its EXIF orientation tag says, as photo viewers show it."""
    from PIL import Image

    with Image.open(path) as image:
        orientation = _orientation(image) if upright else 1
        return (image.transpose(TRANSPOSES[orientation]) if orientation in TRANSPOSES else image).convert("RGB")


def _orientation(image) -> int:
    """A PIL image's EXIF orientation, 1 where it has none or its EXIF cannot be read (as stored, then)."""
    try:
        with warnings.catch_warnings():  # PIL warns of a damaged EXIF block, image after image
            warnings.simplefilter("ignore")
            return int(image.getexif().get(ORIENTATION, 1))
    except Exception:  # noqa: BLE001 - a damaged EXIF block does not make the image unreadable
        return 1


ORIENTATION = 0x0112  # the EXIF tag
# EXIF orientation → the PIL transpose that turns the stored pixels upright, by Image.Transpose's value:
# FLIP_LEFT_RIGHT 0, FLIP_TOP_BOTTOM 1, ROTATE_90 2, ROTATE_180 3, ROTATE_270 4, TRANSPOSE 5, TRANSVERSE 6
TRANSPOSES = {2: 0, 3: 3, 4: 1, 5: 5, 6: 4, 7: 6, 8: 2}


def exif_orientation(data) -> int:
    """The EXIF orientation (1 to 8) that JPEG bytes carry, 1 where they carry none or cannot say.

    Reads the application segments that open the file (where the Exif standard puts its APP1 segment)
    and in an APP1 ``Exif`` segment the first directory of its TIFF header: a few hundred bytes,
    without decoding anything.
    """
    head = memoryview(data if isinstance(data, bytes) else np.ascontiguousarray(data, dtype=np.uint8)).cast("B")
    if head[:2] != b"\xff\xd8":
        return 1
    at = 2
    while at + 4 <= len(head) and head[at] == 0xFF:
        marker, length = head[at + 1], int.from_bytes(head[at + 2 : at + 4], "big")
        if not (0xE0 <= marker <= 0xEF or marker == 0xFE) or length < 2:  # past the APPn and comments
            break
        if marker == 0xE1 and head[at + 4 : at + 10] == b"Exif\0\0":
            return _tiff_orientation(head[at + 10 : at + 2 + length])
        at += 2 + length
    return 1


def _tiff_orientation(tiff: memoryview) -> int:
    order = {b"II": "little", b"MM": "big"}.get(bytes(tiff[:2]))
    if order is None or len(tiff) < 8:
        return 1
    directory = int.from_bytes(tiff[4:8], order)
    count = int.from_bytes(tiff[directory : directory + 2], order) if directory + 2 <= len(tiff) else 0
    for entry in range(directory + 2, min(directory + 2 + 12 * count, len(tiff) - 11), 12):
        if int.from_bytes(tiff[entry : entry + 2], order) == ORIENTATION:
            value = int.from_bytes(tiff[entry + 8 : entry + 10], order)  # a SHORT, first in its value field
            return value if 1 <= value <= 8 else 1
    return 1


UNDO = {6: 8, 8: 6}  # the orientation whose turn undoes each one's (the others undo themselves)


def _upright(image, orientation: int):
    """A C×H×W tensor as stored, turned as EXIF ``orientation`` says (what PIL's transposes do)."""
    import torch

    if orientation in (5, 6, 7, 8):  # a quarter turn: height and width swap
        image = image.transpose(-2, -1)
        orientation = {5: 1, 6: 2, 7: 3, 8: 4}[orientation]
    if orientation == 2:
        return torch.flip(image, (-1,))
    if orientation == 3:
        return torch.flip(image, (-2, -1))
    if orientation == 4:
        return torch.flip(image, (-2,))
    return image


class UpToTensor:
    """The steps of a transform before its ToTensor, then the image as uint8 C×H×W (what ToTensor reads)."""

    def __init__(self, steps: Sequence[Callable]) -> None:
        self.steps = list(steps)

    def __call__(self, image):
        import torch

        for step in self.steps:
            image = step(image)
        if image.mode != "RGB":
            image = image.convert("RGB")
        return torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1).contiguous()


@dataclass(frozen=True)
class Pixels:
    """A model's transform split where the image becomes a tensor.

    ``on_image`` (PIL image → tensor) runs in loader workers: the steps before ToTensor (resize, crop,
    flip), giving uint8 C×H×W, a quarter of float32's bytes to hand over and pin. :meth:`model_input`
    does ToTensor's scaling and Normalize on the encoder's device, by lookup in ``table``: each channel's
    256 values, computed once by those very steps on the CPU, so the result is the transform's bit for
    bit on any device. A transform that does not end in ToTensor then Normalize runs whole in the
    workers (``table`` None) and its tensors pass through.
    """

    on_image: Callable
    table: Any = None  # 3 × 256 float32 tensor
    copies: dict = field(default_factory=dict, compare=False, repr=False)  # device → (flat table, row offsets)

    def model_input(self, images, device):
        """A batch (… × 3 × H × W) of ``on_image``'s tensors as the model's input on ``device``."""
        import torch

        images = images.to(device, non_blocking=True)
        if self.table is None:
            return images
        if str(device) not in self.copies:
            offsets = torch.arange(0, 3 * 256, 256, device=device).view(3, 1, 1)  # channel c reads row c
            self.copies[str(device)] = self.table.reshape(-1).to(device), offsets
        table, offsets = self.copies[str(device)]
        return table[images.to(torch.int64) + offsets]


def split_transform(transform: Callable) -> Pixels:
    """:class:`Pixels` for a torchvision ``Compose`` that ends in ToTensor then Normalize (open_clip's and
    APE's transforms do), else the whole transform in the workers."""
    from PIL import Image
    from torchvision import transforms

    steps = list(getattr(transform, "transforms", ()))
    at = next((n for n, step in enumerate(steps) if isinstance(step, transforms.ToTensor)), None)
    if at is None or not all(isinstance(step, transforms.Normalize) for step in steps[at + 1:]):
        return Pixels(transform)
    ramp = np.repeat(np.arange(256, dtype=np.uint8)[None, :, None], 3, axis=2)  # 1 × 256 pixels: every value
    table = transforms.Compose(steps[at:])(Image.fromarray(ramp, "RGB"))
    return Pixels(UpToTensor(steps[:at]), table.reshape(3, 256).float().contiguous())


class PilImages:
    """A map-style dataset of (index, transformed tensor or None, error) for a torch DataLoader.

    With ``views`` > 0 each item is ``views`` augmentations of the image, each seeded by the image's
    index and the view's number, so results do not depend on batching or workers.
    """

    def __init__(self, paths: Sequence[Path], transform: Callable, views: int, seed: int, upright: bool = False) -> None:
        self.paths, self.transform, self.views, self.seed, self.upright = paths, transform, views, seed, upright

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> Item:
        import torch

        try:
            image = _open_rgb(self.paths[index], self.upright)
        except (OSError, ValueError, SyntaxError) as error:
            return index, None, str(error).split("\n")[0] or type(error).__name__
        if self.views == 0:
            return index, self.transform(image), None
        tensors = []
        for view in range(self.views):
            torch.manual_seed((self.seed * 1_000_003 + index) * 1_009 + view)  # the view's own augmentation
            tensors.append(self.transform(image))
        return index, torch.stack(tensors), None


class RawBytes:
    """A map-style dataset of (index, the file's bytes as a uint8 numpy array or None, error), which
    :func:`read_batches` reads in threads."""

    def __init__(self, paths: Sequence[Path]) -> None:
        self.paths = paths

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> Item:
        try:  # readinto releases the GIL while it reads (numpy's fromfile held it, and the encoding thread waited)
            with open(self.paths[index], "rb", buffering=0) as file:
                data = bytearray(os.fstat(file.fileno()).st_size)
                size = file.readinto(data)
            return index, np.frombuffer(data, dtype=np.uint8, count=size), None
        except OSError as error:
            return index, None, str(error).split("\n")[0] or type(error).__name__


def read_batches(paths: Sequence[Path], batches: Sequence[Sequence[int]], threads: int,
                 ahead: int = 3) -> Iterator["Batch"]:
    """Batches of raw bytes (:class:`RawBytes` items), read by ``threads`` threads of this process, the
    next ``ahead`` batches while one is used. File reads release the GIL, and no bytes cross a process
    boundary: a loader's worker processes pickle every file through a pipe, which held reading to about
    2,200 images/s on 16 cores, a quarter of what nvJPEG decodes."""
    from concurrent.futures import ThreadPoolExecutor

    source = RawBytes(paths)
    threads = max(1, threads)
    pool = ThreadPoolExecutor(threads, thread_name_prefix="apecli-read")
    queued: deque = deque()

    def read(indices: Sequence[int]) -> list[Item]:
        return [source[index] for index in indices]

    def submit(batch: Sequence[int]) -> list:  # a share of the batch a thread: few tasks, little time under the GIL
        share = max(1, -(-len(batch) // threads))
        return [pool.submit(read, batch[start:start + share]) for start in range(0, len(batch), share)]

    try:
        for batch in batches:
            queued.append(submit(batch))
            if len(queued) > ahead:
                yield Batch.collate([item for future in queued.popleft() for item in future.result()])
        while queued:
            yield Batch.collate([item for future in queued.popleft() for item in future.result()])
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


LOADER_TENSORS = 32  # about how many image tensors a loader worker hands over at a time


def pieces(batches: Sequence[Sequence[int]], views: int) -> list[list[int]]:
    """The batches cut into what a loader worker hands over at a time: about :data:`LOADER_TENSORS` tensors."""
    step = _piece_images(views)
    return [list(batch[start:start + step]) for batch in batches for start in range(0, len(batch), step)]


def _piece_images(views: int) -> int:
    return max(1, LOADER_TENSORS // max(views, 1))


def pil_batches(paths: Sequence[Path], batches: Sequence[Sequence[int]], transform: Callable, views: int, seed: int,
                workers: int, device, upright: bool = False) -> Iterator["Batch"]:
    """The given batches, decoded by PIL (``upright``: turned by their EXIF orientation) and ``transform``
    (see :class:`PilImages`) in ``workers`` loader processes (no more than there are pieces to decode), each
    on ``device``.

    Workers decode pieces of about :data:`LOADER_TENSORS` tensors, which are joined back into the
    batches here: with a whole batch a worker, 16 workers given 256 images each would deliver nothing
    for seconds, then everything at once, and the encoder would wait, then the workers.
    """
    import torch

    step, sampler = _piece_images(views), pieces(batches, views)
    loader = torch.utils.data.DataLoader(PilImages(paths, transform, views, seed, upright), batch_sampler=sampler,
                                         num_workers=min(workers, len(sampler)), collate_fn=Batch.collate,
                                         pin_memory=torch.device(device).type == "cuda")
    decoded = iter(loader)
    for batch in batches:
        yield Batch.join([next(decoded).to(device) for _ in range(0, len(batch), step)])


def decoded_batches(paths: Sequence[Path], batches: Sequence[Sequence[int]], threads: int, encoder,
                    pixels: Pixels, ahead: int = 2, upright: bool = False) -> Iterator["Batch"]:
    """The given batches read by :func:`read_batches` and decoded by :func:`decode_on_device` on the
    encoder's device, by a thread of their own, up to ``ahead`` batches before the one in use.

    The decoder blocks its thread until its batch is decoded, so decoding in the encoding thread left
    the encoder without queued work meanwhile. On CUDA the decoding thread also has a stream of its own,
    of higher priority than the encoder's (its kernels are short and the encoder waits on them), and the
    encoder's stream waits for each batch's event there.
    """
    import queue
    import threading
    from contextlib import nullcontext

    import torch

    device = encoder.device
    side = torch.cuda.Stream(device, priority=-1) if device.type == "cuda" else None
    ready: queue.Queue = queue.Queue(maxsize=max(1, ahead))
    stop = threading.Event()

    def offer(item) -> bool:
        """Put ``item`` for the consumer; False once it has stopped."""
        while not stop.is_set():
            try:
                ready.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def decode() -> None:
        reading = read_batches(paths, batches, threads)
        outcome: tuple = (None, None, None)  # the end
        try:
            with torch.cuda.stream(side) if side is not None else nullcontext():
                for batch in reading:
                    batch = decode_on_device(batch, paths, encoder, pixels, upright)
                    done = None
                    if side is not None:
                        done = torch.cuda.Event()
                        done.record(side)
                    if not offer((batch, done, None)):
                        return
        except BaseException as failure:  # noqa: BLE001 - raised again in the consumer's thread
            outcome = (None, None, failure)
        finally:
            reading.close()
        offer(outcome)

    decoding = threading.Thread(target=decode, name="apecli-decode", daemon=True)
    decoding.start()
    try:
        while True:
            batch, done, failure = ready.get()
            if failure is not None:
                raise failure
            if batch is None:
                return
            if done is not None:
                encoding = torch.cuda.current_stream(device)
                encoding.wait_event(done)
                batch.images.record_stream(encoding)  # its memory is not reused until the encoder has read it
            yield batch
    finally:
        stop.set()
        decoding.join()


@dataclass(frozen=True)
class Batch:
    """A batch from the loader: each image's index and why it could not be read (None when it could),
    and the readable images in order. Image tensors travel stacked in one tensor, so a loader worker
    passes one shared-memory segment per batch, not one file descriptor per image; raw bytes travel
    as a list of arrays."""

    indices: list[int]
    errors: list[str | None]
    images: Any  # tensor (readable images × …), or list of uint8 arrays

    @classmethod
    def collate(cls, items: list[Item]) -> "Batch":
        """The loader's collate function (run in its workers), and :func:`read_batches`'."""
        import torch

        data = [value for _, value, error in items if error is None]
        images = torch.stack(data) if data and isinstance(data[0], torch.Tensor) else data
        return cls([index for index, _, _ in items], [error for _, _, error in items], images)

    @classmethod
    def join(cls, parts: list["Batch"]) -> "Batch":
        """Consecutive batches as one, in order."""
        import torch

        tensors = [part.images for part in parts if isinstance(part.images, torch.Tensor) and len(part.images)]
        images = torch.cat(tensors) if tensors else [image for part in parts for image in part.images]
        return cls([i for part in parts for i in part.indices], [e for part in parts for e in part.errors], images)

    def to(self, device) -> "Batch":
        """The batch with its image tensor on ``device`` (copied asynchronously from pinned memory)."""
        return replace(self, images=self.images.to(device, non_blocking=True)) if hasattr(self.images, "to") else self

    @property
    def readable(self) -> list[int]:
        return [index for index, error in zip(self.indices, self.errors) if error is None]

    def pin_memory(self) -> "Batch":
        """Called by the loader's pinning thread (on CUDA): the stacked images in page-locked memory."""
        return replace(self, images=self.images.pin_memory()) if hasattr(self.images, "pin_memory") else self


def is_jpeg(data: np.ndarray) -> bool:
    return data.size > 3 and data[:3].tobytes() == b"\xff\xd8\xff"


@dataclass(frozen=True)
class JpegDecoder:
    """A batched JPEG decoder: ``decode(list of 1-D uint8 CPU tensors, device)`` → RGB C×H×W uint8 tensors
    on ``device``; ``name`` says which library and version, for the artifact's provenance; ``turns``:
    whether it turns images upright by their EXIF orientation itself (TorchCodec's does on the CPU)."""

    name: str
    decode: Callable[[list, Any], list]
    turns: bool = False


def _torchcodec() -> JpegDecoder:
    import torchcodec
    from torchcodec.decoders import decode_jpeg

    return JpegDecoder(f"torchcodec {torchcodec.__version__}", lambda data, device: decode_jpeg(data, mode="RGB", device=device))


def _torchvision() -> JpegDecoder:
    import torchvision
    from torchvision.io import ImageReadMode, decode_jpeg

    def decode(data: list, device) -> list:
        with warnings.catch_warnings():  # the deprecation (in favour of TorchCodec) it warns of on every call
            warnings.simplefilter("ignore", DeprecationWarning)
            return decode_jpeg(data, mode=ImageReadMode.RGB, device=device)

    return JpegDecoder(f"torchvision {torchvision.__version__}", decode)


DECODERS: tuple[tuple[str, Callable[[], JpegDecoder]], ...] = (("torchcodec", _torchcodec), ("torchvision", _torchvision))


@lru_cache(maxsize=None)
def jpeg_decoder(device: str) -> JpegDecoder:
    """The first decoder of :data:`DECODERS` that imports and decodes a probe JPEG on ``device``.

    TorchCodec first; torchvision's where TorchCodec is missing, or was built for another torch or CUDA.
    """
    import io

    import torch
    from PIL import Image

    encoded, exif = io.BytesIO(), Image.Exif()
    exif[ORIENTATION] = 6  # stored a quarter turn anticlockwise: does the decoder turn it?
    Image.new("L", (16, 8), 128).save(encoded, "JPEG", exif=exif)  # grey: also tries the conversion to RGB
    probe = torch.frombuffer(bytearray(encoded.getvalue()), dtype=torch.uint8)
    failures = []
    for library, make in DECODERS:  # in order of preference
        try:
            decoder = make()
            image = decoder.decode([probe], device)[0]
            if tuple(image.shape) in ((3, 8, 16), (3, 16, 8)) and image.device.type == torch.device(device).type:
                return replace(decoder, turns=tuple(image.shape) == (3, 16, 8))
            failures.append(f"{decoder.name}: a {tuple(image.shape)} image on {image.device}")
        except Exception as failure:  # noqa: BLE001 - a missing library, another ABI, no nvJPEG: try the next
            failures.append(f"{library}: {str(failure).splitlines()[0] if str(failure) else type(failure).__name__}")
    raise ApecliError(f"--decode gpu: no JPEG decoder works on {device} ({'; '.join(failures)}); use --decode pil")


def decode_on_device(batch: Batch, paths: Sequence[Path], encoder, pixels: Pixels, upright: bool = False) -> Batch:
    """A batch of raw bytes as uint8 images of the model's size on the encoder's device, as ``pixels``
    gives them (JPEGs decoded together there, other files by PIL and ``pixels.on_image``); ``upright``:
    each turned as its EXIF orientation says first.

    The JPEGs are decoded in one call (:func:`_decode_jpegs`) and resized together
    (:func:`resize_crop`): a batch of one size costs a fixed number of device operations, and each
    further size one more.
    """
    import torch

    device = encoder.device
    decoder = jpeg_decoder(str(device))
    jpegs = [(index, data) for index, data in zip(batch.readable, batch.images) if is_jpeg(data)]
    to_turn = {}  # what is left after the decoder: turning upright, or undoing the decoder's turn
    if upright != decoder.turns:
        read = ((index, exif_orientation(data)) for index, data in jpegs)
        to_turn = {index: UNDO.get(turn, turn) if decoder.turns else turn for index, turn in read if turn != 1}

    def resized(images: dict) -> dict:
        return resize_crop({index: _upright(image, to_turn.get(index, 1)) for index, image in images.items()}, encoder)

    ready = _decode_jpegs(decoder.decode, jpegs, device, resized)
    errors, tensors = list(batch.errors), []
    for position, index in enumerate(batch.indices):
        if errors[position] is not None:
            continue
        if index in ready:
            tensors.append(ready[index])
            continue
        try:  # not a JPEG, or not one the decoder reads: the faithful path
            tensors.append(pixels.on_image(_open_rgb(paths[index], upright)).to(device))
        except (OSError, ValueError, SyntaxError) as failure:
            errors[position] = str(failure).split("\n")[0] or type(failure).__name__
    images = torch.stack(tensors) if tensors else torch.empty((0, 3, *encoder.image_size), dtype=torch.uint8, device=device)
    return Batch(batch.indices, errors, images)


def _decode_jpegs(decode: Callable, jpegs: list, device, then: Callable[[dict], dict] = dict) -> dict:
    """``then`` (index → decoded image) for the (index, bytes) pairs ``decode`` reads, in one call where
    it reads them all. A file it cannot read fails the whole call, so then each half is decoded on its
    own (and passed to ``then``, which frees the full-size images of one half before the next is
    decoded), and so on down to the files that fail, which are left out (for PIL): one bad file in a
    batch of n costs about 2·log₂ n calls, rather than n calls of one image each."""
    import torch

    if not jpegs:
        return {}
    try:
        images = decode([torch.from_numpy(data) for _, data in jpegs], device)
    except (RuntimeError, ValueError):
        if len(jpegs) == 1:
            return {}
        half = len(jpegs) // 2
        return {**_decode_jpegs(decode, jpegs[:half], device, then), **_decode_jpegs(decode, jpegs[half:], device, then)}
    return then({index: image for (index, _), image in zip(jpegs, images)})


def device_decoder(encoder) -> JpegDecoder:
    """The JPEG decoder the device path will use for this encoder, or one clear refusal where that path
    cannot serve it: it resizes in open_clip's ``shortest`` (to a square) and ``squash`` modes, bicubic
    or bilinear, as the model's config says, and needs a decoder that works on the encoder's device."""
    if split_transform(encoder.eval_transform).table is None:
        raise ApecliError(f"--decode gpu needs {encoder.name}'s evaluation transform to end in ToTensor and Normalize; "
                          "use --decode pil")
    mode = encoder.preprocess_config.get("resize_mode", "shortest")
    if mode not in ("shortest", "squash") or mode == "shortest" and encoder.image_size[0] != encoder.image_size[1]:
        raise ApecliError(f"--decode gpu does not do {encoder.name}'s '{mode}' resizing to {list(encoder.image_size)}; "
                          "use --decode pil")
    return jpeg_decoder(str(encoder.device))


FLOAT_VALUES = 2**28  # pixel values cast to float32 at once while resizing: 1 GiB


def resize_crop(images: dict, encoder, most: int = FLOAT_VALUES) -> dict:
    """uint8 C×H×W images → uint8 3×size images, as the model's evaluation transform resizes and crops
    them: the shortest side to size then a centre crop (``shortest``), or straight to size (``squash``),
    antialiased, with the model's interpolation.

    Each image comes out as torchvision's ``resize`` and ``center_crop`` of it alone, computed as
    torchvision computes uint8 tensors on a GPU (interpolation in float32, then clamped, rounded and
    cast back), bit for bit on the device it runs on; but the casts are made once for many images: a
    few device operations for each ``most`` pixel values (a batch of 256 images of 500 × 375 at once),
    plus one interpolation for each size among them, where torchvision's ``resize`` costs half a dozen
    a size.
    """
    ready: dict = {}
    for sizes in _float_chunks(_by_shape(images), most):
        ready.update(_resize_chunk(images, sizes, encoder))
    return ready


def _by_shape(images: dict) -> dict[tuple[int, ...], list[int]]:
    by_shape: dict[tuple[int, ...], list[int]] = {}
    for index, image in images.items():
        by_shape.setdefault(tuple(image.shape), []).append(index)
    return by_shape


def _float_chunks(by_shape: dict, most: int) -> list[list[tuple[tuple[int, ...], list[int]]]]:
    """The images of each size, in order, cut into chunks of at most ``most`` pixel values (an image
    larger than that alone)."""
    chunks, chunk, values = [], [], 0
    for shape, indices in by_shape.items():
        each = int(np.prod(shape))
        at_once = max(1, most // each)
        for start in range(0, len(indices), at_once):
            piece = indices[start:start + at_once]
            if chunk and values + each * len(piece) > most:
                chunks.append(chunk)
                chunk, values = [], 0
            chunk.append((shape, piece))
            values += each * len(piece)
    return chunks + [chunk] if chunk else chunks


def _resize_chunk(images: dict, sizes: list, encoder) -> dict:
    """:func:`resize_crop` of one chunk of :func:`_float_chunks`: (shape, indices) pairs."""
    import torch
    from torch.nn.functional import interpolate

    size, config = tuple(encoder.image_size), encoder.preprocess_config
    mode = "bilinear" if config.get("interpolation") == "bilinear" else "bicubic"
    squash = config.get("resize_mode", "shortest") == "squash"
    order = [index for _, indices in sizes for index in indices]  # each size's images side by side
    pixels = torch.cat([images[index].reshape(-1) for index in order]).to(torch.float32)
    resized, start = [], 0
    for shape, indices in sizes:
        count = len(indices) * int(np.prod(shape))
        group = pixels[start:start + count].view(len(indices), *shape)
        start += count
        target = size if squash else _shortest_side_to(shape[1:], size[0])
        if target != tuple(shape[1:]):
            group = interpolate(group, size=list(target), mode=mode, align_corners=False, antialias=True)
        top, left = (round((have - want) / 2.0) for have, want in zip(target, size))  # torchvision's centre
        resized.append(group[:, :, top:top + size[0], left:left + size[1]])
    batch = resized[0] if len(resized) == 1 else torch.cat(resized)
    return dict(zip(order, batch.clamp_(0, 255).round_().to(torch.uint8).unbind()))


def _shortest_side_to(shape: Sequence[int], side: int) -> tuple[int, int]:
    """(height, width) with the shorter side made ``side`` and the longer scaled as torchvision's
    ``resize`` scales it (truncated)."""
    height, width = shape
    short, long = sorted((height, width))
    scaled = int(side * long / short)
    return (side, scaled) if height <= width else (scaled, side)
