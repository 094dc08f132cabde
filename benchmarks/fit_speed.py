"""APE-T from the store against APE-T the authors' way, at 16 shots × 100 classes, 30 epochs.

apecli trains on the augmented views stored once by `extract` (10 per image here, D = 1024), so a fit
is the optimisation alone. The authors' recipe encodes every training image through CLIP's image
encoder, augmented afresh, in every epoch: 1,600 images × 30 epochs. That encoding cost is measured
here with an open_clip model of the named architecture (random weights cost the same as pretrained
ones), on --encode-images images, and extrapolated linearly to 48,000; the fit time is added to it.

    python benchmarks/fit_speed.py [--model RN50] [--encode-images 32]
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import torch

from apecli.fitting import fit
from apecli.methods.ape_t import FitSettings
from apecli.synthetic import synthetic_features


def encoder_seconds_per_image(model_name: str, images: int) -> float:
    import open_clip

    model = open_clip.create_model(model_name, pretrained=None).eval()
    size = model.visual.image_size
    size = size[0] if isinstance(size, (tuple, list)) else size
    batch = torch.randn(images, 3, size, size)
    with torch.no_grad():
        model.encode_image(batch[:2])  # warm-up
        start = time.perf_counter()
        model.encode_image(batch)
    return (time.perf_counter() - start) / images


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="RN50", help="open_clip architecture of the baseline's encoder")
    parser.add_argument("--encode-images", type=int, default=32, help="images the encoder is timed on")
    args = parser.parse_args()
    features = synthetic_features(num_classes=100, dim=1024, shots=(16,), val_per_class=17, test_per_class=1,
                                  views=10, image_noise=4.0, text_noise=1.5, view_noise=4.0)
    start = time.perf_counter()
    result = fit(features, FitSettings(epochs=30, lr=1e-3))
    fit_seconds = time.perf_counter() - start
    per_image = encoder_seconds_per_image(args.model, args.encode_images)
    encode_seconds = per_image * 1600 * 30
    baseline = encode_seconds + fit_seconds
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"apecli fit, C=100 K=16 D=1024 k={result.settings.k}, 10 views, 30 epochs, 1,649 val images: "
          f"{fit_seconds:.1f} s (best val {result.best_val_accuracy:.2f}% at epoch {result.best_epoch})")
    print(f"encoder {args.model}: {per_image * 1000:.0f} ms/image over {args.encode_images} images; "
          f"48,000 images {encode_seconds:.0f} s extrapolated")
    print(f"authors' recipe (encoding + the same optimisation): {baseline:.0f} s; ratio {baseline / fit_seconds:.0f}x")


if __name__ == "__main__":
    main()
