"""What only a CUDA GPU exercises: batches in flight, CUDA graphs, nvJPEG decoding, fp16 features, searches
and training there, NCCL. Skipped without one.

`bash benchmarks/gpu.sh` runs these together with the throughput benchmark on a GPU machine.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import replace

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from apecli import store
from apecli.cli import app
from apecli.datasets import read_coop
from apecli.encoder import load_encoder
from apecli.evaluate import evaluate_artifact
from apecli.extract import ExtractSettings, encode_split
from apecli.fitting import fit
from apecli.importers import import_tip_adapter
from apecli.kinds.features import load_features, save_features
from apecli.methods.ape_t import FitSettings
from apecli.methods.grid import SearchGrid
from apecli.methods.proker import PROKER_BETAS, PROKER_LAMBDAS, ProkerSupport, proker_counts
from apecli.methods.tri_edge import TriEdge, search
from apecli.refine import select_channels
from apecli.synthetic import synthetic_features

from conftest import real_dataset

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

runner = CliRunner()


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.sum(a * b, axis=-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)


def test_batches_in_flight_give_what_batches_one_by_one_give(tiny):
    encoder = load_encoder(replace(tiny, device="cuda"))
    generator = torch.Generator().manual_seed(0)
    batches = [torch.randn(64, 3, *encoder.image_size, generator=generator) for _ in range(6)]
    started = [encoder.start_encoding(batch) for batch in batches]  # all queued before any is read
    in_flight = [result() for result in started]
    one_by_one = [encoder.encode_images(batch) for batch in batches]
    for queued, alone in zip(in_flight, one_by_one):
        assert queued.dtype == np.float32 and np.abs(queued).max() > 0
        np.testing.assert_allclose(queued, alone, rtol=0, atol=1e-3)


def test_batches_replayed_from_cuda_graphs_give_the_eager_features(tiny):
    """Batches queued before any is read, a shape's second one captured and later ones replayed into the
    same output buffer: each batch's features are its own and what the eager forward pass gives."""
    from apecli.encoder import Graphs

    encoder = load_encoder(replace(tiny, device="cuda"))
    encoder.graphs = Graphs(encoder.encode_eagerly, encoder.capture_graph)  # as APECLI_CUDA_GRAPHS=1 has it
    generator = torch.Generator().manual_seed(1)
    shapes = [64, 64, 64, 40, 64, 40, 40, 64]
    batches = [torch.randn(n, 3, *encoder.image_size, generator=generator).cuda() for n in shapes]
    started = [encoder.start_encoding(batch) for batch in batches]
    graphed = [result() for result in started]
    assert encoder.graphs.failure is None
    assert sorted(encoder.graphs.replays) == [(40, 3, *encoder.image_size), (64, 3, *encoder.image_size)]
    encoder.graphs = Graphs(encoder.encode_eagerly, None)
    eager = [encoder.encode_images(batch) for batch in batches]
    exact = sum(np.array_equal(a, b) for a, b in zip(graphed, eager))
    print(f"graphed batches equal to the eager ones bit for bit: {exact} of {len(eager)}")
    for replayed, alone in zip(graphed, eager):
        np.testing.assert_allclose(replayed, alone, rtol=0, atol=1e-3)
    assert not np.allclose(graphed[1], graphed[2], atol=1e-2)  # not one buffer read twice


def test_graphs_captured_while_the_decoding_thread_runs_give_the_eager_features(tiny, caltech, tmp_path, monkeypatch):
    """With APECLI_CUDA_GRAPHS=1, --decode gpu extraction captures its batch shapes while the decoding
    thread decodes the next batches on its stream: the capture succeeds, and the features are the eager ones."""
    paths = [path for path, _ in read_coop("caltech101", caltech).splits["train"]]  # 15: batches of 2, 2, 1 a chunk
    settings = ExtractSettings(batch_size=2, workers=2, chunk_images=5, decode="gpu", read_threads=2)
    eager = load_encoder(replace(tiny, device="cuda"))
    expected, _, _ = encode_split(eager, "eager", paths, 0, tmp_path / "eager", settings, None)
    monkeypatch.setenv("APECLI_CUDA_GRAPHS", "1")
    encoder = load_encoder(replace(tiny, device="cuda"))
    graphed, ok, _ = encode_split(encoder, "graphed", paths, 0, tmp_path / "graphed", settings, None)
    assert encoder.graphs.failure is None and len(encoder.graphs.replays) == 2 and not eager.graphs.replays
    assert ok.all()
    np.testing.assert_allclose(graphed, expected, rtol=0, atol=1e-3)


def test_gpu_features_agree_with_cpu_features(tiny, caltech, tmp_path):
    paths = [path for path, _ in read_coop("caltech101", caltech).splits["test"]]
    settings = ExtractSettings(batch_size=4, chunk_images=5)
    on_cpu, _, _ = encode_split(load_encoder(tiny), "cpu", paths, 0, tmp_path / "cpu", settings, None)
    on_gpu, _, _ = encode_split(load_encoder(replace(tiny, device="cuda")), "gpu", paths, 0, tmp_path / "gpu", settings, None)
    assert cosine(on_cpu, on_gpu).min() > 0.999  # fp32 on the CPU, fp16 on the GPU


def test_extract_decodes_on_the_gpu_from_the_command_line(tiny, caltech, tmp_path):
    def extract(store: str, *extra: str):
        result = runner.invoke(app, ["extract", "--dataset", "caltech101", "--root", str(caltech), "--model", tiny.model,
                                     "--pretrained", tiny.pretrained, "--device", "cuda", "--shots", "1,2",
                                     "--views", "2", "--workers", "2", "--read-threads", "2", "--batch-size", "4", "--store",
                                     str(tmp_path / store), *extra])
        assert result.exit_code == 0, result.stderr
        return load_features(result.stdout.strip())

    pil, gpu = extract("pil"), extract("gpu", "--decode", "gpu")
    assert gpu.model["device"] == "cuda" and gpu.model["precision"] == "fp16"
    assert gpu.provenance["decode"] == "gpu" and pil.provenance["decode"] == "pil"
    print(f"JPEG decoder on the GPU: {gpu.provenance['jpeg_decoder']}")
    assert gpu.provenance["jpeg_decoder"].split()[0] in ("torchcodec", "torchvision")
    np.testing.assert_allclose(gpu.caches[2].keys, pil.caches[2].keys, rtol=0, atol=1e-6)  # training views use PIL
    for split in ("val", "test"):
        np.testing.assert_array_equal(gpu.splits[split].labels, pil.splits[split].labels)
        similarity = cosine(gpu.splits[split].features, pil.splits[split].features)
        print(f"{split}: cosine of nvJPEG features to PIL's: min {similarity.min():.5f}, mean {similarity.mean():.5f}")
        assert similarity.min() > 0.99


def test_pixels_are_normalised_on_the_gpu_bit_for_bit_as_on_the_cpu(tiny):
    from apecli.images.loading import split_transform

    pixels = split_transform(load_encoder(tiny).eval_transform)
    uint8 = torch.randint(0, 256, (4, 2, 3, 16, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    on_gpu = pixels.model_input(uint8.pin_memory(), torch.device("cuda"))
    assert on_gpu.device.type == "cuda" and on_gpu.dtype == torch.float32
    assert torch.equal(on_gpu.cpu(), pixels.model_input(uint8, "cpu"))


@pytest.mark.parametrize("resize_mode, interpolation", [("shortest", "bicubic"), ("squash", "bilinear")])
def test_a_batch_of_many_sizes_is_resized_as_torchvision_resizes_each_image_on_the_gpu(resize_mode, interpolation):
    from types import SimpleNamespace

    from torchvision.transforms.v2 import functional as F

    from apecli.images.gpu import resize_crop

    encoder = SimpleNamespace(image_size=(224, 224), preprocess_config={"resize_mode": resize_mode,
                                                                        "interpolation": interpolation})
    mode = F.InterpolationMode.BILINEAR if interpolation == "bilinear" else F.InterpolationMode.BICUBIC
    size = [224, 224] if resize_mode == "squash" else [224]
    generator = torch.Generator().manual_seed(0)
    shapes = [(375, 500), (500, 375), (333, 500), (224, 224), (375, 500), (640, 201), (300, 300), (333, 500)]
    images = {index: torch.randint(0, 256, (3, *shape), generator=generator, dtype=torch.uint8).cuda()
              for index, shape in enumerate(shapes)}
    ready = resize_crop(images, encoder)
    for index, image in images.items():  # torchvision's own uint8 resizing on the GPU, one image at a time
        alone = F.center_crop(F.resize(image, size, interpolation=mode, antialias=True), [224, 224])
        assert ready[index].is_cuda and torch.equal(ready[index], alone)


def test_photos_stored_turned_come_out_as_asked_from_the_gpu_decoder(tiny, tmp_path):
    """Every EXIF orientation, turned upright or left as stored, whether or not the decoder turns
    photos itself on the GPU (the probe says which; the provenance's decoder name, the test's output)."""
    from PIL import Image, ImageOps

    from apecli.images.gpu import RawBytes, decode_on_device, jpeg_decoder
    from apecli.images.loading import Batch, split_transform
    from apecli.synthetic import make_image

    paths = []
    for orientation in range(1, 9):
        source = make_image(tmp_path / f"plain-{orientation}.jpg", orientation % 3, orientation, size=48)
        with Image.open(source) as image:
            exif = Image.Exif()
            exif[0x0112] = orientation
            image.save(tmp_path / f"{orientation}.jpg", quality=95, exif=exif)
        paths.append(tmp_path / f"{orientation}.jpg")
    encoder = load_encoder(replace(tiny, device="cuda"))
    pixels = split_transform(encoder.eval_transform)
    decoder = jpeg_decoder(str(encoder.device))
    print(f"{decoder.name} on the GPU turns photos by their EXIF orientation itself: {decoder.turns}")
    raw = RawBytes(paths)
    for upright in (True, False):
        decoded = decode_on_device(Batch.collate([raw[i] for i in range(len(paths))]), paths, encoder, pixels, upright)
        for row, path in enumerate(paths):
            with Image.open(path) as image:
                expected = pixels.on_image((ImageOps.exif_transpose(image) if upright else image).convert("RGB"))
            assert (decoded.images[row].cpu().float() - expected.float()).abs().mean() < 3  # nvJPEG's IDCT, resampling


def test_decoding_on_its_own_stream_gives_what_the_encoders_stream_gives(tiny, tmp_path):
    """Batches decoded on the side stream, then used on the encoder's: the same pixels, in order, as
    decoded one batch at a time on the current stream and synchronised; features as the CPU's."""
    from PIL import Image

    from apecli.images.gpu import RawBytes, decode_on_device, decoded_batches
    from apecli.images.loading import Batch, split_transform
    from apecli.synthetic import make_image

    paths = [make_image(tmp_path / f"{i}.jpg", i % 3, i, size=40 + 6 * (i % 4)) for i in range(40)]
    Image.open(paths[7]).save(tmp_path / "7.png")  # not a JPEG: PIL's
    paths[7] = tmp_path / "7.png"
    encoder = load_encoder(replace(tiny, device="cuda"))
    pixels = split_transform(encoder.eval_transform)
    batches = [list(range(start, min(start + 16, len(paths)))) for start in range(0, len(paths), 16)]
    raw = RawBytes(paths)
    for batch, indices in zip(decoded_batches(paths, batches, 4, encoder, pixels), batches, strict=True):
        alone = decode_on_device(Batch.collate([raw[i] for i in indices]), paths, encoder, pixels)
        torch.cuda.synchronize()
        assert batch.indices == indices and batch.images.dtype == torch.uint8
        assert torch.equal(batch.images, alone.images)
    settings = ExtractSettings(batch_size=16, chunk_images=40, workers=4)
    on_gpu, _, _ = encode_split(encoder, "gpu", paths, 0, tmp_path / "gpu", replace(settings, decode="gpu"), None)
    on_cpu, _, _ = encode_split(load_encoder(tiny), "cpu", paths, 0, tmp_path / "cpu", settings, None)
    print(f"--decode gpu against PIL on the CPU: cosine min {cosine(on_cpu, on_gpu).min():.5f}")
    assert cosine(on_cpu, on_gpu).min() > 0.99 and cosine(on_cpu, on_gpu)[7] > 0.999  # the PNG: PIL both times


def _searched_on_both(features, k: int, grid: SearchGrid, every: int = 1):
    _, cache = features.cache(16)
    tri = TriEdge.build(features.classifier, cache.keys, cache.labels, select_channels(features, k=k).channels)
    val = features.split("val")
    x, labels = val.features[::every], val.labels[::every]
    return search(tri, x, labels, grid), search(tri, x, labels, grid, device="cuda", chunk_bytes=1 << 22)


def test_the_search_on_the_gpu_counts_what_the_cpu_counts():
    features = synthetic_features(num_classes=40, dim=128, shots=(16,), val_per_class=25, test_per_class=1,
                                  image_noise=1.5, text_noise=1.0, seed=4)
    on_cpu, on_gpu = _searched_on_both(features, 64, SearchGrid((7.0, 3.0, 1.0), (40, 20, 10)))
    print(f"generated: {len(np.unique(on_cpu.correct))} different counts; settings counted differently on the GPU: "
          f"{int((on_cpu.correct != on_gpu.correct).sum())} of {on_cpu.correct.size}")
    assert len(np.unique(on_cpu.correct)) > 20  # the settings differ, so equal counts check something
    np.testing.assert_array_equal(on_gpu.correct, on_cpu.correct)


def test_the_search_on_the_gpu_counts_what_the_cpu_counts_on_real_features():
    folder = real_dataset("caltech101")
    features = import_tip_adapter(folder, folder / "proxy_text_weights.pt", "caltech101")
    on_cpu, on_gpu = _searched_on_both(features, 400, SearchGrid((7.0, 3.0, 1.0), (200, 20, 20)), every=2)
    print(f"caltech101: settings counted differently on the GPU: {int((on_cpu.correct != on_gpu.correct).sum())} "
          f"of {on_cpu.correct.size}")
    np.testing.assert_array_equal(on_gpu.correct, on_cpu.correct)


def test_proker_on_the_gpu_counts_what_the_cpu_counts_on_real_features():
    folder = real_dataset("caltech101")
    features = import_tip_adapter(folder, folder / "proxy_text_weights.pt", "caltech101")
    regression = ProkerSupport.on(features.classifier, features.cache(16)[1].keys, features.cache(16)[1].labels)
    val = features.split("val")
    betas = [0.1 + i * 6.9 / PROKER_BETAS for i in range(PROKER_BETAS)]
    on_cpu, on_gpu = (proker_counts(regression, val.features, val.labels, betas, PROKER_LAMBDAS, device=device)
                      for device in ("cpu", "cuda"))
    print(f"caltech101, ProKeR: settings counted differently on the GPU: {int((on_cpu != on_gpu).sum())} of "
          f"{on_cpu.size}, by at most {int(np.abs(on_cpu - on_gpu).max())}; the same choice: "
          f"{np.argmax(on_gpu) == np.argmax(on_cpu)}")
    assert np.abs(on_gpu - on_cpu).max() <= 1  # cuSOLVER's eigenvectors round otherwise than LAPACK's
    assert on_cpu.flat[np.argmax(on_gpu)] >= on_cpu.max() - 1  # three settings trail the best by one image


def test_a_fit_on_the_gpu_is_the_same_twice_and_close_to_the_cpus():
    features = synthetic_features(num_classes=20, dim=64, shots=(16,), val_per_class=30, test_per_class=1,
                                  informative=1.0, text_noise=2.0, image_noise=1.5, view_noise=3.0, views=4, seed=0)
    settings = FitSettings(epochs=8, lr=1e-2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first, again = fit(features, settings, device="cuda"), fit(features, settings, device="cuda")
    nondeterministic = [str(w.message) for w in caught if "determinis" in str(w.message)]
    assert not nondeterministic, nondeterministic
    assert first.device == "cuda"
    for name in ("residual", "value_weights"):
        np.testing.assert_array_equal(getattr(first.adapter, name), getattr(again.adapter, name))
    np.testing.assert_array_equal(first.loss, again.loss)
    on_cpu = fit(features, settings)
    print(f"fit: validation accuracy per epoch, cpu {on_cpu.val_accuracy.round(2).tolist()}, "
          f"gpu {first.val_accuracy.round(2).tolist()}; largest loss difference {np.abs(on_cpu.loss - first.loss).max():.2e}")
    np.testing.assert_allclose(first.loss, on_cpu.loss, rtol=1e-2)  # float32 rounds otherwise on the GPU
    assert np.abs(first.val_accuracy - on_cpu.val_accuracy).max() <= 2.0


def test_eval_and_fit_on_the_gpu_from_the_command_line(tmp_path):
    features = synthetic_features(num_classes=8, dim=64, shots=(4,), val_per_class=10, test_per_class=10, views=2)
    path = save_features(features, tmp_path / "f.h5").artifact.path

    def run(*arguments: str) -> dict:
        result = runner.invoke(app, [*arguments, "--device", "cuda", "--store", str(tmp_path / "s"), "--json"])
        assert result.exit_code == 0, result.stderr
        return json.loads(result.stdout)

    assert run("eval", str(path), "--mode", "training-free")["device"] == "cuda"
    assert run("eval", str(path), "--mode", "tip-adapter-f")["device"] == "cuda"
    assert run("eval", str(path), "--mode", "proker")["device"] == "cuda"
    fitted = run("fit", str(path), "--epochs", "3")
    assert fitted["device"] == "cuda"
    adapter = next((tmp_path / "s").rglob("fit-*.h5"))
    evaluation = run("eval", str(adapter), "--mode", "training-required")
    assert evaluation["device"] == "cuda"
    on_cpu = evaluate_artifact(store.open_artifact(adapter, ["adapter"]), "training-required")
    assert (evaluation["alpha"], evaluation["beta"], evaluation["val_accuracy"]) == (on_cpu.alpha, on_cpu.beta,
                                                                                     on_cpu.val_accuracy)


def test_the_nccl_calls_of_extraction_work_in_a_group_of_one(tmp_path):
    """Two ranks need two GPUs; on one, a process group of one takes the calls several ranks make through
    NCCL: the barrier on the GPU join() chose, rank 0's decision broadcast, and leaving."""
    import torch.distributed as dist

    from apecli.distributed import Ranks, agree, backend_for, barrier, leave

    if not dist.is_nccl_available():
        pytest.skip("this torch was built without NCCL")
    assert backend_for("cuda:0") == "nccl"
    torch.cuda.set_device(0)  # as join() does before joining
    dist.init_process_group("nccl", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    several = Ranks(0, 2)  # the calls several ranks make; the group itself has one
    try:
        barrier(several)
        assert agree(several, {"request": "abc", "chunks": [1, 2]}) == {"request": "abc", "chunks": [1, 2]}
    finally:
        leave(several)
    assert not dist.is_initialized()
