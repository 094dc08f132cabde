"""Resizing a decoded batch for the encoder (`--decode gpu`): batch-wide casts against one resize per size.

The decoding thread hands `resize_crop` a batch of uint8 images as nvJPEG decodes them and gets them back
at the model's size, resized and centre-cropped as open_clip's evaluation transform does (ViT-B-16's:
shortest side to 224, bicubic, antialiased, then a 224 × 224 crop). It casts the whole batch to float32
once, interpolates each size, and rounds the batch back to uint8 at once. The baseline, in the same run,
is the way it was done before: each size stacked, resized by torchvision's `resize` of uint8 (which on a
GPU casts to float32 and back in every call) and centre-cropped. On a GPU both should give the same
values, bit for bit, as tests/test_gpu.py checks there (tests/test_extract.py checks it on the CPU
against torchvision's float32 path).

Two batches: 500 × 375 for every image (one size), and widths and heights each drawn from 200 to 640 (a
size an image, as in photo collections). For each: the device operations a batch costs, and the time a
batch takes on the device, synchronised. The operations are counted at PyTorch's dispatcher on the meta
device (shapes without pixels), views left out; each is a kernel launch on a GPU, made by the decoding
thread under the GIL the encoding thread needs too. The counts printed are a GPU's on any machine (on
the CPU torchvision resizes uint8 in fixed point, without the casts, and faster than in float32). It
also prints how many images the two give identically: all of them on a GPU, fewer on the CPU, where
the baseline is fixed point.

    python benchmarks/resize_batch.py --device cuda
    python benchmarks/resize_batch.py --device cpu --images 64 --repeat 3
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from types import SimpleNamespace

import numpy as np
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torchvision.transforms.v2 import functional as F

from apecli.images.gpu import _by_shape, resize_crop

SIZE = 224
ENCODER = SimpleNamespace(image_size=(SIZE, SIZE), preprocess_config={"resize_mode": "shortest",
                                                                      "interpolation": "bicubic"})


def each_size(images: dict, encoder) -> dict:
    """The baseline: the images of each size stacked, resized by torchvision's uint8 ``resize`` and
    centre-cropped."""
    ready = {}
    for indices in _by_shape(images).values():
        batch = F.resize(torch.stack([images[index] for index in indices]), [SIZE],
                         interpolation=F.InterpolationMode.BICUBIC, antialias=True)
        ready.update(zip(indices, F.center_crop(batch, [SIZE, SIZE])))
    return ready


class Launches(TorchDispatchMode):
    """Counts the operations on tensors that reach PyTorch's dispatcher, views left out."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += func.name().startswith("aten::") and not func.is_view
        return func(*args, **(kwargs or {}))


def decoded(count: int, varied: bool, device: str) -> dict:
    """uint8 3 × H × W images of random pixels, as a decoder gives them."""
    rng = np.random.default_rng(0)
    shapes = rng.integers(200, 641, size=(count, 2)) if varied else np.tile([375, 500], (count, 1))
    return {index: torch.randint(0, 256, (3, int(h), int(w)), dtype=torch.uint8, device=device)
            for index, (h, w) in enumerate(shapes)}


def operations(resize, images: dict) -> int:
    """The device operations ``resize`` makes for a batch of images of these shapes, as on a GPU."""
    shaped = {index: torch.empty(image.shape, dtype=torch.uint8, device="meta") for index, image in images.items()}
    with Launches() as launches:
        resize(shaped, ENCODER)
    return launches.count


def timed(resize, images: dict, device: str, repeat: int) -> float:
    """Median seconds a batch, synchronised on a GPU."""
    times = []
    for _ in range(repeat + 1):  # the first call warms up
        start = time.perf_counter()
        resize(images, ENCODER)
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    parser.add_argument("--images", type=int, default=256, help="images a batch")
    parser.add_argument("--repeat", type=int, default=20, help="timed batches, after one to warm up")
    args = parser.parse_args()
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, device {args.device}"
          + (f" ({torch.cuda.get_device_name()})" if args.device == "cuda" else ""))
    print(f"batches of {args.images} images to {SIZE} x {SIZE} (shortest side, bicubic, antialiased, centre crop)")
    for varied in (False, True):
        images = decoded(args.images, varied, args.device)
        sizes = len({tuple(image.shape) for image in images.values()})
        (base_ops, base_time), (ops, seconds) = [(operations(resize, images), timed(resize, images, args.device, args.repeat))
                                                 for resize in (each_size, resize_crop)]
        baseline, in_float = each_size(images, ENCODER), resize_crop(images, ENCODER)
        same = sum(torch.equal(baseline[index], in_float[index]) for index in images)
        print(f"{'200-640 x 200-640' if varied else '500 x 375'}, {sizes} sizes: "
              f"each size (baseline) {base_ops} operations on a GPU, {base_time * 1e3:.2f} ms a batch "
              f"({base_time / args.images * 1e6:.1f} us an image); in float {ops} operations, "
              f"{seconds * 1e3:.2f} ms a batch ({seconds / args.images * 1e6:.1f} us an image); "
              f"ratio {base_time / seconds:.2f}x; identical images {same} of {len(images)}")


if __name__ == "__main__":
    main()
