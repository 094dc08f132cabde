"""Images decoded on the encoder's GPU (``decode="gpu"``): raw bytes read in threads, the JPEGs of a batch
decoded together there (nvJPEG on CUDA), then resized and cropped there as the model's evaluation
transform does, on a stream of its own so that decoding the next batch overlaps encoding this one. A
file that is not a JPEG, or that fails to decode that way, goes through PIL instead
(:mod:`apecli.images.loading`). It serves the evaluation transform; augmented training views always use
PIL. The JPEG decoder is TorchCodec's where it is installed and works on the device, else torchvision's
(deprecated since torchvision 0.29 in favour of TorchCodec). With ``upright``, the tag is read from the
bytes and the decoded tensor turned, or the turn of a decoder that makes it unasked is undone.
"""

from __future__ import annotations

import os
import warnings
from collections import deque
from dataclasses import dataclass, replace
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from apecli.errors import ApecliError, Setting, first_line
from apecli.files import ShardMember
from apecli.images.exif import ORIENTATION, UNDO, exif_orientation, turn_upright
from apecli.images.loading import Batch, Item, Pixels, image_errors, open_rgb, split_transform

ON_GPU, ON_PIL = Setting("decode", "gpu"), Setting("decode", "pil")


class RawBytes:
    """A map-style dataset of (index, the file's bytes as a uint8 numpy array or None, error), which
    :func:`read_batches` reads in threads."""

    def __init__(self, paths: Sequence[Path]) -> None:
        self.paths = paths

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> Item:
        path = self.paths[index]
        try:
            if isinstance(path, ShardMember):  # a file inside a tar shard: its bytes where they lie
                return index, np.frombuffer(path.read_bytes(), dtype=np.uint8), None
            # readinto releases the GIL while it reads (numpy's fromfile held it, and the encoding thread waited)
            with open(path, "rb", buffering=0) as file:
                data = bytearray(os.fstat(file.fileno()).st_size)
                size = file.readinto(data)
            return index, np.frombuffer(data, dtype=np.uint8, count=size), None
        except OSError as error:
            return index, None, first_line(error)


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
            failures.append(f"{library}: {first_line(failure)}")
    raise ApecliError(f"{ON_GPU}: no JPEG decoder works on {device} ({'; '.join(failures)}); use {ON_PIL}", ON_GPU,
                      ON_PIL)


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
        return resize_crop({index: turn_upright(image, to_turn.get(index, 1)) for index, image in images.items()}, encoder)

    ready = _decode_jpegs(decoder.decode, jpegs, device, resized)
    errors, tensors = list(batch.errors), []
    for position, index in enumerate(batch.indices):
        if errors[position] is not None:
            continue
        if index in ready:
            tensors.append(ready[index])
            continue
        try:  # not a JPEG, or not one the decoder reads: the faithful path
            tensors.append(pixels.on_image(open_rgb(paths[index], upright)).to(device))
        except image_errors() as failure:
            errors[position] = first_line(failure)
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
        raise ApecliError(f"{ON_GPU} needs {encoder.name}'s evaluation transform to end in ToTensor and Normalize; "
                          f"use {ON_PIL}", ON_GPU, ON_PIL)
    mode = encoder.preprocess_config.get("resize_mode", "shortest")
    if mode not in ("shortest", "squash") or mode == "shortest" and encoder.image_size[0] != encoder.image_size[1]:
        raise ApecliError(f"{ON_GPU} does not do {encoder.name}'s '{mode}' resizing to {list(encoder.image_size)}; "
                          f"use {ON_PIL}", ON_GPU, ON_PIL)
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
