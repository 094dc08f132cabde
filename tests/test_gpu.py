"""What only a CUDA GPU exercises: batches in flight, nvJPEG decoding, fp16 features. Skipped without one.

`bash benchmarks/gpu.sh` runs these together with the throughput benchmark on a GPU machine.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from apecli.cli import app
from apecli.datasets import read_coop
from apecli.encoder import load_encoder
from apecli.extract import ExtractSettings, encode_split
from apecli.features import load_features

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
                                     "--views", "2", "--workers", "2", "--batch-size", "4", "--store",
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
