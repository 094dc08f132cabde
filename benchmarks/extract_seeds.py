"""Another seed's extraction: the training images alone, with the stored validation and test features.

The CoOp protocol extracts every dataset with three seeds, which differ in their few-shot draw only.
On a generated caltech101-style dataset of 500 × 375 JPEGs (--classes classes, 16 training images per
class in the draw, --evaluation validation and as many test images per class), measures
- seed 1 into an empty store (everything encoded);
- seed 2 into that store: apecli encodes the draw and takes seed 1's validation and test features;
- seed 2 into another empty store: every image encoded again, the baseline the ratio is taken against.
Both seed-2 runs must give the same features, bit for bit.

    python benchmarks/extract_seeds.py [--model tiny] [--classes 20] [--evaluation 25] [--workers 2]
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
from extract_throughput import make_jpegs


def main() -> None:
    import open_clip
    import torch

    from apecli.datasets import read_coop
    from apecli.encoder import EncoderSpec
    from apecli.extract import ExtractSettings, extract
    from apecli.synthetic import coop_caltech, tiny_model_config

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny", help="open_clip model (random weights: the same cost), or 'tiny'")
    parser.add_argument("--classes", type=int, default=20)
    parser.add_argument("--evaluation", type=int, default=25, help="validation images per class (and as many test images)")
    parser.add_argument("--views", type=int, default=10)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=64)
    args = parser.parse_args()
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads")
    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        coop_caltech(folder / "data", classes=args.classes, per_split=(16, args.evaluation, args.evaluation))
        images = sorted((folder / "data").rglob("*.jpg"))
        for image, made in zip(images, make_jpegs(folder, len(images))):  # 500 × 375, as photographs are
            made.replace(image)
        model = args.model
        if model == "tiny":
            model = str(tiny_model_config(folder))
            open_clip.add_model_config(model)
        spec = EncoderSpec(model, "none", device="cpu")
        dataset = read_coop("caltech101", folder / "data")
        settings = ExtractSettings(shots=(1, 2, 4, 8, 16), views=args.views, batch_size=args.batch_size,
                                   workers=args.workers)
        print(f"{args.model} (random weights), {args.classes} classes: {args.classes * 16} training images × "
              f"{args.views} views, {args.classes * args.evaluation} validation and as many test images")

        def timed(store: str, seed: int):
            start = time.perf_counter()
            features = extract(dataset, spec, folder / store, replace(settings, seed=seed))
            return features, time.perf_counter() - start

        _, first = timed("store", 1)
        print(f"seed 1, empty store: {first:.1f} s")
        again, shared = timed("store", 2)
        print(f"seed 2 beside seed 1 (apecli: the draw alone): {shared:.1f} s")
        alone, baseline = timed("fresh", 2)
        print(f"seed 2, empty store (baseline: every image): {baseline:.1f} s")
        same = all(np.array_equal(again.caches[k].views, alone.caches[k].views) for k in settings.shots) and all(
            np.array_equal(again.split(s).features, alone.split(s).features) for s in ("val", "test"))
        print(f"same features: {same}; ratio {baseline / shared:.2f}x")
        if not same:
            raise SystemExit("the two seed-2 extractions differ")


if __name__ == "__main__":
    main()
