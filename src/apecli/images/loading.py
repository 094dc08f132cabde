"""Images decoded by PIL for the encoder, the faithful path: the model's own transforms (the protocol's
numbers depend on them), run in loader worker processes.

The transform is split where the image becomes a tensor (:class:`Pixels`): loader workers resize and
crop and hand over uint8 pixels, and the encoder's device scales and normalises them, by lookup in a
table the transform's own steps computed, so the values are the transform's bit for bit. Workers hand
over pieces of a few dozen images, which the main process joins into the encoder's batches, so
encoding starts as soon as the first images are decoded. A photo may be turned upright by its EXIF
orientation tag first (``upright``).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from apecli.errors import first_line
from apecli.files import ShardMember
from apecli.images.exif import TRANSPOSES, pil_orientation

Item = tuple  # (index, the image as a tensor or its raw bytes, or None; why it could not be read, or None)


def image_errors() -> tuple[type[BaseException], ...]:
    """What PIL raises for a file that is not an image it can decode, a decompression bomb included (an
    image that declares far more pixels than any photo: a bad image like any other)."""
    from PIL import Image

    return OSError, ValueError, SyntaxError, Image.DecompressionBombError


def readable(path: Path) -> str | None:
    """None when the image decodes, else why not."""
    from PIL import Image

    try:
        with Image.open(_source(path)) as image:
            image.load()
        return None
    except image_errors() as error:  # PIL's ways of saying "not an image"
        return first_line(error)


def _source(path: "Path | ShardMember"):
    """What PIL opens: a file's path, or the bytes of a file inside a tar shard."""
    return path.open_binary() if isinstance(path, ShardMember) else path


def open_rgb(path: Path, upright: bool = False):
    """The image as RGB; ``upright``: turned as its EXIF orientation tag says, as photo viewers show it."""
    from PIL import Image

    with Image.open(_source(path)) as image:
        orientation = pil_orientation(image) if upright else 1
        return (image.transpose(TRANSPOSES[orientation]) if orientation in TRANSPOSES else image).convert("RGB")


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
            image = open_rgb(self.paths[index], self.upright)
        except image_errors() as error:
            return index, None, first_line(error)
        if self.views == 0:
            return index, self.transform(image), None
        tensors = []
        for view in range(self.views):
            torch.manual_seed((self.seed * 1_000_003 + index) * 1_009 + view)  # the view's own augmentation
            tensors.append(self.transform(image))
        return index, torch.stack(tensors), None


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
