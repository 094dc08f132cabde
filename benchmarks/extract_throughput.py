"""Extraction throughput: decoding, encoding, and apecli's extraction loop that overlaps them.

On generated 500 × 375 JPEGs (or, with --sizes varied, JPEGs whose width and height are each drawn
from 200 to 640 pixels, so that nearly every image has a size of its own, as photos gathered from many
sources have), measures images per second of
- PIL decoding in --workers loader processes alone: what extraction's workers do (decode, resize,
  crop, hand over uint8 pixels in pieces), received and dropped, the ceiling of the default path; the
  same received as extraction receives it (pinned, moved to the device, joined, normalised) with no
  encoder; and, for comparison with earlier figures, the model's whole transform in --workers
  processes, a batch each;
- the encoder alone, on ready tensors;
- apecli's extraction (`apecli.extract.encode_split`) with --workers loader processes, and, as the
  baseline the ratio is taken against, with decoding in the main process (--workers 0, on the first
  --baseline-images images: it runs at a single core's pace);
- on a CUDA device also: JPEG decoding on the GPU alone (bytes read by --read-threads threads, decoded,
  resized, cropped and normalised on the decoding stream) and extraction with --decode gpu end to end,
  each with every decoder that works there (TorchCodec, torchvision), and the cosine similarity of the
  --decode gpu features to the default path's on the same images. The encoder alone and --decode gpu
  are measured twice, alternately: with recurring batch shapes replayed from CUDA graphs (as
  APECLI_CUDA_GRAPHS=1 runs them), and with the encoder eager (every kernel launched from Python, the
  default), the baseline of the graphs' ratio, --repeat times, which goes first alternating. The other
  figures are the default's.
--repeat N measures the loader's ceiling and the extraction loops N times, alternately, since a shared
machine's ceiling moves between runs. One more run of each extraction loop tells where its main thread
spends the time: waiting for batches, queueing the encoder's work, waiting for the features, the rest.

    python benchmarks/extract_throughput.py --model ViT-B-16 --images 64            # CPU, encoder-bound
    python benchmarks/extract_throughput.py --model tiny --images 512               # CPU, decoding-bound
    python benchmarks/extract_throughput.py --model ViT-B-16 --images 8192 --batch-size 256 --workers 16 --device cuda --repeat 2
    python benchmarks/extract_throughput.py --model ViT-B-16 --images 8192 --batch-size 256 --workers 16 --device cuda \
        --repeat 4 --gpu-only                                                    # a short GPU check of --decode gpu
    python benchmarks/extract_throughput.py ... --sizes varied                   # images of many sizes
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

SIZES = {"fixed": "500x375", "varied": "200-640 x 200-640"}


def make_jpegs(folder: Path, count: int, varied: bool = False) -> list[Path]:
    """``count`` JPEGs, 500 × 375 or (``varied``) of widths and heights drawn from 200 to 640: a colour
    per image, a gradient, and noise cut from one shared field."""
    from PIL import Image

    rng = np.random.default_rng(0)
    field = rng.normal(scale=40, size=(640 + 64, 640 + 64, 3)).astype(np.float32)
    corners, bases = rng.integers(0, 64, size=(count, 2)), rng.integers(0, 255, size=(count, 1, 1, 3))
    sizes = rng.integers(200, 641, size=(count, 2)) if varied else np.tile([500, 375], (count, 1))

    def write(index: int) -> Path:
        (top, left), (width, height) = corners[index], sizes[index]
        gradient = np.linspace(0, 80, width, dtype=np.float32)[None, :, None]
        pixels = np.clip(bases[index] + field[top : top + height, left : left + width] + gradient, 0, 255).astype(np.uint8)
        path = folder / f"{index:05d}.jpg"
        Image.fromarray(pixels).save(path, quality=90)
        return path

    with ThreadPoolExecutor(os.cpu_count()) as pool:  # PIL encodes without the GIL
        return list(pool.map(write, range(count)))


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row by row."""
    return np.sum(a * b, axis=1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


def main_thread_time(encoder, run) -> dict[str, float]:
    """Seconds extraction's main thread spends in one ``run()``: waiting for the next batch from the
    loader or the decoding thread, queueing the encoder's work (``start_encoding``), waiting for the
    features, and the rest (joining pieces, saving chunks, progress), with the whole as "run"."""
    from apecli import extract

    spent = dict.fromkeys(("waiting for batches", "queueing the encoder", "waiting for features"), 0.0)

    def timed_batches(source):
        def batches(*args, **kwargs):
            inner = source(*args, **kwargs)
            try:
                while True:
                    start = time.perf_counter()
                    try:
                        batch = next(inner)
                    except StopIteration:
                        return
                    finally:
                        spent["waiting for batches"] += time.perf_counter() - start
                    yield batch
            finally:
                inner.close()
        return batches

    def start_encoding(batch):
        start = time.perf_counter()
        result = type(encoder).start_encoding(encoder, batch)
        spent["queueing the encoder"] += time.perf_counter() - start

        def features():
            start = time.perf_counter()
            try:
                return result()
            finally:
                spent["waiting for features"] += time.perf_counter() - start
        return features

    sources = extract.decoded_batches, extract.pil_batches
    extract.decoded_batches, extract.pil_batches = (timed_batches(source) for source in sources)
    encoder.start_encoding = start_encoding
    start = time.perf_counter()
    try:
        run()
    finally:
        extract.decoded_batches, extract.pil_batches = sources
        del encoder.start_encoding
    whole = time.perf_counter() - start
    return {**spent, "the rest": whole - sum(spent.values()), "run": whole}


def main() -> None:
    import torch

    from apecli.encoder import EncoderSpec, Graphs, load_encoder
    from apecli.errors import ApecliError
    from apecli.extract import ExtractSettings, default_read_threads, encode_split
    from apecli.images import gpu as images
    from apecli.images.gpu import decoded_batches
    from apecli.images.loading import LOADER_TENSORS, Batch, PilImages, pieces, pil_batches, split_transform

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="ViT-B-16", help="open_clip model (random weights: same cost), or 'tiny'")
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1), help="PIL loader processes")
    parser.add_argument("--read-threads", type=int, default=default_read_threads(),
                        help="threads reading the files for --decode gpu (default: extract's)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--baseline-images", type=int, default=512, help="images the single-process rates are taken on")
    parser.add_argument("--repeat", type=int, default=1, help="times the ceiling and the extraction loops are measured")
    parser.add_argument("--gpu-only", action="store_true", help="the encoder, the baseline and the --decode gpu steps alone")
    parser.add_argument("--sizes", choices=sorted(SIZES), default="fixed", help="the JPEGs' sizes (see above)")
    args = parser.parse_args()

    shown = args.model
    with tempfile.TemporaryDirectory() as folder:
        if args.model == "tiny":  # decoding-bound: the encoder costs almost nothing
            from apecli.synthetic import tiny_model_config

            args.model = str(tiny_model_config(Path(folder)))
        encoder = load_encoder(EncoderSpec(args.model, "none", args.device))
        on_gpu = encoder.device.type == "cuda"
        if args.gpu_only and not on_gpu:
            parser.error("--gpu-only needs a CUDA device")
        paths = make_jpegs(Path(folder), args.images, args.sizes == "varied")
        few = paths[: min(args.baseline_images, len(paths))]
        pixels = split_transform(encoder.eval_transform)
        batches = [list(range(start, min(start + args.batch_size, len(paths)))) for start in range(0, len(paths), args.batch_size)]

        def rate(run, count: int = args.images) -> float:
            start = time.perf_counter()
            run()
            if on_gpu:
                torch.cuda.synchronize()
            return count / (time.perf_counter() - start)

        def decode_whole(subset: list[Path], workers: int) -> None:  # the whole transform, a batch per worker
            loader = torch.utils.data.DataLoader(PilImages(subset, encoder.eval_transform, 0, 1), batch_size=args.batch_size,
                                                 num_workers=workers, collate_fn=Batch.collate)
            for _ in loader:
                pass

        def workers_alone() -> None:  # what extraction's workers do, handed over and dropped: the PIL ceiling
            loader = torch.utils.data.DataLoader(PilImages(paths, pixels.on_image, 0, 1), batch_sampler=pieces(batches, 0),
                                                 num_workers=args.workers, collate_fn=Batch.collate)
            for _ in loader:
                pass

        def loader_alone() -> None:  # extraction without its encoder: pieces pinned, moved and joined on the device
            for batch in pil_batches(paths, batches, pixels.on_image, 0, 1, args.workers, encoder.device):
                pixels.model_input(batch.images, encoder.device)

        def decode_gpu() -> None:  # what --decode gpu does before the encoder
            for batch in decoded_batches(paths, batches, args.read_threads, encoder, pixels):
                pixels.model_input(batch.images, encoder.device)

        # the encoder as APECLI_CUDA_GRAPHS=1 runs it, and eager (the default, and the graphs' baseline)
        graphed, eager = Graphs(encoder.encode_eagerly, encoder.capture_graph if on_gpu else None), Graphs(encoder.encode_eagerly, None)
        batch = torch.randn(args.batch_size, 3, *encoder.image_size, device=encoder.device)

        def with_graphs(on: bool, measure):
            """``measure()`` with the encoder's CUDA graphs, or with every batch eager (the default)."""
            encoder.graphs = graphed if on else eager
            try:
                return measure()
            finally:
                encoder.graphs = eager

        for on in (False, True):  # warm-up: the kernels for this batch size, and on CUDA its graph
            with_graphs(on, lambda: [encoder.encode_images(batch) for _ in range(2)])

        def encode() -> None:  # ready tensors already on the device, batches queued back to back
            pending = [encoder.start_encoding(batch) for _ in range(0, args.images, args.batch_size)]
            for result in pending:
                result()

        features = {}

        def extraction(subset: list[Path], workers: int, decode: str = "pil") -> None:
            settings = ExtractSettings(batch_size=args.batch_size, workers=workers, chunk_images=len(subset), decode=decode,
                                       read_threads=args.read_threads)
            with tempfile.TemporaryDirectory() as work:
                features[decode], _, _ = encode_split(encoder, "test", subset, 0, Path(work), settings, None)

        def each_decoder(measure) -> dict[str, float]:
            """``measure()`` with each JPEG decoder that works on the device, after a warm-up."""
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
                    for _ in decoded_batches(paths[:8], [list(range(8))], 1, encoder, pixels):
                        pass  # warm-up: this decoder's state
                    rates[name] = measure()
            finally:
                images.DECODERS = preferred
                images.jpeg_decoder.cache_clear()
            return rates

        def both_ways(measure) -> list[tuple]:
            """(eager, with CUDA graphs) ``measure()``, --repeat times; which goes first alternates."""
            return [tuple(reversed([with_graphs(on, measure) for on in (True, False)])) if turn % 2 else
                    tuple(with_graphs(on, measure) for on in (False, True)) for turn in range(args.repeat)]

        encodes = both_ways(lambda: rate(encode)) if on_gpu else [(rate(encode), None)]
        encode_rate = float(np.mean([eager for eager, _ in encodes]))
        encode_graphed = float(np.mean([graphed for _, graphed in encodes])) if on_gpu else None
        serial = rate(lambda: extraction(few, 0), len(few))
        decode_one = rate(lambda: decode_whole(few, 0), len(few))
        whole_many = None if args.gpu_only else rate(lambda: decode_whole(paths, args.workers))
        ceilings, loaders, overlapped = [], [], []
        for _ in range(0 if args.gpu_only else args.repeat):
            ceilings.append(rate(workers_alone))
            loaders.append(rate(loader_alone))
            overlapped.append(rate(lambda: extraction(paths, args.workers)))
        pil_times = None if args.gpu_only else main_thread_time(encoder, lambda: extraction(paths, args.workers))
        if on_gpu:
            gpu_decode = each_decoder(lambda: rate(decode_gpu))
            gpu_end_to_end = each_decoder(lambda: both_ways(lambda: rate(lambda: extraction(paths, args.workers, "gpu"))))
            gpu_times = {on: with_graphs(on, lambda: main_thread_time(encoder, lambda: extraction(paths, args.workers, "gpu")))
                         for on in (False, True)}
            both = []  # the features of --decode gpu with CUDA graphs and eager
            for on in (True, False):
                with_graphs(on, lambda: extraction(few, args.workers, "gpu"))
                both.append(features["gpu"])
            if not args.gpu_only:
                extraction(paths, args.workers, "gpu")  # with the preferred decoder, for the features
    device = torch.cuda.get_device_name(0) if on_gpu else f"CPU ({os.cpu_count()} cores)"
    share = (1 / decode_one) / (1 / decode_one + 1 / encode_rate)
    runs = lambda values: ", ".join(f"{value:,.1f}" for value in values)  # noqa: E731

    def shares(times: dict[str, float]) -> str:
        return f"{times['run']:.2f} s: " + ", ".join(f"{what} {seconds / times['run']:.0%}" for what, seconds in times.items()
                                                      if what != "run")
    print(f"machine: {platform.machine()}, {device}, torch {torch.__version__}; {shown} {encoder.spec.resolved_precision()}, "
          f"{args.images} JPEGs {SIZES[args.sizes]}, batch {args.batch_size}, {args.workers} workers, "
          + (f"{args.read_threads} reading threads, " if on_gpu else "") + "loader pieces of "
          f"{LOADER_TENSORS} images")
    print(f"decode (PIL + whole eval transform): {decode_one:8.1f} img/s in 1 process ({len(few)} images)"
          + ("" if whole_many is None else f", {whole_many:8.1f} img/s in {args.workers} workers (a batch each)"))
    print(f"encode alone:                        {encode_rate:8.1f} img/s"
          + ("" if encode_graphed is None else f" eager (the default), {encode_graphed:8.1f} img/s with CUDA graphs, "
                                               f"ratio {encode_graphed / encode_rate:.2f}x (means of {args.repeat})"))
    if graphed.failure:
        print(f"CUDA graph capture failed: {graphed.failure}")
    print(f"share of a serial loop's time spent decoding: {share:.0%}")
    print(f"apecli extraction, decoding in the main process (baseline, {len(few)} images): {serial:8.1f} img/s")
    for number, (ceiling, loader, value) in enumerate(zip(ceilings, loaders, overlapped), 1):
        print(f"run {number}: {args.workers} PIL workers alone (the ceiling): {ceiling:8.1f} img/s; extraction without "
              f"the encoder: {loader:8.1f} img/s; extraction, default path: {value:8.1f} img/s, {value / ceiling:.0%} of the ceiling, "
              f"ratio {value / serial:.2f}x to the baseline, {value / min(ceiling, encode_rate):.0%} of the slower stage")
    if pil_times is not None:
        print(f"extraction's main thread in one more run of the default path, {shares(pil_times)}")
    if on_gpu:
        for name, value in gpu_decode.items():
            print(f"decode on the GPU with {name} (bytes read by {args.read_threads} threads, resize/crop/normalise): {value:8.1f} img/s")
        for name, pairs in gpu_end_to_end.items():
            values, graphs = [a for a, _ in pairs], [b for _, b in pairs]
            print(f"apecli extraction with --decode gpu ({name}): {runs(values)} img/s (mean {np.mean(values):,.1f}); "
                  f"ratio {np.mean(values) / serial:.2f}x to the baseline, "
                  f"{np.mean(values) / min(encode_rate, gpu_decode[name]):.0%} of the slower stage; "
                  f"with CUDA graphs: {runs(graphs)} img/s (mean {np.mean(graphs):,.1f}), "
                  f"graphs/eager {np.mean(graphs) / np.mean(values):.2f}x")
        for on, times in gpu_times.items():
            print(f"extraction's main thread in one more run of --decode gpu ({images.jpeg_decoder(str(encoder.device)).name}, "
                  f"{'CUDA graphs' if on else 'eager'}), {shares(times)}")
        same = np.all(both[0] == both[1], axis=1)
        print(f"features with CUDA graphs against eager ({len(few)} images, --decode gpu): {same.sum()} equal bit for bit, "
              f"largest difference {np.abs(both[0] - both[1]).max():.2e}, min cosine {cosine(*both).min():.6f}")
        if args.gpu_only:
            return
        cosines = cosine(features["pil"], features["gpu"])
        print(f"cosine of --decode gpu features ({images.jpeg_decoder(str(encoder.device)).name}) to the PIL path's: "
              f"min {cosines.min():.5f}, mean {cosines.mean():.5f}, median {np.median(cosines):.5f}")


if __name__ == "__main__":
    main()
