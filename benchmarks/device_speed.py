"""The training-free search and APE-T's training on a GPU, against the same on the CPU, at ImageNet's shape.

ImageNet's protocol: C = 1000 classes, K = 16 shots, D = 1024 (RN50), k = 500 refined channels, 50,000
validation images, the grid of 200 × 20 × 5 = 20,000 settings, APE-T with 10 stored views per training
image. Baseline, in the same run and measured first: the same computation on the CPU (``--device cpu``,
apecli's default), with all the machine's cores.

- Search: both devices over the first --betas β values of the 200, which must count the same correct
  predictions in every setting (float64 on both); then the device alone over the whole grid (its time
  only: the CPU's whole grid takes minutes, see benchmarks/imagenet_scale.py --betas 200).
- Fit: --epochs epochs of APE-T on each device from the same features and seed. A GPU's float32 rounds
  otherwise than the CPU's, so the histories are compared, not required equal.
- ProKeR's search (β × 15 λ, float64): both devices over --proker-betas β values with a 4-shot cache
  (4,000 keys) and --proker-images validation images, which must choose the same setting; then the
  device alone with ImageNet's 16-shot cache (16,000 keys), whose cost is one eigendecomposition of the
  16,000 × 16,000 kernel per β.

Each device is warmed up first on a small search and fit, so that CUDA's start-up is not timed.

    python benchmarks/device_speed.py [--device cuda] [--images 50000] [--betas 16] [--epochs 2]
                                      [--proker-images 10000] [--proker-betas 1]
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import numpy as np
import torch
from fit_imagenet import imagenet_features
from imagenet_scale import GRID, generated

from apecli.fitting import fit
from apecli.methods.ape_t import FitSettings
from apecli.methods.grid import SearchGrid
from apecli.methods.proker import PROKER_LAMBDAS, ProkerSupport, proker_counts
from apecli.methods.tri_edge import TriEdge, search
from apecli.synthetic import synthetic_features


def timed(run):
    start = time.perf_counter()
    result = run()
    return result, time.perf_counter() - start


def warm_up(device: str) -> None:
    small = synthetic_features(num_classes=10, dim=64, shots=(4,), val_per_class=5, test_per_class=1, views=2)
    _, cache = small.cache(4)
    val = small.split("val")
    search(TriEdge.build(small.classifier, cache.keys, cache.labels, np.arange(32)), val.features, val.labels,
           SearchGrid((7.0, 7.0, 1.0), (4, 4, 2)), device=device)
    fit(small, FitSettings(epochs=1, k=32), device=device)
    proker_counts(ProkerSupport.on(small.classifier, cache.keys, cache.labels), val.features, val.labels, [1.0],
                  PROKER_LAMBDAS, device=device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", help="the device measured against the CPU (cuda, cuda:1, …)")
    parser.add_argument("--images", type=int, default=50_000, help="validation images")
    parser.add_argument("--betas", type=int, default=16, help="β values of the 200 that both devices search")
    parser.add_argument("--epochs", type=int, default=2, help="epochs of each fit (ImageNet's default is 20)")
    parser.add_argument("--proker-images", type=int, default=10_000, help="validation images of ProKeR's search")
    parser.add_argument("--proker-betas", type=int, default=1, help="β values of ProKeR's 20 that each search runs")
    args = parser.parse_args()
    name = torch.cuda.get_device_name(torch.device(args.device)) if args.device.startswith("cuda") else args.device
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"{torch.get_num_threads()} CPU threads; device {args.device}: {name}")
    for device in ("cpu", args.device):
        warm_up(device)

    text, keys, key_labels, x, labels = generated(args.images)
    tri = TriEdge.build(text, keys, key_labels, np.arange(500))  # which 500 channels does not change the cost
    head = SearchGrid((0.1 + args.betas * (GRID.scale[0] - 0.1) / GRID.steps[0], *GRID.scale[1:]),
                      (args.betas, *GRID.steps[1:]))
    print(f"search: C=1000, K=16, D=1024, k=500, {args.images:,} images")
    on_cpu, cpu_seconds = timed(lambda: search(tri, x, labels, head))
    print(f"  cpu (baseline), {head.size:,} settings ({args.betas} β): {cpu_seconds:.2f} s", flush=True)
    on_device, device_seconds = timed(lambda: search(tri, x, labels, head, device=args.device))
    differ = int((on_cpu.correct != on_device.correct).sum())
    print(f"  {args.device}, the same {head.size:,} settings: {device_seconds:.2f} s; settings counted differently: "
          f"{differ} of {head.size:,}; ratio {cpu_seconds / device_seconds:.1f}x", flush=True)
    whole, whole_seconds = timed(lambda: search(tri, x, labels, GRID, device=args.device))
    print(f"  {args.device}, the whole grid ({GRID.size:,} settings): {whole_seconds:.2f} s, best {whole.accuracy:.2f}% "
          f"at (β, α, γ) = ({whole.beta:.4g}, {whole.alpha:.4g}, {whole.gamma:.4g})", flush=True)

    features = imagenet_features(args.images)
    settings = FitSettings(epochs=args.epochs)
    print(f"fit: C=1000, K=16, D=1024, 10 views, {args.images:,} validation images, {args.epochs} epochs")
    cpu_fit, cpu_fit_seconds = timed(lambda: fit(features, settings))
    print(f"  cpu (baseline): {cpu_fit_seconds:.1f} s, {cpu_fit_seconds / args.epochs:.1f} s per epoch", flush=True)
    device_fit, device_fit_seconds = timed(lambda: fit(features, settings, device=args.device))
    print(f"  {args.device}: {device_fit_seconds:.1f} s, {device_fit_seconds / args.epochs:.1f} s per epoch; "
          f"ratio {cpu_fit_seconds / device_fit_seconds:.1f}x")
    loss_gap = np.abs(cpu_fit.loss - device_fit.loss).max() / np.abs(cpu_fit.loss).max()
    print(f"  validation accuracy per epoch: cpu {np.round(cpu_fit.val_accuracy, 3).tolist()}, "
          f"{args.device} {np.round(device_fit.val_accuracy, 3).tolist()}; largest relative loss difference "
          f"{loss_gap:.1e}; largest residual difference {np.abs(cpu_fit.adapter.residual - device_fit.adapter.residual).max():.1e}")
    proker_differ = proker(args)
    if differ:
        raise SystemExit("the searches counted differently")
    if proker_differ:
        raise SystemExit("ProKeR's searches chose differently")


def proker(args) -> bool:
    """ProKeR's search on both devices (4-shot cache), then on the device alone (16-shot); whether the two
    devices chose differently."""
    betas = [0.1 + i * (GRID.scale[0] - 0.1) / 20 for i in range(args.proker_betas)]  # the first of ProKeR's 20
    text, keys, key_labels, x, labels = generated(args.proker_images)
    four = np.flatnonzero(np.arange(key_labels.shape[0]) % 16 < 4)  # each class's first 4 keys
    print(f"proker: C=1000, D=1024, {args.proker_images:,} images, {args.proker_betas} β × {len(PROKER_LAMBDAS)} λ")
    small = ProkerSupport.on(text, keys[four], key_labels[four])
    on_cpu, cpu_seconds = timed(lambda: proker_counts(small, x, labels, betas, PROKER_LAMBDAS))
    print(f"  cpu (baseline), 4 shots ({four.size:,} keys): {cpu_seconds:.2f} s, {cpu_seconds / len(betas):.2f} s per β",
          flush=True)
    on_device, device_seconds = timed(lambda: proker_counts(small, x, labels, betas, PROKER_LAMBDAS, device=args.device))
    chose = [np.unravel_index(int(np.argmax(counts)), counts.shape) for counts in (on_cpu, on_device)]
    print(f"  {args.device}, the same: {device_seconds:.2f} s; settings counted differently: "
          f"{int((on_cpu != on_device).sum())} of {on_cpu.size} (largest difference "
          f"{int(np.abs(on_cpu - on_device).max())}); the same choice: {chose[0] == chose[1]}; "
          f"ratio {cpu_seconds / device_seconds:.1f}x", flush=True)
    full = ProkerSupport.on(text, keys, key_labels)
    _, full_seconds = timed(lambda: proker_counts(full, x, labels, betas, PROKER_LAMBDAS, device=args.device))
    print(f"  {args.device}, 16 shots ({key_labels.size:,} keys): {full_seconds:.2f} s, "
          f"{full_seconds / len(betas):.2f} s per β", flush=True)
    return chose[0] != chose[1]


if __name__ == "__main__":
    main()
