"""Reading images for the encoder: PIL decoding in loader workers, or batched JPEG decoding on the GPU.

The default, faithful path decodes with PIL and applies the model's own transforms (the protocol's
numbers depend on them). ``decode="gpu"`` reads raw bytes in the workers and decodes the JPEGs of a
batch together on the encoder's device (nvJPEG on CUDA), then resizes (shortest side, bicubic,
antialiased), centre-crops and normalises there; a file that is not a JPEG, or that fails to decode
that way, goes through PIL instead. It serves the evaluation transform; augmented training views
always use PIL.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

Item = tuple  # (index, tensor or None, error or None)


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
    """A map-style dataset of (index, the file's bytes as a uint8 tensor or None, error)."""

    def __init__(self, paths: Sequence[Path]) -> None:
        self.paths = paths

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> Item:
        from torchvision.io import read_file

        try:
            return index, read_file(str(self.paths[index])), None
        except (OSError, RuntimeError) as error:
            return index, None, str(error).split("\n")[0] or type(error).__name__


def collate(items: list[Item]) -> list[Item]:
    return items


def is_jpeg(data) -> bool:
    return data.numel() > 3 and data[0] == 0xFF and data[1] == 0xD8 and data[2] == 0xFF


def decode_on_device(items: list[Item], paths: Sequence[Path], encoder, device) -> list[Item]:
    """Turn raw-byte items into normalised image tensors on ``device`` (JPEGs batched there, others by PIL)."""
    import torch
    from torchvision.io import ImageReadMode, decode_jpeg
    from torchvision.transforms.v2 import functional as F

    size = encoder.image_size
    mean = torch.tensor(encoder.mean, device=device).view(3, 1, 1)
    std = torch.tensor(encoder.std, device=device).view(3, 1, 1)
    jpegs = [(index, data) for index, data, _ in items if data is not None and is_jpeg(data)]
    decoded: dict[int, torch.Tensor] = {}
    if jpegs:
        try:
            images = decode_jpeg([data for _, data in jpegs], mode=ImageReadMode.RGB, device=device)
            decoded = {index: image for (index, _), image in zip(jpegs, images)}
        except RuntimeError:  # one bad file spoils the batch: decode one by one
            for index, data in jpegs:
                try:
                    decoded[index] = decode_jpeg(data, mode=ImageReadMode.RGB, device=device)
                except RuntimeError:
                    pass
    out = []
    for index, data, error in items:
        if error is not None:
            out.append((index, None, error))
            continue
        if index in decoded:
            image = F.resize(decoded[index], [min(size)], interpolation=F.InterpolationMode.BICUBIC, antialias=True)
            image = F.center_crop(image, list(size)).float().div_(255).clamp_(0, 1)
            out.append((index, (image - mean) / std, None))
            continue
        try:  # not a JPEG, or not one the decoder reads: the faithful path
            out.append((index, encoder.eval_transform(_open_rgb(paths[index])).to(device), None))
        except (OSError, ValueError, SyntaxError) as failure:
            out.append((index, None, str(failure).split("\n")[0] or type(failure).__name__))
    return out
