"""APE-T at ImageNet's shape: validation products kept across epochs against recomputed every epoch.

ImageNet's protocol for APE-T: C = 1000 classes, K = 16 shots, D = 1024 (RN50), 10 stored views per
training image, 50,000 validation images scored after every epoch. Each score needs every validation
image's product with every cache key (50,000 × 16,000 × 1,024 multiply-adds), and training never
changes the keys, so apecli keeps those products from the first epoch on, within a memory budget
(3.2 GB here). Baseline, in the same run and measured first: the same fit with a budget of 0, which
recomputes them every epoch (what apecli did before). Both runs must give the same history and the
same parameters, bit for bit.

    python benchmarks/fit_imagenet.py [--epochs 3] [--images 50000]
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from dataclasses import replace

import numpy as np
import torch

from apecli.fitting import fit
from apecli.kinds.features import LabelledFeatures
from apecli.methods.ape_t import FitSettings, val_cache_budget
from apecli.synthetic import synthetic_features


def imagenet_features(images: int):
    """Generated features of ImageNet's shape for APE-T: 16 shots × 1000 classes with 10 views each, and
    ``images`` validation images (drawn again from 2,000: the shape is what costs)."""
    features = synthetic_features(num_classes=1000, dim=1024, shots=(16,), val_per_class=2, test_per_class=1, views=10,
                                  image_noise=4.0, text_noise=1.5, view_noise=4.0, dataset="imagenet")
    val = features.split("val")
    rows = np.random.default_rng(1).integers(0, val.labels.shape[0], images)
    return replace(features, splits={**features.splits, "val": LabelledFeatures(val.features[rows], val.labels[rows])})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=3, help="epochs of each fit (ImageNet's default is 20)")
    parser.add_argument("--images", type=int, default=50_000, help="validation images")
    args = parser.parse_args()
    features = imagenet_features(args.images)
    settings = FitSettings(epochs=args.epochs)
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"C=1000 K=16 D=1024, 10 views, {args.images:,} validation images, {args.epochs} epochs; "
          f"budget for kept products {val_cache_budget() / 2**30:.1f} GiB")
    timed = {}
    for name, budget in (("recomputed every epoch (baseline)", 0), ("kept across epochs (apecli)", None)):
        start = time.perf_counter()
        timed[name] = (fit(features, settings, val_cache_bytes=budget), time.perf_counter() - start)
        print(f"{name}: {timed[name][1]:.1f} s, {timed[name][1] / args.epochs:.1f} s per epoch", flush=True)
    (baseline, slow), (kept, fast) = timed.values()
    same = (np.array_equal(baseline.val_accuracy, kept.val_accuracy) and np.array_equal(baseline.loss, kept.loss)
            and np.array_equal(baseline.adapter.residual, kept.adapter.residual)
            and np.array_equal(baseline.adapter.value_weights, kept.adapter.value_weights))
    print(f"validation accuracy per epoch: {np.round(kept.val_accuracy, 2).tolist()}; identical runs: {same}")
    print(f"ratio {slow / fast:.2f}x")
    if not same:
        raise SystemExit("the two fits differ")


if __name__ == "__main__":
    main()
