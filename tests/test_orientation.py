"""Photos turned upright by their EXIF orientation tag: read from the bytes, applied as PIL applies it, on
both decoding paths, on by default for your own images and off for the CoOp benchmarks."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from apecli.cli import app
from apecli.images.exif import TRANSPOSES, exif_orientation
from apecli.kinds.features import load_features
from apecli.synthetic import coop_caltech, image_folder, tiny_model_config

runner = CliRunner()


def _pixels(height: int = 24, width: int = 40, seed: int = 0) -> np.ndarray:
    """An image no turn or flip leaves the same: a gradient each way, and noise."""
    rng = np.random.default_rng(seed)
    rows, cols = np.mgrid[0:height, 0:width]
    pixels = np.stack([rows * 200 // height, cols * 200 // width, (rows + cols) % 7 * 30], axis=-1)
    return np.clip(pixels + rng.normal(scale=10, size=pixels.shape), 0, 255).astype(np.uint8)


def _jpeg(orientation: int | None, pixels: np.ndarray | None = None, **options) -> bytes:
    from PIL import Image

    image, encoded = Image.fromarray(_pixels() if pixels is None else pixels), io.BytesIO()
    if orientation is not None:
        exif = Image.Exif()
        exif[0x010F] = "apecli"  # another tag before it: the reader walks the directory
        exif[0x0112] = orientation
        options["exif"] = exif
    image.save(encoded, "JPEG", quality=95, **options)
    return encoded.getvalue()


def _big_endian(orientation: int) -> bytes:
    """A JPEG whose EXIF is in Motorola byte order (PIL writes Intel's), after a JFIF segment."""
    tiff = b"MM\x00\x2a" + (8).to_bytes(4, "big") + (1).to_bytes(2, "big")  # header, then one entry:
    tiff += (0x0112).to_bytes(2, "big") + (3).to_bytes(2, "big") + (1).to_bytes(4, "big")  # tag, SHORT, 1 value
    tiff += orientation.to_bytes(2, "big") + b"\0\0" + (0).to_bytes(4, "big")  # the value; no next directory
    app1 = b"Exif\x00\x00" + tiff
    plain = _jpeg(None)
    assert plain[2:4] == b"\xff\xe0"  # SOI, then PIL's JFIF segment
    end = 4 + int.from_bytes(plain[4:6], "big")
    return plain[:end] + b"\xff\xe1" + (len(app1) + 2).to_bytes(2, "big") + app1 + plain[end:]


@pytest.mark.parametrize("orientation", [None, *range(1, 9)])
def test_the_orientation_is_read_from_the_bytes_as_pil_reads_it(orientation):
    from PIL import Image

    for data in (_jpeg(orientation), _big_endian(orientation or 1)):
        with Image.open(io.BytesIO(data)) as image:
            told = image.getexif().get(0x0112, 1)
        assert exif_orientation(np.frombuffer(data, dtype=np.uint8)) == told
    assert exif_orientation(np.frombuffer(_jpeg(orientation), dtype=np.uint8)) == (orientation or 1)
    assert exif_orientation(_big_endian(orientation or 1)) == (orientation or 1)


def test_bytes_that_say_nothing_clear_are_left_as_stored():
    from PIL import Image

    six = _jpeg(6)
    start = six.index(b"Exif")
    png = io.BytesIO()
    Image.fromarray(_pixels()).save(png, "PNG")
    for data in (b"", b"\xff\xd8", six[: start + 12], png.getvalue(), six[:start] + b"Exit" + six[start + 4:],
                 _big_endian(9), _big_endian(0)):
        assert exif_orientation(np.frombuffer(data, dtype=np.uint8)) == 1


def test_a_damaged_exif_block_is_read_as_pil_reads_it(tmp_path):
    import warnings

    from PIL import Image

    from apecli.images.loading import open_rgb as _open_rgb

    six = _jpeg(6)
    start = six.index(b"Exif") + 6  # the TIFF header
    damaged = {"byte order": six[:start] + b"XX" + six[start + 2:],
               "directory past the end": six[:start + 4] + b"\xff\xff\xff\x7f" + six[start + 8:],
               "too many entries": six[:start + 8] + b"\xff\xff" + six[start + 10:]}
    for name, data in damaged.items():
        path = tmp_path / f"{name}.jpg"
        path.write_bytes(data)
        with warnings.catch_warnings():  # PIL's own, of the damage, as it opens the file
            warnings.simplefilter("ignore")
            with Image.open(path) as image:
                told = image.getexif().get(0x0112, 1)
            size = _open_rgb(path, upright=True).size
        assert exif_orientation(np.frombuffer(data, dtype=np.uint8)) == told, name
        assert size == ((24, 40) if told == 6 else (40, 24)), name  # read, and turned where PIL reads a 6


@pytest.mark.parametrize("orientation", range(1, 9))
def test_a_tensor_is_turned_upright_as_pil_turns_the_image(orientation):
    import torch
    from PIL import Image

    from apecli.images.exif import turn_upright as _upright

    stored = _pixels(5, 7)
    expected = Image.fromarray(stored)
    if orientation in TRANSPOSES:
        expected = expected.transpose(TRANSPOSES[orientation])
    turned = _upright(torch.from_numpy(stored).permute(2, 0, 1), orientation)
    assert np.array_equal(turned.permute(1, 2, 0).numpy(), np.asarray(expected))


@pytest.mark.parametrize("library", ["torchcodec", "torchvision"])
def test_both_decoding_paths_turn_a_photo_upright_when_asked(tiny, tmp_path, monkeypatch, library):
    """Photos stored turned (every orientation): PIL's path and the device path (on the CPU here, with
    either decoder: TorchCodec's turns photos itself, torchvision's does not) turn them as photo viewers
    do when asked, and leave them as stored otherwise."""
    import torch
    from PIL import Image, ImageOps

    from apecli.encoder import load_encoder
    from apecli.images import gpu as images
    from apecli.images.gpu import RawBytes, decode_on_device
    from apecli.images.loading import Batch, PilImages, split_transform

    monkeypatch.setattr(images, "DECODERS", tuple(entry for entry in images.DECODERS if entry[0] == library))
    images.jpeg_decoder.cache_clear()
    paths = []
    for orientation in range(1, 9):
        paths.append(tmp_path / f"{orientation}.jpg")
        paths[-1].write_bytes(_jpeg(orientation, _pixels(48, 80, seed=orientation)))
    encoder = load_encoder(tiny)
    pixels = split_transform(encoder.eval_transform)
    raw = RawBytes(paths)
    try:
        assert images.jpeg_decoder("cpu").name.startswith(library)
        for upright in (True, False):
            decoded = decode_on_device(Batch.collate([raw[i] for i in range(len(paths))]), paths, encoder, pixels, upright)
            for row, path in enumerate(paths):
                with Image.open(path) as image:
                    expected = pixels.on_image((ImageOps.exif_transpose(image) if upright else image).convert("RGB"))
                _, on_pil, _ = PilImages(paths, pixels.on_image, 0, 1, upright)[row]
                assert torch.equal(on_pil, expected)
                assert (decoded.images[row].float() - expected.float()).abs().mean() < 2  # the resamplers' rounding
    finally:
        images.jpeg_decoder.cache_clear()


@pytest.fixture
def sideways_photos(tmp_path):
    """Your own photos, a folder per class, with each class's first photo stored sideways (orientation 6)."""
    from PIL import Image

    folder = image_folder(tmp_path / "photos", classes=2, per_class=6)
    for label in range(2):
        path = folder / f"class_{label}" / "0.jpg"
        with Image.open(path) as image:
            pixels = np.rot90(np.asarray(image.convert("RGB")), 1)  # stored turned a quarter anticlockwise
        path.write_bytes(_jpeg(6, np.ascontiguousarray(pixels)))
    tiny_model_config(tmp_path)
    return tmp_path


def _extract(folder: Path, *extra: str):
    result = runner.invoke(app, ["extract", *extra, "--model", str(folder / "apecli-tiny.json"), "--pretrained", "none",
                                 "--views", "1", "--workers", "0", "--device", "cpu", "--store", str(folder / "store")],
                           env={"HF_HUB_OFFLINE": "1"})
    assert result.exit_code == 0, result.output
    return load_features(Path(result.stdout.strip().splitlines()[-1]))


def test_your_own_photos_are_upright_by_default_and_recorded_so(sideways_photos):
    photos = str(sideways_photos / "photos")
    upright = _extract(sideways_photos, "--images", photos)
    as_stored = _extract(sideways_photos, "--images", photos, "--no-exif-orientation")
    again = _extract(sideways_photos, "--images", photos, "--exif-orientation")
    assert upright.provenance["exif_orientation"] is True and as_stored.provenance["exif_orientation"] is False
    assert again.artifact.content_id == upright.artifact.content_id != as_stored.artifact.content_id
    _, cache = upright.cache(max(upright.shots))
    _, stored_cache = as_stored.cache(max(as_stored.shots))
    turned = [n for n, path in enumerate(cache.paths) if Path(path).name == "0.jpg"]
    unturned = [n for n, path in enumerate(cache.paths) if Path(path).name != "0.jpg"]
    assert turned and unturned
    np.testing.assert_array_equal(cache.keys[unturned], stored_cache.keys[unturned])  # no tag: the same
    assert np.abs(cache.keys[turned] - stored_cache.keys[turned]).max() > 1e-3


def test_the_coop_benchmarks_are_read_as_stored_unless_asked(sideways_photos):
    coop_caltech(sideways_photos / "data", classes=2, per_split=(4, 2, 2))
    read = _extract(sideways_photos, "--dataset", "caltech101", "--root", str(sideways_photos / "data"), "--shots", "1")
    assert read.provenance["exif_orientation"] is False
    asked = _extract(sideways_photos, "--dataset", "caltech101", "--root", str(sideways_photos / "data"), "--shots", "1",
                     "--exif-orientation")
    assert asked.provenance["exif_orientation"] is True and asked.artifact.content_id != read.artifact.content_id


def test_predict_turns_new_photos_as_the_features_were_turned(sideways_photos):
    """A sideways photo and a lossless upright copy of what it shows: the same predictions where the
    features were made upright, others where they were made as stored."""
    from PIL import Image, ImageOps

    from apecli.evaluate import evaluate_artifact
    from apecli.kinds.evaluation import save_evaluation
    from apecli.predict import predict

    photo = sideways_photos / "photos" / "class_1" / "0.jpg"
    copy = sideways_photos / "upright.png"
    with Image.open(photo) as image:
        ImageOps.exif_transpose(image).convert("RGB").save(copy)  # no tag, the pixels as a viewer shows them
    outcomes = {}
    for flag in ("--exif-orientation", "--no-exif-orientation"):
        features = _extract(sideways_photos, "--images", str(sideways_photos / "photos"), flag)
        evaluation = save_evaluation(evaluate_artifact(features.artifact, "zero-shot"), [features.artifact],
                                     sideways_photos / f"eval{flag}.h5")
        predictions, _ = predict([photo, copy], evaluation, top=2, device="cpu")
        outcomes[flag] = [p.probabilities for p in predictions]
    assert outcomes["--exif-orientation"][0] == pytest.approx(outcomes["--exif-orientation"][1], abs=1e-6)
    assert outcomes["--no-exif-orientation"][0] != pytest.approx(outcomes["--no-exif-orientation"][1], abs=1e-4)
