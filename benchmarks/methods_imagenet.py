"""TIMO, TIMO-S, LP++, CLAP, the nearest class mean and auto's candidates at ImageNet's shape, each
against GDA in the same run.

ImageNet's protocol: C = 1000 classes, K = 16 shots, D = 1024 (RN50), 50,000 validation images; here
also 10,000 test images and 8 prompt embeddings a class. Each method's whole evaluation is timed as
``apecli eval`` runs it: its fit, validation search or training included, then its test predictions.
The features are generated (class centres with noise; prompts of growing noise), so the accuracies
printed say only that each method ran, not how it compares on real data (docs/performance.md has that).

    python benchmarks/methods_imagenet.py [--device cpu] [--views 1] [--val 50000] [--modes gda,timo,...]

Caltech101's shape (C = 100, D = 512 as the real ViT-B/32 features, 1,649 validation and 2,465 test
images, 10 views a shot):

    python benchmarks/methods_imagenet.py --classes 100 --dim 512 --val 1649 --test 2465 --views 10

The baseline is GDA (``--mode gda``), the method TIMO builds on; each row prints its ratio to GDA's time.
``--views`` augmented views a shot are stored (GDA, TIMO and CLAP learn from all of them; 10 is extract's
default, and CLAP's time grows with it).
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import numpy as np
import torch

from apecli.evaluate import evaluate_method
from apecli.kinds.features import FeatureSet, FewShotCache, LabelledFeatures
from apecli.methods import Options, registry

MODES = ("gda", "timo", "timo-s", "lp++", "clap", "class-mean")


def unit(rows: np.ndarray) -> np.ndarray:
    return (rows / np.linalg.norm(rows, axis=-1, keepdims=True)).astype(np.float32)


def generated(val: int, test: int, views: int, classes: int = 1000, shots: int = 16, dim: int = 1024,
              prompts: int = 8, seed: int = 0) -> FeatureSet:
    rng = np.random.default_rng(seed)
    centres = unit(rng.normal(size=(classes, dim)))

    def images(labels: np.ndarray, noise: float = 0.28) -> np.ndarray:
        return unit(centres[labels] + rng.normal(scale=noise, size=(labels.shape[0], dim)).astype(np.float32))

    key_labels = np.repeat(np.arange(classes), shots)
    view_rows = np.stack([images(key_labels) for _ in range(views)])
    table = centres[:, None, :] + (0.02 * 1.5 ** np.arange(prompts))[None, :, None] * rng.normal(
        size=(classes, prompts, dim)).astype(np.float32)
    table = unit(table)
    classifier = unit(table.mean(axis=1))
    splits = {name: LabelledFeatures(images(labels), labels) for name, labels in
              (("val", rng.integers(0, classes, val)), ("test", rng.integers(0, classes, test)))}
    return FeatureSet(tuple(f"class_{c}" for c in range(classes)), classifier,
                      {shots: FewShotCache(unit(view_rows.mean(axis=0)), key_labels, view_rows)}, splits, "generated",
                      prompts=table.reshape(-1, dim), prompt_labels=np.repeat(np.arange(classes), prompts))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--views", type=int, default=1)
    parser.add_argument("--val", type=int, default=50_000)
    parser.add_argument("--test", type=int, default=10_000)
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--dim", type=int, default=1024)
    args = parser.parse_args()
    modes = [mode for mode in args.modes.split(",") if mode]
    features = generated(args.val, args.test, args.views, classes=args.classes, dim=args.dim)
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"threads {torch.get_num_threads()}, device {args.device}")
    print(f"C = {features.num_classes}, K = 16, D = {features.dim}, {args.val:,} validation and {args.test:,} test "
          f"images, {args.views} view(s) a shot, 8 prompts a class")
    seconds = {}
    for mode in dict.fromkeys(["gda", *modes]):
        method = registry.get(mode).create(Options())
        start = time.perf_counter()
        evaluation = evaluate_method(features, method, device=args.device)
        seconds[mode] = time.perf_counter() - start
        print(f"{mode:12s} {seconds[mode]:8.1f} s  {seconds[mode] / seconds['gda']:6.2f}× GDA's time   "
              f"val {evaluation.val_accuracy:5.2f}%  test {evaluation.test_accuracy:5.2f}%", flush=True)


if __name__ == "__main__":
    main()
