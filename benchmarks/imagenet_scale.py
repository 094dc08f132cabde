"""Training-free APE at ImageNet scale: time and peak memory, images in blocks against all at once.

ImageNet's protocol: C = 1000 classes, K = 16 shots, D = 1024 (RN50), k = 500 refined channels, 50,000
validation images that also serve as the test set, and a grid of 200 × 20 × 5 = 20,000 settings.
On generated features of that shape, measures
- the search: apecli's (image × key affinities computed a block of images at a time) against the
  same search over the affinities of all images computed at once, as before blocking;
- the test logits at the chosen setting: apecli's (blocks of images, each key's kernel value added
  into its class) against the formula as written, all images at once,
  ``100 f Wᵀ + α exp(−β(1 − f′F′ᵀ)) (L ⊙ v)`` with L the one-hot label matrix.
Peak memory is the process's resident high-water mark during each step, less what it held before
(Linux: reset through /proc/self/clear_refs). The searches run over the first --betas β values of
the 200 (--betas 200: the whole grid), and must count the same correct predictions.

    python benchmarks/imagenet_scale.py [--images 50000] [--betas 10]

At 50,000 images the baselines need about 13 GB of memory (apecli about 1 GB); fewer images need less.
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import numpy as np
import torch

from apecli.methods.grid import SearchGrid, count_grid
from apecli.methods.scores import count_correct
from apecli.methods.tri_edge import TriEdge, search

GRID = SearchGrid((7.0, 7.0, 0.5), (200, 20, 5))


def resident_gb(field: str) -> float:
    with open("/proc/self/status") as status:
        line = next(line for line in status if line.startswith(field + ":"))
    return int(line.split()[1]) / 2**20


def measured(run):
    """(result, seconds, peak resident GB above the start) of run()."""
    with open("/proc/self/clear_refs", "w") as refs:
        refs.write("5")  # resets the high-water mark to the current size
    before = resident_gb("VmRSS")
    start = time.perf_counter()
    result = run()
    return result, time.perf_counter() - start, resident_gb("VmHWM") - before


def generated(images: int, classes: int = 1000, shots: int = 16, dim: int = 1024, seed: int = 0):
    """Class centres with noise: the text a little off each centre, keys and images further off, so that
    zero-shot gets about half the images right and the cache lifts that, as on real data (the grid's
    counts then differ from setting to setting, and their equality checks something)."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(classes, dim)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    text = centres + rng.normal(scale=0.06, size=(classes, dim)).astype(np.float32)
    key_labels = np.repeat(np.arange(classes), shots)
    keys = centres[key_labels] + rng.normal(scale=0.14, size=(classes * shots, dim)).astype(np.float32)
    labels = rng.integers(0, classes, images)
    x = centres[labels] + rng.normal(scale=0.14, size=(images, dim)).astype(np.float32)
    for array in (text, keys, x):
        array /= np.linalg.norm(array, axis=1, keepdims=True)
    return text, keys, key_labels, x, labels


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=50_000, help="validation images (also the test set)")
    parser.add_argument("--betas", type=int, default=10, help="β values of the 200 the searches run over")
    args = parser.parse_args()
    text, keys, key_labels, x, labels = generated(args.images)
    tri = TriEdge.build(text, keys, key_labels, np.arange(500))  # which 500 channels does not change the cost
    head = SearchGrid((0.1 + args.betas * (GRID.scale[0] - 0.1) / GRID.steps[0], *GRID.scale[1:]),
                      (args.betas, *GRID.steps[1:]))
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"C=1000, K=16, D=1024, k=500, {args.images:,} images; searches over {head.size:,} of the {GRID.size:,} "
          f"settings ({args.betas} of 200 β values)")

    def all_at_once():
        affinity = tri.affinity(x).reshape(x.shape[0], tri.num_classes, tri.shots)
        weights = np.exp(tri.divergence.reshape(tri.num_classes, tri.shots, 1) * head.gammas)
        return count_grid(tri.zero_shot_logits(x), lambda rows: affinity[rows], weights, labels, head.betas, head.alphas)

    whole, whole_s, whole_gb = measured(all_at_once)  # the baseline first: it bears the warm-up
    blocked, blocked_s, blocked_gb = measured(lambda: search(tri, x, labels, head))
    assert np.array_equal(blocked.correct, whole), "the searches disagree"
    zero_shot = 100.0 * count_correct(tri.zero_shot_logits(x), labels) / labels.shape[0]
    print(f"zero-shot {zero_shot:.2f} %; search: best {blocked.accuracy:.2f} %, "
          f"{len(np.unique(blocked.correct))} distinct counts over the settings")
    print(f"search, all images at once (baseline): {whole_s:7.1f} s, peak +{whole_gb:5.2f} GB")
    print(f"search, images in blocks (apecli):     {blocked_s:7.1f} s, peak +{blocked_gb:5.2f} GB; "
          f"time ratio {whole_s / blocked_s:.2f}x, {whole_gb / blocked_gb:.1f}x less memory")

    alpha, beta, gamma = blocked.alpha, blocked.beta, blocked.gamma
    logits, logits_s, logits_gb = measured(lambda: tri.logits(x, alpha, beta, gamma))

    def as_written():
        values = np.eye(tri.num_classes)[tri.key_labels] * np.exp(tri.divergence * gamma)[:, None]
        return tri.zero_shot_logits(x) + alpha * np.exp(-beta * (1 - tri.affinity(x))) @ values

    dense, dense_s, dense_gb = measured(as_written)
    assert count_correct(logits, labels) == count_correct(dense, labels), "the test logits disagree"
    print(f"test logits, as written, all at once (baseline): {dense_s:6.1f} s, peak +{dense_gb:5.2f} GB")
    print(f"test logits, in blocks (apecli):                 {logits_s:6.1f} s, peak +{logits_gb:5.2f} GB; "
          f"ratio {dense_s / logits_s:.1f}x faster, {dense_gb / logits_gb:.1f}x less memory")


if __name__ == "__main__":
    main()
