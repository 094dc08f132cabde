"""Prior refinement at ImageNet scale (C = 1000, K = 16, D = 1024): closed form against a pair loop.

The baseline follows the authors' criterion code, which loops over every ordered pair of different
classes and adds up the products of their pool vectors (here vectorised within a pair). It costs the
same per pair, so it is timed on --pairs pairs and extrapolated linearly to all C(C−1) pairs.

    python benchmarks/refine_speed.py [--pairs 2000]
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import numpy as np

from apecli.methods.criterion import channel_criterion, top_channels

C, K, D, TOP = 1000, 16, 1024, 500


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=2000, help="class pairs the loop is timed on")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    unit = lambda x: (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)  # noqa: E731
    text = unit(rng.normal(size=(C, D)))
    keys = unit(rng.normal(size=(C * K, D)))
    labels = rng.permutation(np.repeat(np.arange(C), K))  # class blocks in no particular order
    times = []
    for _ in range(5):
        start = time.perf_counter()
        channels = top_channels(channel_criterion(text, keys, labels, (0.7, 0.3)), TOP)
        times.append(time.perf_counter() - start)
    fast = float(np.median(times))

    order = np.argsort(labels, kind="stable")
    pools = np.concatenate([text[:, None], keys[order].reshape(C, K, D)], axis=1).astype(np.float64)
    pairs = [(i, j) for i in range(C) for j in range(C) if i != j][: args.pairs]
    start = time.perf_counter()
    total = np.zeros(D)
    for i, j in pairs:
        total += np.einsum("md,nd->d", pools[i], pools[j])
    per_pair = (time.perf_counter() - start) / len(pairs)
    estimate = per_pair * C * (C - 1)
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, numpy {np.__version__}")
    print(f"refine C={C} K={K} D={D} k={TOP}: closed form {fast * 1000:.0f} ms (median of 5), "
          f"kept {channels.shape[0]} channels")
    print(f"pair loop: {per_pair * 1e6:.1f} us/pair over {len(pairs)} pairs, {estimate:.0f} s extrapolated to "
          f"{C * (C - 1):,} pairs; ratio {estimate / fast:,.0f}x")


if __name__ == "__main__":
    main()
