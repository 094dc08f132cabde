"""Training-free APE's search: the vectorised grid against the authors' per-combination loop.

Caltech101 scale: C = 100 classes, K = 16 shots, 1,649 validation images, the default grid of
200 × 20 × 20 = 80,000 settings, at D = 1024 (RN50) and D = 512 (ViT-B/32), on generated features,
and on the real caltech101 features when ../shared/real-features is present.

The loop costs the same for every setting, so it is timed on the settings of the first β values
(--loop-settings of them) and extrapolated linearly to the whole grid; on those settings the two
searches must count the same correct predictions, which the script checks.

    python benchmarks/grid_speed.py [--loop-settings 400]
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from pathlib import Path

import numpy as np
import torch

from apecli.methods.grid import SearchGrid
from apecli.methods.tri_edge import TriEdge, search, search_loop
from apecli.refine import select_channels
from apecli.synthetic import synthetic_features

REAL = Path(__file__).resolve().parents[2] / "shared" / "real-features" / "caltech101"
GRID = SearchGrid((7.0, 7.0, 1.0), (200, 20, 20))


def cases():
    for dim in (1024, 512):
        noise = (dim / 1024) ** 0.5  # keeps the task about as hard at either width
        features = synthetic_features(num_classes=100, dim=dim, shots=(16,), val_per_class=17, test_per_class=1,
                                      views=1, image_noise=4 * noise, text_noise=1.5 * noise)
        yield f"generated, D={dim}", features, round(800 * dim / 1024), 1649
    if (REAL / "keys_16shots.pt").is_file():
        from apecli.importers import import_tip_adapter

        features = import_tip_adapter(REAL, REAL / "proxy_text_weights.pt", "caltech101")
        yield "real caltech101, D=512", features, 400, None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--loop-settings", type=int, default=400, help="settings the loop is timed on (multiple of 400)")
    args = parser.parse_args()
    count = max(1, args.loop_settings // (GRID.steps[1] * GRID.steps[2]))
    # The first `count` β values of the default grid, with all its α and γ values.
    head = SearchGrid((0.1 + count * (GRID.scale[0] - 0.1) / GRID.steps[0], *GRID.scale[1:]), (count, *GRID.steps[1:]))
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"{'case':<24} {'settings':>8} {'fast s':>8} {'loop s/setting':>15} {'loop s (extrap.)':>17} {'ratio':>7}")
    for name, features, k, rows in cases():
        _, cache = features.cache(16)
        tri = TriEdge.build(features.classifier, cache.keys, cache.labels, select_channels(features, k=k).channels)
        val = features.split("val")
        x, labels = val.features[:rows], val.labels[:rows]
        start = time.perf_counter()
        fast = search(tri, x, labels, GRID)
        fast_seconds = time.perf_counter() - start
        start = time.perf_counter()
        loop = search_loop(tri, x, labels, head)
        per_setting = (time.perf_counter() - start) / head.size
        assert np.array_equal(loop.correct, search(tri, x, labels, head).correct), "the searches disagree"
        estimate = per_setting * GRID.size
        print(f"{name:<24} {GRID.size:>8,} {fast_seconds:>8.2f} {per_setting:>15.4f} {estimate:>17.0f} {estimate / fast_seconds:>6.0f}x")
        print(f"{'':<24} N={labels.shape[0]}, k={k}: best val {fast.accuracy:.2f}% at alpha={fast.alpha:.3f} "
              f"beta={fast.beta:.3f} gamma={fast.gamma:.3f} ({fast.ties} settings share it)")


if __name__ == "__main__":
    main()
