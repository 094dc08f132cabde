"""Extraction throughput: decoding, encoding, and apecli's loader that overlaps them.

On generated 500 × 375 JPEGs, measures images per second of
- decode: PIL decoding + the evaluation transform in --workers processes, no encoder;
- encode: the encoder alone on ready tensors;
- apecli: `apecli.extract.encode_split`, the extraction loop (decoding in --workers processes
  overlapped with encoding), and the same loop with decoding in the main process (--workers 0),
  which is the baseline the ratio is taken against;
- on a CUDA device also: JPEG decoding on the GPU alone, with each decoder that works there (TorchCodec,
  torchvision), and the extraction loop with --decode gpu (the decoder it picks), with the cosine
  similarity of its features to the default path's on the same images.
The share of time spent decoding is that of a serial loop: decode / (decode + encode) per image.

    python benchmarks/extract_throughput.py --model ViT-B-16 --images 64            # CPU, encoder-bound
    python benchmarks/extract_throughput.py --model tiny --images 512               # CPU, decoding-bound
    python benchmarks/extract_throughput.py --model ViT-B-16 --images 4096 --batch-size 256 --workers 16 --device cuda
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np


def make_jpegs(folder: Path, count: int) -> list[Path]:
    """``count`` 500 × 375 JPEGs: a colour per image, a gradient, and noise cut from one shared field."""
    from PIL import Image

    rng = np.random.default_rng(0)
    field = rng.normal(scale=40, size=(375 + 64, 500 + 64, 3)).astype(np.float32)
    gradient = np.linspace(0, 80, 500, dtype=np.float32)[None, :, None]
    paths = []
    for index in range(count):
        top, left = rng.integers(0, 64, size=2)
        base = rng.integers(0, 255, size=(1, 1, 3))
        pixels = np.clip(base + field[top : top + 375, left : left + 500] + gradient, 0, 255).astype(np.uint8)
        path = folder / f"{index:05d}.jpg"
        Image.fromarray(pixels).save(path, quality=90)
        paths.append(path)
    return paths


def main() -> None:
    import torch

    from apecli.encoder import EncoderSpec, load_encoder
    from apecli.extract import ExtractSettings, encode_split
    from apecli import images
    from apecli.errors import ApecliError
    from apecli.images import Batch, PilImages, RawBytes, decode_on_device, read_batches

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="ViT-B-16", help="open_clip model (random weights: same cost), or 'tiny'")
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1))
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()

    shown = args.model
    with tempfile.TemporaryDirectory() as folder:
        if args.model == "tiny":  # decoding-bound: the encoder costs almost nothing
            from apecli.synthetic import tiny_model_config

            args.model = str(tiny_model_config(Path(folder)))
        encoder = load_encoder(EncoderSpec(args.model, "none", args.device))
        paths = make_jpegs(Path(folder), args.images)

        def rate(run) -> float:
            start = time.perf_counter()
            run()
            if encoder.device.type == "cuda":
                torch.cuda.synchronize()
            return args.images / (time.perf_counter() - start)

        def decode(workers: int) -> None:
            loader = torch.utils.data.DataLoader(PilImages(paths, encoder.eval_transform, 0, 1), batch_size=args.batch_size,
                                                 num_workers=workers, collate_fn=Batch.collate)
            for _ in loader:
                pass

        def decode_gpu() -> None:  # files read by threads, as extraction reads them for --decode gpu
            batches = [list(range(start, min(start + args.batch_size, len(paths))))
                       for start in range(0, len(paths), args.batch_size)]
            for batch in read_batches(paths, batches, args.workers):
                decode_on_device(batch, paths, encoder, encoder.device)

        batch = torch.randn(args.batch_size, 3, *encoder.image_size, device=encoder.device)
        encoder.encode_images(batch)  # warm-up: the kernels for this batch size
        raw = RawBytes(paths[:8])
        warm_up = Batch.collate([raw[i] for i in range(len(raw))])

        def decoders_on_device() -> dict[str, float]:
            """GPU decoding's rate with each decoder that works on the device, alone."""
            rates, preferred = {}, images.DECODERS
            try:
                for entry in preferred:
                    images.DECODERS = (entry,)
                    images.jpeg_decoder.cache_clear()
                    try:
                        name = images.jpeg_decoder(str(encoder.device)).name
                    except ApecliError as failure:
                        print(failure)
                        continue
                    decode_on_device(warm_up, paths, encoder, encoder.device)  # warm-up: this decoder's state
                    rates[name] = rate(decode_gpu)
            finally:
                images.DECODERS = preferred
                images.jpeg_decoder.cache_clear()
            return rates

        def encode() -> None:  # ready tensors already on the device, batches queued back to back
            pending = [encoder.start_encoding(batch) for _ in range(0, args.images, args.batch_size)]
            for result in pending:
                result()

        features = {}

        def extraction(workers: int, decode: str = "pil") -> None:
            settings = ExtractSettings(batch_size=args.batch_size, workers=workers, chunk_images=args.images, decode=decode)
            with tempfile.TemporaryDirectory() as work:
                features[decode], _, _ = encode_split(encoder, "test", paths, 0, Path(work), settings, None)

        decode_one, decode_many = rate(lambda: decode(0)), rate(lambda: decode(args.workers))
        encode_rate = rate(encode)
        serial, overlapped = rate(lambda: extraction(0)), rate(lambda: extraction(args.workers))
        on_gpu = encoder.device.type == "cuda"
        if on_gpu:
            gpu_decode = decoders_on_device()
            decode_on_device(warm_up, paths, encoder, encoder.device)
            gpu_end_to_end = rate(lambda: extraction(args.workers, "gpu"))
    device = torch.cuda.get_device_name(0) if encoder.device.type == "cuda" else f"CPU ({os.cpu_count()} cores)"
    share = (1 / decode_one) / (1 / decode_one + 1 / encode_rate)
    print(f"machine: {platform.machine()}, {device}, torch {torch.__version__}; {shown} {encoder.spec.resolved_precision()}, "
          f"{args.images} JPEGs 500x375, batch {args.batch_size}, {args.workers} workers")
    print(f"decode (PIL + eval transform): {decode_one:8.1f} img/s in 1 process, {decode_many:8.1f} img/s in {args.workers} workers")
    print(f"encode alone:                  {encode_rate:8.1f} img/s")
    print(f"share of a serial loop's time spent decoding: {share:.0%}")
    print(f"apecli extraction, decoding in the main process (baseline): {serial:8.1f} img/s")
    print(f"apecli extraction, {args.workers} decoding workers overlapped:     {overlapped:8.1f} img/s; "
          f"ratio {overlapped / serial:.2f}x; {overlapped / min(decode_many, encode_rate):.0%} of the slower stage's ceiling")
    if on_gpu:
        for name, value in gpu_decode.items():
            print(f"decode on the GPU with {name} (bytes read by {args.workers} threads, resize/crop/normalise): {value:8.1f} img/s")
        print(f"apecli extraction with --decode gpu ({images.jpeg_decoder(str(encoder.device)).name}): "
              f"{gpu_end_to_end:8.1f} img/s; ratio {gpu_end_to_end / serial:.2f}x "
              f"to the baseline, {gpu_end_to_end / overlapped:.2f}x to the PIL path")
        pil, gpu = (features[d] / np.linalg.norm(features[d], axis=1, keepdims=True) for d in ("pil", "gpu"))
        cosine = np.sum(pil * gpu, axis=1)
        print(f"cosine of --decode gpu features to the PIL path's: min {cosine.min():.5f}, mean {cosine.mean():.5f}, "
              f"median {np.median(cosine):.5f}")


if __name__ == "__main__":
    main()
