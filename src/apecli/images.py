"""Reading images for the encoder: PIL decoding in loader workers, or batched JPEG decoding on the GPU.

The default, faithful path decodes with PIL and applies the model's own transforms (the protocol's
numbers depend on them). ``decode="gpu"`` reads raw bytes in threads and decodes the JPEGs of a
batch together on the encoder's device (nvJPEG on CUDA), then resizes, crops and normalises there as
the model's evaluation transform does; a file that is not a JPEG, or that fails to decode that way,
goes through PIL instead. It serves the evaluation transform; augmented training views
always use PIL. The JPEG decoder is TorchCodec's where it is installed and works on the device, else
torchvision's (deprecated since torchvision 0.29 in favour of TorchCodec).
"""

from __future__ import annotations

import warnings
from collections import deque
from dataclasses import dataclass, replace
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


def _open_rgb(path: Path):
    from PIL import Image

    with Image.open(path) as image:
        return image.convert("RGB")


class PilImages:
    """A map-style dataset of (index, transformed tensor or None, error) for a torch DataLoader.

    With ``views`` > 0 each item is ``views`` augmentations of the image, each seeded by the image's
    index and the view's number, so results do not depend on batching or workers.
    """

    def __init__(self, paths: Sequence[Path], transform: Callable, views: int, seed: int) -> None:
        self.paths, self.transform, self.views, self.seed = paths, transform, views, seed

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> Item:
        import torch

        try:
            image = _open_rgb(self.paths[index])
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
        try:
            return index, np.fromfile(self.paths[index], dtype=np.uint8), None
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
    pool = ThreadPoolExecutor(max(1, threads), thread_name_prefix="apecli-read")
    queued: deque = deque()
    try:
        for batch in batches:
            queued.append([pool.submit(source.__getitem__, index) for index in batch])
            if len(queued) > ahead:
                yield Batch.collate([future.result() for future in queued.popleft()])
        while queued:
            yield Batch.collate([future.result() for future in queued.popleft()])
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


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
    on ``device``; ``name`` says which library and version, for the artifact's provenance."""

    name: str
    decode: Callable[[list, Any], list]


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

    encoded = io.BytesIO()
    Image.new("L", (8, 8), 128).save(encoded, "JPEG")  # grey: also tries the conversion to RGB
    probe = torch.frombuffer(bytearray(encoded.getvalue()), dtype=torch.uint8)
    failures = []
    for library, make in DECODERS:  # in order of preference
        try:
            decoder = make()
            image = decoder.decode([probe], device)[0]
            if tuple(image.shape) == (3, 8, 8) and image.device.type == torch.device(device).type:
                return decoder
            failures.append(f"{decoder.name}: a {tuple(image.shape)} image on {image.device}")
        except Exception as failure:  # noqa: BLE001 - a missing library, another ABI, no nvJPEG: try the next
            failures.append(f"{library}: {str(failure).splitlines()[0] if str(failure) else type(failure).__name__}")
    raise ApecliError(f"--decode gpu: no JPEG decoder works on {device} ({'; '.join(failures)}); use --decode pil")


def decode_on_device(batch: Batch, paths: Sequence[Path], encoder, device) -> Batch:
    """A batch of raw bytes as normalised image tensors on ``device`` (JPEGs batched there, others by PIL).

    The JPEGs are decoded in one call; images of the same size are resized and cropped together, and the
    whole batch is normalised at once, so the number of device operations does not grow with the batch.
    """
    import torch

    decode = jpeg_decoder(str(device)).decode
    jpegs = [(index, data) for index, data in zip(batch.readable, batch.images) if is_jpeg(data)]
    decoded: dict[int, torch.Tensor] = {}
    if jpegs:
        try:
            images = decode([torch.from_numpy(data) for _, data in jpegs], device)
            decoded = {index: image for (index, _), image in zip(jpegs, images)}
        except (RuntimeError, ValueError):  # one bad file spoils the batch: decode one by one
            for index, data in jpegs:
                try:
                    decoded[index] = decode([torch.from_numpy(data)], device)[0]
                except (RuntimeError, ValueError):
                    pass
    ready = _resize_crop_normalise(decoded, encoder, device)
    errors, tensors = list(batch.errors), []
    for position, index in enumerate(batch.indices):
        if errors[position] is not None:
            continue
        if index in ready:
            tensors.append(ready[index])
            continue
        try:  # not a JPEG, or not one the decoder reads: the faithful path
            tensors.append(encoder.eval_transform(_open_rgb(paths[index])).to(device))
        except (OSError, ValueError, SyntaxError) as failure:
            errors[position] = str(failure).split("\n")[0] or type(failure).__name__
    images = torch.stack(tensors) if tensors else torch.empty((0, 3, *encoder.image_size), device=device)
    return Batch(batch.indices, errors, images)


def device_decoder(encoder) -> JpegDecoder:
    """The JPEG decoder the device path will use for this encoder, or one clear refusal where that path
    cannot serve it: it resizes in open_clip's ``shortest`` (to a square) and ``squash`` modes, bicubic
    or bilinear, as the model's config says, and needs a decoder that works on the encoder's device."""
    mode = encoder.preprocess_config.get("resize_mode", "shortest")
    if mode not in ("shortest", "squash") or mode == "shortest" and encoder.image_size[0] != encoder.image_size[1]:
        raise ApecliError(f"--decode gpu does not do {encoder.name}'s '{mode}' resizing to {list(encoder.image_size)}; "
                          "use --decode pil")
    return jpeg_decoder(str(encoder.device))


def _resize_crop_normalise(images: dict, encoder, device) -> dict:
    """uint8 C×H×W images → normalised float 3×size tensors, as the model's evaluation transform makes them:
    the shortest side to size then a centre crop (``shortest``), or straight to size (``squash``),
    antialiased, with the model's interpolation."""
    import torch
    from torchvision.transforms.v2 import functional as F

    size, config = list(encoder.image_size), encoder.preprocess_config
    interpolation = F.InterpolationMode.BILINEAR if config.get("interpolation") == "bilinear" else F.InterpolationMode.BICUBIC
    squash = config.get("resize_mode", "shortest") == "squash"
    if not images:
        return {}
    by_shape: dict[tuple[int, ...], list[int]] = {}
    for index, image in images.items():
        by_shape.setdefault(tuple(image.shape), []).append(index)
    order, cropped = [], []
    for indices in by_shape.values():
        batch = torch.stack([images[index] for index in indices])
        batch = F.resize(batch, size if squash else [size[0]], interpolation=interpolation, antialias=True)
        cropped.append(batch if squash else F.center_crop(batch, size))
        order += indices
    pixels = torch.cat(cropped).float().div_(255)
    mean, std = (torch.tensor(values, device=device).view(3, 1, 1) for values in (encoder.mean, encoder.std))
    pixels = (pixels - mean) / std
    return dict(zip(order, pixels))
